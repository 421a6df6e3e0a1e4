"""Size filters and resizing at ingest: the recipe's ``images:`` section.

This runs where the image was just checked, in the download workers, not in an enricher:
the file is hot in the page cache, the check has read its header, and the workers are
the processes that use every core, while enrichers run on the engine's one thread.
Filters look at the image as downloaded and come first, so that a dropped image costs no
resize. A resized image replaces the downloaded bytes before they are stored; the record
keeps the original's width, height, size, format and sha256 under ``original``.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import RecordError
from ..options import Bool, Choice, Float, Int, Option, settings_class
from ..record import FileInfo
from .faces import BLUR_METHODS, blur_faces, exif_without_pictures, find_faces

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}

IMAGE_OPTIONS: tuple[Option, ...] = (
    Option("resize_mode", Choice(*RESIZE_MODES), "no",
           help="no: bytes kept as downloaded; keep_ratio: shortest side to image_size; "
                "keep_ratio_largest: longest side to image_size; center_crop: a square of "
                "image_size from the middle; border: longest side to image_size, padded to a "
                "square (letterbox)"),
    Option("image_size", Int(8, 16384), 256, help="target side in pixels for resize_mode"),
    Option("upscale", Bool(), False, help="also enlarge images smaller than image_size"),
    Option("encode_format", Choice("keep", *FORMATS), "keep",
           help="format of resized images (keep: as downloaded when jpg, png or webp, else jpg)"),
    Option("encode_quality", Int(1, 100), 95, help="JPEG/WebP quality of resized images"),
    Option("skip_reencode", Bool(), True,
           help="keep the downloaded bytes when the image already has the wanted size and "
                "format"),
    Option("min_image_size", Int(0), 0, help="drop images whose shortest side is smaller"),
    Option("min_width", Int(0), 0, help="drop images narrower than this"),
    Option("min_height", Int(0), 0, help="drop images lower than this"),
    Option("min_pixels", Int(0), 0, help="drop images with fewer pixels (width x height)"),
    Option("max_aspect_ratio", Float(1.0, 1000.0), None,
           help="drop images whose longer side is more than this many times the shorter"),
    Option("blur_faces", Bool(), False,
           help="blur the faces NudeNet finds before the image is stored; the downloaded "
                "bytes stay in memory, never on disk (needs the safety extra)"),
    Option("blur_method", Choice(*BLUR_METHODS), "gaussian",
           help="gaussian: a strong blur; pixelate: about six blocks across a face"),
    # NudeNet keeps no detection under 0.25 (its non-maximum suppression's floor), so a
    # lower value would promise faces it never reports.
    Option("blur_min_confidence", Float(0.25, 1.0), 0.25,
           help="blur faces found with at least this confidence, 0.25 (the detector's "
                "floor: it reports nothing weaker) or more; low, as a missed face is worse "
                "than a blurred ear"),
    Option("blur_margin", Float(0.0, 1.0), 0.2,
           help="grow each face box by this fraction of its size on every side"),
    Option("blur_min_face", Int(0, 10_000), 40,
           help="smallest face looked for, in pixels of the picture: a large picture is also "
                "searched in overlapping tiles (0.5 s for 3200x2400 here); 0: the whole "
                "picture at 640 px only, faster, and a 4,000 px photo's faces under about "
                "190 px are missed"),
)


def _changes_anything(settings) -> bool:
    """Whether anything is to be done to a downloaded image."""
    return (settings.resize_mode != "no" or settings.encode_format != "keep"
            or settings.blur_faces
            or any((settings.min_image_size, settings.min_width, settings.min_height,
                    settings.min_pixels, settings.max_aspect_ratio)))


ImageSettings = settings_class(
    "ImageSettings", IMAGE_OPTIONS, module=__name__,
    namespace={"active": property(_changes_anything)},
    doc="The recipe's ``images:`` section: every field an :data:`IMAGE_OPTIONS` entry; "
        "``active``: whether anything is to be done to a downloaded image.")


@dataclass
class Shaped:
    """An image as it will be stored, and what was downloaded when ``images:`` changed it."""

    file: FileInfo  # its ``path`` is set when the file is placed in the output folder
    original: FileInfo | None = None
    faces: list | None = None  # the faces blurred, when ``blur_faces`` found some


def check_size(settings: ImageSettings, width: int, height: int) -> None:
    """Raises a drop (RecordError with ``dropped``) when the downloaded image is too small
    or too narrow for the recipe."""
    short, long = min(width, height), max(width, height)
    for limit, value, what in ((settings.min_width, width, "width"),
                               (settings.min_height, height, "height"),
                               (settings.min_image_size, short, "shortest side"),
                               (settings.min_pixels, width * height, "pixels")):
        if limit and value < limit:
            option = {"shortest side": "min_image_size"}.get(what, f"min_{what}")
            raise RecordError(f"too small: {what} {value} < {option} {limit}", dropped=True)
    ratio = settings.max_aspect_ratio
    if ratio and long > ratio * max(short, 1):
        raise RecordError(f"aspect ratio {long / max(short, 1):.2f} > max_aspect_ratio {ratio}",
                          dropped=True)


def target_size(settings: ImageSettings, width: int, height: int) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, final width, final height) for the resize mode."""
    size, mode = settings.image_size, settings.resize_mode
    if mode == "no":
        return width, height, width, height
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    scale = size / side
    if not settings.upscale:
        scale = min(scale, 1.0)
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    if mode == "center_crop":
        edge = min(size, *scaled)
        return (*scaled, edge, edge)
    if mode == "border":
        edge = max(min(size, max(scaled)), 1)
        return (*scaled, edge, edge)
    return (*scaled, *scaled)


def output_format(settings: ImageSettings, image_format: str) -> str:
    if settings.encode_format == "keep":
        return image_format if image_format in FORMATS.values() else "JPEG"
    return FORMATS[settings.encode_format]


def reencodes(settings: ImageSettings, width: int, height: int, image_format: str,
              blurring: bool = True) -> bool:
    """Whether the image will be decoded and written again (else its bytes are kept).
    With ``blur_faces``, every image is decoded, and one without faces is written again
    only when this says so with ``blurring`` False."""
    if blurring and settings.blur_faces:
        return True
    if settings.resize_mode == "no" and settings.encode_format == "keep" \
            and image_format in FORMATS.values():
        return False
    scaled_w, scaled_h, final_w, final_h = target_size(settings, width, height)
    unchanged = (scaled_w, scaled_h) == (final_w, final_h) == (width, height)
    return not (settings.skip_reencode and unchanged
                and output_format(settings, image_format) == image_format)


def shape(path: Path, settings: ImageSettings, width: int, height: int, image_format: str,
          size: int, sha256: str, reserve, opener=None) -> Shaped:
    """Resizes/re-encodes the image at ``path`` in place (its decode is also its check:
    a truncated or corrupt file fails). ``reserve(bytes)``: a context manager bounding
    decode memory; ``opener``: how to open the file written beside ``path``."""
    data, shaped = _checked_render(path, settings, width, height, image_format, size, sha256,
                                   reserve)
    temp = path.with_name(path.name + ".shaped")
    try:
        with open(temp, "wb", opener=opener) as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return shaped


def shape_in_memory(data: bytes, settings: ImageSettings, width: int, height: int,
                    image_format: str, sha256: str, reserve) -> tuple[bytes, Shaped | None]:
    """For ``blur_faces``: the bytes to store, from downloaded bytes that never touched the
    disk, and what was done (None: the download is stored as it is, when it has no face
    and nothing else asks for a re-encode). The decode is the image's check."""
    return _checked_render(io.BytesIO(data), settings, width, height, image_format, len(data),
                           sha256, reserve)


def _checked_render(source, settings, width, height, image_format, size, sha256, reserve):
    try:
        return _render(source, settings, width, height, image_format, size, sha256, reserve)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RecordError(f"corrupt image: {exc}") from None


def _render(source, settings: ImageSettings, width: int, height: int, image_format: str,
            size: int, sha256: str, reserve) -> tuple[bytes, Shaped | None]:
    scaled_w, scaled_h, final_w, final_h = target_size(settings, width, height)
    out_format = output_format(settings, image_format)
    from PIL import Image, ImageOps

    with reserve(width * height * 4), Image.open(source) as image:
        if image.format == "JPEG" and not settings.blur_faces:
            # Decode at 1/2, 1/4, 1/8 when it can; face finding wants every pixel.
            image.draft(None, (scaled_w, scaled_h))
        image.load()
        exif_rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        if exif_rotated:
            scaled_w, scaled_h = scaled_h, scaled_w
            final_w, final_h = (final_h, final_w) if settings.resize_mode not in (
                "center_crop", "border") else (final_w, final_h)
        picture = ImageOps.exif_transpose(image) if exif_rotated or image.getexif().get(
            0x0112, 1) != 1 else image
        faces = None
        if settings.blur_faces:
            faces = find_faces(picture, settings.blur_min_confidence, settings.blur_min_face)
            # No face: stored as it would be without blurring (a GIF stays a GIF).
            if not faces and not (replace(settings, blur_faces=False).active and reencodes(
                    settings, width, height, image_format, blurring=False)):
                return source.getvalue(), None
        if faces:
            exif = exif_without_pictures(picture)
        else:
            exif = picture.info.get("exif") or image.info.get("exif")
        picture = _pixels_for(picture, out_format)
        if picture.size != (scaled_w, scaled_h):
            # As img2dataset does: area averaging to shrink (Pillow's BOX; also 3x faster
            # than Lanczos here), Lanczos to enlarge.
            shrinking = scaled_w * scaled_h < picture.size[0] * picture.size[1]
            picture = picture.resize((scaled_w, scaled_h), Image.Resampling.BOX if shrinking
                                     else Image.Resampling.LANCZOS, reducing_gap=3.0)
        if faces:
            # After the resize, which keeps the proportions the boxes are fractions of,
            # and before a crop or border, which do not.
            picture = blur_faces(picture if picture is not image else picture.copy(), faces,
                                 settings.blur_method, settings.blur_margin)
        if settings.resize_mode == "center_crop":
            left, top = (scaled_w - final_w) // 2, (scaled_h - final_h) // 2
            picture = picture.crop((left, top, left + final_w, top + final_h))
        elif settings.resize_mode == "border":
            canvas = Image.new(picture.mode, (final_w, final_h))
            canvas.paste(picture, ((final_w - scaled_w) // 2, (final_h - scaled_h) // 2))
            picture = canvas
        buffer = io.BytesIO()
        options = {"quality": settings.encode_quality} if out_format in ("JPEG", "WEBP") else {}
        if exif and out_format in ("JPEG", "WEBP", "PNG"):
            options["exif"] = exif  # the exif enricher reads it from the stored file
        picture.save(buffer, out_format, **options)
        final_w, final_h = picture.size
    data = buffer.getvalue()
    stored = FileInfo("", len(data), hashlib.sha256(data).hexdigest(), final_w, final_h,
                      out_format)
    return data, Shaped(stored, FileInfo("", size, sha256, width, height, image_format), faces)


def _pixels_for(image, out_format: str):
    if out_format == "JPEG" and image.mode not in ("RGB", "L"):
        if image.mode in ("RGBA", "LA", "P", "PA"):
            background = image.convert("RGBA")
            from PIL import Image

            flat = Image.new("RGB", image.size, (255, 255, 255))
            flat.paste(background, mask=background.getchannel("A"))
            return flat
        return image.convert("RGB")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        return image.convert("RGBA" if "A" in image.getbands() or image.mode == "P" else "RGB")
    return image
