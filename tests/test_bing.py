"""The bing source against a local server speaking Bing's result-page HTML and v7 JSON."""

from __future__ import annotations

import json

import pytest
from conftest import FakePhoto, flickr_recipe, read_jsonl
from fakes import FakeBing

TITLES = ["monkey", "猿の写真", "قرد", "обезьяна", "Affe & Co <b>"]


@pytest.fixture
def bing(flickr):
    """Bing results whose images live on the Flickr fake's image host (same bytes as Flickr's)."""
    fake = FakeBing().start()
    flickr.photos = [FakePhoto(id=str(i), title=f"monkey {i}") for i in range(1, 61)]
    results = []
    for i in range(1, 51):
        results.append({"murl": f"{flickr.url}/img/{i}_l.jpg", "purl": f"http://example.org/p{i}",
                        "title": f"{TITLES[i % len(TITLES)]} {i}", "w": 160, "h": 120})
        if i % 10 == 0:
            results.append({"broken": ["json", "no-murl", "javascript"][i % 3]})
    fake.results["monkey"] = results
    fake.results["猿"] = results[25:30]  # other pictures than the first English page
    yield fake
    fake.stop()


def bing_recipe(bing, output, options="", terms="[monkey]", extra_sources="") -> str:
    return f"""
terms: {terms}
output: {output}
run: {{allow_private_addresses: true, rate_per_host: 1000, backoff: 0.01}}
sources:
  - use: bing
    options:
      endpoint: {bing.url}
      delay: 0.05
      page_size: 20
{options}
{extra_sources}
sinks: [jsonl]
"""


def test_result_pages(bing, recipe_file, harvest, tmp_path):
    output = tmp_path / "out"
    recipe = recipe_file(bing_recipe(bing, output, """      count: 45
      license: creative_commons
      safe_search: moderate
      market: ja-JP"""))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = read_jsonl(output / "records.jsonl")
    assert len(records) == 45 and len({r["url"] for r in records}) == 45
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in records}
    assert by_url["1_l.jpg"]["title"] == "猿の写真 1"
    assert by_url["4_l.jpg"]["title"] == "Affe & Co <b> 4"
    assert by_url["2_l.jpg"]["page_url"] == "http://example.org/p2"
    assert by_url["2_l.jpg"]["image_width"] == 160 and by_url["2_l.jpg"]["image_format"] == "jpeg"
    assert by_url["2_l.jpg"]["bing_license_filter"] == "creative_commons"
    pages = [r for r in bing.requests if r["path"] == "/images/async"]
    assert pages[0]["qft"] == "+filterui:photo-photo+filterui:licenseType-Any"
    assert pages[0]["adlt"] == "moderate" and pages[0]["mkt"] == "ja-JP"
    assert [p["first"] for p in pages[:3]] == ["1", "21", "41"]
    gaps = [b["time"] - a["time"] for a, b in zip(pages, pages[1:], strict=False)]
    assert min(gaps) >= 0.045  # one page at a time, with the delay between


def test_all_pages_until_bing_repeats_itself(bing, recipe_file, harvest, tmp_path):
    output = tmp_path / "out"
    recipe = recipe_file(bing_recipe(bing, output, "      count: 1000"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert len(read_jsonl(output / "records.jsonl")) == 50  # broken entries skipped


def test_robots_txt_is_honoured(bing, recipe_file, harvest, tmp_path):
    bing.robots = "User-agent: *\nDisallow: /images/\n"
    recipe = recipe_file(bing_recipe(bing, tmp_path / "out"))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 2 and "robots.txt does not allow harvest to read /images/async" in err
    assert not [r for r in bing.requests if r["path"] == "/images/async"]
    recipe = recipe_file(bing_recipe(bing, tmp_path / "out2", "      respect_robots: false"), "b.yml")
    assert harvest("run", recipe, "--no-progress")[0] == 0


def test_v7_json_mode(bing, recipe_file, harvest, tmp_path, monkeypatch):
    monkeypatch.setenv("BING_KEY", bing.api_key)
    output = tmp_path / "out"
    recipe = recipe_file(bing_recipe(bing, output, """      mode: api
      api_key: ${BING_KEY}
      count: 30
      license: public_domain
      size: large"""))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = read_jsonl(output / "records.jsonl")
    assert len(records) == 30
    calls = [r for r in bing.requests if r["path"] == "/v7.0/images/search"]
    assert [c["offset"] for c in calls] == ["0", "20"]
    assert calls[0]["license"] == "Public" and calls[0]["size"] == "Large"
    assert calls[0]["imageType"] == "Photo" and calls[0]["safeSearch"] == "Strict"
    assert records[0]["date_published"].startswith("2024-05-01")

    monkeypatch.setenv("BING_KEY", "wrong")
    status, _, err = harvest("run", recipe_file(bing_recipe(bing, tmp_path / "o2", """      mode: api
      api_key: ${BING_KEY}"""), "c.yml"), "--no-progress")
    assert status == 2 and "refused the key (HTTP 401)" in err


def test_flickr_and_bing_for_the_same_terms_store_each_image_once(bing, flickr, recipe_file,
                                                                   harvest, tmp_path):
    output = tmp_path / "out"
    terms = "\n  - {en: monkey, ja: 猿}"
    flickr_part = flickr_recipe(flickr.endpoint, output)
    flickr_source = flickr_part[flickr_part.index("  - use: flickr"):]
    recipe = recipe_file(bing_recipe(bing, output, "      count: 10", terms=terms,
                                     extra_sources=flickr_source.replace("per_page: 10",
                                                                         "per_page: 10\n      count: 10")))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = read_jsonl(output / "records.jsonl")
    sources = {r["source"] for r in records}
    assert sources == {"bing", "flickr"}
    by_sha: dict[str, list] = {}
    for record in records:
        by_sha.setdefault(record["file"]["sha256"], []).append(record)
    files = [p for p in (output / "images").rglob("*") if p.is_file()]
    assert len(files) == len(by_sha)  # every picture on disk once
    shared = [group for group in by_sha.values() if len(group) > 1]
    assert shared, "Bing and Flickr results share pictures in this fixture"
    for group in shared:
        first = [r for r in group if not r.get("duplicate_of")]
        assert len(first) == 1
        assert all(r["duplicate_of"] == first[0]["id"] for r in group if r is not first[0])
    assert {(r["source"], r["lang"]) for r in records} >= {("bing", "en"), ("bing", "ja"),
                                                           ("flickr", "en")}
    json.dumps(records)


def test_delay_holds_across_a_clusters_workers(bing, recipe_file, harvest, tmp_path,
                                               dask_cluster):
    """Two terms are two shards on two workers; Bing still sees one page per `delay`."""
    bing.results["ape"] = bing.results["monkey"][:40]
    output = tmp_path / "out"
    recipe = recipe_file(bing_recipe(bing, output, "      count: 40\n      delay: 0.3",
                                     terms="[monkey, ape]").replace("      delay: 0.05\n", ""))
    status, _, err = harvest("run", recipe, "--cluster", dask_cluster.scheduler_address,
                             "--no-progress")
    assert status == 0, err
    pages = sorted(r["time"] for r in bing.requests if r["path"] == "/images/async")
    assert len(pages) >= 4
    gaps = [b - a for a, b in zip(pages, pages[1:], strict=False)]
    assert min(gaps) >= 0.27, gaps  # not two workers' pages at once


def test_v7_bad_items_are_skipped_with_their_reason(bing, recipe_file, harvest, tmp_path,
                                                    monkeypatch):
    """An item that is not an object or whose contentUrl is a number ended the search;
    each is now skipped with its reason, and the rest are stored."""
    answer = bing.api

    def hostile(params):
        body = answer(params)
        if params.get("offset") == "0":
            body["value"][1]["contentUrl"] = 12345
            body["value"].insert(0, "not an object")
        return body

    monkeypatch.setattr(bing, "api", hostile)
    monkeypatch.setenv("BING_KEY", bing.api_key)
    output = tmp_path / "out"
    recipe = recipe_file(bing_recipe(bing, output, """      mode: api
      api_key: ${BING_KEY}
      count: 30"""))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, out + err
    assert len(read_jsonl(output / "records.jsonl")) == 30
    assert "bad item in the answer (AttributeError: 'str' object has no attribute 'get')" in out
    assert "bad item in the answer (AttributeError: 'int' object has no attribute" in out
