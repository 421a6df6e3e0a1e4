"""Near-duplicate detection: how fast the index is at a million hashes, and how well the
default distances separate copies from distinct pictures.

    python bench/near_duplicates.py            # 1,000,000 hashes; the labelled set
    python bench/near_duplicates.py --n 100000
    python bench/near_duplicates.py --linking  # whole groups, hashes alone and with embed

Linking (``--linking``, needs the ``relevance`` extra): the 33 JPEGs of ../shared/testdata
(exif-samples) that decode, each with the copies of ``TRANSFORMS``, placed through the
enricher's ``CopyRegistry`` in one shuffled run (batches of 16, as a pipeline sends them),
once with the hashes alone and once with EfficientNet-Lite0's embeddings too (256
numbers, float16, as ``embed`` stores them). Recall: a copy ends in its photo's group;
false links: pairs of files of different photos in one group, out of all pairs grouped
(precision). The photos are split by sorted order: ``min_similarity`` was chosen on the
even-numbered ones (dev), the odd-numbered (held-out) check it.

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


def screenshot(image: Image.Image) -> Image.Image:
    """The picture as a screenshot of a page shows it: on a light canvas half as large
    again, under a dark bar, with a few lines of grey text-like strokes."""
    w, h = image.size
    canvas = Image.new("RGB", (int(w * 1.6), int(h * 1.5)), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, canvas.width, 40), fill=(60, 60, 60))
    for line in range(4):
        y = 70 + h + line * 18
        if y + 8 < canvas.height:
            draw.rectangle((30, y, max(31, canvas.width - 30 - 40 * line), y + 8),
                           fill=(150, 150, 150))
    canvas.paste(image, ((canvas.width - w) // 2, 55))
    return canvas


def centre_crop(image: Image.Image, area: float) -> Image.Image:
    w, h = image.size
    side = (1 - (1 - area) ** 0.5) / 2
    return image.crop((int(w * side), int(h * side), int(w * (1 - side)), int(h * (1 - side))))


def corner_crop(image: Image.Image, area: float) -> Image.Image:
    w, h = image.size
    keep = (1 - area) ** 0.5
    return image.crop((0, 0, int(w * keep), int(h * keep)))


TRANSFORMS = {
    "resized 50%": lambda i: i.resize((max(8, i.width // 2), max(8, i.height // 2))),
    "JPEG quality 30": lambda i: i,  # saved at 30 below
    "mirrored": ImageOps.mirror,
    "grayscale": lambda i: ImageOps.grayscale(i).convert("RGB"),
    "brightness -25%": lambda i: ImageEnhance.Brightness(i).enhance(0.75),
    "crop 10% centred": lambda i: centre_crop(i, 0.1),
    "crop 20% centred": lambda i: centre_crop(i, 0.2),
    "crop 20% corner": lambda i: corner_crop(i, 0.2),
    "20 px border": lambda i: ImageOps.expand(i, 20, fill=(0, 0, 0)),
    "rotated 5 deg": lambda i: i.rotate(5, Image.Resampling.BICUBIC),
    "rotated 90": lambda i: i.transpose(Image.Transpose.ROTATE_90),
    "screenshot padding": screenshot,
}


def camera_photos() -> list[tuple[str, Image.Image]]:
    found = []
    for path in sorted(SAMPLES.rglob("*.jpg")):
        try:
            with Image.open(path) as image:
                image.load()
                found.append((str(path.relative_to(SAMPLES)),
                              ImageOps.exif_transpose(image).convert("RGB")))
        except Exception:
            continue  # the broken samples
    return found


def linking(photos, thresholds, max_distance: int, max_dhash: int) -> dict:
    """Each file's hashes and embedding once, then a registry run per threshold (1: the
    hashes alone)."""
    from harvest.core.output.embeddings import projection
    from harvest.plugins.enrichers import efficientnet_lite
    from harvest.plugins.enrichers.near_duplicates import VIEWS, perceptual_hashes
    from harvest.plugins.enrichers.near_duplicates_registry import CopyRegistry

    network = efficientnet_lite.Network(threads=2)
    reduce = projection(256)
    files = []  # (photo, transform or None, hashes, pixels, embedding)
    for number, (_, photo) in enumerate(photos):
        for kind, make in (("original", lambda i: i), *TRANSFORMS.items()):
            out = io.BytesIO()
            make(photo).save(out, "JPEG", quality=30 if kind == "JPEG quality 30" else 90)
            data = out.getvalue()
            hashes = perceptual_hashes(io.BytesIO(data), tuple(VIEWS))
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.width * image.height
                features, _ = network.run(efficientnet_lite.preprocess(image)[None])
            files.append((number, kind, hashes, pixels,
                          (features[0] @ reduce.T).astype(np.float16)))
    order = list(range(len(files)))
    random.Random(5).shuffle(order)
    results = {}
    for threshold in thresholds:
        registry = CopyRegistry()
        for start in range(0, len(order), 16):
            batch = []
            for i in order[start:start + 16]:
                _, _, (phash, dhash, views), pixels, vector = files[i]
                batch.append((f"f{i}", phash, dhash, pixels, 0, views, f"{i:064x}", vector))
            registry.place(batch, max_distance, max_dhash, threshold)
        heads = {}
        for n, row in registry.rows.items():
            heads[int(row[0][1:])] = registry.head(n)
        originals = {files[i][0]: i for i in range(len(files)) if files[i][1] == "original"}
        recall: dict[str, list[bool]] = {}
        for i, (number, kind, *_rest) in enumerate(files):
            if kind != "original":
                recall.setdefault(kind, []).append(heads[i] is not None and
                                                   heads[i] == heads[originals[number]])
        groups: dict[int, list[int]] = {}
        for i, head in heads.items():
            groups.setdefault(head, []).append(files[i][0])
        pairs = wrong = 0
        for members in groups.values():
            for a, b in itertools.combinations(members, 2):
                pairs += 1
                wrong += a != b
        results[threshold] = {"recall": {k: (sum(v), len(v)) for k, v in recall.items()},
                              "pairs": pairs, "wrong": wrong}
    return results


def embedding_search_speed(n: int) -> float:
    """Pictures a second the registry compares against ``n`` stored embeddings (random
    unit vectors, 256 numbers), in batches of 32."""
    from harvest.plugins.enrichers.near_duplicates_registry import CopyRegistry

    registry = CopyRegistry()
    vectors = np.random.default_rng(3).standard_normal((n, 256)).astype(np.float32)
    for i, vector in enumerate(vectors):
        registry.add_vector(i, vector)
    queries = vectors[:32] / np.linalg.norm(vectors[:32], axis=1, keepdims=True)
    started = time.perf_counter()
    for _ in range(5):
        registry.similar(queries, 0.85)
    return 5 * 32 / (time.perf_counter() - started)


def print_linking(args) -> None:
    rate = embedding_search_speed(args.n_embeddings)
    print(f"embedding search against {args.n_embeddings:,} stored: {rate:,.0f} pictures/s "
          f"(batches of 32; {args.n_embeddings * 1024 / 1e6:,.0f} MB of float32 vectors)")
    photos = camera_photos()
    thresholds = (1.0, *args.min_similarity)
    for split, chosen in (("dev", photos[0::2]), ("held-out", photos[1::2]), ("all", photos)):
        results = linking(chosen, thresholds, args.max_distance, args.max_dhash_distance)
        print(f"\n{split}: {len(chosen)} photos, {len(chosen) * (len(TRANSFORMS) + 1)} files, "
              "one shuffled run each; recall per transform")
        names = ["hashes" if t >= 1 else f"+embed {t:g}" for t in thresholds]
        print(f"  {'':20}" + "".join(f"{name:>14}" for name in names))
        for kind in TRANSFORMS:
            print(f"  {kind:20}" + "".join(
                f"{'/'.join(map(str, results[t]['recall'][kind])):>14}" for t in thresholds))
        print(f"  {'false links':20}" + "".join(
            f"{str(results[t]['wrong']) + '/' + str(results[t]['pairs']):>14}" for t in thresholds))
        print(f"  {'precision':20}" + "".join(
            f"{1 - results[t]['wrong'] / max(1, results[t]['pairs']):>14.3f}"
            for t in thresholds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--max-distance", type=int, default=9)
    parser.add_argument("--max-dhash-distance", type=int, default=14)
    parser.add_argument("--linking", action="store_true",
                        help="only the whole-group runs on real photos, with and without embed")
    parser.add_argument("--min-similarity", type=float, nargs="+", default=[0.85])
    parser.add_argument("--n-embeddings", type=int, default=200_000,
                        help="stored embeddings the search speed is measured against")
    args = parser.parse_args(argv)
    if args.linking:
        print_linking(args)
        return 0
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
