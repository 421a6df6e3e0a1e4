"""harvest on a local Dask cluster of 1, 2 and 4 workers, against one process, in one run.

    python bench/cluster.py                       # N = 2000 images, 50 ms per response
    python bench/cluster.py --n 400 --workers 1,2 --shards 8 --empty-shards 10

The same latency-injecting Flickr stand-in as ``bench/run.py`` (REST JSON and an image
host on 127.0.0.1, N real JPEGs with EXIF) serves every run. The recipe is the one
``run.py`` uses (Flickr source, exif and geocode enrichers, JSONL sink); ``shard_size``
splits its one query into about ``--shards`` date slices. Each run is a child process
(``harvest run ... --local-workers W``), timed from start to exit, so the cluster's own
start and the final merge are counted. Per-shard overhead: the same cluster runs a
recipe of K queries that find nothing, K = 1 and K = ``--empty-shards``, against a
server without latency (so that it is harvest's own cost, not the API's: each shard
also costs the API one search call, and one probe call while planning).

``--store``: each worker count is also run with ``run.cluster_store`` on moto's S3 server
(127.0.0.1): every shard sent whole through the store and received by the client, as
for workers that share no folder. The rows side by side give that path's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402

SPACING = 3 * 3600  # upload times three hours apart, so date slices can split the query


def recipe(endpoint: str, n: int, output: Path, concurrency: int, shard_size: int,
           terms: str = "[monkey]") -> str:
    return bench.harvest_recipe(endpoint, n, output, concurrency, terms=terms,
                                flickr_options=f"calls_per_hour: 100000000\n"
                                               f"shard_size: {shard_size}")


def through_store(text: str, endpoint: str, prefix: str) -> str:
    """The recipe with its shards sent through the store at ``endpoint``."""
    return text.replace("\nrun:\n", f"\nrun:\n  cluster_store: s3://bench/{prefix}\n"
                        f"  cluster_store_options: {{endpoint_url: '{endpoint}'}}\n", 1)


def start_store() -> tuple[object, str]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per S3 request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(
        Bucket="bench")
    return server, endpoint


def measure_tree(command: list[str], env: dict) -> dict:
    """Wall time, and the peak of the summed RSS of the child and its descendants (the
    client plus the cluster's scheduler and worker processes)."""
    import psutil  # installed with distributed

    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs: list[bytes] = []
    readers = [threading.Thread(target=lambda s=stream: outputs.append(s.read()), daemon=True)
               for stream in (child.stdout, child.stderr)]
    for reader in readers:
        reader.start()
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            processes = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in processes if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - started
    for reader in readers:
        reader.join()
    if child.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n" + b"".join(outputs).decode())
    return {"seconds": wall, "rss_mb": peak / 2**20}


def timed_run(work: Path, name: str, text: str, env: dict, workers: int | None) -> dict:
    path = work / f"{name}.yml"
    path.write_text(text)
    command = [bench.harvest_bin(), "run", str(path), "--no-progress"]
    if workers:
        command += ["--local-workers", str(workers)]
    return measure_tree(command, env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=16, help="downloads in flight per worker")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--shards", type=int, default=16, help="date slices the query splits into")
    parser.add_argument("--empty-shards", type=int, default=40)
    parser.add_argument("--store", action="store_true",
                        help="also run each worker count through run.cluster_store (moto S3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]

    figures: dict = {"n": args.n, "latency_s": args.latency, "concurrency": args.concurrency,
                     "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="harvest-cluster-bench-") as scratch:
        work = Path(scratch)
        print(f"making {args.n} JPEGs with EXIF...", flush=True)
        fake = bench.serve(bench.make_photos(args.n, spacing=SPACING), args.latency)
        env = dict(os.environ, FLICKER_KEY=bench.API_KEY, FLICKER_SECRET=bench.API_SECRET,
                   NO_PROXY="127.0.0.1", HOME=str(work), AWS_ACCESS_KEY_ID="bench",
                   AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        store, endpoint = start_store() if args.store else (None, "")
        shard_size = max(1, -(-args.n // args.shards))
        try:
            # Warm the geocoder's cache once, so no contender pays for building it.
            timed_run(work, "warm", recipe(fake.endpoint, 20, work / "warm", 4, 20), env, None)
            plans = [("one process", None, False)] + [(f"{w} workers", w, False) for w in workers]
            if args.store:
                plans += [(f"{w} via store", w, True) for w in workers]
            for name, count, via_store in plans:
                print(f"{name}...", flush=True)
                output = work / name.replace(" ", "-")
                text = recipe(fake.endpoint, args.n, output, args.concurrency, shard_size)
                if via_store:
                    text = through_store(text, endpoint, name.replace(" ", "-"))
                result = timed_run(work, name.replace(" ", "-"), text, env, count)
                summary = json.loads((output / ".harvest" / "last-run.json").read_text())
                result["stored"] = summary["totals"]["stored"]
                result["images_per_s"] = args.n / result["seconds"]
                if count:
                    result["shards"] = len(list((output / ".harvest" / "shards").iterdir()))
                figures["runs"][name] = result
        finally:
            fake.stop()
            if store is not None:
                store.stop()
        # Harvest's own cost per shard: a server without latency, queries that find nothing.
        fake = bench.serve([], 0.0)
        try:
            empty_terms = lambda k: "[" + ", ".join(f"nothing{i}" for i in range(k)) + "]"  # noqa: E731
            overhead = {}
            for k in (1, args.empty_shards):
                print(f"{k} empty shards on 2 workers...", flush=True)
                overhead[k] = timed_run(work, f"empty-{k}",
                                        recipe(fake.endpoint, 10, work / f"empty-{k}",
                                               args.concurrency, 4000, empty_terms(k)), env, 2)
            figures["per_shard_overhead_s"] = ((overhead[args.empty_shards]["seconds"]
                                                - overhead[1]["seconds"])
                                               / (args.empty_shards - 1))
            figures["empty_runs_s"] = {k: v["seconds"] for k, v in overhead.items()}
        finally:
            fake.stop()

    one = figures["runs"].get(f"{workers[0]} workers")
    print(f"\ncluster: N = {args.n}, latency {args.latency * 1000:.0f} ms, "
          f"{args.concurrency} downloads in flight per worker, {figures['cpus']} CPUs")
    print(f"  {'':12} {'seconds':>8} {'images/s':>9} {'vs 1 worker':>12} {'peak RSS MB, all processes':>27}")
    for name, e in figures["runs"].items():
        ratio = e["images_per_s"] / one["images_per_s"] if one else float("nan")
        print(f"  {name:12} {e['seconds']:8.2f} {e['images_per_s']:9.1f} {ratio:11.2f}x "
              f"{e['rss_mb']:27.1f}")
        e["ratio_to_one_worker"] = ratio
    print(f"per-shard overhead: {figures['per_shard_overhead_s'] * 1000:.0f} ms "
          f"({args.empty_shards} empty shards {figures['empty_runs_s'][args.empty_shards]:.2f} s, "
          f"1 empty shard {figures['empty_runs_s'][1]:.2f} s, on 2 workers)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
