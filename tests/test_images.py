"""The recipe's `images:` section: size filters and resizing at ingest, in the workers."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from conftest import read_jsonl
from imagegen import make_image
from PIL import Image

from harvest.core.download.shaping import ImageSettings, target_size


@pytest.mark.parametrize("mode, size, expected", [
    ("keep_ratio", (400, 200), (128, 64, 128, 64)),
    ("keep_ratio", (200, 400), (64, 128, 64, 128)),
    ("keep_ratio_largest", (400, 200), (64, 32, 64, 32)),
    ("center_crop", (400, 200), (128, 64, 64, 64)),
    ("border", (400, 200), (64, 32, 64, 64)),
    ("keep_ratio", (40, 20), (40, 20, 40, 20)),  # smaller than image_size: not enlarged
    ("center_crop", (40, 20), (40, 20, 20, 20)),
])
def test_target_sizes(mode, size, expected):
    assert target_size(ImageSettings(resize_mode=mode, image_size=64), *size) == expected
    if size == (40, 20):
        upscaled = target_size(ImageSettings(resize_mode=mode, image_size=64, upscale=True), *size)
        assert min(upscaled[:2]) == 64


def folder_recipe(folder, output, images: str) -> str:
    return f"""
name: shapes
terms: [x]
output: {output}
images: {images}
sources: [{{use: folder, options: {{path: {folder}}}}}]
sinks: [jsonl]
"""


def write_images(folder) -> dict[str, bytes]:
    folder.mkdir()
    rgba = Image.new("RGBA", (300, 150), (255, 0, 0, 128))
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    rotated = Image.open(io.BytesIO(make_image(7, size=(320, 160))))
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees: 160 wide, 320 high
    turned = io.BytesIO()
    rotated.save(turned, "JPEG", exif=exif.tobytes())
    files = {
        "wide.jpg": make_image(1, size=(640, 320)),
        "tall.jpg": make_image(2, size=(200, 500)),
        "small.jpg": make_image(3, size=(48, 40)),
        "strip.jpg": make_image(4, size=(900, 60)),
        "alpha.png": buffer.getvalue(),
        "turned.jpg": turned.getvalue(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_resize_filters_and_originals(recipe_file, harvest, tmp_path):
    files = write_images(tmp_path / "photos")
    output = tmp_path / "out"
    images = ("{resize_mode: keep_ratio, image_size: 100, encode_format: jpg, "
              "min_image_size: 45, max_aspect_ratio: 4}")
    status, out, err = harvest("run", recipe_file(folder_recipe(tmp_path / "photos", output,
                                                                images)), "--no-progress")
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert set(records) == {"wide.jpg", "tall.jpg", "alpha.png", "turned.jpg"}
    summary = json.loads((output / ".harvest" / "last-run.json").read_text())
    assert summary["totals"]["dropped"] == 2
    assert "too small: shortest side 40 < min_image_size 45" in out
    assert "aspect ratio 15.00 > max_aspect_ratio 4" in out
    for name, record in records.items():
        stored = output / record["file"]["path"]
        with Image.open(stored) as image:
            assert image.format == "JPEG" and record["file"]["format"] == "JPEG"
            assert image.size == (record["file"]["width"], record["file"]["height"])
            assert min(image.size) == 100
        data = stored.read_bytes()
        assert record["file"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["original"]["sha256"] == hashlib.sha256(files[name]).hexdigest()
        assert record["original"]["bytes"] == len(files[name])
    assert (records["wide.jpg"]["file"]["width"], records["wide.jpg"]["original"]["width"]) \
        == (200, 640)
    assert records["turned.jpg"]["file"]["height"] == 200  # upright, then resized
    with Image.open(output / records["alpha.png"]["file"]["path"]) as flat:
        assert flat.mode == "RGB" and flat.getpixel((5, 5))[0] > 200  # on white, not black

    # Drops are final: the next run fetches nothing again.
    status, _, _ = harvest("run", tmp_path / "recipe.yml", "--no-progress")
    summary = json.loads((output / ".harvest" / "last-run.json").read_text())
    assert status == 0 and summary["totals"]["downloaded"] == 0


@pytest.mark.parametrize("mode, expected", [("center_crop", (64, 64)), ("border", (64, 64)),
                                            ("keep_ratio_largest", (64, 32))])
def test_square_modes(mode, expected, recipe_file, harvest, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "wide.jpg").write_bytes(make_image(1, size=(640, 320)))
    output = tmp_path / "out"
    recipe = recipe_file(folder_recipe(tmp_path / "photos", output,
                                       f"{{resize_mode: {mode}, image_size: 64}}"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    record = read_jsonl(output / "records.jsonl")[0]
    with Image.open(output / record["file"]["path"]) as image:
        assert image.size == expected
        if mode == "border":  # letterbox: bars above and below
            assert image.getpixel((32, 2)) == (0, 0, 0) and image.getpixel((32, 31)) != (0, 0, 0)


def test_an_image_that_already_fits_keeps_its_bytes(recipe_file, harvest, tmp_path):
    (tmp_path / "photos").mkdir()
    original = make_image(5, size=(60, 50))
    (tmp_path / "photos" / "small.jpg").write_bytes(original)
    output = tmp_path / "out"
    recipe = recipe_file(folder_recipe(tmp_path / "photos", output,
                                       "{resize_mode: keep_ratio, image_size: 256}"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    record = read_jsonl(output / "records.jsonl")[0]
    assert (output / record["file"]["path"]).read_bytes() == original
    assert "original" not in record


@pytest.mark.parametrize("images, fault", [
    ("{resize_mode: squash}", "images.resize_mode"),
    ("{image_size: 0}", "images.image_size"),
    ("{encode_format: gif}", "images.encode_format"),
    ("{max_aspect_ratio: 0.5}", "images.max_aspect_ratio"),
    ("{bogus: 1}", "images.bogus"),
])
def test_bad_images_options_are_one_line_errors(images, fault, recipe_file, harvest, tmp_path):
    (tmp_path / "photos").mkdir()
    recipe = recipe_file(folder_recipe(tmp_path / "photos", tmp_path / "out", images))
    status, _, err = harvest("validate", recipe)
    assert status == 2
    assert fault in err and len(err.strip().splitlines()) == 1, err


def test_a_lowered_size_filter_brings_back_what_it_dropped(recipe_file, harvest, tmp_path):
    """The images: filters are what the images stage's drops depend on: lowered, the next
    run takes those pictures; a resize setting changed alone asks nothing again."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"{i}.jpg").write_bytes(make_image(70 + i, size=(96, 64)))
    output = tmp_path / "out"

    def run(images: str) -> str:
        recipe = recipe_file(f"""
output: {output}
images: {{{images}}}
sources: [{{use: folder, options: {{path: photos}}}}]
""")
        status, _, err = harvest("run", recipe, "--no-progress")
        assert status == 0, err
        return err

    run("min_image_size: 100")
    assert not (output / "records.jsonl").exists() or not (output / "records.jsonl").read_text()
    err = run("min_image_size: 100, encode_quality: 80")
    assert "changed since the last run" not in err
    err = run("min_image_size: 32, encode_quality: 80")
    assert ("images: images.min_image_size changed since the last run: the 2 record(s) it "
            "rejected or dropped go through again") in err
    assert len(read_jsonl(output / "records.jsonl")) == 2
