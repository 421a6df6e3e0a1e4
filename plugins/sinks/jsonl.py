"""``jsonl``: one JSON object per line, the embedded default sink."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harvest.core import Bool, Choice, Option, Record, Sink, Str, hookimpl, json_default


class JsonlSink(Sink):
    """Records as JSON lines, appended per batch and synced to disk."""

    is_default = True
    options = (
        Option("path", Str(), "records.jsonl", help="file to append to, relative to the output folder"),
        Option("personal_fields", Choice("omit", "clear"), "omit",
               help="personal fields (owner names, ids): left out, or written in clear text"),
        Option("fsync", Bool(), True, help="sync each batch to disk before it counts as stored"),
    )

    def open(self) -> None:
        self.path = (self.context.output_dir / self.config["path"]).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "ab")
        self.known_ids: set[str] = set()

    def resume(self, checkpoint: Any) -> None:
        size = self.handle.seek(0, os.SEEK_END)
        if checkpoint is not None and size > checkpoint["offset"]:
            # Lines past the checkpoint belong to a batch whose commit never landed;
            # the engine will hand those records over again.
            self.log.info("dropping %d uncommitted bytes at the end of %s",
                          size - checkpoint["offset"], self.path.name)
            self.handle.truncate(checkpoint["offset"])
        elif checkpoint is None and size:
            # A file the run state knows nothing of: keep it, and never write its ids again.
            self.known_ids = _ids_in(self.path, self.handle)
        self.handle.seek(0, os.SEEK_END)

    def write(self, records: list[Record]) -> dict:
        lines = []
        for record in records:
            if record.id in self.known_ids:
                continue
            data = record.to_dict()
            if self.config["personal_fields"] == "omit":
                omitted = sorted(name for name in record.personal if data.pop(name, None) is not None)
                if omitted:
                    data["omitted_personal_fields"] = omitted
            lines.append(json.dumps(data, ensure_ascii=False, default=json_default) + "\n")
        self.handle.write("".join(lines).encode("utf-8"))
        self.handle.flush()
        if self.config["fsync"]:
            os.fsync(self.handle.fileno())
        return {"offset": self.handle.tell()}

    def close(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()


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
    handle.truncate(good_end)
    return ids


@hookimpl
def harvest_sinks():
    return {"jsonl": JsonlSink}
