"""Base classes for the three kinds of plugin, and the context the engine gives them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pluggy

from .options import Option
from .record import Query, Record, Term

if TYPE_CHECKING:
    import requests

    from .http import HttpClient

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

    @property
    def state_dir(self) -> Path:
        """Where a plugin may keep files of its own (caches), beside the run state."""
        return self.output_dir / ".harvest"

    def session(self, *, retry_post: bool = False) -> "requests.Session":
        """A polite HTTP session: per-host rate limit, retries with backoff, timeouts."""
        return self.http.session(retry_post=retry_post)


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
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Source(Plugin):
    """Yields records. ``uses_terms`` sources are asked once per term and language."""

    uses_terms: ClassVar[bool] = True

    @property
    def query_limit(self) -> int | None:
        """Records wanted per query, when the source's options say (else the run's limit)."""
        return None

    def records(self, query: Query | None) -> Iterator[Record]:
        raise NotImplementedError


class Enricher(Plugin):
    """Adds fields to records of a batch, or drops some with ``record.drop(reason)``.

    Raising fails the batch; the engine then retries record by record so that one bad
    record does not take its neighbours down with it.
    """

    def enrich(self, records: list[Record]) -> None:
        raise NotImplementedError

    def source_hints(self) -> dict[str, Any]:
        """Filters this enricher applies that sources may push to their servers."""
        return {}


class Sink(Plugin):
    """Stores records. ``write`` must be idempotent by ``record.id``.

    ``write`` may return a checkpoint (any JSON value); the engine stores it in the run
    state in the same transaction that marks the batch done, and gives the last one back
    to ``resume`` at the next start, so a sink can discard a batch whose commit never landed.
    """

    is_default: ClassVar[bool] = False

    def resume(self, checkpoint: Any) -> None:
        """Called after ``open`` with the last committed checkpoint (None on a first run)."""

    def write(self, records: list[Record]) -> Any:
        raise NotImplementedError

    def rekey(self, rotate: Callable[[dict], dict | None]) -> int:
        """Re-encrypt stored documents: ``rotate`` returns the new document, or None when it
        is already under the new key. Returns how many changed. Must be safe to interrupt
        and run again."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-encrypt")
