"""Quality's default rules on real photos: how many good photos they flag, and how many
degraded copies they catch.

    python bench/quality.py

Photos: the camera photos of ../shared/testdata/exif-samples (every JPEG of ``exif-org``
and ``gps``, and ``corrupted.jpg``, which decodes: 25 photos from 640 x 480 to
3,648 x 2,736), sorted by path and split in two: the even-numbered ones (``dev``) are
what the rules were chosen on, the odd-numbered ones (``held-out``) check them. The other
8 JPEGs there (``invalid/``, ``long_description.jpg``) are thumbnails and strips of 25 to
100 px on a side: they are counted apart, as pictures the rules should flag.

Degraded copies of each photo, each saved as JPEG quality 90: Gaussian blur of 0.5% of the
long side (3 px on a 640 px photo) and of 2 px at full size (what a large photo can have
and still look sharp at 512 px), dark (brightness x0.15), overexposed (brightness x2.5),
tiny (96 px on the long side), flat (contrast x0.1).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "testdata" / "exif-samples" / "jpg"


def load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def degraded(image: Image.Image) -> dict[str, Image.Image]:
    long_side = max(image.size)
    scale = 96 / long_side
    return {
        "blur 0.5% of the side": image.filter(ImageFilter.GaussianBlur(long_side * 0.005)),
        "blur 2 px at full size": image.filter(ImageFilter.GaussianBlur(2)),
        "dark (x0.15)": ImageEnhance.Brightness(image).enhance(0.15),
        "overexposed (x2.5)": ImageEnhance.Brightness(image).enhance(2.5),
        "tiny (96 px)": image.resize((max(1, round(image.size[0] * scale)),
                                      max(1, round(image.size[1] * scale)))),
        "flat (contrast x0.1)": ImageEnhance.Contrast(image).enhance(0.1),
    }


def failures(image: Image.Image, rules: dict) -> list[str]:
    from harvest.core import Thresholds
    from harvest.plugins.enrichers.quality import quality_scores

    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    scores = quality_scores(io.BytesIO(out.getvalue()), *image.size)
    return [name for name, rule in rules.items() if not Thresholds.holds(rule, scores[name])]


def main(argv=None) -> int:
    from harvest.plugins.enrichers.quality import DEFAULT_RULES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    if not SAMPLES.is_dir():
        print(f"no {SAMPLES}: nothing to measure")
        return 1
    photos = sorted([*SAMPLES.glob("exif-org/*.jpg"), *SAMPLES.glob("gps/*.jpg"),
                     SAMPLES / "corrupted.jpg"])
    small = sorted([*SAMPLES.glob("invalid/*.jpg"), SAMPLES / "long_description.jpg"])
    rules = ", ".join(f"{name} {op}{bound:g}" for name, (op, bound) in DEFAULT_RULES.items())
    print(f"default rules: {rules}")
    for split, chosen in (("dev", photos[0::2]), ("held-out", photos[1::2])):
        images = [load(path) for path in chosen]
        flagged = [(path.relative_to(SAMPLES), why) for path, image in
                   zip(chosen, images, strict=True) if (why := failures(image, DEFAULT_RULES))]
        print(f"\n{split}: {len(images)} good photos, {len(flagged)} flagged"
              + "".join(f"\n  flagged: {path} ({', '.join(why)})" for path, why in flagged))
        caught: dict[str, list[int]] = {}
        missed: dict[str, list[str]] = {}
        for path, image in zip(chosen, images, strict=True):
            for kind, copy in degraded(image).items():
                hit = bool(failures(copy, DEFAULT_RULES))
                caught.setdefault(kind, []).append(hit)
                if not hit:
                    missed.setdefault(kind, []).append(path.name)
        for kind, hits in caught.items():
            print(f"  caught, {kind:24} {sum(hits)}/{len(hits)}"
                  + (f"  (missed: {', '.join(missed[kind])})" if kind in missed else ""))
    flagged_small = sum(bool(failures(load(path), DEFAULT_RULES)) for path in small)
    print(f"\nthumbnails and strips ({len(small)}, 25 to 100 px on a side): "
          f"{flagged_small} flagged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
