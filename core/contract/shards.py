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
from collections.abc import Callable
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

    Alone, every record and every file is its own, rate limits are this process's and
    shared services are objects in it. The cluster's coordinator answers the same
    questions for every worker at once.
    """

    def __init__(self):
        self._buckets = TokenBuckets()
        self._services: dict[str, Any] = {}
        self._services_lock = threading.Lock()  # one call at a time, as on a scheduler

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

    def service(self, name: str, factory: Callable[[list[Path]], Any],
                state_dirs: list[Path]) -> None:
        """Makes sure the shared service ``name`` exists: one object every pipeline of the
        run calls (``call``), one call at a time. Unless another pipeline made it already,
        ``factory(state_dirs)`` makes it, from what earlier runs left in those state
        folders. Alone, it lives in this process; on a cluster, on the scheduler, so the
        object must pickle, its class be importable there, and its methods take and
        answer plain lists, dicts, strings and numbers."""
        with self._services_lock:
            if name not in self._services:
                self._services[name] = factory(state_dirs)

    def call(self, name: str, op: str, *args: Any) -> Any:
        """Method ``op`` of the shared service ``name`` on ``args``."""
        with self._services_lock:
            return getattr(self._services[name], public_op(op))(*args)

    def close(self) -> None:
        with self._services_lock:
            services, self._services = self._services, {}
        close_services(services)


def public_op(op: str) -> str:
    """A shared service's method a caller may name: never a private one."""
    if op.startswith("_"):
        raise ValueError(f"not a shared service's operation: {op!r}")
    return op


def close_services(services: dict[str, Any]) -> None:
    """Services let go of with their run; one with a ``close`` method is closed."""
    for service in services.values():
        close = getattr(service, "close", None)
        if callable(close):
            close()
