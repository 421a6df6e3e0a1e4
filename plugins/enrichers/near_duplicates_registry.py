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

# (record id, pHash, dHash, pixels, license rank, set aside)
Row = tuple[str, int, int, int, int, bool]


class CopyRegistry:
    """Pictures placed so far; ``place`` decides what a new batch is."""

    def __init__(self):
        self.index = HammingIndex(max_radius=11)
        self.rows: dict[int, list] = {}  # n -> [id, phash, dhash, pixels, rank, aside]
        self.by_id: dict[str, int] = {}
        self.next_n = 0

    @classmethod
    def from_stores(cls, state_dirs: Iterable[Path]) -> CopyRegistry:
        """A registry of every picture the stores among ``state_dirs`` placed."""
        registry = cls()
        registry.load(stored_rows(state_dirs))
        return registry

    def __getstate__(self) -> dict:
        """Only the rows travel (the index is rebuilt from them where they arrive), in the
        order they were placed."""
        return {"rows": [tuple(self.rows[n]) for n in sorted(self.rows)]}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.load(state["rows"])

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, rows: Iterable[Row]) -> None:
        """Adds rows from a store; a picture already known keeps its place, and is set aside
        when any store says so."""
        ns, phashes = [], []
        for record_id, phash, dhash, pixels, rank, aside in rows:
            known = self.by_id.get(record_id)
            if known is not None:
                self.rows[known][5] = self.rows[known][5] or bool(aside)
                continue
            n = self.next_n
            self.next_n += 1
            self.rows[n] = [record_id, phash, dhash, pixels, rank, bool(aside)]
            self.by_id[record_id] = n
            ns.append(n)
            phashes.append(phash)
        self.index.add(np.array(phashes, dtype=np.uint64), np.array(ns, dtype=np.int64))
        self.index.merge()

    def place(self, batch: list[tuple], max_distance: int,
              max_dhash_distance: int) -> tuple[list[dict], list[Row]]:
        """``batch``: (record id, pHash, dHash, pixels, license rank) per picture, and
        optionally its other views: a list of (name, pHash, dHash) of the picture turned
        (``mirrored``, ``rotated 90``...), by which it also matches copies turned so.
        Returns a decision per picture, ``{"copy_of": id, "distance": d, "view": name or
        None}`` or ``{"set_aside": [[id, distance], ...]}``, and the rows that changed (to
        persist)."""
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
            n, decision, rows = self._place_one(item, found, max_dhash_distance)
            placed.append(n)
            decisions.append(decision)
            changed.extend(rows)
        return decisions, changed

    def _place_one(self, item, found: dict[int, tuple[int, int, str | None]],
                   max_dhash_distance: int):
        record_id, phash, dhash, pixels, rank = item[:5]
        own = self.by_id.get(record_id)  # a batch placed again after a crash
        copies = [(n, distance, view) for n, (distance, compare, view) in found.items()
                  if n != own and n in self.rows and not self.rows[n][5]
                  and int(self.rows[n][2] ^ compare).bit_count() <= max_dhash_distance]
        best = max(copies, key=lambda c: (self.rows[c[0]][3], self.rows[c[0]][4], -c[0]),
                   default=None)
        changed: list[Row] = []
        if best is not None and (self.rows[best[0]][3], self.rows[best[0]][4]) >= (pixels, rank):
            decision = {"copy_of": self.rows[best[0]][0], "distance": best[1],
                        "view": best[2]}
            aside = True
        else:
            decision = {"set_aside": []}
            aside = False
            for n, distance, _ in sorted(copies):  # this copy is better: the earlier step aside
                self.rows[n][5] = True
                changed.append(tuple(self.rows[n]))
                decision["set_aside"].append([self.rows[n][0], distance])
        if own is None:
            own = self.next_n
            self.next_n += 1
            self.index.add(np.array([phash], dtype=np.uint64), np.array([own]))
            self.by_id[record_id] = own
        self.rows[own] = [record_id, phash, dhash, pixels, rank, aside]
        changed.append(tuple(self.rows[own]))
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

    def save(self, rows: Iterable[Row]) -> None:
        self.db.executemany(
            "INSERT INTO hashes (id, phash, dhash, pixels, rank, set_aside) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "set_aside = MAX(set_aside, excluded.set_aside)",
            [(record_id, _signed(phash), _signed(dhash), pixels, rank, int(aside))
             for record_id, phash, dhash, pixels, rank, aside in rows])
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
            for record_id, phash, dhash, pixels, rank, aside in db.execute(
                    "SELECT id, phash, dhash, pixels, rank, set_aside FROM hashes ORDER BY n"):
                yield record_id, _unsigned(phash), _unsigned(dhash), pixels, rank, bool(aside)
        finally:
            db.close()


def _signed(value: int) -> int:  # SQLite integers are signed 64-bit
    return value - (1 << 64) if value >= _SIGN else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value
