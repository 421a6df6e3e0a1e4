"""Where images go on disk: names that are safe on Linux, macOS and Windows."""

from __future__ import annotations

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
    if not target.startswith(str(root) + os.sep) or os.path.islink(os.path.dirname(target)):
        raise ValueError(f"path {relpath!r} escapes the output folder")
    return Path(target)
