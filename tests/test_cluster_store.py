"""Cluster workers that share no folder with the client (``run.cluster_store``): each
worker runs in a mount namespace where the client's folder is an empty tmpfs, so a worker
that touched the output would find nothing there; shards travel through moto's S3 server
on 127.0.0.1, driven by s3fs. Compared with a one-machine run of the same recipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from test_cluster import check_output, cluster_photos, cluster_recipe, stored
from test_object_storage import s3, s3_server  # noqa: F401 (fixtures)

pytest.importorskip("s3fs")

STORE_BUCKET = "shards"


def _can_hide_folders() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "a mount namespace needs root and unshare"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, timeout=10)
    return None if probe.returncode == 0 else "this kernel refuses mount namespaces"


needs_hidden_folders = pytest.mark.skipif(bool(_can_hide_folders()),
                                          reason=str(_can_hide_folders()))


@contextmanager
def blind_cluster(tmp_path, hidden, env, workers: int = 2):
    """A Dask scheduler, and ``workers`` worker processes (no nanny: a killed one stays
    dead) that each see ``hidden`` as an empty tmpfs and keep their scratch apart."""
    scheduler_file = tmp_path / "scheduler.json"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline, address = time.monotonic() + 30, None
        while address is None and time.monotonic() < deadline:
            try:  # the scheduler writes its file in more than one step
                address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        assert address, "the Dask scheduler did not start"
        for n in range(workers):
            scratch = tmp_path / f"worker-{n}"
            scratch.mkdir()
            command = (f"mount -t tmpfs tmpfs {hidden} && exec {sys.executable} -m "
                       f"distributed.cli.dask_worker {address} --nthreads 1 --no-nanny "
                       f"--local-directory {scratch} --host 127.0.0.1")
            processes.append(subprocess.Popen(["unshare", "-m", "sh", "-c", command], env=env,
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address, processes[1:]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _env(s3_endpoint, flickr, tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return dict(os.environ, NO_PROXY="127.0.0.1,localhost", HOME=str(home),
                AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret",
                AWS_DEFAULT_REGION="us-east-1", FLICKER_KEY=flickr.api_key,
                FLICKER_SECRET="test-secret-abcdef")


def _store_run(s3_endpoint, prefix: str) -> str:
    return json.dumps({"cluster_store": f"s3://{STORE_BUCKET}/{prefix}",
                       "cluster_store_options": {"endpoint_url": s3_endpoint}})


def _harvest(env, *args, check_kill=False):
    from conftest import REPO

    return subprocess.run([sys.executable, "-m", "harvest.core.commands.cli", *map(str, args)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _client_side(tmp_path, flickr, s3_endpoint, prefix: str):
    """The client's folder (hidden from the workers), its output and its recipe."""
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    output = client_dir / "out"
    recipe = client_dir / "recipe.yml"
    recipe.write_text(cluster_recipe(flickr, output, run=_store_run(s3_endpoint, prefix)))
    return client_dir, output, recipe


def _objects(bucket, prefix: str) -> dict[str, bytes]:
    listing = bucket.list_objects_v2(Bucket=STORE_BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: bucket.get_object(Bucket=STORE_BUCKET, Key=o["Key"])["Body"].read()
            for o in listing}


def _alone(flickr, recipe_file, harvest, tmp_path):
    alone = tmp_path / "alone"
    assert harvest("run", recipe_file(cluster_recipe(flickr, alone), "alone.yml"),
                   "--no-progress")[0] == 0
    return {r["id"]: r["file"]["sha256"] for r in stored(alone)}


@needs_hidden_folders
def test_workers_that_share_no_folder_send_shards_through_the_store(
        s3, s3_server, flickr, recipe_file, harvest, tmp_path):  # noqa: F811
    s3.create_bucket(Bucket=STORE_BUCKET)
    flickr.photos = cluster_photos()
    expected = _alone(flickr, recipe_file, harvest, tmp_path)
    client_dir, output, recipe = _client_side(tmp_path, flickr, s3_server, "run1")
    env = _env(s3_server, flickr, tmp_path)
    with blind_cluster(tmp_path, client_dir, env) as (address, _):
        done = _harvest(env, "run", recipe, "--cluster", address, "--no-progress")
        assert done.returncode == 0, done.stderr
        records = stored(output)
        assert {r["id"]: r["file"]["sha256"] for r in records} == expected
        check_output(records, output)
        assert sum(1 for r in records if r.get("duplicate_of")) == 2
        objects = _objects(s3, "run1/")
        assert not [key for key in objects if key.startswith("run1/attempts/")]  # all received
        markers = [json.loads(body) for body in objects.values()]
        assert len(markers) > 8 and all(m["merged"] and m["outcome"] == "complete"
                                        for m in markers)
        for path in output.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert flickr.api_key.encode() not in data and b"test-secret" not in data, path

        again = _harvest(env, "run", recipe, "--cluster", address, "--no-progress")
        assert again.returncode == 0, again.stderr
        summary = json.loads((output / ".harvest" / "last-run.json").read_text())
        assert summary["totals"]["stored"] == 0 and summary["totals"]["downloaded"] == 0
        assert len(stored(output)) == 80
        # No shard ran again: the only searches were the plan's probes (one result each).
        # Every shard ran again (a list may have grown), and fetched nothing: what the
        # output holds is claimed as its own before the shards start.

        # A new output with the same store: the shards run and store everything again
        # (the store's markers of the first output hold it back from nothing).
        shutil.rmtree(output)
        fresh = _harvest(env, "run", recipe, "--cluster", address, "--no-progress")
        assert fresh.returncode == 0, fresh.stderr
        assert {r["id"]: r["file"]["sha256"] for r in stored(output)} == expected

        # Someone else's object in the store, under a marker that looks like harvest's: the
        # next run refuses it in one line naming what to remove, and stores nothing of it.
        import hashlib
        import io
        import tarfile

        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            evil = tarfile.TarInfo("../../escaped.txt")
            evil.size = 4
            tar.addfile(evil, io.BytesIO(b"evil"))
        part = "flickr-0000000000000000~000000000000"
        s3.put_object(Bucket=STORE_BUCKET, Key=f"run1/attempts/flickr-0000000000000000/{part}.tar",
                      Body=buffer.getvalue())
        s3.put_object(Bucket=STORE_BUCKET,
                      Key=f"run1/committed/flickr-0000000000000000/{part}.json",
                      Body=json.dumps({
                          "shard": "flickr-0000000000000000", "part": part,
                          "object": f"attempts/flickr-0000000000000000/{part}.tar",
                          "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                          "bytes": len(buffer.getvalue()), "outcome": "complete",
                          "merged": False}).encode())
        refused = _harvest(env, "run", recipe, "--cluster", address, "--no-progress")
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "which no shard writes" in refused.stderr
        assert f"committed/flickr-0000000000000000/{part}.json" in refused.stderr
        assert not list(tmp_path.rglob("escaped.txt")) and len(stored(output)) == 80


@needs_hidden_folders
def test_a_killed_worker_and_a_killed_client_lose_nothing_and_store_nothing_twice(
        s3, s3_server, flickr, recipe_file, harvest, tmp_path):  # noqa: F811
    """kill -9 of a worker mid-run: its shard runs again on the other, from scratch.
    kill -9 of the client once a shard is committed and not yet merged: the next client
    receives it and runs only what was not complete. The result equals the one-machine
    run, by ids and sha256s."""
    s3.create_bucket(Bucket=STORE_BUCKET)
    flickr.photos = cluster_photos()
    expected = _alone(flickr, recipe_file, harvest, tmp_path)
    flickr.image_latency = 0.1
    client_dir, output, recipe = _client_side(tmp_path, flickr, s3_server, "run2")
    env = _env(s3_server, flickr, tmp_path)
    with blind_cluster(tmp_path, client_dir, env) as (address, workers):
        killed = _harvest(dict(env, HARVEST_TEST_KILL_AT="shard-committed"), "run", recipe,
                          "--cluster", address, "--no-progress")
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        _idle(address)  # the killed client's running shards finish and commit
        left = {key: json.loads(body) for key, body in _objects(s3, "run2/committed/").items()}
        assert left and not any(marker["merged"] for marker in left.values())

        resumed = subprocess.Popen(
            [sys.executable, "-m", "harvest.core.commands.cli", "run", str(recipe),
             "--cluster", address, "--no-progress"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert _kill_mid_shard(address, workers[0]), "the worker had no shard to be killed in"
        _, err = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, err
        records = stored(output)
        assert {r["id"]: r["file"]["sha256"] for r in records} == expected
        check_output(records, output)
        markers = [json.loads(body) for body in _objects(s3, "run2/committed/").values()]
        assert all(m["merged"] for m in markers), markers
        # The killed client's shards still running stopped once it was gone (interrupted)
        # or finished; either way they were received, and nothing was stored twice.
        assert {m["outcome"] for m in markers} <= {"complete", "interrupted"}
        assert not _objects(s3, "run2/attempts/")


def _kill_mid_shard(address: str, worker: subprocess.Popen) -> bool:
    """kill -9 of ``worker`` while it runs a shard; False if it never ran one."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = client.run(os.getpid)
            busy = client.processing()
            if any(pids.get(addr) == worker.pid and tasks for addr, tasks in busy.items()):
                time.sleep(0.3)  # inside the shard: its images on the way
                worker.send_signal(signal.SIGKILL)
                return True
            time.sleep(0.02)
    return False


def _idle(address: str) -> None:
    """Until the killed client's tasks have finished on the workers."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(client.processing().values()):
            time.sleep(0.1)


@pytest.fixture
def memory_store():
    from harvest.core.cluster.transfer import ShardStore

    store = ShardStore(f"memory://harvest-test-{os.getpid()}-{time.monotonic_ns()}")
    yield store
    store.remote.fs.rm(store.remote.root, recursive=True)


def _sent(memory_store, tmp_path, extra=None):
    """A shard attempt sent from a scratch folder, with ``extra(tar)`` added to its tar."""
    from harvest.core.cluster.transfer import attempt_name

    scratch = tmp_path / "scratch"
    part = attempt_name("flickr-0123456789abcdef")
    (scratch / ".harvest" / "shards" / part / ".harvest").mkdir(parents=True)
    (scratch / ".harvest" / "shards" / part / "records.jsonl").write_text("{}\n")
    (scratch / "images" / "monkey").mkdir(parents=True)
    (scratch / "images" / "monkey" / "a.jpg").write_bytes(b"jpeg")
    return memory_store.send(scratch, part, "complete")


def test_a_sent_shard_arrives_whole_and_a_tampered_one_is_refused(memory_store, tmp_path):
    import io
    import tarfile

    from harvest.core.cluster.transfer import TransferError

    marker = _sent(memory_store, tmp_path)
    output = tmp_path / "out"
    part_dir = memory_store.receive(marker, output)
    assert (part_dir / "records.jsonl").read_text() == "{}\n"
    assert (output / "images" / "monkey" / "a.jpg").read_bytes() == b"jpeg"
    assert [m["part"] for m in memory_store.committed()] == [marker["part"]]
    memory_store.settle(marker)
    assert memory_store.committed()[0]["merged"] is True
    assert not memory_store.remote.fs.exists(f"{memory_store.remote.root}/{marker['object']}")

    # The store is written by others: a tar changed after its marker is refused.
    marker = _sent(memory_store, tmp_path / "2")
    path = f"{memory_store.remote.root}/{marker['object']}"
    data = memory_store.remote.fs.cat_file(path)
    memory_store.remote.fs.pipe_file(path, data[:-1] + b"x")
    with pytest.raises(TransferError, match="not what its marker says"):
        memory_store.receive(marker, tmp_path / "out2")
    assert not (tmp_path / "out2" / "images").exists()

    # A tar whose members leave the shard's folder or the images: nothing is written.
    for name, kind in (("../escaped", tarfile.REGTYPE), ("images/../../escaped", tarfile.REGTYPE),
                       ("images/link", tarfile.SYMTYPE), (".harvest/state.sqlite", tarfile.REGTYPE)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            good = tarfile.TarInfo("images/monkey/b.jpg")
            good.size = 4
            tar.addfile(good, io.BytesIO(b"jpeg"))
            bad = tarfile.TarInfo(name)
            bad.type = kind
            bad.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            bad.size = 0
            tar.addfile(bad, io.BytesIO(b""))
        forged = dict(marker, bytes=len(buffer.getvalue()),
                      sha256=__import__("hashlib").sha256(buffer.getvalue()).hexdigest())
        memory_store.remote.fs.pipe_file(path, buffer.getvalue())
        target = tmp_path / f"out-{kind}-{len(name)}"
        with pytest.raises(TransferError, match="which no shard writes"):
            memory_store.receive(forged, target)
        assert not (target / "images" / "monkey" / "b.jpg").exists()
        assert not (tmp_path / "escaped").exists()


def test_a_marker_harvest_did_not_write_is_a_one_line_error(memory_store, tmp_path):
    from harvest.core.errors import UsageError

    memory_store.remote.fs.pipe_file(f"{memory_store.remote.root}/committed/x/y.json",
                                     b'{"shard": "../../etc", "part": "x"}')
    with pytest.raises(UsageError, match="committed/x/y.json: not a shard marker"):
        memory_store.committed()


SUBNET = "10.213.77"


def _can_make_namespaces() -> str | None:
    if _can_hide_folders():
        return _can_hide_folders()
    if not shutil.which("ip"):
        return "no ip command (iproute2)"
    name = f"hvprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None if made.returncode == 0 else "this kernel refuses network namespaces"


@contextmanager
def machines(names: list[str]):
    """A network namespace per name, each with its own address on a bridge whose host
    side is ``SUBNET.1`` (where the test's servers listen): machines that reach each
    other only over that link. Yields name -> address."""
    tag = f"{os.getpid() % 10000}"
    bridge = f"hvbr{tag}"
    made: list[str] = []

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        addresses = {}
        for n, name in enumerate(names):
            namespace, host_end = f"hv{tag}{name}", f"hv{tag}h{n}"
            ip("netns", "add", namespace)
            made.append(namespace)
            ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns",
               namespace)
            ip("link", "set", host_end, "master", bridge, "up")
            ip("-n", namespace, "addr", "add", f"{SUBNET}.{n + 2}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            addresses[name] = (namespace, f"{SUBNET}.{n + 2}")
        yield addresses
    finally:
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=10)


@pytest.mark.skipif(bool(_can_make_namespaces()), reason=str(_can_make_namespaces()))
def test_a_cluster_of_machines_that_share_no_folder_and_no_loopback(recipe_file, harvest,
                                                                  tmp_path, monkeypatch):
    """The scheduler and the client on one machine, two workers on two others (network
    namespaces on a bridge, each worker's view of the client's folder an empty tmpfs), the
    S3 server and the image host on the host side of the bridge: the one-machine result."""
    from fakes import FakeFlickr
    from moto.server import ThreadedMotoServer

    with machines(["client", "w0", "w1"]) as at:
        flickr = FakeFlickr(host=f"{SUBNET}.1").start()
        monkeypatch.setenv("FLICKER_KEY", flickr.api_key)
        monkeypatch.setenv("FLICKER_SECRET", "test-secret-abcdef")
        monkeypatch.setenv("NO_PROXY", f"127.0.0.1,localhost,{SUBNET}.1")
        moto = ThreadedMotoServer(ip_address=f"{SUBNET}.1", port=0, verbose=False)
        moto.start()
        processes = []
        try:
            flickr.photos = cluster_photos(40)
            flickr.image_latency = 0.02
            expected = _alone(flickr, recipe_file, harvest, tmp_path)
            moto_host, moto_port = moto.get_host_and_port()
            endpoint = f"http://{moto_host}:{moto_port}"
            env = _env(endpoint, flickr, tmp_path)
            env["NO_PROXY"] = f"127.0.0.1,localhost,{SUBNET}.1"
            import boto3

            bucket = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id="testing-key-id",
                                  aws_secret_access_key="testing-secret")
            bucket.create_bucket(Bucket=STORE_BUCKET)
            client_dir = tmp_path / "client"
            client_dir.mkdir()
            output = client_dir / "out"
            recipe = client_dir / "recipe.yml"
            recipe.write_text(cluster_recipe(flickr, output, run=_store_run(endpoint, "net")))

            namespace, address = at["client"]
            scheduler = f"tcp://{address}:8786"
            processes.append(subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-m",
                 "distributed.cli.dask_scheduler", "--host", address, "--port", "8786",
                 "--dashboard-address", ":0"], env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            for name in ("w0", "w1"):
                worker_ns, worker_address = at[name]
                scratch = tmp_path / f"scratch-{name}"
                scratch.mkdir()
                command = (f"mount -t tmpfs tmpfs {client_dir} && exec {sys.executable} -m "
                           f"distributed.cli.dask_worker {scheduler} --nthreads 1 "
                           f"--no-nanny --local-directory {scratch} --host {worker_address}")
                processes.append(subprocess.Popen(
                    ["ip", "netns", "exec", worker_ns, "unshare", "-m", "sh", "-c", command],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            from conftest import REPO

            done = subprocess.run(
                ["ip", "netns", "exec", namespace, sys.executable, "-m",
                 "harvest.core.commands.cli", "run", str(recipe), "--cluster", scheduler,
                 "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True,
                timeout=300)
            assert done.returncode == 0, done.stderr
            records = stored(output)
            assert {r["id"]: r["file"]["sha256"] for r in records} == expected
            check_output(records, output)
            markers = [json.loads(body) for body in _objects(bucket, "net/committed/").values()]
            assert markers and all(m["merged"] for m in markers)
        finally:
            for process in processes:
                process.kill()
                process.wait()
            moto.stop()
            flickr.stop()


def test_credentials_for_the_cluster_store_never_go_in_the_recipe(flickr, recipe_file, harvest,
                                                                  tmp_path):
    key, secret = "AKIAEXAMPLEKEY", "wJalr/SECRET+xyz"
    for run, where in ((f'{{cluster_store: "s3://{key}:{secret}@bucket/x"}}', "run.cluster_store"),
                       (f'{{cluster_store: "s3://bucket/x", cluster_store_options: '
                        f'{{secret_access_key: "{secret}"}}}}',
                        "run.cluster_store_options.secret_access_key")):
        recipe = recipe_file(cluster_recipe(flickr, tmp_path / "out", run=run))
        status, out, err = harvest("validate", recipe)
        assert status == 2 and where in err and "environment" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert key not in out + err and secret not in out + err, err


@needs_hidden_folders
def test_a_shard_run_again_through_the_store_fetches_nothing_it_stored(
        s3, s3_server, flickr, tmp_path):  # noqa: F811
    """A URL list cut into byte ranges gives the same shards at every run. Run again, each
    shard starts from an empty state on its worker, yet fetches nothing the output holds;
    URLs added to the list are fetched by the next run."""
    from fakes import FakePhoto

    s3.create_bucket(Bucket=STORE_BUCKET)
    flickr.photos = [FakePhoto(id=str(i), title="x") for i in range(1, 41)]
    inputs = tmp_path / "inputs"  # the workers see this folder, not the client's
    inputs.mkdir()
    listing = inputs / "list.txt"
    listing.write_text("".join(f"{flickr.url}/img/{i}_l.jpg\n" for i in range(1, 31)))
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    output = client_dir / "out"
    recipe = client_dir / "recipe.yml"
    recipe.write_text(f"""
output: {output}
run: {{allow_private_addresses: true, concurrency: 4, rate_per_host: 1000,
      cluster_store: "s3://{STORE_BUCKET}/urls",
      cluster_store_options: {{endpoint_url: "{s3_server}"}}}}
sources: [{{use: urls, options: {{path: {listing}, shard_size: 400}}}}]
sinks: [jsonl]
""")
    env = _env(s3_server, flickr, tmp_path)
    with blind_cluster(tmp_path, client_dir, env) as (address, _):
        def run() -> dict:
            done = _harvest(env, "run", recipe, "--cluster", address, "--no-progress")
            assert done.returncode == 0, done.stderr
            return json.loads((output / ".harvest" / "last-run.json").read_text())["totals"]

        assert run()["stored"] == 30
        again = run()
        assert again["downloaded"] == 0 and again["stored"] == 0, again
        listing.write_text(listing.read_text()
                           + "".join(f"{flickr.url}/img/{i}_l.jpg\n" for i in range(31, 41)))
        more = run()
        assert more["stored"] == 10 and more["downloaded"] == 10, more
        records = stored(output)
        assert len(records) == 40 == len({r["id"] for r in records})
