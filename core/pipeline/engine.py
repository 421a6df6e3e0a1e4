"""The pipeline: sources -> download -> enrichers -> sinks, streaming and resumable.

The stages, as Scrapy splits its engine: sources are read ahead in a thread of their
own (the engine never waits on a search page); downloads and image checks run in a pool
of worker processes or threads (``downloading``); each checked download is placed as its
content's file (``placing``); records are then enriched and stored in batches
(``storing``). Every stage is handed the run's context (``run.RunContext``), whose ledger
records each outcome in the summary and the run state at once. What the run covers, the
whole recipe or a cluster worker's shards, is its scope's business (``scope``).
Everything that touches the run state, the image folder and the sinks happens on this
engine's own thread, so there is one writer and no lock around any of it. This file is
the loop that ties the stages together, start and stop included.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from itertools import islice

from ..contract.plugin import Context, Plugin
from ..contract.recipe import PluginSpec, Recipe
from ..contract.registry import build_plugin
from ..contract.shards import Coordinator, Shard
from ..download.fetch import Fetcher
from ..download.http import SearchBudget
from ..errors import DiskFull, PluginConfigError, RecordError, disk_full, one_line
from ..output.state import FINAL
from ..record import Record
from .placing import ImagePlacer
from .run import STATE_DIR as STATE_DIR  # where core/cluster finds it
from .run import RunContext, failure
from .scope import LocalScope, Scope
from .stopping import Interrupted, StopSignals
from .storing import BatchStore
from .summary import Progress, Summary

SOURCE_READ_AHEAD = 1000
PLAN_THREADS = 4
LOOKUP_CHUNK = 256
WAIT_SLICE = 0.2  # how often a waiting engine thread looks for a stop request

log = logging.getLogger("harvest.engine")


class Engine:
    def __init__(self, recipe: Recipe, *, limit: int | None = None, progress: bool = True,
                 scope: Scope | None = None,
                 coordinator: Coordinator | None = None, verify_sinks: bool = False,
                 stop_requested: threading.Event | None = None,
                 reconsider: set[str] | None = None):
        """``scope``: what this run covers; the whole recipe on this machine unless a
        cluster worker passes its shards (``ShardScope``)."""
        self.recipe = recipe
        self.scope = scope or LocalScope()
        self.limit = limit
        self.verify_sinks = verify_sinks
        self.reconsider = reconsider or set()
        self.show_progress = progress
        # A caller that handles signals itself passes its stop event; otherwise the engine
        # turns SIGINT/SIGTERM into one while it runs.
        self.own_signals = stop_requested is None
        self.context = RunContext(recipe, root=self.scope.root(recipe.output),
                                  coordinator=coordinator or Coordinator(),
                                  stop_requested=stop_requested or threading.Event())
        self.settings = recipe.run
        self.hints: dict = {}
        self.search_failures = 0
        self.fetcher = Fetcher.for_run(self.settings, self.context.folders.temp,
                                       reserve=self.context.coordinator.reserve)
        self.fetcher.on_notice = self.context.summary.note
        self.http = self.fetcher.http  # plugins' sessions share its per-host pacing

    def _plugin_context(self, spec: PluginSpec) -> Context:
        context = self.context
        return Context(recipe_name=self.recipe.name, recipe_dir=self.recipe.directory,
                       output_dir=context.folders.output, terms=self.recipe.terms,
                       http=self.http, log=logging.getLogger(f"harvest.{spec.kind}.{spec.label}"),
                       hints=self.hints, name=spec.label, part_dir=self.scope.part_dir,
                       coordinator=context.coordinator,
                       budget=SearchBudget(self.settings.max_api_calls,
                                           self.settings.search_deadline)
                       if spec.kind == "sources" else None,
                       on_bad_item=lambda reason, query: context.count_under(
                           spec.label, query.term if query else None, "rejected", "source",
                           reason))

    def _build(self, spec: PluginSpec) -> Plugin:
        return build_plugin(self.recipe, spec, self._plugin_context(spec))

    def run(self) -> Summary:
        with self.scope.lock(self.context):
            return self._run()

    def _run(self) -> Summary:
        context, folders, summary = self.context, self.context.folders, self.context.summary
        (folders.output / "images").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folders.temp, ignore_errors=True)  # parts of downloads a crash cut off
        folders.temp.mkdir(parents=True)
        state = context.open_state()
        self.placer = ImagePlacer(context)
        run_id = state.start_run()
        self.scope.begin(context)
        if self.reconsider:
            count = state.reconsider(self.reconsider)
            log.info("%d record(s) %s before: reconsidered", count,
                     " or ".join(sorted(self.reconsider)))
        if not self.settings.respect_robots:
            log.warning("run.respect_robots is false: the image hosts' robots.txt is not "
                        "read; make sure you may collect from them")
        progress = Progress(summary, enabled=self.show_progress)
        try:
            # A cluster worker runs the engine in a thread of its own, where signals cannot
            # go; there the client's stop request arrives with the scope's progress reports.
            with ExitStack() as stack:
                stack.callback(context.coordinator.close)
                if self.own_signals:
                    stack.enter_context(StopSignals(context.stop_requested))
                sinks = [(spec, self._open(stack, spec)) for spec in self.recipe.sinks]
                enrichers = [(spec, self._open(stack, spec)) for spec in self.recipe.enrichers]
                for _, enricher in enrichers:
                    self.hints.update(enricher.source_hints())
                self.fetcher.analyses = tuple(dict.fromkeys(
                    name for _, enricher in enrichers for name in enricher.picture_analyses()))
                sources = [(spec, self._open(stack, spec)) for spec in self.recipe.sources]
                for spec, sink in sinks:
                    sink.resume(state.checkpoint(spec.label))
                self.store = BatchStore(context, enrichers, sinks)
                if self.verify_sinks:
                    self.store.verify_sinks()
                try:
                    self._pump(sources, progress)
                    # Complete means every record found reached its end: stored, or
                    # dropped or rejected for a reason that will not change. A transient
                    # failure, a record a sink never took, or a failed search is not that.
                    unfinished = summary.total("failed") or self.search_failures
                    summary.outcome = "incomplete" if unfinished else "complete"
                except (KeyboardInterrupt, Interrupted):
                    summary.outcome = "interrupted"
                    log.warning("interrupted: progress is saved; run again to resume")
            # The sinks are closed: a shard built at the end may have left records out.
            self.store.take_refusals()
            if summary.outcome == "complete" and summary.total("failed"):
                summary.outcome = "incomplete"
        except (DiskFull, OSError) as exc:
            # Also a sink that meets the full disk when it closes (a shard built at the end).
            if not (isinstance(exc, DiskFull) or disk_full(exc)):
                raise
            summary.outcome = "failed"
            summary.error = str(exc if isinstance(exc, DiskFull) else DiskFull(folders.root))
        finally:
            progress.close()
            if summary.outcome == "running":
                summary.outcome = "failed"
            # On a full disk each of these may fail in turn; what was committed stays.
            for step in (self._note_pending,
                         lambda: state.finish_run(run_id, summary.outcome, summary.to_dict()),
                         state.close,
                         lambda: summary.save(folders.state / "last-run.json")):
                try:
                    step()
                except (DiskFull, OSError) as exc:
                    if not (isinstance(exc, DiskFull) or disk_full(exc)):
                        raise
            shutil.rmtree(folders.temp, ignore_errors=True)
        return summary

    def plan(self) -> list[Shard]:
        """The recipe's work as shards, in the order one machine would search them: one per
        source and query, or per partition where the source splits a query."""
        shards: list[Shard] = []
        with ExitStack() as stack:
            for spec in self.recipe.enrichers:
                self.hints.update(self._open(stack, spec).source_hints())
            sources = [(spec, self._open(stack, spec)) for spec in self.recipe.sources]
            streams = list(self.scope.streams(self.context, sources))

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
        context = self.context
        max_in_flight = self.settings.concurrency * 2
        in_flight: dict[Future, Record] = {}
        in_flight_ids: set[str] = set()
        self.finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
        store = self.store
        downloads = self.scope.downloads(context, self.fetcher)
        try:
            for record, prefetched in self._with_known(self._produced(sources)):
                if record.id in in_flight_ids or record.id in store.held_ids:
                    context.count(record, "skipped")
                    continue
                known = self._known(record.id, prefetched)
                if known is not None and known.status in FINAL:
                    context.count(record, "skipped")
                    continue
                if known is not None and known.status == "downloaded" \
                        and self.placer.reuse(record, known):
                    store.add(record)
                    continue
                while len(in_flight) >= max_in_flight:
                    self._collect(in_flight, in_flight_ids, block=True)
                    self._tick(progress)
                future = downloads.submit(record)
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
            downloads.shutdown()
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
            downloads.shutdown()
            progress.update()

    def _tick(self, progress: Progress) -> None:
        self.context.check_stop()
        progress.update()
        self.scope.tick(self.context)

    def report_progress(self) -> None:
        self.scope.report(self.context)

    def _produced(self, sources) -> Iterator[list[Record]]:
        """The sources' records, read ahead in a thread of their own (a bounded queue), so
        the engine thread never waits on a source's network calls; handed over as lists
        of what is waiting (one record from a slow source, up to a chunk from a fast one)."""
        handoff: queue.Queue = queue.Queue(maxsize=SOURCE_READ_AHEAD)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for record in self.scope.claimed(self.context, self._candidates(sources)):
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
                    self.context.check_stop()
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
        state = self.context.state
        if prefetched is not None and prefetched.status in FINAL:
            return prefetched
        if prefetched is None and record_id not in state.known_ids:
            return None
        return state.record(record_id)

    def _with_known(self, chunks: Iterator[list[Record]]):
        """(record, what the run state knew of it), looked up a chunk at a time: a
        re-run of a finished harvest asks SQLite once per chunk, not once per record."""
        for chunk in chunks:
            known = self.context.state.records([record.id for record in chunk])
            for record in chunk:
                yield record, known.get(record.id)

    def _candidates(self, sources) -> Iterator[Record]:
        """In the sources' thread: every record the scope's searches yield, up to the
        run's limit, each marked with its source's label."""
        context = self.context
        found = 0
        said: set[tuple[str, str]] = set()
        for spec, source, query, limit in self.scope.streams(context, sources):
            budget = source.context.budget
            if budget is not None:
                budget.start()
            try:
                for record in islice(source.records(query), limit):
                    if record.query is None and query is not None and source.uses_terms:
                        record.query = query
                    record.local_file_ok = source.reads_local_files
                    record.source_label = spec.label
                    if not record.url:
                        context.count(record, "rejected", "source", "no image URL")
                        continue
                    context.found(record)
                    yield record
                    found += 1
                    if self.limit is not None and found >= self.limit:
                        return
            except PluginConfigError:
                raise
            except Exception as exc:
                # One failed query (an API outage after retries) must not end the run.
                reason = one_line(exc)
                # The same failure for every term (the network down) is said once on the
                # terminal; the log file keeps every term's line.
                level = logging.INFO if (spec.label, reason) in said else logging.ERROR
                said.add((spec.label, reason))
                log.log(level, "%s: search %r failed: %s", spec.label,
                        query.text if query else "", reason)
                context.summary.note_reason(spec.label, "search", reason)
                self.search_failures += 1

    def _finished(self, in_flight: dict, block: bool) -> list[Future]:
        """Downloads done since the last call, from the completion queue (no scanning)."""
        finished = []
        while block:
            try:
                finished.append(self.finished.get(timeout=WAIT_SLICE))
                break
            except queue.Empty:
                self.context.check_stop()
        while True:
            try:
                finished.append(self.finished.get_nowait())
            except queue.Empty:
                return [future for future in finished if future in in_flight]

    def _collect(self, in_flight: dict, in_flight_ids: set, block: bool) -> None:
        for future in self._finished(in_flight, block):
            self._absorb(future, in_flight.pop(future), in_flight_ids)

    def _absorb(self, future: Future, record: Record, in_flight_ids: set) -> None:
        """A finished download, to the files stage and then to the batch store."""
        in_flight_ids.discard(record.id)
        try:
            download = future.result()
        except DiskFull:
            raise
        except RecordError as exc:
            if exc.dropped:
                self.context.finish(record, "images", "dropped", exc.reason)
            else:
                self.context.finish(record, "download", failure(exc), exc.reason)
            return
        except Exception as exc:  # a bug must not sink the whole run
            log.debug("unexpected download error for %s", record.id, exc_info=True)
            self.context.finish(record, "download", "failed",
                                f"unexpected {exc.__class__.__name__}")
            return
        try:
            self.placer.place(record, download)
        except RecordError as exc:
            download.fetched.temp_path.unlink(missing_ok=True)
            self.context.finish(record, "store", failure(exc), exc.reason)
            return
        self.store.add(record)

    def _note_pending(self) -> None:
        counts = self.context.state.counts()
        retry = counts.get("failed", 0) + counts.get("downloaded", 0)
        if retry:
            self.context.summary.pending_note = (f"{retry} record(s) not finished; run again "
                                                 f"to retry them")
