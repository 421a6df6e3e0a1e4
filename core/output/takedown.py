"""``harvest takedown`` and ``harvest purge``: removing what an owner asks to remove, or what
is past its retention, from everything a harvest wrote, and remembering it.

A takedown finds the records to remove (by URL, content sha256, source id or owner),
with every record that shares their picture (exact copies, and near-duplicates when
asked); deletes the image files; removes the records from each sink (the JSONL file
rewritten atomically, MongoDB documents deleted, shards rebuilt without them); and adds a
tombstone to the run state, so that no later run stores the record or those bytes again.
Each takedown and purge appends a line to ``takedowns.jsonl`` in the output folder: what
(ids, content hashes), when and why; owners appear only as a hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .records import read_records
from .storage import inside

AUDIT_LOG = "takedowns.jsonl"
SINKS_FILE = ".harvest/sinks.json"
OWNER_FIELDS = ("owner", "owner_name", "path_alias", "author")


@dataclass
class Selection:
    ids: set[str] = field(default_factory=set)
    sha256s: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)


def select(records_path: Path, *, url: str | None = None, sha256: str | None = None,
           source_id: str | None = None, owner: str | None = None,
           near_duplicates: bool = False, cipher=None,
           set_aside_copies: dict[str, str] | None = None) -> Selection:
    """The records a takedown removes, and their pictures. ``cipher`` decrypts owner fields
    of an encrypted harvest; without it, an owner can only be matched in clear text.
    ``near_duplicates``: each chosen record's copies go too, both ways, whether the copy
    came later (``near_duplicate_of``) or earlier and was set aside for it
    (``set_aside_copies``: record id -> the record kept instead)."""
    if not records_path.is_file():
        raise UsageError(f"{records_path}: no records file (is this a harvest output folder?)")
    chosen = Selection()
    everything = []
    for record in read_records(records_path):
        everything.append(record)
        if cipher is not None and record.get("_encrypted"):
            try:
                record = cipher.decrypt(record)
            except Exception:
                raise UsageError("takedown: the key does not decrypt these records") from None
        info = record.get("file") or {}
        matched = ((url is not None and record.get("url") == url)
                   or (sha256 is not None and sha256.lower() in (
                       info.get("sha256"), (record.get("original") or {}).get("sha256")))
                   or (source_id is not None and source_id in (record.get("id"),
                                                               record.get("source_id")))
                   or (owner is not None and any(isinstance(record.get(name), str)
                                                 and record[name].casefold() == owner.casefold()
                                                 for name in OWNER_FIELDS)))
        if matched:
            chosen.ids.add(record["id"])
            for held in (info.get("sha256"), (record.get("original") or {}).get("sha256")):
                if held:
                    chosen.sha256s.add(held)
    # Every record that holds one of those pictures goes with it.
    # Record id -> the records it is a copy of: it may be both a later copy of one and
    # set aside for another.
    links: dict[str, set[str]] = {}
    if near_duplicates:
        for record in everything:
            if record.get("near_duplicate_of"):
                links.setdefault(record["id"], set()).add(record["near_duplicate_of"])
        for record_id, kept in (set_aside_copies or {}).items():
            links.setdefault(record_id, set()).add(kept)
    grew = True
    while grew:
        grew = False
        for record in everything:
            info = record.get("file") or {}
            linked = (info.get("sha256") in chosen.sha256s
                      or bool(links.get(record["id"], set()) & chosen.ids))
            if linked and record["id"] not in chosen.ids:
                chosen.ids.add(record["id"])
                grew = True
            if record["id"] in chosen.ids and info.get("sha256") \
                    and info["sha256"] not in chosen.sha256s:
                chosen.sha256s.add(info["sha256"])
                grew = True
            if record["id"] in chosen.ids and info.get("path"):
                chosen.paths.add(info["path"])
        for record_id, originals in links.items():
            if record_id in chosen.ids and not originals <= chosen.ids:
                chosen.ids |= originals
                grew = True
    return chosen


def delete_files(output: Path, paths: set[str]) -> int:
    removed = 0
    root = output.resolve()
    for relpath in sorted(paths):
        try:
            target = inside(root, relpath)
        except ValueError:
            continue  # a record naming a path outside the output: never follow it
        try:
            target.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def audit_entry(action: str, chosen: Selection, reason: str | None, **what) -> dict:
    """The audit line of a takedown or purge; owners only as a hash. Its ``intent`` names
    it, so that finishing an interrupted one never logs it twice."""
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action,
             "intent": uuid.uuid4().hex, "reason": reason or "", "ids": sorted(chosen.ids),
             "sha256": sorted(chosen.sha256s), **what}
    if entry.get("owner"):
        entry["owner"] = "sha256:" + hashlib.sha256(entry["owner"].encode()).hexdigest()
    return entry


def write_audit(output: Path, entry: dict) -> None:
    """Appends the line to the append-only audit log, once, synced."""
    log_path = output / AUDIT_LOG
    if log_path.is_file():
        with log_path.open(encoding="utf-8") as log:
            for line in log:
                try:
                    if json.loads(line).get("intent") == entry["intent"]:
                        return
                except (ValueError, AttributeError):
                    continue
    with log_path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        log.flush()
        os.fsync(log.fileno())


def crash_point(step: str) -> None:
    """Where the crash tests kill a takedown, purge or rekey (``HARVEST_TEST_KILL_AT=<step>``),
    as kill -9 would, to check that running it again finishes the job."""
    if os.environ.get("HARVEST_TEST_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def remember_sinks(recipe) -> None:
    """Writes which recipe and sinks a run wrote to (no option, so no secret), so that
    ``takedown OUTPUT`` and ``purge OUTPUT`` reach every sink, or say which they did not."""
    path = recipe.output / SINKS_FILE
    temp = path.with_name(f".{path.name}.tmp")
    text = json.dumps({
        "recipe": str(recipe.path.resolve()),
        "sinks": [{"name": spec.label, "use": spec.use, "default": spec.cls.is_default}
                  for spec in recipe.sinks]}, ensure_ascii=False, indent=1) + "\n"
    # A link planted at the temporary name is not followed out of the folder.
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, path)


def remembered_sinks(output: Path) -> tuple[Path | None, list[str]]:
    """The recipe the last run of ``output`` used, and the names of its sinks other than
    the default one (the JSONL records, which a takedown reaches without a recipe)."""
    try:
        known = json.loads((output / SINKS_FILE).read_text(encoding="utf-8"))
        return (Path(known["recipe"]),
                [sink["name"] for sink in known["sinks"] if not sink.get("default")])
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def parse_age(text: str) -> float:
    """``90d``, ``12h``, ``30m`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhm])\s*", text or "")
    if not match:
        raise UsageError(f"--older-than {text}: expected a duration such as 90d, 12h or 30m")
    return float(match.group(1)) * {"d": 86400, "h": 3600, "m": 60}[match.group(2)]
