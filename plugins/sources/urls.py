"""``urls``: image URLs from a text, CSV/TSV or JSONL file, streamed (million-line lists work)."""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harvest.core import Choice, Option, Query, Record, Size, Source, Str, hookimpl
from harvest.core import Path as PathOption


class UrlListSource(Source):
    """Image URLs listed in a file, with optional caption, license and term columns."""

    uses_terms = False
    options = (
        Option("path", PathOption(exists="file"), required=True, help="the list (relative to the recipe)"),
        Option("format", Choice("auto", "txt", "csv", "tsv", "jsonl"), "auto",
               help="file format (auto: from the extension)"),
        Option("url_column", Str(), "url", help="column or key holding the URL"),
        Option("caption_column", Str(), "caption", help="column or key holding a caption"),
        Option("license_column", Str(), "license", help="column or key holding a license id"),
        Option("term_column", Str(), "term", help="column or key naming the record's term"),
        Option("term", Str(), None, help="term for rows without one"),
        Option("language", Str(), "en", help="language of the terms"),
        Option("shard_size", Size(), 4 * 2**20,
               help="on a cluster, the list is read in shards of about this many bytes, side "
                    "by side"),
    )

    def records(self, query: Query | None) -> Iterator[Record]:
        path = Path(self.config["path"])
        if not path.is_file():
            raise FileNotFoundError(f"URL list not found: {path}")
        for row in self._rows(path, query.part if query else None):
            url = (row.get(self.config["url_column"]) or "").strip()
            if not url or url.startswith("#"):
                continue
            term = (row.get(self.config["term_column"]) or self.config["term"] or "").strip()
            fields = {"list_row": row.get("_row")}
            caption = row.get(self.config["caption_column"])
            if caption:
                fields["title"] = caption
            license_id = row.get(self.config["license_column"])
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
        if limit is not None or path.stat().st_size <= shard_size:
            return [(None, limit)]
        quoted = self._kind(path) in ("csv", "tsv")
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
        kind = self.config["format"]
        if kind == "auto":
            kind = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(
                path.suffix.lower(), "txt")
        return kind

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
                    yield {**{k: v if isinstance(v, str) else json.dumps(v)
                              for k, v in row.items()}, "_row": number}
        else:
            for number, line in enumerate(_lines(path, part), first_line):
                yield {self.config["url_column"]: line.strip(), "_row": number}


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
