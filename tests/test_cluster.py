"""Cluster runs on a real local Dask cluster (worker processes on 127.0.0.1) against the
local Flickr server, compared with single-machine runs of the same recipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from conftest import REPO, FakePhoto, flickr_recipe, read_jsonl
from distributed import Client  # noqa: E402
from imagegen import make_image
from test_flickr import make_source

from harvest.core.record import Query

BBOX = (120.0, 10.0, 127.0, 21.0)


def cluster_photos(n: int = 80) -> list[FakePhoto]:
    """Photos spread over days and over the bbox; every fourth is also a "macaque" (found
    by two terms); two pairs share their bytes (the same picture uploaded twice)."""
    photos = []
    for i in range(n):
        photos.append(FakePhoto(
            id=str(5000 + i), title=f"monkey {i}" + (" macaque" if i % 4 == 0 else ""),
            tags="monkey", dateupload=1_500_000_000 + i * 86_400,
            longitude=BBOX[0] + 0.5 + (i * 0.37) % 6, latitude=BBOX[1] + 0.5 + (i * 0.53) % 10))
    twin = make_image(4242, size=(160, 120))
    photos[3].image = photos[n - 10].image = twin
    photos[10].image = photos[n // 2 + 1].image = make_image(4343, size=(160, 120))
    return photos


def cluster_recipe(flickr, output, *, shard_size: int = 12, run: str = "", extra: str = "",
                   sinks: str = "") -> str:
    text = flickr_recipe(flickr.endpoint, output, terms="[monkey, macaque]", run=run, options=f"""
        bbox: {",".join(str(v) for v in BBOX)}
        count: 1000
        shard_size: {shard_size}
        calls_per_hour: 1000000
        {extra}
    """)
    return text + (f"sinks:\n{sinks}" if sinks else "")


def stored(output) -> list[dict]:
    path = output / "records.jsonl"
    return read_jsonl(path) if path.exists() else []


def check_output(records: list[dict], output) -> None:
    """No duplicate, every file present, duplicates point at stored originals."""
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    by_id = {r["id"]: r for r in records}
    for record in records:
        assert (output / record["file"]["path"]).is_file(), record["file"]["path"]
        if record.get("duplicate_of"):
            original = by_id[record["duplicate_of"]]
            assert original["file"]["path"] == record["file"]["path"]
    on_disk = {p.relative_to(output).as_posix() for p in (output / "images").rglob("*") if p.is_file()}
    assert on_disk == {r["file"]["path"] for r in records}  # no orphan, no hole


def test_partitions_together_give_the_whole_query(flickr, tmp_path):
    flickr.photos = cluster_photos()
    source = make_source(flickr, tmp_path, bbox=list(BBOX), shard_size=7, calls_per_hour=10**6)
    query = Query("monkey", "en", "monkey")
    whole = [r.source_id for r in source.records(query)]
    parts = source.partitions(query, 1000)
    assert len(parts) >= 12
    tiles = {tuple(part["bbox"]) for part, _ in parts}
    assert len(tiles) > 1  # split by map tiles as well as by dates
    pieces = [[r.source_id for r in source.records(Query("monkey", "en", "monkey", part))]
              for part, _ in parts]
    together = [photo_id for piece in pieces for photo_id in piece]
    assert len(together) == len(set(together)), "two partitions overlap"
    assert sorted(together) == sorted(whole) and len(whole) == 80


def test_partitions_of_a_binding_count_follow_the_single_machine_order(flickr, tmp_path,
                                                                       monkeypatch):
    import harvest.plugins.sources.flickr as flickr_module

    monkeypatch.setattr(flickr_module, "RESULT_CAP", 30)
    flickr.photos = cluster_photos()
    source = make_source(flickr, tmp_path, per_page=10, calls_per_hour=10**6, shard_size=30)
    query = Query("monkey", "en", "monkey")
    whole = [r.source_id for r in source.records(query)][:45]
    parts = source.partitions(query, 45)
    assert sum(limit for _, limit in parts) == 45 and len(parts) > 1
    together = []
    for part, limit in parts:
        together += [r.source_id for r in source.records(Query("monkey", "en", "monkey", part))][:limit]
    assert sorted(together) == sorted(whole)
    # A count that one shard can take is not split at all: no probe spent on it.
    calls = flickr.calls["flickr.photos.search"]
    assert source.partitions(query, 30) == [(None, 30)]
    assert flickr.calls["flickr.photos.search"] == calls


def test_cluster_run_equals_single_machine_run(flickr, recipe_file, harvest, tmp_path,
                                               dask_cluster):
    flickr.photos = cluster_photos()
    alone, clustered = tmp_path / "alone", tmp_path / "clustered"
    assert harvest("run", recipe_file(cluster_recipe(flickr, alone), "alone.yml"),
                   "--no-progress")[0] == 0
    status, out, err = harvest("run", recipe_file(cluster_recipe(flickr, clustered), "c.yml"),
                               "--cluster", dask_cluster.scheduler_address, "--no-progress")
    assert status == 0, err
    single, spread = stored(alone), stored(clustered)
    assert {r["id"] for r in spread} == {r["id"] for r in single}
    assert len(spread) == 80
    check_output(spread, clustered)
    # Content twins are stored once on the cluster too, even from different shards.
    assert sum(1 for r in spread if r.get("duplicate_of")) == 2
    assert len({r["file"]["sha256"] for r in spread}) == 78
    shards = list((clustered / ".harvest" / "shards").iterdir())
    assert len(shards) > 8  # terms x date slices x tiles
    summary = json.loads((clustered / ".harvest" / "last-run.json").read_text())
    assert summary["totals"]["stored"] == 80 and summary["outcome"] == "complete"
    assert "all" in out and "80" in out
    # The secrets travelled inside the tasks; none was written on the way.
    for path in clustered.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert flickr.api_key.encode() not in data and b"test-secret-abcdef" not in data, path

    # Again: everything is skipped and nothing is written twice.
    status, out, _ = harvest("run", tmp_path / "c.yml", "--cluster",
                             dask_cluster.scheduler_address, "--no-progress")
    assert status == 0
    assert len(stored(clustered)) == 80
    summary = json.loads((clustered / ".harvest" / "last-run.json").read_text())
    assert summary["totals"]["stored"] == 0 and summary["totals"]["downloaded"] == 0

    # A single-machine run on the same output knows what the cluster stored.
    status, _, _ = harvest("run", tmp_path / "c.yml", "--no-progress")
    assert status == 0 and len(stored(clustered)) == 80


def test_url_lists_and_folders_are_shared_out_on_a_cluster(flickr, recipe_file, harvest,
                                                           tmp_path, dask_cluster):
    """A URL list and a folder are cut into shards (byte ranges, runs of files) that the
    cluster's workers read side by side; together they store what one machine stores."""
    flickr.photos = [FakePhoto(id=str(i), title="x") for i in range(1, 61)]
    base = flickr.url + "/img/"
    (tmp_path / "list.txt").write_text("".join(f"{base}{i}_l.jpg\n" for i in range(1, 61)))
    photos = tmp_path / "photos"
    for folder in ("a", "b"):
        (photos / folder).mkdir(parents=True)
        for i in range(15):
            (photos / folder / f"{i}.jpg").write_bytes(make_image(hash((folder, i)) % 10_000))

    def recipe(output, name):
        return recipe_file(f"""
terms: [x]
output: {output}
run: {{allow_private_addresses: true, concurrency: 4, rate_per_host: 1000}}
sources:
  - {{use: urls, options: {{path: list.txt, shard_size: 500}}}}
  - {{use: folder, options: {{path: photos, shard_size: 7}}}}
sinks: [jsonl, {{use: webdataset, options: {{shard_size: 40}}}}]
""", name)

    assert harvest("run", recipe(tmp_path / "alone", "alone.yml"), "--no-progress")[0] == 0
    status, _, err = harvest("run", recipe(tmp_path / "spread", "spread.yml"), "--cluster",
                             dask_cluster.scheduler_address, "--no-progress")
    assert status == 0, err
    single, spread = stored(tmp_path / "alone"), stored(tmp_path / "spread")
    assert len(single) == 90
    assert sorted(r["id"] for r in spread) == sorted(r["id"] for r in single)
    check_output(spread, tmp_path / "spread")
    shards = list((tmp_path / "spread" / ".harvest" / "shards").iterdir())
    assert len(shards) >= 4 + 5  # the list in 500-byte ranges, the folder in runs of 7
    # The client builds the tar shards from the shards' parts: dense, each sample once.
    import webdataset as wds

    tars = sorted(str(p) for p in (tmp_path / "spread" / "webdataset").glob("*.tar"))
    assert [Path(t).name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    keys = [json.loads(s["json"])["id"] for s in wds.WebDataset(tars, shardshuffle=False)]
    assert sorted(keys) == sorted(r["id"] for r in single)


def test_rate_limit_holds_across_workers(flickr, recipe_file, harvest, tmp_path, dask_cluster):
    flickr.photos = cluster_photos(40)
    recipe = recipe_file(cluster_recipe(flickr, tmp_path / "out", shard_size=5,
                                        run="rate_per_host: 20\nconcurrency: 8"))
    started = time.monotonic()
    status, _, err = harvest("run", recipe, "--cluster", dask_cluster.scheduler_address,
                             "--no-progress")
    assert status == 0, err
    times = sorted(t for t, method, path, _ in flickr.server.requests if t >= started)
    # Every request to the host, from both workers, took one token of 20 per second: any
    # 21 consecutive requests span at least 20 intervals of 50 ms.
    assert len(times) > 60
    spans = [times[i + 20] - times[i] for i in range(len(times) - 20)]
    assert min(spans) >= 0.9, min(spans)


def _reserve_many(key: str, count: int) -> list[float]:
    from harvest.core.cluster.worker import ClusterCoordinator

    coordinator = ClusterCoordinator("quota-test", "shard")
    return [coordinator.reserve(key, 10.0, 1.0) for _ in range(count)]


def test_token_buckets_are_shared_by_the_workers(dask_cluster):
    from harvest.core.cluster.scheduler import PLUGIN_NAME, CoordinatorPlugin

    with Client(dask_cluster, set_as_default=False) as client:
        client.register_plugin(CoordinatorPlugin(), name=PLUGIN_NAME)
        workers = list(client.scheduler_info()["workers"])
        futures = [client.submit(_reserve_many, "flickr-calls:test", 10, workers=[w], pure=False)
                   for w in workers]
        delays = sorted(d for future in futures for d in future.result())
    # Twenty reservations of one token at 10 per second: the last waits ~1.9 s, whichever
    # worker made it; two separate buckets would have let both start at once.
    assert len(delays) == 20
    assert delays[-1] >= 1.7
    assert delays[0] == 0.0 and delays[1] > 0.0


def test_mongodb_sink_on_a_cluster(flickr, recipe_file, harvest, tmp_path, dask_cluster, mongo):
    flickr.photos = cluster_photos(40)
    sinks = f"""  - use: jsonl
  - use: mongodb
    options: {{uri: "{mongo.uri}", collection: monkeys, personal_fields: omit}}
"""
    recipe = recipe_file(cluster_recipe(flickr, tmp_path / "out", shard_size=6, sinks=sinks))
    status, _, err = harvest("run", recipe, "--cluster", dask_cluster.scheduler_address,
                             "--no-progress")
    assert status == 0, err
    client = mongo.client()
    documents = list(client["harvest"]["monkeys"].find({}, {"_id": 0}))
    client.close()
    assert len(documents) == 40
    assert {d["id"] for d in documents} == {r["id"] for r in stored(tmp_path / "out")}
    twins = [d for d in documents if d.get("duplicate_of")]
    assert len(twins) == 2  # claimed by content across workers: one original each
    for twin in twins:
        original = next(d for d in documents if d["id"] == twin["duplicate_of"])
        assert original["file"]["path"] == twin["file"]["path"]


def test_bad_cluster_options_are_one_line_errors(recipe_file, harvest, tmp_path, flickr):
    recipe = recipe_file(cluster_recipe(flickr, tmp_path / "out"))
    status, _, err = harvest("run", recipe, "--cluster", "tcp://127.0.0.1:9", "--no-progress")
    assert status == 2 and "--cluster tcp://127.0.0.1:9: cannot reach" in err
    assert len(err.strip().splitlines()) == 1
    status, _, err = harvest("run", recipe, "--local-workers", "0")
    assert status == 2 and "--local-workers 0" in err
    status, _, err = harvest("run", recipe, "--local-workers", "2", "--limit", "5")
    assert status == 2 and "--limit" in err


def start_local_cluster_run(flickr, tmp_path, *, latency: float, shard_size: int, run: str):
    """`harvest run RECIPE --local-workers 2` started as a child process over 80 photos
    served with ``latency``; returns the child, and its command and environment."""
    flickr.photos = cluster_photos()
    flickr.image_latency = latency
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(cluster_recipe(flickr, tmp_path / "out", shard_size=shard_size, run=run))
    env = dict(os.environ, FLICKER_KEY=flickr.api_key, FLICKER_SECRET="test-secret-abcdef",
               NO_PROXY="127.0.0.1,localhost")
    command = [sys.executable, "-m", "harvest.core.commands.cli", "run", str(recipe), "--local-workers",
               "2", "--no-progress"]
    child = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    return child, command, env


def wait_for_images(output, count: int, child) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if len(list((output / "images").rglob("*.jpg"))) >= count:
            return
        time.sleep(0.05)


def test_local_workers_and_a_killed_worker(flickr, tmp_path):
    """`--local-workers` starts its own cluster; a worker killed in the middle of a shard
    costs nothing: its shard runs again elsewhere, with no duplicate and no hole."""
    child, _, _ = start_local_cluster_run(flickr, tmp_path, latency=0.15, shard_size=40,
                                          run="concurrency: 2")
    killed = threading.Event()

    def kill_a_worker_mid_shard() -> None:
        wait_for_images(tmp_path / "out", 10, child)
        workers = subprocess.run(["pgrep", "-f", "-P", str(child.pid), "spawn_main"],
                                 capture_output=True, text=True).stdout.split()
        if workers:
            os.kill(int(workers[0]), signal.SIGKILL)
            killed.set()

    killer = threading.Thread(target=kill_a_worker_mid_shard)
    killer.start()
    out, err = child.communicate(timeout=240)
    killer.join()
    assert child.returncode == 0, out + err
    assert killed.is_set()
    assert "Restarting worker" in err  # the nanny saw the worker die mid-shard
    records = stored(tmp_path / "out")
    assert {r["id"] for r in records} == {f"flickr:{p.id}" for p in flickr.photos}
    check_output(records, tmp_path / "out")


def test_interrupted_cluster_run_resumes_without_duplicates(flickr, tmp_path):
    """Ctrl-C on the client: the shards stop and save, what they stored is merged, exit
    130; the next run finishes the job with no duplicate."""
    child, command, env = start_local_cluster_run(flickr, tmp_path, latency=0.1, shard_size=20,
                                                  run="concurrency: 2\nbatch_size: 4")
    wait_for_images(tmp_path / "out", 12, child)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, out + err
    summary = json.loads((tmp_path / "out" / ".harvest" / "last-run.json").read_text())
    assert summary["outcome"] == "interrupted"
    partial = stored(tmp_path / "out")
    assert len(partial) < 80
    check_ids = [r["id"] for r in partial]
    assert len(check_ids) == len(set(check_ids))

    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    records = stored(tmp_path / "out")
    assert {r["id"] for r in records} == {f"flickr:{p.id}" for p in flickr.photos}
    check_output(records, tmp_path / "out")


def test_a_takedown_holds_on_a_cluster(flickr, recipe_file, harvest, tmp_path, dask_cluster):
    """Taken down on one machine: a cluster run fetches neither the record nor the same
    picture under another id."""
    flickr.photos = cluster_photos(12)
    output = tmp_path / "out"
    recipe = recipe_file(cluster_recipe(flickr, output, shard_size=4))
    assert harvest("run", recipe, "--cluster", dask_cluster.scheduler_address,
                   "--no-progress")[0] == 0
    gone = next(r for r in stored(output) if not r.get("duplicate_of"))
    picture = (output / gone["file"]["path"]).read_bytes()
    status, _, err = harvest("takedown", recipe, "--source-id", gone["id"])
    assert status == 0, err
    flickr.photos.append(FakePhoto(id="777777", title="monkey copy", tags="monkey",
                                   dateupload=1_500_000_000 + 3 * 86_400,
                                   longitude=BBOX[0] + 1, latitude=BBOX[1] + 1, image=picture))
    status, out, err = harvest("run", recipe, "--cluster", dask_cluster.scheduler_address,
                               "--no-progress")
    assert status == 0, err
    ids = {r["id"] for r in stored(output)}
    assert gone["id"] not in ids and "flickr:777777" not in ids
    assert "taken down" in out


def test_near_duplicates_are_found_across_workers_and_runs(recipe_file, harvest, tmp_path,
                                                           dask_cluster):
    """The originals in one folder, half-size copies in another: the folders are cut into
    shards that run on different workers, and each picture is still kept once. Then a
    second cluster run, with re-encoded copies, finds them against the first run's."""
    import io

    from PIL import Image

    from harvest.core.cleaning.curation import set_aside_ids

    def half(data: bytes, quality: int = 90, scale: int = 2) -> bytes:
        image = Image.open(io.BytesIO(data))
        out = io.BytesIO()
        image.resize((image.width // scale, image.height // scale)).save(out, "JPEG",
                                                                          quality=quality)
        return out.getvalue()

    photos = tmp_path / "photos"
    originals = {i: make_image(300 + i, size=(320, 240)) for i in range(12)}
    for folder in ("a", "b"):
        (photos / folder).mkdir(parents=True)
    for i, data in originals.items():
        (photos / "a" / f"{i}.jpg").write_bytes(data)
        (photos / "b" / f"{i}.jpg").write_bytes(half(data))
    output = tmp_path / "out"
    recipe = recipe_file(f"""
output: {output}
sources: [{{use: folder, options: {{path: photos, shard_size: 4}}}}]
enrichers: [{{use: near_duplicates, options: {{action: mark}}}}]
""")
    status, _, err = harvest("run", recipe, "--cluster", dask_cluster.scheduler_address,
                             "--no-progress")
    assert status == 0, err
    assert len(list((output / ".harvest" / "shards").iterdir())) >= 6

    def not_kept() -> set[str]:
        records = read_jsonl(output / "records.jsonl")
        aside = set(set_aside_ids(output))
        return {r["id"] for r in records if r.get("near_duplicate_of")} | aside

    left_out = not_kept()
    # Each half-size copy is left out (marked, or set aside when it came first), and no
    # original is.
    assert left_out == {f"folder:b/{i}.jpg" for i in originals}, sorted(left_out)

    (photos / "c").mkdir()
    for i in range(0, 12, 3):
        (photos / "c" / f"{i}.jpg").write_bytes(half(originals[i], quality=40, scale=3))
    status, _, err = harvest("run", recipe, "--cluster", dask_cluster.scheduler_address,
                             "--no-progress")
    assert status == 0, err
    later = {r["id"]: r for r in read_jsonl(output / "records.jsonl")}
    for i in range(0, 12, 3):
        assert later[f"folder:c/{i}.jpg"]["near_duplicate_of"] == f"folder:a/{i}.jpg"
    # A run on one machine afterwards knows the cluster's pictures too.
    (photos / "d").mkdir()
    (photos / "d" / "1.jpg").write_bytes(half(originals[1], quality=50, scale=4))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    alone = {r["id"]: r for r in read_jsonl(output / "records.jsonl")}["folder:d/1.jpg"]
    assert alone["near_duplicate_of"] == "folder:a/1.jpg"
