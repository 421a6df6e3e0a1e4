"""``urls``: image URLs from a text, CSV/TSV or JSONL file, streamed (million-line lists work)."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from harvest.core import Choice, Option, Query, Record, Source, Str, hookimpl
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
    )

    def records(self, query: Query | None) -> Iterator[Record]:
        path = Path(self.config["path"])
        if not path.is_file():
            raise FileNotFoundError(f"URL list not found: {path}")
        for row in self._rows(path):
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

    def _rows(self, path: Path) -> Iterator[dict]:
        kind = self.config["format"]
        if kind == "auto":
            kind = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(
                path.suffix.lower(), "txt")
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if kind in ("csv", "tsv"):
                reader = csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
                for number, row in enumerate(reader, 2):
                    row["_row"] = number
                    yield row
            elif kind == "jsonl":
                for number, line in enumerate(handle, 1):
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
                for number, line in enumerate(handle, 1):
                    yield {self.config["url_column"]: line.strip(), "_row": number}


@hookimpl
def harvest_sources():
    return {"urls": UrlListSource}
