"""Working with a finished harvest: decrypt, re-encrypt, export as a training tree."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .card import Tally, write_card
from .crypto import ENCRYPTED, FieldCipher, Keyring
from .curation import Verdicts, load_saved_review, set_aside_ids
from .errors import UsageError
from .record import json_default
from .storage import safe_component, stored_file

log = logging.getLogger("harvest.export")


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


SKIPPED = "\0skipped"  # not a class: the records whose file path leaves the harvest
MANIFEST_COLUMNS = ("path", "class", "id", "source", "term", "lang", "sha256", "width", "height",
                    "license", "attribution", "country", "city", "scores")


def export_dataset(output: Path, destination: Path, *, fmt: str = "imagefolder",
                   records_path: Path | None = None, by: str = "term",
                   keyring: Keyring | None = None, only_kept: bool = True,
                   copy: bool = False, recheck=None) -> dict[str, int]:
    """A dataset from a harvest, streamed in the records' order (so the same inputs give
    byte-identical manifests):

    - ``imagefolder``: ``destination/<class>/<image>`` (one folder per term by default, the
      layout ImageFolder loaders read), hard links or copies;
    - ``manifest``: no image copies, paths point into the harvest's ``images/``;
    - ``hf``: the ImageFolder layout plus ``metadata.jsonl``, the file Hugging Face's
      ``imagefolder`` loader reads the columns (and the ``label``) from;

    all with ``manifest.csv``, ``manifest.jsonl``, the credits files and the dataset card
    (``README.md`` with Hugging Face front matter, ``croissant.json``). Each distinct
    image appears once; records a scorer marked ``keep: false`` are left out unless
    ``only_kept`` is off (records the license filter dropped were never stored)."""
    from .credits import write_credits

    records_path = records_path or output / "records.jsonl"
    cipher = FieldCipher(keyring) if keyring else None
    if by != "term" and not any(by in record for record in read_records(records_path)):
        raise UsageError(f"--by {by}: no record has this field (try term, source, license, "
                         f"country, country_code, city)")
    if destination.exists() and any(destination.iterdir()):
        raise UsageError(f"{destination}: exists and is not empty")
    destination.mkdir(parents=True, exist_ok=True)
    saved = load_saved_review(output)  # what the user chose in `harvest review`
    aside = set_aside_ids(output) if only_kept else {}
    judge = Verdicts(*(saved or ({}, {})), aside)
    counts: dict[str, int] = {}
    seen: set[str] = set()
    root = output.resolve()
    kept_path = destination / ".records.jsonl"
    tally = Tally()
    with (destination / "manifest.jsonl").open("w", encoding="utf-8") as manifest_jsonl, \
            (destination / "manifest.csv").open("w", encoding="utf-8", newline="") as table, \
            kept_path.open("w", encoding="utf-8") as kept, \
            _optional(destination / "metadata.jsonl", fmt == "hf") as metadata:
        writer = csv.DictWriter(table, MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in read_records(records_path):
            file_info = record.get("file") or {}
            sha = file_info.get("sha256")
            if not sha or sha in seen or record.get("duplicate_of"):
                continue
            # The review page's rule: a manual decision, else near-duplicates left out (the
            # same picture, kept once: the best copy), else the thresholds.
            if only_kept and not judge(record)[0]:
                continue
            try:
                source = stored_file(root, record)
            except ValueError as refused:
                counts.setdefault(SKIPPED, 0)
                counts[SKIPPED] += 1
                log.warning("%s skipped: %s", str(record.get("id"))[:100], refused)
                continue
            if not source.is_file():
                continue
            if recheck is not None and (reason := recheck(record.get("url") or "")):
                counts.setdefault("\0opted out", 0)
                counts["\0opted out"] += 1
                log.info("%s left out: %s", record.get("id"), reason)
                continue
            seen.add(sha)
            if cipher is not None:
                record = cipher.decrypt(record)
            label = record.get(by)
            if isinstance(label, (list, dict)) or label in (None, ""):
                label = "unknown"
            folder = safe_component(str(label))
            if fmt in ("imagefolder", "hf"):
                target = destination / folder / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if copy:
                    shutil.copy2(source, target)
                else:
                    try:
                        os.link(source, target)
                    except OSError:
                        shutil.copy2(source, target)
                path = target.relative_to(destination).as_posix()
            else:
                path = os.path.relpath(source, destination).replace(os.sep, "/")
            row = {"path": path, "class": folder, "id": record.get("id"),
                   "source": record.get("source"), "term": record.get("term"),
                   "lang": record.get("lang"), "sha256": sha, "width": file_info.get("width"),
                   "height": file_info.get("height"), "license": record.get("license"),
                   "attribution": record.get("attribution"), "country": record.get("country"),
                   "city": record.get("city"), "scores": record.get("scores")}
            manifest_jsonl.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            writer.writerow({**row, "scores": json.dumps(row["scores"], sort_keys=True)
                             if row["scores"] is not None else ""})
            kept.write(json.dumps(record, ensure_ascii=False) + "\n")
            if metadata is not None:
                columns = {name: record.get(name) for name in HF_COLUMNS}
                metadata.write(json.dumps({
                    "file_name": path, "label": folder,
                    **{k: v if v is None or isinstance(v, (str, int, float)) else None
                       for k, v in columns.items()},
                    "width": file_info.get("width"), "height": file_info.get("height"),
                    "sha256": sha}, ensure_ascii=False) + "\n")
            counts[folder] = counts.get(folder, 0) + 1
            tally.add(record, folder)
    opted_out = counts.pop("\0opted out", 0)
    if opted_out:
        log.warning("%d image(s) left out: their hosts opted out since the harvest", opted_out)
    skipped = counts.pop(SKIPPED, 0)
    if skipped:
        log.warning("%d record(s) skipped: their file path leaves the harvest folder "
                    "(records.jsonl was edited?)", skipped)
    write_credits(destination, kept_path)
    kept_path.unlink()
    write_card(destination, card_title(output), tally, fmt=fmt,
               metadata_file="metadata.jsonl" if fmt == "hf" else "manifest.csv")
    return counts


NEUTRAL_TITLE = "Harvested images"


def card_title(output: Path) -> str:
    """The recipe's name, as the last run recorded it with its secrets replaced; a
    neutral title when that name held a secret or is unknown. Never the folder's name:
    an ``output: ${NAME}`` folder is named by a secret the export cannot tell."""
    try:
        name = json.loads((output / ".harvest" / "last-run.json").read_text(encoding="utf-8"))
        name = name.get("recipe") if isinstance(name, dict) else None
    except (OSError, ValueError):
        return NEUTRAL_TITLE
    if not isinstance(name, str) or not name.strip() or "***" in name:
        return NEUTRAL_TITLE
    return name


# Columns of the hf format's metadata.jsonl besides file_name, label and the file's size:
# text or numbers only (an encrypted field, exported without its key, is left empty).
HF_COLUMNS = ("id", "source", "term", "lang", "title", "license", "license_url", "attribution",
              "page_url", "country", "country_code", "city")


@contextmanager
def _optional(path: Path, wanted: bool):
    if not wanted:
        yield None
        return
    with path.open("w", encoding="utf-8") as handle:
        yield handle
