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


def find_faces(picture, min_confidence: float) -> list[dict]:
    """Faces in a decoded Pillow image: each one's confidence and box ``[x, y, w, h]`` as
    fractions of the picture's width and height."""
    import numpy as np
    from PIL import Image

    small = picture
    if max(picture.size) > DETECT_SIDE:
        scale = DETECT_SIDE / max(picture.size)
        small = picture.resize((max(1, round(picture.width * scale)),
                                max(1, round(picture.height * scale))), Image.Resampling.BOX)
    width, height = small.size
    try:
        detections = detector().detect(np.asarray(small.convert("RGBA")))
    except Exception as exc:  # an image the detector cannot read is not stored unblurred
        raise RecordError(f"face detection failed: {str(exc).splitlines()[0][:200]}") from None
    return [{"confidence": round(float(d["score"]), 4),
             "box": [round(d["box"][0] / width, 4), round(d["box"][1] / height, 4),
                     round(d["box"][2] / width, 4), round(d["box"][3] / height, 4)]}
            for d in detections
            if d["class"] in FACE_CLASSES and d["score"] >= min_confidence]


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
