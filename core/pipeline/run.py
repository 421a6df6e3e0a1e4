"""One run's context: what every stage of the pipeline shares, handed to each as one
object (as Scrapy hands each component its crawler), and the ledger of outcomes.

A record's outcome is written in two places, the summary a person reads and the run
state the next run resumes from. ``RunContext.finish`` is the one place that does both,
so that the two never disagree; ``count`` is for what changes nothing in the run state
(found, skipped, a copy, not stored yet). Both count under the recipe's label of the
source (``PluginSpec.label``), not the plugin's name: two ``folder`` sources named
``cats`` and ``dogs`` are two rows.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..contract.plugin import Refusal
from ..contract.recipe import Recipe
from ..contract.shards import Coordinator
from ..errors import RecordError
from ..output.state import RunState
from ..record import Record
from .stopping import Interrupted
from .summary import Summary

STATE_DIR = ".harvest"

log = logging.getLogger("harvest.engine")


@dataclass(frozen=True)
class Folders:
    """``output``: the recipe's output folder (the images, and what the sinks write);
    ``root``: where this run keeps its run state, the output itself or, on a cluster, the
    shard's part folder."""

    output: Path
    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def temp(self) -> Path:
        return self.state / "tmp"  # parts of downloads; cleared at each start and end


class RunContext:
    def __init__(self, recipe: Recipe, *, root: Path, coordinator: Coordinator,
                 stop_requested: threading.Event):
        self.recipe = recipe
        self.settings = recipe.run
        self.coordinator = coordinator
        self.folders = Folders(recipe.output, root)
        self.summary = Summary(recipe.name, recipe.resolver.redact)
        self.stop_requested = stop_requested
        self.state: RunState | None = None  # opened by the engine once the output is its
        # The labels each plugin's ``Record.source`` was yielded under: a sink's refusal
        # names only the record's source. Learned in the sources' thread.
        self._labels_of_source: dict[str, set[str]] = defaultdict(set)
        self._labels_lock = threading.Lock()

    def open_state(self) -> RunState:
        self.state = RunState(self.folders.state / "state.sqlite", self.recipe.resolver.redact)
        return self.state

    def check_stop(self) -> None:
        """Called between steps: a stop request ends the run there, never mid-write."""
        if self.stop_requested.is_set():
            raise Interrupted()

    # -- the ledger ---------------------------------------------------------------------------

    def found(self, record: Record) -> None:
        """A source yielded ``record`` (its ``source_label`` set)."""
        with self._labels_lock:
            self._labels_of_source[record.source].add(record.source_label)
        self.count(record, "found")

    def finish(self, record: Record, stage: str, outcome: str, reason: str | None = None) -> None:
        """``record`` leaves ``stage`` with ``outcome``: counted in the summary and
        written to the run state, the one place both happen. ``downloaded`` and
        ``stored`` carry the record's file; the others say why, in ``reason``."""
        if outcome == "stored":
            self.state.set_status(record.id, record.source, record.term, "done",
                                  sha256=record.file.sha256 if record.file else None)
        elif outcome == "downloaded":
            self.state.set_status(record.id, record.source, record.term, "downloaded",
                                  sha256=record.file.sha256, duplicate_of=record.duplicate_of)
        else:
            log.info("%s: %s %s: %s", record.id, stage, outcome, reason)
            self.state.set_status(record.id, record.source, record.term, outcome,
                                  reason=f"{stage}: {reason}")
        self.count(record, outcome, stage, reason)

    def count(self, record: Record, outcome: str, stage: str | None = None,
              reason: str | None = None) -> None:
        """An outcome the run state does not record (it knows already, or must not
        know yet): counted in the summary only."""
        self.count_under(record.source_label or record.source, record.term, outcome,
                         stage, reason)

    def count_under(self, label: str, term: str | None, outcome: str,
                    stage: str | None = None, reason: str | None = None) -> None:
        """What a source reports before there is a record (an item it could not read)."""
        self.summary.count(label, term, outcome)
        if reason is not None:
            self.summary.note_reason(label, stage, reason)

    def refused(self, refusal: Refusal, sink_label: str, *, first: bool) -> None:
        """A sink could not store a record it took (``Sink.refused``): its reason for
        that sink, and the record failed once (``first``) however many sinks refused it.
        The run state reopens it (``BatchStore.take_refusals``)."""
        with self._labels_lock:
            labels = sorted(self._labels_of_source.get(refusal.source, ()))
        # Two labels yielding one plugin's records cannot be told apart by a refusal.
        label = labels[0] if len(labels) == 1 else refusal.source
        self.summary.note_reason(label, f"sink {sink_label}", refusal.reason)
        if first:
            self.summary.count(label, refusal.term, "failed")


def failure(error: RecordError) -> str:
    """The outcome for a record's ``error``: rejected when trying again cannot help."""
    return "rejected" if error.permanent else "failed"
