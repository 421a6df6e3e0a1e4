"""Finding 64-bit hashes within a Hamming distance of each other without comparing all
pairs: multi-index hashing (Norouzi, Punjani and Fleet, 2012) over numpy arrays.

A 64-bit hash is cut into 3 blocks. If two hashes differ in at most ``r`` bits,
then by the pigeonhole principle at least one block differs in at most ``r // 3`` bits.
So a query only looks, in each block's table, at the keys within that small
distance of its own block, and checks the full distance of
those few candidates with a vectorized popcount. Whole batches of queries go through at
once, so the Python overhead is paid per batch, not per hash.

New hashes go to a small buffer searched by brute force (vectorized too) and are merged
into the sorted tables when the buffer grows past ``MERGE_AT``.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

# Three blocks of 22, 21 and 21 bits: a query within radius r <= 11 differs in at most
# r // 3 <= 3 bits in some block, so it probes 1,794 keys per block (direct addressing: a
# key's bucket is one read in an offsets table), and at a million hashes a bucket holds
# a quarter of a hash on average, so few candidates need the full check.
WIDTHS = (22, 21, 21)
SHIFTS = (0, 22, 43)
MERGE_AT = 32_768


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
        self.members: list[np.ndarray] = []  # per block: positions, grouped by bucket
        # per block: one bit per bucket, set when it holds a hash: 512 KB, so that most
        # probes (empty buckets) are answered from the CPU's cache
        self.occupied: list[np.ndarray] = []
        self.recent_hashes: list[np.ndarray] = []
        self.recent_ids: list[np.ndarray] = []
        self.recent_count = 0
        self.masks = {(width, r): _masks(width, r) for width in set(WIDTHS)
                      for r in range(max_radius // 3 + 1)}

    def __len__(self) -> int:
        return len(self.hashes) + self.recent_count

    def nbytes(self) -> int:
        return (self.hashes.nbytes + self.ids.nbytes + sum(o.nbytes for o in self.offsets)
                + sum(b.nbytes for b in self.occupied)
                + sum(m.nbytes for m in self.members)
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
        self.offsets, self.members, self.occupied = [], [], []
        for width, shift in zip(WIDTHS, SHIFTS, strict=True):
            keys = self._keys(self.hashes, width, shift)
            self.members.append(np.argsort(keys, kind="stable").astype(np.int32))
            counts = np.bincount(keys, minlength=1 << width)
            offsets = np.zeros((1 << width) + 1, dtype=np.int32)
            np.cumsum(counts, out=offsets[1:])
            self.offsets.append(offsets)
            self.occupied.append(np.packbits(counts > 0, bitorder="little"))

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
            self._search_tables(queries, radius, found)
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

    def _search_tables(self, queries: np.ndarray, radius: int, found: list) -> None:
        for block, (width, shift) in enumerate(zip(WIDTHS, SHIFTS, strict=True)):
            masks = self.masks[(width, radius // 3)]
            probes = (self._keys(queries, width, shift)[:, None] ^ masks[None, :]).ravel()
            bits = self.occupied[block][probes >> 3] >> (probes & 7).astype(np.uint8)
            hit = np.flatnonzero(bits & 1)
            if not len(hit):
                continue
            offsets = self.offsets[block]
            probes = probes[hit]
            low = offsets[probes]
            counts = offsets[probes + 1] - low
            query_of = hit // len(masks)
            # Each bucket's [low, low + count) expanded into positions, vectorized.
            starts = np.repeat(low - np.cumsum(counts) + counts, counts)
            positions = self.members[block][starts + np.arange(int(counts.sum()))]
            rows = np.repeat(query_of, counts)
            distances = np.bitwise_count(queries[rows] ^ self.hashes[positions])
            close = distances <= radius
            for row, position, distance in zip(rows[close].tolist(), positions[close].tolist(),
                                               distances[close].tolist(), strict=True):
                found[row].add((int(self.ids[position]), int(distance)))
