"""``relevance``: does the picture show the search term? Scored offline, per term, with no
paid API. Needs the ``relevance`` extra (as ``embed`` does; the two share one forward pass
of EfficientNet-Lite0 a picture).

Two scores, both from 0 to 1, in the record's ``relevance`` field:

- ``imagenet.<term>``: the probability mass of the ImageNet classes at or under the term
  in WordNet (``monkey``: baboon, macaque, spider monkey... together). The term's wordings
  and its ``synonyms`` are looked up as WordNet lemmas; ``classes`` names classes or
  synsets outright (``{affe: [monkey]}``, ``{cage: [n02843684]}``), which is how a term in
  another language, or one WordNet files elsewhere, is mapped. A term that names nothing
  in ImageNet's hierarchy gets no ``imagenet`` score (the log says so once).
- ``typicality.<term>``: how much the picture looks like the other pictures of its term,
  for every term, ImageNet's or not ("cage" included): the cosine between its features
  and a robust centre of its term's pictures (a trimmed mean, so that the minority that
  does not show the term does not pull it), mapped to 0..1. The centre is learned from
  the pictures as they come (the first ``sample`` of each term, kept in the output's
  state so that a resumed run goes on with them).

``keep_if`` and ``action`` work as for every scorer (``{imagenet.monkey: ">=0.3"}``); the
review page shows a slider per score.
"""

from __future__ import annotations

import json

import numpy as np

from harvest.core import (
    Choice,
    EmbeddingStore,
    Enricher,
    Int,
    ListOf,
    MapOf,
    Option,
    PluginConfigError,
    Record,
    Str,
    Thresholds,
    apply_keep_if,
    hookimpl,
)

KINDS = ("imagenet", "typicality")
TRIM = 0.3  # the share of a term's pictures left out of its centre, farthest first
SMALLEST_SAMPLE = 3  # fewer pictures of a term than this give no typicality yet


def robust_centre(vectors: np.ndarray, trim: float = TRIM, rounds: int = 3) -> np.ndarray:
    """A unit vector at the heart of ``vectors`` (unit rows): the mean, then the mean of
    the (1 - trim) share closest to it, a few times over."""
    centre = vectors.mean(axis=0)
    keep = max(1, int(round(len(vectors) * (1 - trim))))
    for _ in range(rounds):
        norm = np.linalg.norm(centre)
        if norm == 0:
            break
        closest = np.argsort(-(vectors @ (centre / norm)))[:keep]
        centre = vectors[closest].mean(axis=0)
    norm = np.linalg.norm(centre)
    return centre / norm if norm else centre


class TermSample:
    """Which pictures of each term the typicality centre is learned from: the first
    ``size`` of each, by sha256. Their embeddings are read from the output's embedding
    store, so a picture taken down (whose embedding is forgotten) leaves the sample too."""

    def __init__(self, path, size: int):
        self.path, self.size = path, size
        self.shas: dict[str, list[str]] = {}
        if path.exists():
            try:
                self.shas = {str(k): [str(s) for s in v]
                             for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
            except (ValueError, AttributeError):
                self.shas = {}  # cut short by a crash: learned again from what comes

    def add(self, term: str, sha: str) -> bool:
        """Takes the picture if its term's sample has room: was it taken?"""
        kept = self.shas.setdefault(term, [])
        if sha in kept or len(kept) >= self.size:
            return False
        kept.append(sha)
        return True

    def keep_only(self, known: set[str]) -> bool:
        """Forgets the pictures whose embedding is gone (taken down, purged), freeing their
        places in the sample: was any forgotten?"""
        before = sum(map(len, self.shas.values()))
        self.shas = {term: [sha for sha in shas if sha in known]
                     for term, shas in self.shas.items()}
        return sum(map(len, self.shas.values())) != before

    def save(self) -> None:
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.shas), encoding="utf-8")
        temp.replace(self.path)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class RelevanceScorer(Enricher):
    """Offline relevance of each picture to its term: ImageNet's classes and typicality."""

    scores_field = "relevance"
    options = (
        Option("keep_if", Thresholds(), None,
               help='thresholds by score, e.g. {imagenet.monkey: ">=0.3", '
                    'typicality.cage: ">=0.6"}'),
        Option("action", Choice("mark", "drop"), "mark",
               help="mark records (keep: true/false) or drop those that fail keep_if"),
        Option("scores", ListOf(Choice(*KINDS)), list(KINDS), help="which scores to give"),
        Option("synonyms", MapOf(ListOf(Str())), None,
               help="more words (WordNet lemmas) that count for a term, e.g. {monkey: [ape]}"),
        Option("classes", MapOf(ListOf(Str())), None,
               help="ImageNet classes or WordNet synsets (lemma or id) for a term, e.g. "
                    "{affe: [monkey]}: instead of looking its wordings up"),
        Option("sample", Int(10, 100_000), 1000,
               help="pictures of each term the typicality centre is learned from"),
    )

    def open(self) -> None:
        from . import efficientnet_lite

        efficientnet_lite.require(self.context.name)
        self.lite = efficientnet_lite
        terms = [term.key for term in self.context.terms]
        for option in ("synonyms", "classes"):
            unknown = set(self.config[option] or {}) - set(terms)
            if unknown:
                raise PluginConfigError(f"{self.context.name}: {option}: {sorted(unknown)[0]!r} "
                                        f"is not one of the recipe's terms ({', '.join(terms)})")
        table = efficientnet_lite.ImageNetTable()
        self.classes: dict[str, np.ndarray] = {}
        for term in self.context.terms:
            explicit = (self.config["classes"] or {}).get(term.key)
            if explicit:
                unknown = [word for word in explicit if not table.classes_under(word)]
                if unknown:
                    raise PluginConfigError(f"{self.context.name}: classes: {unknown[0]!r} names "
                                            "no ImageNet class or WordNet synset above one")
                words = explicit
            else:
                words = [text for _, text in term.queries]
                words += (self.config["synonyms"] or {}).get(term.key, [])
            found = set().union(*(table.classes_under(word) for word in words))
            if found:
                self.classes[term.key] = np.array(sorted(found))
            elif "imagenet" in self.config["scores"]:
                self.context.log.warning("%s: %r names no ImageNet class: no imagenet.%s score "
                                         "(the classes option can name some)",
                                         self.context.name, term.key, term.key)
        names = self._names(terms)
        unknown = set(self.config["keep_if"] or {}) - set(names)
        if unknown:
            raise PluginConfigError(f"{self.context.name}: keep_if: {sorted(unknown)[0]!r} is not "
                                    f"one of its scores ({', '.join(names)})")
        self.store = None
        if "typicality" in self.config["scores"]:
            try:
                if self.context.state_dir.resolve() not in efficientnet_lite.EMBEDDING_WRITERS:
                    raise FileNotFoundError  # no embed before it: nothing new would be embedded
                self.store = EmbeddingStore(self.context.state_dir)
            except FileNotFoundError:
                raise PluginConfigError(f"{self.context.name}: typicality needs the embed "
                                        "enricher before it in the recipe (or scores: "
                                        "[imagenet])") from None
            self.sample = TermSample(
                self.context.state_dir / f"typicality-{self.context.name}.json",
                self.config["sample"])
            sampled = [sha for shas in self.sample.shas.values() for sha in shas]
            if self.sample.keep_only(self.store.known(sampled)):
                self.sample.save()

    def close(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.close()

    def _names(self, terms: list[str]) -> list[str]:
        names = []
        if "imagenet" in self.config["scores"]:
            names += [f"imagenet.{term}" for term in terms if term in self.classes]
        if "typicality" in self.config["scores"]:
            names += [f"typicality.{term}" for term in terms]
        return names

    def picture_analyses(self) -> tuple[str, ...]:
        return (self.lite.ANALYSIS,)

    def enrich(self, records: list[Record]) -> None:
        analyses = self.lite.analyse_records(records, self.context.output_dir)
        good = {sha: a for sha, a in analyses.items() if not isinstance(a, Exception)}
        typical = self.store is not None
        if typical:
            mine = {r.file.sha256: r.term for r in records if r.file and r.term}
            vectors = self.store.vectors(list(mine))
            added = [self.sample.add(term, sha) for sha, term in mine.items() if sha in vectors]
            if any(added):
                self.sample.save()
            centres = self._centres(set(mine.values()))
        for record in records:
            analysis = good.get(record.file.sha256) if record.file else None
            if analysis is None:
                continue
            scores = {}
            if "imagenet" in self.config["scores"]:
                for term, classes in self.classes.items():
                    mass = float(analysis.probabilities[classes].sum())
                    scores[f"imagenet.{term}"] = round(min(mass, 1.0), 4)
            if typical and record.term in centres and record.file.sha256 in vectors:
                mean, centre = centres[record.term]
                cosine = float(_unit(vectors[record.file.sha256] - mean) @ centre)
                scores[f"typicality.{record.term}"] = round((1 + cosine) / 2, 4)
            record.fields["relevance"] = scores
            apply_keep_if(record, scores, self.config["keep_if"], self.config["action"],
                          "relevance")
        failed = [a for a in analyses.values() if isinstance(a, Exception)]
        if failed:
            raise ValueError(f"{len(failed)} picture(s) not scored: {failed[0]}")

    def _centres(self, terms: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each term's centre, from its sample's embeddings less the mean of every term's
        (which every picture shares, so it says nothing about a term)."""
        sampled = {term: self.store.vectors(shas) for term, shas in self.sample.shas.items()}
        every = [v for vectors in sampled.values() for v in vectors.values()]
        if not every:
            return {}
        mean = np.mean(every, axis=0)
        centres = {}
        for term in terms:
            vectors = list(sampled.get(term, {}).values())
            if len(vectors) >= SMALLEST_SAMPLE:
                centres[term] = (mean, robust_centre(_unit(np.stack(vectors) - mean)))
        return centres


@hookimpl
def harvest_enrichers():
    return {"relevance": RelevanceScorer}
