"""``quality``: image-quality scores from the pixels (as cleanvision computes them), with
thresholds to mark or drop: blurry, too dark, overexposed, low-information, grayscale,
odd-shaped or tiny images.

Scores are computed on the image brought to 512 px on its long side (shrunk, JPEGs decoded
at a reduced scale, or enlarged), so that they mean the same for a 64 px, a 640 px and a
6,000 px picture, and a thumbnail does not look sharp for having its detail packed in few
pixels:

- ``blur``: variance of the Laplacian of the grey image at 512 px (higher is sharper;
  photos in focus are usually well above 100, blurred ones below 50);
- ``blur_native``: the same at the picture's own scale, capped at 2,048 px on the long
  side, on its central 1,024 x 1,024 window: a large photo blurred at full size looks
  sharp at 512 px, not here. A picture of 512 px or less gets its ``blur``;
- ``brightness``: mean grey level, 0 (black) to 1 (white);
- ``dark``: share of pixels darker than 10% grey; ``overexposed``: brighter than 95%;
- ``entropy``: Shannon entropy of the grey histogram in bits (0 for a flat image, up to 8);
- ``saturation``: mean colour saturation, 0 to 1; ``grayscale``: 1 when there is no colour;
- ``aspect_ratio``: long side over short side; ``pixels``: width x height as stored.

``DEFAULT_RULES`` apply unless ``defaults: false``; ``keep_if`` sets or replaces rules score
by score. They were chosen on real camera photos and checked on others
(``bench/quality.py``).
"""

from __future__ import annotations

import numpy as np

from harvest.core import Bool, Choice, Enricher, Option, OptionError, Record, Thresholds, hookimpl, inside

SCORES = ("blur", "blur_native", "brightness", "dark", "overexposed", "entropy", "saturation", "grayscale",
          "aspect_ratio", "pixels")
SIDE = 512
NATIVE_CAP = 2048  # blur_native's scale at most: a JPEG decoded at 1/2 or 1/4 stays fast
WINDOW = 1024

# What a user who writes nothing gets (measured in bench/quality.py: on 24 real camera
# photos, none flagged; degraded copies caught as docs/cleaning.md says).
DEFAULT_RULES = {"blur": (">=", 50.0), "blur_native": (">=", 20.0), "dark": ("<", 0.6),
                 "overexposed": ("<", 0.2), "entropy": (">=", 5.0), "pixels": (">=", 16384.0)}


def laplacian_variance(grey: np.ndarray) -> float:
    laplacian = (4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1]
                 - grey[1:-1, :-2] - grey[1:-1, 2:])
    return float(laplacian.var()) if laplacian.size else 0.0


def quality_scores(path, width: int, height: int) -> dict[str, float]:
    from PIL import Image

    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    with Image.open(path) as image:
        long_side = max(image.size)
        native_side = min(long_side, NATIVE_CAP)
        if image.format == "JPEG":
            # Decoded at the smallest scale that still has native_side pixels (draft asks
            # for a size both sides must reach).
            image.draft("RGB", (image.size[0] * native_side // long_side,
                                image.size[1] * native_side // long_side))
        image = image.convert("RGB")
        blur_native = None
        if long_side > SIDE:
            native = image
            if max(native.size) > NATIVE_CAP:
                native = native.copy()
                native.thumbnail((NATIVE_CAP, NATIVE_CAP))
            w, h = native.size
            left, top = max(0, (w - WINDOW) // 2), max(0, (h - WINDOW) // 2)
            window = native.crop((left, top, min(w, left + WINDOW), min(h, top + WINDOW)))
            blur_native = laplacian_variance(np.asarray(window, dtype=np.float32) @ weights)
        # At 512 px on the long side, enlarged when smaller, so that a tiny picture's
        # blur is what it looks like at that size.
        scale = SIDE / max(1, max(image.size))
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS if scale < 1
                                 else Image.Resampling.BILINEAR)
        rgb = np.asarray(image, dtype=np.float32)
    grey = rgb @ weights
    blur = laplacian_variance(grey)
    histogram = np.bincount(grey.astype(np.uint8).ravel(), minlength=256) / grey.size
    nonzero = histogram[histogram > 0]
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1), 0)
    return {
        "blur": round(blur, 2),
        "blur_native": round(blur if blur_native is None else blur_native, 2),
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
               help='thresholds on the scores, e.g. {blur: ">=60", dark: "<0.8"}; each '
                    "replaces the default rule of its score"),
        Option("defaults", Bool(), True,
               help="apply the default rules (blur, blur_native, dark, overexposed, entropy, "
                    "pixels) to the scores keep_if does not set; false keeps everything "
                    "keep_if does not rule out"),
        Option("action", Choice("mark", "drop"), "mark",
               help="mark records (quality_ok, quality_failed) or drop those that fail"),
    )

    @classmethod
    def check_options(cls, options) -> None:
        unknown = sorted(set(options.get("keep_if") or {}) - set(SCORES))
        if unknown:
            raise OptionError("keep_if", f"{unknown[0]}: not a quality score (the scores: "
                                         f"{', '.join(SCORES)})")

    def open(self) -> None:
        super().open()
        self.flagged_by_defaults = 0

    def close(self) -> None:
        flagged = getattr(self, "flagged_by_defaults", 0)  # 0 when it never opened
        if flagged:
            # Rules the recipe never wrote take pictures out of exports: say so, each run.
            self.log.warning("%s: %d picture(s) failed its default rules and are marked "
                             "keep: false, which export leaves out; set keep_if, or "
                             "defaults: false to only score", self.context.name, flagged)
        super().close()

    def enrich(self, records: list[Record]) -> None:
        output = self.context.output_dir.resolve()
        rules = {**(DEFAULT_RULES if self.config["defaults"] else {}),
                 **(self.config["keep_if"] or {})}
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
                if not self.config["keep_if"]:
                    self.flagged_by_defaults += 1
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
