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

from ..cleaning.curation import OverlayWriter, load_saved_review
from ..contract.shards import state_dirs
from ..errors import UsageError
from ..output.embeddings import OutputEmbeddings
from ..output.records import read_records
from ..output.takedown import crash_point

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


class _Pictures:
    """Every stored picture that is not a copy and has a term, compactly: a million of
    them take tens of MB, not a million tuples of strings."""

    def __init__(self, output: Path):
        records_path = output / "records.jsonl"
        if not records_path.is_file():
            raise UsageError(f"{output}: no records.jsonl: give the folder a recipe's "
                             "`output:` names")
        self.ids: list[str] = []
        shas: list[bytes] = []
        terms: list[int] = []
        self.term_names: list[str] = []
        numbers: dict[str, int] = {}
        for record in read_records(records_path):
            sha = (record.get("file") or {}).get("sha256")
            term = record.get("term")
            if sha and isinstance(term, str) and term and not record.get("duplicate_of"):
                self.ids.append(record["id"])
                shas.append(sha.encode("ascii"))
                terms.append(numbers.setdefault(term, len(numbers)))
        self.term_names = sorted(numbers, key=numbers.get)
        self.shas = np.array(shas, dtype="S64")
        self.terms = np.array(terms, dtype=np.int32)

    def sha(self, index: int) -> str:
        return self.shas[index].decode("ascii")


class _Embeddings(OutputEmbeddings):
    """The output's embeddings as training reads them, a slice at a time: a million
    pictures' embeddings are never in memory at once."""

    def __init__(self, output: Path):
        super().__init__(state_dirs(output))

    def known(self, shas: np.ndarray) -> np.ndarray:
        """Which of these (S64) sha256s have an embedding, as a mask."""
        mask = np.zeros(len(shas), dtype=bool)
        for start in range(0, len(shas), CHUNK):
            chunk = [sha.decode("ascii") for sha in shas[start:start + CHUNK]]
            found = super().known(chunk)
            mask[start:start + len(chunk)] = [sha in found for sha in chunk]
        return mask

    def unit(self, shas: list[str]) -> np.ndarray:
        """(len(shas), dims) float32 unit rows, in the order given; every sha is known."""
        vectors = self.vectors(shas)
        x = np.stack([vectors[sha] for sha in shas]).astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _model():
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=3.0, class_weight="balanced", max_iter=2000)


def train(output: Path, *, mark_weight: float = MARK_WEIGHT, folds: int = FOLDS,
          max_weak: int = MAX_WEAK) -> TrainReport:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UsageError("harvest train needs scikit-learn: "
                         "pip install 'harvest-dataset[relevance]'") from None
    pictures = _Pictures(output)
    embeddings = _Embeddings(output)
    try:
        return _train(output, pictures, embeddings, mark_weight, folds, max_weak)
    finally:
        embeddings.close()


def _train(output, pictures, embeddings, mark_weight, folds, max_weak) -> TrainReport:
    embedded = embeddings.known(pictures.shas)
    if not embedded.any():
        raise UsageError(f"{output}: no embeddings: add the `embed` enricher to the recipe "
                         "and run it")
    saved = load_saved_review(output)
    decisions = saved[1] if saved else {}
    report = TrainReport(without_embedding=int((~embedded).sum()))
    marks = np.full(len(pictures.ids), -1, dtype=np.int8)
    for position, record_id in enumerate(pictures.ids):
        decision = decisions.get(record_id)
        if decision in ("keep", "reject"):
            marks[position] = decision == "keep"
    rng = np.random.default_rng(0)
    with OverlayWriter(output, OVERLAY) as learned:
        for number, term in sorted(enumerate(pictures.term_names), key=lambda pair: pair[1]):
            mine = (pictures.terms == number) & embedded
            entry = TermReport(term, int(mine.sum()), int((marks[mine] == 1).sum()),
                               int((marks[mine] == 0).sum()))
            report.terms.append(entry)
            _learn(pictures, embeddings, mine, embedded & ~mine, marks, entry, learned,
                   mark_weight, folds, max_weak, rng)
            crash_point("learned-term")
    report.scored = learned.count
    return report


def _learn(pictures, embeddings, mine, others, marks, entry, learned, mark_weight, folds,
           max_weak, rng) -> None:
    """One term's model, its cross-validated figures, and the scores of its pictures."""
    marked = np.flatnonzero(mine & (marks >= 0))
    # The weak label: found for this term (1) or another (0); a mark says better.
    weak_mine = _sample(np.flatnonzero(mine & (marks < 0)), max_weak, rng)
    weak_others = _sample(np.flatnonzero(others), max_weak, rng)
    fitted_on = np.concatenate([marked, weak_mine, weak_others])
    y = np.concatenate([marks[marked].astype(int), np.ones(len(weak_mine), int),
                        np.zeros(len(weak_others), int)])
    if len(set(y)) < 2:
        entry.note = "needs pictures of another term or some rejected by hand"
        return
    weight = np.concatenate([np.full(len(marked), mark_weight),
                             np.ones(len(weak_mine) + len(weak_others))])
    x = embeddings.unit([pictures.sha(i) for i in fitted_on])
    at_marks = np.arange(len(marked))
    entry.precision, entry.recall, entry.note = _cross_validate(x, y, weight, at_marks, folds)
    seen = len(marked) + len(weak_mine)
    scores = _out_of_fold_scores(x, y, weight, np.arange(len(marked), seen), folds)
    model = _model().fit(x, y, sample_weight=weight)
    if len(marked):
        scores[at_marks] = model.predict_proba(x[at_marks])[:, 1]
    for position, score in zip(fitted_on[:seen], scores[:seen], strict=True):
        learned.add(pictures.ids[position], {entry.term: round(float(score), 4)})
    # The term's pictures the model was not fitted on: unseen, scored by it directly.
    rest = np.setdiff1d(np.flatnonzero(mine), fitted_on, assume_unique=True)
    for start in range(0, len(rest), CHUNK):
        chunk = rest[start:start + CHUNK]
        chunk_scores = model.predict_proba(embeddings.unit([pictures.sha(i) for i in chunk]))
        for position, score in zip(chunk, chunk_scores[:, 1], strict=True):
            learned.add(pictures.ids[position], {entry.term: round(float(score), 4)})


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
