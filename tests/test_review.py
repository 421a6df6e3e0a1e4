"""`harvest review` as a user uses it: the server started on a free port, the page driven in
headless Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl
from fakes import FakeVision, LocalServer
from imagegen import coloured_image
from mongo_server import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HARVEST = os.path.join(os.path.dirname(sys.executable), "harvest")
needs_browser = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                   reason="Chromium is not installed (.ci/run installs it)")
RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


def vision_harvest(tmp_path, harvest, monkeypatch, counts: tuple[int, int, int],
                   enrichers: str, copies=()) -> Path:
    """A folder of red, blue and green pictures (``counts`` of each), plus ``copies``
    (name, size, JPEG quality) of the first red one, harvested with ``enrichers`` against
    the Cloud Vision stand-in (``{vision}``: its endpoint)."""
    import io

    from PIL import Image

    vision = FakeVision().start()
    monkeypatch.setenv("GOOGLE_VISION_KEY", vision.api_key)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    colours = [("red", RED)] * counts[0] + [("blue", BLUE)] * counts[1] + [("green", GREEN)] * counts[2]
    for index, (name, colour) in enumerate(colours):
        (gallery / f"{name}-{index:02d}.jpg").write_bytes(coloured_image(colour, index, (320, 240)))
    for name, size, quality in copies:
        out = io.BytesIO()
        Image.open(gallery / "red-00.jpg").resize(size).save(out, "JPEG", quality=quality)
        (gallery / f"{name}.jpg").write_bytes(out.getvalue())
    output = tmp_path / "out"
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"""
terms: [monkey, cage]
output: {output}
sources: [{{use: folder, options: {{path: {gallery}}}}}]
enrichers:
{enrichers.format(vision=vision.url)}
""")
    try:
        status, _, err = harvest("run", recipe, "--no-progress")
    finally:
        vision.stop()
    assert status == 0, err
    return output


@pytest.fixture
def scored_harvest(tmp_path, harvest, monkeypatch):
    return vision_harvest(tmp_path, harvest, monkeypatch, (6, 4, 2), """
  - use: vision
    options: {{endpoint: {vision}, synonyms: {{monkey: [macaque]}}}}""")


def start_review(output: Path, port: int, cwd=None) -> subprocess.Popen:
    """Starts the server; ``process.url`` is the address it printed (with its token)."""
    process = subprocess.Popen([HARVEST, "review", str(output), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=cwd)
    line = process.stdout.readline()
    assert "harvest review:" in line, (line, process.communicate())
    process.url = line.split(" at ", 1)[1].split()[0]
    process.token = process.url.split("token=", 1)[1]
    process.port = port
    process.base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(process.url, timeout=1).read()
            return process
        except OSError:
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
    process.kill()
    raise AssertionError("harvest review did not start")


@pytest.fixture
def review_server():
    """``review_server(output, cwd=None)``: a running ``harvest review`` on a free port,
    stopped when the test ends."""
    started = []

    def start(output: Path, cwd=None) -> subprocess.Popen:
        started.append(start_review(output, free_port(), cwd))
        return started[-1]

    yield start
    for server in started:
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def review_page(server, width: int = 1280, height: int = 900):
    """The review page in headless Chromium, loaded and ready."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=yes]")
        yield page
        browser.close()


def launch(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"])


@needs_browser
def test_review_page_thresholds_decisions_and_save(scored_harvest, tmp_path, harvest,
                                                   review_server):
    from playwright.sync_api import expect

    output = scored_harvest
    (output / read_jsonl(output / "records.jsonl")[-1]["file"]["path"]).write_bytes(b"\xff\xd8broken")
    server = review_server(output)
    with review_page(server) as page:
        expect(page.locator("#kept")).to_have_text("12")
        expect(page.locator("#dropped")).to_have_text("0")
        assert page.locator(".tile").count() == 12

        page.locator("#slider-monkey").fill("0.6")  # keep monkey >= 0.6: the red ones
        expect(page.locator("#kept")).to_have_text("6")
        expect(page.locator("#dropped")).to_have_text("6")
        expect(page.locator(".tile.dropped")).to_have_count(6)
        histogram = page.locator("#slider-monkey ~ svg rect")
        assert histogram.count() == 40  # 20 bins, each split into kept and dropped

        rejected_id = page.locator(".tile.kept").first.get_attribute("data-id")
        page.locator(".tile.kept").first.click()
        expect(page.locator("#detail")).to_be_visible()
        page.locator("#do-reject").click()
        expect(page.locator("#kept")).to_have_text("5")
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)

        page.locator("#slider-monkey").fill("0")
        expect(page.locator("#kept")).to_have_text("11")
        page.reload()  # every change applied at once: the same page comes back
        page.wait_for_selector("body[data-ready=yes]")
        expect(page.locator("#kept")).to_have_text("11")
        rejected = page.locator(f'.tile[data-id="{rejected_id}"]')
        expect(rejected).to_have_attribute("data-manual", "rejected by hand")

        page.locator("#slider-cage").fill("0.5")
        page.locator("#slider-cage").locator("xpath=..").locator("select").select_option("<")
        expect(page.locator("#kept")).to_have_text("7")  # all but 4 cages and the rejection
        page.keyboard.press("Escape")
        page.locator("#save").click()
        expect(page.locator("#status")).to_contain_text("review-recipe.yml")
        broken = page.request.get(f"http://127.0.0.1:{server.port}/thumb/"
                                  + read_jsonl(output / "records.jsonl")[-1]["file"]["sha256"]
                                  + f"?token={server.token}")
        assert broken.ok and "unreadable image" in broken.text()
    assert (tmp_path / "review.png").stat().st_size > 10_000
    snippet = yaml.safe_load((output / "review-recipe.yml").read_text(encoding="utf-8"))
    assert snippet == {"keep_if": {"cage": "<0.5"}}
    saved = json.loads((output / ".harvest" / "review.json").read_text())
    assert saved["decisions"] == {rejected_id: "reject"}
    status, out, _ = harvest("export", output, tmp_path / "dataset", "--format", "manifest")
    assert status == 0 and "7 images" in out  # export applies what was chosen on the page


def test_not_a_harvest_and_port_in_use(tmp_path, scored_harvest, review_server):
    done = subprocess.run([HARVEST, "review", str(tmp_path / "nothing")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "not a harvest output folder" in done.stderr
    server = review_server(scored_harvest)
    done = subprocess.run([HARVEST, "review", str(scored_harvest), "--port", str(server.port)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"port {server.port} on 127.0.0.1 is in use" in done.stderr


def request(url: str, *, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    call = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_other_pages_cannot_drive_or_read_the_review(scored_harvest, tmp_path, review_server):
    """CSRF and DNS rebinding: without the token, from another origin, with a form's
    text/plain body or a foreign Host, nothing is read and nothing changes."""
    server = review_server(scored_harvest)
    base, token = server.base, server.token
    record_id = read_jsonl(scored_harvest / "records.jsonl")[0]["id"]
    decision = json.dumps({"id": record_id, "decision": "reject"}).encode()
    assert request(f"{base}/api/meta")[0] == 403  # no token
    status, page = request(f"{base}/")  # a person who opened the address without its token
    assert status == 403 and b"carries a token" in page and b"<p" in page
    assert b"data-ready" not in page and token.encode() not in page
    assert request(f"{base}/api/meta?token=wrong")[0] == 403
    assert request(f"{base}/api/meta", headers={"X-Harvest-Token": token})[0] == 200
    # A form on another site can post text/plain without a preflight: refused.
    status, _ = request(f"{base}/api/decision?token={token}", method="POST", body=decision,
                        headers={"Content-Type": "text/plain"})
    assert status == 415
    status, _ = request(f"{base}/api/decision?token={token}", method="POST", body=decision,
                        headers={"Content-Type": "application/json",
                                 "Origin": "http://evil.example:8000"})
    assert status == 403
    # DNS rebinding: the attacker's name resolves here, the Host header says so.
    status, _ = request(f"{base}/api/meta?token={token}",
                        headers={"Host": f"evil.example:{server.port}"})
    assert status == 403
    assert not (scored_harvest / ".harvest" / "review.sqlite").exists() or \
        "reject" not in json.dumps(request(f"{base}/api/record/{record_id}?token={token}")[1]
                                   .decode())
    # The page itself, from its own origin, with the token: accepted.
    status, _ = request(f"{base}/api/decision", method="POST", body=decision,
                        headers={"Content-Type": "application/json", "Origin": base,
                                 "X-Harvest-Token": token})
    assert status == 200
    done = subprocess.run([HARVEST, "review", str(scored_harvest), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--allow-remote" in done.stderr


def test_relative_path_and_export_equals_the_page(scored_harvest, tmp_path, harvest, review_server):
    """Started as the README says (a relative path), every thumbnail is served; after any
    decisions and threshold changes, with or without Save, export writes what the page
    counts as kept."""
    server = review_server(Path(os.path.relpath(scored_harvest, tmp_path)), cwd=tmp_path)
    base, token = server.base, server.token
    headers = {"Content-Type": "application/json", "X-Harvest-Token": token}
    records = read_jsonl(scored_harvest / "records.jsonl")
    for record in records:
        status, body = request(f"{base}/thumb/{record['file']['sha256']}?token={token}")
        assert status == 200 and body[:2] == b"\xff\xd8", record["id"]
    rules = {"monkey": {"value": 0.6, "direction": "above", "enabled": True}}
    request(f"{base}/api/save", method="POST", body=json.dumps({"thresholds": rules})
            .encode(), headers=headers)
    for record in records[:3]:  # decisions after Save
        request(f"{base}/api/decision", method="POST", headers=headers,
                body=json.dumps({"id": record["id"], "decision": "keep"}).encode())
    status, body = request(f"{base}/api/view", method="POST", headers=headers,
                           body=json.dumps({"thresholds": rules}).encode())
    page_kept = json.loads(body)["kept"]
    status, out, _ = harvest("export", scored_harvest, tmp_path / "dataset", "--format",
                             "manifest")
    assert status == 0 and f"{page_kept} images" in out, (page_kept, out)


@pytest.fixture
def cleaned_harvest(tmp_path, harvest, monkeypatch):
    """Scored by Vision with the recipe's keep_if, by quality (scores only: its default
    rules, made for photos, would flag these flat colours), and near-duplicates marked: a
    red picture is there three times (as taken, half size, JPEG quality 30)."""
    return vision_harvest(tmp_path, harvest, monkeypatch, (8, 6, 4), """
  - use: vision
    options: {{endpoint: {vision}, synonyms: {{monkey: [macaque]}}, keep_if: {{monkey: ">=0.5"}}}}
  - {{use: quality, options: {{defaults: false}}}}
  - near_duplicates""", copies=(("copy-half", (160, 120), 90), ("copy-q30", (320, 240), 30)))


def api(base: str, token: str, path: str, body=None):
    headers = {"X-Harvest-Token": token}
    if body is not None:
        headers["Content-Type"] = "application/json"
    status, answer = request(f"{base}{path}", method="POST" if body is not None else "GET",
                             body=None if body is None else json.dumps(body).encode(),
                             headers=headers)
    assert status == 200, (path, answer)
    return json.loads(answer)


def exported_ids(harvest, output: Path, destination: Path) -> set[str]:
    status, _, err = harvest("export", output, destination, "--format", "manifest")
    assert status == 0, err
    return {json.loads(line)["id"] for line in
            (destination / "manifest.jsonl").read_text().splitlines()}


def test_export_equals_the_page_after_any_sequence_of_actions(cleaned_harvest, tmp_path,
                                                               harvest, review_server):
    """Random sequences of decisions, undos and threshold changes (scores, quality, none
    at all): after each sequence, the ids the page counts as kept are the ids export
    writes. The page starts from the recipe's keep_if, near-duplicates left out."""
    import random

    from harvest.core.cleaning.curation import set_aside_ids

    server = review_server(cleaned_harvest)
    base, token = server.base, server.token
    records = [r for r in read_jsonl(cleaned_harvest / "records.jsonl")]
    ids = [r["id"] for r in records]
    meta = api(base, token, "/api/meta")
    keys = [k["key"] for k in meta["keys"]]
    assert meta["thresholds"] == {"monkey": {"op": ">=", "value": 0.5, "enabled": True}}
    assert "quality.blur" in keys and "quality.entropy" in keys and meta["groups"] >= 1

    def page_kept() -> set[str]:
        view = api(base, token, "/api/view", {"limit": 1000})
        assert view["kept"] + view["dropped"] == len(ids)
        return {item["id"] for item in view["items"] if item["kept"]}

    untouched = page_kept()
    copies = {r["id"] for r in records if r.get("near_duplicate_of")} \
        | set(set_aside_ids(cleaned_harvest))
    assert copies and not copies & untouched  # near-duplicates are left out
    assert untouched == {r["id"] for r in records if r.get("keep") is not False} - copies
    assert exported_ids(harvest, cleaned_harvest, tmp_path / "export-0") == untouched

    rng = random.Random(7)
    for sequence in range(1, 4):
        for _ in range(8):
            action = rng.choice(["decide", "decide", "threshold", "clear"])
            if action == "decide":
                api(base, token, "/api/decision", {"id": rng.choice(ids),
                                                   "decision": rng.choice(["keep", "reject", "none"])})
            elif action == "threshold":
                key = rng.choice(keys)
                info = next(k for k in meta["keys"] if k["key"] == key)
                value = rng.uniform(info["min"], info["max"])
                rules = api(base, token, "/api/meta")["thresholds"]
                rules[key] = {"op": rng.choice([">=", "<", ">", "<="]), "value": value,
                              "enabled": True}
                api(base, token, "/api/view", {"thresholds": rules, "limit": 1})
            else:
                api(base, token, "/api/view", {"thresholds": {}, "limit": 1})
        kept = page_kept()
        exported = exported_ids(harvest, cleaned_harvest, tmp_path / f"export-{sequence}")
        assert exported == kept, (sequence, api(base, token, "/api/meta")["thresholds"],
                                  {i: api(base, token, f"/api/record/{i}")["why"]
                                   for i in exported ^ kept})


def test_precision_and_recall_against_the_marks(cleaned_harvest, review_server):
    """Marks by hand are the truth the threshold is measured against; the best F1 is
    at least the current one, and its threshold reproduces it."""
    server = review_server(cleaned_harvest)
    base, token = server.base, server.token
    records = {r["id"]: r for r in read_jsonl(cleaned_harvest / "records.jsonl")}
    red = sorted(i for i, r in records.items() if "red" in i)[:3]
    green = sorted(i for i, r in records.items() if "green" in i)[:2]
    blue = sorted(i for i, r in records.items() if "blue" in i)[:2]
    for record_id in red:
        api(base, token, "/api/decision", {"id": record_id, "decision": "keep"})
    for record_id in green + blue:
        api(base, token, "/api/decision", {"id": record_id, "decision": "reject"})
    rules = {"monkey": {"op": ">=", "value": 0.5, "enabled": True}}
    view = api(base, token, "/api/view", {"thresholds": rules, "limit": 1})
    found = view["agreement"]["monkey"]
    # >= 0.5 keeps red (0.93) and green (0.55): 3 true, 2 false positives, none missed.
    assert found["marked"] == 7
    assert (found["precision"], found["recall"]) == (0.6, 1.0)
    assert found["best"]["f1"] == 1.0 and found["best"]["value"] > 0.55
    rules["monkey"]["value"] = found["best"]["value"]
    again = api(base, token, "/api/view", {"thresholds": rules, "limit": 1})
    assert again["agreement"]["monkey"]["f1"] == 1.0


@needs_browser
def test_sort_keyboard_undo_groups_and_detail(cleaned_harvest, tmp_path, harvest, review_server):
    from playwright.sync_api import expect

    server = review_server(cleaned_harvest)
    with review_page(server) as page:
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        expect(page.locator("#slider-monkey")).to_have_value("0.5")  # the recipe's keep_if
        total = page.locator(".tile").count()
        assert total == 20

        def redrawn(action):
            """Does ``action`` and waits until the grid is drawn from its answer."""
            before = int(page.evaluate("document.body.dataset.renders"))
            action()
            page.wait_for_function(f"Number(document.body.dataset.renders) > {before}")

        # Sort by the distance from the cut: the first pictures are the closest to it.
        redrawn(lambda: page.locator("#sort").select_option("margin:monkey|asc"))
        captions = page.locator(".tile .caption").all_inner_texts()
        margins = [abs(float(re.search(r"monkey ([0-9.]+)", c).group(1)) - 0.5)
                   for c in captions if re.search(r"monkey ([0-9.]+)", c)]
        assert margins == sorted(margins) and len(margins) == 20
        redrawn(lambda: page.locator("#sort").select_option("quality.blur|desc"))
        blurs = [float(re.search(r"quality.blur ([0-9.]+)", c).group(1))
                 for c in page.locator(".tile").evaluate_all(
                     "tiles => tiles.map(t => t.querySelector('.caption').textContent)")]
        assert blurs == sorted(blurs, reverse=True)

        # Keyboard: move, reject, undo, keep, open, next, close; the grid stays put.
        redrawn(lambda: page.locator("#sort").select_option(""))
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("x")  # no tile has the focus: nothing is decided
        page.wait_for_timeout(200)
        assert page.locator(".tile[data-manual]").count() == 0
        page.locator(".tile").first.focus()
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.dataset.index") == "1"
        columns = page.evaluate("Math.round(document.getElementById('grid').clientWidth"
                                " / (document.querySelector('.tile').offsetWidth + 8))")
        page.keyboard.press("ArrowDown")
        index = str(1 + columns)
        assert page.evaluate("document.activeElement.dataset.index") == index
        target = page.evaluate("document.activeElement.dataset.id")
        page.evaluate("window.scrollTo(0, 120)")
        scroll = page.evaluate("window.scrollY")
        page.keyboard.press("x")
        tile = page.locator(f'.tile[data-id="{target}"]')
        expect(tile).to_have_attribute("data-manual", "rejected by hand")
        expect(tile).to_have_class(re.compile("dropped"))
        assert page.evaluate("document.activeElement.dataset.index") == index
        assert page.evaluate("window.scrollY") == scroll
        page.keyboard.press("u")
        expect(tile).not_to_have_attribute("data-manual", "rejected by hand")
        page.keyboard.press("k")
        expect(tile).to_have_attribute("data-manual", "kept by hand")
        expect(tile.locator(".badge")).to_have_text("✓ kept by hand")
        page.keyboard.press("Enter")
        expect(page.locator("#detail")).to_be_visible()
        expect(page.locator("#verdict")).to_contain_text("kept by hand")
        expect(page.locator("#meta")).to_contain_text("file.sha256")  # a table, not JSON
        page.keyboard.press("ArrowRight")
        expect(page.locator("#meta")).not_to_contain_text(target)
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#meta")).to_contain_text(target)
        page.keyboard.press("Escape")
        expect(page.locator("#detail")).to_be_hidden()
        assert page.evaluate("document.activeElement.classList.contains('tile')")

        # Near-duplicate groups: shown side by side, the kept picture first.
        page.locator("#show").select_option("near-duplicates")
        expect(page.locator(".tile .group").first).to_be_visible()
        page.locator(".tile").first.click()
        copies = page.locator("#copies figure")
        expect(copies.first).to_be_visible()
        assert copies.count() >= 2
        expect(copies.first).to_have_class(re.compile("kept"))
        # Each copy shows why it is left out, unless it is the tile decided by key above
        # (which tile that is depends on the records' order): a manual decision wins.
        for i in range(1, copies.count()):
            decided = copies.nth(i).get_attribute("data-id") == target
            expect(copies.nth(i)).to_contain_text("kept by hand" if decided
                                                  else "near duplicate of")
        shots = os.environ.get("HARVEST_REVIEW_SCREENSHOTS")  # docs/img when refreshing
        page.screenshot(path=str(Path(shots or tmp_path) / "review-detail.png"))
        page.keyboard.press("Escape")

        # A quality slider: moving it changes the counts, the cut follows at once.
        page.locator("#show").select_option("all")
        kept_before = page.locator("#kept").inner_text()
        blur = page.locator('[id="slider-quality.blur"]')
        high = blur.get_attribute("max")
        blur.fill(high)
        expect(page.locator("#kept")).not_to_have_text(kept_before)
        assert page.locator('.term[data-key="quality.blur"] [data-role=cut]').count() == 1
        if shots:
            page.locator('.term[data-key="quality.blur"] [data-role=clear]').click()
            page.locator(".tile").first.focus()
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(500)
            page.screenshot(path=str(Path(shots) / "review-screenshot.png"))
        assert not errors, errors
        # After all of that, export writes exactly the pictures the page shows as kept.
        redrawn(lambda: page.locator("#show").select_option("kept"))
        shown_kept = set(page.locator(".tile").evaluate_all("t => t.map(x => x.dataset.id)"))
        assert len(shown_kept) == int(page.locator("#kept").inner_text())
    assert exported_ids(harvest, cleaned_harvest, tmp_path / "dataset") == shown_kept


@needs_browser
def test_narrow_window_and_labelled_controls(scored_harvest, review_server):
    from playwright.sync_api import expect

    server = review_server(scored_harvest)
    with review_page(server, 800, 700) as page:
        assert page.evaluate("document.documentElement.scrollWidth") <= 800
        expect(page.locator("#sidebar")).to_be_hidden()
        page.locator("#toggle-sidebar").click()
        expect(page.locator("#sidebar")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 800
        # Every control has a name a screen reader can say.
        unnamed = page.evaluate("""[...document.querySelectorAll('input, select, button')]
            .filter((el) => !(el.getAttribute('aria-label') || el.labels?.length
                              || el.textContent.trim())).map((el) => el.outerHTML)""")
        assert unnamed == []
        # Kept and dropped are told by text, not only by colour.
        assert page.locator(".tile .badge").first.inner_text() in ("✓ kept", "✕ dropped")


@needs_browser
def test_a_page_on_another_origin_cannot_drive_the_review(scored_harvest, review_server):
    """A web page the user visits (here on another local port) knows the review's port
    and even a record id; it tries a text/plain fetch, a JSON fetch, a form post and
    reading the records. Nothing changes, nothing is read."""
    from playwright.sync_api import sync_playwright

    record_id = read_jsonl(scored_harvest / "records.jsonl")[0]["id"]
    server = review_server(scored_harvest)
    target = server.base
    attack = f"""<!DOCTYPE html><html><body>
<form id="f" method="POST" action="{target}/api/decision" enctype="text/plain">
<input name='{{"id": "{record_id}", "decision": "reject", "x": "' value='"}}'></form>
<script>
window.results = [];
const body = JSON.stringify({{id: "{record_id}", decision: "reject"}});
async function attempt(name, promise) {{
  try {{ const r = await promise; window.results.push([name, r.type, r.status]); }}
  catch (e) {{ window.results.push([name, "error", String(e)]); }}
}}
(async () => {{
  await attempt("plain", fetch("{target}/api/decision", {{method: "POST", mode: "no-cors",
        headers: {{"Content-Type": "text/plain"}}, body}}));
  await attempt("json", fetch("{target}/api/decision", {{method: "POST",
        headers: {{"Content-Type": "application/json"}}, body}}));
  await attempt("read", fetch("{target}/api/meta").then((r) => r.json()));
  // Even with the token (a leaked link): a cross-origin text/plain post is refused.
  await attempt("plain+token", fetch("{target}/api/decision?token={{TOKEN}}", {{method: "POST",
        mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}}));
  document.body.dataset.done = "yes";
}})();
</script></body></html>"""
    attack = attack.replace("{TOKEN}", server.token)
    evil = LocalServer(lambda method, path, headers, body:
                       (200, {"Content-Type": "text/html"}, attack.encode())).start()
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page()
            page.goto(evil.url + "/")
            page.wait_for_selector("body[data-done=yes]")
            results = {name: rest for name, *rest in page.evaluate("window.results")}
            assert results["json"][0] == "error"  # the preflight fails: no CORS
            assert results["read"][0] == "error"
            with page.expect_navigation() as navigation:  # the classic form CSRF
                page.evaluate("document.getElementById('f').submit()")
            assert navigation.value.status == 403 and "token" in page.content()
            browser.close()
        decisions = api(target, server.token, f"/api/record/{record_id}")["decision"]
        assert decisions is None  # the record was never rejected
        status, body = request(f"{target}/api/view", method="POST", body=b"{}",
                               headers={"Content-Type": "application/json",
                                        "X-Harvest-Token": server.token})
        assert status == 200 and json.loads(body)["kept"] == 12
    finally:
        evil.stop()


def test_malformed_requests_are_one_line_400s(scored_harvest, review_server):
    """Requests the page never sends (wrong types, deep nesting, a huge thumbnail name, not
    JSON at all) are each answered 400 with one line naming what is wrong, never a
    traceback; the server answers normally afterwards."""
    server = review_server(scored_harvest)
    base, token = server.base, server.token
    headers = {"Content-Type": "application/json", "X-Harvest-Token": token}
    record_id = read_jsonl(scored_harvest / "records.jsonl")[0]["id"]
    deep = b"[" * 100_000 + b"]" * 100_000
    posts = [("/api/view", b'{"offset": "abc"}'), ("/api/view", b'{"filters": []}'),
             ("/api/view", b'{"limit": 1.5}'), ("/api/view", b'{"sort": "abc"}'),
             ("/api/view", b'{"thresholds": {"monkey": {"value": "high"}}}'),
             ("/api/view", b'{"thresholds": {"monkey": {"value": NaN}}}'),
             ("/api/view", b'{"thresholds": []}'), ("/api/view", b'{"show": 5}'),
             ("/api/view", b'{"filters": {"source": {"a": 1}}}'),
             ("/api/view", b"[]"), ("/api/view", b"{not json"), ("/api/view", deep),
             ("/api/view", b'{"a": ' + deep + b"}"),
             ("/api/decision", json.dumps({"id": {"x": 1}, "decision": "keep"}).encode()),
             ("/api/decision", b'"keep"'), ("/api/save", b'{"thresholds": "x"}'),
             ("/api/save", b'{"thresholds": {"monkey": {"value": 0.5, "op": "~"}}}')]
    for path, body in posts:
        status, answer = request(f"{base}{path}", method="POST", body=body, headers=headers)
        assert status == 400, (path, body[:60], status, answer[:200])
        assert answer.count(b"\n") <= 1 and b"Traceback" not in answer, answer[:200]
        assert json.loads(answer)["error"], answer
    for path in (f"/thumb/{'a' * 5000}", f"/image/{'a' * 5000}", "/thumb/..x"):
        status, answer = request(f"{base}{path}?token={token}")
        assert status == 400, (path[:20], status, answer[:200])
        assert answer.count(b"\n") <= 1 and json.loads(answer)["error"]
    status, answer = request(f"{base}/api/decision", method="POST", headers=headers,
                             body=json.dumps({"id": record_id, "decision": "keep"}).encode())
    assert status == 200, answer
    status, answer = request(f"{base}/api/view", method="POST", body=b"{}", headers=headers)
    assert status == 200 and json.loads(answer)["kept"] >= 1
    server.terminate()
    _, err = server.communicate(timeout=10)
    assert "Traceback" not in err, err[-2000:]


def whole_answer(connection) -> bytes:
    """One HTTP answer: its head, then as many bytes as its Content-Length says (the
    server may keep the connection open, waiting for the rest of our body)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536) or b"\r\n\r\n"
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length and (piece := connection.recv(65536)):
        body += piece
    return head + b"\r\n\r\n" + body


def test_a_huge_body_is_refused_before_it_is_read(scored_harvest, review_server):
    """A 400 MB body, even with the token, is answered 413 as soon as its headers are in:
    the server does not wait for (or hold) the body. A chunked body without a length
    is cut at the same limit."""
    import socket

    server = review_server(scored_harvest)
    head = (f"POST /api/view HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"X-Harvest-Token: {server.token}\r\nContent-Type: application/json\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(f"{head}Content-Length: 400000000\r\n\r\n".encode() + b"[" * 65536)
        answer = whole_answer(connection)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    chunk = b"[" * 262144
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(8):  # 2 MB, twice the limit
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may close its side once it has answered
        answer = whole_answer(connection)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    status, answer = request(f"{server.base}/api/view", method="POST", body=b"{}",
                             headers={"Content-Type": "application/json",
                                      "X-Harvest-Token": server.token})
    assert status == 200


def test_review_never_serves_a_file_a_record_points_outside(scored_harvest, tmp_path,
                                                           review_server):
    """Records crafted to name a file outside the harvest (absolute, ``../..``): the page
    neither serves its bytes nor a thumbnail of it, and does not list it."""
    from test_formats import crafted_records

    secret = tmp_path / "private" / "passwd.jpg"
    secret.parent.mkdir()
    secret.write_bytes(coloured_image((1, 2, 3), 0, (64, 48)) + b"PRIVATE-MARKER")
    shas = crafted_records(scored_harvest, secret)
    server = review_server(scored_harvest)
    base, token = server.base, server.token
    for sha in shas:
        for kind in ("image", "thumb"):
            status, body = request(f"{base}/{kind}/{sha}?token={token}")
            assert b"PRIVATE-MARKER" not in body and body[:2] != b"\xff\xd8", (kind, status)
    meta = api(base, token, "/api/meta")
    assert meta["total"] == 12 and meta["missing"] == 3
    listed = api(base, token, "/api/view", {"limit": 1000})["items"]
    assert not {item["sha"] for item in listed} & set(shas)
    assert not list((scored_harvest / ".harvest" / "thumbs").glob(f"{shas[0]}*"))
