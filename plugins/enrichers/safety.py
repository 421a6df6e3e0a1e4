"""``safety``: an offline nudity and face detector (NudeNet's ONNX model, run on the CPU
with onnxruntime; no network, no key), through the LabelScorer base: scores cached by
sha256, batches, ``keep_if`` thresholds, mark or drop.

Scores, in the record's ``safety``: ``nsfw`` (the highest confidence of the exposed-body
classes), ``faces`` (how many faces) and ``face_confidence`` (the most confident face),
with ``boxes``: each detection's class, confidence and box as fractions of the image's
width and height (``[x, y, w, h]``), so they hold for any size of the image.

The model ships inside the ``nudenet`` wheel (an optional extra: ``pip install
'harvest-dataset[safety]'``). License: the wheel's metadata says MIT, but its LICENSE file is
AGPL-3.0; read both before you ship a product that includes it.
"""

from __future__ import annotations

import io

from harvest.core import Float, LabelScorer, Option, OptionError, PluginConfigError, hookimpl

EXPOSED = {"FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
           "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"}
FACES = {"FACE_FEMALE", "FACE_MALE"}


class SafetyScorer(LabelScorer):
    """Offline nudity and face scores (NudeNet on onnxruntime)."""

    score_source = "nudenet"
    batch_limit = 8
    fixed_scores = ("nsfw", "faces", "face_confidence")
    scores_field = "safety"
    options = tuple(o for o in LabelScorer.options if o.name != "synonyms") + (
        Option("min_confidence", Float(0.25, 1.0), 0.3,
               help="detections below this confidence are ignored (0.25 at least: the "
                    "detector reports nothing weaker)"),
    )

    @classmethod
    def check_options(cls, options) -> None:
        try:
            import nudenet  # noqa: F401
        except ImportError:
            raise OptionError(None, "the safety enricher needs NudeNet: "
                                     "pip install 'harvest-dataset[safety]'") from None

    def open(self) -> None:
        self.config.setdefault("synonyms", None)
        super().open()
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise PluginConfigError(f"{self.context.name}: needs NudeNet: "
                                    "pip install 'harvest-dataset[safety]'") from None
        self.detector = NudeDetector()

    def labels(self, images: list[bytes]) -> list[dict | Exception]:
        from PIL import Image

        results: list[dict | Exception] = []
        for data in images:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                detections = self.detector.detect(data)
            except Exception as exc:  # one unreadable image fails itself, not the batch
                results.append(exc)
                continue
            kept = [d for d in detections if d["score"] >= self.config["min_confidence"]]
            faces = [d["score"] for d in kept if d["class"] in FACES]
            results.append({
                "nsfw": max((d["score"] for d in kept if d["class"] in EXPOSED), default=0.0),
                "faces": len(faces),
                "face_confidence": max(faces, default=0.0),
                "boxes": [{"class": d["class"], "confidence": round(d["score"], 4),
                           "box": [round(d["box"][0] / width, 4), round(d["box"][1] / height, 4),
                                   round(d["box"][2] / width, 4), round(d["box"][3] / height, 4)]}
                          for d in kept],
            })
        return results


@hookimpl
def harvest_enrichers():
    return {"safety": SafetyScorer}
