"""flickr_comments: API and page modes, as a source and as an enricher, same record shape."""

from __future__ import annotations

import pytest
from conftest import FakePhoto, flickr_recipe, read_jsonl

COMMENTS = [("11111@N01", "Kenji 健二", 1_600_000_000, "いい猿ですね"),
            ("22222@N02", "Layla ليلى", 1_600_000_600, "Beautiful <monkey> & tree")]


@pytest.fixture
def photos(flickr):
    flickr.photos = [FakePhoto(id="501", title="monkey a", comments=COMMENTS),
                     FakePhoto(id="502", title="monkey b")]
    return flickr


def expected_comments():
    return [{"author": nsid, "author_name": name, "text": text} for nsid, name, _, text in COMMENTS]


def shape(comments):
    return [{k: c[k] for k in ("author", "author_name", "text")} for c in comments]


@pytest.mark.parametrize("mode", ["api", "page"])
def test_source_over_photo_ids_and_urls(mode, photos, recipe_file, harvest, tmp_path):
    keys = "api_key: ${FLICKER_KEY}\n      api_secret: ${FLICKER_SECRET}\n      " \
        if mode == "api" else ""
    output = tmp_path / "out"
    recipe = recipe_file(f"""
terms: [monkey]
output: {output}
run: {{allow_private_addresses: true}}
sources:
  - use: flickr_comments
    options:
      {keys}endpoint: {photos.endpoint}
      site: {photos.url}
      photos: ["501", "https://www.flickr.com/photos/someone/502/"]
      term: monkey
sinks: [{{use: jsonl, options: {{personal_fields: clear}}}}]
""")
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert shape(records["501"]["comments"]) == expected_comments()
    assert records["501"]["comments"][0]["date"] == "2020-09-13T12:26:40+00:00"
    assert records["501"]["comments"][1]["permalink"].endswith("#comment1")
    assert records["502"]["comments"] == [] and records["502"]["comment_count"] == 0
    assert records["501"]["file"]["width"] == 160


def test_enricher_on_a_flickr_harvest_and_authors_are_encrypted(photos, recipe_file, harvest,
                                                                tmp_path, key_file):
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(photos.endpoint, output) + f"""
enrichers:
  - use: flickr_comments
    options: {{site: {photos.url}}}
sinks: [{{use: jsonl, options: {{personal_fields: encrypt, key_file: {key_file}}}}}]
""")
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    raw = (output / "records.jsonl").read_text(encoding="utf-8")
    assert "Kenji" not in raw and "11111@N01" not in raw
    clear = tmp_path / "clear.jsonl"
    status, _, _ = harvest("decrypt", output / "records.jsonl", "--key-file", key_file, "-o", clear)
    text = clear.read_text(encoding="utf-8")
    assert status == 0 and "Kenji 健二" in text and "Beautiful <monkey> & tree" in text


def test_source_over_an_earlier_harvest(photos, recipe_file, harvest, tmp_path):
    first = tmp_path / "first"
    recipe = recipe_file(flickr_recipe(photos.endpoint, first)
                         + "sinks: [{use: jsonl, options: {personal_fields: clear}}]\n", "a.yml")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    second = tmp_path / "second"
    recipe = recipe_file(f"""
terms: [monkey]
output: {second}
run: {{allow_private_addresses: true}}
sources:
  - use: flickr_comments
    options:
      api_key: ${{FLICKER_KEY}}
      api_secret: ${{FLICKER_SECRET}}
      endpoint: {photos.endpoint}
      records: {first / "records.jsonl"}
sinks: [{{use: jsonl, options: {{personal_fields: clear}}}}]
""", "b.yml")
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(second / "records.jsonl")}
    assert sorted(records) == ["501", "502"]
    assert records["501"]["title"] == "monkey a"
    assert shape(records["501"]["comments"]) == expected_comments()
