"""Finding faces and blurring them in the stored copy (the ``images:`` section's
``blur_faces``).

Faces are personal data. When blurring is on, the download workers keep the downloaded
bytes in memory, find faces with NudeNet's detector (the model ships in the ``nudenet``
wheel, optional extra ``safety``), blur them, and only then write the picture: the
original pixels never reach the disk. What cannot be blurred is not stored.

Besides the pixels, a JPEG can carry the picture again in its EXIF: a thumbnail in IFD1
and, for many cameras, preview images inside the maker note. A blurred copy keeps the
EXIF fields (camera, date, position: the exif enricher reads them, and encryption or the
personal-field rules handle them) but neither of those.
"""

from __future__ import annotations

import threading

from ..errors import RecordError

FACE_CLASSES = ("FACE_FEMALE", "FACE_MALE")
BLUR_METHODS = ("gaussian", "pixelate")
DETECT_SIDE = 640  # the model sees 320 x 320; twice that keeps small faces' detail
MAKER_NOTE = 0x927C
EXIF_IFD = 0x8769
ORIENTATION = 0x0112

_detector = None
_detector_lock = threading.Lock()


def missing_detector() -> str | None:
    """Why faces cannot be found on this machine, or None."""
    try:
        import nudenet  # noqa: F401
    except ImportError:
        return "needs NudeNet: pip install 'harvest-dataset[safety]'"
    return None


def detector():
    """One detector per process, shared by its download threads (onnxruntime sessions are
    thread-safe). One inference thread each: the processes already use every core."""
    global _detector
    with _detector_lock:
        if _detector is None:
            import os

            import nudenet
            import onnxruntime

            found = nudenet.NudeDetector()
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            found.onnx_session = onnxruntime.InferenceSession(
                os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"), options,
                providers=["CPUExecutionProvider"])
            _detector = found
        return _detector


# The smallest face the detector finds reliably in its 320 px input, in pixels there.
MODEL_FACE = 15


def find_faces(picture, min_confidence: float, min_face: int = 0) -> list[dict]:
    """Faces in a decoded Pillow image: each one's confidence and box ``[x, y, w, h]`` as
    fractions of the picture's width and height.

    The whole picture is seen at ``DETECT_SIDE``: in a large photo a face must be big to
    be found so (a 4,000 px photo's faces under about 190 px are lost). ``min_face``
    (pixels of the picture): faces down to that size are looked for too, in overlapping
    tiles at the scale where such a face is big enough for the model."""
    scale = min(1.0, DETECT_SIDE / max(picture.size))
    found = _detect(picture, (0, 0, picture.width, picture.height), scale, min_confidence)
    if min_face and min_face * scale * 0.5 < MODEL_FACE:  # the model sees half of DETECT_SIDE
        tile_scale = min(1.0, 2 * MODEL_FACE / min_face)
        # Tiles of DETECT_SIDE pixels at that scale, overlapping by two faces: a face on a
        # seam is whole in one of them.
        side = round(DETECT_SIDE / tile_scale)
        step = max(1, side - 2 * min_face)
        for top in range(0, max(1, picture.height - 2 * min_face), step):
            for left in range(0, max(1, picture.width - 2 * min_face), step):
                box = (left, top, min(picture.width, left + side),
                       min(picture.height, top + side))
                found += _detect(picture, box, tile_scale, min_confidence)
    return _without_overlaps(found)


def _detect(picture, box, scale: float, min_confidence: float) -> list[dict]:
    import numpy as np
    from PIL import Image

    left, top, right, bottom = box
    region = picture if box == (0, 0, picture.width, picture.height) else picture.crop(box)
    if scale < 1:
        region = region.resize((max(1, round(region.width * scale)),
                                max(1, round(region.height * scale))), Image.Resampling.BOX)
    try:
        detections = detector().detect(np.asarray(region.convert("RGBA")))
    except Exception as exc:  # an image the detector cannot read is not stored unblurred
        raise RecordError(f"face detection failed: {str(exc).splitlines()[0][:200]}") from None
    across, down = region.width / (right - left), region.height / (bottom - top)
    return [{"confidence": round(float(d["score"]), 4),
             "box": [round((left + d["box"][0] / across) / picture.width, 4),
                     round((top + d["box"][1] / down) / picture.height, 4),
                     round(d["box"][2] / across / picture.width, 4),
                     round(d["box"][3] / down / picture.height, 4)]}
            for d in detections
            if d["class"] in FACE_CLASSES and d["score"] >= min_confidence]


def _without_overlaps(faces: list[dict]) -> list[dict]:
    """One box per face: a box mostly inside a more confident one is the same face seen
    again (by the whole-picture pass and a tile, or by two tiles)."""
    kept: list[dict] = []
    for face in sorted(faces, key=lambda f: -f["confidence"]):
        x, y, w, h = face["box"]
        if not any(_overlap((x, y, w, h), other["box"]) > 0.5 * w * h for other in kept):
            kept.append(face)
    return kept


def _overlap(a, b) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def blur_faces(picture, faces: list[dict], method: str, margin: float):
    """The picture with every face box, grown by ``margin`` of its size on each side,
    blurred beyond recognition. Works in place on ``picture`` and returns it."""
    from PIL import Image, ImageFilter

    for face in faces:
        x, y, w, h = face["box"]
        left = max(0, int((x - w * margin) * picture.width))
        top = max(0, int((y - h * margin) * picture.height))
        right = min(picture.width, int(round((x + w * (1 + margin)) * picture.width)) + 1)
        bottom = min(picture.height, int(round((y + h * (1 + margin)) * picture.height)) + 1)
        if right <= left or bottom <= top:
            continue
        region = picture.crop((left, top, right, bottom))
        side = max(right - left, bottom - top)
        if method == "pixelate":
            # About six blocks across a face, of three pixels at least (a small face's
            # one-pixel blocks would hide nothing): no feature survives.
            blocks = max(3, side // 6)
            region = region.resize((max(1, region.width // blocks),
                                    max(1, region.height // blocks)), Image.Resampling.BOX)
            region = region.resize((right - left, bottom - top), Image.Resampling.NEAREST)
        else:
            # A radius of a fifth of the face, twice: eyes, mouth and outline are gone.
            radius = max(2, side // 5)
            region = region.filter(ImageFilter.GaussianBlur(radius))
            region = region.filter(ImageFilter.GaussianBlur(radius))
        picture.paste(region, (left, top))
    return picture


def exif_without_pictures(picture) -> bytes | None:
    """The picture's EXIF as bytes, without the thumbnail and the maker note (which can
    hold previews), and upright (the pixels were turned already). None: no EXIF."""
    exif = picture.getexif()
    if not exif:
        return None
    exif.get_ifd(EXIF_IFD).pop(MAKER_NOTE, None)
    exif.pop(ORIENTATION, None)
    return exif.tobytes()  # IFD0 and its sub-IFDs; Pillow leaves IFD1 (the thumbnail) out
