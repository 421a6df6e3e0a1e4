"""The exif and geocode enrichers, alone and in runs."""

from __future__ import annotations

import time

import piexif
import pytest
from conftest import REPO, FakePhoto, flickr_recipe, monkey_photos, read_jsonl
from imagegen import make_image

import harvest.plugins as builtin_plugins
from harvest.plugins.enrichers.exif import read_exif

SAMPLES = REPO.parent / "shared" / "testdata" / "exif-samples" / "jpg"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/testdata not beside the checkout")

# `exiftool -n -GPSLatitude -GPSLongitude` (Debian libimage-exiftool-perl 12.57).
EXIFTOOL_GPS = {
    "DSCN0010.jpg": (43.4674483333333, 11.8851266666639),
    "DSCN0012.jpg": (43.4671566666639, 11.8853949999972),
    "DSCN0021.jpg": (43.4670816666639, 11.8845383333306),
    "DSCN0025.jpg": (43.468365, 11.8816349999722),
    "DSCN0027.jpg": (43.4684416666667, 11.881515),
    "DSCN0029.jpg": (43.4682433333306, 11.8801716666389),
    "DSCN0038.jpg": (43.4672549999972, 11.8792133333333),
    "DSCN0040.jpg": (43.4660116666389, 11.8791116666389),
    "DSCN0042.jpg": (43.464455, 11.8814783333333),
}


@needs_samples
def test_every_real_world_sample_gives_tags_or_a_reason():
    files = sorted(SAMPLES.rglob("*.jpg"))
    assert len(files) >= 30
    for path in files:
        started = time.perf_counter()
        result = read_exif(path)
        assert time.perf_counter() - started < 2.0, path
        assert ("tags" in result and result["tags"]) or result["error"], path
    corrupted = read_exif(SAMPLES / "corrupted.jpg")
    assert "tags" in corrupted or corrupted["error"]
    assert read_exif(SAMPLES / "invalid" / "image01088.jpg") == {"error": "no EXIF"}


@needs_samples
def test_gps_matches_exiftool():
    for name, (latitude, longitude) in EXIFTOOL_GPS.items():
        gps = read_exif(SAMPLES / "gps" / name)["gps"]
        assert gps["latitude"] == pytest.approx(latitude, abs=1e-7), name
        assert gps["longitude"] == pytest.approx(longitude, abs=1e-7), name


@needs_samples
def test_tags_have_standard_names_and_json_values():
    tags = read_exif(SAMPLES / "exif-org" / "canon-ixus.jpg")["tags"]
    assert tags["IFD0"]["Make"] == "Canon"
    assert tags["ExifIFD"]["FNumber"] == 4.0
    assert tags["ExifIFD"]["ExifVersion"] == "0210"
    assert "MakerNote" not in tags["ExifIFD"]
    assert "ExifTag" not in tags["IFD0"]  # offsets are not facts
    with_note = read_exif(SAMPLES / "exif-org" / "canon-ixus.jpg", makernote=True)["tags"]
    assert with_note["ExifIFD"]["MakerNote"].startswith("base64:")


def test_southern_western_and_below_sea_level(tmp_path):
    path = tmp_path / "south.jpg"
    path.write_bytes(make_image(1, gps=(-33.8688, -70.6693)))
    exif = piexif.load(str(path))
    exif["GPS"][piexif.GPSIFD.GPSAltitude] = (4235, 10)
    exif["GPS"][piexif.GPSIFD.GPSAltitudeRef] = 1
    piexif.insert(piexif.dump(exif), str(path))
    gps = read_exif(path)["gps"]
    assert gps["latitude"] == pytest.approx(-33.8688, abs=1e-5)
    assert gps["longitude"] == pytest.approx(-70.6693, abs=1e-5)
    assert gps["altitude"] == -423.5


def folder_recipe(images, output, enrichers: str, sink: str = "clear") -> str:
    return f"""
name: enrich
terms: [animals]
output: {output}
sources:
  - use: folder
    options: {{path: {images}, term: animals}}
enrichers:
{enrichers}
sinks:
  - use: jsonl
    options: {{personal_fields: {sink}}}
"""


def test_exif_position_fills_records_without_one_and_can_be_stripped(tmp_path, recipe_file,
                                                                    harvest):
    images = tmp_path / "images"
    images.mkdir()
    (images / "manila.jpg").write_bytes(make_image(1, gps=(14.5995, 120.9842)))
    (images / "plain.png").write_bytes(make_image(2, fmt="PNG"))
    output = tmp_path / "out"
    recipe = recipe_file(folder_recipe(images, output, """
  - use: exif
    options: {strip_from_file: true}
  - use: geocode
"""))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = {r["relative_path"]: r for r in read_jsonl(output / "records.jsonl")}
    manila = records["manila.jpg"]
    assert manila["geo_origin"] == "exif"
    assert manila["latitude"] == pytest.approx(14.5995, abs=1e-4)
    assert manila["country_code"] == "PH" and manila["country"] == "Philippines"
    assert manila["exif"]["IFD0"]["Make"] == "HarvestCam"
    assert manila["exif_stripped_from_file"] is True
    stored = output / manila["file"]["path"]
    assert piexif.load(str(stored))["0th"] == {}
    assert stored.stat().st_size == manila["file"]["bytes"]
    assert records["plain.png"]["exif_error"] == "no EXIF"
    assert records["plain.png"].get("country") is None


def test_exif_is_personal_and_omitted_by_default(tmp_path, recipe_file, harvest):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(make_image(1, gps=(14.5995, 120.9842)))
    output = tmp_path / "out"
    recipe = recipe_file(folder_recipe(images, output, "  - use: exif", sink="omit"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    [record] = read_jsonl(output / "records.jsonl")
    assert "exif" not in record and "exif_gps" not in record
    # The position copied from the camera's GPS is personal too.
    assert record["omitted_personal_fields"] == ["exif", "exif_gps", "latitude", "longitude"]
    assert "latitude" not in record and record["geo_origin"] == "exif"
    data = (output / "records.jsonl").read_bytes()
    assert b"Test Camera Owner" not in data and b"14.599" not in data and b"120.98" not in data


def test_philippines_bbox_keeps_sandakan_but_the_country_filter_drops_it(flickr, recipe_file,
                                                                        harvest, tmp_path):
    flickr.photos = [
        FakePhoto(id="1", title="monkey in Manila", latitude=14.5995, longitude=120.9842),
        FakePhoto(id="2", title="monkey in Sandakan", latitude=5.8394, longitude=118.1172),
        FakePhoto(id="3", title="monkey nowhere"),
    ]
    bbox = "bbox: 116.9,4.5,127.0,21.0"
    output = tmp_path / "bbox-only"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, options=bbox)
                         + "enrichers:\n  - use: geocode\n", "a.yml")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    places = {r["source_id"]: r.get("country_code") for r in read_jsonl(output / "records.jsonl")}
    assert places == {"1": "PH", "2": "MY"}  # the bbox alone keeps Sandakan, Malaysia

    output = tmp_path / "filtered"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, options=bbox)
                         + "enrichers:\n  - use: geocode\n    options: {countries: [PH]}\n", "b.yml")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    records = read_jsonl(output / "records.jsonl")
    assert [(r["source_id"], r["city"], r["admin1"]) for r in records] == \
        [("1", "Quiapo", "Metro Manila")]


def test_no_geotag_is_unknown_not_the_gulf_of_guinea(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = [FakePhoto(id="1", title="monkey", latitude=0, longitude=0)]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output)
                         + "enrichers:\n  - use: geocode\n    options:\n"
                           "      countries: [Philippines]\n      keep_unplaced: true\n")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    [record] = read_jsonl(output / "records.jsonl")
    assert record["latitude"] is None and "country" not in record


def test_an_enricher_error_fails_only_its_record(flickr, recipe_file, harvest, tmp_path,
                                                 monkeypatch):
    monkeypatch.setattr(builtin_plugins, "BUILTIN_MODULES",
                        builtin_plugins.BUILTIN_MODULES + ("enricher_plugins",))
    flickr.photos = monkey_photos(4) + [FakePhoto(id="9", title="monkey boom")]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output) + "enrichers: [flaky]\n")
    status, out, _ = harvest("run", recipe, "--no-progress")
    assert status == 3  # the failed record is retried by the next run
    records = read_jsonl(output / "records.jsonl")
    assert sorted(r["source_id"] for r in records) == ["1001", "1002", "1003", "1004"]
    assert all(r["flaky_seen"] for r in records)
    assert "flickr enrich flaky: RuntimeError: boom" in out


def test_ascii_values_without_a_counted_nul_keep_their_last_character(tmp_path):
    """Some cameras count an ASCII value's characters without the trailing NUL; the last
    character is still part of the value."""
    exif = piexif.dump({"0th": {piexif.ImageIFD.Make: b"EASTMAN KODAK COMPANY",
                                piexif.ImageIFD.Model: b"KODAK DC240",
                                piexif.ImageIFD.Software: b"ab"},
                        "Exif": {piexif.ExifIFD.DateTimeOriginal: b"2001:02:03 04:05:06"}})
    # piexif writes each value with a NUL and counts it; count one fewer, as those cameras do.
    for tag, text in ((piexif.ImageIFD.Make, b"EASTMAN KODAK COMPANY"),
                      (piexif.ImageIFD.Model, b"KODAK DC240"),
                      (piexif.ImageIFD.Software, b"ab"),
                      (piexif.ExifIFD.DateTimeOriginal, b"2001:02:03 04:05:06")):
        entry = tag.to_bytes(2, "big") + b"\x00\x02" + (len(text) + 1).to_bytes(4, "big")
        assert exif.count(entry) == 1
        exif = exif.replace(entry, entry[:4] + len(text).to_bytes(4, "big"))
    path = tmp_path / "kodak.jpg"
    path.write_bytes(make_image(3))
    piexif.insert(exif, str(path))
    tags = read_exif(path)["tags"]
    assert tags["IFD0"]["Make"] == "EASTMAN KODAK COMPANY"
    assert tags["IFD0"]["Model"] == "KODAK DC240"
    assert tags["IFD0"]["Software"] == "ab"  # short values live in the entry itself
    assert tags["ExifIFD"]["DateTimeOriginal"] == "2001:02:03 04:05:06"
    # Values that do count their NUL are unchanged.
    normal = tmp_path / "normal.jpg"
    normal.write_bytes(make_image(4))
    piexif.insert(piexif.dump({"0th": {piexif.ImageIFD.Make: b"Canon"}}), str(normal))
    assert read_exif(normal)["tags"]["IFD0"]["Make"] == "Canon"


def test_ascii_value_is_the_text_before_its_first_nul(tmp_path):
    """An EXIF ASCII value ends at its first NUL, as the spec and exiftool read it: the
    bytes after it (a writer's leftovers) are not part of the Model."""
    path = tmp_path / "ion.jpg"
    path.write_bytes(make_image(5))
    piexif.insert(piexif.dump({"0th": {piexif.ImageIFD.Model: b"ION230\x00F",
                                       piexif.ImageIFD.Make: b"ab\x00c"},
                               "Exif": {piexif.ExifIFD.LensModel: b"\x00junk after"}}),
                  str(path))
    tags = read_exif(path)["tags"]
    assert tags["IFD0"]["Model"] == "ION230"
    assert tags["IFD0"]["Make"] == "ab"  # short values live in the entry itself
    assert "LensModel" not in tags.get("ExifIFD", {})  # empty before its NUL: no value


def test_verbose_logs_outcomes_not_personal_values(tmp_path, recipe_file, harvest):
    """-v logs each record's outcome; it does not turn on the libraries' DEBUG output,
    which prints EXIF values (an Artist is a person's name)."""
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        (images / f"{seed}.jpg").write_bytes(make_image(seed, gps=(14.5995, 120.9842)))
    (images / "broken.jpg").write_bytes(make_image(9)[:200])
    output = tmp_path / "out"
    recipe = recipe_file(folder_recipe(images, output, "  - use: exif", sink="omit"))
    status, out, err = harvest("-v", "run", recipe, "--no-progress")
    assert status == 0, err
    log = (output / ".harvest" / "harvest.log").read_text(encoding="utf-8")
    assert "folder:broken.jpg: download rejected: corrupt image" in log
    for text in (log, out, err):
        assert "Test Camera Owner" not in text and " DEBUG PIL" not in text
