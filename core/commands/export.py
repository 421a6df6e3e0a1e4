"""``harvest export``: a dataset from a harvest (ImageFolder tree, manifest or Hugging Face
folder), with its credits, card and Croissant metadata."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..cleaning.curation import Verdicts, lay_over, load_saved_review, read_overlays, set_aside_ids
from ..errors import UsageError
from ..output.card import Tally, write_card
from ..output.crypto import FieldCipher, Keyring
from ..output.records import read_records
from ..output.storage import safe_component, stored_file
from ..output.takedown import crash_point

log = logging.getLogger("harvest.export")


SKIPPED = "\0skipped"  # not a class: the records whose file path leaves the harvest
MANIFEST_COLUMNS = ("path", "class", "id", "source", "term", "lang", "sha256", "width", "height",
                    "license", "attribution", "country", "city", "scores")


def export_dataset(output: Path, destination: Path, **how) -> dict[str, int]:
    """A dataset from a harvest (see ``_write_dataset``), built beside ``destination`` and
    renamed to it once complete: an export killed midway leaves no folder that looks like
    a dataset, and the next export starts again from nothing."""
    if destination.exists() and any(destination.iterdir()):
        raise UsageError(f"{destination}: exists and is not empty")
    partial = destination.parent / f".{destination.name}.harvest-export-partial"
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)  # what an interrupted export of this destination left
    partial.mkdir(parents=True)
    try:
        counts = _write_dataset(output, partial, **how)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if destination.exists():
        destination.rmdir()  # empty, checked above
    os.rename(partial, destination)
    return counts


def _write_dataset(output: Path, destination: Path, *, fmt: str = "imagefolder",
                   records_path: Path | None = None, by: str = "term",
                   keyring: Keyring | None = None, only_kept: bool = True,
                   copy: bool = False, recheck=None, embeddings: bool = False) -> dict[str, int]:
    """A dataset from a harvest, streamed in the records' order (so the same inputs give
    byte-identical manifests):

    - ``imagefolder``: ``destination/<class>/<image>`` (one folder per term by default, the
      layout ImageFolder loaders read), hard links or copies;
    - ``manifest``: no image copies, paths point into the harvest's ``images/``;
    - ``hf``: the ImageFolder layout plus ``metadata.jsonl``, the file Hugging Face's
      ``imagefolder`` loader reads the columns (and the ``label``) from;

    all with ``manifest.csv``, ``manifest.jsonl``, the credits files and the dataset card
    (``README.md`` with Hugging Face front matter, ``croissant.json``); with
    ``embeddings``, ``embeddings.npy`` (float16, a row per exported picture that has one)
    and ``embeddings-ids.txt`` (the record id of each row). Each distinct
    image appears once; records a scorer marked ``keep: false`` are left out unless
    ``only_kept`` is off (records the license filter dropped were never stored)."""
    from ..output.credits import write_credits

    records_path = records_path or output / "records.jsonl"
    cipher = FieldCipher(keyring) if keyring else None
    if by != "term" and not any(by in record for record in read_records(records_path)):
        raise UsageError(f"--by {by}: no record has this field (try term, source, license, "
                         f"country, country_code, city)")
    saved = load_saved_review(output)  # what the user chose in `harvest review`
    aside = set_aside_ids(output) if only_kept else {}
    judge = Verdicts(*(saved or ({}, {})), aside)
    overlays = read_overlays(output)
    counts: dict[str, int] = {}
    seen: set[str] = set()
    exported: list[tuple[str, str]] = []  # (record id, sha256), in the manifest's order
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
            record = lay_over(record, overlays)  # learned scores, for the page's thresholds
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
                    # Text, as the card declares them (a number as its digits).
                    **{k: (v if isinstance(v, str) else str(v))
                       if isinstance(v, (str, int, float)) else None
                       for k, v in columns.items()},
                    "width": file_info.get("width"), "height": file_info.get("height"),
                    "sha256": sha}, ensure_ascii=False) + "\n")
            counts[folder] = counts.get(folder, 0) + 1
            exported.append((record.get("id"), sha))
            tally.add(record, folder)
            crash_point("exported-one")
    opted_out = counts.pop("\0opted out", 0)
    if opted_out:
        log.warning("%d image(s) left out: their hosts opted out since the harvest", opted_out)
    skipped = counts.pop(SKIPPED, 0)
    if skipped:
        log.warning("%d record(s) skipped: their file path leaves the harvest folder "
                    "(records.jsonl was edited?)", skipped)
    write_credits(destination, kept_path)
    kept_path.unlink()
    if embeddings:
        _write_embeddings(output, destination, exported)
    write_card(destination, card_title(output), tally, fmt=fmt,
               metadata_file="metadata.jsonl" if fmt == "hf" else "manifest.csv",
               columns={**{name: "string" for name in HF_COLUMNS}, "width": "int64",
                        "height": "int64", "sha256": "string"} if fmt == "hf" else None)
    return counts


EMBEDDING_CHUNK = 10_000


def _write_embeddings(output: Path, destination: Path, exported: list[tuple[str, str]]) -> None:
    """The exported pictures' embeddings, a chunk at a time (never all in memory)."""
    import numpy as np

    from ..contract.shards import state_dirs
    from ..output.embeddings import OutputEmbeddings

    with OutputEmbeddings(state_dirs(output)) as embeddings:
        if embeddings.dims is None:
            raise UsageError(f"{output}: no embeddings to export: add the `embed` enricher "
                             "to the recipe and run it")
        dims = embeddings.dims
        # One pass over the stores (a takedown between two would make the header lie),
        # the rows into a scratch file, then the .npy: its header needs their count.
        rows_path = destination / ".embeddings.rows"
        rows = 0
        with rows_path.open("wb") as body, \
                (destination / "embeddings-ids.txt").open("w", encoding="utf-8") as ids:
            for start in range(0, len(exported), EMBEDDING_CHUNK):
                chunk = exported[start:start + EMBEDDING_CHUNK]
                vectors = embeddings.vectors([sha for _, sha in chunk])
                for record_id, sha in chunk:
                    if sha in vectors:
                        body.write(vectors[sha].astype(np.float16).tobytes())
                        ids.write(f"{record_id}\n")
                        rows += 1
        crash_point("embeddings-rows")
        with (destination / "embeddings.npy").open("wb") as table, rows_path.open("rb") as body:
            np.lib.format.write_array_header_1_0(
                table, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                        "shape": (rows, dims)})
            shutil.copyfileobj(body, table, 1 << 20)
        rows_path.unlink()


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
