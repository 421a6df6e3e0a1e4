"""Shards: the pieces a recipe's work splits into, and what a pipeline asks of the others.

A shard is one source asked one query (one wording of one term), or one partition of
it; shards never overlap, so each can run the normal pipeline on its own. On one
machine a single pipeline runs every shard and the :class:`Coordinator` has nobody to
ask; on a cluster each shard runs where the engine puts it and the coordinator asks
the scheduler (``harvest.core.cluster.scheduler``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..download.http import TokenBuckets
from ..record import FileClaimAnswer

SHARDS_DIR = Path(".harvest") / "shards"  # in an output: each cluster shard's own folder


def state_dirs(output: Path) -> list[Path]:
    """Every run-state folder of an output: its own, then each cluster shard's."""
    shards = sorted(path for path in (output / SHARDS_DIR).glob("*/.harvest") if path.is_dir())
    return [output / ".harvest", *shards]


@dataclass(frozen=True)
class Shard:
    """One source (by its recipe label), one query or partition, and its record limit."""

    source: str
    term: str | None
    lang: str | None
    text: str | None
    part: Any = None  # JSON-safe, as the source's ``partitions`` gave it
    limit: int | None = None
    order: int = 0  # position in the single-machine order, which the merge follows

    @property
    def key(self) -> str:
        """Stable across runs of the same plan: names the shard's folder."""
        identity = json.dumps([self.source, self.term, self.lang, self.text, self.part],
                              ensure_ascii=False, sort_keys=True, default=str)
        digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:16]
        return f"{_slug(self.source)}-{digest}"

    def describe(self) -> str:
        text = f"{self.source}"
        if self.text is not None:
            text += f" {self.text!r} ({self.lang})"
        if self.part is not None:
            text += f" part {json.dumps(self.part, sort_keys=True, default=str)}"
        return text


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)[:40]


class Coordinator:
    """What one pipeline asks of the pipelines running beside it.

    Alone, every record and every file is its own and rate limits are this process's.
    The cluster's coordinator answers the same questions for every worker at once.
    """

    def __init__(self):
        self._buckets = TokenBuckets()
        self._copies = None
        self._copies_lock = threading.Lock()  # a batch is placed whole, one at a time

    def reserve(self, key: str, rate: float, burst: float = 1.0) -> float:
        """Takes a token from bucket ``key``; returns the seconds to wait before using it."""
        return self._buckets.reserve(key, rate, burst)

    def claim_records(self, record_ids: list[str]) -> set[str]:
        """Claims ids for this pipeline; returns those another pipeline holds already."""
        return set()

    def claim_file(self, sha256: str, record_id: str, relpath: str) -> FileClaimAnswer:
        """Claims content and its path for ``record_id``."""
        return FileClaimAnswer()

    def report(self, counts: list) -> bool:
        """Progress for the client to show; True when the client asks the run to stop."""
        return False

    def place_copies(self, state_dirs: list[Path], batch: list, max_distance: int,
                     max_dhash_distance: int) -> list[dict]:
        """Decides which pictures of ``batch`` are near-duplicates of pictures placed before
        (see ``copies.CopyRegistry.place``), against every picture of the output. The
        registry starts from the stores in ``state_dirs``; the rows that changed go to the
        first of them."""
        from ..cleaning.copies import CopyRegistry, CopyStore, stored_rows

        with self._copies_lock:
            if self._copies is None:
                registry = CopyRegistry()
                registry.load(stored_rows(state_dirs))
                self._copies = (registry, CopyStore(state_dirs[0]))
            registry, store = self._copies
            decisions, changed = registry.place(batch, max_distance, max_dhash_distance)
            store.save(changed)
        return decisions

    def close(self) -> None:
        if self._copies is not None:
            self._copies[1].close()
            self._copies = None
