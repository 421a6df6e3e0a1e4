"""Working with a finished harvest: decrypt, re-encrypt, export as a training tree."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .crypto import ENCRYPTED, FieldCipher, Keyring
from .errors import UsageError
from .storage import safe_component


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


def decrypt_file(source: Path, keyring: Keyring, out) -> int:
    """Writes decrypted records to ``out`` only after every one decrypted."""
    cipher = FieldCipher(keyring)
    count = 0
    with tempfile.TemporaryFile("w+", encoding="utf-8") as buffer:
        for record in read_records(source):
            buffer.write(json.dumps(cipher.decrypt(record), ensure_ascii=False) + "\n")
            count += 1
        buffer.seek(0)
        shutil.copyfileobj(buffer, out)
    return count


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


def rewrite_jsonl(path: Path, rotate) -> int:
    """Re-encrypts a JSONL file by writing a new one beside it and renaming it over."""
    changed = 0
    handle, temp_name = tempfile.mkstemp(dir=path.parent, suffix=".rekey")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for record in read_records(path):
                rotated = rotate(record)
                if rotated is not None:
                    changed += 1
                out.write(json.dumps(rotated or record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return changed


def export_tree(output: Path, destination: Path, *, records_path: Path | None = None,
                by: str = "term", keyring: Keyring | None = None, only_kept: bool = True,
                copy: bool = False) -> dict[str, int]:
    """``destination/<class>/<image>`` (the ImageFolder layout) plus ``metadata.jsonl``."""
    records_path = records_path or output / "records.jsonl"
    cipher = FieldCipher(keyring) if keyring else None
    if destination.exists() and any(destination.iterdir()):
        raise UsageError(f"{destination}: exists and is not empty")
    destination.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    seen: set[str] = set()
    with (destination / "metadata.jsonl").open("w", encoding="utf-8") as metadata:
        for record in read_records(records_path):
            file_info = record.get("file") or {}
            sha = file_info.get("sha256")
            if not sha or sha in seen or record.get("duplicate_of"):
                continue
            if only_kept and (record.get("keep") is False or record.get("review") == "rejected"):
                continue
            label = record.get(by)
            if isinstance(label, (list, dict)) or label in (None, ""):
                label = "unknown"
            folder = safe_component(str(label))
            source = output / file_info["path"]
            if not source.is_file():
                continue
            target = destination / folder / Path(file_info["path"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copy2(source, target)
            else:
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
            seen.add(sha)
            if cipher is not None:
                record = cipher.decrypt(record)
            record["export_path"] = target.relative_to(destination).as_posix()
            record["class"] = folder
            metadata.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[folder] = counts.get(folder, 0) + 1
    return counts
