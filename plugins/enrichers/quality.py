"""``quality``: image-quality scores from the pixels (as cleanvision computes them), with
thresholds to mark or drop: blurry, too dark, overexposed, low-information, grayscale,
odd-shaped or tiny images.

Scores are computed on the image downsized to 512 px on its long side (JPEGs decoded at
a reduced scale), so that they mean the same for a 640 px and a 6,000 px photo:

- ``blur``: variance of the Laplacian of the grey image (higher is sharper; photos in
  focus are usually well above 100, blurred ones below 50);
- ``brightness``: mean grey level, 0 (black) to 1 (white);
- ``dark``: share of pixels darker than 10% grey; ``overexposed``: brighter than 95%;
- ``entropy``: Shannon entropy of the grey histogram in bits (0 for a flat image, up to 8);
- ``saturation``: mean colour saturation, 0 to 1; ``grayscale``: 1 when there is no colour;
- ``aspect_ratio``: long side over short side; ``pixels``: width x height as stored.
"""

from __future__ import annotations

import numpy as np

from harvest.core import Choice, Enricher, Option, OptionError, Record, Thresholds, hookimpl, inside

SCORES = ("blur", "brightness", "dark", "overexposed", "entropy", "saturation", "grayscale",
          "aspect_ratio", "pixels")
SIDE = 512


def quality_scores(path, width: int, height: int) -> dict[str, float]:
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (SIDE, SIDE))
        image = image.convert("RGB")
        image.thumbnail((SIDE, SIDE))
        rgb = np.asarray(image, dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    laplacian = (4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1]
                 - grey[1:-1, :-2] - grey[1:-1, 2:])
    histogram = np.bincount(grey.astype(np.uint8).ravel(), minlength=256) / grey.size
    nonzero = histogram[histogram > 0]
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1), 0)
    return {
        "blur": round(float(laplacian.var()) if laplacian.size else 0.0, 2),
        "brightness": round(float(grey.mean() / 255), 4),
        "dark": round(float((grey < 25.5).mean()), 4),
        "overexposed": round(float((grey > 242).mean()), 4),
        "entropy": round(float(-(nonzero * np.log2(nonzero)).sum()), 4),
        "saturation": round(float(saturation.mean()), 4),
        "grayscale": float(float((high - low).mean()) < 2.0),
        "aspect_ratio": round(max(width, height) / max(1, min(width, height)), 4),
        "pixels": float(width * height),
    }


class QualityEnricher(Enricher):
    """Image-quality scores (blur, exposure, entropy, colour, shape) and thresholds."""

    scores_field = "quality"
    options = (
        Option("keep_if", Thresholds(), None,
               help='thresholds on the scores, e.g. {blur: ">=60", dark: "<0.8"}'),
        Option("action", Choice("mark", "drop"), "mark",
               help="mark records (quality_ok, quality_failed) or drop those that fail"),
    )

    @classmethod
    def check_options(cls, options) -> None:
        unknown = sorted(set(options.get("keep_if") or {}) - set(SCORES))
        if unknown:
            raise OptionError("keep_if", f"{unknown[0]}: not a quality score (the scores: "
                                         f"{', '.join(SCORES)})")

    def enrich(self, records: list[Record]) -> None:
        output = self.context.output_dir.resolve()
        rules = self.config["keep_if"] or {}
        for record in records:
            if record.file is None:
                continue
            scores = quality_scores(inside(output, record.file.path), record.file.width,
                                    record.file.height)
            record.fields["quality"] = scores
            failed = [f"{name} {scores[name]:g} not {op}{bound:g}"
                      for name, (op, bound) in rules.items()
                      if not Thresholds.holds((op, bound), scores[name])]
            if not rules:
                continue
            record.fields["quality_ok"] = not failed
            if failed:
                record.fields["quality_failed"] = failed
                # The record's one verdict, which export and review read (no other
                # scorer's pass may turn it back).
                record.fields["keep"] = False
                record.fields["keep_failures"] = [
                    *record.fields.get("keep_failures", []), *(f"quality {f}" for f in failed)]
                if self.config["action"] == "drop":
                    record.drop("quality: " + "; ".join(failed))
            else:
                record.fields.setdefault("keep", True)


@hookimpl
def harvest_enrichers():
    return {"quality": QualityEnricher}
