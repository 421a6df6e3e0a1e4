"""``exif``: EXIF read from the downloaded file (Pillow + piexif), with decimal GPS."""

from __future__ import annotations

import base64
import math
import string
import struct
import types
from pathlib import Path
from typing import Any

import piexif
from PIL import Image

from harvest.core import Bool, Enricher, Option, Record, hookimpl

# exiftool's names for the IFDs, which users meet in every other EXIF tool.
IFD_NAMES = {"0th": "IFD0", "Exif": "ExifIFD", "GPS": "GPS", "Interop": "InteropIFD",
             "1st": "IFD1"}
RATIONAL_TYPES = (5, 10)
TEXT_TYPES = (2,)
# Offsets to other IFDs: file layout, not facts about the picture.
POINTERS = {piexif.ImageIFD.ExifTag, piexif.ImageIFD.GPSTag, piexif.ExifIFD.InteroperabilityTag,
            piexif.ImageIFD.JPEGInterchangeFormat, piexif.ImageIFD.JPEGInterchangeFormatLength}
MAKER_NOTE = piexif.ExifIFD.MakerNote
USER_COMMENT = piexif.ExifIFD.UserComment
MAX_BINARY = 4096  # larger opaque blobs are dropped with a note, not base64-bloated
_PRINTABLE = set(string.printable)


class _ExifReader(piexif._load._ExifReader):
    """piexif's reader, but an ASCII value is the text before its first NUL, as the EXIF
    spec and exiftool read it: piexif drops the last byte unconditionally, so
    ``EASTMAN KODAK COMPANY`` counted without its NUL came out ``EASTMAN KODAK COMPAN``,
    and ``ION230\\0F`` kept the writer's leftover ``F``."""

    def convert_value(self, val):
        kind, length, value = val[0], val[1], val[2]
        if kind != piexif.TYPES.Ascii:
            return super().convert_value(val)
        if length > 4:
            pointer = struct.unpack(self.endian_mark + "L", value)[0]
            data = self.tiftag[pointer:pointer + length]
        else:
            data = value[:length]
        return data.partition(b"\x00")[0]


# piexif.load with the reader above: the same function, looking its reader up here.
_load = types.FunctionType(piexif._load.load.__code__,
                           {**vars(piexif._load), "_ExifReader": _ExifReader}, "load",
                           piexif._load.load.__defaults__)


def _rational(pair) -> float | None:
    numerator, denominator = pair
    return numerator / denominator if denominator else None


def _text(raw: bytes) -> str:
    raw = raw.rstrip(b"\x00")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()


def _user_comment(raw: bytes) -> str | None:
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        encoding = "utf-16-be" if body[:2] != b"\xff\xfe" and body[1:2] != b"\x00" else "utf-16-le"
        return body.decode(encoding, "replace").rstrip("\x00").strip()
    if prefix.startswith(b"JIS"):
        return body.decode("shift_jis", "replace").rstrip("\x00").strip()
    return _text(body)


def json_safe(name: str, tag_type: int, value: Any, notes: list[str]) -> Any:
    """An EXIF value as JSON: rationals as floats, text as str, other bytes as base64."""
    if isinstance(value, bytes):
        if name.startswith("XP"):  # Windows' XPTitle/XPComment...: UTF-16LE in BYTE tags
            return value.decode("utf-16-le", "replace").rstrip("\x00")
        if tag_type in TEXT_TYPES:
            return _text(value)
        text = value.rstrip(b"\x00").decode("ascii", "replace")
        if value and set(text) <= _PRINTABLE:
            return text.strip()
        if len(value) <= 8:
            return list(value)  # e.g. ComponentsConfiguration: 1, 2, 3, 0
        if len(value) > MAX_BINARY:
            notes.append(f"{name}: {len(value)} bytes of binary data omitted")
            return None
        return "base64:" + base64.b64encode(value).decode("ascii")
    if tag_type in RATIONAL_TYPES:
        if value and isinstance(value[0], tuple):
            return [_rational(pair) for pair in value]
        return _rational(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def gps_position(gps: dict) -> dict[str, float] | None:
    """Signed decimal degrees (N/E positive) and metres (below sea level negative)."""

    def degrees(key, ref_key, negative_ref):
        value = gps.get(key)
        if not value or len(value) != 3:
            return None
        parts = [_rational(p) for p in value]
        if any(p is None for p in parts):
            return None
        result = parts[0] + parts[1] / 60 + parts[2] / 3600
        ref = gps.get(ref_key, b"")
        ref = ref.decode("ascii", "ignore") if isinstance(ref, bytes) else str(ref)
        return -result if ref.strip().upper() == negative_ref else result

    latitude = degrees(piexif.GPSIFD.GPSLatitude, piexif.GPSIFD.GPSLatitudeRef, "S")
    longitude = degrees(piexif.GPSIFD.GPSLongitude, piexif.GPSIFD.GPSLongitudeRef, "W")
    if latitude is None or longitude is None or not (abs(latitude) <= 90 and abs(longitude) <= 180):
        return None
    if latitude == 0 and longitude == 0:
        return None  # cameras without a fix write zeros
    position = {"latitude": round(latitude, 8), "longitude": round(longitude, 8)}
    altitude = gps.get(piexif.GPSIFD.GPSAltitude)
    if isinstance(altitude, tuple) and len(altitude) == 2 and altitude[1]:
        metres = altitude[0] / altitude[1]
        if gps.get(piexif.GPSIFD.GPSAltitudeRef) in (1, b"\x01"):
            metres = -metres
        if math.isfinite(metres):
            position["altitude"] = round(metres, 3)
    return position


def read_exif(path: Path, *, makernote: bool = False, thumbnail: bool = False,
              image_format: str | None = None) -> dict[str, Any]:
    """``{"tags": {IFD: {name: value}}, "gps": {...}|None, "notes": [...]}`` or
    ``{"error": reason}``. Never raises for a bad file. ``image_format`` (when the caller
    knows it) saves opening the file to find out."""
    try:
        if image_format is None:
            with Image.open(path) as image:
                image_format = image.format
        if image_format in ("JPEG", "MPO", "TIFF", "WEBP"):
            source = str(path)  # piexif reads these containers itself
        else:
            with Image.open(path) as image:
                source = image.info.get("exif")
            if not source:
                return {"error": "no EXIF"}
        loaded = _load(source)
    except Exception as exc:  # piexif raises many kinds on broken files
        return {"error": f"unreadable EXIF: {exc.__class__.__name__}: {str(exc)[:120]}"}
    notes: list[str] = []
    tags: dict[str, dict[str, Any]] = {}
    for ifd, label in IFD_NAMES.items():
        entries = loaded.get(ifd) or {}
        named: dict[str, Any] = {}
        for tag, value in entries.items():
            info = piexif.TAGS.get(ifd, {}).get(tag, {"name": f"Tag0x{tag:04X}", "type": 0})
            name = info["name"]
            if tag in POINTERS and ifd in ("0th", "Exif", "1st"):
                continue
            if ifd == "Exif" and tag == MAKER_NOTE and not makernote:
                notes.append(f"MakerNote omitted ({len(value)} bytes)")
                continue
            try:
                if ifd == "Exif" and tag == USER_COMMENT and isinstance(value, bytes):
                    converted = _user_comment(value)
                else:
                    converted = json_safe(name, info["type"], value, notes)
            except Exception as exc:
                notes.append(f"{name}: unreadable value ({exc.__class__.__name__})")
                continue
            if converted is not None and converted != "":
                named[name] = converted
        if named:
            tags[label] = named
    if loaded.get("thumbnail"):
        if thumbnail:
            tags.setdefault("IFD1", {})["ThumbnailImage"] = \
                "base64:" + base64.b64encode(loaded["thumbnail"]).decode("ascii")
        else:
            notes.append("thumbnail omitted")
    if not tags:
        return {"error": "no EXIF"}
    return {"tags": tags, "gps": gps_position(loaded.get("GPS") or {}), "notes": notes}


class ExifEnricher(Enricher):
    """EXIF tags from each downloaded file, by standard name, with decimal GPS."""

    options = (
        Option("makernote", Bool(), False, help="keep the maker's private MakerNote blob"),
        Option("thumbnail", Bool(), False, help="keep the embedded thumbnail (base64)"),
        Option("position_from_exif", Bool(), True,
               help="give records without a source position the GPS EXIF one"),
        Option("strip_from_file", Bool(), False,
               help="remove EXIF from the stored image (the record keeps the fields)"),
    )

    def enrich(self, records: list[Record]) -> None:
        for record in records:
            if record.file is None:
                continue
            path = self.context.output_dir / record.file.path
            result = read_exif(path, makernote=self.config["makernote"],
                               thumbnail=self.config["thumbnail"], image_format=record.file.format)
            if "error" in result:
                record.fields["exif_error"] = result["error"]
                continue
            record.fields["exif"] = result["tags"]
            record.personal.add("exif")
            if result["notes"]:
                record.fields["exif_notes"] = result["notes"]
            gps = result["gps"]
            if gps:
                record.fields["exif_gps"] = gps
                record.personal.add("exif_gps")
                if self.config["position_from_exif"] and record.fields.get("latitude") is None:
                    record.fields.update(latitude=gps["latitude"], longitude=gps["longitude"],
                                         geo_origin="exif")
                    # Where a camera was is personal: so is the position copied from it (the
                    # country and city the geocoder derives from it are coarse, and stay).
                    record.personal.update({"latitude", "longitude"})
            if self.config["strip_from_file"]:
                self._strip(record, path)

    def _strip(self, record: Record, path: Path) -> None:
        if record.file.format not in ("JPEG", "MPO", "WEBP"):
            record.fields.setdefault("exif_notes", []).append(
                f"EXIF not stripped: unsupported for {record.file.format}")
            return
        piexif.remove(str(path))  # rewrites the APP1 segment only: no re-encoding
        record.file.bytes = path.stat().st_size
        record.fields["exif_stripped_from_file"] = True


@hookimpl
def harvest_enrichers():
    return {"exif": ExifEnricher}
