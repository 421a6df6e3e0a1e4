"""``near_duplicates``: the same picture resized, re-encoded, lightly cropped or brightened
by another site is found by its perceptual hashes, across sources, terms and runs.

Each stored image gets a pHash and a dHash (64 bits each, via ``imagehash``, from a small
decode: JPEGs are read at 1/8 scale, which is all a 32x32 hash needs). Two images are
near-duplicates when their pHashes differ in at most ``max_distance`` bits and their
dHashes in at most ``max_dhash_distance`` (two views of the picture must agree, which keeps
distinct pictures of similar colours apart). The hashes live in the output folder
(``.harvest/near-duplicates.sqlite``), so later runs compare against earlier ones, and in
memory in a multi-index (core's ``HammingIndex``) that never compares all pairs.

Which copy is kept: the largest (width x height), then the one with the most reusable
license (public domain, then CC BY, CC BY-SA, other licenses, unknown), then the earliest.
A copy found later is marked (``near_duplicate_of``, ``near_duplicate_distance``) or, with
``action: drop``, dropped. When the later copy is the better one, it is kept, and the
earlier one (already stored) is set aside: ``harvest export`` leaves it out.
"""

from __future__ import annotations

import sqlite3
import threading

import numpy as np

from harvest.core import (
    Choice,
    Enricher,
    HammingIndex,
    Int,
    Option,
    Record,
    hookimpl,
    inside,
    set_aside,
)

LICENSE_RANK = (("CC0", 5), ("PDM", 5), ("CC-BY-SA", 3), ("CC-BY-ND", 2), ("CC-BY-NC", 2),
                ("CC-BY", 4))
_SIGN = 1 << 63


def license_rank(license_id: str | None) -> int:
    if not license_id:
        return 0
    for prefix, rank in LICENSE_RANK:
        if license_id.upper().startswith(prefix):
            return rank
    return 1


def perceptual_hashes(path) -> tuple[int, int]:
    """(pHash, dHash) of an image file as unsigned 64-bit integers."""
    import imagehash
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("L", (64, 64))
        image.load()
        grey = image.convert("L")
    return (int(str(imagehash.phash(grey)), 16), int(str(imagehash.dhash(grey)), 16))


def _signed(value: int) -> int:  # SQLite integers are signed 64-bit
    return value - (1 << 64) if value >= _SIGN else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


class NearDuplicateEnricher(Enricher):
    """Marks or drops near-duplicate pictures (perceptual hashes), across runs."""

    options = (
        Option("max_distance", Int(0, 11), 10,
               help="most pHash bits (of 64) two copies may differ in"),
        Option("max_dhash_distance", Int(0, 64), 14,
               help="most dHash bits two copies may differ in (a second opinion)"),
        Option("action", Choice("mark", "drop"), "mark",
               help="mark later copies (near_duplicate_of) or drop them"),
    )

    def open(self) -> None:
        self.context.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.context.state_dir / "near-duplicates.sqlite",
                                  check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS hashes (n INTEGER PRIMARY KEY, "
                        "id TEXT UNIQUE NOT NULL, phash INTEGER NOT NULL, dhash INTEGER NOT "
                        "NULL, pixels INTEGER NOT NULL, rank INTEGER NOT NULL, "
                        "set_aside INTEGER NOT NULL DEFAULT 0)")
        self.lock = threading.Lock()
        self.index = HammingIndex(max_radius=11)
        self.rows: dict[int, tuple] = {}  # n -> (id, dhash, pixels, rank, set_aside)
        self.by_id: dict[str, int] = {}
        ns, phashes = [], []
        for n, record_id, phash, dhash, pixels, rank, aside in self.db.execute(
                "SELECT n, id, phash, dhash, pixels, rank, set_aside FROM hashes ORDER BY n"):
            self.rows[n] = (record_id, _unsigned(dhash), pixels, rank, aside)
            self.by_id[record_id] = n
            ns.append(n)
            phashes.append(_unsigned(phash))
        self.index.add(np.array(phashes, dtype=np.uint64), np.array(ns, dtype=np.int64))
        self.index.merge()
        self.next_n = (max(ns) + 1) if ns else 0

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()

    def enrich(self, records: list[Record]) -> None:
        output = self.context.output_dir.resolve()
        work = []
        for record in records:
            if record.file is None or record.duplicate_of:
                continue  # an exact copy: its original carries the hashes
            phash, dhash = perceptual_hashes(inside(output, record.file.path))
            record.fields["phash"], record.fields["dhash"] = f"{phash:016x}", f"{dhash:016x}"
            work.append((record, phash, dhash))
        if not work:
            return
        radius = self.config["max_distance"]
        phashes = np.array([w[1] for w in work], dtype=np.uint64)
        # The batch against what came before it, and against itself, at once.
        within = np.bitwise_count(phashes[:, None] ^ phashes[None, :])
        with self.lock:
            found = self.index.search(phashes, radius)
            placed: list[int] = []
            for i, ((record, phash, dhash), matches) in enumerate(zip(work, found, strict=True)):
                earlier = [(placed[j], int(within[i, j])) for j in range(i)
                           if within[i, j] <= radius and placed[j] not in dict(matches)]
                placed.append(self._place(record, phash, dhash, matches + earlier))
            self.db.commit()

    def _place(self, record: Record, phash: int, dhash: int, matches) -> int:
        pixels = record.file.width * record.file.height
        rank = license_rank(record.fields.get("license"))
        own = self.by_id.get(record.id)  # a batch enriched again after a crash
        copies = [(n, distance) for n, distance in matches
                  if n != own and n in self.rows and not self.rows[n][4]
                  and int(self.rows[n][1] ^ dhash).bit_count()
                  <= self.config["max_dhash_distance"]]
        best = max(copies, key=lambda c: (self.rows[c[0]][2], self.rows[c[0]][3], -c[0]),
                   default=None)
        aside = 0
        if best is not None and (self.rows[best[0]][2], self.rows[best[0]][3]) >= (pixels, rank):
            first_id = self.rows[best[0]][0]
            record.fields["near_duplicate_of"] = first_id
            record.fields["near_duplicate_distance"] = best[1]
            aside = 1
            if self.config["action"] == "drop":
                record.drop(f"near duplicate of {first_id} (distance {best[1]})")
        else:
            for n, distance in copies:  # this copy is better: the earlier ones step aside
                earlier_id = self.rows[n][0]
                self.rows[n] = (*self.rows[n][:4], 1)
                self.db.execute("UPDATE hashes SET set_aside = 1 WHERE n = ?", (n,))
                set_aside(self.context.output_dir, earlier_id,
                          f"near duplicate of {record.id} (distance {distance}), which is "
                          f"larger or better licensed", self.context.name)
        if own is None:
            own = self.next_n
            self.next_n += 1
            self.index.add(np.array([phash], dtype=np.uint64), np.array([own]))
        self.rows[own] = (record.id, dhash, pixels, rank, aside)
        self.by_id[record.id] = own
        self.db.execute("INSERT OR REPLACE INTO hashes (n, id, phash, dhash, pixels, rank, "
                        "set_aside) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (own, record.id, _signed(phash), _signed(dhash), pixels, rank, aside))
        return own


@hookimpl
def harvest_enrichers():
    return {"near_duplicates": NearDuplicateEnricher}
