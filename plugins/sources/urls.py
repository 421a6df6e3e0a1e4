"""``urls``: image URLs from a text, CSV/TSV, JSONL, Parquet or Arrow file, streamed
(million-line lists work)."""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harvest.core import (
    Choice,
    ListOf,
    Option,
    OptionError,
    Query,
    Record,
    Size,
    Source,
    Str,
    hookimpl,
)
from harvest.core import Path as PathOption

# Columnar lists are read through pyarrow (the parquet extra) a batch of rows at a time.
COLUMNAR = ("parquet", "arrow")
BATCH_ROWS = 10_000


class UrlListSource(Source):
    """Image URLs listed in a file, with optional caption, license and term columns."""

    uses_terms = False
    options = (
        Option("path", PathOption(exists="file"), required=True, help="the list (relative to the recipe)"),
        Option("format", Choice("auto", "txt", "csv", "tsv", "jsonl", *COLUMNAR), "auto",
               help="file format (auto: from the extension; parquet and arrow need the "
                    "parquet extra)"),
        Option("url_column", Str(), "url", help="column or key holding the URL"),
        Option("caption_column", Str(), "caption", help="column or key holding a caption"),
        Option("license_column", Str(), "license", help="column or key holding a license id"),
        Option("term_column", Str(), "term", help="column or key naming the record's term"),
        Option("term", Str(), None, help="term for rows without one"),
        Option("language", Str(), "en", help="language of the terms"),
        Option("save_additional_columns", ListOf(Str()), [],
               help="more columns or keys carried into each record under their own names"),
        Option("shard_size", Size(), 4 * 2**20,
               help="on a cluster, the list is read in shards of about this many bytes, side "
                    "by side"),
    )

    @classmethod
    def check_options(cls, options) -> None:
        """The columns the recipe names are in the list, checked before the run: a list
        without its URL column would otherwise give a run that finds nothing, and say
        nothing of why."""
        super().check_options(options)
        path = Path(options["path"])
        kind = _kind(options["format"], path)
        if kind == "txt":
            if options["save_additional_columns"]:
                raise OptionError("save_additional_columns",
                                  f"{path.name} is a plain list of URLs: it has no columns "
                                  f"(give a CSV, TSV, JSONL, Parquet or Arrow file)")
            return
        if kind in COLUMNAR:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise OptionError("format", f"a {kind} list needs pyarrow: "
                                  f"pip install 'harvest-dataset[parquet]'") from None
        columns = _columns(kind, path)
        if columns is None:  # an empty list, or a JSONL list without an object in it
            return
        defaults = {option.name: option.default for option in cls.options}
        for name in ("url_column", "caption_column", "license_column", "term_column"):
            column = options[name]
            # The optional columns' defaults may be absent; a name the recipe chose may not.
            if column not in columns and (name == "url_column" or column != defaults[name]):
                raise OptionError(name, f"{path}: no column {column!r}"
                                  f"{_among(columns)}")
        for column in options["save_additional_columns"]:
            if column not in columns:
                raise OptionError("save_additional_columns",
                                  f"{path}: no column {column!r}{_among(columns)}")

    def records(self, query: Query | None) -> Iterator[Record]:
        path = Path(self.config["path"])
        if not path.is_file():
            raise FileNotFoundError(f"URL list not found: {path}")
        extra = self.config["save_additional_columns"]
        for row in self._rows(path, query.part if query else None):
            url = _text(row.get(self.config["url_column"])).strip()
            if not url or url.startswith("#"):
                continue
            term = (_text(row.get(self.config["term_column"])) or self.config["term"]
                    or "").strip()
            fields = {column: _plain(row.get(column)) for column in extra}
            fields["list_row"] = row.get("_row")
            caption = _text(row.get(self.config["caption_column"]))
            if caption:
                fields["title"] = caption
            license_id = _text(row.get(self.config["license_column"]))
            if license_id:
                fields["license"] = license_id.strip()
            yield Record(source="urls", source_id=hashlib.sha256(url.encode()).hexdigest()[:20],
                         url=url, query=Query(term, self.config["language"], term) if term else None,
                         fields=fields)

    def partitions(self, query: Query | None, limit: int | None) -> list[tuple[Any, int | None]]:
        """Byte ranges of about ``shard_size`` bytes that start at a line, so that a cluster's
        workers read a long list side by side. A CSV/TSV range never starts inside a quoted
        field (an even count of quotes before it), so a caption with a line break in it
        stays whole."""
        path = Path(self.config["path"])
        shard_size = self.config["shard_size"]
        kind = self._kind(path)
        # A columnar list is compressed and read by row batches: one shard.
        if limit is not None or path.stat().st_size <= shard_size or kind in COLUMNAR:
            return [(None, limit)]
        quoted = kind in ("csv", "tsv")
        starts = [(0, 1)]
        with path.open("rb") as handle:
            offset, line, quotes = 0, 1, 0
            for raw in handle:
                offset += len(raw)
                line += 1
                if quoted:
                    quotes += raw.count(b'"')
                if offset - starts[-1][0] >= shard_size and quotes % 2 == 0:
                    starts.append((offset, line))
        if starts[-1][0] >= offset:
            starts.pop()
        ends = [start for start, _ in starts[1:]] + [offset]
        return [({"start": start, "end": end, "line": line}, None)
                for (start, line), end in zip(starts, ends, strict=True)]

    def _kind(self, path: Path) -> str:
        return _kind(self.config["format"], path)

    def _rows(self, path: Path, part: dict | None) -> Iterator[dict]:
        kind = self._kind(path)
        first_line = part["line"] if part else 1
        if kind in ("csv", "tsv"):
            delimiter = "\t" if kind == "tsv" else ","
            rows = csv.reader(_lines(path, part), delimiter=delimiter)
            if part and part["start"] > 0:
                header = next(csv.reader(_lines(path, None), delimiter=delimiter), [])
            else:
                header = next(rows, [])
            before = rows.line_num
            for values in rows:
                if values:
                    yield {**dict(zip(header, values, strict=False)), "_row": first_line + before}
                before = rows.line_num
        elif kind == "jsonl":
            for number, line in enumerate(_lines(path, part), first_line):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    self.log.warning("%s:%d: not JSON; skipped", path.name, number)
                    continue
                if isinstance(row, dict):
                    yield {**row, "_row": number}
        elif kind in COLUMNAR:
            yield from _columnar_rows(kind, path, self._wanted_columns())
        else:
            for number, line in enumerate(_lines(path, part), first_line):
                yield {self.config["url_column"]: line.strip(), "_row": number}

    def _wanted_columns(self) -> list[str]:
        names = [self.config[name] for name in ("url_column", "caption_column",
                                                 "license_column", "term_column")]
        return list(dict.fromkeys(names + list(self.config["save_additional_columns"])))


EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


def _kind(kind: str, path: Path) -> str:
    return EXTENSIONS.get(path.suffix.lower(), "txt") if kind == "auto" else kind


def _text(value: Any) -> str:
    """A cell as text: a JSONL number or list as its JSON, an empty cell as ''."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _plain(value: Any) -> Any:
    """A cell as a record can hold it (JSON): a date or bytes from Parquet as text."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value.hex() if isinstance(value, bytes) else str(value)


def _among(columns: list[str]) -> str:
    shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
    return f" (it has: {shown})" if columns else " (it has none)"


def _columns(kind: str, path: Path) -> list[str] | None:
    """The list's column names; None when the list does not declare them (JSONL, whose
    lines may each have keys of their own, or an empty list)."""
    if kind in ("csv", "tsv"):
        line = next(_lines(path, None), None)
        if line is None:
            return None
        return next(csv.reader([line], delimiter="\t" if kind == "tsv" else ","), [])
    if kind == "jsonl":
        return None
    return _columnar_schema(kind, path).names


def _columnar_schema(kind: str, path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            return pq.ParquetFile(path).schema_arrow
        with pa.memory_map(str(path)) as source:
            return _arrow_reader(source).schema
    except (pa.ArrowException, OSError) as exc:
        raise OptionError("path", f"{path}: not a readable {kind} file ({exc})") from None


def _arrow_reader(source):
    """An Arrow IPC file (Feather v2) or stream reader, whichever the file is."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def _columnar_rows(kind: str, path: Path, wanted: list[str]) -> Iterator[dict]:
    """A Parquet or Arrow list's rows, only the wanted columns, a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _columnar_schema(kind, path)
    columns = [name for name in wanted if name in schema.names]
    number = 1
    if kind == "parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        for batch in batches:
            for row in batch.to_pylist():
                yield {**row, "_row": number}
                number += 1
        return
    with pa.memory_map(str(path)) as source:
        reader = _arrow_reader(source)
        batches = ((reader.get_batch(i) for i in range(reader.num_record_batches))
                   if isinstance(reader, pa.ipc.RecordBatchFileReader) else reader)
        for batch in batches:
            for row in batch.select(columns).to_pylist():
                yield {**row, "_row": number}
                number += 1


def _lines(path: Path, part: dict | None) -> Iterator[str]:
    """The list's lines (all, or those of one byte range), decoded; a leading BOM dropped."""
    with path.open("rb") as handle:
        start = part["start"] if part else 0
        remaining = part["end"] - start if part else None
        handle.seek(start)
        for number, raw in enumerate(handle):
            if remaining is not None:
                remaining -= len(raw)
            if number == 0 and start == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            yield raw.decode("utf-8")
            if remaining is not None and remaining <= 0:
                return


@hookimpl
def harvest_sources():
    return {"urls": UrlListSource}
