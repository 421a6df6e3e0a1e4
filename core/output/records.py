"""The records of a harvest: read, decrypt, re-encrypt, and rewrite them in place
(atomically: a crash leaves the old file or the new one, never a mix)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UsageError
from ..record import json_default
from .crypto import ENCRYPTED, FieldCipher, Keyring


def read_records(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise UsageError(f"{path}: no records file")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                raise UsageError(f"{path}:{number}: not a JSON line") from None


def decrypt_records(records, keyring: Keyring, out_path: Path) -> int:
    """Writes decrypted records as JSONL to ``out_path`` (mode 0600), and only once every
    record has decrypted: a wrong key leaves no file behind."""
    cipher = FieldCipher(keyring)
    if out_path.exists():
        raise UsageError(f"{out_path}: exists; refusing to overwrite")
    temp = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    count = 0
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            for record in records:
                record.pop("_id", None)
                out.write(json.dumps(cipher.decrypt(record), ensure_ascii=False,
                                     default=str) + "\n")
                count += 1
        os.replace(temp, out_path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return count


def mongo_records(uri: str, database: str, collection: str) -> Iterator[dict]:
    import pymongo

    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    try:
        yield from client[database][collection].find({}, sort=[("id", 1)])
    except pymongo.errors.PyMongoError as exc:
        raise UsageError(f"{uri}: {database}.{collection}: {exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    finally:
        client.close()


def rotation(old: Keyring, new: Keyring):
    """The per-document step of a key rotation: decrypt with any known key, re-encrypt with
    the new one; None for a document already under the new key (so reruns skip it)."""
    reader = FieldCipher(Keyring([*new.keys, *old.keys], f"{new.origin} + {old.origin}"))
    writer = FieldCipher(new)

    def rotate(document: dict) -> dict | None:
        marker = document.get(ENCRYPTED)
        if not marker or marker.get("key_id") == new.current_id:
            return None
        fields = marker["fields"]
        return writer.encrypt(reader.decrypt(document), fields)

    return rotate


def filter_jsonl(path: Path, drop: set[str]) -> int:
    """Removes the records with these ids from a JSONL file (``harvest takedown``)."""
    return rewrite_documents(path, lambda document: None if isinstance(document, dict)
                             and document.get("id") in drop else document)


def rewrite_jsonl(path: Path, rotate) -> int:
    """Re-encrypts a JSONL file: ``rotate(record)`` gives the new record, or None to keep
    it as it is. Returns how many changed."""
    changed = lines = 0

    def rotated(line: bytes) -> bytes | None:
        nonlocal changed, lines
        lines += 1
        if not line.strip():
            return None  # blank lines go
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"{path}:{lines}: not a JSON line") from None
        new = rotate(record)
        if new is None:
            return line
        changed += 1
        return (json.dumps(new, ensure_ascii=False) + "\n").encode()
    _replace_lines(path, rotated)
    return changed


def rewrite_documents(path: Path, change) -> int:
    """Applies ``change`` (a document -> the same document, a new one, or None to leave it
    out) to each line of a JSONL file, atomically; returns how many changed or went.
    Lines that are not JSON stay as they are."""
    changed = 0

    def line_of(line: bytes) -> bytes | None:
        nonlocal changed
        try:
            document = json.loads(line)
        except ValueError:
            return line
        new = change(document)
        if new is document:
            return line
        changed += 1
        return None if new is None else (
            json.dumps(new, ensure_ascii=False, default=json_default) + "\n").encode()
    _replace_lines(path, line_of)
    return changed


def _replace_lines(path: Path, transform) -> int:
    """Writes ``transform(line)`` for each line (None leaves it out) to a new file beside
    ``path`` and renames it over, so a crash leaves the old file or the new one, never
    half. Returns how many lines were left out."""
    left_out = 0
    handle, temp_name = tempfile.mkstemp(dir=path.parent, suffix=".rewrite")
    try:
        with os.fdopen(handle, "wb") as out, path.open("rb") as source:
            for line in source:
                result = transform(line)
                if result is None:
                    left_out += 1
                    continue
                out.write(result)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return left_out


