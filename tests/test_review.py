"""`harvest review` as a user uses it: the server started on a free port, the page driven in
headless Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl
from fakes import FakeVision
from imagegen import coloured_image
from mongo_server import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HARVEST = os.path.join(os.path.dirname(sys.executable), "harvest")
needs_browser = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                   reason="Chromium is not installed (.ci/run installs it)")
RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


@pytest.fixture
def scored_harvest(tmp_path, harvest, monkeypatch):
    vision = FakeVision().start()
    monkeypatch.setenv("GOOGLE_VISION_KEY", vision.api_key)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    colours = [("red", RED)] * 6 + [("blue", BLUE)] * 4 + [("green", GREEN)] * 2
    for index, (name, colour) in enumerate(colours):
        (gallery / f"{name}-{index:02d}.jpg").write_bytes(coloured_image(colour, index, (320, 240)))
    output = tmp_path / "out"
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"""
terms: [monkey, cage]
output: {output}
sources: [{{use: folder, options: {{path: {gallery}}}}}]
enrichers:
  - use: vision
    options: {{endpoint: {vision.url}, synonyms: {{monkey: [macaque]}}}}
""")
    try:
        status, _, err = harvest("run", recipe, "--no-progress")
    finally:
        vision.stop()
    assert status == 0, err
    return output


def start_review(output: Path, port: int, cwd=None) -> subprocess.Popen:
    """Starts the server; ``process.url`` is the address it printed (with its token)."""
    process = subprocess.Popen([HARVEST, "review", str(output), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=cwd)
    line = process.stdout.readline()
    assert "harvest review:" in line, (line, process.communicate())
    process.url = line.split(" at ", 1)[1].split()[0]
    process.token = process.url.split("token=", 1)[1]
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


def launch(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"])


@needs_browser
def test_review_page_thresholds_decisions_and_save(scored_harvest, tmp_path, harvest):
    from playwright.sync_api import expect, sync_playwright

    output = scored_harvest
    (output / read_jsonl(output / "records.jsonl")[-1]["file"]["path"]).write_bytes(b"\xff\xd8broken")
    port = free_port()
    server = start_review(output, port)
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url)
            page.wait_for_selector("body[data-ready=yes]")
            expect(page.locator("#kept")).to_have_text("12")
            expect(page.locator("#dropped")).to_have_text("0")
            assert page.locator(".tile").count() == 12

            page.locator("#slider-monkey").fill("0.6")  # keep monkey >= 0.6: the red ones
            expect(page.locator("#kept")).to_have_text("6")
            expect(page.locator("#dropped")).to_have_text("6")
            expect(page.locator(".tile.dropped")).to_have_count(6)
            histogram = page.locator("#slider-monkey ~ svg rect")
            assert histogram.count() == 20

            page.locator(".tile.kept").first.click()
            expect(page.locator("#detail")).to_be_visible()
            rejected_id = page.locator("#meta td", has_text="folder:").first.inner_text()
            page.locator("#do-reject").click()
            expect(page.locator("#kept")).to_have_text("5")
            page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
            if os.environ.get("HARVEST_REVIEW_SCREENSHOT"):
                page.screenshot(path=os.environ["HARVEST_REVIEW_SCREENSHOT"])

            page.locator("#slider-monkey").fill("0")
            expect(page.locator("#kept")).to_have_text("11")
            page.reload()  # every change applied at once: the same page comes back
            page.wait_for_selector("body[data-ready=yes]")
            expect(page.locator("#kept")).to_have_text("11")
            rejected = page.locator(f'.tile[data-id="{rejected_id}"]')
            expect(rejected).to_have_attribute("data-manual", "rejected by hand")

            page.locator("#slider-cage").fill("0.5")
            page.locator("#slider-cage").locator("xpath=..").locator("select").select_option("below")
            expect(page.locator("#kept")).to_have_text("7")  # all but 4 cages and the rejection
            page.locator("#save").click()
            expect(page.locator("#status")).to_contain_text("review-recipe.yml")
            broken = page.request.get(f"http://127.0.0.1:{port}/thumb/"
                                      + read_jsonl(output / "records.jsonl")[-1]["file"]["sha256"]
                                      + f"?token={server.token}")
            assert broken.ok and "unreadable image" in broken.text()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (tmp_path / "review.png").stat().st_size > 10_000
    snippet = yaml.safe_load((output / "review-recipe.yml").read_text(encoding="utf-8"))
    assert snippet == {"keep_if": {"cage": "<0.5"}}
    saved = json.loads((output / ".harvest" / "review.json").read_text())
    assert saved["decisions"] == {rejected_id: "reject"}
    status, out, _ = harvest("export", output, tmp_path / "dataset", "--format", "manifest")
    assert status == 0 and "7 images" in out  # export applies what was chosen on the page


def test_not_a_harvest_and_port_in_use(tmp_path, scored_harvest):
    done = subprocess.run([HARVEST, "review", str(tmp_path / "nothing")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "not a harvest output folder" in done.stderr
    port = free_port()
    server = start_review(scored_harvest, port)
    try:
        done = subprocess.run([HARVEST, "review", str(scored_harvest), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert f"port {port} on 127.0.0.1 is in use" in done.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def request(url: str, *, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    call = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_other_pages_cannot_drive_or_read_the_review(scored_harvest, tmp_path):
    """CSRF and DNS rebinding: without the token, from another origin, with a form's
    text/plain body or a foreign Host, nothing is read and nothing changes."""
    port = free_port()
    server = start_review(scored_harvest, port)
    base, token = f"http://127.0.0.1:{port}", server.token
    record_id = read_jsonl(scored_harvest / "records.jsonl")[0]["id"]
    decision = json.dumps({"id": record_id, "decision": "reject"}).encode()
    try:
        assert request(f"{base}/api/meta")[0] == 403  # no token
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
                            headers={"Host": f"evil.example:{port}"})
        assert status == 403
        assert not (scored_harvest / ".harvest" / "review.sqlite").exists() or \
            "reject" not in json.dumps(request(f"{base}/api/record/{record_id}?token={token}")[1]
                                       .decode())
        # The page itself, from its own origin, with the token: accepted.
        status, _ = request(f"{base}/api/decision", method="POST", body=decision,
                            headers={"Content-Type": "application/json", "Origin": base,
                                     "X-Harvest-Token": token})
        assert status == 200
    finally:
        server.terminate()
        server.wait(timeout=10)
    done = subprocess.run([HARVEST, "review", str(scored_harvest), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--allow-remote" in done.stderr


def test_relative_path_and_export_equals_the_page(scored_harvest, tmp_path, harvest):
    """Started as the README says (a relative path), every thumbnail is served; after any
    decisions and threshold changes, with or without Save, export writes what the page
    counts as kept."""
    port = free_port()
    server = start_review(Path(os.path.relpath(scored_harvest, tmp_path)), port, cwd=tmp_path)
    base, token = f"http://127.0.0.1:{port}", server.token
    headers = {"Content-Type": "application/json", "X-Harvest-Token": token}
    records = read_jsonl(scored_harvest / "records.jsonl")
    try:
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
    finally:
        server.terminate()
        server.wait(timeout=10)
    status, out, _ = harvest("export", scored_harvest, tmp_path / "dataset", "--format",
                             "manifest")
    assert status == 0 and f"{page_kept} images" in out, (page_kept, out)
