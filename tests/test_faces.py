"""Face blurring at ingest (``images: {blur_faces: true}``), run for real with NudeNet's
model on camera samples with people in them (../shared/testdata), served over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from conftest import read_jsonl
from fakes import LocalServer
from PIL import Image, ImageChops, ImageFilter, ImageStat

from harvest.core.download.shaping import ImageSettings, shape_in_memory
from harvest.core.errors import RecordError

pytest.importorskip("nudenet")
SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "exif-samples" / "jpg"
PEOPLE = ("exif-org/sony-d700.jpg", "exif-org/fujifilm-finepix40i.jpg", "exif-org/canon-ixus.jpg")
LANDSCAPE = "gps/DSCN0010.jpg"
if not SAMPLES.is_dir():
    pytest.skip("../shared/testdata is not beside the checkout", allow_module_level=True)


@pytest.fixture
def photo_server():
    files = {"/" + Path(name).name: (SAMPLES / name).read_bytes() for name in (*PEOPLE, LANDSCAPE)}

    def handle(method, path, headers, body):
        if path in files:
            return 200, {"Content-Type": "image/jpeg"}, files[path]
        return 404, {}, b""

    server = LocalServer(handle).start()
    server.files = files
    yield server
    server.stop()


def run_blurred(harvest, recipe_file, tmp_path, server, images: str, sinks: str = "[jsonl]"):
    (tmp_path / "list.txt").write_text("".join(f"{server.url}{name}\n" for name in server.files))
    output = tmp_path / "out"
    recipe = recipe_file(f"""
name: people
output: {output}
run: {{rate_per_host: 1000, allow_private_addresses: true}}
images: {images}
sources: [{{use: urls, options: {{path: list.txt}}}}]
sinks: {sinks}
""")
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, out + err
    records = {Path(r["url"]).name: r for r in read_jsonl(output / "records.jsonl")}
    return output, records


def likeness(picture: Image.Image, original: Image.Image) -> float:
    """How much of the original's fine detail (eyes, mouth, outlines) the picture still
    has: the correlation of the two high-pass images. A re-encoded copy is near 1."""
    def fine(image):
        grey = image.convert("L")
        return (np.asarray(grey, float)
                - np.asarray(grey.filter(ImageFilter.GaussianBlur(1.5)), float)).ravel()
    a, b = fine(picture), fine(original)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-9))


def pixel_box(face: dict, size: tuple[int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = face["box"]
    return (int(x * size[0]), int(y * size[1]), int((x + w) * size[0]) + 1,
            int((y + h) * size[1]) + 1)


def every_stored_picture(output: Path):
    """Every file under the output folder, and every member of every tar in it."""
    for path in output.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        yield str(path), data
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        yield f"{path}:{member.name}", tar.extractfile(member).read()


def test_faces_are_blurred_before_a_byte_of_them_reaches_the_disk(
        photo_server, harvest, recipe_file, tmp_path):
    output, records = run_blurred(harvest, recipe_file, tmp_path, photo_server,
                                  "{blur_faces: true}", "[jsonl, webdataset]")
    originals = {Path(name).name: (SAMPLES / name).read_bytes() for name in PEOPLE}
    for name, original in originals.items():
        record = records[name]
        assert record["blurred_faces"], name
        assert record["original"]["sha256"] == hashlib.sha256(original).hexdigest()
        assert record["file"]["sha256"] != record["original"]["sha256"]
        stored = Image.open(output / record["file"]["path"])
        assert stored.size == Image.open(io.BytesIO(original)).size
        # The camera's fields stay (the exif enricher reads them); its thumbnail does not.
        assert stored.getexif().get(0x010F) == Image.open(io.BytesIO(original)).getexif().get(0x010F)
        assert (output / record["file"]["path"]).read_bytes().count(b"\xff\xd8") == 1
    landscape = records[Path(LANDSCAPE).name]
    assert "blurred_faces" not in landscape
    assert landscape["file"]["sha256"] == hashlib.sha256(photo_server.files["/DSCN0010.jpg"]).hexdigest()

    # Nothing under the output folder holds an original: not its bytes, not a slice of its
    # compressed data, not its EXIF thumbnail, not its face pixels (files and tar members).
    digests = {hashlib.sha256(data).hexdigest() for data in originals.values()}
    slices = []
    for original in originals.values():
        body = original.rfind(b"\xff\xda")  # the last scan: the picture's own data
        slices.append(original[body + 200: body + 456])
        exif = Image.open(io.BytesIO(original)).info.get("exif", b"")
        if b"\xff\xd8" in exif:
            thumbnail = exif[exif.index(b"\xff\xd8") + 20:][:256]
            if len(thumbnail) >= 64:
                slices.append(thumbnail)
    faces = {name: (Image.open(io.BytesIO(data)).convert("RGB"), records[name]["blurred_faces"])
             for name, data in originals.items()}
    checked_pictures = 0
    for where, data in every_stored_picture(output):
        assert hashlib.sha256(data).hexdigest() not in digests, where
        for chunk in slices:
            assert chunk not in data, where
        try:
            picture = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception:
            continue
        for original, boxes in faces.values():
            corner = (0, original.height - 64, 64, original.height)
            if picture.size != original.size or max(ImageStat.Stat(ImageChops.difference(
                    picture.crop(corner), original.crop(corner))).mean) > 20:
                continue  # another photo
            for face in boxes:
                box = pixel_box(face, original.size)
                assert likeness(picture.crop(box), original.crop(box)) < 0.25, where
            assert likeness(picture.crop(corner), original.crop(corner)) > 0.8, where
            checked_pictures += 1
    assert checked_pictures >= 2 * len(originals)  # the image files and the tar's copies


def test_pixelated_faces_after_a_center_crop_from_a_folder(harvest, recipe_file, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PEOPLE:
        (folder / Path(name).name).write_bytes((SAMPLES / name).read_bytes())
    output = tmp_path / "out"
    recipe = recipe_file(f"""
output: {output}
images: {{blur_faces: true, blur_method: pixelate, resize_mode: keep_ratio, image_size: 240}}
sources: [{{use: folder, options: {{path: {folder}}}}}]
""")
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    for record in read_jsonl(output / "records.jsonl"):
        stored = Image.open(output / record["file"]["path"]).convert("RGB")
        assert min(stored.size) == 240
        plain = Image.open(folder / record["source_id"]).convert("RGB").resize(stored.size)
        assert record["blurred_faces"]
        for face in record["blurred_faces"]:
            box = pixel_box(face, stored.size)
            assert likeness(stored.crop(box), plain.crop(box)) < 0.5, record["source_id"]
        # Away from the faces, the picture is the picture.
        corner = (0, stored.height - 40, 40, stored.height)
        assert likeness(stored.crop(corner), plain.crop(corner)) > 0.7


def test_a_picture_the_detector_cannot_read_is_not_stored(monkeypatch):
    data = (SAMPLES / PEOPLE[0]).read_bytes()

    class Broken:
        def detect(self, image):
            raise RuntimeError("onnxruntime: bad input\nmore lines")

    monkeypatch.setattr("harvest.core.download.faces.detector", lambda: Broken())
    with pytest.raises(RecordError, match="face detection failed: onnxruntime: bad input$"):
        shape_in_memory(data, ImageSettings(blur_faces=True), 672, 512, "JPEG", "x",
                        lambda amount: nullcontext())


def test_blur_faces_without_the_safety_extra_is_one_line(monkeypatch, harvest, recipe_file, tmp_path):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet fails, as uninstalled
    recipe = recipe_file(f"""
output: {tmp_path / "out"}
images: {{blur_faces: true}}
sources: [{{use: folder, options: {{path: {tmp_path}}}}}]
""")
    status, out, err = harvest("validate", recipe)
    assert status == 2
    assert err.strip().count("\n") == 0
    assert "images.blur_faces" in err and "pip install 'harvest-dataset[safety]'" in err


def test_a_takedown_by_the_original_picture_finds_its_blurred_copy(
        photo_server, harvest, recipe_file, tmp_path):
    output, records = run_blurred(harvest, recipe_file, tmp_path, photo_server,
                                  "{blur_faces: true}")
    original = (SAMPLES / PEOPLE[0]).read_bytes()
    status, out, err = harvest("takedown", str(output), "--sha256",
                               hashlib.sha256(original).hexdigest(), "--reason", "owner asked")
    assert status == 0, err
    left = {Path(r["url"]).name for r in read_jsonl(output / "records.jsonl")}
    assert Path(PEOPLE[0]).name not in left and len(left) == len(records) - 1
    assert not (output / records[Path(PEOPLE[0]).name]["file"]["path"]).exists()
    assert json.loads((output / "takedowns.jsonl").read_text().splitlines()[-1])


class _Spy:
    """A writable file that keeps a copy of everything written through it."""

    def __init__(self, file, copies: list):
        self.file, self.copy = file, bytearray()
        copies.append(self.copy)

    def write(self, data):
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.copy += data
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_no_write_ever_carries_the_original(photo_server, harvest, recipe_file, tmp_path,
                                            monkeypatch):
    """Not only what is left at the end: every byte the run writes through a file (the
    download threads run in this process with ``workers: 1``, so they can be watched)."""
    import builtins
    import os

    copies: list[bytearray] = []
    real_open, real_fdopen = builtins.open, os.fdopen

    def spying(opener):
        def spy(file, mode="r", *args, **kwargs):
            handle = opener(file, mode, *args, **kwargs)
            return _Spy(handle, copies) if "b" in mode and set(mode) & set("wax+") else handle
        return spy

    monkeypatch.setattr(builtins, "open", spying(real_open))
    monkeypatch.setattr(os, "fdopen", spying(real_fdopen))
    (tmp_path / "list.txt").write_text("".join(f"{photo_server.url}{name}\n"
                                               for name in photo_server.files))
    output = tmp_path / "out"
    status, out, err = harvest("run", recipe_file(f"""
output: {output}
run: {{rate_per_host: 1000, allow_private_addresses: true, workers: 1}}
images: {{blur_faces: true}}
sources: [{{use: urls, options: {{path: list.txt}}}}]
"""), "--no-progress")
    monkeypatch.undo()
    assert status == 0, err
    written = b"\0".join(bytes(c) for c in copies)
    assert len(read_jsonl(output / "records.jsonl")) == 4
    assert photo_server.files["/DSCN0010.jpg"] in written  # the spy sees the downloads
    for name in PEOPLE:
        original = (SAMPLES / name).read_bytes()
        body = original.rfind(b"\xff\xda")
        assert original[body + 200: body + 456] not in written, name


def test_a_picture_without_faces_keeps_its_bytes_and_format():
    """Blurring on, nothing else asked: a GIF or PNG without a face is stored as it came."""
    from PIL import Image

    for image_format in ("GIF", "PNG"):
        out = io.BytesIO()
        Image.new("RGB", (200, 150), (30, 120, 200)).save(out, image_format)
        data = out.getvalue()
        stored, shaped = shape_in_memory(data, ImageSettings(blur_faces=True), 200, 150,
                                         image_format, "x", lambda amount: nullcontext())
        assert shaped is None and stored == data, image_format


def test_faces_of_40_pixels_in_a_large_photo_are_found_and_blurred():
    """Two faces of about 40 px in a 3200 px picture: the whole picture seen at 640 px
    shrinks them to 8 px and finds nothing (blur_min_face: 0, the only pass before);
    the tiles find both, once each, and the stored copy has them blurred."""

    from harvest.core.download.faces import find_faces

    people = Image.open(SAMPLES / "exif-org/canon-ixus.jpg").convert("RGB")
    canvas = Image.open(SAMPLES / LANDSCAPE).convert("RGB").resize((3200, 2400))
    canvas.paste(people.resize((851, 638)), (1700, 900))
    assert find_faces(canvas, 0.25, 0) == []
    faces = find_faces(canvas, 0.25, 40)
    assert len(faces) == 2, faces
    for face in faces:
        x, y, w, h = face["box"]
        assert 30 <= w * 3200 <= 60 and 1700 <= x * 3200 <= 2551 and 900 <= y * 2400 <= 1538
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=92)
    stored, shaped = shape_in_memory(out.getvalue(), ImageSettings(blur_faces=True), 3200, 2400,
                                     "JPEG", "x", lambda amount: nullcontext())
    assert shaped is not None and len(shaped.faces) == 2
    after = Image.open(io.BytesIO(stored)).convert("RGB")
    x, y, w, h = faces[0]["box"]
    box = (round(x * 3200), round(y * 2400), round((x + w) * 3200), round((y + h) * 2400))
    difference = ImageChops.difference(after.crop(box), canvas.crop(box))
    assert max(band[1] for band in difference.getextrema()) > 40  # the face is changed
