"""The enrich-and-store stage: records gathered into batches, enriched, and written to
every sink; a batch a sink refuses is held and retried, never lost or written twice.

Each batch is committed to the run state with the sinks' checkpoints in one
transaction; a sink that already has part of a batch (another sink failed) is not given
it again (the ``delivered`` table). Runs on the engine's thread only.
"""

from __future__ import annotations

import logging
import time

from ..contract.recipe import PluginSpec
from ..errors import DiskFull, PluginConfigError, disk_full, one_line
from ..record import Record
from .run import RunContext

FLUSH_SECONDS = 5.0
SINK_RETRY_INTERVAL = 2.0
MAX_PENDING_RECORDS = 10_000
WAIT_SLICE = 0.2  # how often a wait looks for a stop request

log = logging.getLogger("harvest.engine")


class BatchStore:
    def __init__(self, context: RunContext, enrichers: list, sinks: list):
        """``enrichers``, ``sinks``: (spec, opened plugin) pairs, in the recipe's order."""
        self.context = context
        self.enrichers = enrichers
        self.sinks = sinks
        self.state = context.state
        self.resolver = context.recipe.resolver
        self.batch: list[Record] = []
        self.last_flush = time.monotonic()
        self.held_ids: set[str] = set()  # in the batch or pending: found again, not redone
        self.pending: list[tuple[list[Record], list]] = []
        self.pending_records = 0
        self.next_pending_retry = 0.0
        self.last_sink_error: dict[str, str] = {}

    def give_up_pending(self) -> None:
        """The run is stopping: held batches are counted as not stored (the run state
        keeps them as downloaded; the next run writes them)."""
        for batch, _ in self.pending:
            self._give_up(batch)
        self.pending, self.pending_records = [], 0

    def verify_sinks(self) -> None:
        """Asks each sink which records the run state calls stored it does not have (a
        database that lost acknowledged writes, a file restored from an old backup);
        those are reopened, and this run writes them again to the sinks that lack them."""
        reopened = 0
        for ids in self.state.done_ids():
            lacking: dict[str, set[str]] = {}
            for spec, sink in self.sinks:
                missing = sink.missing(ids)
                if missing:
                    lacking[spec.label] = missing
            if not lacking:
                continue
            reopened += self._reopen(lacking)
            self.state.commit()
            for label, missing in lacking.items():
                log.warning("verify: sink %s lacks %d stored record(s)", label, len(missing))
        self.context.summary.notes.append(
            f"verify: {reopened} stored record(s) missing from a sink; written again when "
            f"their sources yield them" if reopened else
            "verify: every sink has every stored record")

    def add(self, record: Record) -> None:
        if self.resolver.revealed:
            # A secret in an endpoint or a folder path must not reach the records (a URL
            # that quotes it) any more than the logs.
            record.url = self.resolver.redact(record.url) if record.url else record.url
            record.fields = self.resolver.redact_value(record.fields)
        self.batch.append(record)
        self.held_ids.add(record.id)
        if (len(self.batch) >= self.context.settings.batch_size
                or time.monotonic() - self.last_flush >= FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        self.last_flush = time.monotonic()
        for spec, enricher in self.enrichers:
            if not batch:
                break
            kept = self._enrich(spec, enricher, batch)
            if len(kept) != len(batch):
                kept_ids = {record.id for record in kept}
                self.held_ids.difference_update(r.id for r in batch if r.id not in kept_ids)
            batch = kept
        if batch:
            self._store(batch, list(self.sinks))
        if self.pending and time.monotonic() >= self.next_pending_retry:
            self._retry_pending()
        self.take_refusals()
        self.state.commit()

    def take_refusals(self) -> None:
        """Records a sink took but could not store after all (``Sink.refused``): failed
        for that sink with its reason; the other sinks keep theirs, and the next time a
        source yields them they are written again to that sink only."""
        lacking: dict[str, set[str]] = {}
        failed: set[str] = set()
        for spec, sink in self.sinks:
            for refusal in sink.refused():
                lacking.setdefault(spec.label, set()).add(refusal.record_id)
                log.info("sink %s: %s: %s", spec.label, refusal.record_id, refusal.reason)
                self.context.refused(refusal, spec.label, first=refusal.record_id not in failed)
                failed.add(refusal.record_id)
        for label, ids in lacking.items():
            log.warning("sink %s could not store %d record(s); the next run writes them "
                        "again", label, len(ids))
        if lacking:
            self._reopen(lacking)

    def _reopen(self, lacking: dict[str, set[str]]) -> int:
        """Stored records some sinks lack (sink label -> ids): the others keep theirs,
        and the records are written again, to those sinks only, when their sources yield
        them. Returns how many."""
        reopen = sorted(set().union(*lacking.values()))
        for spec, _ in self.sinks:
            has = [i for i in reopen if i not in lacking.get(spec.label, ())]
            if has:
                self.state.mark_delivered(spec.label, has)
        self.state.reopen(reopen)
        return len(reopen)

    def _store(self, batch: list[Record], sinks: list) -> bool:
        """Writes a batch to each sink that does not have it yet; True when all have it."""
        ids = [record.id for record in batch]
        waiting = []
        written = []
        for spec, sink in sinks:
            already = self.state.delivered(spec.label, ids)
            todo = [record for record in batch if record.id not in already]
            try:
                checkpoint = sink.write(todo) if todo else None
            except PluginConfigError:
                raise
            except Exception as exc:
                if disk_full(exc):
                    # The sinks before this one have the batch, and their checkpoints
                    # say so: the next run must not give it to them again.
                    for label in written:
                        self.state.mark_delivered(label, ids)
                    raise DiskFull(self.context.folders.root) from None
                reason = one_line(exc)
                log.warning("sink %s failed a batch of %d; keeping it to retry: %s",
                            spec.label, len(todo), reason[:300])
                self.last_sink_error[spec.label] = reason[:200]
                waiting.append((spec, sink))
                continue
            if todo:
                self.state.set_checkpoint(spec.label, checkpoint)
            written.append(spec.label)
        if waiting:
            waiting_labels = {spec.label for spec, _ in waiting}
            for spec, _ in sinks:
                if spec.label not in waiting_labels:
                    self.state.mark_delivered(spec.label, ids)
            self._hold(batch, waiting)
            return False
        for record in batch:
            self.context.finish(record, "sink", "stored")
        self.state.forget_delivered(ids)
        self.held_ids.difference_update(ids)
        return True

    def _hold(self, batch: list[Record], sinks: list) -> None:
        self.pending.append((batch, sinks))
        self.pending_records += len(batch)
        self.next_pending_retry = time.monotonic() + SINK_RETRY_INTERVAL
        while self.pending_records > MAX_PENDING_RECORDS:
            # Past this, memory would grow with the outage; the run state keeps these
            # records as downloaded, and the next run writes them.
            dropped, _ = self.pending.pop(0)
            self.pending_records -= len(dropped)
            self._give_up(dropped)

    def _retry_pending(self) -> None:
        held, self.pending, self.pending_records = self.pending, [], 0
        for index, (batch, sinks) in enumerate(held):
            if not self._store(batch, sinks):
                for rest_batch, rest_sinks in held[index + 1:]:
                    self._hold(rest_batch, rest_sinks)
                return

    def drain(self) -> None:
        """At the end: keeps retrying held batches for ``sink_retry_seconds``."""
        deadline = time.monotonic() + self.context.settings.sink_retry_seconds
        while self.pending and time.monotonic() < deadline:
            while time.monotonic() < min(self.next_pending_retry, deadline):
                self.context.check_stop()
                time.sleep(WAIT_SLICE)
            self._retry_pending()
            self.state.commit()
        for batch, _ in self.pending:
            self._give_up(batch)
        self.pending, self.pending_records = [], 0

    def _give_up(self, batch: list[Record]) -> None:
        reason = "; ".join(f"{label}: {error}" for label, error in self.last_sink_error.items())
        self.held_ids.difference_update(record.id for record in batch)
        for record in batch:  # the run state keeps them as downloaded
            self.context.count(record, "failed", "sink", f"not stored yet ({reason})")

    def _enrich(self, spec: PluginSpec, enricher, batch: list[Record]) -> list[Record]:
        stage = f"enrich {spec.label}"
        try:
            enricher.enrich(batch)
        except PluginConfigError:
            raise
        except Exception:
            log.debug("%s failed a batch; retrying record by record", stage, exc_info=True)
            survivors = []
            for record in batch:
                try:
                    enricher.enrich([record])
                    survivors.append(record)
                except PluginConfigError:
                    raise
                except Exception as exc:
                    self.context.finish(record, stage, "failed",
                                        f"{exc.__class__.__name__}: {exc}")
            batch = survivors
        kept = []
        for record in batch:
            if record.dropped:
                self.context.finish(record, stage, "dropped", record.dropped)
            else:
                kept.append(record)
        return kept
