"""The record: one image and what is known about it, as it moves through the pipeline."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Term:
    """A search term and its wordings; ``key`` names the term in every record it finds."""

    key: str
    queries: tuple[tuple[str, str], ...]  # (language, text), in recipe order

    @property
    def languages(self) -> list[str]:
        return [lang for lang, _ in self.queries]


@dataclass(frozen=True)
class Query:
    """One wording of one term, as a source is asked to search it."""

    term: str
    lang: str
    text: str
    # A slice of the query's results (a date range, a map tile), as the source's
    # ``partitions`` made it, so that several workers can share one query; None: all of it.
    part: Any = field(default=None, compare=False)


@dataclass
class FileInfo:
    """A picture's file: where it is in the output folder and what it holds. The one
    declaration of an image's facts: downloads, resized copies and stored files all
    carry one."""

    path: str  # relative to the output folder, with forward slashes; "" until placed
    bytes: int
    sha256: str
    width: int
    height: int
    format: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def content(self) -> dict[str, Any]:
        """What the file holds, wherever it is (a record's ``original``: the download
        that ``images:`` changed, which is stored nowhere)."""
        return {name: value for name, value in asdict(self).items() if name != "path"}


class FileClaim(NamedTuple):
    """A picture's content held by one record at one path of the output. It travels
    between client, scheduler and workers whole, as a JSON/msgpack list in this order."""

    sha256: str
    record_id: str
    path: str


@dataclass(frozen=True)
class FileClaimAnswer:
    """What a claim on content and its path gets. By default both are the claimer's;
    with ``owner``, another record holds the same bytes, at ``path``; ``path_taken``:
    other bytes hold that path, choose another."""

    owner: str | None = None
    path: str | None = None
    path_taken: bool = False


@dataclass
class Record:
    """A harvested image.

    ``fields`` holds what sources and enrichers know (title, license, place...);
    ``personal`` names the fields that hold personal data, which sinks protect.
    """

    source: str
    source_id: str
    url: str | None
    query: Query | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    personal: set[str] = field(default_factory=set)
    file: FileInfo | None = None
    duplicate_of: str | None = None
    dropped: str | None = None
    # The file's SHA-1 when the source knows it (Wikimedia Commons publishes it): the
    # download is checked against it.
    expect_sha1: str | None = field(default=None, repr=False, compare=False)
    # Set by the engine, never by a source: may this record's url be a file: URL?
    local_file_ok: bool = field(default=False, repr=False, compare=False)
    # The enrichers' picture analyses, done in the download worker (name -> result, or
    # the failure's text); never stored.
    analyses: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Set by the engine: the recipe's name for the source that yielded it (two instances
    # of one plugin share ``source``, which is in the id); the summary counts under it.
    source_label: str = field(default="", repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.source}:{self.source_id}"

    @property
    def term(self) -> str | None:
        return self.query.term if self.query else self.fields.get("term")

    def drop(self, reason: str) -> None:
        """Called by an enricher to leave this record out of the dataset."""
        self.dropped = reason

    def to_dict(self) -> dict[str, Any]:
        """The record as sinks store it; core keys win over same-named fields."""
        data = dict(self.fields)
        data.update({
            "id": self.id,
            "source": self.source,
            "source_id": self.source_id,
            "url": self.url,
        })
        if self.query is not None:
            data.update({"term": self.query.term, "lang": self.query.lang, "query": self.query.text})
        if self.file is not None:
            data["file"] = self.file.to_dict()
        if self.duplicate_of:
            data["duplicate_of"] = self.duplicate_of
        return data


_VERSION = re.compile(r"-\d+(\.\d+)*$")


def license_family(license_id: str) -> str:
    """``CC-BY-SA-2.0`` -> ``CC-BY-SA``: records carry SPDX-style license ids; filters
    usually care about the family, not the version."""
    return _VERSION.sub("", license_id)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for the values records carry."""
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
