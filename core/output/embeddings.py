"""Pictures' embeddings, by sha256, in the output's state: what an embedding enricher
(``embed``) writes and what ``harvest train`` and ``harvest export --embeddings`` read.

An output's embeddings are one file of float16 rows (``embeddings-<dims>.f16``) and an
index (``embeddings.sqlite``: sha256 -> row), so that a million pictures take one
sequential file that is read a slice at a time, never all in memory.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import numpy as np

from ..errors import PluginConfigError

FEATURES = 1280  # EfficientNet-Lite0's pooled features: the width a projection starts from


def projection(dims: int) -> np.ndarray | None:
    """(dims, 1280) orthonormal rows, from arithmetic alone: the DCT-II basis at evenly
    spread frequencies, after a sign per feature drawn from sha256. None for 1280."""
    if dims >= FEATURES:
        return None
    signs = np.array([1.0 if hashlib.sha256(b"harvest-embed-%d" % i).digest()[0] & 1 else -1.0
                      for i in range(FEATURES)])
    frequencies = np.floor(np.arange(dims) * FEATURES / dims)
    n = np.arange(FEATURES)
    basis = np.cos(np.pi / FEATURES * (n[None, :] + 0.5) * frequencies[:, None])
    basis *= np.sqrt(2.0 / FEATURES)
    basis[frequencies == 0] /= np.sqrt(2.0)
    return (basis * signs[None, :]).astype(np.float32)


class EmbeddingStore:
    """Pictures' embeddings by sha256, appended to one file of float16 rows. A row is
    written and synced before the index names it; rows a crash left unnamed are written
    over by the next ``add``."""

    def __init__(self, folder: Path, dims: int | None = None):
        """``dims`` None: the store already there (FileNotFoundError if there is none)."""
        if dims is None and not (folder / "embeddings.sqlite").is_file():
            raise FileNotFoundError(f"{folder}: no embeddings here")
        folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(folder / "embeddings.sqlite", timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS rows (sha256 BLOB PRIMARY KEY, "
                        "row INTEGER NOT NULL) WITHOUT ROWID")
        known = self.db.execute("SELECT value FROM meta WHERE key = 'dims'").fetchone()
        if known is None and dims is None:
            raise FileNotFoundError(f"{folder}: no embeddings here")
        if known is None:
            with self.db:
                self.db.execute("INSERT INTO meta VALUES ('dims', ?)", (str(dims),))
            known = (str(dims),)
        self.dims = int(known[0])
        if dims is not None and dims != self.dims:
            raise PluginConfigError(f"{folder / 'embeddings.sqlite'}: this output's embeddings "
                                    f"have {self.dims} dimensions, not {dims}")
        self.path = folder / f"embeddings-{self.dims}.f16"
        self.row_bytes = self.dims * 2
        self.projection = projection(self.dims)

    def close(self) -> None:
        self.db.close()

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM rows").fetchone()[0]

    def known(self, shas: list[str]) -> set[str]:
        found: set[str] = set()
        shas = [sha for sha in shas if _is_sha256(sha)]
        for start in range(0, len(shas), 500):
            chunk = [bytes.fromhex(sha) for sha in shas[start:start + 500]]
            marks = ",".join("?" * len(chunk))
            found |= {row[0].hex() for row in self.db.execute(
                f"SELECT sha256 FROM rows WHERE sha256 IN ({marks})", chunk)}
        return found

    def reduce(self, features: np.ndarray) -> np.ndarray:
        if self.projection is None:
            return features.astype(np.float16)
        return (features @ self.projection.T).astype(np.float16)

    def add(self, features: dict[str, np.ndarray]) -> None:
        """Stores the features of pictures not stored yet."""
        new = sorted(set(features) - self.known(list(features)))
        if not new:
            return
        rows = self.reduce(np.stack([features[sha] for sha in new]))
        with open(self.path, "ab") as handle:
            # Rows past the last one the index names were written by a run that crashed
            # before naming them (whole or cut short): written over, so that no
            # picture's embedding stays in the file unnamed, where a takedown cannot
            # find it.
            named = self.db.execute("SELECT max(row) FROM rows").fetchone()[0]
            size = 0 if named is None else (named + 1) * self.row_bytes
            if handle.seek(0, os.SEEK_END) != size:
                handle.truncate(size)
            first = size // self.row_bytes
            handle.write(rows.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO rows VALUES (?, ?)",
                                [(bytes.fromhex(sha), first + i) for i, sha in enumerate(new)])

    def forget(self, shas: set[str]) -> int:
        """A takedown's or purge's: the pictures' rows are overwritten with zeros (synced)
        before the index forgets them, so nothing derived from them stays. Done again
        after a crash, it finishes."""
        rows: list[tuple[bytes, int]] = []
        keys = [bytes.fromhex(sha) for sha in shas if _is_sha256(sha)]
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.db.execute(f"SELECT sha256, row FROM rows WHERE sha256 IN ({marks})",
                                    chunk).fetchall()
        if not rows:
            return 0
        blank = bytes(self.row_bytes)
        with open(self.path, "r+b") as handle:
            for _, row in rows:
                handle.seek(row * self.row_bytes)
                handle.write(blank)
            handle.flush()
            os.fsync(handle.fileno())
        with self.db:
            self.db.executemany("DELETE FROM rows WHERE sha256 = ?", [(sha,) for sha, _ in rows])
        return len(rows)

    def vectors(self, shas: list[str]) -> dict[str, np.ndarray]:
        """The stored embeddings (float32) of these pictures, by sha256."""
        rows: dict[str, int] = {}
        shas = [sha for sha in shas if _is_sha256(sha)]  # a hand-edited record: no row
        for start in range(0, len(shas), 500):
            chunk = [bytes.fromhex(sha) for sha in shas[start:start + 500]]
            marks = ",".join("?" * len(chunk))
            rows.update((sha.hex(), row) for sha, row in self.db.execute(
                f"SELECT sha256, row FROM rows WHERE sha256 IN ({marks})", chunk))
        if not rows:
            return {}
        # Read row by row, not mapped: a mapping would keep every page it touched resident
        # in this process, which for a whole-output pass is the whole file.
        found = {}
        with open(self.path, "rb") as handle:
            for sha, row in sorted(rows.items(), key=lambda item: item[1]):
                data = os.pread(handle.fileno(), self.row_bytes, row * self.row_bytes)
                found[sha] = np.frombuffer(data, dtype=np.float16).astype(np.float32)
        return found


def _is_sha256(text) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class OutputEmbeddings:
    """Every embedding store among an output's state folders (its own, each cluster
    shard's), read as one; a ``with`` block closes them."""

    def __init__(self, state_dirs: list[Path]):
        from ..errors import UsageError

        self.stores: list[EmbeddingStore] = []
        for folder in state_dirs:
            try:
                self.stores.append(EmbeddingStore(folder))
            except FileNotFoundError:
                continue
        if len({store.dims for store in self.stores}) > 1:
            self.close()
            raise UsageError(f"{state_dirs[0].parent}: embeddings of different sizes in one "
                             "output")
        self.dims = self.stores[0].dims if self.stores else None

    def __enter__(self) -> "OutputEmbeddings":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def known(self, shas: list[str]) -> set[str]:
        found: set[str] = set()
        for store in self.stores:
            found |= store.known([sha for sha in shas if sha not in found])
        return found

    def vectors(self, shas: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for store in self.stores:
            found.update(store.vectors([sha for sha in shas if sha not in found]))
        return found

    def forget(self, shas: set[str]) -> int:
        return sum(store.forget(shas) for store in self.stores)


def forget_embeddings(state_dirs: list[Path], shas: set[str]) -> int:
    """Forgets these pictures in every embedding store of an output."""
    with OutputEmbeddings(state_dirs) as embeddings:
        return embeddings.forget(shas)
