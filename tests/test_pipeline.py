"""One recipe with every built-in enricher, end to end against the local servers."""

from __future__ import annotations

import io

import piexif
import pytest
from conftest import FakePhoto, flickr_recipe, read_jsonl
from fakes import FakeVision
from imagegen import coloured_image, exif_bytes


def with_exif(data: bytes, gps) -> bytes:
    out = io.BytesIO()
    piexif.insert(exif_bytes(1, gps), data, out)
    return out.getvalue()


@pytest.mark.parametrize("where", ["one machine", "cluster"])
def test_flickr_with_exif_geocode_license_and_vision(flickr, recipe_file, harvest, tmp_path,
                                                     monkeypatch, request, where):
    vision = FakeVision().start()
    monkeypatch.setenv("GOOGLE_VISION_KEY", vision.api_key)
    manila_gps, sandakan = (14.5995, 120.9842), (5.8394, 118.1172)
    flickr.photos = [
        # No Flickr geotag, but GPS EXIF in Manila: kept, placed from EXIF.
        FakePhoto(id="1", title="monkey one", license="4",
                  image=with_exif(coloured_image((200, 30, 30), 1), manila_gps)),
        # Geotagged in Sandakan, Malaysia: inside the bbox, dropped by the country filter.
        FakePhoto(id="2", title="monkey two", license="5", latitude=sandakan[0],
                  longitude=sandakan[1], image=coloured_image((200, 30, 30), 2)),
        # In Manila but a cage, not a monkey: kept and marked keep: false.
        FakePhoto(id="3", title="monkey three", license="9", latitude=14.6, longitude=121.0,
                  image=coloured_image((30, 30, 200), 3)),
    ]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output) + f"""
enrichers:
  - use: exif
  - use: geocode
    options: {{countries: [PH]}}
  - use: license
    options: {{allow: [redistributable]}}
  - use: vision
    options:
      endpoint: {vision.url}
      keep_if: {{monkey: ">=0.6"}}
sinks: [{{use: jsonl, options: {{personal_fields: clear}}}}]
""")
    try:
        cluster = []
        if where == "cluster":  # every enricher runs in the workers' processes
            cluster = ["--cluster", request.getfixturevalue("dask_cluster").scheduler_address]
        status, out, err = harvest("run", recipe, "--no-progress", *cluster)
    finally:
        vision.stop()
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert sorted(records) == ["1", "3"]
    one, three = records["1"], records["3"]
    assert one["geo_origin"] == "exif" and one["country_code"] == "PH"
    assert one["exif"]["IFD0"]["Make"] == "HarvestCam"
    assert one["attribution"].startswith('"monkey one" by Ana Fotógrafa, CC BY 2.0')
    assert one["scores"] == {"monkey": 0.93} and one["keep"] is True
    assert three["geo_origin"] == "flickr" and three["license"] == "CC0-1.0"
    assert three["keep"] is False
    assert flickr.searches[0]["license"] == "4,5,7,9,10"
    assert "country MY not in the recipe's countries" in out


def test_a_run_that_stores_nothing_says_why_and_what_to_do(recipe_file, harvest, tmp_path):
    """Every record rejected: the summary ends saying so, with the most common reason
    (which names the option that changes it when there is one); run again, it says that
    nothing is new and how to send those records through again (issue 28)."""
    from imagegen import truncated_jpeg

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(truncated_jpeg(500 + i))
    recipe = recipe_file(f"""
        output: {tmp_path / "out"}
        sources: [{{use: folder, options: {{path: {photos}}}}}]
    """)
    status, out, err = harvest("run", recipe, "--no-progress")
    last = out.strip().splitlines()[-1]
    assert "nothing stored: all 3 records found were rejected" in last, out
    assert "corrupt image" in last
    status, out, err = harvest("run", recipe, "--no-progress")
    assert "nothing new" in out and "--reconsider rejected,dropped,failed" in out, out
