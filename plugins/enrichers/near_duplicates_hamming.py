"""Finding 64-bit hashes within a Hamming distance of each other without comparing all
pairs: multi-index hashing (Norouzi, Punjani and Fleet, 2012) over numpy arrays.

A 64-bit hash is cut into 3 blocks. If two hashes differ in at most ``r`` bits,
then by the pigeonhole principle at least one block differs in at most ``r // 3`` bits;
sharper (the paper's Proposition 2): with ``r = 3 s + a``, one of the first ``a + 1``
blocks differs in at most ``s`` bits or one of the others in at most ``s - 1``. So a
query only looks, in each block's table, at the keys within that small distance of its
own block, and checks the full distance of those few candidates with a vectorized
popcount. Whole batches of queries go through at
once, so the Python overhead is paid per batch, not per hash, and a batch is cut among
threads (numpy's gathers release the GIL).

What the time goes to is random reads, so the tables are laid out for them: a byte per
bucket says how many hashes it holds (one read answers most probes: empty), and each
block keeps its own copy of the hashes in its bucket order, so a bucket's candidates are
side by side in memory.

New hashes go to a small buffer searched by brute force (vectorized too) and are merged
into the sorted tables when the buffer grows past ``MERGE_AT``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np

# Three blocks of 22, 21 and 21 bits: a query within radius r <= 11 differs in at most
# r // 3 <= 3 bits in some block, so it probes at most 1,794 keys per block (direct
# addressing: a key's bucket is one read in an offsets table), and at a million hashes a
# bucket holds a quarter to a half of a hash on average, so few candidates need the full
# check.
WIDTHS = (22, 21, 21)
SHIFTS = (0, 22, 43)
MERGE_AT = 32_768
THREAD_CHUNK = 128  # queries per thread task: its probes stay in the CPU's caches
_POOL = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="hamming")


def _masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit value with at most ``radius`` bits set."""
    values = [0]
    for count in range(1, radius + 1):
        values += [sum(1 << bit for bit in bits) for bits in combinations(range(width), count)]
    return np.array(values, dtype=np.uint32)


class HammingIndex:
    """``add(hashes, ids)`` and ``search(queries, radius) -> [[(id, distance)...]...]``;
    hashes are unsigned 64-bit integers, ids non-negative integers."""

    def __init__(self, max_radius: int = 11):
        if max_radius > 11:
            raise ValueError("max_radius is at most 11 (three blocks, at most 3 bits each)")
        self.max_radius = max_radius
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.ids = np.zeros(0, dtype=np.int64)
        self.offsets: list[np.ndarray] = []  # per block: bucket starts, 2**width + 1
        self.counts: list[np.ndarray] = []  # per block: hashes per bucket, as few bytes as fit
        self.members: list[np.ndarray] = []  # per block: positions, grouped by bucket
        self.block_hashes: list[np.ndarray] = []  # per block: the hashes in that order
        self.recent_hashes: list[np.ndarray] = []
        self.recent_ids: list[np.ndarray] = []
        self.recent_count = 0
        self.masks = {(width, r): _masks(width, r) for width in set(WIDTHS)
                      for r in range(max_radius // 3 + 1)}

    def __len__(self) -> int:
        return len(self.hashes) + self.recent_count

    def nbytes(self) -> int:
        tables = self.offsets + self.counts + self.members + self.block_hashes
        return (self.hashes.nbytes + self.ids.nbytes + sum(t.nbytes for t in tables)
                + sum(h.nbytes + i.nbytes for h, i in zip(self.recent_hashes, self.recent_ids,
                                                          strict=True)))

    def add(self, hashes, ids) -> None:
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not len(hashes):
            return
        self.recent_hashes.append(hashes)
        self.recent_ids.append(np.asarray(ids, dtype=np.int64))
        self.recent_count += len(hashes)
        if self.recent_count >= MERGE_AT:
            self.merge()

    def merge(self) -> None:
        if not self.recent_count:
            return
        self.hashes = np.concatenate([self.hashes, *self.recent_hashes])
        self.ids = np.concatenate([self.ids, *self.recent_ids])
        self.recent_hashes, self.recent_ids, self.recent_count = [], [], 0
        self.offsets, self.counts, self.members, self.block_hashes = [], [], [], []
        for width, shift in zip(WIDTHS, SHIFTS, strict=True):
            keys = self._keys(self.hashes, width, shift)
            members = np.argsort(keys, kind="stable").astype(np.int32)
            counts = np.bincount(keys, minlength=1 << width)
            offsets = np.zeros((1 << width) + 1, dtype=np.int32)
            np.cumsum(counts, out=offsets[1:])
            most = int(counts.max())
            self.counts.append(counts.astype(np.uint8 if most < 256 else
                                             np.uint16 if most < 65536 else np.int32))
            self.offsets.append(offsets)
            self.members.append(members)
            self.block_hashes.append(self.hashes[members])

    @staticmethod
    def _keys(hashes: np.ndarray, width: int, shift: int) -> np.ndarray:
        return ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)

    def search(self, queries, radius: int) -> list[list[tuple[int, int]]]:
        """For each query, the (id, distance) of every stored hash within ``radius``,
        nearest first."""
        if radius > self.max_radius:
            raise ValueError(f"radius {radius} > the index's max_radius {self.max_radius}")
        queries = np.asarray(queries, dtype=np.uint64)
        found: list[set[tuple[int, int]]] = [set() for _ in range(len(queries))]
        if len(queries) and len(self.hashes):
            chunks = range(0, len(queries), THREAD_CHUNK)
            for start, (rows, positions, distances) in zip(chunks, _POOL.map(
                    lambda start: self._search_tables(queries[start:start + THREAD_CHUNK],
                                                      radius), chunks), strict=True):
                for row, position, distance in zip(rows.tolist(), positions.tolist(),
                                                   distances.tolist(), strict=True):
                    found[start + row].add((int(self.ids[position]), int(distance)))
        if len(queries) and self.recent_count:
            hashes = np.concatenate(self.recent_hashes)
            ids = np.concatenate(self.recent_ids)
            for chunk in range(0, len(queries), 256):  # bounds the (queries x recent) matrix
                part = queries[chunk:chunk + 256]
                distances = np.bitwise_count(part[:, None] ^ hashes[None, :])
                rows, cols = np.nonzero(distances <= radius)
                for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
                    found[chunk + row].add((int(ids[col]), int(distances[row, col])))
        return [sorted(matches, key=lambda match: (match[1], match[0])) for matches in found]

    def _search_tables(self, queries: np.ndarray, radius: int):
        """(query rows, positions in ``hashes``, distances) of the matches in the tables."""
        whole, extra = divmod(radius, len(WIDTHS))
        rows_found, positions_found, distances_found = [], [], []
        for block, (width, shift) in enumerate(zip(WIDTHS, SHIFTS, strict=True)):
            block_radius = whole if block <= extra else whole - 1
            if block_radius < 0:
                continue
            masks = self.masks[(width, block_radius)]
            probes = (self._keys(queries, width, shift).astype(np.uint32)[:, None]
                      ^ masks[None, :]).ravel()
            counts = self.counts[block][probes]
            hit = np.flatnonzero(counts)
            if not len(hit):
                continue
            counts = counts[hit].astype(np.int64)
            low = self.offsets[block][probes[hit]]
            query_of = hit // len(masks)
            total = int(counts.sum())
            if total == len(counts):  # one hash in every bucket hit: the usual case
                slots, rows = low, query_of
            else:  # each bucket's [low, low + count) expanded into slots, vectorized
                slots = (np.repeat(low - np.cumsum(counts) + counts, counts)
                         + np.arange(total))
                rows = np.repeat(query_of, counts)
            distances = np.bitwise_count(queries[rows] ^ self.block_hashes[block][slots])
            close = np.flatnonzero(distances <= radius)
            rows_found.append(rows[close])
            positions_found.append(self.members[block][slots[close]])
            distances_found.append(distances[close])
        if not rows_found:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        return (np.concatenate(rows_found), np.concatenate(positions_found),
                np.concatenate(distances_found))
