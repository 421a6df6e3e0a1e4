"""Cluster runs on Dask distributed, from the client: one recipe, many worker processes
or machines.

The client plans the recipe's shards (``Engine.plan``), sends each to the cluster as a
task that runs the normal pipeline on it (``worker.run_shard``), shows the cluster's
progress, and merges each finished shard's part of the unshared sinks (JSONL) into the
output. What the workers share lives on the scheduler (``scheduler.CoordinatorPlugin``);
the client rebuilds its claims from the shards' run states at the start of every run, so
a resumed run keeps them too.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, as_completed

from ..cleaning.curation import write_scoring
from ..contract.recipe import Recipe
from ..contract.registry import build_plugin
from ..contract.shards import SHARDS_DIR, Shard, state_dirs
from ..errors import HarvestError, UsageError, one_line
from ..output.lock import OutputLock
from ..output.state import STATE_FILE, RunState
from ..output.takedown import crash_point, remember_sinks
from ..pipeline.summary import Progress, Summary
from ..secrets import SecretResolver
from .scheduler import PLUGIN_NAME, CoordinatorPlugin, SchedulerCoordinator
from .transfer import ShardStore, TransferError, shard_of
from .worker import ShardJob, check_output, check_store, run_shard

MAIN_OWNER = "-"  # claims held by records already in the output (an earlier run)
PRELOAD_CHUNK = 20_000
STOP_GRACE_SECONDS = 60.0

log = logging.getLogger("harvest.cluster")


class ClientCoordinator(SchedulerCoordinator):
    """The client's coordinator: it plans with the scheduler's rate limits, preloads the
    claims and watches the run."""

    def __init__(self, client: Client, run: str):
        super().__init__(run, MAIN_OWNER)
        self.client = client

    def own(self) -> None:
        self._call("harvest_own", run=self.run, client=self.client.id)

    def _call(self, handler: str, **kwargs) -> Any:
        return self.client.sync(getattr(self.client.scheduler, handler), **kwargs)

    def reserve(self, key: str, rate: float, burst: float = 1.0) -> float:
        """One token at a time: the client plans, its calls are few."""
        return self._call("harvest_reserve", key=key, rate=rate, burst=burst)[0]


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
        settings = recipe.run
        self.store = ShardStore(settings.cluster_store, settings.cluster_store_options) \
            if settings.cluster_store else None

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
        coordinator = ClientCoordinator(client, self.run_id)
        try:
            client.register_plugin(CoordinatorPlugin(), name=PLUGIN_NAME)
            coordinator.own()
            # Planning calls the APIs too (Flickr's probes): from the same buckets.
            shards = Engine(self.recipe, progress=False, coordinator=coordinator).plan()
            log.info("%d shards planned", len(shards))
            self._check_workers(client)
            merger = PartMerger(self.recipe)
            try:
                # Before the claims are loaded: what an earlier client left committed in
                # the store holds claims too.
                if self.store is not None:
                    self._receive_committed(merger)
                self._preload(coordinator)
            except BaseException:
                self.summary.outcome = "failed"
                merger.close(self.summary)
                raise
            self._execute(client, coordinator, shards, merger)
        finally:
            try:
                coordinator.forget()
            except Exception:  # the scheduler may be gone; nothing to forget then
                pass
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous_sigterm)
            client.close()
            if cluster is not None:
                cluster.close()
        return self.summary

    def _check_workers(self, client: Client) -> None:
        if self.store is not None:
            self._check_store(client)
            return
        token = uuid.uuid4().hex
        probe = self.output / ".harvest" / f"cluster-probe-{token}"
        probe.write_text(token)
        try:
            self._wait_for_a_worker(client)
            answers = client.run(check_output, str(self.output.resolve()), token)
        finally:
            probe.unlink(missing_ok=True)
        blind = {worker: problem for worker, problem in answers.items() if problem}
        if blind:
            worker, problem = next(iter(blind.items()))
            raise UsageError(f"{self.output}: the output folder must be shared by every "
                             f"worker at the same path; worker {worker} cannot see it "
                             f"({problem})")

    def _wait_for_a_worker(self, client: Client) -> None:
        if not client.scheduler_info().get("workers"):
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise UsageError(f"--cluster {self.address}: no worker joined the cluster "
                                 f"within 60 s") from None

    def _check_store(self, client: Client) -> None:
        """Workers that share no folder with the client: each must write to the store."""
        self.store.check()
        self._wait_for_a_worker(client)
        answers = client.run(check_store, self.store.url, self.store.storage_options)
        blind = {worker: problem for worker, problem in answers.items() if problem}
        if blind:
            worker, problem = next(iter(blind.items()))
            raise UsageError(f"run.cluster_store: worker {worker} cannot write to it "
                             f"({problem})")

    def _preload(self, coordinator: ClientCoordinator) -> None:
        """Claims of earlier runs, so that a resumed run never takes a record twice: each
        shard's, then the output's own."""
        main, *shards = state_dirs(self.output)
        owners = [(shard_of(state_dir.parent.name), state_dir) for state_dir in shards]
        # Through a store a shard runs again from an empty state of its own: what the
        # output holds is claimed as the output's first, or the shard would fetch it again.
        # With a shared folder the shard resumes from its state, which knows its records.
        order = [(MAIN_OWNER, main), *owners] if self.store else [*owners, (MAIN_OWNER, main)]
        for owner, state_dir in order:
            with RunState.reading(state_dir / STATE_FILE) as reader:
                claims = reader and reader.claims()
            if claims is None:
                continue
            ids, files = claims
            for start in range(0, max(len(ids), len(files), 1), PRELOAD_CHUNK):
                coordinator.preload(owner, ids[start:start + PRELOAD_CHUNK],
                                    files[start:start + PRELOAD_CHUNK])

    def _execute(self, client: Client, coordinator: ClientCoordinator,
                 shards: list[Shard], merger: PartMerger) -> None:
        recipe = _portable(self.recipe)
        # Content taken down from this output: no shard stores it (the records are claimed
        # as the output's own by the preload, so no shard fetches them again).
        with RunState.reading(self.output / ".harvest" / STATE_FILE) as reader:
            tombstones = tuple(sorted(reader.tombstones)) if reader else ()
        store = (self.store.url, self.store.storage_options) if self.store else None
        futures = {}
        for shard in shards:
            job = ShardJob(recipe, self.run_id, shard, str(self.output / SHARDS_DIR / shard.key),
                           tombstones, store)
            future = client.submit(run_shard, job, key=f"harvest-{shard.key}-{uuid.uuid4().hex[:8]}",
                                   pure=False)
            futures[future] = shard
        live = Summary(self.recipe.name)
        progress = Progress(live, enabled=self.show_progress)
        watcher = _ProgressWatcher(coordinator, live, progress)
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
                try:
                    self._merge(merger, shard.key, result)
                except TransferError as exc:
                    failed.append(shard.describe())
                    log.error("shard %s not received: %s", shard.describe(), exc)
                    self.summary.note_reason(shard.source, "shard", str(exc)[:200])
                    continue
                self.merged.add(future.key)
            if self.store is not None:
                # Attempts that committed beside this run's (a killed client's last
                # shards): received too, before the run says it is complete.
                self._receive_committed(merger)
            if failed:
                self.summary.outcome = "incomplete"
                self.summary.pending_note = (f"{len(failed)} shard(s) failed; run again to "
                                             f"retry them")
            elif self.summary.outcome == "running":
                self.summary.outcome = "incomplete" if self.shards_incomplete else "complete"
        except (KeyboardInterrupt, _Interrupted):
            self.summary.outcome = "interrupted"
            self._stop(coordinator, futures, merger)
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

    def _stop(self, coordinator: ClientCoordinator, futures: dict, merger: PartMerger) -> None:
        """Asks running shards to stop (they save their progress), then merges what they
        stored; the next run resumes the rest."""
        log.warning("interrupted: stopping the cluster's shards; run again to resume")
        coordinator.stop()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for future in futures:
            if future.status in ("cancelled", "error") or future.key in self.merged:
                continue
            try:
                result = future.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # a shard that cannot stop in time resumes next run
                continue
            self._absorb(result)
            self._merge(merger, futures[future].key, result)
        self.summary.outcome = "interrupted"

    def _merge(self, merger: PartMerger, key: str, result: dict) -> None:
        if self.store is None:
            merger.merge(self.output / SHARDS_DIR / key)
        elif "sent" in result:
            crash_point("shard-committed")
            merger.merge(self.store.receive(result["sent"], self.output))
            self.store.settle(result["sent"])

    def _receive_committed(self, merger: PartMerger) -> None:
        """Through a store: the attempts committed and not merged (a killed client's) are
        received and merged. Every shard runs still, as with a shared folder (a list may
        have grown, the output may be new); what the output holds is claimed as its own,
        so no shard fetches it again."""
        for marker in self.store.committed():
            if marker["merged"]:
                continue
            try:
                part_dir = self.store.receive(marker, self.output)
            except TransferError as exc:
                raise UsageError(f"{exc}; remove {self.store.url}/committed/{marker['shard']}/"
                                 f"{marker['part']}.json to run that shard again") from None
            merger.merge(part_dir)
            self.store.settle(marker)
            log.info("shard %s committed by an earlier client received", marker["part"])


class _Interrupted(Exception):
    """SIGTERM on the client."""


def _raise_interrupted(signum, frame):
    raise _Interrupted()


class _ProgressWatcher:
    """Polls the scheduler for the shards' counts and shows them."""

    def __init__(self, coordinator: ClientCoordinator, live: Summary, progress: Progress):
        self.coordinator, self.live, self.progress = coordinator, live, progress
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(1.0):
            try:
                rows = self.coordinator.progress()
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

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.state = RunState(recipe.output / ".harvest" / STATE_FILE)
        self.run_id = self.state.start_run()
        self.stack = ExitStack()
        self.sinks = []
        for spec in recipe.sinks:
            if spec.cls.shared:
                continue
            sink = build_plugin(recipe, spec)
            sink.open()
            self.stack.callback(sink.close)
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
        with RunState.reading(part_dir / ".harvest" / STATE_FILE) as reader:
            if reader is None:
                return
            done, files = reader.finished_records(), reader.files()
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

