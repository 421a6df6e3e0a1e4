"""Real image bytes for tests and the demo: JPEGs with EXIF written by Pillow and piexif."""

from __future__ import annotations

import io
import random

import piexif
from PIL import Image, ImageDraw


def _rational(value: float, scale: int = 10000) -> tuple[int, int]:
    return int(round(value * scale)), scale


def _dms(value: float):
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = (value - degrees - minutes / 60) * 3600
    return ((degrees, 1), (minutes, 1), _rational(seconds, 100))


def exif_bytes(seed: int, gps: tuple[float, float] | None = None, owner: str = "Test Camera Owner") -> bytes:
    exif = {
        "0th": {piexif.ImageIFD.Make: b"HarvestCam", piexif.ImageIFD.Model: f"Model {seed}".encode(),
                piexif.ImageIFD.Artist: owner.encode("utf-8"),
                piexif.ImageIFD.Software: b"harvest tests"},
        "Exif": {piexif.ExifIFD.DateTimeOriginal: b"2019:05:31 12:00:%02d" % (seed % 60),
                 piexif.ExifIFD.FNumber: (28, 10), piexif.ExifIFD.ISOSpeedRatings: 100 + seed % 3000},
        "GPS": {}, "1st": {}, "thumbnail": None,
    }
    if gps is not None:
        lat, lon = gps
        exif["GPS"] = {piexif.GPSIFD.GPSLatitudeRef: b"N" if lat >= 0 else b"S",
                       piexif.GPSIFD.GPSLatitude: _dms(lat),
                       piexif.GPSIFD.GPSLongitudeRef: b"E" if lon >= 0 else b"W",
                       piexif.GPSIFD.GPSLongitude: _dms(lon)}
    return piexif.dump(exif)


def make_image(seed: int, size: tuple[int, int] = (96, 64), fmt: str = "JPEG",
               gps: tuple[float, float] | None = None, exif: bool = True) -> bytes:
    """A distinct picture per seed (so sha256 differs), with EXIF for JPEGs."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(8, size[0]), y0 + rng.randrange(8, size[1])
        draw.ellipse((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    if fmt == "JPEG" and exif:
        image.save(out, "JPEG", quality=85, exif=exif_bytes(seed, gps))
    else:
        image.save(out, fmt)
    return out.getvalue()


def truncated_jpeg(seed: int = 999) -> bytes:
    """A JPEG cut in the middle of its scan: the header is fine, the pixels are not."""
    data = make_image(seed, size=(256, 256))
    return data[: len(data) * 2 // 3]


def coloured_image(colour: tuple[int, int, int], seed: int, size=(1200, 900)) -> bytes:
    """Mostly one colour (what the fake Vision labels by), different bytes per seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.rectangle((x, y, x + 20, y + 20), fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()
