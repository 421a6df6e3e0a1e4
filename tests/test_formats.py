"""Training formats (WebDataset tars, Parquet), each read back by its own ecosystem's
reader; personal data kept out of every byte; exactly-once across kill -9."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest
from conftest import flickr_recipe, monkey_photos, read_jsonl
from test_resume import start_run, wait_for_lock

SINKS = """
sinks:
  - jsonl
  - use: webdataset
    options: {shard_size: 7}
  - use: parquet
    options: {shard_size: 9, row_group_size: 4, images: true}
"""


def recipe_text(flickr, output, run: str = "") -> str:
    return flickr_recipe(flickr.endpoint, output, run=run) + "enrichers: [exif]\n" + SINKS


def tar_samples(folder) -> list[dict]:
    import webdataset as wds

    shards = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False)) if shards else []


def test_webdataset_and_parquet_are_read_by_their_own_readers(flickr, recipe_file, harvest,
                                                              tmp_path):
    import datasets
    import pyarrow.parquet as pq
    from PIL import Image

    flickr.photos = monkey_photos(30)
    output = tmp_path / "out"
    status, _, err = harvest("run", recipe_file(recipe_text(flickr, output)), "--no-progress")
    assert status == 0, err
    records = {r["id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert len(records) == 30

    samples = tar_samples(output / "webdataset")
    assert len(samples) == 30 and len(list((output / "webdataset").glob("*.tar"))) == 5
    for sample in samples:
        document = json.loads(sample["json"])
        assert document["key"] == sample["__key__"]
        assert sample["txt"].decode() == records[document["id"]]["title"]
        with Image.open(__import__("io").BytesIO(sample["jpg"])) as image:
            image.load()
            assert image.size == (records[document["id"]]["file"]["width"],
                                  records[document["id"]]["file"]["height"])
            assert not image.getexif()  # stripped: it carried the owner's name
    assert {json.loads(s["json"])["id"] for s in samples} == set(records)
    stats = json.loads((output / "webdataset" / "00000_stats.json").read_text())
    assert stats["count"] == 7 and stats["terms"] == {"monkey": 7}

    table = pq.read_table(output / "parquet")
    assert table.num_rows == 30 and set(table.column("id").to_pylist()) == set(records)
    assert table.schema.field("width").type == "int64"
    loaded = datasets.load_dataset("parquet", data_dir=str(output / "parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == 30
    row = loaded[0]
    assert row["license"] == records[row["id"]]["license"]
    assert json.loads(row["record"])["id"] == row["id"]
    assert len(row["image"]) > 0

    # A second run with nothing new leaves the same samples, none twice.
    status, _, _ = harvest("run", tmp_path / "recipe.yml", "--no-progress")
    assert status == 0
    assert len(tar_samples(output / "webdataset")) == 30
    assert pq.read_table(output / "parquet").num_rows == 30


@pytest.mark.parametrize("mode", ["omit", "encrypt"])
def test_personal_data_is_in_no_byte_of_any_format(mode, flickr, recipe_file, harvest, tmp_path,
                                                   monkeypatch):
    from cryptography.fernet import Fernet

    monkeypatch.setenv("HARVEST_KEY", Fernet.generate_key().decode())
    flickr.photos = monkey_photos(12)
    output = tmp_path / "out"
    protect = f"personal_fields: {mode}"
    text = flickr_recipe(flickr.endpoint, output) + f"""enrichers: [exif]
sinks:
  - use: webdataset
    options: {{shard_size: 5, {protect}}}
  - use: parquet
    options: {{shard_size: 5, images: true, {protect}}}
"""
    status, _, err = harvest("run", recipe_file(text), "--no-progress")
    assert status == 0, err
    photo = flickr.photos[0]
    secrets = [photo.ownername.encode(), photo.owner.encode(), photo.pathalias.encode(),
               b"Test Camera Owner", b"HarvestCam"]
    written = [p for p in output.rglob("*") if p.is_file() and "images" not in p.parts]
    assert any(p.suffix == ".tar" for p in written) and any(p.suffix == ".parquet" for p in written)
    for path in written:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, (path, secret)


def test_a_killed_run_leaves_no_torn_shard_and_resumes_exactly_once(flickr, recipe_file,
                                                                    harvest, tmp_path,
                                                                    isolated_home):
    """kill -9 at several moments: every tar a reader finds is whole, and the run that
    finishes the job has every sample once."""
    flickr.photos = monkey_photos(120)
    flickr.image_latency = 0.01
    output = tmp_path / "out"
    recipe = recipe_file(recipe_text(flickr, output,
                                     run="concurrency: 4\nbatch_size: 3\nlimit_per_term: 200"))
    seen: list[int] = []
    for delay in (0.2, 0.35, 0.5, 0.65, 0.8, 0.95):
        process = start_run(recipe, isolated_home)
        wait_for_lock(output, process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        seen.append(len(tar_samples(output / "webdataset")))  # every shard reads to its end
    assert any(0 < n < 120 for n in seen), seen  # kills landed mid-harvest, shards written
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    ids = Counter(json.loads(s["json"])["id"] for s in tar_samples(output / "webdataset"))
    assert len(ids) == 120 and max(ids.values()) == 1
    assert not list((output / "webdataset").glob(".*.tmp"))  # a cut-off build is cleared
    import pyarrow.parquet as pq

    rows = Counter(pq.read_table(output / "parquet", columns=["id"]).column("id").to_pylist())
    assert len(rows) == 120 and max(rows.values()) == 1
    # Shards are numbered densely: a resumed run completes the shard it found open.
    numbers = sorted(int(p.stem) for p in (output / "webdataset").glob("*.tar"))
    assert numbers == list(range(len(numbers))) and len(numbers) == -(-120 // 7)


def test_hf_export_loads_with_datasets_and_has_a_card(flickr, recipe_file, harvest, tmp_path):
    """`export --format hf`: the imagefolder loader gives the images, the label from the
    term and the metadata columns; README.md carries Hugging Face front matter, and
    croissant.json passes mlcroissant's checks and reads back the same records."""
    import datasets
    import yaml

    flickr.photos = monkey_photos(6) + [p for p in monkey_photos(4, start=50)]
    for photo in flickr.photos[6:]:
        photo.title = photo.title.replace("monkey", "cage")
    output = tmp_path / "out"
    text = flickr_recipe(flickr.endpoint, output, terms="[monkey, cage]") + \
        "enrichers: [license]\n"
    assert harvest("run", recipe_file(text), "--no-progress")[0] == 0
    destination = tmp_path / "hf"
    status, out, err = harvest("export", output, destination, "--format", "hf")
    assert status == 0, err
    loaded = datasets.load_dataset("imagefolder", data_dir=str(destination), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    records = read_jsonl(output / "records.jsonl")
    assert loaded.num_rows == len({r["file"]["sha256"] for r in records})
    row = loaded[0]
    assert row["label"] in ("monkey", "cage") and row["label"] == row["term"]
    assert row["license"] == "CC-BY-2.0" and row["image"].size == (row["width"], row["height"])
    # Personal fields (the attribution names the author) stay out without the key.
    assert "owner_name" not in loaded.column_names and row["attribution"] is None
    assert flickr.photos[0].ownername not in (destination / "metadata.jsonl").read_text()
    # Loaded as a folder, the card's features apply: the label is a ClassLabel of the terms.
    classified = datasets.load_dataset(str(destination), split="train",
                                       cache_dir=str(tmp_path / "hf-cache-2"))
    label = classified.features["label"]
    assert isinstance(label, datasets.ClassLabel)
    assert label.names == sorted(set(classified["term"]))
    assert [label.int2str(value) for value in classified["label"]] == classified["term"]
    assert classified.features["width"].dtype == "int64"
    assert classified.num_rows == loaded.num_rows

    card = (destination / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "other" or front["license"].startswith("cc")
    assert front["size_categories"] == ["n<1K"] and front["language"] == ["en"]
    assert "| CC-BY-2.0 |" in card

    import mlcroissant as mlc

    croissant = mlc.Dataset(jsonld=str(destination / "croissant.json"))
    rows = list(croissant.records(record_set="records"))
    assert len(rows) == loaded.num_rows
    assert {r["records/id"].decode() for r in rows} == set(loaded["id"])


def test_every_export_format_has_the_card(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(3)
    output = tmp_path / "out"
    assert harvest("run", recipe_file(flickr_recipe(flickr.endpoint, output)),
                   "--no-progress")[0] == 0
    for fmt in ("imagefolder", "manifest"):
        status, out, _ = harvest("export", output, tmp_path / fmt, "--format", fmt)
        assert status == 0 and "3 images in 1 class exported" in out
        assert (tmp_path / fmt / "README.md").read_text().startswith("---\n")
        croissant = json.loads((tmp_path / fmt / "croissant.json").read_text())
        assert croissant["distribution"][0]["contentUrl"] == "manifest.csv"


def test_an_export_killed_midway_leaves_no_dataset_and_the_next_one_completes(
        flickr, recipe_file, harvest, tmp_path):
    """kill -9 after the first image: no folder that looks like a dataset is left at the
    destination, and the next export builds it whole, equal to an export never stopped."""
    from test_takedown import killed_at

    flickr.photos = monkey_photos(4)
    output = tmp_path / "out"
    assert harvest("run", recipe_file(flickr_recipe(flickr.endpoint, output)),
                   "--no-progress")[0] == 0
    for fmt in ("imagefolder", "manifest"):
        destination = tmp_path / f"dataset-{fmt}"
        killed_at("exported-one", "export", output, destination, "--format", fmt)
        assert not destination.exists(), fmt
        status, out, err = harvest("export", output, destination, "--format", fmt)
        assert status == 0 and "4 images in 1 class exported" in out, (out, err)
        assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
        whole = tmp_path / f"whole-{fmt}"
        assert harvest("export", output, whole, "--format", fmt)[0] == 0
        assert (destination / "manifest.jsonl").read_bytes() == \
            (whole / "manifest.jsonl").read_bytes()
        assert sorted(str(p.relative_to(destination)) for p in destination.rglob("*")) == \
            sorted(str(p.relative_to(whole)) for p in whole.rglob("*"))


def crafted_records(output, outside) -> list[str]:
    """Appends to ``output``'s records.jsonl three records whose file is ``outside`` (a
    file of the user's beyond the harvest): by absolute path, by ``../..`` and through
    ``images/``. Returns their SHA-256s."""
    import hashlib

    relative = __import__("os").path.relpath(outside, output)
    shas = []
    with (output / "records.jsonl").open("a", encoding="utf-8") as records:
        for number, path in enumerate((str(outside), relative, f"images/../{relative}")):
            sha = hashlib.sha256(b"crafted %d" % number).hexdigest()
            shas.append(sha)
            records.write(json.dumps({"id": f"crafted:{number}", "source": "flickr",
                                      "term": "monkey", "title": "crafted",
                                      "file": {"path": path, "sha256": sha, "bytes": 10,
                                               "width": 8, "height": 8, "format": "JPEG"}})
                          + "\n")
    return shas


def test_export_never_copies_a_file_a_record_points_outside(flickr, recipe_file, harvest,
                                                           tmp_path):
    """A crafted records.jsonl naming files outside the harvest (absolute, ``../..``): no
    export format copies, links or lists them; export says how many it skipped."""
    from imagegen import coloured_image

    flickr.photos = monkey_photos(3)
    output = tmp_path / "out"
    assert harvest("run", recipe_file(flickr_recipe(flickr.endpoint, output)),
                   "--no-progress")[0] == 0
    secret = tmp_path / "private" / "passwd.jpg"
    secret.parent.mkdir()
    secret.write_bytes(coloured_image((1, 2, 3), 0, (16, 16)) + b"PRIVATE-MARKER")
    crafted_records(output, secret)
    for fmt, extra in (("imagefolder", ()), ("imagefolder", ("--copy",)), ("manifest", ()),
                       ("hf", ())):
        destination = tmp_path / f"{fmt}{len(extra)}"
        status, out, err = harvest("export", output, destination, "--format", fmt, *extra)
        assert status == 0 and "3 images in 1 class exported" in out, (out, err)
        assert "3 record(s) skipped: their file path leaves the harvest" in err
        for path in destination.rglob("*"):
            if path.is_file():
                assert b"PRIVATE-MARKER" not in path.read_bytes(), path
                assert b"private" not in path.read_bytes(), path
                assert not path.samefile(secret)


def test_a_full_disk_stops_shard_sinks_in_one_line_and_resume_stores_each_record_once(
        flickr, recipe_file, harvest, small_disk):
    """The disk fills while the shards are built, mid-run or when the run closes them, at
    a different moment each run: each run stops in one line (exit 1), and the run that
    finally has room leaves every record once in the JSONL, the tars and the Parquet."""
    import io
    import random
    import subprocess

    from conftest import FakePhoto
    from PIL import Image

    photos = []
    for index in range(80):  # ~30 KB of noise each, and two more copies in the shards
        noise = random.Random(index).randbytes(120 * 120 * 3)
        buffer = io.BytesIO()
        Image.frombytes("RGB", (120, 120), noise).save(buffer, "JPEG", quality=95)
        photos.append(FakePhoto(id=str(3000 + index), title="monkey", image=buffer.getvalue()))
    flickr.photos = photos
    output = small_disk / "out"
    recipe = recipe_file(recipe_text(flickr, output,
                                     run="concurrency: 4\nbatch_size: 4\nlimit_per_term: 80"))
    for size in ("1M", "1500K", "2M", "2500K", "3M"):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(small_disk)], check=True)
        status, out, err = harvest("run", recipe, "--no-progress")
        if status == 0:
            break
        assert status == 1, out + err
        assert err.splitlines() == [f"harvest: error: no space left on the device of {output}; "
                                    f"free some space and run again to resume"], err
    else:
        subprocess.run(["mount", "-o", "remount,size=40M", str(small_disk)], check=True)
        status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, out + err
    assert_each_once_in_every_sink(output, {f"flickr:{photo.id}" for photo in photos})


def assert_each_once_in_every_sink(output, expected: set[str]) -> None:
    """Every expected id once, and nothing else, in the JSONL, the tars and the Parquet."""
    import pyarrow.parquet as pq

    for ids in ([r["id"] for r in read_jsonl(output / "records.jsonl")],
                [json.loads(s["json"])["id"] for s in tar_samples(output / "webdataset")],
                pq.read_table(output / "parquet", columns=["id"]).column("id").to_pylist()):
        counts = Counter(ids)
        assert set(counts) == expected and max(counts.values()) == 1, counts.most_common(3)


def test_the_shards_have_each_picture_once_as_export_does(recipe_file, harvest, tmp_path):
    """Exact copies, near duplicates and a smaller copy set aside when the larger one came
    are no samples: the tars and the Parquet hold what `harvest export` holds; the copies
    still count as stored (`--verify-sinks` finds nothing lacking)."""
    import pyarrow.parquet as pq
    from imagegen import make_image
    from test_cleaning import variant

    photos = tmp_path / "photos"
    photos.mkdir()
    originals = {i: make_image(200 + i, size=(320, 240)) for i in range(4)}
    for i, data in originals.items():
        (photos / f"{i}-a.jpg").write_bytes(data)
    (photos / "0-b-same.jpg").write_bytes(originals[0])
    (photos / "1-b-q40.jpg").write_bytes(variant(originals[1], "q40"))
    (photos / "2-a.jpg").write_bytes(variant(originals[2], "half"))
    (photos / "2-b-big.jpg").write_bytes(originals[2])
    output = tmp_path / "out"
    text = f"""
name: copies
terms: [x]
output: {output}
sources: [{{use: folder, options: {{path: {photos}}}}}]
enrichers: [{{use: near_duplicates, options: {{action: mark}}}}]
sinks:
  - jsonl
  - webdataset
  - {{use: parquet, options: {{images: true, shard_size: 2}}}}
"""
    recipe = recipe_file(text)
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    assert len(read_jsonl(output / "records.jsonl")) == 7
    assert harvest("export", output, tmp_path / "dataset")[0] == 0
    exported = sorted(json.loads(line)["id"] for line in
                      (tmp_path / "dataset" / "manifest.jsonl").read_text().splitlines())
    assert len(exported) == 4
    assert sorted(json.loads(s["json"])["id"] for s in tar_samples(output / "webdataset")) \
        == exported
    assert sorted(pq.read_table(output / "parquet").column("id").to_pylist()) == exported
    # A later run (which clears the staging of finished shards), then a check that finds
    # the copies stored though they are no samples.
    (photos / "4-a.jpg").write_bytes(make_image(300, size=(320, 240)))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    status, out, err = harvest("run", recipe, "--no-progress", "--verify-sinks")
    assert status == 0, err
    assert "verify: every sink has every stored record" in out
    exported.append("folder:4-a.jpg")
    assert sorted(json.loads(s["json"])["id"] for s in tar_samples(output / "webdataset")) \
        == exported
    assert sorted(pq.read_table(output / "parquet").column("id").to_pylist()) == exported
