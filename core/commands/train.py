"""``harvest train OUTPUT``: a classifier per term, learned from your own review marks.

For each term, a logistic regression (scikit-learn) on the pictures' embeddings (what an
embedding enricher such as ``embed`` stored): the pictures found for the term count as
weak positives and those of the other terms as weak negatives; the review page's marks
(kept, rejected) override them and weigh ``mark_weight`` times more. Precision and recall
are cross-validated against the marks (a fold's marks are never seen by the model that
judges them). The scores, ``learned.<term>`` for each picture of the term, go to the
``learned`` score overlay, which the review page and ``harvest export`` lay over the
records: a slider and a threshold like any other score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cleaning.curation import load_saved_review, write_overlay
from ..contract.shards import state_dirs
from ..errors import UsageError
from ..output.embeddings import EmbeddingStore
from ..output.records import read_records

OVERLAY = "learned"
MARK_WEIGHT = 10.0
FOLDS = 5


@dataclass
class TermReport:
    term: str
    pictures: int
    kept: int  # marked by hand
    rejected: int
    precision: float | None = None  # cross-validated against the marks; None: too few
    recall: float | None = None
    note: str = ""

    @property
    def f1(self) -> float | None:
        if self.precision is None or self.recall is None or not self.precision + self.recall:
            return None if self.precision is None else 0.0
        return 2 * self.precision * self.recall / (self.precision + self.recall)


@dataclass
class TrainReport:
    terms: list[TermReport] = field(default_factory=list)
    scored: int = 0
    without_embedding: int = 0

    def to_dict(self) -> dict:
        return {"scored": self.scored, "without_embedding": self.without_embedding,
                "terms": [{"term": t.term, "pictures": t.pictures, "kept": t.kept,
                           "rejected": t.rejected, "precision": t.precision,
                           "recall": t.recall, "f1": t.f1, "note": t.note}
                          for t in self.terms]}

    def table(self) -> str:
        def figure(value):
            return "-" if value is None else f"{value:.2f}"

        rows = [("term", "pictures", "kept", "rejected", "precision", "recall", "F1", "")]
        rows += [(t.term, str(t.pictures), str(t.kept), str(t.rejected), figure(t.precision),
                  figure(t.recall), figure(t.f1), t.note) for t in self.terms]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width)
                                   for cell, width in zip(row, widths, strict=True)).rstrip()
                         for row in rows)


def _pictures(output: Path) -> list[tuple[str, str, str]]:
    """(record id, term, sha256) of every stored picture that is not a copy."""
    records_path = output / "records.jsonl"
    if not records_path.is_file():
        raise UsageError(f"{output}: no records.jsonl: give the folder a recipe's `output:` names")
    found = []
    for record in read_records(records_path):
        sha = (record.get("file") or {}).get("sha256")
        if sha and record.get("term") and not record.get("duplicate_of"):
            found.append((record["id"], record["term"], sha))
    return found


def _embeddings(output: Path, shas: list[str]) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    dims = None
    for folder in state_dirs(output):
        try:
            store = EmbeddingStore(folder)
        except FileNotFoundError:
            continue
        try:
            if dims is not None and store.dims != dims:
                raise UsageError(f"{folder}: embeddings of {store.dims} dimensions beside "
                                 f"others of {dims}")
            dims = store.dims
            vectors.update(store.vectors([sha for sha in shas if sha not in vectors]))
        finally:
            store.close()
    return vectors


def _model():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise UsageError("harvest train needs scikit-learn: "
                         "pip install 'harvest-dataset[relevance]'") from exc
    return LogisticRegression(C=3.0, class_weight="balanced", max_iter=2000)


def train(output: Path, *, mark_weight: float = MARK_WEIGHT, folds: int = FOLDS) -> TrainReport:
    pictures = _pictures(output)
    vectors = _embeddings(output, sorted({sha for _, _, sha in pictures}))
    if not vectors:
        raise UsageError(f"{output}: no embeddings: add the `embed` enricher to the recipe "
                         "and run it")
    saved = load_saved_review(output)
    decisions = saved[1] if saved else {}
    report = TrainReport(without_embedding=sum(1 for _, _, sha in pictures if sha not in vectors))
    pictures = [p for p in pictures if p[2] in vectors]
    ids = [record_id for record_id, _, _ in pictures]
    terms = np.array([term for _, term, _ in pictures])
    x = np.stack([vectors[sha] for _, _, sha in pictures]).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    marks = np.array([{"keep": 1, "reject": 0}.get(decisions.get(i), -1) for i in ids])
    learned: dict[str, dict[str, float]] = {}
    for term in sorted(set(terms)):
        mine = terms == term
        # The weak label: found for this term or another; a mark says better, for its term.
        y = mine.astype(int)
        weight = np.ones(len(y))
        marked = mine & (marks >= 0)
        y[marked] = marks[marked]
        weight[marked] = mark_weight
        entry = TermReport(term, int(mine.sum()), int((marks[mine] == 1).sum()),
                           int((marks[mine] == 0).sum()))
        report.terms.append(entry)
        if len(set(y)) < 2:
            entry.note = "needs pictures of another term or some rejected by hand"
            continue
        entry.precision, entry.recall, entry.note = _cross_validate(
            x, y, weight, np.flatnonzero(marked), folds)
        scores = _out_of_fold_scores(x, y, weight, np.flatnonzero(mine & ~marked), folds)
        scores[marked] = _model().fit(x, y, sample_weight=weight).predict_proba(x[marked])[:, 1]
        for record_id, score in zip(np.array(ids)[mine], scores[mine], strict=True):
            learned.setdefault(str(record_id), {})[term] = round(float(score), 4)
    write_overlay(output, OVERLAY, learned)
    report.scored = len(learned)
    return report


def _out_of_fold_scores(x, y, weight, unmarked: np.ndarray, folds: int) -> np.ndarray:
    """Scores of the unmarked pictures, each from a model that did not see its own weak
    label: else the model learns the noise it should find (a bird found for "monkey" is
    labelled monkey) and scores it as it was labelled."""
    from sklearn.model_selection import KFold

    scores = np.zeros(len(y))
    if len(unmarked) < 2:
        if len(unmarked):
            keep = np.ones(len(y), dtype=bool)
            keep[unmarked] = False
            scores[unmarked] = _fit(x, y, weight, keep).predict_proba(x[unmarked])[:, 1]
        return scores
    for _, held in KFold(n_splits=min(folds, len(unmarked)), shuffle=True,
                         random_state=0).split(unmarked):
        held_out = unmarked[held]
        keep = np.ones(len(y), dtype=bool)
        keep[held_out] = False
        scores[held_out] = _fit(x, y, weight, keep).predict_proba(x[held_out])[:, 1]
    return scores


def _fit(x, y, weight, keep: np.ndarray):
    if len(set(y[keep])) < 2:  # the held-out fold held a whole class: fall back to all
        keep = np.ones(len(y), dtype=bool)
    return _model().fit(x[keep], y[keep], sample_weight=weight[keep])


def _cross_validate(x, y, weight, marked: np.ndarray, folds: int):
    """Precision and recall of the model on marks it was not trained on."""
    labels = y[marked]
    fewest = min(int((labels == 1).sum()), int((labels == 0).sum()))
    if fewest < 2:
        return None, None, "mark at least 2 kept and 2 rejected pictures for figures"
    from sklearn.model_selection import StratifiedKFold

    predicted = np.zeros(len(marked), dtype=int)
    splits = StratifiedKFold(n_splits=min(folds, fewest), shuffle=True, random_state=0)
    for _, test_at in splits.split(marked, labels):
        held_out = marked[test_at]
        # Held-out marks still count as weak labels of their term: what the model would
        # know of them without the mark.
        weak_y, weak_w = y.copy(), weight.copy()
        weak_y[held_out], weak_w[held_out] = 1, 1.0
        model = _model().fit(x, weak_y, sample_weight=weak_w)
        predicted[test_at] = model.predict(x[held_out])
    true_positive = int(((predicted == 1) & (labels == 1)).sum())
    said_positive, positives = int((predicted == 1).sum()), int((labels == 1).sum())
    precision = true_positive / said_positive if said_positive else 0.0
    return precision, true_positive / positives, ""
