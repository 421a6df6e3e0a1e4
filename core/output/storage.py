"""Where images go on disk: names that are safe on Linux, macOS and Windows."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import unicodedata
from pathlib import Path

_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "TIFF": "tif",
              "BMP": "bmp", "MPO": "jpg", "HEIF": "heic", "AVIF": "avif"}
_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "gif", "webp", "tif", "tiff", "bmp", "heic", "avif"}


def safe_component(text: str, max_bytes: int = 80) -> str:
    """One path component from arbitrary text: keeps letters of any script, drops what
    any of the three file systems refuses or reads as a path, bounds the UTF-8 length."""
    name = unicodedata.normalize("NFC", text)
    name = _FORBIDDEN.sub("_", name)
    name = re.sub(r"\s+", " ", name).strip(" .")
    name = re.sub(r"\.{2,}", "_", name)
    if not name:
        name = "_"
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = "_" + name
    encoded = name.encode("utf-8")
    if len(encoded) > max_bytes:
        digest = hashlib.sha1(encoded).hexdigest()[:8]
        name = encoded[: max_bytes - 9].decode("utf-8", "ignore").rstrip(" .") + "~" + digest
    return name


def image_relpath(folder: str, source: str, source_id: str, image_format: str,
                  suffix: str = "") -> str:
    extension = EXTENSIONS.get(image_format, image_format.lower() or "bin")
    name, dot, old_extension = source_id.rpartition(".")
    if dot and old_extension.lower() in _IMAGE_EXTENSIONS:
        source_id = name
    stem = safe_component(f"{source}-{source_id}", 100)
    return f"images/{safe_component(folder)}/{stem}{suffix}.{extension}"


def inside(root: Path, relpath: str) -> Path:
    """The path of ``relpath`` under ``root`` (an absolute, resolved folder); refuses
    anything that would escape it. Names come from ``safe_component``, which leaves no
    separator or ``..`` in them; this is the check that does not trust that."""
    target = os.path.normpath(os.path.join(root, relpath))
    if not target.startswith(str(root) + os.sep):
        raise ValueError(f"path {relpath!r} escapes the output folder")
    for path in (target, os.path.dirname(target)):
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link; harvest writes only inside its "
                             f"output folder")
    return Path(target)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def folder_fd(root: Path, folder: str, create: bool = False) -> int:
    """A descriptor of ``folder`` (relative, ``/``-separated) under ``root``, opened one
    folder at a time from ``root``'s own descriptor without following a link: a folder
    swapped for a link while the run goes on is refused (ValueError) at this very open,
    not at an earlier check. ``create``: make the missing folders on the way."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    walked = str(root)
    try:
        for part in folder.split("/") if folder else ():
            walked = os.path.join(walked, part)
            if part in ("", ".", ".."):
                raise ValueError(f"path {folder!r} escapes the output folder")
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ValueError(f"{walked}: is a symbolic link or a file, not a "
                                     f"folder; harvest reads and writes only inside its "
                                     f"output folder") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_inside(root: Path, relpath: str) -> int:
    """A read-only descriptor of the file ``relpath`` under ``root``, no link followed on
    the way (ValueError when one is there)."""
    folder, _, name = relpath.rpartition("/")
    parent = folder_fd(root, folder)
    try:
        return os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{os.path.join(root, relpath)} is a symbolic link; harvest "
                             f"reads only inside its output folder") from None
        raise
    finally:
        os.close(parent)


def read_inside(root: Path, relpath: str) -> bytes:
    with os.fdopen(open_inside(root, relpath), "rb") as handle:
        return handle.read()


def move_inside(source: Path, root: Path, relpath: str) -> None:
    """Renames ``source`` to ``relpath`` under ``root``, making its folders; the target's
    folders are opened as by ``folder_fd``, and a rename replaces a link at the name
    itself rather than following it: nothing lands outside ``root``."""
    folder, _, name = relpath.rpartition("/")
    parent = folder_fd(root, folder, create=True)
    try:
        os.replace(source, name, dst_dir_fd=parent)
    finally:
        os.close(parent)


# What harvest itself keeps in an output folder; none of it may be a link elsewhere.
OWN_PATHS = ("images", ".harvest", ".harvest/tmp", ".harvest/state.sqlite",
             ".harvest/state.sqlite-wal", ".harvest/state.sqlite-shm", ".harvest/harvest.log",
             ".harvest/last-run.json", ".harvest/lock", ".harvest/shards",
             ".harvest/sinks.json", ".harvest/.sinks.json.tmp")


def check_output(output: Path) -> None:
    """What ``prepare_output`` would refuse, found without creating anything (for
    ``harvest validate``): a file where the folder should be, or an existing folder above
    it that is not a writable folder."""
    from ..errors import UsageError

    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: the output is a file, not a folder")
    existing = output
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != output and not existing.is_dir():
        raise UsageError(f"{output}: cannot create the output folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{output}: cannot create the output folder: {existing} is not "
                         "writable")


def prepare_output(output: Path) -> None:
    """Makes the output folder ready to write, or raises UsageError in one line: a path
    that is a file, a folder that cannot be written, or a symbolic link planted where
    harvest writes (which would send its files outside the folder).

    The output folder itself may be a link (to another disk, say): it is resolved once
    here, and everything below it must then be real."""
    from ..errors import UsageError

    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: the output is a file, not a folder")
    try:
        (output / ".harvest").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{output}: cannot create the output folder: "
                         f"{exc.strerror or exc}") from None
    root = output.resolve()
    for relpath in OWN_PATHS:
        if os.path.islink(root / relpath):
            raise UsageError(f"{root / relpath}: is a symbolic link; harvest writes only "
                             f"inside its output folder (remove the link)")
    images = root / "images"
    if images.is_dir():
        for entry in os.scandir(images):
            if entry.is_symlink():
                raise UsageError(f"{entry.path}: is a symbolic link; harvest writes only "
                                 f"inside its output folder (remove the link)")
    probe = root / ".harvest" / f".probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{output}: cannot write to the output folder: "
                         f"{exc.strerror or exc}") from None


def inside_check(relpath: str) -> None:
    """An option check for paths a plugin writes under the output folder: relative,
    and without ``..``."""
    parts = Path(relpath).parts
    if not relpath or Path(relpath).is_absolute() or relpath.startswith(("~", "/", "\\")) \
            or ".." in parts or ".." in relpath.replace("\\", "/").split("/"):
        raise ValueError(f"{relpath!r} leaves the output folder: expected a path inside it, "
                         f"such as records.jsonl")


def stored_file(root: Path, record: dict) -> Path:
    """The image file a record read back from an output names, inside ``root`` (an
    absolute, resolved folder). A records file is text anyone may have edited: a path
    that is not a string, absolute or climbing out raises ValueError saying so."""
    relpath = (record.get("file") or {}).get("path")
    if not isinstance(relpath, str) or not relpath:
        raise ValueError("the record names no file path")
    try:
        return inside(root, relpath)
    except ValueError:
        raise ValueError(f"its file path {relpath[:200]!r} leaves the harvest folder") from None
