"""The wikimedia source against a local server answering as the MediaWiki Action API
documents (formatversion=2 JSON): search in the File namespace, category members with
sub-categories, continuation, maxlag errors, imageinfo with extmetadata and SHA-1."""

from __future__ import annotations

import hashlib
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import read_jsonl
from fakes import QuietHandler, serve_in_thread
from imagegen import make_image

LICENSES = ["CC BY-SA 4.0", "CC BY 2.0", "CC0", "Public domain"]


class FakeCommons:
    def __init__(self):
        self.calls: list[dict] = []
        self.lagged = 1  # answers with a maxlag error before the first real one
        self.user_agents: set[str] = set()
        self.files = {i: make_image(500 + i) for i in range(12)}
        self.corrupt_sha1 = {7}
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                if parts.path.startswith("/upload/"):
                    data = fake.files[int(parts.path.split("/")[-1].split(".")[0])]
                    return self.reply(200, data, "image/jpeg")
                if parts.path != "/w/api.php":  # robots.txt, tdmrep.json: none here
                    return self.reply(404)
                params = {k: v[0] for k, v in parse_qs(parts.query).items()}
                fake.calls.append(params)
                fake.user_agents.add(self.headers.get("User-Agent", ""))
                if fake.lagged:
                    fake.lagged -= 1
                    return self.reply_json({"error": {"code": "maxlag", "info": "Waiting for a "
                                                 "database server: 1 seconds lagged",
                                                 "lag": 0.1}}, {"Retry-After": "0"})
                self.reply_json(fake.answer(params))

        self.server, self.base = serve_in_thread(Handler)

    def page(self, i: int, index: int) -> dict:
        data = self.files[i]
        sha1 = hashlib.sha1(data).hexdigest() if i not in self.corrupt_sha1 else "0" * 40
        return {"pageid": 9000 + i, "ns": 6, "title": f"File:Macaque {i}.jpg", "index": index,
                "imageinfo": [{
                    "size": len(data), "width": 96, "height": 64, "sha1": sha1,
                    "mime": "image/jpeg" if i != 11 else "application/pdf",
                    "url": f"{self.base}/upload/{i}.jpg",
                    "descriptionurl": f"https://commons.wikimedia.org/wiki/File:Macaque_{i}.jpg",
                    "extmetadata": {
                        "LicenseShortName": {"value": LICENSES[i % 4], "source": "commons"},
                        "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0"},
                        "Artist": {"value": f'<a href="//commons.wikimedia.org/wiki/User:P{i}">'
                                            f"Photographer &amp; {i}</a>"},
                        "AttributionRequired": {"value": "true"},
                        "ImageDescription": {"value": "<p>A <b>macaque</b></p>"}}}]}

    def answer(self, params: dict) -> dict:
        if params.get("list") == "categorymembers":  # sub-categories
            subcats = {"Category:Macaca": [{"ns": 14, "title": "Category:Macaca fuscata"}]}
            return {"batchcomplete": True,
                    "query": {"categorymembers": subcats.get(params["cmtitle"], [])}}
        if params.get("generator") == "categorymembers":
            members = {"Category:Macaca": [0, 1], "Category:Macaca fuscata": [2, 3, 1]}
            ids = members.get(params["gcmtitle"], [])
            return {"batchcomplete": True,
                    "query": {"pages": [self.page(i, n) for n, i in enumerate(ids)]}}
        offset = int(params.get("gsroffset", 0))
        limit = int(params["gsrlimit"])
        ids = list(range(12))[offset:offset + limit]
        body = {"batchcomplete": True, "query": {"pages": [self.page(i, offset + n + 1)
                                                           for n, i in enumerate(ids)]}}
        if offset + limit < 12:
            body["continue"] = {"gsroffset": offset + limit, "continue": "gsroffset||"}
        return body


@pytest.fixture
def commons():
    fake = FakeCommons()
    yield fake
    fake.server.shutdown()


def recipe(commons, output, options: str = "") -> str:
    return f"""
terms: [macaque]
output: {output}
run: {{allow_private_addresses: true, rate_per_host: 1000}}
sources:
  - use: wikimedia
    options: {{endpoint: "{commons.base}/w/api.php", contact: "research@example.org",
               requests_per_second: 50, batch: 5{options}}}
sinks: [jsonl]
"""


def test_search_with_licenses_sha1_and_etiquette(commons, recipe_file, harvest, tmp_path):
    output = tmp_path / "out"
    status, out, err = harvest("run", recipe_file(recipe(commons, output)), "--no-progress")
    assert status == 3, err  # one file's SHA-1 did not match: not stored, retried next run
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert set(records) == {str(9000 + i) for i in range(11) if i != 7}  # 11 is a PDF
    assert "its SHA-1 differs" in out
    first = records["9000"]
    assert first["license"] == "CC-BY-SA-4.0" and first["license_name"] == "CC BY-SA 4.0"
    assert records["9001"]["license"] == "CC-BY-2.0"
    assert records["9002"]["license"] == "CC0-1.0" and records["9003"]["license"] == "PDM-1.0"
    assert first["attribution_required"] is True and first["description"] == "A macaque"
    assert first["page_url"].endswith("File:Macaque_0.jpg") and first["title"] == "Macaque 0"
    assert "author" not in first  # personal: omitted by default
    search = [c for c in commons.calls if c.get("generator") == "search"]
    assert [c.get("gsroffset", "0") for c in search] == ["0", "0", "5", "10"]  # after maxlag
    assert all(c["maxlag"] == "5" and c["gsrnamespace"] == "6" for c in commons.calls)
    assert commons.user_agents == {next(iter(commons.user_agents))}
    assert "(research@example.org)" in next(iter(commons.user_agents))


def test_categories_with_depth_and_clear_author(commons, recipe_file, harvest, tmp_path):
    commons.lagged = 0
    output = tmp_path / "out"
    text = recipe(commons, output, ", categories: [Macaca], depth: 1").replace(
        "sinks: [jsonl]", "sinks: [{use: jsonl, options: {personal_fields: clear}}]")
    status, _, err = harvest("run", recipe_file(text), "--no-progress")
    assert status == 0, err
    records = read_jsonl(output / "records.jsonl")
    assert sorted(r["source_id"] for r in records) == ["9000", "9001", "9002", "9003"]
    assert {r["author"] for r in records} >= {"Photographer & 0"}
    assert all("term" not in r for r in records)


def test_contact_is_required(commons, recipe_file, harvest, tmp_path):
    text = recipe(commons, tmp_path / "o").replace('contact: "research@example.org"',
                                                   'contact: "me"')
    status, _, err = harvest("validate", recipe_file(text))
    assert status == 2 and "contact" in err and "e-mail" in err


class EndlessCommons:
    """An API that never ends a listing: ``continue`` with no pages, forever, or one more
    level of sub-categories at every call."""

    def __init__(self):
        self.calls = 0
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                params = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                if urlsplit(self.path).path != "/w/api.php":
                    return self.reply(404)
                fake.calls += 1
                time.sleep(fake.latency)
                if params.get("list") == "categorymembers":
                    self.reply_json({"continue": {"cmcontinue": str(fake.calls)}, "query": {
                        "categorymembers": [{"ns": 14, "title": f"Category:C{fake.calls}"}]}})
                else:
                    self.reply_json({"continue": {"gsroffset": fake.calls, "continue": "-||"},
                                     "query": {}})

        self.latency = 0.0
        self.server, self.base = serve_in_thread(Handler)


@pytest.mark.parametrize("options, run, why", [
    ("", "max_api_calls: 40", "search cut short after 40 API calls (run.max_api_calls)"),
    (", categories: [Macaca], depth: 10", "max_api_calls: 40",
     "search cut short after 40 API calls (run.max_api_calls)"),
    ("", "search_deadline: 1", "waiting on the API (run.search_deadline 1 s)"),
])
def test_an_endless_listing_is_cut_short_as_a_failed_search(options, run, why, recipe_file,
                                                            harvest, tmp_path):
    """``continue`` with no pages answered 1,845 times in 85 s, with no end; sub-categories
    without end likewise. Each search has a call cap and a deadline for its API time; a
    search cut short is a failed one (exit 3), with one line saying why."""
    endless = EndlessCommons()
    endless.latency = 0.05 if "deadline" in run else 0.0
    output = tmp_path / "out"
    text = recipe(endless, output, options).replace("rate_per_host: 1000}",
                                                    f"rate_per_host: 1000, {run}}}")
    started = time.monotonic()
    status, out, err = harvest("run", recipe_file(text), "--no-progress")
    endless.server.shutdown()
    assert time.monotonic() - started < 15
    assert status == 3, out + err
    assert why in out, out
    if "calls" in run:
        assert endless.calls == 40


def test_bad_items_are_skipped_with_their_reason(commons, recipe_file, harvest, tmp_path):
    """One bad item (not an object, imageinfo of the wrong type, a sha1 that is a number)
    or a negative maxlag lag ended the whole search with "unexpected AttributeError".
    Each bad item is now skipped with its reason, counted, and the rest are stored."""
    answer = commons.answer

    def hostile(params):
        body = answer(params)
        pages = body["query"]["pages"]
        if params.get("gsroffset", "0") == "0":
            pages[1]["imageinfo"][0]["sha1"] = 1234
            pages[2]["imageinfo"] = {"url": "x"}
            pages.insert(0, "File:Not an object.jpg")
            pages.append({"pageid": 1, "index": "first", "title": 5, "imageinfo": [None]})
        return body

    commons.answer = hostile
    commons.lagged = 0
    commons.corrupt_sha1 = set()
    calls = []
    original = commons.answer

    def lagging_once(params):
        calls.append(params)
        if len(calls) == 1:
            return {"error": {"code": "maxlag", "info": "lagged", "lag": -5}}
        return original(params)

    commons.answer = lagging_once
    output = tmp_path / "out"
    status, out, err = harvest("run", recipe_file(recipe(commons, output)), "--no-progress")
    assert status == 0, out + err  # the bad items are rejected, as a page with no URL
    stored = {r["source_id"] for r in read_jsonl(output / "records.jsonl")}
    assert stored == {str(9000 + i) for i in range(11) if i not in (1, 2)}
    assert "bad item in the answer (ValueError: sha1 is not 40 hexadecimal digits)" in out
    assert "bad item in the answer (KeyError: 0)" in out
    assert "bad item in the answer (AttributeError: 'str' object has no attribute 'get')" in out
    assert "unexpected" not in out
