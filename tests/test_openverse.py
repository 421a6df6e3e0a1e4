"""The openverse source against a local server answering as Openverse's API documents:
/v1/images/ (paged JSON, the 20-page depth cap, the anonymous page_size limit) and
/v1/auth_tokens/token/ (OAuth2 client credentials)."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import read_jsonl
from fakes import QuietHandler, serve_in_thread
from imagegen import make_image


class FakeOpenverse:
    def __init__(self, total: int = 70):
        self.total = total
        self.queries: list[dict] = []
        self.tokens_issued = 0
        self.second_page = None  # a function answering page 2 instead, when set
        fake = self

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802
                body = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                if urlsplit(self.path).path != "/v1/auth_tokens/token/":
                    return self.reply_json({}, 404)
                if body.get("client_secret") != ["s3cret"]:
                    return self.reply_json({"error": "invalid_client"}, 401)
                fake.tokens_issued += 1
                self.reply_json({"access_token": "tok-1", "token_type": "Bearer",
                                 "expires_in": 36000, "scope": "read write"})

            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                if parts.path.startswith("/img/"):
                    data = make_image(int(parts.path.split("/")[-1].split(".")[0]))
                    return self.reply(200, data, "image/jpeg")
                if parts.path != "/v1/images/":
                    return self.reply_json({}, 404)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                query["authorization"] = self.headers.get("Authorization")
                fake.queries.append(query)
                size = int(query.get("page_size", 20))
                if size > 20 and query["authorization"] != "Bearer tok-1":
                    return self.reply_json({"detail": "page_size over 20 needs auth"}, 401)
                page = int(query.get("page", 1))
                if page == 2 and fake.second_page is not None:
                    return fake.second_page(self)
                if page > 20:
                    return self.reply_json({"detail": "page depth"}, 400)
                first = (page - 1) * size
                results = [fake.result(i) for i in range(first, min(first + size, fake.total))]
                self.reply_json({"result_count": fake.total, "page": page, "page_size": size,
                                 "page_count": min(20, -(-fake.total // size)),
                                 "results": results})

        self.server, self.base = serve_in_thread(Handler)

    def result(self, i: int) -> dict:
        license_code, version = [("by", "2.0"), ("by-sa", "4.0"), ("cc0", "1.0"),
                                 ("pdm", "")][i % 4]
        return {"id": f"a0b1c2d3-{i:04d}", "title": f"Monkey {i}",
                "foreign_landing_url": f"https://www.flickr.com/photos/x/{i}",
                "url": f"{self.base}/img/{1000 + i}.jpg", "creator": f"Photographer {i}",
                "creator_url": f"https://www.flickr.com/photos/p{i}", "license": license_code,
                "license_version": version,
                "license_url": f"https://creativecommons.org/licenses/{license_code}/{version}/",
                "provider": "flickr", "source": "flickr", "category": "photograph",
                "filesize": None, "filetype": "jpg",
                "tags": [{"name": "monkey", "accuracy": None}, {"name": "zoo"}],
                "attribution": f"\"Monkey {i}\" by Photographer {i}", "mature": False,
                "height": 64, "width": 96, "thumbnail": "", "detail_url": "",
                "related_url": ""}


@pytest.fixture
def openverse():
    fake = FakeOpenverse()
    yield fake
    fake.server.shutdown()


def recipe(openverse, output, options: str = "") -> str:
    return f"""
terms: [monkey]
output: {output}
run: {{allow_private_addresses: true, rate_per_host: 1000}}
sources:
  - use: openverse
    options: {{endpoint: "{openverse.base}", requests_per_second: 100, count: 50{options}}}
enrichers: [license]
sinks: [jsonl]
"""


def test_anonymous_search_with_licenses_and_credits(openverse, recipe_file, harvest, tmp_path):
    output = tmp_path / "out"
    status, _, err = harvest("run", recipe_file(recipe(
        openverse, output, ", license: [by, by-sa, cc0, pdm], license_type: [commercial]")),
        "--no-progress")
    assert status == 0, err
    records = read_jsonl(output / "records.jsonl")
    assert len(records) == 50
    assert [q["page"] for q in openverse.queries] == ["1", "2", "3"]
    assert openverse.queries[0]["license"] == "by,by-sa,cc0,pdm"
    assert openverse.queries[0]["license_type"] == "commercial"
    assert openverse.queries[0]["mature"] == "false" and openverse.queries[0]["q"] == "monkey"
    assert openverse.queries[0]["authorization"] is None
    by_title = {r["title"]: r for r in records}
    assert by_title["Monkey 0"]["license"] == "CC-BY-2.0"
    assert by_title["Monkey 1"]["license"] == "CC-BY-SA-4.0"
    assert by_title["Monkey 2"]["license"] == "CC0-1.0" and by_title["Monkey 3"]["license"] == "PDM-1.0"
    assert by_title["Monkey 0"]["page_url"] == "https://www.flickr.com/photos/x/0"
    assert by_title["Monkey 0"]["tags"] == ["monkey", "zoo"]
    assert "author" not in by_title["Monkey 0"]  # the creator's name is personal: omitted
    status, out, _ = harvest("credits", output)
    assert status == 0


def test_client_credentials_and_the_page_depth_cap(openverse, recipe_file, harvest, tmp_path,
                                                   monkeypatch):
    openverse.total = 100_000
    monkeypatch.setenv("OV_ID", "my-app")
    monkeypatch.setenv("OV_SECRET", "s3cret")
    output = tmp_path / "out"
    text = recipe(openverse, output, ", client_id: '${OV_ID}', client_secret: '${OV_SECRET}', "
                                     "page_size: 5").replace("count: 50", "count: 1000")
    status, _, err = harvest("run", recipe_file(text), "--no-progress")
    assert status == 0, err
    assert len(read_jsonl(output / "records.jsonl")) == 100  # 20 pages of 5: the cap
    assert openverse.tokens_issued == 1
    assert {q["authorization"] for q in openverse.queries} == {"Bearer tok-1"}
    assert max(int(q["page"]) for q in openverse.queries) == 20


def test_bad_openverse_options_are_one_line_errors(openverse, recipe_file, harvest, tmp_path,
                                                   monkeypatch):
    status, _, err = harvest("validate", recipe_file(recipe(openverse, tmp_path / "o",
                                                            ", page_size: 100")))
    assert status == 2 and "page_size" in err and "client credentials" in err
    monkeypatch.setenv("OV_ID", "my-app")
    monkeypatch.setenv("OV_SECRET", "wrong")
    text = recipe(openverse, tmp_path / "o2", ", client_id: '${OV_ID}', client_secret: '${OV_SECRET}'")
    status, _, err = harvest("run", recipe_file(text, "r2.yml"), "--no-progress")
    assert status == 2 and "refused the client credentials" in err
    assert "wrong" not in err


def drip(handler):
    body = b'{"results": [], "page_count": 3}' + b" " * 10_000
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for byte in body:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(0.05)


def huge(handler, declared: bool):
    results = b'{"results": [' + b",".join([b'{"id": "x", "title": "' + b"m" * 1000 + b'"}'] * 40_000)
    body = results + b'], "page_count": 3}'
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    if declared:
        handler.send_header("Content-Length", str(len(body)))
    else:
        handler.close_connection = True
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("answer, why", [
    (drip, "API answer took longer than run.api_deadline (2 s)"),
    (lambda handler: huge(handler, True), "API answer larger than run.max_api_answer"),
    (lambda handler: huge(handler, False), "API answer larger than run.max_api_answer"),
])
def test_a_dripping_or_huge_answer_is_bounded(answer, why, openverse, recipe_file, harvest,
                                              tmp_path):
    """An answer dripping a byte at a time never tripped the read timeout (it restarts on
    each byte), and a 400 MB answer took 1.35 GB of memory: each API call now has a
    deadline for the whole answer and a size cap. The search is reported as failed (exit
    3, one line why); what page 1 found is stored."""
    openverse.second_page = answer
    output = tmp_path / "out"
    text = recipe(openverse, output).replace(
        "rate_per_host: 1000}", "rate_per_host: 1000, api_deadline: 2, max_api_answer: 1MB}")
    started = time.monotonic()
    status, out, err = harvest("run", recipe_file(text), "--no-progress")
    assert time.monotonic() - started < 20
    assert status == 3, out + err
    assert why in out, out
    assert len(read_jsonl(output / "records.jsonl")) == 20


def test_bad_results_are_skipped_with_their_reason(openverse, recipe_file, harvest, tmp_path):
    """A result that is not an object, a url that is a number or tags that are not a list
    ended the whole search; each is now skipped with its reason and the rest stored."""
    good = openverse.result
    bad = {0: "not an object", 1: {**good(1), "url": 5}, 2: {**good(2), "tags": 7}}
    openverse.result = lambda i: bad.get(i) or good(i)
    output = tmp_path / "out"
    status, out, err = harvest("run", recipe_file(recipe(openverse, output)), "--no-progress")
    assert status == 0, out + err
    records = read_jsonl(output / "records.jsonl")
    assert len(records) == 50 and "Monkey 1" not in {r["title"] for r in records}
    for reason in ("AttributeError: 'str' object has no attribute 'get'",
                   "TypeError: url is a int", "TypeError: 'int' object is not iterable"):
        assert f"bad item in the answer ({reason})" in out, out
