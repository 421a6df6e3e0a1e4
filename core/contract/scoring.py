"""Scoring pictures against the recipe's terms: the part every label model shares.

A scorer plugin subclasses :class:`LabelScorer` and implements ``labels``: given a batch
of downsized JPEG bytes, return for each the labels the model sees with their
confidence. This class turns labels into a score per term, caches them by the image's
sha256 (a re-run never pays twice), applies the recipe's thresholds, and marks or drops.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from typing import ClassVar

from PIL import Image

from ..errors import PluginConfigError
from ..options import Choice, Int, ListOf, MapOf, Option, Str, Thresholds
from ..record import Record
from .plugin import Enricher


def apply_keep_if(record: Record, scores: dict[str, float], thresholds, action: str,
                  why: str) -> None:
    """A scorer's verdict on one record: ``keep`` (one for the record: a failure of any
    scorer stays, whichever runs last), the failures, and the drop when ``action`` says so.
    ``thresholds``: a ``Thresholds`` option's value; scores it names that are missing are
    not judged."""
    if not thresholds:
        return
    failing = [f"{name} {scores[name]:.2f} fails {op}{bound:g}"
               for name, (op, bound) in thresholds.items()
               if name in scores and not Thresholds.holds((op, bound), scores[name])]
    record.fields["keep"] = record.fields.get("keep", True) is not False and not failing
    if failing:
        record.fields["keep_failures"] = [*record.fields.get("keep_failures", []), *failing]
        if action == "drop":
            record.drop(f"{why}: " + "; ".join(failing))


class ScoringError(Exception):
    """Some images of a batch could not be scored; the engine retries them one by one."""


class LabelScorer(Enricher):
    score_source: ClassVar[str] = "model"
    batch_limit: ClassVar[int] = 16
    # A scorer whose scores are not the recipe's terms (a safety model's "nsfw", "faces")
    # names them here; ``labels`` then returns them by name, with anything else it wants
    # kept in the record, and the scores go to the record's ``scores_field``.
    fixed_scores: ClassVar[tuple[str, ...]] = ()
    scores_field: ClassVar[str] = "scores"

    options = (
        Option("keep_if", Thresholds(), None,
               help='per-term thresholds, e.g. {monkey: ">=0.6", cage: "<0.3"}'),
        Option("action", Choice("mark", "drop"), "mark",
               help="mark records (keep: true/false) or drop those that fail keep_if"),
        Option("synonyms", MapOf(ListOf(Str())), None,
               help="more labels that count for a term, e.g. {monkey: [primate, macaque]}"),
        Option("max_side", Int(64, 4096), 640,
               help="images are downsized to this many pixels on the long side before sending"),
    )

    def labels(self, images: list[bytes]) -> list[dict[str, float] | Exception]:
        """Labels (lower case) and confidences for each image, or the error for that image."""
        raise NotImplementedError

    def open(self) -> None:
        self.wordings: dict[str, set[str]] = {}
        for term in self.context.terms:
            words = {text.casefold() for _, text in term.queries}
            words |= {s.casefold() for s in (self.config["synonyms"] or {}).get(term.key, [])}
            self.wordings[term.key] = words
        names = self.fixed_scores or tuple(self.wordings)
        unknown = set(self.config["keep_if"] or {}) - set(names)
        unknown |= set(self.config["synonyms"] or {}) - set(self.wordings)
        if unknown:
            what = "scores" if self.fixed_scores else "recipe's terms"
            raise PluginConfigError(f"{self.context.name}: {sorted(unknown)[0]!r} is not one of "
                                    f"the {what} ({', '.join(names)})")
        self.context.state_dir.mkdir(parents=True, exist_ok=True)
        self.cache = sqlite3.connect(self.context.state_dir / f"scores-{self.context.name}.sqlite")
        self.cache.execute("CREATE TABLE IF NOT EXISTS labels (sha256 TEXT PRIMARY KEY, "
                           "labels TEXT NOT NULL)")
        self.context.declare_derived(f"scores-{self.context.name}.sqlite", "labels", "sha256")

    def close(self) -> None:
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.close()

    def downsized(self, path) -> bytes:
        side = self.config["max_side"]
        with Image.open(path) as image:
            image.draft("RGB", (side, side))
            image = image.convert("RGB")
            image.thumbnail((side, side))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=85)
        return out.getvalue()

    def score(self, labels: dict[str, float]) -> dict[str, float]:
        """Best confidence among labels that name the term (a label's words may contain it:
        "rhesus macaque" counts for "macaque"). No label is a score of 0."""
        if self.fixed_scores:
            return {name: round(float(labels.get(name, 0.0)), 4) for name in self.fixed_scores}
        scores = {}
        for term, words in self.wordings.items():
            best = 0.0
            for label, confidence in labels.items():
                if label in words or set(re.findall(r"\w+", label)) & words:
                    best = max(best, confidence)
            scores[term] = round(best, 4)
        return scores

    def enrich(self, records: list[Record]) -> None:
        wanted = {r.file.sha256: r for r in records if r.file is not None}
        known = self._cached(list(wanted))
        missing = [sha for sha in wanted if sha not in known]
        failed: dict[str, str] = {}
        for start in range(0, len(missing), self.batch_limit):
            chunk = missing[start:start + self.batch_limit]
            images = [self.downsized(self.context.output_dir / wanted[sha].file.path)
                      for sha in chunk]
            for sha, result in zip(chunk, self.labels(images), strict=True):
                if isinstance(result, Exception):
                    failed[sha] = str(result)
                    continue
                known[sha] = result
                self.cache.execute("INSERT OR REPLACE INTO labels VALUES (?, ?)",
                                   (sha, json.dumps(result)))
            self.cache.commit()
        for record in records:
            if record.file is None or record.file.sha256 not in known:
                continue
            self._apply(record, known[record.file.sha256])
        if failed:
            raise ScoringError(f"{len(failed)} image(s) not scored: {next(iter(failed.values()))}")

    def _cached(self, shas: list[str]) -> dict[str, dict[str, float]]:
        found: dict[str, dict[str, float]] = {}
        for start in range(0, len(shas), 500):
            chunk = shas[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for sha, labels in self.cache.execute(
                    f"SELECT sha256, labels FROM labels WHERE sha256 IN ({marks})", chunk):
                found[sha] = json.loads(labels)
        return found

    def _apply(self, record: Record, labels: dict[str, float]) -> None:
        scores = self.score(labels)
        if self.fixed_scores:
            record.fields[self.scores_field] = {**labels, **scores}
        else:
            record.fields["scores"] = scores
            record.fields["score_source"] = self.score_source
            record.fields["labels"] = dict(sorted(labels.items(), key=lambda kv: -kv[1])[:10])
        apply_keep_if(record, scores, self.config["keep_if"], self.config["action"], "score")
