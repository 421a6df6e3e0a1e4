"""Cluster runs on Dask distributed: one recipe, many worker processes or machines.

The client plans the recipe's shards (``Engine.plan``), sends each to the cluster as a
task that runs the normal pipeline on it (``run_shard``), shows the cluster's progress,
and merges each finished shard's part of the unshared sinks (JSONL) into the output.

What the workers share lives on the scheduler, in :class:`CoordinatorPlugin`: token
buckets (per-host rate limits and API quotas hold for the whole cluster), and claims on
record ids and image contents, checked and set in one step on the scheduler's event
loop, so two workers never both keep one photo or one file. The claims are rebuilt from
the shards' run states at the start of every run, so a resumed run keeps them too.

Images go straight to the output folder, which every worker must see at the same path
(a local cluster, or a shared file system); run state and JSONL parts go to
``.harvest/shards/<shard>/`` inside it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections import Counter, deque
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import sync

from ..cleaning.curation import write_scoring
from ..contract.recipe import Recipe
from ..contract.shards import SHARDS_DIR, Coordinator, Shard, state_dirs
from ..download.http import TokenBuckets
from ..errors import HarvestError, UsageError, one_line
from ..output.lock import OutputLock
from ..output.state import RunState
from ..output.takedown import remember_sinks
from ..pipeline.summary import Progress, Summary
from ..record import FileClaim
from ..secrets import RedactingFilter, SecretResolver

PLUGIN_NAME = "harvest-coordinator"
MAIN_OWNER = "-"  # claims held by records already in the output (an earlier run)
PRELOAD_CHUNK = 20_000
STOP_GRACE_SECONDS = 60.0
SLOT_BATCH_SECONDS = 0.25
SLOT_BATCH_MAX = 64

log = logging.getLogger("harvest.cluster")


# -- on the scheduler ------------------------------------------------------------------------

@dataclass
class _RunClaims:
    records: dict  # record id -> shard key
    files: dict[str, FileClaim]  # by sha256
    paths: dict  # path -> sha256
    progress: dict  # shard key -> [[source, term, outcome, n], ...]
    stop: bool = False
    copies: Any = None  # the run's CopyRegistry (near-duplicates), made when first used


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
            "harvest_load_copies": self.load_copies,
            "harvest_place_copies": self.place_copies,
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
        """``claim``: a FileClaim; the answer is ``Coordinator.claim_file``'s."""
        claim = FileClaim(*claim)
        claims = self._run(run)
        held = claims.files.get(claim.sha256)
        if held is not None:
            return {"owner": held.record_id, "path": held.path}
        if claims.paths.get(claim.path, claim.sha256) != claim.sha256:
            return {"path_taken": True}
        claims.files[claim.sha256] = claim
        claims.paths[claim.path] = claim.sha256
        return {}

    def preload(self, run: str, shard: str, ids: list, files: list) -> None:
        """``files``: FileClaims."""
        claims = self._run(run)
        for record_id in ids:
            claims.records.setdefault(record_id, shard)
        for claim in map(FileClaim._make, files):
            if claim.sha256 not in claims.files:
                claims.files[claim.sha256] = claim
                claims.paths.setdefault(claim.path, claim.sha256)

    def _copies(self, run: str):
        claims = self._run(run)
        if claims.copies is None:
            from ..cleaning.copies import CopyRegistry

            claims.copies = CopyRegistry()
        return claims.copies

    def load_copies(self, run: str, rows: list) -> None:
        self._copies(run).load(tuple(row) for row in rows)

    def place_copies(self, run: str, batch: list, max_distance: int,
                     max_dhash_distance: int) -> list:
        decisions, changed = self._copies(run).place([tuple(item) for item in batch],
                                                     max_distance, max_dhash_distance)
        return [decisions, [list(row) for row in changed]]

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

    def forget(self, run: str) -> None:
        self.runs.pop(run, None)


# -- on a worker -----------------------------------------------------------------------------

class ClusterCoordinator(Coordinator):
    """A shard's coordinator: every question goes to the scheduler."""

    def __init__(self, run: str, shard: str):
        super().__init__()
        self.run, self.shard = run, shard
        self.worker = get_worker()
        self._slots: dict[str, deque] = {}
        self._slots_lock = threading.Lock()

    def _call(self, op: str, **kwargs) -> Any:
        return sync(self.worker.loop, getattr(self.worker.scheduler, op), **kwargs)

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

    def claim_file(self, sha256: str, record_id: str, relpath: str) -> dict:
        return self._call("harvest_claim_file", run=self.run,
                          claim=list(FileClaim(sha256, record_id, relpath)))

    def report(self, counts: list) -> bool:
        return self._call("harvest_report", run=self.run, shard=self.shard, counts=counts)

    def place_copies(self, state_dirs: list[Path], batch: list, max_distance: int,
                     max_dhash_distance: int) -> list[dict]:
        """On the scheduler's registry, which the client loaded from every store of the
        output; the rows that changed are kept in this shard's store too, for later runs."""
        from ..cleaning.copies import CopyStore

        decisions, changed = self._call("harvest_place_copies", run=self.run,
                                        batch=[list(item) for item in batch],
                                        max_distance=max_distance,
                                        max_dhash_distance=max_dhash_distance)
        with self._copies_lock:
            if self._copies is None:
                self._copies = (None, CopyStore(state_dirs[0]))
            self._copies[1].save(tuple(row) for row in changed)
        return decisions


class ClientCoordinator(Coordinator):
    """The client's coordinator while it plans: rate limits from the scheduler's buckets."""

    def __init__(self, client: Client):
        super().__init__()
        self.client = client

    def reserve(self, key: str, rate: float, burst: float = 1.0) -> float:
        return self.client.sync(self.client.scheduler.harvest_reserve, key=key, rate=rate,
                                burst=burst)[0]


@dataclass
class ShardJob:
    recipe: Recipe
    run: str
    shard: Shard
    part_dir: str
    tombstones: tuple[str, ...] = ()  # content taken down (harvest takedown): never stored


def _tombstones(state: Path) -> list[str]:
    """The content hashes taken down from this output (the records are claimed as the
    output's own by the preload, so no shard fetches them again)."""
    if not state.exists():
        return []
    reader = RunState.open_readonly(state)
    try:
        return sorted(reader.tombstones)
    finally:
        reader.close()


def run_shard(job: ShardJob) -> dict:
    """A Dask task: the normal pipeline on one shard. Returns its summary."""
    from ..pipeline.engine import Engine
    from ..pipeline.scope import ShardScope
    from ..pipeline.stopping import Interrupted

    part_dir = Path(job.part_dir)
    (part_dir / ".harvest").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(part_dir / ".harvest" / "harvest.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(job.recipe.resolver))
    logger = logging.getLogger("harvest")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    # A worker's own log handlers do not know the recipe's secrets: harvest's records go
    # only to the redacting handler above.
    logger.propagate = False
    try:
        coordinator = ClusterCoordinator(job.run, job.shard.key)
        if coordinator.report([]):  # the client stopped the run before this shard began
            return {"shard": job.shard.key, "summary": Summary(job.recipe.name).to_dict()}
        scope = ShardScope([job.shard], part_dir, tombstones=set(job.tombstones))
        engine = Engine(job.recipe, progress=False, scope=scope, coordinator=coordinator)
        summary = engine.run()
        try:
            engine.report_progress()
        except (Exception, Interrupted):  # the final counts travel in the task's result anyway
            pass
        return {"shard": job.shard.key, "summary": summary.to_dict()}
    finally:
        logger.removeHandler(handler)
        handler.close()


def _check_output(output: str, token: str) -> str | None:
    """On each worker: can it see the client's output folder? None when it can."""
    probe = Path(output) / ".harvest" / f"cluster-probe-{token}"
    try:
        return None if probe.read_text() == token else "probe file has other content"
    except OSError as exc:
        return f"{exc.__class__.__name__}: {exc.strerror or exc}"


# -- on the client ---------------------------------------------------------------------------

class ClusterRun:
    """Plans, submits, watches and merges one recipe's run on a Dask cluster."""

    def __init__(self, recipe: Recipe, *, address: str | None = None,
                 local_workers: int | None = None, progress: bool = True):
        self.recipe = recipe
        self.address = address
        self.local_workers = local_workers
        self.show_progress = progress
        self.output = recipe.output
        self.run_id = f"{recipe.output.resolve()}#{uuid.uuid4().hex[:12]}"
        self.summary = Summary(recipe.name, recipe.resolver.redact)
        self.shards_incomplete = 0
        self.merged: set[str] = set()

    def check_sinks(self) -> None:
        from ..contract.plugin import Sink

        for spec in self.recipe.sinks:
            if not spec.cls.shared and spec.cls.part_documents is Sink.part_documents:
                raise UsageError(f"{self.recipe.path}: {spec.key_path}: sink {spec.use!r} cannot "
                                 f"run on a cluster (it neither writes to a shared store nor "
                                 f"merges parts)")

    def connect(self) -> tuple[Client, LocalCluster | None]:
        cluster = None
        if self.address:
            try:
                client = Client(self.address, timeout="5s", set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise UsageError(f"--cluster {self.address}: cannot reach the Dask scheduler "
                                 f"({exc.__class__.__name__})") from None
        else:
            cluster = LocalCluster(n_workers=self.local_workers, threads_per_worker=1,
                                   processes=True, host="127.0.0.1", dashboard_address=":0",
                                   silence_logs=logging.ERROR)
            client = Client(cluster, set_as_default=False)
        return client, cluster

    def run(self) -> Summary:
        # The client holds the output's lock for all its workers: no other run may use
        # the folder while they write to it.
        with OutputLock(self.output):
            return self._run()

    def _run(self) -> Summary:
        write_scoring(self.output, [(spec.cls, spec.options) for spec in self.recipe.enrichers])
        remember_sinks(self.recipe)
        from ..pipeline.engine import STATE_DIR, Engine

        self.check_sinks()
        (self.output / STATE_DIR).mkdir(parents=True, exist_ok=True)
        # The scheduler's and workers' own chatter stays out of the harvest's log.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        client, cluster = self.connect()
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            client.register_plugin(CoordinatorPlugin(), name=PLUGIN_NAME)
            # Planning calls the APIs too (Flickr's probes): from the same buckets.
            planner = Engine(self.recipe, progress=False, coordinator=ClientCoordinator(client))
            shards = planner.plan()
            log.info("%d shards planned", len(shards))
            self._check_workers(client)
            self._preload(client)
            self._execute(client, shards, planner)
        finally:
            try:
                client.sync(client.scheduler.harvest_forget, run=self.run_id)
            except Exception:  # the scheduler may be gone; nothing to forget then
                pass
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous_sigterm)
            client.close()
            if cluster is not None:
                cluster.close()
        return self.summary

    def _check_workers(self, client: Client) -> None:
        token = uuid.uuid4().hex
        probe = self.output / ".harvest" / f"cluster-probe-{token}"
        probe.write_text(token)
        try:
            if not client.scheduler_info().get("workers"):
                try:
                    client.wait_for_workers(1, timeout=60)
                except TimeoutError:
                    raise UsageError(f"--cluster {self.address}: no worker joined the cluster "
                                     f"within 60 s") from None
            answers = client.run(_check_output, str(self.output.resolve()), token)
        finally:
            probe.unlink(missing_ok=True)
        blind = {worker: problem for worker, problem in answers.items() if problem}
        if blind:
            worker, problem = next(iter(blind.items()))
            raise UsageError(f"{self.output}: the output folder must be shared by every "
                             f"worker at the same path; worker {worker} cannot see it "
                             f"({problem})")

    def _preload(self, client: Client) -> None:
        """Claims of earlier runs, so that a resumed run never takes a record twice."""
        states = sorted((self.output / SHARDS_DIR).glob("*/.harvest/state.sqlite"))
        owners = [(path.parents[1].name, path) for path in states]
        main_state = self.output / ".harvest" / "state.sqlite"
        if main_state.exists():
            owners.append((MAIN_OWNER, main_state))
        for owner, path in owners:
            reader = RunState.open_readonly(path)
            try:
                claims = reader.claims()
            finally:
                reader.close()
            if claims is None:
                continue
            ids, files = claims[0], [list(claim) for claim in claims[1]]
            for start in range(0, max(len(ids), len(files), 1), PRELOAD_CHUNK):
                client.sync(client.scheduler.harvest_preload, run=self.run_id, shard=owner,
                            ids=ids[start:start + PRELOAD_CHUNK],
                            files=files[start:start + PRELOAD_CHUNK])
        # Near-duplicate registry: every picture placed by earlier runs, here or on shards.
        from ..cleaning.copies import stored_rows

        chunk: list = []
        for row in stored_rows(state_dirs(self.output)):
            chunk.append(list(row))
            if len(chunk) >= PRELOAD_CHUNK:
                client.sync(client.scheduler.harvest_load_copies, run=self.run_id, rows=chunk)
                chunk = []
        if chunk:
            client.sync(client.scheduler.harvest_load_copies, run=self.run_id, rows=chunk)

    def _execute(self, client: Client, shards: list[Shard], engine) -> None:
        recipe = _portable(self.recipe)
        tombstones = tuple(_tombstones(self.output / ".harvest" / "state.sqlite"))
        futures = {}
        for shard in shards:
            job = ShardJob(recipe, self.run_id, shard, str(self.output / SHARDS_DIR / shard.key),
                           tombstones)
            future = client.submit(run_shard, job, key=f"harvest-{shard.key}-{uuid.uuid4().hex[:8]}",
                                   pure=False)
            futures[future] = shard
        live = Summary(self.recipe.name)
        progress = Progress(live, enabled=self.show_progress)
        merger = PartMerger(self.recipe, engine)
        watcher = _ProgressWatcher(client, self.run_id, live, progress)
        failed: list[str] = []
        watcher.start()
        try:
            for future in as_completed(list(futures), loop=client.loop):
                shard = futures[future]
                try:
                    result = future.result()
                except HarvestError:
                    raise
                except Exception as exc:
                    failed.append(shard.describe())
                    reason = one_line(exc)
                    log.error("shard %s failed: %s", shard.describe(), reason)
                    self.summary.note_reason(shard.source, "shard", reason[:200])
                    continue
                self._absorb(result)
                merger.merge(self.output / SHARDS_DIR / shard.key)
                self.merged.add(future.key)
            if failed:
                self.summary.outcome = "incomplete"
                self.summary.pending_note = (f"{len(failed)} shard(s) failed; run again to "
                                             f"retry them")
            elif self.summary.outcome == "running":
                self.summary.outcome = "incomplete" if self.shards_incomplete else "complete"
        except (KeyboardInterrupt, _Interrupted):
            self.summary.outcome = "interrupted"
            self._stop(client, futures, merger)
        except BaseException:
            client.cancel(list(futures), force=True)
            raise
        finally:
            watcher.stop()
            progress.close()
            if self.summary.outcome == "running":
                self.summary.outcome = "failed"
            merger.close(self.summary)

    def _absorb(self, result: dict) -> None:
        self.summary.absorb(result["summary"])
        if result["summary"]["outcome"] == "incomplete":
            self.shards_incomplete += 1
        if result["summary"]["outcome"] == "interrupted":
            self.summary.outcome = "interrupted"

    def _stop(self, client: Client, futures: dict, merger: PartMerger) -> None:
        """Asks running shards to stop (they save their progress), then merges what they
        stored; the next run resumes the rest."""
        log.warning("interrupted: stopping the cluster's shards; run again to resume")
        client.sync(client.scheduler.harvest_stop, run=self.run_id)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for future in futures:
            if future.status in ("cancelled", "error") or future.key in self.merged:
                continue
            try:
                result = future.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # a shard that cannot stop in time resumes next run
                continue
            self._absorb(result)
            merger.merge(self.output / SHARDS_DIR / futures[future].key)
        self.summary.outcome = "interrupted"


class _Interrupted(Exception):
    """SIGTERM on the client."""


def _raise_interrupted(signum, frame):
    raise _Interrupted()


class _ProgressWatcher:
    """Polls the scheduler for the shards' counts and shows them."""

    def __init__(self, client: Client, run: str, live: Summary, progress: Progress):
        self.client, self.run, self.live, self.progress = client, run, live, progress
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(1.0):
            try:
                rows = self.client.sync(self.client.scheduler.harvest_progress, run=self.run)
            except Exception:  # progress is best effort; the results are exact
                continue
            self.live.replace_counts(rows)
            self.progress.update()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _portable(recipe: Recipe) -> Recipe:
    """The recipe as a task carries it: secrets already resolved (the options hold them),
    no environment, no credentials file to read again on the worker."""
    return replace(recipe, resolver=SecretResolver.carried(recipe.resolver.revealed))


class PartMerger:
    """Moves finished shards' parts of the unshared sinks into the output's sinks, once.

    The output's run state records each merged id as done (with its file), in the same
    transaction as the sink's checkpoint, so an interrupted merge resumes without writing
    a record twice; a part is deleted once merged.
    """

    def __init__(self, recipe: Recipe, engine):
        """``engine``: an Engine of the recipe on this machine, which builds the sinks."""
        self.recipe = recipe
        self.state = RunState(recipe.output / ".harvest" / "state.sqlite")
        self.run_id = self.state.start_run()
        self.stack = ExitStack()
        self.sinks = []
        for spec in recipe.sinks:
            if spec.cls.shared:
                continue
            sink = engine._open(self.stack, spec)
            sink.resume(self.state.checkpoint(spec.label))
            self.sinks.append((spec, sink))

    def merge(self, part_dir: Path) -> int:
        written = 0
        for spec, sink in self.sinks:
            for batch in sink.part_documents(part_dir):
                ids = [document["id"] for document in batch]
                delivered = self.state.delivered(spec.label, ids)
                todo, seen = [], set()
                for document in batch:
                    record_id = document["id"]
                    known = self.state.record(record_id)
                    if record_id in delivered or record_id in seen or (
                            known is not None and known.status == "done"):
                        continue
                    seen.add(record_id)
                    todo.append(document)
                if todo:
                    checkpoint = sink.write_documents(todo)
                    self.state.set_checkpoint(spec.label, checkpoint)
                    self.state.mark_delivered(spec.label, [d["id"] for d in todo])
                    written += len(todo)
                self.state.commit()
        self._adopt_state(part_dir)
        for _, sink in self.sinks:
            sink.discard_part(part_dir)
        return written

    def _adopt_state(self, part_dir: Path) -> None:
        """The shard's finished records and files, into the output's run state: a later run,
        on one machine or a cluster, knows them."""
        path = part_dir / ".harvest" / "state.sqlite"
        if not path.exists():
            return
        reader = RunState.open_readonly(path)
        try:
            done, files = reader.finished_records(), reader.files()
        finally:
            reader.close()
        for info, record_id in files:
            if self.state.file(info.sha256) is None:
                self.state.add_file(info, record_id)
        finished = []
        for record in done:
            known = self.state.record(record.id)
            if known is None or known.status != "done":
                self.state.set_status(record.id, record.source, record.term, "done",
                                      sha256=record.sha256, duplicate_of=record.duplicate_of)
                finished.append(record.id)
        self.state.forget_delivered(finished)
        self.state.commit()

    def close(self, summary: Summary) -> None:
        self.stack.close()
        self.state.finish_run(self.run_id, summary.outcome, summary.to_dict())
        self.state.close()
        summary.save(self.recipe.output / ".harvest" / "last-run.json")

