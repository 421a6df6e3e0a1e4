"""harvest against the seed's approach, in one run, on one machine.

    python bench/run.py                     # N = 2000 images, 50 ms per response
    python bench/run.py --n 200 --latency 0.01 --flat 2000,20000 --micro

A local HTTP server on 127.0.0.1 (the test suite's Flickr stand-in: Flickr's REST JSON
and an image host) serves N real JPEGs with EXIF, each response delayed by --latency to
stand in for the internet. Each contender runs in a child process of its own, so peak RSS
and CPU time are that process's (``os.wait4``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

API_KEY, API_SECRET = "bench-key-0123456789", "bench-secret"
PLACES = [(14.5995, 120.9842), (10.3157, 123.8854), (7.1907, 125.4553), (5.8394, 118.1172),
          (35.6762, 139.6503), (48.8566, 2.3522)]


def make_photos(n: int, size=(640, 480), spacing: int = 1):
    """N distinct JPEGs with EXIF (camera, date, GPS), as cameras write them."""
    from fakes import FakePhoto
    from imagegen import exif_bytes
    from PIL import Image, ImageDraw

    photos = []
    rng = random.Random(7)
    for i in range(n):
        image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                         fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85, exif=exif_bytes(i, PLACES[i % len(PLACES)]))
        photos.append(FakePhoto(id=str(100000 + i), title=f"monkey {i}", tags="monkey",
                                dateupload=1_500_000_000 + i * spacing, image=out.getvalue(), sizes=("l",)))
    return photos


def serve(photos, latency: float):
    from fakes import FakeFlickr

    fake = FakeFlickr(api_key=API_KEY, photos=photos, image_latency=latency,
                      api_latency=latency).start()
    return fake


def peak_rss_mb(pid: int) -> float | None:
    """The process's own peak RSS (VmHWM): unlike ru_maxrss from wait4, it does not count
    the memory of this parent, which a child shares between fork and exec."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tree_rss_mb(pid: int) -> float:
    """The current RSS of a process and all its descendants (harvest's download workers)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return total


def measure(command: list[str], env=None) -> dict:
    """Runs a child; its wall time, CPU seconds (its own and its waited-for children's)
    and peak RSS in MB (the highest sum over its process tree, or its own high-water
    mark when that is higher)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0.0
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(child.stdout.read()), daemon=True)
    errors: list[bytes] = []
    error_reader = threading.Thread(target=lambda: errors.append(child.stderr.read()), daemon=True)
    reader.start()
    error_reader.start()
    while True:
        waited, status, usage = os.wait4(child.pid, os.WNOHANG)
        if waited:
            break
        peak = max(peak, peak_rss_mb(child.pid) or 0.0, tree_rss_mb(child.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - started
    reader.join()
    error_reader.join()
    out, err = b"".join(output).decode(), b"".join(errors).decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:3]} failed:\n{out}\n{err}")
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": peak,
            "stdout": out}


# -- the seed's approach, written plainly -----------------------------------------------------

def baseline(endpoint: str, n: int, folder: Path) -> None:
    """One search (paged as Flickr requires), then each photo one after another:
    requests.get, save, Pillow open, piexif load."""
    import flickrapi
    import piexif
    import requests
    from PIL import Image

    flickr = flickrapi.FlickrAPI(API_KEY, API_SECRET, format="parsed-json", store_token=False)
    flickr.REST_URL = endpoint
    photos, page = [], 1
    while len(photos) < n:
        reply = flickr.photos.search(text="monkey", per_page=500, page=page,
                                     extras="description,license,date_taken,owner_name,geo,url_l")
        batch = reply["photos"]["photo"]
        if not batch:
            break
        photos.extend(batch)
        page += 1
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos[:n]:
        data = requests.get(photo["url_l"], timeout=30).content
        path = folder / f"{photo['id']}.jpg"
        path.write_bytes(data)
        with Image.open(path) as image:
            image.size  # noqa: B018  (the seed opened each image)
        piexif.load(str(path))


# -- harvest ------------------------------------------------------------------------------------

WORKERS = 0  # run.workers for harvest's recipes (--workers)
ENRICHERS = "[exif, geocode]"  # the pipeline's enrichers (--no-enrichers: [])


def harvest_recipe(endpoint: str, n: int, output: Path, concurrency: int,
                   terms: str = "[monkey]", flickr_options: str = "") -> str:
    """``flickr_options``: extra lines for the Flickr source's options (bench/cluster.py)."""
    extra = "".join(f"\n              {line}" for line in flickr_options.splitlines() if line)
    return textwrap.dedent(f"""
        name: bench
        terms: {terms}
        output: {output}
        run:
          concurrency: {concurrency}
          rate_per_host: 100000
          limit_per_term: {n}
          batch_size: 256
          allow_private_addresses: true
          workers: {WORKERS}
        sources:
          - use: flickr
            options:
              endpoint: {endpoint}
              api_key: ${{FLICKER_KEY}}
              api_secret: ${{FLICKER_SECRET}}
              per_page: 500
              sizes: [l]
              refresh_licenses: false{extra}
        enrichers: {ENRICHERS}
        sinks: [jsonl]
    """)


def urls_recipe(list_path: Path, output: Path, concurrency: int) -> str:
    return textwrap.dedent(f"""
        name: flat
        terms: [x]
        output: {output}
        run: {{concurrency: {concurrency}, rate_per_host: 100000, batch_size: 256,
               allow_private_addresses: true, workers: {WORKERS}}}
        sources: [{{use: urls, options: {{path: {list_path}}}}}]
        sinks: [jsonl]
    """)


def harvest_bin() -> str:
    return str(Path(sys.executable).with_name("harvest"))


def pipeline(n: int, latency: float, concurrency: int, skip_baseline: bool, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    print(f"making {n} JPEGs with EXIF...", flush=True)
    fake = serve(make_photos(n), latency)
    env = dict(os.environ, FLICKER_KEY=API_KEY, FLICKER_SECRET=API_SECRET, NO_PROXY="127.0.0.1",
               HOME=str(work))
    result: dict = {"n": n, "latency_s": latency, "concurrency": concurrency}
    try:
        if not skip_baseline:
            print("baseline (the seed's loop)...", flush=True)
            base = measure([sys.executable, __file__, "--role", "baseline", "--endpoint",
                            fake.endpoint, "--n", str(n), "--out", str(work / "baseline")], env)
            result["baseline"] = base
        # Twice, each into a fresh output folder: the first run on a machine also builds
        # the geocoder's tree cache (in HOME/.cache/harvest); every later run loads it.
        for name in ("harvest_first_run", "harvest"):
            print(f"{name.replace('_', ' ')}...", flush=True)
            recipe = work / f"{name}.yml"
            recipe.write_text(harvest_recipe(fake.endpoint, n, work / name, concurrency))
            run = measure([harvest_bin(), "run", str(recipe), "--no-progress"], env)
            stored = json.loads((work / name / ".harvest" / "last-run.json").read_text())
            run["stored"] = stored["totals"]["stored"]
            result[name] = run
    finally:
        fake.stop()
    for name in ("baseline", "harvest_first_run", "harvest"):
        if name in result:
            entry = result[name]
            entry["images_per_s"] = n / entry["seconds"]
            entry["cpu_s_per_image"] = entry["cpu"] / n
            entry.pop("stdout", None)
    if "baseline" in result:
        result["speedup"] = result["harvest"]["images_per_s"] / result["baseline"]["images_per_s"]
        result["speedup_first_run"] = (result["harvest_first_run"]["images_per_s"]
                                       / result["baseline"]["images_per_s"])
    return result


def flat(sizes: list[int], concurrency: int, work: Path) -> dict:
    """Peak RSS of `harvest run` over a `urls` list of N small images, for each N."""
    from fakes import FakePhoto
    from imagegen import make_image

    largest = max(sizes)
    work.mkdir(parents=True, exist_ok=True)
    # A few hundred distinct small pictures, served under N URLs: the run dedups by
    # sha256 after download, as it would with a real list full of copies.
    pictures = [make_image(i, size=(64, 48)) for i in range(500)]
    photos = [FakePhoto(id=str(i), image=pictures[i % len(pictures)], sizes=("l",))
              for i in range(largest)]
    fake = serve(photos, 0.0)
    result = {}
    try:
        for size in sizes:
            listing = work / f"urls-{size}.txt"
            with listing.open("w") as handle:
                for i in range(size):
                    handle.write(f"{fake.url}/img/{i}_l.jpg\n")
            recipe = work / f"flat-{size}.yml"
            recipe.write_text(urls_recipe(listing, work / f"flat-{size}", concurrency))
            print(f"urls source, N = {size}...", flush=True)
            run = measure([harvest_bin(), "run", str(recipe), "--no-progress"],
                          dict(os.environ, HOME=str(work)))
            result[size] = {"rss_mb": run["rss_mb"], "seconds": run["seconds"],
                            "records_per_s": size / run["seconds"]}
    finally:
        fake.stop()
    return result


def micro(work: Path, scale: float = 1.0) -> dict:
    """Per-component throughput: geocoding, encryption, sinks, EXIF. ``scale`` shrinks the
    workloads (the smoke test runs them tiny)."""
    import logging

    from imagegen import make_image

    from harvest.core.contract.plugin import Context
    from harvest.core.output.crypto import FieldCipher, Keyring
    from harvest.core.record import FileInfo, Query, Record, Term
    from harvest.plugins.enrichers.exif import read_exif
    from harvest.plugins.enrichers.geocode import geocoder
    from harvest.plugins.sinks.jsonl import JsonlSink

    figures: dict = {}
    rng = random.Random(1)
    count_points = max(100, int(100_000 * scale))
    points = [(rng.uniform(-60, 70), rng.uniform(-180, 180)) for _ in range(count_points)]
    started = time.perf_counter()
    tree = geocoder(1)
    figures["geocode_tree_load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    tree.query(points)
    figures["geocode_100k_per_s"] = count_points / (time.perf_counter() - started)

    def record(i):
        return Record("flickr", str(i), f"http://x/{i}.jpg", Query("monkey", "en", "monkey"),
                      fields={"title": f"monkey {i}", "owner": "12345678@N00",
                              "owner_name": "Ana Fotógrafa", "path_alias": "ana",
                              "exif": {"IFD0": {"Make": "Canon", "Model": "X"},
                                       "ExifIFD": {"FNumber": 2.8, "ISOSpeedRatings": 100}},
                              "latitude": 14.6, "longitude": 121.0, "license": "CC-BY-2.0"},
                      personal={"owner", "owner_name", "path_alias", "exif"},
                      file=FileInfo(f"images/monkey/{i}.jpg", 1000,
                                    hashlib.sha256(str(i).encode()).hexdigest(), 640, 480, "JPEG"))

    records = [record(i) for i in range(max(50, int(20_000 * scale)))]
    from cryptography.fernet import Fernet

    cipher = FieldCipher(Keyring([Fernet.generate_key()], "bench"))
    started = time.perf_counter()
    for item in records:
        cipher.encrypt(item.to_dict(), item.personal)
    figures["fernet_records_per_s"] = len(records) / (time.perf_counter() - started)

    def sink_rate(cls, options) -> float:
        context = Context("bench", work, work / f"sink-{cls.__name__}", [Term("monkey", (("en", "monkey"),))],
                          None, logging.getLogger("bench"), name=cls.__name__.lower())
        sink = cls({o.name: o.default for o in cls.options} | options, context)
        sink.open()
        sink.resume(None)
        started = time.perf_counter()
        for start in range(0, len(records), 256):
            sink.write(records[start:start + 256])
        elapsed = time.perf_counter() - started
        sink.close()
        return len(records) / elapsed

    figures["jsonl_records_per_s"] = sink_rate(JsonlSink, {"personal_fields": "clear"})
    figures["jsonl_encrypted_records_per_s"] = sink_rate(
        JsonlSink, {"personal_fields": "encrypt", "key_env": "BENCH_KEY", "path": "enc.jsonl"})
    try:
        from mongo_server import MongoServer

        from harvest.plugins.sinks.mongodb import MongoSink

        server = MongoServer(work / "mongo").start()
        try:
            records = records[:max(50, int(10_000 * scale))]
            figures["mongodb_records_per_s"] = sink_rate(
                MongoSink, {"uri": server.uri, "collection": "plain", "personal_fields": "clear"})
            figures["mongodb_encrypted_records_per_s"] = sink_rate(
                MongoSink, {"uri": server.uri, "collection": "enc", "personal_fields": "encrypt",
                            "key_env": "BENCH_KEY"})
        finally:
            server.stop(graceful=False)
    except ImportError:
        figures["mongodb_records_per_s"] = None  # secantusdb not installed

    folder = work / "exif"
    folder.mkdir()
    paths = []
    for i in range(max(10, int(500 * scale))):
        path = folder / f"{i}.jpg"
        path.write_bytes(make_image(i, size=(640, 480), gps=PLACES[i % len(PLACES)]))
        paths.append(path)
    started = time.perf_counter()
    for path in paths:
        read_exif(path)
    figures["exif_images_per_s"] = len(paths) / (time.perf_counter() - started)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--no-enrichers", action="store_true",
                        help="the pipeline without exif and geocode (to see what they cost)")
    parser.add_argument("--workers", type=int, default=0,
                        help="harvest's run.workers (0: one per core, 1: threads only)")
    parser.add_argument("--flat", help="comma-separated N for the urls RSS check, e.g. 10000,100000")
    parser.add_argument("--micro", action="store_true", help="component throughputs too")
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "baseline":
        baseline(args.endpoint, args.n, args.out)
        return 0

    global WORKERS, ENRICHERS
    WORKERS = args.workers
    if args.no_enrichers:
        ENRICHERS = "[]"
    figures: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="harvest-bench-") as scratch:
        work = Path(scratch)
        os.environ.setdefault("BENCH_KEY", __import__("cryptography.fernet").fernet.Fernet
                              .generate_key().decode())
        figures["pipeline"] = pipeline(args.n, args.latency, args.concurrency, args.skip_baseline,
                                       work / "pipeline")
        if args.flat:
            figures["flat"] = flat([int(x) for x in args.flat.split(",")], args.concurrency,
                                   work / "flat")
        if args.micro:
            (work / "micro").mkdir()
            figures["micro"] = micro(work / "micro", args.scale)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def report(figures: dict) -> None:
    p = figures["pipeline"]
    print(f"\npipeline: N = {p['n']}, latency {p['latency_s'] * 1000:.0f} ms, "
          f"concurrency {p['concurrency']}, {figures['machine']['cpus']} CPUs")
    print(f"  {'':18} {'images/s':>10} {'peak RSS MB':>12} {'CPU s/image':>12}")
    for name in ("baseline", "harvest_first_run", "harvest"):
        if name in p:
            e = p[name]
            label = {"harvest_first_run": "harvest (1st run)"}.get(name, name)
            print(f"  {label:18} {e['images_per_s']:10.1f} {e['rss_mb']:12.1f} "
                  f"{e['cpu_s_per_image']:12.4f}")
    if "speedup" in p:
        print(f"  harvest / baseline: {p['speedup']:.1f}x "
              f"(first run on a machine: {p['speedup_first_run']:.1f}x)")
    if "flat" in figures:
        print("urls source, peak RSS by N:")
        for size, e in figures["flat"].items():
            print(f"  N = {size:>7}: {e['rss_mb']:7.1f} MB, {e['records_per_s']:7.0f} records/s")
    if "micro" in figures:
        print("components:")
        for name, value in figures["micro"].items():
            print(f"  {name:34} {value:12.1f}" if value is not None else f"  {name:34} n/a")


if __name__ == "__main__":
    sys.exit(main())
