"""What a run covers, and what follows from it: the whole recipe on one machine
(``LocalScope``), or a cluster worker's shards of it (``ShardScope``, built by
``core/cluster``). The engine asks its ``Scope`` and never which one it has.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ..cleaning.curation import write_scoring
from ..contract.recipe import verdict_settings
from ..contract.shards import Shard
from ..download.fetch import Fetched, Fetcher
from ..download.fetchpool import ProcessFetchPool
from ..output.lock import OutputLock
from ..output.storage import image_relpath
from ..output.takedown import remember_sinks
from ..record import Query, Record
from .downloading import Download, ProcessDownloads, ThreadDownloads
from .run import RunContext
from .stopping import Interrupted

CLAIM_CHUNK = 64
REPORT_SECONDS = 1.0

log = logging.getLogger("harvest.engine")


class Scope(Protocol):
    part_dir: Path | None  # where unshared sinks write their part (plugin ``Context``)

    def root(self, output: Path) -> Path:
        """Where the run state lives."""

    def lock(self, context: RunContext) -> contextlib.AbstractContextManager:
        """Held for the whole run: one writer of the output folder at a time."""

    def begin(self, context: RunContext) -> None:
        """Before the loop, the run state open: the output's own files (the review page's
        scoring, the sinks a takedown must reach) and the warnings about it."""

    def streams(self, context: RunContext, sources) -> Iterator[tuple]:
        """(spec, source, query, limit): the searches this run makes, in order."""

    def claimed(self, context: RunContext, records: Iterator[Record]) -> Iterator[Record]:
        """The records no other pipeline holds (in the sources' thread)."""

    def downloads(self, context: RunContext, fetcher: Fetcher):
        """The download pool: ``submit(record) -> Future[Download]``, ``shutdown()``."""

    def tick(self, context: RunContext) -> None:
        """Between steps of the loop: progress for whoever watches the run."""

    def report(self, context: RunContext) -> None:
        """Progress now; raises ``Interrupted`` when the watcher asks the run to stop."""


def _fetch(fetcher: Fetcher, record: Record) -> Fetched:
    return fetcher.fetch(record.url, local_files=record.local_file_ok,
                         expect_sha1=record.expect_sha1)


class LocalScope:
    """The whole recipe, on one machine: this run owns the output folder."""

    part_dir: Path | None = None

    def root(self, output: Path) -> Path:
        return output

    def lock(self, context: RunContext):
        return OutputLock(context.folders.root)

    def begin(self, context: RunContext) -> None:
        """The output's own files and warnings, before the loop."""
        recipe, state = context.recipe, context.state
        # What the review page starts from.
        write_scoring(context.folders.root, [(spec.cls, spec.options) for spec in recipe.enrichers])
        remember_sinks(recipe)
        # A refusal holds while what decided it holds: after allow_private_addresses or a
        # license filter changed, skipping what they refused would hide the change.
        for stage, changed, count in state.reconsider_changed(verdict_settings(recipe)):
            log.warning("%s: %s changed since the last run: the %d record(s) it rejected or "
                        "dropped go through again", stage, ", ".join(changed), count)
        if state.removals():
            log.warning("a takedown or purge was interrupted and is not finished: its "
                        "pictures are not stored again, but may still be in the sinks; run "
                        "`harvest takedown` or `harvest purge` again to finish it")
        if recipe.retain_days:
            past = state.stored_before(time.time() - recipe.retain_days * 86400)
            if past:
                log.warning("%d stored image(s) are older than retain_days (%d): run "
                            "`harvest purge %s`", past, recipe.retain_days, recipe.path)

    def streams(self, context: RunContext, sources) -> Iterator[tuple]:
        """(spec, source, query, limit) in the order a single machine searches them."""
        for spec, source in sources:
            if not source.uses_terms:
                yield spec, source, None, None
                continue
            for term in context.recipe.terms:
                for lang, text in term.queries:
                    yield (spec, source, Query(term.key, lang, text),
                           source.query_limit or context.settings.limit_per_term)

    def claimed(self, context: RunContext, records: Iterator[Record]) -> Iterator[Record]:
        """Alone, every record is this run's."""
        return records

    def downloads(self, context: RunContext, fetcher: Fetcher):
        settings = context.settings
        # One process per core by default, but never more than there are downloads.
        workers = settings.workers or min(os.cpu_count() or 1, settings.concurrency)
        if workers <= 1:
            return ThreadDownloads(settings.concurrency,
                                   lambda record: Download(_fetch(fetcher, record)))
        return ProcessDownloads(ProcessFetchPool(settings, context.folders.temp, workers,
                                                 context.summary.note, fetcher.analyses))

    def tick(self, context: RunContext) -> None:
        """Nobody else watches this run."""

    def report(self, context: RunContext) -> None:
        """Nobody else watches this run."""


class ShardScope:
    """A cluster worker's shards of the recipe. The client holds the output's lock and
    keeps the output's own files; this run keeps its run state and the parts of the
    unshared sinks in ``part_dir``, and its images go to the output folder. Records and
    pictures are claimed on the scheduler, so that no two shards take one twice.
    ``tombstones``: the output's taken-down content (the shard's state does not know it)."""

    def __init__(self, shards: list[Shard], part_dir: Path, tombstones: set[str] = frozenset()):
        self.shards = shards
        self.part_dir = part_dir
        self.tombstones = set(tombstones)
        self.last_report = 0.0

    def root(self, output: Path) -> Path:
        return self.part_dir

    def lock(self, context: RunContext):
        return contextlib.nullcontext()

    def begin(self, context: RunContext) -> None:
        context.state.tombstones |= self.tombstones

    def streams(self, context: RunContext, sources) -> Iterator[tuple]:
        by_label = {spec.label: (spec, source) for spec, source in sources}
        for shard in self.shards:
            spec, source = by_label[shard.source]
            if shard.term is not None:
                query = Query(shard.term, shard.lang, shard.text, shard.part)
            else:  # a source without terms: only its part, if it split its input
                query = None if shard.part is None else Query("", "", "", shard.part)
            yield spec, source, query, shard.limit

    def claimed(self, context: RunContext, records: Iterator[Record]) -> Iterator[Record]:
        """Records another shard holds already are skipped before download."""
        chunk: list[Record] = []
        for record in records:
            chunk.append(record)
            if len(chunk) >= CLAIM_CHUNK:
                yield from self._claim(context, chunk)
                chunk = []
        yield from self._claim(context, chunk)

    def _claim(self, context: RunContext, chunk: list[Record]) -> list[Record]:
        if not chunk:
            return []
        elsewhere = context.coordinator.claim_records([record.id for record in chunk])
        for record in chunk:
            if record.id in elsewhere:
                context.count(record, "skipped")
        return [record for record in chunk if record.id not in elsewhere]

    def downloads(self, context: RunContext, fetcher: Fetcher):
        def download(record: Record) -> Download:
            """In a download thread: the content is claimed here too, so that the engine
            thread does not wait on the scheduler for it."""
            fetched = _fetch(fetcher, record)
            relpath = image_relpath(record.term or record.source, record.source,
                                    record.source_id, fetched.file.format)
            claim = context.coordinator.claim_file(fetched.file.sha256, record.id, relpath)
            return Download(fetched, (relpath, claim))

        return ThreadDownloads(context.settings.concurrency, download)

    def tick(self, context: RunContext) -> None:
        if time.monotonic() - self.last_report >= REPORT_SECONDS:
            self.report(context)

    def report(self, context: RunContext) -> None:
        """The counts, to the client; the client's stop request arrives in the answer
        (a worker's engine runs in a thread, where signals cannot go)."""
        self.last_report = time.monotonic()
        if context.coordinator.report(context.summary.rows()):
            raise Interrupted()
