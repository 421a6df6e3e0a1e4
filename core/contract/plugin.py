"""Base classes for the three kinds of plugin, and the context the engine gives them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pluggy

from ..errors import one_line
from ..options import Option
from ..output.derived import declare
from ..record import Query, Record, Term
from .shards import Coordinator, state_dirs

if TYPE_CHECKING:
    import requests

    from ..download.http import HttpClient, SearchBudget

hookimpl = pluggy.HookimplMarker("harvest")


@dataclass
class Context:
    """What the engine lends a plugin: where to write, how to reach the network, how to log."""

    recipe_name: str
    recipe_dir: Path
    output_dir: Path
    terms: Sequence[Term]
    http: "HttpClient"
    log: logging.Logger
    # What enrichers will drop anyway (e.g. {"license_families": [...]}); a source that
    # can filter on its server's side uses it so that quota is not spent on them.
    hints: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""  # the plugin's name in the recipe
    # On a cluster, the shard's own folder: a sink that is not ``shared`` writes its part
    # there (see ``Sink.part_documents``). None on one machine.
    part_dir: Path | None = None
    coordinator: Coordinator = field(default_factory=Coordinator)
    # A source's: the API calls and waiting time each of its searches may spend.
    budget: SearchBudget | None = None
    # Where a source's skipped items are counted: (reason, query) -> None.
    on_bad_item: Callable[[str, Query | None], None] | None = None

    @property
    def state_dir(self) -> Path:
        """Where a plugin may keep files of its own (caches), beside the run state."""
        return (self.part_dir or self.output_dir) / ".harvest"

    def declare_derived(self, file_name: str, table: str, column: str,
                        key: str = "sha256") -> None:
        """Declares a store of the plugin's own (an SQLite ``file_name`` in ``state_dir``)
        that holds what it computed from pictures, one row per picture in ``table``, whose
        ``column`` is the picture's sha256 (``key="sha256"``) or its record's id
        (``"record_id"``): a takedown or purge deletes those rows with the pictures.
        Declare it when the plugin opens, before the store holds a row."""
        declare(self.state_dir, file_name, table, column, key)

    @property
    def output_state_dirs(self) -> list[Path]:
        """This pipeline's state folder, then the output's others (the main one, each
        cluster shard's): where stores of earlier runs and other shards are."""
        return [self.state_dir] + [d for d in state_dirs(self.output_dir) if d != self.state_dir]

    def take(self, key: str, rate: float, burst: float = 1.0) -> None:
        """Waits for a token of bucket ``key`` (``rate`` per second, ``burst`` at most):
        an API quota. On a cluster the bucket is shared by every worker."""
        delay = self.coordinator.reserve(key, rate, burst)
        if delay > 0:
            time.sleep(delay)

    def bad_item(self, reason: str, query: Query | None = None) -> None:
        """An item of an API's answer that cannot be read: logged and counted (rejected,
        with ``reason``), while the search goes on with the rest."""
        self.log.warning("%s: skipped an item of the API's answer: %s", self.name, reason)
        if self.on_bad_item is not None:
            self.on_bad_item(reason, query)

    def session(self, *, retry_post: bool = False) -> "requests.Session":
        """A polite HTTP session: per-host rate limit, retries with backoff, timeouts."""
        return self.http.session(retry_post=retry_post, budget=self.budget)


class Plugin:
    """Common ground: declared options, validated before the plugin is built."""

    options: ClassVar[Sequence[Option]] = ()

    def __init__(self, options: Mapping[str, Any], context: Context):
        self.config = dict(options)
        self.context = context
        self.log = context.log

    def open(self) -> None:
        """Acquire resources (connections, files); called once before the first record."""

    def close(self) -> None:
        """Release what ``open`` acquired; called once, even after an error."""

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Checks that need several options or the local machine (a key file), made by
        ``harvest validate`` and before every run, never over the network. Raises
        ``OptionError(option_name, message)``."""

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Source(Plugin):
    """Yields records. ``uses_terms`` sources are asked once per term and language."""

    uses_terms: ClassVar[bool] = True
    # A source whose records are files on this machine by design (a folder the recipe
    # names) may hand out file: URLs; for any other, they need run.allow_file_urls.
    reads_local_files: ClassVar[bool] = False

    @property
    def query_limit(self) -> int | None:
        """Records wanted per query, when the source's options say (else the run's limit)."""
        return None

    @classmethod
    def needs_terms(cls, options: Mapping[str, Any]) -> bool:
        """Whether a recipe must have terms for this source, configured so."""
        return cls.uses_terms is not False

    def records(self, query: Query | None) -> Iterator[Record]:
        """Records for ``query`` (for the part of it in ``query.part``, when set)."""
        raise NotImplementedError

    def each_item(self, items: Any, convert: Callable[[Any], Record | None],
                  query: Query | None = None) -> Iterator[Record]:
        """``convert(item)`` for each item of a list from an API's answer, or of an
        iterator of such items (anything else, a dict or a string, is no items). An item
        it cannot read (a wrong type, a missing key: the exceptions reading one raises)
        is skipped with its reason, and the rest go on, instead of one bad item ending
        the whole search."""
        for item in items if isinstance(items, (list, Iterator)) else ():
            try:
                record = convert(item)
            except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
                self.context.bad_item(f"bad item in the answer ({one_line(exc)})", query)
                continue
            if record is not None:
                yield record

    def partitions(self, query: Query, limit: int | None) -> list[tuple[Any, int | None]]:
        """Splits a query into disjoint parts that workers can search apart, each with its
        share of ``limit``: ``[(part, limit), ...]``, parts JSON-safe. The parts' records
        together must be the records one ``records(query)`` call would give. The default
        is one part: the whole query. Called for several queries at once, from threads.

        A source that does not use terms is asked with ``query`` None (its whole input);
        ``records`` then gets ``Query("", "", "", part)`` for each part it made."""
        return [(None, limit)]


class Enricher(Plugin):
    """Adds fields to records of a batch, or drops some with ``record.drop(reason)``.

    Raising fails the batch; the engine then retries record by record so that one bad
    record does not take its neighbours down with it.
    """

    # The record field holding this enricher's numeric scores, when it has some: the
    # review page offers a slider per score, and its ``keep_if`` option (a
    # ``Thresholds``) is where the page starts. None: no scores.
    scores_field: ClassVar[str | None] = None

    def enrich(self, records: list[Record]) -> None:
        raise NotImplementedError

    def source_hints(self) -> dict[str, Any]:
        """Filters this enricher applies that sources may push to their servers."""
        return {}

    def picture_analyses(self) -> tuple[str, ...]:
        """Work to do in the download workers on each picture, while it is fresh there and
        the cores are many: ``"package.module:function"`` names of functions taking the
        picture's path and returning something that pickles. Asked once the enricher is
        open; the results reach ``enrich`` as ``record.analyses[name]`` (a text when the
        analysis failed). Nothing by default."""
        return ()


@dataclass(frozen=True)
class Refusal:
    """A record a sink could not store: see ``Sink.refused``."""

    record_id: str
    source: str
    term: str | None
    reason: str


class Sink(Plugin):
    """Stores records. ``write`` must be idempotent by ``record.id``.

    ``write`` may return a checkpoint (any JSON value); the engine stores it in the run
    state in the same transaction that marks the batch done, and gives the last one back
    to ``resume`` at the next start, so a sink can discard a batch whose commit never landed.
    """

    is_default: ClassVar[bool] = False
    # True when every worker of a cluster reaches the same store and writes there
    # directly (a database). False for files under the output folder: each shard writes
    # a part in ``context.part_dir``, and the client merges the parts at the end.
    shared: ClassVar[bool] = False

    def missing(self, record_ids: list[str]) -> set[str] | None:
        """Which of these records (the run state says they were stored here) the store
        does not have; None when the sink cannot tell. Used by ``run --verify-sinks``."""
        return None

    def resume(self, checkpoint: Any) -> None:
        """Called after ``open`` with the last committed checkpoint (None on a first run)."""

    def refused(self) -> list[Refusal]:
        """Records this sink accepted in a ``write`` but could not store after all (a
        shard sink that finds an image file gone or swapped for a link when it builds the
        shard), each given once. The engine fails them for this sink with the reason (the
        run is then incomplete) and writes them again when their sources yield them. Asked
        after each ``write`` and after ``close``."""
        return []

    def write(self, records: list[Record]) -> Any:
        raise NotImplementedError

    def remove(self, record_ids: set[str]) -> int:
        """Deletes these records from the store (``harvest takedown``, ``purge``); returns
        how many were there."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove records")

    def part_documents(self, part_dir: Path) -> Iterator[list[dict]]:
        """A finished shard's part, as the documents this sink wrote there, in batches.
        Needed by sinks that are not ``shared``, for cluster runs."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge a cluster's parts")

    def discard_part(self, part_dir: Path) -> None:
        """Called once a shard's part is merged (and committed): the part may go."""

    def write_documents(self, documents: list[dict]) -> Any:
        """Stores documents as ``part_documents`` gave them (already protected); returns a
        checkpoint, as ``write`` does."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge a cluster's parts")

    def rekey(self, rotate: Callable[[dict], dict | None]) -> int:
        """Re-encrypt stored documents: ``rotate`` returns the new document, or None when it
        is already under the new key. Returns how many changed. Must be safe to interrupt
        and run again."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-encrypt")
