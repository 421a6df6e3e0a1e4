"""Near-duplicate detection: how fast the index is at a million hashes, and how well the
default distances separate copies from distinct pictures.

    python bench/near_duplicates.py            # 1,000,000 hashes; the labelled set
    python bench/near_duplicates.py --n 100000

Index: lookups per second at radius max_distance (in batches, as the enricher asks, and
one at a time), and its memory (numpy arrays, and tracemalloc's peak while building).

Quality: real camera photos from ../shared/testdata (exif-samples) and generated pictures,
each with copies made as the web makes them: resized 50%, re-encoded at JPEG quality 40,
cropped by 10% of the area (2.5% off each side) and by 19% (5% off each side), mirrored,
brightness +-20%, a 20 px border. Negatives: every pair of distinct pictures, including
generated ones of similar colour. A pair is a match when the enricher would call it one
(pHash within max_distance and dHash within max_dhash_distance, of the picture or of its
mirror, as ``mirrored: true`` does).
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "testdata" / "exif-samples" / "jpg"


def index_speed(n: int, radius: int) -> dict:
    from harvest.plugins.enrichers.near_duplicates_hamming import HammingIndex

    rng = np.random.default_rng(7)
    stored = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    tracemalloc.start()
    started = time.perf_counter()
    index = HammingIndex()
    for chunk in range(0, n, 100_000):  # as runs add them, a batch at a time
        index.add(stored[chunk:chunk + 100_000], np.arange(chunk, min(n, chunk + 100_000)))
    index.merge()
    build = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    queries = stored[rng.integers(0, n, 20_000)] ^ np.uint64(0b101)
    figures = {"n": n, "build_s": build, "index_mb": index.nbytes() / 1e6,
               "build_peak_mb": peak / 1e6}
    for batch in (256, 1):
        count = 2_000 if batch == 1 else 20_000
        started = time.perf_counter()
        for start in range(0, count, batch):
            index.search(queries[start:start + batch], radius)
        figures[f"lookups_per_s_batch_{batch}"] = count / (time.perf_counter() - started)
    return figures


def pictures() -> list[Image.Image]:
    found = []
    for path in sorted(SAMPLES.rglob("*.jpg")):
        try:
            with Image.open(path) as image:
                image.load()
                found.append(ImageOps.exif_transpose(image).convert("RGB"))
        except Exception:
            continue  # the broken samples
    rng = random.Random(11)
    for _ in range(60):  # generated: similar colours, different shapes
        base = (120 + rng.randrange(20), 90 + rng.randrange(20), 60 + rng.randrange(20))
        image = Image.new("RGB", (400, 300), base)
        draw = ImageDraw.Draw(image)
        for _ in range(10):
            x, y = rng.randrange(400), rng.randrange(300)
            shade = tuple(max(0, min(255, c + rng.randrange(-60, 60))) for c in base)
            draw.ellipse((x, y, x + rng.randrange(20, 160), y + rng.randrange(20, 160)), fill=shade)
        found.append(image)
    return found


def copies(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size

    def jpeg(picture, quality=90):
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality)
        return Image.open(io.BytesIO(out.getvalue()))

    return {
        "resized 50%": jpeg(image.resize((w // 2, h // 2))),
        "JPEG quality 40": jpeg(image, 40),
        "crop 10% of area": jpeg(image.crop((int(w * .025), int(h * .025), int(w * .975),
                                             int(h * .975)))),
        "crop 19% (5%/side)": jpeg(image.crop((int(w * .05), int(h * .05), int(w * .95),
                                               int(h * .95)))),
        "brightness +20%": jpeg(ImageEnhance.Brightness(image).enhance(1.2)),
        "brightness -20%": jpeg(ImageEnhance.Brightness(image).enhance(0.8)),
        "20 px border": jpeg(ImageOps.expand(image, 20, fill=(0, 0, 0))),
        "mirrored": jpeg(ImageOps.mirror(image)),
        "rotated 90": jpeg(image.transpose(Image.Transpose.ROTATE_90)),
        "rotated 180": jpeg(image.transpose(Image.Transpose.ROTATE_180)),
    }


def quality(max_distance: int, max_dhash: int) -> dict:
    from harvest.plugins.enrichers.near_duplicates import VIEWS, perceptual_hashes

    def hashes(picture):
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=95)
        return perceptual_hashes(io.BytesIO(out.getvalue()), tuple(VIEWS))

    def match(a, b):  # as the enricher: b as it is, or b mirrored or turned
        ways = [(b[0], b[1])] + [(phash, dhash) for _, phash, dhash in b[2]]
        return any((a[0] ^ phash).bit_count() <= max_distance
                   and (a[1] ^ dhash).bit_count() <= max_dhash for phash, dhash in ways)

    originals = pictures()
    own = [hashes(p) for p in originals]
    recall: dict[str, list[bool]] = {}
    for picture, first in zip(originals, own, strict=True):
        for kind, copy in copies(picture).items():
            recall.setdefault(kind, []).append(match(first, hashes(copy)))
    false_pairs = sum(match(a, b) or match(b, a) for a, b in itertools.combinations(own, 2))
    pairs = len(own) * (len(own) - 1) // 2
    true_found = sum(sum(v) for v in recall.values())
    return {"pictures": len(originals), "distinct_pairs": pairs, "false_matches": false_pairs,
            "precision": true_found / max(1, true_found + false_pairs),
            "recall": {k: sum(v) / len(v) for k, v in recall.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--max-distance", type=int, default=9)
    parser.add_argument("--max-dhash-distance", type=int, default=14)
    args = parser.parse_args(argv)
    speed = index_speed(args.n, args.max_distance)
    print(f"index of {speed['n']:,} hashes: built in {speed['build_s']:.1f} s, "
          f"{speed['index_mb']:.0f} MB of arrays (peak {speed['build_peak_mb']:.0f} MB while "
          f"building); radius {args.max_distance}: "
          f"{speed['lookups_per_s_batch_256']:,.0f} lookups/s in batches of 256, "
          f"{speed['lookups_per_s_batch_1']:,.0f} one at a time")
    if not SAMPLES.is_dir():
        print(f"(no {SAMPLES}: quality on generated pictures only)")
    figures = quality(args.max_distance, args.max_dhash_distance)
    print(f"\nquality at max_distance {args.max_distance}, max_dhash_distance "
          f"{args.max_dhash_distance}: {figures['pictures']} pictures, "
          f"{figures['distinct_pairs']:,} distinct pairs, {figures['false_matches']} matched "
          f"wrongly; precision {figures['precision']:.3f}")
    for kind, value in figures["recall"].items():
        print(f"  recall, {kind:20} {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    sys.exit(main())
