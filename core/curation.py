"""What a curated harvest keeps: the thresholds and manual decisions chosen in
``harvest review``, read by the review page and by ``harvest export`` alike. A module of
its own, below both, so that neither imports the other."""

from __future__ import annotations

import json
from pathlib import Path


def passes(score: float, rule: dict) -> bool:
    """A threshold rule from the page: keep when the score is above (>=) or below (<) it."""
    value = float(rule.get("value", 0))
    return score >= value if rule.get("direction", "above") == "above" else score < value


def effective(thresholds: dict[str, dict]) -> dict[str, dict]:
    """The rules that can drop something: enabled, and not "keep >= 0" (which keeps all)."""
    return {term: rule for term, rule in thresholds.items()
            if rule.get("enabled", True)
            and not (rule.get("direction", "above") == "above" and float(rule.get("value", 0)) <= 0)}


def verdict(record: dict, thresholds: dict[str, dict], decisions: dict[str, str]) -> tuple[bool, bool]:
    """(kept, manual): a manual decision wins; then the thresholds chosen on the page; with
    none chosen, the verdict the recipe's keep_if gave when the harvest ran."""
    decision = decisions.get(record["id"])
    if decision in ("keep", "reject"):
        return decision == "keep", True
    rules = effective(thresholds)
    if not rules:
        return record.get("keep") is not False, False
    scores = record.get("scores") or {}
    for term, rule in rules.items():
        if not passes(float(scores.get(term, 0.0)), rule):
            return False, False
    return True, False


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


def set_aside(output: Path, record_id: str, reason: str, by: str) -> None:
    path = output / SET_ASIDE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": record_id, "reason": reason, "by": by},
                                ensure_ascii=False) + "\n")


def set_aside_ids(output: Path) -> dict[str, str]:
    """Record id -> why it was set aside."""
    path = output / SET_ASIDE
    if not path.is_file():
        return {}
    found = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
                found[entry["id"]] = entry.get("reason", "")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by a crash
    return found
