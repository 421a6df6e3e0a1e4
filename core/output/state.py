"""The run state: an SQLite file in the output folder that makes runs resumable.

Only the engine's thread touches it. It holds ids, statuses, file facts and sink
checkpoints; never titles, owners or any other personal field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import DiskFull, disk_full
from ..record import FileClaim, FileInfo

STATE_FILE = "state.sqlite"  # in a state folder (``.harvest``)
FINAL = ("done", "dropped", "rejected", "taken_down", "purged")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    term TEXT,
    status TEXT NOT NULL,            -- downloaded | done | dropped | rejected | failed
    reason TEXT,
    sha256 TEXT,
    duplicate_of TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    sha256 TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    record_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    sink TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS delivered (  -- only for records some sinks have and others not yet
    sink TEXT NOT NULL,
    record_id TEXT NOT NULL,
    PRIMARY KEY (sink, record_id)
);
CREATE TABLE IF NOT EXISTS tombstones (  -- taken down: never stored again
    sha256 TEXT PRIMARY KEY,
    reason TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS removals (  -- takedowns and purges decided, not yet done everywhere
    intent TEXT PRIMARY KEY,
    audit TEXT NOT NULL,  -- its line in the audit log (JSON), written once
    paths TEXT NOT NULL,  -- the image files to delete (JSON list)
    records INTEGER NOT NULL  -- 1: the records leave the sinks too
);
CREATE TABLE IF NOT EXISTS verdict_settings (  -- what each stage's refusals depended on
    stage TEXT PRIMARY KEY,  -- download | images | enrich LABEL: a reason's first words
    settings TEXT NOT NULL   -- JSON: {key: value}
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL,
    outcome TEXT,
    summary TEXT
);
"""

STATUS_UPSERT = """
INSERT INTO records (id, source, term, status, reason, sha256, duplicate_of, attempts, updated)
VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)
ON CONFLICT(id) DO UPDATE SET status = excluded.status, reason = excluded.reason,
    sha256 = COALESCE(excluded.sha256, records.sha256),
    duplicate_of = COALESCE(excluded.duplicate_of, records.duplicate_of),
    attempts = records.attempts + 1, updated = excluded.updated
"""
FILE_UPSERT = """
INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(sha256) DO UPDATE SET path = excluded.path, record_id = excluded.record_id
"""


class Bloom:
    """A fixed-size Bloom filter: "certainly absent" answered from memory.

    Most lookups on a fresh run find nothing, and each SQLite call costs the engine
    thread a trip through the GIL queue. 2 MB of bits keeps false positives (which just
    fall through to SQLite) near 0.2% at a million keys, and memory does not grow with N.
    """

    def __init__(self, bits: int = 1 << 24, hashes: int = 4):
        self.bits = bits
        self.hashes = hashes
        self.array = bytearray(bits // 8)

    def _positions(self, key: str):
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=4 * self.hashes).digest()
        for index in range(self.hashes):
            yield int.from_bytes(digest[4 * index: 4 * index + 4], "little") % self.bits

    def add(self, key: str) -> None:
        for position in self._positions(key):
            self.array[position >> 3] |= 1 << (position & 7)

    def __contains__(self, key: str) -> bool:
        return all(self.array[position >> 3] & (1 << (position & 7))
                   for position in self._positions(key))


class _Unknown:
    """Stands for a Bloom filter where none was built: every key may be present, so each
    lookup asks SQLite."""

    def __contains__(self, key: str) -> bool:
        return True


@dataclass
class KnownRecord:
    status: str
    sha256: str | None
    duplicate_of: str | None


class FinishedRecord(NamedTuple):
    """A record stored to every sink, as another state (a cluster shard's) hands it on."""

    id: str
    source: str
    term: str | None
    sha256: str | None
    duplicate_of: str | None


def _writes(method):
    """A full disk is DiskFull, whichever write meets it (SQLite rolls back the open
    transaction: the last commit stands)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if disk_full(exc):
                self._in_transaction = False
                raise DiskFull(self.path.parent.parent) from None
            raise
    return guarded


class RunState:
    def __init__(self, path: Path, redact=None, *, _readonly: bool = False):
        """``redact``: applied to failure reasons, which may quote a secret path or URL."""
        self.redact = redact or (lambda text: text)
        self.path = path
        if _readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        self._in_transaction = False
        # Writes wait here until the batch commits: each SQLite call lets go of the GIL,
        # and the engine thread then queues behind the download threads to get it back.
        self._status_rows: list[tuple] = []
        self._recent: dict[str, KnownRecord] = {}
        self._file_rows: dict[str, tuple[FileInfo, str]] = {}
        self._paths: dict[str, str] = {}
        if _readonly:  # read once and let go: building the filters would cost more
            self.known_ids = self.known_files = self.known_paths = _Unknown()
            self.tombstones = {sha for (sha,) in
                               self._rows_or_none("SELECT sha256 FROM tombstones") or ()}
            return
        self.known_ids, self.known_files, self.known_paths = Bloom(), Bloom(), Bloom()
        for (record_id,) in self.db.execute("SELECT id FROM records"):
            self.known_ids.add(record_id)
        for sha256, path in self.db.execute("SELECT sha256, path FROM files"):
            self.known_files.add(sha256)
            self.known_paths.add(path)
        self.tombstones = {sha for (sha,) in self.db.execute("SELECT sha256 FROM tombstones")}

    @classmethod
    def open_readonly(cls, path: Path) -> RunState:
        """Another run's state (the output's, or a cluster shard's), to read and never write:
        no schema is added and nothing is committed to it. A state from before a table
        existed reads as having none of its rows."""
        return cls(path, _readonly=True)

    @classmethod
    @contextmanager
    def reading(cls, path: Path) -> Iterator[RunState | None]:
        """``open_readonly`` for the length of a ``with``; None when there is no state at
        ``path`` (a shard that never ran, an output never harvested)."""
        if not path.exists():
            yield None
            return
        reader = cls.open_readonly(path)
        try:
            yield reader
        finally:
            reader.close()

    def _rows_or_none(self, query: str) -> list[tuple] | None:
        """The rows of ``query`` on a state that may be old or unreadable (None then)."""
        try:
            return self.db.execute(query).fetchall()
        except sqlite3.Error:
            return None

    def claims(self) -> tuple[list[str], list[FileClaim]] | None:
        """Every record id this state holds, and each of its files: what its run has
        claimed. None when the state cannot be read."""
        ids = self._rows_or_none("SELECT id FROM records")
        files = self._rows_or_none("SELECT sha256, record_id, path FROM files")
        if ids is None or files is None:
            return None
        return [record_id for (record_id,) in ids], [FileClaim(*row) for row in files]

    def finished_records(self) -> list[FinishedRecord]:
        """The records stored to every sink."""
        self.commit()
        return [FinishedRecord(*row) for row in self.db.execute(
            "SELECT id, source, term, sha256, duplicate_of FROM records WHERE status = 'done'")]

    def files(self) -> list[tuple[FileInfo, str]]:
        """Every stored file, with the record that holds it."""
        self.commit()
        return [(FileInfo(path, size, sha256, width, height, image_format), record_id)
                for sha256, path, size, width, height, image_format, record_id in self.db.execute(
                    "SELECT sha256, path, bytes, width, height, format, record_id FROM files")]

    def close(self) -> None:
        self.commit()
        self.db.close()

    def begin(self) -> None:
        if not self._in_transaction:
            self.db.execute("BEGIN")
            self._in_transaction = True

    @_writes
    def commit(self) -> None:
        if self._status_rows or self._file_rows:
            self.begin()
            self.db.executemany(FILE_UPSERT, [
                (info.sha256, info.path, info.bytes, info.width, info.height, info.format,
                 record_id) for info, record_id in self._file_rows.values()])
            self.db.executemany(STATUS_UPSERT, self._status_rows)
            self._status_rows, self._recent = [], {}
            self._file_rows, self._paths = {}, {}
        if self._in_transaction:
            self.db.execute("COMMIT")
            self._in_transaction = False

    def recent(self, record_id: str) -> KnownRecord | None:
        """What this run set for the record and has not committed yet, if anything."""
        return self._recent.get(record_id)

    def records(self, record_ids: list[str]) -> dict[str, KnownRecord]:
        """The committed state of each of these records that has one, in one query."""
        maybe = [record_id for record_id in record_ids if record_id in self.known_ids]
        found: dict[str, KnownRecord] = {}
        for start in range(0, len(maybe), 500):
            chunk = maybe[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for record_id, status, sha256, duplicate_of in self.db.execute(
                    f"SELECT id, status, sha256, duplicate_of FROM records WHERE id IN ({marks})",
                    chunk):
                found[record_id] = KnownRecord(status, sha256, duplicate_of)
        return found

    def record(self, record_id: str) -> KnownRecord | None:
        if record_id in self._recent:
            return self._recent[record_id]
        if record_id not in self.known_ids:
            return None
        row = self.db.execute("SELECT status, sha256, duplicate_of FROM records WHERE id = ?",
                              (record_id,)).fetchone()
        return KnownRecord(*row) if row else None

    def set_status(self, record_id: str, source: str, term: str | None, status: str,
                   reason: str | None = None, sha256: str | None = None,
                   duplicate_of: str | None = None) -> None:
        self._status_rows.append((record_id, source, term, status,
                                  self.redact(reason) if reason else reason, sha256, duplicate_of,
                                  time.time()))
        self.known_ids.add(record_id)
        known = self._recent.get(record_id)
        self._recent[record_id] = KnownRecord(
            status, sha256 or (known.sha256 if known else None),
            duplicate_of or (known.duplicate_of if known else None))

    def file(self, sha256: str) -> tuple[FileInfo, str] | None:
        if sha256 in self._file_rows:
            return self._file_rows[sha256]
        if sha256 not in self.known_files:
            return None
        row = self.db.execute("SELECT path, bytes, width, height, format, record_id FROM files "
                              "WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            return None
        path, size, width, height, image_format, record_id = row
        return FileInfo(path, size, sha256, width, height, image_format), record_id

    def path_owner(self, relpath: str) -> str | None:
        if relpath in self._paths:
            return self._paths[relpath]
        if relpath not in self.known_paths:
            return None
        row = self.db.execute("SELECT sha256 FROM files WHERE path = ?", (relpath,)).fetchone()
        return row[0] if row else None

    def add_file(self, info: FileInfo, record_id: str) -> None:
        self._file_rows[info.sha256] = (info, record_id)
        self._paths[info.path] = info.sha256
        self.known_files.add(info.sha256)
        self.known_paths.add(info.path)

    def checkpoint(self, sink: str) -> Any:
        row = self.db.execute("SELECT value FROM checkpoints WHERE sink = ?", (sink,)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None

    @_writes
    def set_checkpoint(self, sink: str, value: Any) -> None:
        self.begin()
        self.db.execute("INSERT INTO checkpoints VALUES (?, ?) ON CONFLICT(sink) DO UPDATE "
                        "SET value = excluded.value", (sink, json.dumps(value)))

    def delivered(self, sink: str, record_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(record_ids), 500):
            chunk = record_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(row[0] for row in self.db.execute(
                f"SELECT record_id FROM delivered WHERE sink = ? AND record_id IN ({marks})",
                [sink, *chunk]))
        return found

    @_writes
    def mark_delivered(self, sink: str, record_ids: list[str]) -> None:
        self.begin()
        self.db.executemany("INSERT OR IGNORE INTO delivered VALUES (?, ?)",
                            [(sink, record_id) for record_id in record_ids])

    @_writes
    def forget_delivered(self, record_ids: list[str]) -> None:
        self.begin()
        self.db.executemany("DELETE FROM delivered WHERE record_id = ?",
                            [(record_id,) for record_id in record_ids])

    def done_ids(self, chunk: int = 1000):
        """The ids of records stored to every sink, in chunks (for --verify-sinks)."""
        self.commit()
        last = ""
        while True:
            rows = self.db.execute("SELECT id FROM records WHERE status = 'done' AND id > ? "
                                   "ORDER BY id LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                return
            yield [row[0] for row in rows]
            last = rows[-1][0]

    @_writes
    def reopen(self, record_ids: list[str]) -> None:
        """Stored records a sink turned out to lack: back to 'downloaded', so that the
        next time a source yields them they are written again (to the sinks lacking them)."""
        self.begin()
        self.db.executemany("UPDATE records SET status = 'downloaded' WHERE id = ?",
                            [(record_id,) for record_id in record_ids])
        for record_id in record_ids:
            self._recent.pop(record_id, None)

    @_writes
    def take_down(self, record_ids: set[str], sha256s: set[str], reason: str,
                  status: str = "taken_down", *, intent: str, audit: dict,
                  paths: set[str], records: bool = True) -> None:
        """Records a takedown or purge before any of it is carried out, in one durable
        transaction: the records marked final (never fetched again), their pictures
        tombstoned (never stored again, whichever record brings them), and the removal
        itself pending (``removals``) until every sink and file is done, so that a crash
        at any later point is finished by the next takedown or purge. The sinks'
        checkpoints are forgotten with it: their files are about to change under them."""
        now = time.time()
        self.commit()
        self.db.execute("PRAGMA synchronous=FULL")  # this commit must survive a power cut
        try:
            with self.db:
                self.db.executemany(
                    "INSERT INTO records (id, source, term, status, reason, updated) "
                    "VALUES (?, ?, NULL, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "status = excluded.status, reason = excluded.reason, "
                    "updated = excluded.updated",
                    [(record_id, record_id.split(":", 1)[0], status, reason, now)
                     for record_id in record_ids])
                self.db.executemany("INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)",
                                    [(sha, reason, now) for sha in sha256s])
                self.db.executemany("DELETE FROM files WHERE sha256 = ?",
                                    [(sha,) for sha in sha256s])
                if records:
                    self.db.execute("UPDATE checkpoints SET value = NULL")
                self.db.execute("INSERT INTO removals VALUES (?, ?, ?, ?)",
                                (intent, json.dumps(audit, ensure_ascii=False, sort_keys=True),
                                 json.dumps(sorted(paths)), int(records)))
        finally:
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.tombstones |= sha256s

    def removals(self) -> list[tuple[str, dict, list[str], bool]]:
        """The pending takedowns and purges: (intent, audit line, paths, records too)."""
        return [(intent, json.loads(audit), json.loads(paths), bool(records))
                for intent, audit, paths, records in self.db.execute(
                    "SELECT intent, audit, paths, records FROM removals ORDER BY rowid")]

    @_writes
    def finish_removal(self, intent: str) -> None:
        self.commit()
        with self.db:
            self.db.execute("DELETE FROM removals WHERE intent = ?", (intent,))

    @_writes
    def reconsider(self, statuses: set[str]) -> int:
        """Forgets the records that ended with these statuses (dropped, rejected, failed),
        so that the sources' next yield of them goes through the pipeline again: after
        the recipe changed, their old verdict may not hold."""
        self.commit()
        marks = ",".join("?" * len(statuses))
        with self.db:
            return self.db.execute(f"DELETE FROM records WHERE status IN ({marks})",
                                   sorted(statuses)).rowcount

    @_writes
    def reconsider_changed(self, current: dict[str, dict]) -> list[tuple[str, list[str], int]]:
        """Forgets the records rejected or dropped at a stage whose settings changed since
        the last run (or that the recipe no longer has), so that they go through again,
        and keeps ``current`` for the next run. (stage, the keys changed, how many records)
        for each stage that had some; a state from before this was kept changes nothing."""
        self.commit()
        before = {stage: json.loads(settings) for stage, settings in
                  self.db.execute("SELECT stage, settings FROM verdict_settings")}
        changes = []
        with self.db:
            for stage, old in before.items():
                new = current.get(stage)
                if new == old:
                    continue
                changed = (["no longer in the recipe"] if new is None else
                           sorted(key for key in set(old) | set(new)
                                  if old.get(key, None) != new.get(key, None)
                                  or (key in old) != (key in new)))
                prefix = f"{stage}: "
                count = self.db.execute(
                    "DELETE FROM records WHERE status IN ('rejected', 'dropped') "
                    "AND substr(reason, 1, ?) = ?", (len(prefix), prefix)).rowcount
                if count:
                    changes.append((stage, changed, count))
            self.db.execute("DELETE FROM verdict_settings")
            self.db.executemany("INSERT INTO verdict_settings VALUES (?, ?)",
                                [(stage, json.dumps(settings, sort_keys=True))
                                 for stage, settings in current.items()])
        return changes

    def stored_before(self, cutoff: float) -> int:
        """How many stored records were last written before ``cutoff`` (a Unix time)."""
        return self.db.execute("SELECT COUNT(*) FROM records WHERE status = 'done' AND "
                               "updated < ?", (cutoff,)).fetchone()[0]

    def start_run(self) -> int:
        cursor = self.db.execute("INSERT INTO runs (started) VALUES (?)", (time.time(),))
        return cursor.lastrowid

    @_writes
    def finish_run(self, run_id: int, outcome: str, summary: dict) -> None:
        self.commit()
        self.db.execute("UPDATE runs SET finished = ?, outcome = ?, summary = ? WHERE id = ?",
                        (time.time(), outcome, json.dumps(summary), run_id))

    def counts(self) -> dict[str, int]:
        self.commit()
        return dict(self.db.execute("SELECT status, COUNT(*) FROM records GROUP BY status"))
