"""The embed enricher's speed: EfficientNet-Lite0 on onnxruntime, images per second on one
core at 224 px (decoding and preprocessing included, as the enricher does them), then the
cost of ``embed`` (and ``embed`` + ``relevance``) in a whole run: the same folder of photos
stored with and without them, side by side in this one run of the script.

    pip install -e '.[relevance]' && python bench/embed.py [--n 480]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "testdata" / "exif-samples" / "jpg"
sys.path.insert(0, str(REPO))


def photos() -> list[Path]:
    found = []
    for path in sorted(SAMPLES.rglob("*.jpg")):
        try:
            with Image.open(path) as image:
                image.convert("RGB")
            found.append(path)
        except Exception:
            continue
    return found


def network_rate(paths: list[Path]) -> None:
    from harvest.plugins.enrichers import efficientnet_lite as lite

    for threads in (1, 0):
        network = lite.Network(threads=threads)
        network.run(np.zeros((1, 3, 224, 224), np.float32))
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < 10:
            for start in range(0, len(paths), 32):
                batch = [lite.preprocess(lite.load_image(p)) for p in paths[start:start + 32]]
                network.run(np.stack(batch))
                done += len(batch)
        rate = done / (time.perf_counter() - started)
        label = "1 thread" if threads == 1 else "onnxruntime's threads (all cores)"
        print(f"embed (EfficientNet-Lite0, decode + 224 px + forward), {label}: {rate:.0f} "
              f"images/s")


def runs(paths: list[Path], n: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "photos"
        folder.mkdir()
        for i in range(n):  # distinct bytes: each copy a different JPEG quality
            with Image.open(paths[i % len(paths)]) as image:
                image.convert("RGB").save(folder / f"{i:05d}.jpg", "JPEG",
                                          quality=60 + i // len(paths) % 40)
        seconds = {}
        for label, enrichers in (("baseline", "[]"), ("embed", "[{use: embed}]"),
                                 ("embed+relevance", "[{use: embed}, {use: relevance}]")):
            output = Path(work) / label
            recipe = Path(work) / f"{label}.yml"
            recipe.write_text(f"output: {output}\nterms: [photo]\n"
                              f"sources: [{{use: folder, options: {{path: {folder}, "
                              f"term: photo}}}}]\nenrichers: {enrichers}\n")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "harvest.core.commands.cli", "run", str(recipe),
                            "--no-progress"], check=True, capture_output=True)
            seconds[label] = time.perf_counter() - started
            summary = json.loads((output / ".harvest" / "last-run.json").read_text())
            print(f"{label}: {n} photos in {seconds[label]:.2f} s "
                  f"({n / seconds[label]:.0f} images/s), {summary['outcome']}")
        for label in ("embed", "embed+relevance"):
            print(f"{label}/baseline images/s: {seconds['baseline'] / seconds[label]:.2f}x")


def main() -> int:
    paths = photos()
    if not paths:
        print(f"no sample photos in {SAMPLES}")
        return 1
    network_rate(paths)
    runs(paths, ARGS.n)
    return 0


ARGS = argparse.Namespace(n=480)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=480, help="photos in the whole runs")
    ARGS = parser.parse_args()
    sys.exit(main())
