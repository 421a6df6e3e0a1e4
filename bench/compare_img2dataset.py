"""harvest against img2dataset, side by side in one run, on the same URL list and server.

    python bench/compare_img2dataset.py                  # 20,000 URLs, both servers
    python bench/compare_img2dataset.py --n 2000 --server plain --thread-count 64

img2dataset 1.47 is installed into a virtual environment of its own (``--venv``, made
on first use with pip), so neither tool's dependencies touch the other's. Both fetch
the same N distinct small JPEGs (160x120) from a server on 127.0.0.1:

- ``plain``: the test suite's LocalServer (Python's ThreadingHTTPServer, keep-alive);
- ``bench``: the test suite's Flickr stand-in image host (bench/run.py's server).

img2dataset runs with its documented fast settings for a files output (``--resize_mode
no --disable_all_reencoding True --output_format files``, one process per core,
``--thread-count`` threads each); harvest runs the ``urls`` source into the JSONL sink
with its defaults (a worker process per core, image check on). Each is a child process
timed with ``os.wait4``: wall time, CPU seconds (its own and its workers'), and peak RSS
summed over its process tree. img2dataset imports albumentations, which looks online
for updates at import: NO_ALBUMENTATIONS_UPDATE=1 keeps it off the network.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from run import harvest_bin, measure  # noqa: E402

IMG2DATASET = "img2dataset==1.47.0"


def pictures(n: int) -> list[bytes]:
    """N distinct 160x120 JPEGs (a pixel differs per picture)."""
    from PIL import Image

    rng = random.Random(5)
    out = []
    for index in range(n):
        image = Image.new("RGB", (160, 120), (rng.randrange(256), rng.randrange(256),
                                               rng.randrange(256)))
        image.putpixel((index % 160, index // 160 % 120), (index % 251, index // 251 % 251, 7))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


class PlainServer:
    """The test suite's plain loopback server (keep-alive, no latency) serving the images."""

    def __init__(self, images: list[bytes]):
        from fakes import LocalServer

        def handle(method, path, headers, body):
            data = images[int(path.rsplit("/", 1)[1].split(".")[0]) % len(images)]
            return 200, {"Content-Type": "image/jpeg"}, data

        self.server = LocalServer(handle).start()
        self.base = f"{self.server.url}/i/"

    def stop(self):
        self.server.stop()


class BenchServer:
    def __init__(self, images: list[bytes]):
        from fakes import FakeFlickr, FakePhoto

        self.fake = FakeFlickr(photos=[FakePhoto(id=str(i), image=data, sizes=("l",))
                                       for i, data in enumerate(images)]).start()
        self.base = f"{self.fake.url}/img/"
        self.suffix = "_l.jpg"

    def stop(self):
        self.fake.stop()


def ensure_img2dataset(venv: Path) -> Path:
    binary = venv / "bin" / "img2dataset"
    if not binary.exists():
        print(f"installing {IMG2DATASET} into {venv}...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", IMG2DATASET], check=True)
    return binary


def run_img2dataset(binary: Path, listing: Path, out: Path, threads: int, shard: int,
                    env: dict) -> dict:
    result = measure([str(binary), "--url_list", str(listing), "--input_format", "txt",
                      "--output_folder", str(out), "--output_format", "files",
                      "--resize_mode", "no", "--disable_all_reencoding", "True",
                      "--processes_count", str(os.cpu_count() or 1),
                      "--thread_count", str(threads), "--timeout", "30",
                      "--number_sample_per_shard", str(shard)],
                     dict(env, NO_ALBUMENTATIONS_UPDATE="1"))
    result["stored"] = sum(1 for _ in out.rglob("*.jpg"))
    return result


def run_harvest(listing: Path, out: Path, concurrency: int, env: dict) -> dict:
    recipe = out.with_suffix(".yml")
    recipe.write_text(textwrap.dedent(f"""
        name: compare
        terms: [x]
        output: {out}
        run: {{concurrency: {concurrency}, rate_per_host: 1000000, batch_size: 256,
               allow_private_addresses: true}}
        sources: [{{use: urls, options: {{path: {listing}}}}}]
        sinks: [jsonl]
    """))
    result = measure([harvest_bin(), "run", str(recipe), "--no-progress"], env)
    result["stored"] = json.loads((out / ".harvest" / "last-run.json").read_text())[
        "totals"]["stored"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--server", choices=("plain", "bench", "both"), default="both")
    parser.add_argument("--thread-count", type=int, default=64,
                        help="img2dataset's threads per process")
    parser.add_argument("--shard-size", type=int, default=10000,
                        help="img2dataset's --number_sample_per_shard (default: its own "
                             "default; 1,000 was slower here: 413 and 276 images/s)")
    parser.add_argument("--concurrency", type=int, default=64, help="harvest's downloads")
    parser.add_argument("--runs", type=int, default=1, help="repeat each pair")
    parser.add_argument("--venv", type=Path,
                        default=Path("~/.cache/harvest-bench/img2dataset-venv").expanduser())
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)

    binary = ensure_img2dataset(args.venv)
    print(f"making {args.n} JPEGs...", flush=True)
    images = pictures(args.n)
    servers = ["plain", "bench"] if args.server == "both" else [args.server]
    rows = []
    with tempfile.TemporaryDirectory(prefix="harvest-compare-") as scratch:
        work = Path(scratch)
        env = dict(os.environ, HOME=str(work), NO_PROXY="127.0.0.1")
        for name in servers:
            server = PlainServer(images) if name == "plain" else BenchServer(images)
            suffix = getattr(server, "suffix", ".jpg")
            listing = work / f"{name}.txt"
            listing.write_text("".join(f"{server.base}{i}{suffix}\n" for i in range(args.n)))
            try:
                for run in range(args.runs):
                    for tool in ("img2dataset", "harvest"):
                        out = work / f"{name}-{tool}-{run}"
                        print(f"{name} server, {tool}, run {run + 1}...", flush=True)
                        figures = (run_img2dataset(binary, listing, out, args.thread_count,
                                                   args.shard_size, env)
                                   if tool == "img2dataset"
                                   else run_harvest(listing, out, args.concurrency, env))
                        figures.pop("stdout", None)
                        rows.append({"server": name, "tool": tool, "run": run + 1, **figures,
                                     "images_per_s": args.n / figures["seconds"],
                                     "cpu_ms_per_image": 1000 * figures["cpu"] / args.n})
            finally:
                server.stop()
    print(f"\n{args.n} URLs of 160x120 JPEGs, 0 ms latency, {os.cpu_count()} CPUs "
          f"(img2dataset: {os.cpu_count()} processes x {args.thread_count} threads, "
          f"shards of {args.shard_size}; "
          f"harvest: concurrency {args.concurrency}, a worker per core)")
    print(f"  {'server':7} {'tool':12} {'images/s':>9} {'CPU ms/image':>13} {'peak RSS MB':>12} "
          f"{'stored':>7}")
    for row in rows:
        print(f"  {row['server']:7} {row['tool']:12} {row['images_per_s']:9.0f} "
              f"{row['cpu_ms_per_image']:13.2f} {row['rss_mb']:12.0f} {row['stored']:7}")
    for name in servers:
        for run in range(args.runs):
            pair = {r["tool"]: r for r in rows if r["server"] == name and r["run"] == run + 1}
            ours, theirs = pair["harvest"], pair["img2dataset"]
            print(f"  {name} run {run + 1}: harvest / img2dataset = "
                  f"{ours['images_per_s'] / theirs['images_per_s']:.2f}x speed, "
                  f"{ours['cpu_ms_per_image'] / theirs['cpu_ms_per_image']:.2f}x CPU per image")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
