"""Training formats and resizing at ingest: what they cost, as ratios in one run.

    python bench/formats.py                     # 2,000 photos of 640x480, then RSS at 10k/50k
    python bench/formats.py --n 5000 --flat 10000,100000

Every variant harvests the same `urls` list from the same local image server into a fresh
output folder; the first, plain JSONL with bytes kept as downloaded, is the baseline:
- resize: `images: {resize_mode: keep_ratio, image_size: 256}` (the issue asks <= 2x the
  baseline's CPU per image);
- webdataset / parquet: the sink beside JSONL (the issue asks >= 80% of JSONL's rate);
- flat: peak RSS of webdataset and parquet runs over N tiny images, for each N.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import harvest_bin, make_photos, measure, serve  # noqa: E402

VARIANTS = {
    "jsonl (baseline)": ("", "[jsonl]"),
    "jsonl + resize 256": ("images: {resize_mode: keep_ratio, image_size: 256}", "[jsonl]"),
    "jsonl + webdataset": ("", "[jsonl, webdataset]"),
    "jsonl + parquet": ("", "[jsonl, parquet]"),
    "webdataset only": ("", "[webdataset]"),
    "parquet only (images in)": ("", "[{use: parquet, options: {images: true}}]"),
}


def recipe(listing: Path, output: Path, images: str, sinks: str) -> str:
    return textwrap.dedent(f"""
        name: formats
        terms: [x]
        output: {output}
        run: {{concurrency: 64, rate_per_host: 100000, batch_size: 256,
               allow_private_addresses: true}}
        {images}
        sources: [{{use: urls, options: {{path: {listing}}}}}]
        sinks: {sinks}
    """)


def run_variants(n: int, work: Path, size: tuple[int, int]) -> dict:
    print(f"making {n} JPEGs of {size[0]}x{size[1]}...", flush=True)
    fake = serve(make_photos(n, size=size), 0.0)
    listing = work / "urls.txt"
    listing.write_text("".join(f"{fake.url}/img/{p.id}_l.jpg\n" for p in fake.photos))
    results = {}
    try:
        for name, (images, sinks) in VARIANTS.items():
            print(f"{name}...", flush=True)
            path = work / f"{len(results)}.yml"
            path.write_text(recipe(listing, work / f"out{len(results)}", images, sinks))
            run = measure([harvest_bin(), "run", str(path), "--no-progress"],
                          dict(os.environ, HOME=str(work)))
            results[name] = {"images_per_s": n / run["seconds"], "cpu_ms": 1000 * run["cpu"] / n,
                             "rss_mb": run["rss_mb"]}
    finally:
        fake.stop()
    return results


def flat(sizes: list[int], work: Path) -> dict:
    from fakes import FakePhoto
    from imagegen import make_image

    pictures = [make_image(i, size=(64, 48)) for i in range(500)]
    photos = [FakePhoto(id=str(i), image=pictures[i % 500], sizes=("l",)) for i in range(max(sizes))]
    fake = serve(photos, 0.0)
    results = {}
    try:
        for size in sizes:
            listing = work / f"flat-{size}.txt"
            listing.write_text("".join(f"{fake.url}/img/{i}_l.jpg\n" for i in range(size)))
            for sinks in ("[webdataset]", "[parquet]"):
                print(f"{sinks} at N = {size}...", flush=True)
                path = work / f"flat-{size}.yml"
                path.write_text(recipe(listing, work / f"flat-{size}-{sinks[1:-1]}", "", sinks))
                run = measure([harvest_bin(), "run", str(path), "--no-progress"],
                              dict(os.environ, HOME=str(work)))
                results[(size, sinks)] = run["rss_mb"]
    finally:
        fake.stop()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", default="640x480", help="the photos' width x height")
    parser.add_argument("--only", help="run only the variants whose name contains this")
    parser.add_argument("--flat", default="10000,50000",
                        help="comma-separated N for the RSS check ('' to skip)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="harvest-formats-") as scratch:
        work = Path(scratch)
        if args.only:
            for name in [n for n in VARIANTS if args.only not in n and "baseline" not in n]:
                del VARIANTS[name]
        size = tuple(int(v) for v in args.size.split("x"))
        results = run_variants(args.n, work, size)
        sizes = [int(x) for x in args.flat.split(",") if x]
        rss = flat(sizes, work) if sizes else {}
    base = results["jsonl (baseline)"]
    print(f"\nformats: N = {args.n} photos of {args.size}, urls source, {os.cpu_count()} CPUs")
    print(f"  {'':26} {'images/s':>9} {'vs base':>8} {'CPU ms/img':>11} {'vs base':>8} "
          f"{'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"  {name:26} {r['images_per_s']:9.0f} {r['images_per_s'] / base['images_per_s']:7.2f}x "
              f"{r['cpu_ms']:11.2f} {r['cpu_ms'] / base['cpu_ms']:7.2f}x {r['rss_mb']:12.0f}")
    if rss:
        print("\n  peak RSS MB (all processes) over N tiny images")
        for (size, sinks), mb in rss.items():
            print(f"  {sinks:14} N = {size:>7,}: {mb:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
