"""Sinks that write the dataset as numbered shard files (WebDataset tars, Parquet files).

The common ground is making such files exactly-once under crashes. A shard file cannot be
appended to safely (a tar or Parquet file cut short by kill -9 may still look whole to a
reader, or not open at all), so a sink first appends each committed batch's documents to
a small staging file, ``.harvest/staging/<sink>/NNNNN.jsonl``, exactly as the JSONL sink
appends (synced, cut back to the last checkpoint on resume). A shard file is built from
its staging file when it is full, and at the end of the run for the last one, under a
temporary name that is renamed into place once complete; so a reader never sees a
truncated shard. The checkpoint is (shard number, bytes of its staging file committed):
everything before that shard is final; that shard is rebuilt from its staging file.

A staging file is deleted once a later checkpoint has been committed; the last shard's
staging file stays, so that the next run adds to the last shard instead of leaving a
small one behind (the shard is rebuilt at the end of that run).

On a cluster shard, documents go to a JSONL part in the shard's folder, and the client
builds the shard files when it merges the parts (one writer, dense numbering).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from ..cleaning.curation import copy_reason, set_aside_ids
from ..errors import PluginConfigError
from ..options import Bool, Int, MapOf, Option, OptionError, Str
from ..output.crypto import PROTECTION_OPTIONS, Protection, check_protection
from ..output.records import rewrite_documents
from ..output.remote import CREDENTIALS_IN_URL, Remote, check_storage_options, without_credentials
from ..output.storage import inside, inside_check, read_inside
from ..record import Record, json_default
from .plugin import Refusal, Sink

PART_BATCH = 1000
# Extensions by Pillow format name, for the image member of a sample.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
                    "TIFF": "tif", "BMP": "bmp"}


def shard_options(default_path: str, *, images_default: bool) -> tuple[Option, ...]:
    return (
        Option("path", Str(), default_path, check=inside_check,
               help="folder for the shard files, inside the output folder"),
        Option("shard_size", Int(1, None), 10_000, help="samples per shard file"),
        Option("images", Bool(), images_default, help="put the image bytes in the shards"),
        Option("keep_copies", Bool(), False,
               help="also make a sample of each record that is a copy of another picture "
                    "(duplicate_of, near_duplicate_of, or set aside for a better copy); "
                    "without it each picture is in the shards once, as in export"),
        Option("strip_exif", Bool(), True,
               help="remove EXIF (camera serials, GPS position, owner names) from the image "
                    "bytes written to the shards"),
        *PROTECTION_OPTIONS,
        Option("fsync", Bool(), True, help="sync each batch to disk before it counts as stored"),
        Option("upload_to", Str(), None,
               help="also put each finished shard there: an fsspec URL such as "
                    "s3://bucket/prefix (credentials from the environment)"),
        Option("storage_options", MapOf(Str()), None,
               help="fsspec options for upload_to, e.g. {endpoint_url: ..., region_name: ...}"),
        Option("keep_local", Bool(), True,
               help="with upload_to, keep the shards in the output folder too"),
    )


class ShardedSink(Sink):
    """Base of sinks that write numbered shard files: subclasses give ``suffix`` and
    ``build(documents, path) -> stats`` and ``ids_in(path)``; documents are the protected
    records, as the JSONL sink stores them."""

    suffix: ClassVar[str] = ""
    # Each shard's stats beside it (None: none, when the format's readers would trip on
    # a file that is not a shard).
    stats_name: ClassVar[str | None] = "{:05d}_stats.json"

    @classmethod
    def check_options(cls, options) -> None:
        check_protection(options)
        secret = check_storage_options(options.get("storage_options"))
        if secret:
            raise OptionError("storage_options", f"{secret}: credentials never go in a recipe; "
                              "set them in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE...)")
        if options.get("upload_to") and without_credentials(options["upload_to"]):
            raise OptionError("upload_to", CREDENTIALS_IN_URL)
        if not options.get("keep_local", True) and not options.get("upload_to"):
            raise OptionError("keep_local", "false needs upload_to: the shards must go somewhere")

    # -- what a format provides ---------------------------------------------------------------

    def build(self, documents: Iterator[dict], path: Path, shard: int) -> dict:
        """Writes one shard file at ``path`` from its documents; returns its stats."""
        raise NotImplementedError

    def ids_in(self, handle) -> set[str]:
        """Record ids in a finished shard file, open for reading (binary, seekable)."""
        raise NotImplementedError

    # -- the engine's side --------------------------------------------------------------------

    def open(self) -> None:
        self.protection = Protection(self.config)
        self.known_ids: set[str] = set()
        self.refusals: list[Refusal] = []
        label = self.context.name or type(self).__name__.lower()
        try:
            if self.context.part_dir is not None:
                self.part = JsonlAppender(self.context.part_dir / f"{_safe(label)}.jsonl",
                                      self.config["fsync"])
                return
            self.part = None
            self.folder = inside(self.context.output_dir.resolve(), self.config["path"])
            self.folder.mkdir(parents=True, exist_ok=True)
            self.staging_dir = self.context.output_dir / ".harvest" / "staging" / _safe(label)
            self.staging_dir.mkdir(parents=True, exist_ok=True)
        except (ValueError, OSError) as exc:
            raise PluginConfigError(f"{self.context.name}: cannot write {self.config['path']}: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None
        self.staging: JsonlAppender | None = None
        self.remote = None
        if self.config["upload_to"]:
            self.remote = Remote(self.config["upload_to"], self.config["storage_options"],
                                 f"{self.context.name}: upload_to")
            self.remote.check()

    def resume(self, checkpoint: Any) -> None:
        if self.part is not None:
            self.known_ids = self.part.resume(checkpoint and checkpoint.get("offset"))
            return
        for name in os.listdir(self.folder):
            if name.startswith(".") and name.endswith(".tmp"):  # a build cut off by a crash
                (self.folder / name).unlink(missing_ok=True)
        staged = self._numbers(self.staging_dir, ".jsonl")
        if checkpoint is not None and "shard" in checkpoint:
            current = checkpoint["shard"]
            for number in staged:
                if number != current:
                    (self.staging_dir / f"{number:05d}.jsonl").unlink()
            for number in self._finished():
                if number >= current:  # built after the last commit, or rebuilt at the end
                    self._remove_shard(number)
            self.staging = JsonlAppender(self._staging_path(current), self.config["fsync"])
            self.staging.resume(checkpoint["offset"])
        else:
            # No checkpoint: a first run, or a run state that was lost. Keep whatever is
            # there and never write those records again.
            finished = self._finished()
            for number in staged[:-1]:
                self._finish(number)  # staging left without its shard: build it now
            current = staged[-1] if staged else (finished[-1] + 1 if finished else 0)
            for number in self._finished():
                if number != current:
                    self.known_ids |= self._held_ids(number)
                else:
                    self._remove_shard(number)
            self.staging = JsonlAppender(self._staging_path(current), self.config["fsync"])
            self.known_ids |= self.staging.resume(None)
        self.current = current
        self.count = self.staging.lines

    def write(self, records: list[Record]) -> dict:
        documents = [self.protection.document(record) for record in records
                     if record.id not in self.known_ids]
        return self.write_documents(documents)

    def write_documents(self, documents: list[dict]) -> dict:
        if self.part is not None:
            return {"offset": self.part.append(documents)}
        if self.staging is None:
            self.resume(None)
        # The last call's checkpoint is committed by now: earlier staging files are done.
        for number in self._numbers(self.staging_dir, ".jsonl"):
            if number < self.current:
                (self.staging_dir / f"{number:05d}.jsonl").unlink()
        size = self.config["shard_size"]
        while documents:
            taken, documents = documents[:size - self.count], documents[size - self.count:]
            self.staging.append(taken)
            self.count += len(taken)
            if self.count >= size:
                self._finish(self.current)
                self.staging.close()
                self.current += 1
                self.staging = JsonlAppender(self._staging_path(self.current), self.config["fsync"])
                self.count = 0
        return {"shard": self.current, "offset": self.staging.size}

    def close(self) -> None:
        if self.part is not None:
            self.part.close()
            return
        if getattr(self, "staging", None) is None:
            return
        self.staging.close()
        if self.count:
            self._finish(self.current)
        else:
            self._staging_path(self.current).unlink(missing_ok=True)

    def missing(self, record_ids: list[str]) -> set[str]:
        present: set[str] = set()
        for number in self._finished():
            present |= self._held_ids(number)
        for number in self._numbers(self.staging_dir, ".jsonl"):
            present |= {d["id"] for d in _documents(self.staging_dir / f"{number:05d}.jsonl")}
        return set(record_ids) - present

    def remove(self, record_ids: set[str]) -> int:
        """Rebuilds every shard that holds one of these records without it, and cuts them
        from the staging."""
        return self._rewrite(lambda document: None if document["id"] in record_ids
                             else document)

    def rekey(self, rotate) -> int:
        """Rebuilds every shard that holds a document under an old key, re-encrypted; a
        shard is replaced whole, so an interrupted rekey leaves each shard under one key
        or the other, and a rerun skips those already under the new one."""
        return self._rewrite(lambda document: rotate(document) or document)

    def _rewrite(self, change) -> int:
        """Applies ``change`` (a document -> the same document, a new one, or None to leave
        it out) to the staging files and to every finished shard, rebuilding (under a
        temporary name, renamed over, uploaded again) only the shards it changes; returns
        how many documents changed or went. Each shard is judged by its own content, so
        a rerun after a crash between a staging file and its shard finishes the shard."""
        if self.staging is not None:
            self.staging.close()
        changed: dict[int, int] = {}
        for number in self._numbers(self.staging_dir, ".jsonl"):
            changed[number] = rewrite_documents(self._staging_path(number), change)
        staged = set(changed)
        for number in self._finished():
            documents, hits = [], 0
            for document in self.documents_in(number):
                new = change(document)
                hits += new is not document
                if new is not None:
                    documents.append(new)
            if not hits:
                continue
            changed[number] = max(changed.get(number, 0), hits)
            if number in staged:  # its staging file (already changed) is the whole shard
                self._finish(number)
                continue
            temp = self._staging_path(number)
            with temp.open("w", encoding="utf-8") as out:
                for document in documents:
                    out.write(json.dumps(document, ensure_ascii=False, default=json_default) + "\n")
            self._finish(number)
            temp.unlink()
        if self.staging is not None:
            self.staging = JsonlAppender(self._staging_path(self.current), self.config["fsync"])
            self.count = sum(1 for _ in _documents(self._staging_path(self.current)))
        return sum(changed.values())

    def documents_in(self, number: int) -> Iterator[dict]:
        """The documents of a finished shard, as written (a format that keeps them)."""
        raise NotImplementedError

    def part_documents(self, part_dir: Path) -> Iterator[list[dict]]:
        label = self.context.name or type(self).__name__.lower()
        return document_batches(part_dir / f"{_safe(label)}.jsonl")

    def discard_part(self, part_dir: Path) -> None:
        label = self.context.name or type(self).__name__.lower()
        (part_dir / f"{_safe(label)}.jsonl").unlink(missing_ok=True)

    # -- helpers for formats ------------------------------------------------------------------

    def image_bytes(self, document: dict) -> tuple[bytes, str] | None:
        """The stored image of a document and its extension, EXIF removed when the sink
        says so; None when the file is gone."""
        info = document.get("file") or {}
        try:
            # Opened folder by folder without following a link: a folder swapped for a
            # link since the record was stored is refused here, not read through.
            data = read_inside(self.context.output_dir.resolve(), info.get("path") or "")
        except ValueError as exc:
            return self._refuse(document, str(exc))
        except OSError as exc:
            return self._refuse(document, f"image file {info.get('path')!r}: "
                                          f"{exc.strerror or exc}")
        extension = IMAGE_EXTENSIONS.get(info.get("format") or "", "bin")
        if self.config["strip_exif"] and extension in ("jpg", "webp"):
            try:
                data = strip_exif(data)
            except Exception:  # neither piexif nor Pillow can read it: never write it
                return self._refuse(document, f"image file {info.get('path')!r}: unreadable, "
                                              f"its EXIF cannot be removed")
        return data, extension

    def _refuse(self, document: dict, reason: str) -> None:
        self.refusals.append(Refusal(document["id"], str(document.get("source") or ""),
                                     document.get("term"), f"left out of the shards: {reason}"))

    def refused(self) -> list[Refusal]:
        refusals, self.refusals = self.refusals, []
        return refusals

    # -- files --------------------------------------------------------------------------------

    def _samples(self, documents: Iterator[dict], copies: list[str]) -> Iterator[dict]:
        """The documents that make a sample: a copy of another picture is one only with
        ``keep_copies`` (its id goes to ``copies``); a record written again after a
        refusal (``refused``) is in the staging twice, and a sample once."""
        aside = {} if self.config["keep_copies"] else set_aside_ids(self.context.output_dir)
        seen: set[str] = set()
        for document in documents:
            if document["id"] in seen:
                continue
            seen.add(document["id"])
            if not self.config["keep_copies"] and copy_reason(document, aside):
                copies.append(document["id"])
                continue
            yield document

    def _held_ids(self, number: int) -> set[str]:
        """The records a finished shard stands for: its samples, and the copies its build
        left out (stored all the same: not to be written again)."""
        with self._open_shard(number) as handle:
            return self.ids_in(handle) | self._copies(number)

    def _copies(self, number: int) -> set[str]:
        try:
            return set(json.loads(self._copies_path(number).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return set()

    def _finish(self, number: int) -> None:
        staging = self._staging_path(number)
        final = self._shard_path(number)
        temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        copies: list[str] = []
        try:
            stats = self.build(self._samples(_documents(staging), copies), temp, number)
            with temp.open("rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        if copies:
            # Added to the earlier build's: a shard rebuilt from itself (remove) no longer
            # has its copies' documents.
            copies_path = self._copies_path(number)
            copies_temp = copies_path.with_name(f".{copies_path.name}.tmp")
            copies_temp.write_text(json.dumps(sorted(set(copies) | self._copies(number))),
                                   encoding="utf-8")
            os.replace(copies_temp, copies_path)
        stats_path = None
        if self.stats_name:
            stats_path = self.folder / self.stats_name.format(number)
            stats_temp = stats_path.with_name(f".{stats_path.name}.tmp")
            stats_temp.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
            os.replace(stats_temp, stats_path)
        if self.remote is not None:
            # An object appears only once its upload is complete: no torn shard there either.
            self.remote.put(final, final.name)
            if stats_path is not None:
                self.remote.put(stats_path, stats_path.name)
            if not self.config["keep_local"]:
                final.unlink()
                if stats_path is not None:
                    stats_path.unlink()

    def _remove_shard(self, number: int) -> None:
        names = [self._shard_path(number).name]
        if self.stats_name:
            names.append(self.stats_name.format(number))
        self._copies_path(number).unlink(missing_ok=True)
        for name in names:
            (self.folder / name).unlink(missing_ok=True)
            if self.remote is not None:
                self.remote.remove(name)

    def _finished(self) -> list[int]:
        """Numbers of the finished shards, here and (when uploading) there."""
        numbers = set(self._numbers(self.folder, self.suffix))
        if self.remote is not None:
            numbers |= set(self._numbers_in(self.remote.names(), self.suffix))
        return sorted(numbers)

    def _open_shard(self, number: int):
        local = self._shard_path(number)
        if local.exists() or self.remote is None:
            return local.open("rb")
        return self.remote.open(local.name)

    def _shard_path(self, number: int) -> Path:
        return self.folder / f"{number:05d}{self.suffix}"

    def _staging_path(self, number: int) -> Path:
        return self.staging_dir / f"{number:05d}.jsonl"

    def _copies_path(self, number: int) -> Path:
        return self.staging_dir / f"{number:05d}.copies.json"

    @classmethod
    def _numbers(cls, folder: Path, suffix: str) -> list[int]:
        return cls._numbers_in(os.listdir(folder), suffix)

    @staticmethod
    def _numbers_in(names, suffix: str) -> list[int]:
        pattern = re.compile(r"(\d{5,})" + re.escape(suffix))
        return sorted(int(m.group(1)) for name in names if (m := pattern.fullmatch(name)))


def strip_exif(data: bytes) -> bytes:
    """JPEG or WebP bytes without their EXIF block (the pixels untouched)."""
    import piexif

    out = io.BytesIO()
    try:
        piexif.remove(data, out)
    except Exception:  # a malformed file piexif cannot walk: re-encode without metadata
        from PIL import Image

        out = io.BytesIO()
        with Image.open(io.BytesIO(data)) as image:
            image.save(out, image.format, quality=95)
    return out.getvalue()


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label) or "sink"


def _documents(path: Path) -> Iterator[dict]:
    """The complete lines of a JSONL file (a line cut off by a crash ends it)."""
    try:
        reader = path.open("rb")
    except FileNotFoundError:
        return
    with reader:
        for line in reader:
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except ValueError:
                continue


def document_batches(path: Path) -> Iterator[list[dict]]:
    """The documents of a JSONL file (a cluster shard's part), in batches of
    ``PART_BATCH``, as ``Sink.part_documents`` gives them."""
    batch: list[dict] = []
    for document in _documents(path):
        batch.append(document)
        if len(batch) >= PART_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class JsonlAppender:
    """An append-only JSONL file whose committed length is the checkpoint: the JSONL
    sink's records, a shard sink's staging files and cluster parts. Each ``append`` is
    one write, synced with ``fsync``; a failed one is cut back, leaving no half line."""

    def __init__(self, path: Path, fsync: bool):
        self.path = path
        self.fsync = fsync
        self._open()
        self._lines: int | None = 0

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        self.handle = os.fdopen(os.open(self.path, flags, 0o644), "ab")
        self.size = self.handle.seek(0, os.SEEK_END)

    @property
    def lines(self) -> int:
        """Documents in the file; counted when first asked after a resume to an offset
        (the JSONL sink's records never ask, and may be long)."""
        if self._lines is None:
            self._lines = sum(1 for _ in _documents(self.path))
        return self._lines

    def ends_with(self, offset: int | None, last_id: Any) -> bool:
        """Whether the file's first ``offset`` bytes end with a whole line, the one of
        record ``last_id``: whether a checkpoint still describes this file (not one
        written since by something else, or cut short)."""
        if offset is None or offset > self.size:
            return False
        if offset == 0:
            return True
        with self.path.open("rb") as reader:
            reader.seek(offset - 1)
            if reader.read(1) != b"\n":
                return False
            start = offset - 1
            while start > 0:
                step = min(start, 64 * 1024)
                reader.seek(start - step)
                newline = reader.read(step).rfind(b"\n")
                if newline != -1:
                    start = start - step + newline + 1
                    break
                start -= step
            reader.seek(start)
            line = reader.read(offset - start)
        try:
            return json.loads(line).get("id") == last_id
        except (ValueError, AttributeError):
            return False

    def resume(self, offset: int | None) -> set[str]:
        """Cuts back to ``offset`` (the last commit); without one, to the last complete
        line, returning the ids already there."""
        ids: set[str] = set()
        if offset is not None and offset <= self.size:
            self.handle.truncate(offset)
            self.size = offset
            self._lines = None
            return ids
        good = lines = 0
        with self.path.open("rb") as reader:
            for line in reader:
                if not line.endswith(b"\n"):
                    break
                good += len(line)
                lines += 1
                try:
                    ids.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    pass
        self.handle.truncate(good)
        self.size = good
        self._lines = lines
        return ids

    def ids(self) -> set[str]:
        """The record ids of the file's complete lines."""
        ids: set[str] = set()
        for document in _documents(self.path):
            try:
                ids.add(document["id"])
            except (KeyError, TypeError):
                pass
        return ids

    def append(self, documents: list[dict]) -> int:
        """Writes the documents, one line each; returns the file's size after them."""
        if documents:
            data = "".join(json.dumps(d, ensure_ascii=False, default=json_default) + "\n"
                           for d in documents).encode("utf-8")
            try:
                self.handle.write(data)
                self.handle.flush()
                if self.fsync:
                    os.fsync(self.handle.fileno())
            except OSError:
                try:
                    self.handle.close()  # its buffer holds what failed: drop it with the handle
                except OSError:
                    pass  # closing flushes that buffer again, into the same full disk
                os.truncate(self.path, self.size)
                self._open()
                raise
            self.size += len(data)
            if self._lines is not None:
                self._lines += len(documents)
        return self.size

    def close(self) -> None:
        self.handle.close()
