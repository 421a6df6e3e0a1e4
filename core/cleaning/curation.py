"""What a curated harvest keeps: the thresholds and manual decisions chosen in
``harvest review``, read by the review page and by ``harvest export`` alike. A module of
its own, below both, so that neither imports the other."""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

from ..options import Thresholds

OPERATORS = (">=", ">", "<=", "<", "==")
SCORING = Path(".harvest") / "scoring.json"


def operator_of(rule: dict) -> str:
    """A page rule's comparison: ``op``, or the older ``direction`` (above: >=, below: <)."""
    op = rule.get("op")
    if op in OPERATORS:
        return op
    return ">=" if rule.get("direction", "above") == "above" else "<"


def passes(score: float, rule: dict) -> bool:
    """A threshold rule from the page: keep when the score compares to its value."""
    return Thresholds.holds((operator_of(rule), float(rule.get("value", 0))), score)


def effective(thresholds: dict[str, dict]) -> dict[str, dict]:
    """The rules that can drop something: enabled, and not "keep >= 0" (which keeps all)."""
    return {key: rule for key, rule in thresholds.items()
            if rule.get("enabled", True)
            and not (operator_of(rule) == ">=" and float(rule.get("value", 0)) <= 0)}


def score_of(record: dict, key: str) -> float | None:
    """A score by its key: a term of the record's ``scores`` (``monkey``), or
    ``field.name`` for an enricher's own scores field (``quality.blur``, ``safety.nsfw``)."""
    group, dot, name = key.partition(".")
    if dot and isinstance(record.get(group), dict):
        value = record[group].get(name)
    else:
        value = (record.get("scores") or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _scored_otherwise(record: dict, key: str) -> bool:
    """Whether the record has the key's scores field but not this score in it: a score
    given per term (``typicality.<term>``, ``learned.<term>``) exists only for the
    pictures of that term, and a threshold on it does not judge the others."""
    group, _, name = key.partition(".")
    scores = record.get(group)
    return isinstance(scores, dict) and bool(scores) and name not in scores


def copy_reason(record: dict, aside: dict[str, str]) -> str | None:
    """Why a record is left out as a copy of another picture (None: it is not one): a
    byte-for-byte copy, a near duplicate, or a record set aside for a better copy. The
    review page, ``harvest export`` and the training shards agree on this."""
    if record.get("duplicate_of"):
        return f"copy of {record['duplicate_of']}"
    if record.get("near_duplicate_of"):
        return f"near duplicate of {record['near_duplicate_of']}"
    if record["id"] in aside:
        return f"set aside: {aside[record['id']]}"
    return None


class Verdicts:
    """The one rule the review page and ``harvest export`` share, for many records: a
    manual decision wins; then a near-duplicate or set-aside copy is left out; then the
    thresholds chosen on the page; with none chosen, the verdict the recipe's ``keep_if``
    gave when the harvest ran. ``score(record, key)`` reads a score (``score_of`` unless
    the caller has them at hand)."""

    def __init__(self, thresholds: dict[str, dict], decisions: dict[str, str],
                 aside: dict[str, str] | None = None, score=score_of):
        self.decisions, self.aside, self.score = decisions, aside or {}, score
        self.rules = [(key, float(rule.get("value", 0)), operator_of(rule))
                      for key, rule in sorted(effective(thresholds).items())]
        self.passing = "passes " + ", ".join(f"{key} {op} {value:.3g}"
                                             for key, value, op in self.rules)

    def __call__(self, record: dict) -> tuple[bool, bool, str]:
        """(kept, manual, why)."""
        decision = self.decisions.get(record["id"])
        if decision in ("keep", "reject"):
            return decision == "keep", True, ("kept by hand" if decision == "keep"
                                              else "rejected by hand")
        copy = copy_reason(record, self.aside)
        if copy:
            return False, False, copy
        if not self.rules:
            if record.get("keep") is False:
                failures = "; ".join(map(str, record.get("keep_failures") or [])) or "failed"
                return False, False, f"recipe keep_if: {failures}"
            return True, False, "recipe keep_if" if record.get("keep") else "no threshold"
        for key, value, op in self.rules:
            score = self.score(record, key)
            if score is None and "." not in key:
                score = 0.0  # a term the scorer did not see in the picture
            if score is None and _scored_otherwise(record, key):
                continue  # a score of another term (typicality.cage on a monkey picture)
            if score is None or not Thresholds.holds((op, value), score):
                shown = "none" if score is None else f"{score:.3g}"
                return False, False, f"{key} {shown} fails {op} {value:.3g}"
        return True, False, self.passing


def verdict(record: dict, thresholds: dict[str, dict], decisions: dict[str, str],
            aside: dict[str, str] | None = None) -> tuple[bool, bool, str]:
    """(kept, manual, why) of one record: see :class:`Verdicts`."""
    return Verdicts(thresholds, decisions, aside)(record)


def recipe_thresholds(output: Path) -> dict[str, dict]:
    """The recipe's ``keep_if`` rules as page rules, from ``.harvest/scoring.json``
    (written at each run), so the review page starts where the recipe left the harvest."""
    path = output / SCORING
    try:
        rules = json.loads(path.read_text(encoding="utf-8")).get("keep_if") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {key: {"op": op, "value": value, "enabled": True}
            for key, (op, value) in rules.items() if op in OPERATORS}


def score_fields(output: Path) -> list[str]:
    """The record fields holding an enricher's own scores (besides ``scores``), then those
    of the output's score overlays (``learned``)."""
    try:
        fields = json.loads((output / SCORING).read_text(encoding="utf-8")).get("fields") or []
    except (OSError, ValueError, AttributeError):
        fields = []
    fields = [field for field in fields if isinstance(field, str) and field != "scores"]
    return fields + [field for field in overlay_fields(output) if field not in fields]


# -- score overlays -----------------------------------------------------------------------
# Scores computed after the records were stored (``harvest train``'s ``learned``) are not
# written into the sinks, which are append-only: each is a file of its own, record id ->
# {name: score}, laid over the records by the review page and ``harvest export`` alike.

OVERLAYS = Path(".harvest") / "scores"


def overlay_fields(output: Path) -> list[str]:
    folder = output / OVERLAYS
    return sorted(path.stem for path in folder.glob("*.json")
                  if not path.name.startswith(".")) if folder.is_dir() else []


class OverlayWriter:
    """Writes the overlay ``field`` a record at a time (a million records' scores are never
    one dict in memory) and puts it in place whole, atomically, when the ``with`` block
    ends without an error: a reader sees the old overlay or the new one."""

    def __init__(self, output: Path, field: str):
        self.path = output / OVERLAYS / f"{field}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __enter__(self) -> "OverlayWriter":
        import tempfile

        # A temporary name of its own: a train from the page and one from the command
        # line, or a takedown, may write the same overlay at once (the last one wins).
        descriptor, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp",
                                            dir=self.path.parent)
        # Locked while it is written: an unlocked one is what a writer killed -9 left.
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        self.temp = Path(name)
        self.handle = os.fdopen(descriptor, "w", encoding="utf-8")
        self._remove_abandoned()
        self.handle.write("{")
        return self

    def _remove_abandoned(self) -> None:
        for temp in self.path.parent.glob(f".{self.path.stem}.*.tmp"):
            # A minute old at least: a writer that made its file a moment ago may not
            # hold its lock yet.
            if temp == self.temp or _age(temp) < 60:
                continue
            try:
                with open(temp, "rb") as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    temp.unlink(missing_ok=True)
            except OSError:  # written by a live writer now, or gone already
                continue

    def add(self, record_id: str, scores: dict[str, float]) -> None:
        self.handle.write(("," if self.count else "") + json.dumps(record_id) + ":"
                          + json.dumps(scores, sort_keys=True))
        self.count += 1

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.handle.close()
            self.temp.unlink(missing_ok=True)
            return
        self.handle.write("}")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.temp.replace(self.path)


def _age(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def write_overlay(output: Path, field: str, scores: dict[str, dict[str, float]]) -> Path:
    """Replaces the overlay ``field`` with ``scores`` (whole, atomically)."""
    with OverlayWriter(output, field) as writer:
        for record_id in sorted(scores):
            writer.add(record_id, scores[record_id])
    return writer.path


def read_overlays(output: Path) -> dict[str, dict[str, dict]]:
    """field -> record id -> scores. An unreadable overlay is an error naming it: left
    out, a threshold on its scores would judge every record as unscored."""
    from ..errors import UsageError

    overlays = {}
    for field in overlay_fields(output):
        path = output / OVERLAYS / f"{field}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: unreadable score overlay ({exc}); run what wrote it "
                             f"again (harvest train for learned.json) or remove it") from None
        if isinstance(data, dict):
            overlays[field] = {key: value for key, value in data.items()
                               if isinstance(value, dict)}
    return overlays


def forget_in_overlays(output: Path, record_ids: set[str]) -> int:
    """A takedown's or purge's: the records' scores leave every overlay."""
    forgotten = 0
    for field, scores in read_overlays(output).items():
        gone = record_ids & set(scores)
        if gone:
            write_overlay(output, field, {k: v for k, v in scores.items() if k not in gone})
            forgotten += len(gone)
    return forgotten


def lay_over(record: dict, overlays: dict[str, dict[str, dict]]) -> dict:
    """The record with its overlay scores as fields (``record["learned"]``)."""
    for field, by_id in overlays.items():
        if record.get("id") in by_id:
            record[field] = by_id[record["id"]]
    return record


def write_scoring(output: Path, enrichers) -> None:
    """What the recipe's scorers score and keep: ``fields`` (their scores fields) and
    ``keep_if`` (by score key, as :func:`score_of` reads it). ``enrichers``: (plugin class,
    options) pairs."""
    fields, keep_if = [], {}
    for cls, options in enrichers:
        field = getattr(cls, "scores_field", None)
        if not field:
            continue
        fields.append(field)
        for key, (op, value) in ((options or {}).get("keep_if") or {}).items():
            keep_if[key if field == "scores" else f"{field}.{key}"] = [op, value]
    path = output / SCORING
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"fields": fields, "keep_if": keep_if}, indent=2,
                               sort_keys=True), encoding="utf-8")
    temp.replace(path)


def load_saved_review(output: Path) -> tuple[dict, dict] | None:
    """The thresholds and decisions of the review page, exactly as the page has them now
    (``.harvest/review.sqlite``, written at every change), for ``harvest export``."""
    import sqlite3

    path = output / ".harvest" / "review.sqlite"
    if path.is_file():
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            decisions = dict(db.execute("SELECT id, decision FROM decisions"))
            thresholds = {term: json.loads(rule) for term, rule in
                          db.execute("SELECT term, rule FROM thresholds")}
        except sqlite3.Error:
            return None
        finally:
            db.close()
        return thresholds, decisions
    legacy = output / ".harvest" / "review.json"  # saved by an older harvest
    if not legacy.is_file():
        return None
    saved = json.loads(legacy.read_text(encoding="utf-8"))
    return saved.get("thresholds", {}), saved.get("decisions", {})


# -- records set aside after they were stored --------------------------------------------
# A plugin that learns later that a stored record should not be in the dataset (a better
# copy of the same picture arrived) cannot take it back from append-only sinks; it lists
# it here, and `harvest export` and the review page leave it out.

SET_ASIDE = Path(".harvest") / "set-aside.jsonl"


def set_aside(output: Path, record_id: str, reason: str, by: str,
              copy_of: str | None = None) -> None:
    """``copy_of``: the record kept instead, when the two hold the same picture (a takedown
    with ``--near-duplicates`` follows that link)."""
    path = output / SET_ASIDE
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"id": record_id, "reason": reason, "by": by}
    if copy_of is not None:
        entry["copy_of"] = copy_of
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _set_aside_entries(output: Path) -> list[dict]:
    path = output / SET_ASIDE
    if not path.is_file():
        return []
    entries = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut off by a crash
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                entries.append(entry)
    return entries


# How harvest worded a near-duplicate's reason before set-aside lines named ``copy_of``.
_OLD_COPY_REASON = re.compile(r"near duplicate of (\S+) \(distance \d+\)")


def set_aside_copies(output: Path) -> dict[str, str]:
    """Record id -> the record kept instead of it, for the records set aside as copies."""
    copies = {}
    for entry in _set_aside_entries(output):
        kept = entry.get("copy_of")
        if kept is None and (old := _OLD_COPY_REASON.match(str(entry.get("reason", "")))):
            kept = old.group(1)
        if isinstance(kept, str):
            copies[entry["id"]] = kept
    return copies


def forget_set_aside(output: Path, record_ids: set[str]) -> int:
    """A takedown's or purge's: the lines of removed records go (rewritten whole,
    atomically); a record set aside for a removed one stays set aside. Done again after a
    crash, it finishes."""
    entries = _set_aside_entries(output)
    kept = [entry for entry in entries if entry["id"] not in record_ids]
    if len(kept) == len(entries):
        return 0
    path = output / SET_ASIDE
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temp.open("w", encoding="utf-8") as handle:
        for entry in kept:
            if entry.get("copy_of") in record_ids:
                entry = {**entry, "copy_of": None,
                         "reason": "near duplicate of a picture since taken down"}
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return len(entries) - len(kept)


def set_aside_ids(output: Path) -> dict[str, str]:
    """Record id -> why it was set aside."""
    return {entry["id"]: entry.get("reason", "") for entry in _set_aside_entries(output)}
