"""The Flickr source through the real flickrapi library, against a local Flickr REST server."""

from __future__ import annotations

import json
import logging

from conftest import FakePhoto, flickr_recipe, monkey_photos, read_jsonl

from harvest.core.options import SecretValue
from harvest.core.record import Query
from harvest.plugins.sources.flickr import FlickrSource


def test_run_stores_images_and_records(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(25) + [FakePhoto(id="9", title="a cage", tags="cage")]
    flickr.photos[0].latitude, flickr.photos[0].longitude = 14.6, 121.0
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, run="limit_per_term: 20"))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = read_jsonl(output / "records.jsonl")
    assert len(records) == 20
    assert len({r["id"] for r in records}) == 20
    first = next(r for r in records if r["source_id"] == "1001")
    assert first["term"] == "monkey" and first["lang"] == "en" and first["query"] == "monkey"
    assert first["url"].endswith("/img/1001_l.jpg")  # the largest size offered
    assert first["license"] == "CC-BY-2.0" and first["flickr_license"] == 4
    assert first["license_url"] == "https://creativecommons.org/licenses/by/2.0/"
    assert first["latitude"] == 14.6 and first["geo_origin"] == "flickr"
    assert first["page_url"].startswith("https://flic.kr/p/")
    assert first["file"]["width"] == 160 and first["file"]["format"] == "JPEG"
    assert (output / first["file"]["path"]).stat().st_size == first["file"]["bytes"]
    # Personal fields are left out of the JSONL unless the recipe asks for them.
    assert "owner_name" not in first and "owner" not in first
    assert first["omitted_personal_fields"] == ["owner", "owner_name", "path_alias"]
    no_geo = next(r for r in records if r["source_id"] == "1002")
    assert no_geo["latitude"] is None  # Flickr's 0,0 means "no geotag"
    assert "monkey" in out and "20" in out


def test_secrets_never_reach_disk_or_logs(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(5)
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output))
    status, out, err = harvest("-v", "run", recipe, "--no-progress")
    assert status == 0, err
    logging.getLogger("harvest.test").warning("leak attempt %s", flickr.api_key)
    secret_values = [flickr.api_key.encode(), b"test-secret-abcdef"]
    for path in output.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secret_values), path
    assert flickr.api_key not in out + err
    # The key travelled where Flickr expects it: in the OAuth Authorization header.
    api_calls = [h for _, _, p, h in flickr.server.requests if p.startswith("/services/rest")]
    assert api_calls and all(flickr.api_key in h["Authorization"] for h in api_calls)
    assert repr(SecretValue(flickr.api_key, "${FLICKER_KEY}")) == "<secret ${FLICKER_KEY}>"


def test_no_token_cache_in_home(flickr, recipe_file, harvest, tmp_path, isolated_home):
    flickr.photos = monkey_photos(2)
    recipe = recipe_file(flickr_recipe(flickr.endpoint, tmp_path / "out"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert list(isolated_home.iterdir()) == []


def test_invalid_key_is_a_clear_error(flickr, recipe_file, harvest, tmp_path, monkeypatch):
    flickr.photos = monkey_photos(3)
    monkeypatch.setenv("FLICKER_KEY", "wrong-key-000")
    recipe = recipe_file(flickr_recipe(flickr.endpoint, tmp_path / "out"))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 2
    line = [ln for ln in err.splitlines() if ln.startswith("harvest: error")]
    assert len(line) == 1 and "Invalid API Key" in line[0] and "api_key" in line[0]
    assert "wrong-key-000" not in err + out


def test_multilingual_terms_keep_term_and_language(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = [FakePhoto(id="1", title="monkey"), FakePhoto(id="2", title="猿 in a tree"),
                     FakePhoto(id="3", title="قرد"), FakePhoto(id="4", title="cage")]
    output = tmp_path / "out"
    terms = "\n  - {en: monkey, ja: 猿, ar: قرد}\n  - cage"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, terms=terms))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    found = {r["source_id"]: (r["term"], r["lang"], r["query"])
             for r in read_jsonl(output / "records.jsonl")}
    assert found == {"1": ("monkey", "en", "monkey"), "2": ("monkey", "ja", "猿"),
                     "3": ("monkey", "ar", "قرد"), "4": ("cage", "en", "cage")}
    folders = {p.parent.name for p in (output / "images").rglob("*.jpg")}
    assert folders == {"monkey", "cage"}


def test_search_parameters_reach_flickr(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = [FakePhoto(id="1", title="monkey", latitude=14.5, longitude=121.0, license="4"),
                     FakePhoto(id="2", title="monkey", latitude=5.8, longitude=118.1, license="4"),
                     FakePhoto(id="3", title="monkey", latitude=14.5, longitude=121.0, license="0")]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, options="""
        bbox: 120.0,10.0,127.0,21.0
        licenses: [4, 5]
        min_taken_date: 2010-01-01
    """))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert [r["source_id"] for r in read_jsonl(output / "records.jsonl")] == ["1"]


def make_source(flickr, tmp_path, **options) -> FlickrSource:
    from harvest.core.contract.plugin import Context
    from harvest.core.contract.recipe import RunSettings
    from harvest.core.contract.registry import load_registry
    from harvest.core.download.http import HttpClient

    declared = {o.name: o.default for o in FlickrSource.options}
    declared.update(api_key=SecretValue(flickr.api_key, "${K}"),
                    api_secret=SecretValue("s", "${S}"), endpoint=flickr.endpoint,
                    sizes=["l", "m"], **options)
    assert load_registry().get("sources", "flickr").cls is FlickrSource
    settings = RunSettings()
    http = HttpClient(rate_per_host=1000, timeout=10, retries=3, backoff=0.01,
                      user_agent=settings.user_agent)
    context = Context("t", tmp_path, tmp_path, [], http, logging.getLogger("t"))
    source = FlickrSource(declared, context)
    source.open()
    return source


def test_pagination_past_the_4000_results_cap(flickr, tmp_path):
    flickr.photos = [FakePhoto(id=str(i), title="monkey", dateupload=1_300_000_000 + i * 3600)
                     for i in range(9000)]
    source = make_source(flickr, tmp_path, per_page=500)
    ids = [r.source_id for r in source.records(Query("monkey", "en", "monkey"))]
    assert len(ids) == 9000 and len(set(ids)) == 9000


def test_without_slicing_flickr_stops_at_its_cap(flickr, tmp_path):
    flickr.photos = [FakePhoto(id=str(i), title="monkey", dateupload=1_300_000_000 + i * 3600)
                     for i in range(4500)]
    source = make_source(flickr, tmp_path, per_page=500, slice_dates=False)
    ids = [r.source_id for r in source.records(Query("monkey", "en", "monkey"))]
    assert len(set(ids)) == 4000


def test_api_5xx_is_retried_then_served(flickr, tmp_path):
    flickr.photos = monkey_photos(3)
    source = make_source(flickr, tmp_path)
    flickr.api_failures = [503, 502]
    ids = [r.source_id for r in source.records(Query("monkey", "en", "monkey"))]
    assert len(ids) == 3
    assert flickr.api_failures == []  # both failures were answered, then retried
    assert flickr.calls["flickr.photos.search"] == 3


def test_records_are_json_serializable(flickr, tmp_path):
    flickr.photos = monkey_photos(2)
    source = make_source(flickr, tmp_path)
    for record in source.records(Query("monkey", "en", "monkey")):
        json.dumps(record.to_dict())


def test_builtin_license_table_matches_the_api(flickr, tmp_path):
    from harvest.plugins.sources.flickr import FLICKR_LICENSES

    source = make_source(flickr, tmp_path)
    assert flickr.calls["flickr.photos.licenses.getInfo"] == 1
    assert {i: (name, url) for i, (name, url, _) in source.licenses.items()} == FLICKR_LICENSES
    assert {i: spdx for i, (_, _, spdx) in source.licenses.items()} == {
        0: "ARR", 1: "CC-BY-NC-SA-2.0", 2: "CC-BY-NC-2.0", 3: "CC-BY-NC-ND-2.0", 4: "CC-BY-2.0",
        5: "CC-BY-SA-2.0", 6: "CC-BY-ND-2.0", 7: "NKCR", 8: "US-GOV-WORK", 9: "CC0-1.0",
        10: "PDM-1.0"}


def test_new_licenses_from_the_api_are_understood(flickr, tmp_path):
    flickr.licenses[11] = ("CC BY 4.0", "https://creativecommons.org/licenses/by/4.0/")
    flickr.photos = [FakePhoto(id="1", title="monkey", license="11")]
    source = make_source(flickr, tmp_path)
    [record] = source.records(Query("monkey", "en", "monkey"))
    assert record.fields["license"] == "CC-BY-4.0"


def test_unreachable_license_table_falls_back_to_the_builtin_copy(flickr, tmp_path, caplog):
    flickr.api_failures = [500] * 10
    source = make_source(flickr, tmp_path)
    assert source.licenses[4][2] == "CC-BY-2.0"
    assert "using the built-in copy" in caplog.text


def test_a_photo_found_by_two_wordings_is_stored_once(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = [FakePhoto(id=str(i), title=f"monkey 猿 {i}") for i in range(1, 4)]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, terms="[{en: monkey, ja: 猿}]",
                                       run="batch_size: 64"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    records = read_jsonl(output / "records.jsonl")
    assert sorted(r["source_id"] for r in records) == ["1", "2", "3"]
    assert {r["lang"] for r in records} == {"en"}  # the first wording keeps it


def test_matched_in_says_where_the_wording_is(flickr, recipe_file, harvest, tmp_path):
    """The cheap signal behind a search's false positives: the term only in the
    description. Compared as plain text (a wording full of pattern characters is text)."""
    from harvest.core.commands.review import Review
    from harvest.plugins.sources.flickr import matched_in

    flickr.photos = [
        FakePhoto(id="1", title="Monkey  at the zoo", tags="monkey zoo"),
        FakePhoto(id="2", title="Sunday", tags="monkey"),
        FakePhoto(id="3", title="a cage", tags="cage", description="next to the MONKEY house"),
        FakePhoto(id="4", title="spider monkeys", tags="spidermonkey"),
    ]
    output = tmp_path / "out"
    status, out, err = harvest("run", recipe_file(flickr_recipe(flickr.endpoint, output)),
                               "--no-progress")
    assert status == 0, err
    found = {r["source_id"]: r["matched_in"] for r in read_jsonl(output / "records.jsonl")}
    assert found == {"1": ["title", "tags"], "2": ["tags"], "3": ["description"],
                     "4": ["title"]}
    review = Review(output)
    assert review.meta()["facets"]["matched_in"] == {"title+tags": 1, "tags": 1,
                                                     "description": 1, "title": 1}
    only_description = review.view({"filters": {"matched_in": "description"}})
    assert [item["id"] for item in only_description["items"]] == ["flickr:3"]
    review.db.close()
    assert matched_in("spider monkey", "", "", ["spidermonkey"]) == ["tags"]
    assert matched_in("c++ (a*", "C++ (a* tutorial", "", []) == ["title"]
    assert matched_in("", "anything", "", []) == []
