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
# A term's model is fitted on its marks and at most this many weak labels of each side
# (sampled), then scores the term's other pictures a slice at a time: memory stays
# bounded however many pictures a term has.
MAX_WEAK = 20_000
CHUNK = 10_000


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


class _Embeddings:
    """The output's embedding stores (its own, each cluster shard's), read a slice at a
    time: a million pictures' embeddings are never in memory at once."""

    def __init__(self, output: Path):
        self.stores = []
        for folder in state_dirs(output):
            try:
                self.stores.append(EmbeddingStore(folder))
            except FileNotFoundError:
                continue
        if len({store.dims for store in self.stores}) > 1:
            self.close()
            raise UsageError(f"{output}: embeddings of different sizes in one output")

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def known(self, shas: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(shas), CHUNK):
            chunk = shas[start:start + CHUNK]
            for store in self.stores:
                found |= store.known([sha for sha in chunk if sha not in found])
        return found

    def unit(self, shas: list[str]) -> np.ndarray:
        """(len(shas), dims) float32 unit rows, in the order given; every sha is known."""
        vectors: dict[str, np.ndarray] = {}
        for store in self.stores:
            vectors.update(store.vectors([sha for sha in shas if sha not in vectors]))
        x = np.stack([vectors[sha] for sha in shas]).astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _model():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise UsageError("harvest train needs scikit-learn: "
                         "pip install 'harvest-dataset[relevance]'") from exc
    return LogisticRegression(C=3.0, class_weight="balanced", max_iter=2000)


def train(output: Path, *, mark_weight: float = MARK_WEIGHT, folds: int = FOLDS,
          max_weak: int = MAX_WEAK) -> TrainReport:
    pictures = _pictures(output)
    embeddings = _Embeddings(output)
    try:
        return _train(output, pictures, embeddings, mark_weight, folds, max_weak)
    finally:
        embeddings.close()


def _train(output, pictures, embeddings, mark_weight, folds, max_weak) -> TrainReport:
    known = embeddings.known(sorted({sha for _, _, sha in pictures}))
    if not known:
        raise UsageError(f"{output}: no embeddings: add the `embed` enricher to the recipe "
                         "and run it")
    saved = load_saved_review(output)
    decisions = saved[1] if saved else {}
    report = TrainReport(without_embedding=sum(1 for _, _, sha in pictures if sha not in known))
    pictures = [p for p in pictures if p[2] in known]
    ids = np.array([record_id for record_id, _, _ in pictures], dtype=object)
    shas = [sha for _, _, sha in pictures]
    terms = np.array([term for _, term, _ in pictures], dtype=object)
    marks = np.array([{"keep": 1, "reject": 0}.get(decisions.get(i), -1) for i in ids])
    rng = np.random.default_rng(0)
    learned: dict[str, dict[str, float]] = {}
    for term in sorted(set(terms)):
        mine = terms == term
        marked = np.flatnonzero(mine & (marks >= 0))
        entry = TermReport(term, int(mine.sum()), int((marks[marked] == 1).sum()),
                           int((marks[marked] == 0).sum()))
        report.terms.append(entry)
        # The weak label: found for this term (1) or another (0); a mark says better.
        weak_mine = _sample(np.flatnonzero(mine & (marks < 0)), max_weak, rng)
        weak_others = _sample(np.flatnonzero(~mine), max_weak, rng)
        fitted_on = np.concatenate([marked, weak_mine, weak_others])
        y = np.concatenate([marks[marked], np.ones(len(weak_mine), int),
                            np.zeros(len(weak_others), int)])
        if len(set(y)) < 2:
            entry.note = "needs pictures of another term or some rejected by hand"
            continue
        weight = np.concatenate([np.full(len(marked), mark_weight),
                                 np.ones(len(weak_mine) + len(weak_others))])
        x = embeddings.unit([shas[i] for i in fitted_on])
        at_marks = np.arange(len(marked))
        entry.precision, entry.recall, entry.note = _cross_validate(x, y, weight, at_marks,
                                                                    folds)
        at_weak_mine = np.arange(len(marked), len(marked) + len(weak_mine))
        scores = _out_of_fold_scores(x, y, weight, at_weak_mine, folds)
        model = _model().fit(x, y, sample_weight=weight)
        if len(marked):
            scores[at_marks] = model.predict_proba(x[at_marks])[:, 1]
        for position, score in zip(fitted_on[:len(marked) + len(weak_mine)],
                                   scores[:len(marked) + len(weak_mine)], strict=True):
            learned.setdefault(str(ids[position]), {})[term] = round(float(score), 4)
        # The term's pictures the model was not fitted on: unseen, scored by it directly.
        rest = np.setdiff1d(np.flatnonzero(mine), fitted_on, assume_unique=True)
        for start in range(0, len(rest), CHUNK):
            chunk = rest[start:start + CHUNK]
            chunk_scores = model.predict_proba(embeddings.unit([shas[i] for i in chunk]))[:, 1]
            for position, score in zip(chunk, chunk_scores, strict=True):
                learned.setdefault(str(ids[position]), {})[term] = round(float(score), 4)
    write_overlay(output, OVERLAY, learned)
    report.scored = len(learned)
    return report


def _sample(indices: np.ndarray, most: int, rng) -> np.ndarray:
    if len(indices) <= most:
        return indices
    return np.sort(rng.choice(indices, size=most, replace=False))


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
