"""The safety enricher's speed: images per second through NudeNet's model on this
machine's CPU, as the enricher feeds it (each image downsized to 640 px, JPEG).

    pip install -e '.[safety]' && python bench/safety.py
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "testdata" / "exif-samples" / "jpg"


def main() -> int:
    from nudenet import NudeDetector

    images = []
    for path in sorted(SAMPLES.rglob("*.jpg")):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((640, 640))
                out = io.BytesIO()
                image.save(out, "JPEG", quality=85)
                images.append(out.getvalue())
        except Exception:
            continue
    if not images:
        print(f"no sample photos in {SAMPLES}")
        return 1
    detector = NudeDetector()
    detector.detect(images[0])  # the first run sets onnxruntime up
    rounds = 3
    started = time.perf_counter()
    for _ in range(rounds):
        for data in images:
            detector.detect(data)
    rate = rounds * len(images) / (time.perf_counter() - started)
    print(f"safety (NudeNet 320n on onnxruntime, CPU): {rate:.0f} images/s, "
          f"{1000 / rate:.1f} ms per image, {len(images)} photos of 640 px, one thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
