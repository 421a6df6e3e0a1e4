"""What plugins computed from the pictures and keep in stores of their own (the labels a
paid service returned, perceptual hashes): a takedown or purge deletes it with the
pictures, without knowing the plugins.

A plugin declares each such store once (``Context.declare_derived``): an SQLite file of
its state folder, a table, and the column holding the picture's sha256 or its record's id.
The declarations live beside the store, in the state folder's ``derived.json``, so that a
takedown given only the output folder (its recipe gone) still finds them.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from pathlib import Path

from ..errors import UsageError

DECLARATIONS = "derived.json"
KEYS = ("sha256", "record_id")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_LOCK = threading.Lock()


def _checked(file_name: str, table: str, column: str, key: str) -> dict[str, str]:
    if Path(file_name).name != file_name or not file_name.endswith(".sqlite"):
        raise ValueError(f"derived store {file_name!r}: a file name ending in .sqlite")
    for name in (table, column):
        if not _NAME.fullmatch(name):
            raise ValueError(f"derived store {file_name}: {name!r} is not a plain SQL name")
    if key not in KEYS:
        raise ValueError(f"derived store {file_name}: key {key!r} is not one of {KEYS}")
    return {"file": file_name, "table": table, "column": column, "key": key}


def declare(state_dir: Path, file_name: str, table: str, column: str, key: str) -> None:
    entry = _checked(file_name, table, column, key)
    with _LOCK:
        entries = declarations(state_dir)
        if entry in entries:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        temp = state_dir / f".{DECLARATIONS}.{os.getpid()}.tmp"
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(entries + [entry], handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        # Declared before the store holds a row: a takedown never meets rows it cannot see.
        os.replace(temp, state_dir / DECLARATIONS)


def declarations(state_dir: Path) -> list[dict[str, str]]:
    path = state_dir / DECLARATIONS
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return [_checked(e["file"], e["table"], e["column"], e["key"]) for e in entries]
    except (ValueError, TypeError, KeyError) as exc:
        # A takedown must not pass over a store it cannot read the declaration of.
        raise UsageError(f"{path}: not a list of derived stores ({exc}); restore it or "
                         f"delete the stores it names by hand") from None


def forget_derived(state_dirs: list[Path], shas: set[str], record_ids: set[str]) -> int:
    """Deletes the rows of these pictures from every declared store; SQLite's
    secure_delete overwrites them in the file too. Done again after a crash, it finishes."""
    keys = {"sha256": sorted(shas), "record_id": sorted(record_ids)}
    removed = 0
    for state_dir in state_dirs:
        for entry in declarations(Path(state_dir)):
            path = Path(state_dir) / entry["file"]
            wanted = keys[entry["key"]]
            if not path.is_file() or not wanted:
                continue
            db = sqlite3.connect(path)
            try:
                db.execute("PRAGMA secure_delete = ON")
                exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                    "name = ?", (entry["table"],)).fetchone()
                if not exists:
                    continue
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    removed += db.execute(f'DELETE FROM "{entry["table"]}" WHERE '
                                          f'"{entry["column"]}" IN ({marks})', chunk).rowcount
                db.commit()
            finally:
                db.close()
    return removed
