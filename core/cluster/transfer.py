"""Shards that travel through an object store, for cluster workers that share no folder
with the client (``run.cluster_store``: an fsspec URL, ``s3://bucket/prefix``).

A worker runs its shard in a scratch folder of its own, then sends it whole: one tar of
the shard's folder (its run state, the parts of the unshared sinks, what enrichers keep)
and the images it placed, put under ``attempts/<shard>/``, and only then the shard's
commit marker naming that tar (an object store's PUT makes an
object visible only once complete, so a marker never names half a tar). A worker lost
before the marker leaves nothing the client reads; its shard runs again elsewhere. The
marker is the attempt's (``committed/<shard>/<attempt>.json``): an attempt that commits
late (its client was killed, a new one runs the shard again) never hides another.

The client receives a committed shard into the output folder (the tar's checksum
checked, its members checked before any is written), merges it as it merges a shard of
a shared folder, then removes the tar and marks the marker merged. A client restarted
after a crash receives the committed shards it had not merged and does not run again
the shards that were complete.

Each attempt's folder is ``<shard>~<attempt>``, so that a shard run again (an incomplete
one, in a later run) never overwrites what an earlier attempt kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tarfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..contract.shards import SHARDS_DIR
from ..errors import HarvestError, UsageError
from ..output.remote import Remote

ATTEMPT_SEPARATOR = "~"
MAX_MARKER_BYTES = 1 << 20


def shard_of(part_name: str) -> str:
    """The shard key of an attempt's folder name (a shared folder's is the key itself)."""
    return part_name.split(ATTEMPT_SEPARATOR, 1)[0]


def attempt_name(key: str) -> str:
    return f"{key}{ATTEMPT_SEPARATOR}{uuid.uuid4().hex[:12]}"


class TransferError(HarvestError):
    """A shard's tar that is not what its marker says, or holds what no shard writes."""


class ShardStore:
    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.remote = Remote(url, storage_options, "run.cluster_store")

    def check(self) -> None:
        self.remote.check()

    # On a worker.

    def send(self, scratch: Path, part_name: str, outcome: str) -> dict:
        """Puts the attempt's tar, then its marker; returns the marker."""
        key = shard_of(part_name)
        tar_path = scratch.parent / f"{scratch.name}.tar"
        try:
            with tarfile.open(tar_path, "w") as tar:
                tar.add(scratch / SHARDS_DIR / part_name, arcname=f"{SHARDS_DIR}/{part_name}")
                if (scratch / "images").is_dir():
                    tar.add(scratch / "images", arcname="images")
            digest = _sha256(tar_path)
            name = f"attempts/{key}/{part_name}.tar"
            self.remote.put(tar_path, name)
            marker = {"shard": key, "part": part_name, "object": name, "sha256": digest,
                      "bytes": tar_path.stat().st_size, "outcome": outcome, "merged": False}
            self._write_marker(marker)
            return marker
        finally:
            tar_path.unlink(missing_ok=True)

    # On the client.

    def committed(self) -> list[dict]:
        """The marker of every attempt committed in the store."""
        found = []
        for key in _names(self.remote, "committed"):
            for name in _names(self.remote, f"committed/{key}"):
                where = f"committed/{key}/{name}"
                with self.remote.fs.open(posixpath.join(self.remote.root, where),
                                         "rb") as handle:
                    data = handle.read(MAX_MARKER_BYTES + 1)
                try:
                    marker = json.loads(data) if len(data) <= MAX_MARKER_BYTES else None
                except ValueError:
                    marker = None
                if not isinstance(marker, dict) or not _sound(marker) or \
                        where != f"committed/{marker['shard']}/{marker['part']}.json":
                    raise UsageError(f"{self.url}/{where}: not a shard marker harvest wrote; "
                                     f"remove it to run that shard again")
                found.append(marker)
        return found

    def receive(self, marker: dict, output: Path) -> Path:
        """Writes the attempt's folder and images into ``output``; returns the folder."""
        if not _sound(marker):
            raise TransferError(f"shard marker {marker!r:.200}: not one harvest wrote")
        incoming = output / ".harvest" / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        local = incoming / f"{marker['part']}.tar"
        remote_path = posixpath.join(self.remote.root, marker["object"])
        if self.remote.fs.size(remote_path) != marker["bytes"]:
            raise TransferError(f"{self.url}/{marker['object']}: not the size its marker says")
        try:
            self.remote.fs.get_file(remote_path, str(local))
            if local.stat().st_size != marker["bytes"] or _sha256(local) != marker["sha256"]:
                raise TransferError(f"{self.url}/{marker['object']}: its bytes are not what "
                                    f"its marker says (changed in the store?)")
            with tarfile.open(local) as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, marker["part"])
                for member in members:
                    if member.isfile():
                        _extract_file(tar, member, output)
        finally:
            local.unlink(missing_ok=True)
        return output / SHARDS_DIR / marker["part"]

    def settle(self, marker: dict) -> None:
        """After the merge: the tar goes, the marker says merged (and keeps the outcome, by
        which a later run skips a complete shard)."""
        self._write_marker({**marker, "merged": True})
        self.remote.remove(marker["object"])

    def _write_marker(self, marker: dict) -> None:
        path = posixpath.join(self.remote.root, "committed", marker["shard"],
                              f"{marker['part']}.json")
        with self.remote.fs.open(path, "wb") as handle:
            handle.write(json.dumps(marker, sort_keys=True).encode())


def _names(remote: Remote, folder: str) -> list[str]:
    try:
        return [posixpath.basename(p.rstrip("/")) for p in
                remote.fs.ls(posixpath.join(remote.root, folder), detail=False)]
    except FileNotFoundError:
        return []


def _sound(marker: dict) -> bool:
    key, part = marker.get("shard"), marker.get("part")
    return (isinstance(key, str) and _plain(key) and isinstance(part, str)
            and shard_of(part) == key and _plain(part.replace(ATTEMPT_SEPARATOR, "", 1))
            and marker.get("object") == f"attempts/{key}/{part}.tar"
            and isinstance(marker.get("sha256"), str) and isinstance(marker.get("bytes"), int)
            and isinstance(marker.get("outcome"), str))


def _plain(name: str) -> bool:
    return bool(name) and all(ch.isalnum() or ch in "_-" for ch in name)


def _check_member(member: tarfile.TarInfo, part: str) -> None:
    name = member.name
    inside = name == "images" or name.startswith("images/") or \
        name == f"{SHARDS_DIR}/{part}" or name.startswith(f"{SHARDS_DIR}/{part}/")
    parts = name.split("/")
    if not inside or ".." in parts or "" in parts or name.startswith("/") or \
            not (member.isfile() or member.isdir()):
        raise TransferError(f"shard {part}: its tar holds {name!r}, which no shard writes")


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, output: Path) -> None:
    target = output / member.name
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    temp = target.with_name(f".{target.name}.{os.getpid()}.part")
    with source, open(temp, "wb") as handle:
        shutil.copyfileobj(source, handle, 1 << 20)
        handle.flush()
        os.fsync(handle.fileno())
    if target.is_file() and member.name.startswith("images/"):
        same = _sha256(target) == _sha256(temp)
        temp.unlink()
        if not same:
            # Paths are claimed cluster-wide: another file here means the folder changed.
            raise TransferError(f"{target}: already holds another file; a shard's image "
                                f"would replace it")
        return
    os.replace(temp, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
