"""The pipeline: sources -> download -> enrichers -> sinks, streaming and resumable.

The stages, as Scrapy splits its engine: sources are read ahead in a thread of their
own (the engine never waits on a search page); downloads and image checks run in worker
processes, one per core (``fetchpool``), or in threads here (``stopping.DaemonPool``);
each checked download is placed as its content's file (``placing``); records are then
enriched and stored in batches (``storing``). Everything that touches the run state, the
image folder and the sinks happens on this engine's own thread, so there is one writer
and no lock around any of it. This file is the loop that ties the stages together,
start and stop included.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from itertools import islice
from pathlib import Path

from ..cleaning.curation import write_scoring
from ..contract.plugin import Context, Plugin
from ..contract.recipe import PluginSpec, Recipe
from ..contract.shards import Coordinator, Shard
from ..download.fetch import Fetched, Fetcher
from ..download.fetchpool import ProcessFetchPool
from ..download.http import SearchBudget
from ..errors import DiskFull, PluginConfigError, RecordError, disk_full, one_line
from ..output.lock import OutputLock
from ..output.state import FINAL, RunState
from ..output.storage import image_relpath
from ..output.takedown import remember_sinks
from ..record import FileClaimAnswer, Query, Record
from .placing import ImagePlacer
from .stopping import DaemonPool, Interrupted, StopSignals
from .storing import BatchStore
from .summary import Progress, Summary

STATE_DIR = ".harvest"
SOURCE_READ_AHEAD = 1000
CLAIM_CHUNK = 64
REPORT_SECONDS = 1.0
PLAN_THREADS = 4
LOOKUP_CHUNK = 256
WAIT_SLICE = 0.2  # how often a waiting engine thread looks for a stop request

log = logging.getLogger("harvest.engine")


class Engine:
    def __init__(self, recipe: Recipe, *, limit: int | None = None, progress: bool = True,
                 shards: list[Shard] | None = None, part_dir: Path | None = None,
                 coordinator: Coordinator | None = None, verify_sinks: bool = False,
                 stop_requested: threading.Event | None = None,
                 reconsider: set[str] | None = None, tombstones: set[str] | None = None):
        """``shards``: run only these (a cluster worker's share), keeping run state and
        the parts of unshared sinks in ``part_dir``; images still go to the output folder."""
        self.recipe = recipe
        self.verify_sinks = verify_sinks
        self.reconsider = reconsider or set()
        self.tombstones = tombstones or set()  # a cluster shard's copy of the output's
        self.settings = recipe.run
        self.limit = limit
        self.shards = shards
        self.part_dir = part_dir
        self.coordinator = coordinator or Coordinator()
        self.images_root = recipe.output
        self.output = part_dir or recipe.output  # where the run state lives
        self.last_report = 0.0
        self.early_claims: dict[str, tuple[str, FileClaimAnswer]] = {}  # record id -> (path, claim)
        self.state_dir = self.output / STATE_DIR
        self.temp_dir = self.state_dir / "tmp"
        self.resolver = recipe.resolver
        self.summary = Summary(recipe.name, self.resolver.redact)
        self.hints: dict = {}
        self.show_progress = progress
        # A caller that handles signals itself passes its stop event; otherwise the engine
        # turns SIGINT/SIGTERM into one while it runs.
        self.own_signals = stop_requested is None
        self.stop_requested = stop_requested or threading.Event()
        self.search_failures = 0
        self.fetcher = Fetcher.for_run(self.settings, self.temp_dir,
                                       reserve=self.coordinator.reserve)
        self.fetcher.on_notice = self.summary.note
        self.http = self.fetcher.http  # plugins' sessions share its per-host pacing

    def _context(self, spec: PluginSpec) -> Context:
        return Context(recipe_name=self.recipe.name, recipe_dir=self.recipe.directory,
                       output_dir=self.images_root, terms=self.recipe.terms, http=self.http,
                       log=logging.getLogger(f"harvest.{spec.kind}.{spec.label}"),
                       hints=self.hints, name=spec.label, part_dir=self.part_dir,
                       coordinator=self.coordinator,
                       budget=SearchBudget(self.settings.max_api_calls,
                                           self.settings.search_deadline)
                       if spec.kind == "sources" else None,
                       on_bad_item=lambda reason, query: self.summary.fail(
                           spec.label, query.term if query else None, "source", reason,
                           "rejected"))

    def _build(self, spec: PluginSpec) -> Plugin:
        try:
            return spec.cls(spec.options, self._context(spec))
        except PluginConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise PluginConfigError(f"{self.recipe.path}: {spec.key_path}: {exc}") from None

    def run(self) -> Summary:
        with ExitStack() as guard:
            if self.shards is None:  # a cluster's client holds the lock for its workers
                guard.enter_context(OutputLock(self.output))
            return self._run()

    def _run(self) -> Summary:
        (self.images_root / "images").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # parts of downloads a crash cut off
        self.temp_dir.mkdir(parents=True)
        self.state = RunState(self.state_dir / "state.sqlite", self.resolver.redact)
        self.placer = ImagePlacer(self.images_root, self.state, self.coordinator, self.summary)
        run_id = self.state.start_run()
        if self.part_dir is None:  # what the review page starts from (a cluster's client writes it)
            write_scoring(self.output, [(spec.cls, spec.options) for spec in self.recipe.enrichers])
            remember_sinks(self.recipe)
        self.state.tombstones |= self.tombstones
        if self.reconsider:
            count = self.state.reconsider(self.reconsider)
            log.info("%d record(s) %s before: reconsidered", count,
                     " or ".join(sorted(self.reconsider)))
        if self.part_dir is None and self.state.removals():
            log.warning("a takedown or purge was interrupted and is not finished: its "
                        "pictures are not stored again, but may still be in the sinks; run "
                        "`harvest takedown` or `harvest purge` again to finish it")
        if self.recipe.retain_days and self.part_dir is None:
            past = self.state.stored_before(time.time() - self.recipe.retain_days * 86400)
            if past:
                log.warning("%d stored image(s) are older than retain_days (%d): run "
                            "`harvest purge %s`", past, self.recipe.retain_days,
                            self.recipe.path)
        if not self.settings.respect_robots:
            log.warning("run.respect_robots is false: the image hosts' robots.txt is not "
                        "read; make sure you may collect from them")
        progress = Progress(self.summary, enabled=self.show_progress)
        try:
            # A cluster worker runs the engine in a thread of its own, where signals cannot
            # go; there the client's stop request arrives through report_progress.
            with ExitStack() as stack:
                stack.callback(self.coordinator.close)
                if self.own_signals:
                    stack.enter_context(StopSignals(self.stop_requested))
                self.sinks = [(spec, self._open(stack, spec)) for spec in self.recipe.sinks]
                self.enrichers = [(spec, self._open(stack, spec)) for spec in self.recipe.enrichers]
                for _, enricher in self.enrichers:
                    self.hints.update(enricher.source_hints())
                sources = [(spec, self._open(stack, spec)) for spec in self.recipe.sources]
                for spec, sink in self.sinks:
                    sink.resume(self.state.checkpoint(spec.label))
                self.store = BatchStore(
                    enrichers=self.enrichers, sinks=self.sinks, state=self.state,
                    summary=self.summary, resolver=self.resolver, output=self.output,
                    batch_size=self.settings.batch_size,
                    sink_retry_seconds=self.settings.sink_retry_seconds,
                    record_failed=self._record_failed, check_stop=self._check_stop)
                if self.verify_sinks:
                    self.store.verify_sinks()
                try:
                    self._pump(sources, progress)
                    # Complete means every record found reached its end: stored, or
                    # dropped or rejected for a reason that will not change. A transient
                    # failure, a record a sink never took, or a failed search is not that.
                    unfinished = self.summary.total("failed") or self.search_failures
                    self.summary.outcome = "incomplete" if unfinished else "complete"
                except (KeyboardInterrupt, Interrupted):
                    self.summary.outcome = "interrupted"
                    log.warning("interrupted: progress is saved; run again to resume")
            # The sinks are closed: a shard built at the end may have left records out.
            self.store.take_refusals()
            if self.summary.outcome == "complete" and self.summary.total("failed"):
                self.summary.outcome = "incomplete"
        except (DiskFull, OSError) as exc:
            # Also a sink that meets the full disk when it closes (a shard built at the end).
            if not (isinstance(exc, DiskFull) or disk_full(exc)):
                raise
            self.summary.outcome = "failed"
            self.summary.error = str(exc if isinstance(exc, DiskFull) else DiskFull(self.output))
        finally:
            progress.close()
            if self.summary.outcome == "running":
                self.summary.outcome = "failed"
            # On a full disk each of these may fail in turn; what was committed stays.
            for step in (self._note_pending,
                         lambda: self.state.finish_run(run_id, self.summary.outcome,
                                                       self.summary.to_dict()),
                         self.state.close,
                         lambda: self.summary.save(self.state_dir / "last-run.json")):
                try:
                    step()
                except (DiskFull, OSError) as exc:
                    if not (isinstance(exc, DiskFull) or disk_full(exc)):
                        raise
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return self.summary

    def plan(self) -> list[Shard]:
        """The recipe's work as shards, in the order one machine would search them: one per
        source and query, or per partition where the source splits a query."""
        shards: list[Shard] = []
        with ExitStack() as stack:
            for spec in self.recipe.enrichers:
                self.hints.update(self._open(stack, spec).source_hints())
            sources = [(spec, self._open(stack, spec)) for spec in self.recipe.sources]
            streams = list(self._streams(sources))

            def split(stream) -> list:
                spec, source, query, limit = stream
                try:
                    return source.partitions(query, limit)
                except PluginConfigError:
                    raise
                except Exception as exc:
                    log.warning("%s: cannot split %r (%s); it runs as one shard", spec.label,
                                query.text if query else "its input", exc.__class__.__name__)
                    return [(None, limit)]

            # Queries are planned side by side: each may wait on its API for probes.
            with ThreadPoolExecutor(PLAN_THREADS, thread_name_prefix="plan") as pool:
                for (spec, _, query, _), parts in zip(streams, pool.map(split, streams),
                                                      strict=True):
                    for part, part_limit in parts:
                        shards.append(Shard(spec.label, query and query.term, query and query.lang,
                                            query and query.text, part, part_limit,
                                            order=len(shards)))
        return shards

    def _open(self, stack: ExitStack, spec: PluginSpec) -> Plugin:
        plugin = self._build(spec)
        plugin.open()
        stack.callback(plugin.close)
        return plugin

    # -- the loop -----------------------------------------------------------------------------

    def _pump(self, sources, progress: Progress) -> None:
        max_in_flight = self.settings.concurrency * 2
        in_flight: dict[Future, Record] = {}
        in_flight_ids: set[str] = set()
        self.finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
        store = self.store
        pool, submit = self._download_pool()
        try:
            for record, prefetched in self._with_known(self._produced(sources)):
                if record.id in in_flight_ids or record.id in store.held_ids:
                    self.summary.count(record.source, record.term, "skipped")
                    continue
                known = self._known(record.id, prefetched)
                if known is not None and known.status in FINAL:
                    self.summary.count(record.source, record.term, "skipped")
                    continue
                if known is not None and known.status == "downloaded" \
                        and self.placer.reuse(record, known):
                    store.add(record)
                    continue
                while len(in_flight) >= max_in_flight:
                    self._collect(in_flight, in_flight_ids, block=True)
                    self._tick(progress)
                future = submit(record)
                in_flight[future] = record
                in_flight_ids.add(record.id)
                future.add_done_callback(self.finished.put)
                self._collect(in_flight, in_flight_ids, block=False)
                self._tick(progress)
            while in_flight:
                self._collect(in_flight, in_flight_ids, block=True)
                self._tick(progress)
            store.flush()
            store.drain()
        except BaseException as exc:
            pool.shutdown()
            self.fetcher.abandon()  # downloads stuck on a silent server end now
            if isinstance(exc, DiskFull):
                raise  # nothing more can be written; the last commit stands
            done = {f: r for f, r in in_flight.items() if f.done() and not f.cancelled()}
            for future, record in done.items():
                in_flight.pop(future)
                self._absorb(future, record, in_flight_ids)
            store.flush()
            store.give_up_pending()
            raise
        finally:
            pool.shutdown()
            progress.update()

    def _download_pool(self):
        """Worker processes on one machine (every core checks images), threads here on a
        cluster shard (the Dask worker is the process) or with ``run.workers: 1``."""
        # One per core by default, but never more than there are downloads to share out.
        workers = self.settings.workers or min(os.cpu_count() or 1, self.settings.concurrency)
        if self.shards is not None or workers <= 1:
            pool = DaemonPool(self.settings.concurrency, "download")
            return pool, lambda record: pool.submit(self._fetch, record)
        pool = ProcessFetchPool(self.settings, self.temp_dir, workers, self.summary.note)
        return pool, lambda record: pool.submit(record.url, record.local_file_ok,
                                                record.expect_sha1)

    def _check_stop(self) -> None:
        if self.stop_requested.is_set():
            raise Interrupted()

    def _tick(self, progress: Progress) -> None:
        self._check_stop()
        progress.update()
        if self.shards is not None and time.monotonic() - self.last_report >= REPORT_SECONDS:
            self.report_progress()

    def report_progress(self) -> None:
        self.last_report = time.monotonic()
        if self.coordinator.report(self.summary.rows()):
            raise Interrupted()

    def _produced(self, sources) -> Iterator[list[Record]]:
        """The sources' records, read ahead in a thread of their own (a bounded queue), so
        the engine thread never waits on a source's network calls; handed over as lists
        of what is waiting (one record from a slow source, up to a chunk from a fast one)."""
        handoff: queue.Queue = queue.Queue(maxsize=SOURCE_READ_AHEAD)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for record in self._claimed(self._candidates(sources)):
                    while not stop.is_set():
                        try:
                            handoff.put(record, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                handoff.put(done)
            except BaseException as exc:  # handed to the engine thread, which raises it
                handoff.put(exc)

        producer = threading.Thread(target=produce, name="sources", daemon=True)
        producer.start()
        try:
            while True:
                try:
                    item = handoff.get(timeout=WAIT_SLICE)
                except queue.Empty:
                    self._check_stop()
                    continue
                chunk, end = [], None
                while True:  # what is waiting now, up to a chunk, and how the stream ended
                    if item is done or isinstance(item, BaseException):
                        end = item
                        break
                    chunk.append(item)
                    if len(chunk) >= LOOKUP_CHUNK:
                        break
                    try:
                        item = handoff.get_nowait()
                    except queue.Empty:
                        break
                if chunk:
                    yield chunk
                if end is done:
                    return
                if end is not None:
                    raise end
        finally:
            stop.set()

    def _known(self, record_id: str, prefetched):
        """The run state's record for ``record_id``. A final status read with the chunk
        stays true; anything else may have changed since (the same id earlier in the
        list, downloaded meanwhile), so it is read again, unless the record is still
        certainly unknown (the Bloom filter learns every id the moment it gets a status)."""
        if prefetched is not None and prefetched.status in FINAL:
            return prefetched
        if prefetched is None and record_id not in self.state.known_ids:
            return None
        return self.state.record(record_id)

    def _with_known(self, chunks: Iterator[list[Record]]):
        """(record, what the run state knew of it), looked up a chunk at a time: a
        re-run of a finished harvest asks SQLite once per chunk, not once per record."""
        for chunk in chunks:
            known = self.state.records([record.id for record in chunk])
            for record in chunk:
                yield record, known.get(record.id)

    def _claimed(self, records: Iterator[Record]) -> Iterator[Record]:
        """On a cluster, records another shard holds already are skipped before download."""
        if self.shards is None:
            yield from records
            return
        chunk: list[Record] = []
        for record in records:
            chunk.append(record)
            if len(chunk) >= CLAIM_CHUNK:
                yield from self._claim(chunk)
                chunk = []
        yield from self._claim(chunk)

    def _claim(self, chunk: list[Record]) -> list[Record]:
        if not chunk:
            return []
        elsewhere = self.coordinator.claim_records([record.id for record in chunk])
        for record in chunk:
            if record.id in elsewhere:
                self.summary.count(record.source, record.term, "skipped")
        return [record for record in chunk if record.id not in elsewhere]

    def _streams(self, sources):
        """(spec, source, query, limit) in the order a single machine searches them."""
        if self.shards is not None:
            by_label = {spec.label: (spec, source) for spec, source in sources}
            for shard in self.shards:
                spec, source = by_label[shard.source]
                if shard.term is not None:
                    query = Query(shard.term, shard.lang, shard.text, shard.part)
                else:  # a source without terms: only its part, if it split its input
                    query = None if shard.part is None else Query("", "", "", shard.part)
                yield spec, source, query, shard.limit
            return
        for spec, source in sources:
            if not source.uses_terms:
                yield spec, source, None, None
                continue
            for term in self.recipe.terms:
                for lang, text in term.queries:
                    yield (spec, source, Query(term.key, lang, text),
                           source.query_limit or self.settings.limit_per_term)

    def _candidates(self, sources) -> Iterator[Record]:
        found = 0
        for spec, source, query, limit in self._streams(sources):
            budget = source.context.budget
            if budget is not None:
                budget.start()
            try:
                for record in islice(source.records(query), limit):
                    if record.query is None and query is not None and source.uses_terms:
                        record.query = query
                    record.local_file_ok = source.reads_local_files
                    if not record.url:
                        self.summary.fail(record.source, record.term, "source",
                                          "no image URL", "rejected")
                        continue
                    self.summary.count(record.source, record.term, "found")
                    yield record
                    found += 1
                    if self.limit is not None and found >= self.limit:
                        return
            except PluginConfigError:
                raise
            except Exception as exc:
                # One failed query (an API outage after retries) must not end the run.
                reason = one_line(exc)
                log.error("%s: search %r failed: %s", spec.label,
                          query.text if query else "", reason)
                self.summary.note_reason(spec.label, "search", reason)
                self.search_failures += 1

    def _finished(self, in_flight: dict, block: bool) -> list[Future]:
        """Downloads done since the last call, from the completion queue (no scanning)."""
        finished = []
        while block:
            try:
                finished.append(self.finished.get(timeout=WAIT_SLICE))
                break
            except queue.Empty:
                self._check_stop()
        while True:
            try:
                finished.append(self.finished.get_nowait())
            except queue.Empty:
                return [future for future in finished if future in in_flight]

    def _collect(self, in_flight: dict, in_flight_ids: set, block: bool) -> None:
        for future in self._finished(in_flight, block):
            self._absorb(future, in_flight.pop(future), in_flight_ids)

    def _fetch(self, record: Record) -> Fetched:
        """In a download thread. On a cluster, the content is claimed here too, so that the
        engine thread does not wait on the scheduler for it."""
        fetched = self.fetcher.fetch(record.url, local_files=record.local_file_ok,
                                     expect_sha1=record.expect_sha1)
        if self.shards is not None:
            relpath = image_relpath(record.term or record.source, record.source, record.source_id,
                                    fetched.file.format)
            claim = self.coordinator.claim_file(fetched.file.sha256, record.id, relpath)
            self.early_claims[record.id] = (relpath, claim)
        return fetched

    def _absorb(self, future: Future, record: Record, in_flight_ids: set) -> None:
        in_flight_ids.discard(record.id)
        try:
            fetched = future.result()
        except DiskFull:
            raise
        except RecordError as exc:
            if exc.dropped:
                self._record_failed(record, "images", exc.reason, True, outcome="dropped")
            else:
                self._record_failed(record, "download", exc.reason, exc.permanent)
            return
        except Exception as exc:  # a bug must not sink the whole run
            log.debug("unexpected download error for %s", record.id, exc_info=True)
            self._record_failed(record, "download", f"unexpected {exc.__class__.__name__}",
                                permanent=False)
            return
        try:
            self.placer.place(record, fetched, self.early_claims.pop(record.id, None))
        except RecordError as exc:
            fetched.temp_path.unlink(missing_ok=True)
            self._record_failed(record, "store", exc.reason, exc.permanent)
            return
        self.store.add(record)

    def _record_failed(self, record: Record, stage: str, reason: str, permanent: bool,
                       outcome: str | None = None) -> None:
        outcome = outcome or ("rejected" if permanent else "failed")
        log.info("%s: %s %s: %s", record.id, stage, outcome, reason)
        self.summary.fail(record.source, record.term, stage, reason, outcome)
        self.state.set_status(record.id, record.source, record.term, outcome,
                              reason=f"{stage}: {reason}")

    def _note_pending(self) -> None:
        counts = self.state.counts()
        retry = counts.get("failed", 0) + counts.get("downloaded", 0)
        if retry:
            self.summary.pending_note = (f"{retry} record(s) not finished; run again to retry them")

