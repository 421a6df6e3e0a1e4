"""``jsonl``: one JSON object per line, the embedded default sink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harvest.core import (
    PROTECTION_OPTIONS,
    Bool,
    JsonlAppender,
    Option,
    PluginConfigError,
    Protection,
    Record,
    Sink,
    Str,
    check_protection,
    document_batches,
    filter_jsonl,
    hookimpl,
    inside,
    inside_check,
    rewrite_jsonl,
)


class JsonlSink(Sink):
    """Records as JSON lines, appended per batch and synced to disk."""

    is_default = True
    options = (
        Option("path", Str(), "records.jsonl", check=inside_check,
               help="file to append to, inside the output folder"),
        *PROTECTION_OPTIONS,
        Option("fsync", Bool(), True, help="sync each batch to disk before it counts as stored"),
    )

    @classmethod
    def check_options(cls, options) -> None:
        check_protection(options)

    def open(self) -> None:
        self.protection = Protection(self.config)
        # On a cluster shard, the part in the shard's folder; the client merges it.
        root = (self.context.part_dir or self.context.output_dir).resolve()
        try:
            self.path = inside(root, self.config["path"])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.records = JsonlAppender(self.path, self.config["fsync"])
        except (ValueError, OSError) as exc:
            raise PluginConfigError(f"{self.context.name}: cannot write {self.config['path']} "
                                    f"inside {root}: {getattr(exc, 'strerror', None) or exc}") from None
        self.known_ids: set[str] = set()

    def resume(self, checkpoint: Any) -> None:
        if checkpoint is not None and self.records.ends_with(checkpoint.get("offset"),
                                                             checkpoint.get("last_id")):
            if self.records.size > checkpoint["offset"]:
                # Lines past the checkpoint belong to a batch whose commit never landed;
                # the engine will hand those records over again.
                self.log.info("dropping %d uncommitted bytes at the end of %s",
                              self.records.size - checkpoint["offset"], self.path.name)
            self.records.resume(checkpoint["offset"])
        else:
            # A file the run state does not describe (first run after a crash, state lost,
            # file edited): keep every line, and never write those ids again.
            self.known_ids = self.records.resume(None)

    def write(self, records: list[Record]) -> dict:
        documents = []
        for record in records:
            if record.id in self.known_ids:
                continue
            documents.append(self.protection.document(record))
            self.last_id = record.id
        return self._append(documents)

    def write_documents(self, documents: list[dict]) -> dict:
        self.last_id = documents[-1]["id"]
        return self._append(documents)

    def _append(self, documents: list[dict]) -> dict:
        return {"offset": self.records.append(documents),
                "last_id": getattr(self, "last_id", None)}

    def missing(self, record_ids: list[str]) -> set[str]:
        if getattr(self, "present", None) is None:
            self.present = self.records.ids()
        return set(record_ids) - self.present

    def part_documents(self, part_dir: Path) -> Iterator[list[dict]]:
        return document_batches(part_dir / self.config["path"])

    def discard_part(self, part_dir: Path) -> None:
        (part_dir / self.config["path"]).unlink(missing_ok=True)

    def remove(self, record_ids: set[str]) -> int:
        return self._rewritten(lambda: filter_jsonl(self.path, record_ids))

    def rekey(self, rotate) -> int:
        return self._rewritten(lambda: rewrite_jsonl(self.path, rotate))

    def _rewritten(self, rewrite) -> int:
        """Runs ``rewrite`` (which replaces the file whole) with the file closed."""
        self.records.close()
        try:
            return rewrite() if self.path.exists() else 0
        finally:
            self.records = JsonlAppender(self.path, self.config["fsync"])

    def close(self) -> None:
        records = getattr(self, "records", None)
        if records is not None:
            records.close()


@hookimpl
def harvest_sinks():
    return {"jsonl": JsonlSink}
