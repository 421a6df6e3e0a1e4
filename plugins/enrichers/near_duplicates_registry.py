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

# (record id, pHash, dHash, pixels, license rank, set aside, the record id it is a copy of)
Row = tuple[str, int, int, int, int, bool, str | None]


class CopyRegistry:
    """Pictures placed so far; ``place`` decides what a new batch is."""

    def __init__(self):
        self.index = HammingIndex(max_radius=11)
        self.rows: dict[int, list] = {}  # n -> [id, phash, dhash, pixels, rank, aside, copy_of]
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
        for record_id, phash, dhash, pixels, rank, aside, *copy_of in rows:
            copy_of = copy_of[0] if copy_of else None
            known = self.by_id.get(record_id)
            if known is not None:
                row = self.rows[known]
                row[5] = row[5] or bool(aside)
                row[6] = row[6] or copy_of
                continue
            n = self.next_n
            self.next_n += 1
            self.rows[n] = [record_id, phash, dhash, pixels, rank, bool(aside), copy_of]
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
        """A picture matches a group when it matches any of its pictures, kept or not; the
        groups it matches become one, keeping the best picture of them and of it (the
        largest, then the best licensed, then the earliest). So the groups a harvest ends
        with do not depend on the order its pictures arrived in."""
        record_id, phash, dhash, pixels, rank = item[:5]
        own = self.by_id.get(record_id)  # a batch placed again after a crash
        groups: dict[int, tuple[int, str | None]] = {}  # head -> (distance, view) nearest
        for n, (distance, compare, view) in found.items():
            if n == own or n not in self.rows:
                continue
            if int(self.rows[n][2] ^ compare).bit_count() > max_dhash_distance:
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
            decision = {"copy_of": self.rows[best][0], "distance": groups[best][0],
                        "view": groups[best][1], "set_aside": []}
            self.rows[own] = [record_id, phash, dhash, pixels, rank, True, self.rows[best][0]]
        else:
            kept = own
            decision = {"set_aside": []}
            self.rows[own] = [record_id, phash, dhash, pixels, rank, False, None]
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
        self.db.commit()

    def save(self, rows: Iterable[Row]) -> None:
        self.db.executemany(
            "INSERT INTO hashes (id, phash, dhash, pixels, rank, set_aside, copy_of) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "set_aside = MAX(set_aside, excluded.set_aside), "
            "copy_of = coalesce(excluded.copy_of, copy_of)",
            [(record_id, _signed(phash), _signed(dhash), pixels, rank, int(aside), copy_of)
             for record_id, phash, dhash, pixels, rank, aside, copy_of in rows])
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
            for record_id, phash, dhash, pixels, rank, aside, group in db.execute(
                    f"SELECT id, phash, dhash, pixels, rank, set_aside, {copy_of} FROM hashes "
                    "ORDER BY n"):
                yield (record_id, _unsigned(phash), _unsigned(dhash), pixels, rank, bool(aside),
                       group)
        finally:
            db.close()


def _signed(value: int) -> int:  # SQLite integers are signed 64-bit
    return value - (1 << 64) if value >= _SIGN else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value
