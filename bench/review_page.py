"""How long `harvest review` takes to show N records in headless Chromium.

    python bench/review_page.py --n 10000

Harvests N small pictures (folder source, scored by the test suite's Cloud Vision
stand-in), starts `harvest review`, and times in the browser: the page ready (counts,
histograms and the first page of thumbnails requested), and a slider move until the
counts change, a sort by the distance from the threshold, and a decision by keyboard
until its tile shows it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> int:
    from fakes import FakeVision
    from imagegen import coloured_image
    from mongo_server import free_port
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    harvest = str(Path(sys.executable).with_name("harvest"))
    with tempfile.TemporaryDirectory(prefix="harvest-review-") as scratch:
        work = Path(scratch)
        gallery = work / "gallery"
        gallery.mkdir()
        colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]
        for i in range(args.n):
            (gallery / f"{i:06d}.jpg").write_bytes(coloured_image(colours[i % 3], i, (48, 36)))
        vision = FakeVision().start()
        recipe = work / "recipe.yml"
        recipe.write_text(f"terms: [monkey, cage]\noutput: {work / 'out'}\n"
                          f"run: {{batch_size: 512}}\n"
                          f"sources: [{{use: folder, options: {{path: {gallery}}}}}]\n"
                          f"enrichers: [{{use: vision, options: {{endpoint: {vision.url}}}}}]\n")
        env = dict(os.environ, GOOGLE_VISION_KEY=vision.api_key, HOME=str(work))
        subprocess.run([harvest, "run", str(recipe), "--no-progress"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        vision.stop()
        port = free_port()
        server = subprocess.Popen([harvest, "review", str(work / "out"), "--port", str(port)],
                                  env=env, stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().split(" at ", 1)[1].split()[0]  # carries the token
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(url, timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True,
                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run"])
                page = browser.new_page()
                started = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("body[data-ready=yes]")
                ready = time.perf_counter() - started
                page.wait_for_load_state("networkidle")
                thumbnails = time.perf_counter() - started
                before = page.locator("#kept").inner_text()
                started = time.perf_counter()
                page.locator("#slider-monkey").fill("0.6")
                page.wait_for_function(f"document.getElementById('kept').textContent !== '{before}'")
                slider = time.perf_counter() - started
                page.evaluate("document.querySelector('.tile').dataset.old = 'yes'")
                started = time.perf_counter()
                page.locator("#sort").select_option("margin:monkey|asc")
                page.wait_for_function("!document.querySelector('.tile').dataset.old")
                sort = time.perf_counter() - started
                page.locator(".tile").first.focus()
                started = time.perf_counter()
                page.keyboard.press("x")
                page.wait_for_selector(".tile[data-manual]")
                decision = time.perf_counter() - started
                browser.close()
        finally:
            server.terminate()
            server.wait()
    print(f"{args.n} records: page ready {ready:.2f} s, first thumbnails loaded "
          f"{thumbnails:.2f} s (made on first view, then cached), slider to new counts "
          f"{slider:.2f} s, sort by distance from the cut {sort:.2f} s, a decision by key "
          f"{decision:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
