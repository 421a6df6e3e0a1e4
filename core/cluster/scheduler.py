"""On the scheduler: what a cluster's workers share, and the coordinator that asks for it.

:class:`CoordinatorPlugin` holds token buckets (per-host rate limits and API quotas hold
for the whole cluster) and, per run, the claims on record ids and image contents,
checked and set in one step on the scheduler's event loop, so two workers never both keep
one photo or one file, and the run's shared services (``Coordinator.service``): objects a
pipeline made and installed, each hosted by its name, whose methods every worker calls
in turn (the near-duplicate registry is one; the plugin knows none by name).
:class:`SchedulerCoordinator` is a pipeline's coordinator that
puts its questions to the plugin; the worker's and the client's differ only in how they
reach the scheduler. The messages between the two are defined here, on both sides.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from ..contract.shards import Coordinator, close_services, public_op
from ..download.http import TokenBuckets
from ..record import FileClaim, FileClaimAnswer

PLUGIN_NAME = "harvest-coordinator"
SLOT_BATCH_SECONDS = 0.25
SLOT_BATCH_MAX = 64
SERVICE_PIECE_BYTES = 8 << 20  # a shared service travels to the scheduler in pieces


@dataclass
class _RunClaims:
    records: dict  # record id -> shard key
    files: dict[str, FileClaim]  # by sha256
    paths: dict  # path -> sha256
    progress: dict  # shard key -> [[source, term, outcome, n], ...]
    stop: bool = False
    client: str | None = None  # the Dask client running it: gone, the run stops
    services: dict = field(default_factory=dict)  # name -> the object (Coordinator.service)
    uploads: dict = field(default_factory=dict)  # upload id -> pieces of a pickled service


class CoordinatorPlugin(SchedulerPlugin):
    """harvest's state on the scheduler: token buckets and per-run claims. Handlers run
    on the scheduler's event loop one at a time, so each claim is a check-and-set with
    no race between workers."""

    name = PLUGIN_NAME
    idempotent = True  # several harvests may share a cluster: the first registration stays

    async def start(self, scheduler) -> None:
        self.buckets = TokenBuckets()
        self.runs: dict[str, _RunClaims] = {}
        scheduler.handlers.update({
            "harvest_reserve": self.reserve,
            "harvest_claim_records": self.claim_records,
            "harvest_claim_file": self.claim_file,
            "harvest_preload": self.preload,
            "harvest_report": self.report,
            "harvest_progress": self.progress,
            "harvest_stop": self.stop,
            "harvest_forget": self.forget,
            "harvest_own": self.own,
            "harvest_service_hosted": self.service_hosted,
            "harvest_service_install": self.service_install,
            "harvest_service_call": self.service_call,
        })

    def _run(self, run: str) -> _RunClaims:
        if run not in self.runs:
            self.runs[run] = _RunClaims({}, {}, {}, {})
        return self.runs[run]

    def reserve(self, key: str, rate: float, burst: float, count: int = 1) -> list:
        return [self.buckets.reserve(key, rate, burst) for _ in range(count)]

    def claim_records(self, run: str, shard: str, ids: list) -> list:
        records = self._run(run).records
        return [record_id for record_id in ids if records.setdefault(record_id, shard) != shard]

    def claim_file(self, run: str, claim: list) -> dict:
        """``claim``: a FileClaim; the answer: a FileClaimAnswer's fields."""
        claim = FileClaim(*claim)
        claims = self._run(run)
        held = claims.files.get(claim.sha256)
        if held is not None:
            return asdict(FileClaimAnswer(owner=held.record_id, path=held.path))
        if claims.paths.get(claim.path, claim.sha256) != claim.sha256:
            return asdict(FileClaimAnswer(path_taken=True))
        claims.files[claim.sha256] = claim
        claims.paths[claim.path] = claim.sha256
        return asdict(FileClaimAnswer())

    def preload(self, run: str, shard: str, ids: list, files: list) -> None:
        """``files``: FileClaims."""
        claims = self._run(run)
        for record_id in ids:
            claims.records.setdefault(record_id, shard)
        for claim in map(FileClaim._make, files):
            if claim.sha256 not in claims.files:
                claims.files[claim.sha256] = claim
                claims.paths.setdefault(claim.path, claim.sha256)

    def service_hosted(self, run: str, name: str) -> bool:
        return name in self._run(run).services

    async def service_install(self, run: str, name: str, upload: str, piece: bytes,
                              last: bool) -> None:
        """A service a pipeline made, pickled, in pieces; the first installed stays. It is
        unpickled off the event loop (a registry rebuilds its index), the claims go on."""
        claims = self._run(run)
        claims.uploads.setdefault(upload, []).append(piece)
        if not last:
            return
        blob = b"".join(claims.uploads.pop(upload))
        service = await asyncio.get_running_loop().run_in_executor(None, pickle.loads, blob)
        if claims.services.setdefault(name, service) is not service:
            close_services({name: service})

    def service_call(self, run: str, name: str, method: str, args: list) -> Any:
        """``method``, not ``op``: Dask's messages name their handler ``op``."""
        return getattr(self._run(run).services[name], public_op(method))(*args)

    def report(self, run: str, shard: str, counts: list) -> bool:
        claims = self._run(run)
        claims.progress[shard] = counts
        return claims.stop

    def progress(self, run: str) -> list:
        totals: Counter = Counter()
        for counts in self._run(run).progress.values():
            for source, term, outcome, n in counts:
                totals[(source, term, outcome)] += n
        return [[*key, n] for key, n in totals.items()]

    def stop(self, run: str) -> None:
        self._run(run).stop = True

    def own(self, run: str, client: str) -> None:
        self._run(run).client = client

    def remove_client(self, scheduler, client: str) -> None:
        """A client gone (killed, its machine lost): its shards still running stop at their
        next report instead of running on for nobody (a new client may be running the
        same shards by then)."""
        for claims in self.runs.values():
            if claims.client == client:
                claims.stop = True

    def forget(self, run: str) -> None:
        claims = self.runs.pop(run, None)
        if claims is not None:
            close_services(claims.services)


class SchedulerCoordinator(Coordinator):
    """A pipeline's coordinator on a cluster: the questions go to :class:`CoordinatorPlugin`.
    ``_call`` reaches the scheduler; ``shard`` is the key claims are held under."""

    def __init__(self, run: str, shard: str):
        super().__init__()
        self.run, self.shard = run, shard
        self._slots: dict[str, deque] = {}
        self._slots_lock = threading.Lock()

    def _call(self, handler: str, **kwargs) -> Any:
        raise NotImplementedError

    def reserve(self, key: str, rate: float, burst: float = 1.0) -> float:
        """Tokens come from the scheduler a quarter of a second's worth at a time (one
        round trip per request would cost more than the request); a token left unused
        past its time is dropped, never saved up, so the limit still holds."""
        with self._slots_lock:
            slots = self._slots.setdefault(key, deque())
            now = time.monotonic()
            while slots and slots[0] < now - 1.0 / rate:
                slots.popleft()
            if not slots:
                count = max(1, min(SLOT_BATCH_MAX, int(rate * SLOT_BATCH_SECONDS)))
                delays = self._call("harvest_reserve", key=key, rate=rate, burst=burst,
                                    count=count)
                now = time.monotonic()
                slots.extend(now + delay for delay in delays)
            slot = slots.popleft()
        return max(0.0, slot - time.monotonic())

    def claim_records(self, record_ids: list[str]) -> set[str]:
        return set(self._call("harvest_claim_records", run=self.run, shard=self.shard,
                              ids=record_ids))

    def claim_file(self, sha256: str, record_id: str, relpath: str) -> FileClaimAnswer:
        return FileClaimAnswer(**self._call("harvest_claim_file", run=self.run,
                                            claim=list(FileClaim(sha256, record_id, relpath))))

    def report(self, counts: list) -> bool:
        return self._call("harvest_report", run=self.run, shard=self.shard, counts=counts)

    def service(self, name: str, factory: Callable[[list[Path]], Any],
                state_dirs: list[Path]) -> None:
        """Made here (this process sees the output's state folders) and installed on the
        scheduler, unless it hosts the service already; when two pipelines make it at
        once, the first installed stays."""
        if self._call("harvest_service_hosted", run=self.run, name=name):
            return
        blob = pickle.dumps(factory(state_dirs), protocol=pickle.HIGHEST_PROTOCOL)
        upload = uuid.uuid4().hex
        pieces = range(0, max(len(blob), 1), SERVICE_PIECE_BYTES)
        for start in pieces:
            self._call("harvest_service_install", run=self.run, name=name, upload=upload,
                       piece=blob[start:start + SERVICE_PIECE_BYTES],
                       last=start == pieces[-1])

    def call(self, name: str, op: str, *args: Any) -> Any:
        return self._call("harvest_service_call", run=self.run, name=name, method=op,
                          args=list(args))

    def preload(self, owner: str, ids: list[str], files: list[FileClaim]) -> None:
        """Claims an earlier run holds (``owner``: its shard's key)."""
        self._call("harvest_preload", run=self.run, shard=owner, ids=ids,
                   files=[list(claim) for claim in files])

    def progress(self) -> list:
        """Every shard's last counts, summed."""
        return self._call("harvest_progress", run=self.run)

    def stop(self) -> None:
        self._call("harvest_stop", run=self.run)

    def forget(self) -> None:
        self._call("harvest_forget", run=self.run)
