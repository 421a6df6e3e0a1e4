"""The download and store pipeline's error paths, each judged by its outcome."""

from __future__ import annotations

import io
import json
import random

import pytest
from conftest import FakePhoto, flickr_recipe, monkey_photos, read_jsonl
from imagegen import make_image, truncated_jpeg
from PIL import Image

from harvest.core.output.storage import image_relpath, inside, safe_component


def last_run(output) -> dict:
    return json.loads((output / ".harvest" / "last-run.json").read_text(encoding="utf-8"))


def failures(output) -> dict[str, int]:
    return {f["reason"]: f["count"] for f in last_run(output)["failures"]}


def run_flickr(harvest, recipe_file, flickr, output, run="", options="", expect=0):
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, run=run, options=options))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == expect, err
    return out


def test_429_storm_is_waited_out_honouring_retry_after(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(6)
    flickr.image_script = {p.id: [429, 429] for p in flickr.photos}
    flickr.retry_after = "1"
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output, run="concurrency: 6")
    assert len(read_jsonl(output / "records.jsonl")) == 6
    totals = last_run(output)["totals"]
    assert totals["stored"] == 6 and totals["failed"] == 0
    times = [t for t, _, path, _ in flickr.server.requests if path == "/img/1001_l.jpg"]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95  # Retry-After: 1


def test_persistent_5xx_fails_the_record_and_the_next_run_retries_it(flickr, recipe_file,
                                                                      harvest, tmp_path):
    flickr.photos = monkey_photos(4)
    flickr.image_script = {"1002": [503] * 10}
    output = tmp_path / "out"
    out = run_flickr(harvest, recipe_file, flickr, output, run="retries: 2", expect=3)
    assert out.startswith("harvest flickr-test: incomplete")
    assert failures(output) == {"HTTP 503": 1}
    assert last_run(output)["totals"]["failed"] == 1
    assert "1 record(s) not finished; run again" in out
    flickr.image_script = {}
    run_flickr(harvest, recipe_file, flickr, output, run="retries: 2")
    ids = [r["source_id"] for r in read_jsonl(output / "records.jsonl")]
    assert sorted(ids) == ["1001", "1002", "1003", "1004"]


def test_bad_images_are_rejected_with_reasons(flickr, recipe_file, harvest, tmp_path):
    noise = io.BytesIO()
    Image.frombytes("RGB", (300, 300), random.Random(1).randbytes(300 * 300 * 3)).save(noise, "JPEG")
    assert len(noise.getvalue()) > 40_000
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, "PNG")
    flickr.photos = monkey_photos(2) + [
        FakePhoto(id="20", title="monkey truncated", image=truncated_jpeg()),
        FakePhoto(id="21", title="monkey html"),
        FakePhoto(id="22", title="monkey huge file", image=noise.getvalue()),
        FakePhoto(id="23", title="monkey bomb", image=bomb.getvalue()),
        FakePhoto(id="24", title="monkey gone"),
        FakePhoto(id="25", title="monkey not an image", image=b"GIF89a but not really" * 10),
    ]
    flickr.content_types = {"21": "text/html; charset=utf-8"}
    flickr.image_script = {"24": [404]}
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output,
               run="max_bytes: 40KB\nmax_pixels: 1000000")
    stored = {r["source_id"] for r in read_jsonl(output / "records.jsonl")}
    assert stored == {"1001", "1002"}
    reasons = failures(output)
    assert any(r.startswith("corrupt image: image file is truncated") for r in reasons)
    assert "not an image: Content-Type text/html" in reasons
    assert any(r.startswith("too large") for r in reasons)
    assert any(r.startswith("decompression-bomb guard: 3000x3000") for r in reasons)
    assert "HTTP 404" in reasons
    assert any(r.startswith("not an image") and "identify" in r for r in reasons)
    assert last_run(output)["totals"]["rejected"] == 6
    assert len(list((output / "images").rglob("*.*"))) == 2
    assert not list((output / ".harvest").glob("tmp/*"))


def test_rejected_records_are_not_fetched_again(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(1) + [FakePhoto(id="20", title="monkey bad",
                                                  image=truncated_jpeg())]
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output)
    before = flickr.image_requests()
    run_flickr(harvest, recipe_file, flickr, output)
    assert flickr.image_requests() == before
    assert last_run(output)["totals"]["skipped"] == 2


def test_same_bytes_from_two_urls_are_stored_once(flickr, recipe_file, harvest, tmp_path):
    same = make_image(42)
    flickr.photos = [FakePhoto(id="1", title="monkey", image=same),
                     FakePhoto(id="2", title="monkey again", image=same),
                     FakePhoto(id="3", title="monkey other")]
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output, run="concurrency: 1")
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert len(records) == 3
    assert records["1"]["file"]["path"] == records["2"]["file"]["path"]
    assert records["2"]["duplicate_of"] == "flickr:1"
    assert "duplicate_of" not in records["1"]
    assert len(list((output / "images").rglob("*.jpg"))) == 2
    assert last_run(output)["totals"]["duplicate"] == 1


def test_summary_counts_per_source_and_term(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(3) + [FakePhoto(id="7", title="cage", image=truncated_jpeg())]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, terms="[monkey, cage]"))
    status, out, _ = harvest("run", recipe, "--no-progress")
    assert status == 0
    rows = {row["term"]: row for row in last_run(output)["by_source_term"]}
    assert rows["monkey"]["found"] == 3 and rows["monkey"]["stored"] == 3
    assert rows["cage"]["found"] == 1 and rows["cage"]["rejected"] == 1
    assert "reasons:" in out and "flickr download: corrupt image" in out


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "..", "a/../../b", "C:\\Windows\\x",
                                     "CON", "nul.txt", "name\x00with\x1fcontrol", " . ",
                                     "猿" * 200, "a:b*c?d|e<f>g\"h"])
def test_hostile_ids_stay_inside_the_output_folder(hostile, tmp_path):
    relpath = image_relpath(hostile, "flickr", hostile, "JPEG")
    target = inside(tmp_path, relpath)
    assert tmp_path in target.parents
    parts = relpath.split("/")
    assert len(parts) == 3 and parts[0] == "images"
    for part in parts[1:]:
        assert part not in ("", ".", "..")
        assert not set(part) & set('<>:"/\\|?*')
        assert len(part.encode("utf-8")) <= 110
        assert part.split(".")[0].upper() not in ("CON", "NUL")


def test_unicode_names_are_kept_readable():
    assert safe_component("猿 と 檻") == "猿 と 檻"
    assert safe_component("قرد") == "قرد"
    assert safe_component("e\u0301") == "é"  # NFC, as macOS and Windows users would type it


def test_inside_refuses_escapes(tmp_path):
    with pytest.raises(ValueError):
        inside(tmp_path, "../outside.jpg")


@pytest.mark.parametrize("workers", [1, 3])
def test_requests_to_one_host_respect_the_rate_limit(workers, flickr, recipe_file, harvest,
                                                     tmp_path):
    """The limit holds for the run, whether its downloads run in threads here or in
    several worker processes (each takes its share of the rate)."""
    flickr.photos = monkey_photos(8)
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output,
               run=f"concurrency: 8\nrate_per_host: 10\nworkers: {workers}")
    times = sorted(t for t, _, path, _ in flickr.server.requests if path.startswith("/img/"))
    assert len(times) == 8
    # Eight concurrent downloads at 10 requests/s: 0.1 s apart, not in bursts, even when
    # several processes download (they share one pacing per host).
    assert times[-1] - times[0] >= 0.7 * 0.9, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.08, gaps


def test_term_key_is_the_first_english_wording(recipe_file, harvest, monkeypatch):
    from harvest.core.contract.recipe import load_recipe
    from harvest.core.contract.registry import load_registry

    path = recipe_file("terms:\n  - {ja: 猿, en: [ape, primate]}\n  - {fr: cage}\n"
                       "output: out\nsources: [{use: folder, options: {path: .}}]\n")
    recipe = load_recipe(path, load_registry())
    assert [t.key for t in recipe.terms] == ["ape", "cage"]
    assert recipe.terms[0].queries == (("ja", "猿"), ("en", "ape"), ("en", "primate"))


def test_loopback_image_urls_are_refused_by_default(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(2)
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output, run="allow_private_addresses: false")
    assert not (output / "records.jsonl").read_text()
    assert failures(output) == {
        "refused: 127.0.0.1 resolves to non-public address 127.0.0.1 "
        "(run.allow_private_addresses allows it)": 2}
    assert flickr.image_requests() == 0


@pytest.mark.parametrize("url", ["http://localhost/a.jpg", "http://10.1.2.3/a.jpg",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/a.jpg",
                                 "http://192.168.0.10/a.jpg", "http://0.0.0.0/a.jpg"])
def test_private_addresses(url):
    from harvest.core.download.fetch import refuse_private
    from harvest.core.errors import RecordError

    with pytest.raises(RecordError, match="non-public address"):
        refuse_private(url)


def test_public_address_passes():
    from harvest.core.download.fetch import refuse_private

    refuse_private("http://8.8.8.8/a.jpg")  # an IP literal: no DNS needed


def test_redirects_are_followed_and_bounded(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(2)
    flickr.redirects = {"/img/1001_l.jpg": "/img/1001_m.jpg"}
    flickr.redirects.update({f"/img/loop{i}": f"/img/loop{i + 1}" for i in range(10)})
    flickr.redirects["/img/1002_l.jpg"] = "/img/loop0"
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output)
    [record] = read_jsonl(output / "records.jsonl")
    assert record["source_id"] == "1001" and record["file"]["width"] == 80
    assert failures(output) == {"more than 5 redirects": 1}


def test_ai_opt_outs_are_respected(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(4)
    flickr.image_headers = {"1001": {"X-Robots-Tag": "noai"},
                            "1002": {"X-Robots-Tag": "noindex, NoImageAI"},
                            "1003": {"X-Robots-Tag": "otherbot: noai"}}
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output)
    assert sorted(r["source_id"] for r in read_jsonl(output / "records.jsonl")) == ["1003", "1004"]
    assert failures(output) == {"opted out of AI use: X-Robots-Tag noai": 1,
                                "opted out of AI use: X-Robots-Tag noimageai": 1}
    output = tmp_path / "out2"
    run_flickr(harvest, recipe_file, flickr, output, run="respect_opt_outs: false")
    assert len(read_jsonl(output / "records.jsonl")) == 4


def test_a_recipe_change_that_lets_refused_records_through_is_not_skipped(
        flickr, recipe_file, harvest, tmp_path):
    """A run refused loopback URLs; after allow_private_addresses: true the next run said
    'skipped 2', exit 0, and stored nothing. The settings a refusal depended on are kept
    in the run state: when they change, what that stage refused goes through again."""
    flickr.photos = monkey_photos(2)
    output = tmp_path / "out"
    run_flickr(harvest, recipe_file, flickr, output, run="allow_private_addresses: false")
    assert not (output / "records.jsonl").read_text()
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    assert len(read_jsonl(output / "records.jsonl")) == 2
    assert ("download: run.allow_private_addresses changed since the last run: the 2 "
            "record(s) it rejected or dropped go through again") in err
    # Unchanged, a record the recipe refuses stays refused and is not asked again.
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0 and "changed since the last run" not in err
    assert last_run(output)["totals"]["skipped"] == 2 and flickr.image_requests() == 2


def test_an_enricher_whose_options_changed_reconsiders_what_it_dropped(
        flickr, recipe_file, harvest, tmp_path):
    """Loosening a license filter brings back what it dropped; what another stage refused
    (a 404) is not asked again."""
    flickr.photos = [FakePhoto(id=str(i), title="x") for i in range(1, 5)]
    base = flickr.url + "/img/"
    (tmp_path / "list.csv").write_text(
        f"url,license\n{base}1_l.jpg,CC-BY-4.0\n{base}2_l.jpg,CC-BY-4.0\n"
        f"{base}3_l.jpg,CC-BY-NC-4.0\n{base}4_l.jpg,CC-BY-NC-4.0\n{base}99_l.jpg,CC-BY-4.0\n")
    output = tmp_path / "out"

    def run(allow: str) -> str:
        recipe = recipe_file(f"""
output: {output}
run: {{allow_private_addresses: true, retries: 0}}
sources: [{{use: urls, options: {{path: list.csv}}}}]
enrichers:
  - use: license
    options: {{allow: [{allow}]}}
""")
        status, out, err = harvest("run", recipe, "--no-progress")
        assert status == 0, err
        return err

    run("CC-BY")
    assert len(read_jsonl(output / "records.jsonl")) == 2
    assert flickr.image_requests() == 5
    err = run("CC-BY, CC-BY-NC")
    assert ("enrich license: options.allow changed since the last run: the 2 record(s) it "
            "rejected or dropped go through again") in err
    assert len(read_jsonl(output / "records.jsonl")) == 4
    assert flickr.image_requests() == 5 + 2  # not the 404 again
