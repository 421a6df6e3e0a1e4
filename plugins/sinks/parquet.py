"""``parquet``: the records as Parquet files with one fixed schema (and, optionally, the
image bytes), readable by pyarrow, pandas, DuckDB and ``datasets.load_dataset("parquet")``.

pyarrow is a large wheel, so it is an optional extra: ``pip install 'harvest-dataset[parquet]'``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from harvest.core import (
    Int,
    Option,
    OptionError,
    ShardedSink,
    hookimpl,
    json_default,
    shard_options,
)

# The columns every file has, in this order, whatever the records hold: a reader's code
# does not break between harvests. The whole record is also in `record` (JSON).
TEXT_COLUMNS = ("key", "id", "source", "source_id", "url", "page_url", "term", "lang", "title",
                "license", "license_url", "attribution", "country", "country_code", "sha256",
                "path", "format", "duplicate_of")
NUMBER_COLUMNS = ("width", "height", "bytes")


def _schema():
    import pyarrow as pa

    return pa.schema([*((name, pa.string()) for name in TEXT_COLUMNS),
                      *((name, pa.int64()) for name in NUMBER_COLUMNS),
                      ("record", pa.string()), ("image", pa.binary())])


class ParquetSink(ShardedSink):
    """Records in numbered Parquet files, a row group per `row_group_size` records."""

    suffix = ".parquet"
    # No stats file: `datasets` would try to read it as Parquet; the counts are in the
    # files' footers, and the licenses a query away.
    stats_name = None
    options = (*shard_options("parquet", images_default=False),
               Option("row_group_size", Int(1, None), 1000, help="rows per Parquet row group"))

    @classmethod
    def check_options(cls, options) -> None:
        super().check_options(options)
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise OptionError(None, "the parquet sink needs pyarrow: "
                                     "pip install 'harvest-dataset[parquet]'") from None

    def build(self, documents: Iterator[dict], path: Path, shard: int) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _schema()
        count = 0
        licenses: Counter = Counter()
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            while batch := list(islice(documents, self.config["row_group_size"])):
                rows = [row for row in (self._row(d, shard, count + i) for i, d in enumerate(batch))
                        if row is not None]
                count += len(batch)
                licenses.update(str(row["license"] or "unknown") for row in rows)
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        return {"shard": f"{shard:05d}{self.suffix}", "count": sum(licenses.values()),
                "licenses": dict(licenses)}

    def _row(self, document: dict, shard: int, index: int) -> dict | None:
        info = document.get("file") or {}
        row = {name: _text(document.get(name)) for name in TEXT_COLUMNS}
        row.update(key=f"{shard:05d}{index:05d}", sha256=_text(info.get("sha256")),
                   path=_text(info.get("path")), format=_text(info.get("format")),
                   width=info.get("width"), height=info.get("height"), bytes=info.get("bytes"),
                   record=json.dumps(document, ensure_ascii=False, default=json_default),
                   image=None)
        if self.config["images"]:
            image = self.image_bytes(document)
            if image is None:
                return None
            row["image"] = image[0]
        return row

    def documents_in(self, number: int):
        import pyarrow.parquet as pq

        with self._open_shard(number) as handle:
            column = pq.read_table(handle, columns=["record"]).column("record").to_pylist()
        for text in column:
            yield json.loads(text)

    def ids_in(self, handle) -> set[str]:
        import pyarrow.parquet as pq

        return set(pq.read_table(handle, columns=["id"]).column("id").to_pylist())


def _text(value) -> str | None:
    """A column's text: a personal field encrypted by the sink is a JSON object, kept as
    its JSON text, so that the column's type never changes."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=json_default)


@hookimpl
def harvest_sinks():
    return {"parquet": ParquetSink}
