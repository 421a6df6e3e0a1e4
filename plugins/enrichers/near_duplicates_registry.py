"""Which stored pictures are copies of one another (near-duplicates by perceptual hash),
and which copy is kept: the registry the ``near_duplicates`` enricher hands its hashes to.

The registry holds, for every picture placed, its pHash (in a :class:`HammingIndex`), its
dHash, its size in pixels and its license rank. ``place`` takes a batch and decides for
each picture, in order: a copy of an earlier, at least as good picture (the largest, then
the best licensed, then the earliest), or kept, with the earlier copies it beats set
aside. The registry is a shared service of the pipeline's coordinator: one machine's
pipeline has it in its own process; on a cluster it lives on the scheduler and every
worker's pipeline places its pictures there, one batch at a time, so two workers never
both keep one picture. Hence it travels (pickled, as its rows) and its ``place`` takes
and answers plain lists.

With embeddings (the ``embed`` enricher's, by sha256), a picture also matches those whose
embedding's cosine similarity to its own reaches ``min_similarity``: crops, borders and
small rotations, which move a perceptual hash too far, keep what the network sees. They
are searched by brute force (one matrix product a batch); the perceptual hash alone still
decides copies that look the same.

What was placed persists in ``.harvest/near-duplicates.sqlite`` of the output, or of a
cluster shard's folder; a registry starts from every such file of the output, so later
runs, on one machine or a cluster, compare against everything stored before.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .near_duplicates_hamming import HammingIndex

STORE_NAME = "near-duplicates.sqlite"
_SIGN = 1 << 63

# (record id, pHash, dHash, pixels, license rank, set aside, the record id it is a copy of,
# sha256 of the file: where its embedding is found, None without)
Row = tuple[str, int, int, int, int, bool, str | None, str | None]


class CopyRegistry:
    """Pictures placed so far; ``place`` decides what a new batch is."""

    def __init__(self):
        self.index = HammingIndex(max_radius=11)
        # n -> [id, phash, dhash, pixels, rank, aside, copy_of, sha256]
        self.rows: dict[int, list] = {}
        self.by_id: dict[str, int] = {}
        self.next_n = 0
        self.vectors = np.zeros((0, 0), dtype=np.float32)  # unit embeddings, a row each
        self.vector_ns = np.zeros(0, dtype=np.int64)  # the picture of each row
        self.vector_count = 0

    @classmethod
    def from_stores(cls, state_dirs: Iterable[Path]) -> CopyRegistry:
        """A registry of every picture the stores among ``state_dirs`` placed, with the
        embeddings the output's embedding stores still hold of them."""
        from harvest.core import OutputEmbeddings

        state_dirs = list(state_dirs)
        registry = cls()
        registry.load(stored_rows(state_dirs))
        shas = {row[7]: n for n, row in registry.rows.items() if row[7]}
        if shas:
            with OutputEmbeddings(state_dirs) as embeddings:
                found = embeddings.vectors(list(shas))
            for sha in sorted(found, key=shas.get):
                registry.add_vector(shas[sha], found[sha])
        return registry

    def __getstate__(self) -> dict:
        """The rows travel (the index is rebuilt from them where they arrive), in the
        order they were placed, and the embeddings."""
        return {"rows": [tuple(self.rows[n]) for n in sorted(self.rows)],
                "vectors": self.vectors[:self.vector_count].copy(),
                "vector_ids": [self.rows[n][0] for n in self.vector_ns[:self.vector_count]]}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.load(state["rows"])
        for record_id, vector in zip(state.get("vector_ids", ()), state.get("vectors", ()),
                                     strict=True):
            self.add_vector(self.by_id[record_id], vector)

    def add_vector(self, n: int, vector) -> None:
        """Keeps picture ``n``'s embedding (made a unit vector)."""
        vector = np.asarray(vector, dtype=np.float32).ravel()
        norm = float(np.linalg.norm(vector))
        if not norm:
            return  # forgotten (a takedown writes zeros)
        if self.vector_count == len(self.vectors) or self.vectors.shape[1] != len(vector):
            if self.vector_count and self.vectors.shape[1] != len(vector):
                return  # another size than the others: not comparable
            grown = np.zeros((max(1024, 2 * len(self.vectors)), len(vector)), dtype=np.float32)
            ns = np.zeros(len(grown), dtype=np.int64)
            if self.vector_count:
                grown[:self.vector_count] = self.vectors[:self.vector_count]
                ns[:self.vector_count] = self.vector_ns[:self.vector_count]
            self.vectors, self.vector_ns = grown, ns
        self.vectors[self.vector_count] = vector / norm
        self.vector_ns[self.vector_count] = n
        self.vector_count += 1

    def similar(self, queries: np.ndarray, min_similarity: float) -> list[list[tuple[int, float]]]:
        """For each unit query, the (picture, cosine similarity) of every stored embedding
        at least ``min_similarity`` alike."""
        found: list[list[tuple[int, float]]] = [[] for _ in range(len(queries))]
        if not len(queries) or not self.vector_count:
            return found
        for start in range(0, self.vector_count, 65_536):  # bounds the (queries x rows) matrix
            block = self.vectors[start:min(self.vector_count, start + 65_536)]
            sims = queries @ block.T
            for row, col in zip(*np.nonzero(sims >= min_similarity), strict=True):
                found[row].append((int(self.vector_ns[start + col]), float(sims[row, col])))
        return found

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, rows: Iterable[Row]) -> None:
        """Adds rows from a store; a picture already known keeps its place, and is set aside
        when any store says so."""
        ns, phashes = [], []
        for record_id, phash, dhash, pixels, rank, aside, *more in rows:
            copy_of, sha = (*more, None, None)[:2]
            known = self.by_id.get(record_id)
            if known is not None:
                row = self.rows[known]
                row[5] = row[5] or bool(aside)
                row[6] = row[6] or copy_of
                row[7] = row[7] or sha
                continue
            n = self.next_n
            self.next_n += 1
            self.rows[n] = [record_id, phash, dhash, pixels, rank, bool(aside), copy_of, sha]
            self.by_id[record_id] = n
            ns.append(n)
            phashes.append(phash)
        self.index.add(np.array(phashes, dtype=np.uint64), np.array(ns, dtype=np.int64))
        self.index.merge()

    def head(self, n: int) -> int | None:
        """The picture kept of ``n``'s group: ``n`` itself, or where its ``copy_of`` chain
        ends. None for a copy whose group is not known (stored by an older harvest)."""
        seen = set()
        while self.rows[n][5]:
            target = self.by_id.get(self.rows[n][6]) if self.rows[n][6] else None
            if target is None or target in seen:
                return None
            seen.add(n)
            n = target
        return n

    def place(self, batch: list[tuple], max_distance: int, max_dhash_distance: int,
              min_similarity: float = 1.0) -> tuple[list[dict], list[Row]]:
        """``batch``: (record id, pHash, dHash, pixels, license rank) per picture, and
        optionally its other views: a list of (name, pHash, dHash) of the picture turned
        (``mirrored``, ``rotated 90``...), by which it also matches copies turned so; then
        optionally its sha256 and its embedding (or None), by which it matches pictures
        whose embeddings are ``min_similarity`` alike (1 or more: not used).
        Returns a decision per picture, ``{"copy_of": id, "distance": d, "view": name or
        None, "similarity": cosine or None}`` or ``{"set_aside": [[id, distance], ...]}``,
        and the rows that changed (to persist)."""
        decisions: list[dict] = []
        changed: list[Row] = []
        if not batch:
            return decisions, changed
        # Every view of every picture: (picture, name, pHash, dHash); the picture as it is
        # first, its name None.
        views = [(i, None, item[1], item[2]) for i, item in enumerate(batch)]
        views += [(i, name, phash, dhash) for i, item in enumerate(batch) if len(item) > 5
                  for name, phash, dhash in item[5] or ()]
        phashes = np.array([view[2] for view in views], dtype=np.uint64)
        # Each candidate with the dHash to check it against (the view's own).
        candidates: list[dict[int, tuple[int, int, str | None]]] = [{} for _ in batch]
        for (i, name, _, dhash), matches in zip(views, self.index.search(phashes, max_distance),
                                                strict=True):
            for n, d in matches:
                if n not in candidates[i] or d < candidates[i][n][0]:
                    candidates[i][n] = (d, dhash, name)
        # The batch against itself, at once (the index only knows what came before it):
        # each view of a picture against the earlier pictures as they are.
        upright = phashes[:len(batch)]
        within = np.bitwise_count(phashes[:, None] ^ upright[None, :])
        # Embeddings: every picture against those stored, and the batch against itself.
        embedded = [i for i, item in enumerate(batch) if len(item) > 7 and item[7] is not None]
        row_of = {i: row for row, i in enumerate(embedded)}
        queries = np.zeros((len(embedded), self.vectors.shape[1] if self.vector_count else
                            len(batch[embedded[0]][7]) if embedded else 0), dtype=np.float32)
        for row, i in enumerate(embedded):
            vector = np.asarray(batch[i][7], dtype=np.float32).ravel()
            if len(vector) == queries.shape[1] and np.linalg.norm(vector):
                queries[row] = vector / np.linalg.norm(vector)
        alike: dict[int, list[tuple[int, float]]] = {}
        batch_sims = np.zeros((0, 0), dtype=np.float32)
        if min_similarity < 1 and embedded:
            alike = dict(zip(embedded, self.similar(queries, min_similarity), strict=True))
            batch_sims = queries @ queries.T
        placed: list[int] = []
        for i, item in enumerate(batch):
            found = candidates[i]
            for v, (picture, name, _, dhash) in enumerate(views):
                if picture != i:
                    continue
                for j in range(i):
                    distance = int(within[v, j])
                    if distance <= max_distance and (placed[j] not in found
                                                     or distance < found[placed[j]][0]):
                        found[placed[j]] = (distance, dhash, name)
            if i in alike:
                # Alike to the network: a copy too, whatever the hashes say (the dHash is
                # not asked: None), unless the hashes found it already.
                row = row_of[i]
                pairs = alike[i] + [(placed[j], float(batch_sims[row, row_of[j]]))
                                    for j in embedded[:row]
                                    if batch_sims[row, row_of[j]] >= min_similarity]
                for n, similarity in pairs:
                    if n not in found and n in self.rows:
                        found[n] = (int(self.rows[n][1] ^ item[1]).bit_count(), None,
                                    round(similarity, 4))
            fresh = item[0] not in self.by_id  # not a batch placed again after a crash
            n, decision, rows = self._place_one(item, found, max_dhash_distance)
            if fresh and i in alike:
                self.add_vector(n, queries[row_of[i]])
            placed.append(n)
            decisions.append(decision)
            changed.extend(rows)
        return decisions, changed

    def _place_one(self, item, found: dict[int, tuple[int, int | None, str | float | None]],
                   max_dhash_distance: int):
        """A picture matches a group when it matches any of its pictures, kept or not; the
        groups it matches become one, keeping the best picture of them and of it (the
        largest, then the best licensed, then the earliest). So the groups a harvest ends
        with do not depend on the order its pictures arrived in."""
        record_id, phash, dhash, pixels, rank = item[:5]
        sha = item[6] if len(item) > 6 else None
        own = self.by_id.get(record_id)  # a batch placed again after a crash
        # head -> (distance, view or similarity) nearest
        groups: dict[int, tuple[int, str | float | None]] = {}
        for n, (distance, compare, view) in found.items():
            if n == own or n not in self.rows:
                continue
            if compare is not None and int(self.rows[n][2] ^ compare).bit_count() \
                    > max_dhash_distance:
                continue
            head = self.head(n)
            if head is None or head == own:
                continue
            if head not in groups or distance < groups[head][0]:
                groups[head] = (distance, view)
        best = max(groups, key=lambda h: (self.rows[h][3], self.rows[h][4], -h), default=None)
        changed: list[Row] = []
        if own is None:
            own = self.next_n
            self.next_n += 1
            self.index.add(np.array([phash], dtype=np.uint64), np.array([own]))
            self.by_id[record_id] = own
        if best is not None and (self.rows[best][3], self.rows[best][4]) >= (pixels, rank):
            kept = best
            how = groups[best][1]
            decision = {"copy_of": self.rows[best][0], "distance": groups[best][0],
                        "view": how if isinstance(how, str) else None,
                        "similarity": how if isinstance(how, float) else None,
                        "set_aside": []}
            self.rows[own] = [record_id, phash, dhash, pixels, rank, True, self.rows[best][0],
                              sha]
        else:
            kept = own
            decision = {"set_aside": []}
            self.rows[own] = [record_id, phash, dhash, pixels, rank, False, None, sha]
        changed.append(tuple(self.rows[own]))
        for head, (distance, _) in sorted(groups.items()):
            if head == kept:
                continue
            # Kept until now; the better picture of the joined group is kept instead.
            self.rows[head][5] = True
            self.rows[head][6] = self.rows[kept][0]
            changed.append(tuple(self.rows[head]))
            decision["set_aside"].append([self.rows[head][0], distance, self.rows[kept][0]])
        return own, decision, changed


class CopyStore:
    """The rows a pipeline placed, in one SQLite file of its state folder."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(state_dir / STORE_NAME, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS hashes (n INTEGER PRIMARY KEY, "
                        "id TEXT UNIQUE NOT NULL, phash INTEGER NOT NULL, dhash INTEGER NOT "
                        "NULL, pixels INTEGER NOT NULL, rank INTEGER NOT NULL, "
                        "set_aside INTEGER NOT NULL DEFAULT 0)")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(hashes)")}
        if "copy_of" not in columns:  # a store of an older harvest
            self.db.execute("ALTER TABLE hashes ADD COLUMN copy_of TEXT")
        if "sha256" not in columns:
            self.db.execute("ALTER TABLE hashes ADD COLUMN sha256 TEXT")
        self.db.commit()

    def save(self, rows: Iterable[Row]) -> None:
        self.db.executemany(
            "INSERT INTO hashes (id, phash, dhash, pixels, rank, set_aside, copy_of, sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "set_aside = MAX(set_aside, excluded.set_aside), "
            "copy_of = coalesce(excluded.copy_of, copy_of), "
            "sha256 = coalesce(excluded.sha256, sha256)",
            [(record_id, _signed(phash), _signed(dhash), pixels, rank, int(aside), copy_of, sha)
             for record_id, phash, dhash, pixels, rank, aside, copy_of, sha in rows])
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def stored_rows(state_dirs: Iterable[Path]) -> Iterable[Row]:
    """Every row of every store among ``state_dirs``, each file in the order it was
    placed."""
    for state_dir in state_dirs:
        path = Path(state_dir) / STORE_NAME
        if not path.is_file():
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(hashes)")}
            copy_of = "copy_of" if "copy_of" in columns else "NULL"
            sha256 = "sha256" if "sha256" in columns else "NULL"
            for record_id, phash, dhash, pixels, rank, aside, group, sha in db.execute(
                    f"SELECT id, phash, dhash, pixels, rank, set_aside, {copy_of}, {sha256} "
                    "FROM hashes ORDER BY n"):
                yield (record_id, _unsigned(phash), _unsigned(dhash), pixels, rank, bool(aside),
                       group, sha)
        finally:
            db.close()


def _signed(value: int) -> int:  # SQLite integers are signed 64-bit
    return value - (1 << 64) if value >= _SIGN else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value
