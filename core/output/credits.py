"""``harvest credits``: the attribution file a published dataset needs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UsageError

COLUMNS = ("file", "title", "author", "license", "license_url", "page_url", "attribution")


def _rows(records_path: Path):
    with records_path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise UsageError(f"{records_path}:{number}: not a JSON line") from None
            if record.get("duplicate_of"):
                continue  # the same picture is credited once, under its first record
            author = record.get("owner_name") or record.get("path_alias") or record.get("author")
            line_text = record.get("attribution") or " ".join(filter(None, [
                f'"{record.get("title") or "Untitled"}"',
                f"by {author}," if author else "",
                record.get("license") or "license unknown",
                f"({record['license_url']})" if record.get("license_url") else "",
                _public(record.get("page_url")) or _public(record.get("url")) or ""]))
            yield {"file": (record.get("file") or {}).get("path", ""),
                   "title": record.get("title") or "", "author": author or "",
                   "license": record.get("license") or "",
                   "license_url": record.get("license_url") or "",
                   "page_url": _public(record.get("page_url")) or _public(record.get("url")) or "",
                   "attribution": line_text}


def _public(url: str | None) -> str | None:
    """A web address, or None: a file: URL names a path on the user's machine (their
    user name, their folders), which must not be published in credits."""
    return url if isinstance(url, str) and url.lower().startswith(("http://", "https://")) \
        else None


def write_credits(output: Path, records_path: Path | None = None) -> tuple[Path, Path, int]:
    records_path = records_path or output / "records.jsonl"
    if not records_path.is_file():
        raise UsageError(f"{records_path}: no records file (is {output} a harvest output folder?)")
    markdown_path, csv_path = output / "CREDITS.md", output / "credits.csv"
    count = 0
    with markdown_path.open("w", encoding="utf-8") as markdown, \
            csv_path.open("w", encoding="utf-8", newline="") as table:
        writer = csv.DictWriter(table, COLUMNS)
        writer.writeheader()
        markdown.write("# Image credits\n\n")
        for row in _rows(records_path):
            writer.writerow(row)
            markdown.write(f"- `{row['file']}`: {row['attribution']}\n")
            count += 1
    return markdown_path, csv_path, count
