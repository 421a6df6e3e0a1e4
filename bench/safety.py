"""The safety enricher's speed: images per second through NudeNet's model on this
machine's CPU, as the enricher feeds it (each image downsized to 640 px, JPEG); then the
cost of ``images: {blur_faces: true}`` in a whole run: the same folder of photos stored
with and without it (the baseline, in the same run of this script).

    pip install -e '.[safety]' && python bench/safety.py [--n 480]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
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
    blur_runs(images, ARGS.n)
    return 0


def blur_runs(images: list[bytes], n: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "photos"
        folder.mkdir()
        for i in range(n):  # distinct bytes: each copy a different JPEG quality
            with Image.open(io.BytesIO(images[i % len(images)])) as image:
                image.save(folder / f"{i:05d}.jpg", "JPEG", quality=60 + i // len(images) % 40)
        seconds = {}
        for label, images_section in (("baseline", "{}"), ("blur_faces", "{blur_faces: true}")):
            output = Path(work) / label
            recipe = Path(work) / f"{label}.yml"
            recipe.write_text(f"output: {output}\nimages: {images_section}\n"
                              f"sources: [{{use: folder, options: {{path: {folder}}}}}]\n"
                              "enrichers: []\n")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "harvest.core.commands.cli", "run", str(recipe),
                            "--no-progress"], check=True, capture_output=True)
            seconds[label] = time.perf_counter() - started
            summary = json.loads((output / ".harvest" / "last-run.json").read_text())
            blurred = sum(1 for line in (output / "records.jsonl").open()
                          if '"blurred_faces"' in line)
            print(f"{label}: {n} photos in {seconds[label]:.2f} s "
                  f"({n / seconds[label]:.0f} images/s), {summary['outcome']}, "
                  f"{blurred} with faces blurred")
        print(f"blur_faces/baseline wall time: {seconds['blur_faces'] / seconds['baseline']:.2f}x")


ARGS = argparse.Namespace(n=480)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=480, help="photos in the blur runs")
    ARGS = parser.parse_args()
    sys.exit(main())
