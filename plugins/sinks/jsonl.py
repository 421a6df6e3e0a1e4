"""``jsonl``: one JSON object per line, the embedded default sink."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harvest.core import (
    PROTECTION_OPTIONS,
    Bool,
    Option,
    PluginConfigError,
    Protection,
    Record,
    Sink,
    Str,
    check_protection,
    filter_jsonl,
    hookimpl,
    inside,
    inside_check,
    json_default,
    rewrite_jsonl,
)

PART_BATCH = 1000


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
            self.handle = _open_append(self.path)
        except (ValueError, OSError) as exc:
            raise PluginConfigError(f"{self.context.name}: cannot write {self.config['path']} "
                                    f"inside {root}: {getattr(exc, 'strerror', None) or exc}") from None
        self.known_ids: set[str] = set()

    def resume(self, checkpoint: Any) -> None:
        size = self.handle.seek(0, os.SEEK_END)
        if checkpoint is not None and self._describes(checkpoint, size):
            if size > checkpoint["offset"]:
                # Lines past the checkpoint belong to a batch whose commit never landed;
                # the engine will hand those records over again.
                self.log.info("dropping %d uncommitted bytes at the end of %s",
                              size - checkpoint["offset"], self.path.name)
                self.handle.truncate(checkpoint["offset"])
        elif size:
            # A file the run state does not describe (first run after a crash, state lost,
            # file edited): keep every line, and never write those ids again.
            self.known_ids = _ids_in(self.path, self.handle)
        self.handle.seek(0, os.SEEK_END)

    def _describes(self, checkpoint: dict, size: int) -> bool:
        offset, last_id = checkpoint.get("offset"), checkpoint.get("last_id")
        if offset is None or offset > size:
            return False
        if offset == 0:
            return True
        with self.path.open("rb") as reader:
            reader.seek(max(0, offset - 1))
            if reader.read(1) != b"\n":
                return False
            start = max(0, offset - 1)
            while start > 0:
                step = min(start, 64 * 1024)
                reader.seek(start - step)
                chunk = reader.read(step)
                newline = chunk.rfind(b"\n")
                if newline != -1:
                    start = start - step + newline + 1
                    break
                start -= step
            reader.seek(start)
            line = reader.read(offset - start)
        try:
            return json.loads(line).get("id") == last_id
        except ValueError:
            return False

    def write(self, records: list[Record]) -> dict:
        lines = []
        for record in records:
            if record.id in self.known_ids:
                continue
            data = self.protection.document(record)
            lines.append(json.dumps(data, ensure_ascii=False, default=json_default) + "\n")
            self.last_id = record.id
        return self._append(lines)

    def _append(self, lines: list[str]) -> dict:
        start = self.handle.tell()
        try:
            self.handle.write("".join(lines).encode("utf-8"))
            self.handle.flush()
            if self.config["fsync"]:
                os.fsync(self.handle.fileno())
        except OSError:
            self._cut_back(start)  # a full disk must not leave half a line behind
            raise
        return {"offset": self.handle.tell(), "last_id": getattr(self, "last_id", None)}

    def missing(self, record_ids: list[str]) -> set[str]:
        if getattr(self, "present", None) is None:
            self.present = _ids_in(self.path, None)
        return set(record_ids) - self.present

    def _cut_back(self, offset: int) -> None:
        try:
            self.handle.close()  # its buffer still holds what failed: drop it with the handle
        except OSError:
            pass
        os.truncate(self.path, offset)
        self.handle = _open_append(self.path)

    def part_documents(self, part_dir: Path) -> Iterator[list[dict]]:
        part = part_dir / self.config["path"]
        if not part.exists():
            return
        batch: list[dict] = []
        with part.open("rb") as reader:
            for line in reader:
                if not line.endswith(b"\n"):
                    break  # cut off by a crash: its batch never committed
                try:
                    batch.append(json.loads(line))
                except ValueError:
                    continue
                if len(batch) >= PART_BATCH:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def write_documents(self, documents: list[dict]) -> dict:
        self.last_id = documents[-1]["id"]
        return self._append([json.dumps(document, ensure_ascii=False, default=json_default) + "\n"
                             for document in documents])

    def discard_part(self, part_dir: Path) -> None:
        (part_dir / self.config["path"]).unlink(missing_ok=True)

    def remove(self, record_ids: set[str]) -> int:
        self.handle.close()
        try:
            return filter_jsonl(self.path, record_ids) if self.path.exists() else 0
        finally:
            self.handle = _open_append(self.path)

    def rekey(self, rotate) -> int:
        self.handle.close()
        try:
            return rewrite_jsonl(self.path, rotate) if self.path.exists() else 0
        finally:
            self.handle = _open_append(self.path)

    def close(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()


def _open_append(path: Path):
    """Opens for appending, refusing a symbolic link planted in the link's place."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "ab")


def _ids_in(path: Path, handle) -> set[str]:
    ids = set()
    good_end = 0
    with path.open("rb") as reader:
        for line in reader:
            if not line.endswith(b"\n"):
                break  # a line cut off by a crash
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                pass
            good_end += len(line)
    if handle is not None:
        handle.truncate(good_end)
    return ids


@hookimpl
def harvest_sinks():
    return {"jsonl": JsonlSink}
