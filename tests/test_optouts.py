"""Opt-outs of the image hosts: robots.txt (RFC 9309, with Crawl-delay), TDMRep (the
well-known file and the header), X-Robots-Tag noindex; hosts on 127.0.0.1 ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import read_jsonl
from fakes import QuietHandler, serve_in_thread
from imagegen import make_image
from test_resume import HARVEST, _alive

from harvest.core.contract.recipe import RUN_OPTIONS
from harvest.core.download.optouts import location_matches  # noqa

# What a recipe that leaves out its run: section gets.
RUN_DEFAULTS = {option.name: None if option.default is None else option.type.convert(option.default)
                for option in RUN_OPTIONS}


class Host:
    """An image host whose robots.txt, tdmrep.json and headers a test sets."""

    def __init__(self):
        self.robots: tuple[int, str] = (404, "")
        self.tdmrep: tuple[int, str] | Callable = (404, "")  # or a function answering
        self.headers: dict[str, dict[str, str]] = {}  # image path -> extra headers
        self.log: list[tuple[float, str]] = []
        self.agents: dict[str, set[str]] = {}  # path -> the User-Agents it was asked with
        host = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                host.log.append((time.monotonic(), self.path))
                host.agents.setdefault(self.path, set()).add(self.headers.get("User-Agent"))
                if self.path == "/robots.txt":
                    status, body = host.robots
                    self.reply(status, body.encode(), "text/plain")
                elif self.path == "/.well-known/tdmrep.json" and callable(host.tdmrep):
                    host.tdmrep(self)
                elif self.path == "/.well-known/tdmrep.json":
                    status, body = host.tdmrep
                    self.reply(status, body.encode(), "application/json")
                elif self.path.endswith(".jpg"):
                    seed = sum(self.path.encode())
                    self.reply(200, make_image(seed), "image/jpeg",
                                host.headers.get(self.path, {}))
                else:
                    self.reply(404, b"", "text/plain")

        self.server, self.base = serve_in_thread(Handler)

    def requests(self, path: str) -> int:
        return sum(1 for _, p in self.log if p == path)


@pytest.fixture
def host():
    server = Host()
    yield server
    server.server.shutdown()


def run(harvest, recipe_file, tmp_path, paths, host, run_options="", name="r.yml"):
    (tmp_path / "list.txt").write_text("".join(f"{host.base}{p}\n" for p in paths))
    output = tmp_path / "out"
    recipe = recipe_file(f"""
terms: [x]
output: {output}
run: {{allow_private_addresses: true, rate_per_host: 1000, retries: 0{run_options}}}
sources: [{{use: urls, options: {{path: list.txt}}}}]
""", name)
    status, out, err = harvest("run", recipe, "--no-progress")
    stored = {r["url"].split(host.base)[1] for r in read_jsonl(output / "records.jsonl")} \
        if (output / "records.jsonl").exists() else set()
    return status, out, err, stored


def test_robots_disallow_is_obeyed_and_the_file_is_fetched_once(host, harvest, recipe_file,
                                                                tmp_path):
    host.robots = (200, "User-agent: *\nDisallow: /private/\n\n"
                        "User-agent: harvest\nDisallow: /private/\nDisallow: /no-harvest/\n")
    paths = ["/a.jpg", "/b.jpg", "/private/c.jpg", "/no-harvest/d.jpg"]
    status, out, err, stored = run(harvest, recipe_file, tmp_path, paths, host,
                                   ", workers: 1")
    assert status == 0, err
    assert stored == {"/a.jpg", "/b.jpg"}
    assert "robots.txt of 127.0.0.1 disallows it for harvest" in out
    assert host.requests("/private/c.jpg") == host.requests("/no-harvest/d.jpg") == 0
    assert host.requests("/robots.txt") == 1
    # Cached in the output folder: a second run within the day does not ask again.
    (tmp_path / "list.txt").write_text(f"{host.base}/e.jpg\n")
    status, _, _ = harvest("run", tmp_path / "r.yml", "--no-progress")
    assert status == 0 and host.requests("/robots.txt") == 1 and host.requests("/e.jpg") == 1


def test_unreachable_robots_disallows_for_now_and_missing_allows(host, harvest, recipe_file,
                                                                 tmp_path):
    host.robots = (503, "busy")
    status, out, _, stored = run(harvest, recipe_file, tmp_path, ["/a.jpg"], host)
    assert status == 3 and stored == set()  # incomplete: the next run tries again
    assert "could not be read (HTTP 503): disallowed for now" in out
    assert host.requests("/a.jpg") == 0
    host.robots = (404, "")
    status, _, _ = harvest("run", tmp_path / "r.yml", "--no-progress")
    assert status == 0 and host.requests("/a.jpg") == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_crawl_delay_sets_the_hosts_rate(workers, host, harvest, recipe_file, tmp_path):
    """The requests are spaced by the delay, whether one process or several download."""
    host.robots = (200, "User-agent: *\nCrawl-delay: 0.25\n")
    paths = [f"/{i}.jpg" for i in range(6)]
    status, _, err, stored = run(harvest, recipe_file, tmp_path, paths, host,
                                 f", concurrency: 4, workers: {workers}")
    assert status == 0 and len(stored) == 6, err
    times = sorted(t for t, p in host.log if p.endswith(".jpg"))
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.2, gaps  # 0.25 s apart (a little slack for the clock)


def test_tdmrep_file_and_header_and_noindex(host, harvest, recipe_file, tmp_path):
    host.tdmrep = (200, json.dumps([{"location": "/reserved/*", "tdm-reservation": 1,
                                     "tdm-policy": "https://example.org/policy.json"},
                                    {"location": "/*", "tdm-reservation": 0}]))
    host.headers = {"/header.jpg": {"tdm-reservation": "1"},
                    "/noindex.jpg": {"X-Robots-Tag": "noimageindex"}}
    paths = ["/a.jpg", "/reserved/b.jpg", "/header.jpg", "/noindex.jpg"]
    status, out, _, stored = run(harvest, recipe_file, tmp_path, paths, host)
    assert status == 0
    assert stored == {"/a.jpg", "/noindex.jpg"}  # noindex is honoured only when asked
    assert "TDM rights reserved by 127.0.0.1 (/.well-known/tdmrep.json)" in out
    assert "TDM rights reserved: tdm-reservation header" in out
    assert host.requests("/reserved/b.jpg") == 0


def test_noindex_when_asked_and_robots_off_with_a_warning(host, harvest, recipe_file,
                                                          tmp_path):
    host.robots = (200, "User-agent: *\nDisallow: /\n")
    host.headers = {"/noindex.jpg": {"X-Robots-Tag": "otherbot: noai, harvest: noindex"}}
    status, out, err, stored = run(harvest, recipe_file, tmp_path, ["/a.jpg", "/noindex.jpg"],
                                   host, ", respect_robots: false, respect_noindex: true")
    assert status == 0
    assert stored == {"/a.jpg"} and "opted out of indexing: X-Robots-Tag noindex" in out
    assert "respect_robots is false" in err and host.requests("/robots.txt") == 0


def test_export_rechecks_opt_outs_made_since_the_harvest(host, harvest, recipe_file, tmp_path):
    paths = ["/a.jpg", "/b.jpg", "/c.jpg", "/d.jpg"]
    status, _, err, stored = run(harvest, recipe_file, tmp_path, paths, host)
    assert status == 0 and len(stored) == 4, err
    # Since then: robots.txt disallows b, c's server says tdm-reservation, d says noai.
    host.robots = (200, "User-agent: harvest\nDisallow: /b.jpg\n")
    host.headers = {"/c.jpg": {"tdm-reservation": "1"}, "/d.jpg": {"X-Robots-Tag": "noai"}}
    output = tmp_path / "out"
    status, out, err = harvest("export", output, tmp_path / "plain")
    assert status == 0 and "4 images" in out
    status, out, err = harvest("export", output, tmp_path / "rechecked", "--recheck-opt-outs",
                               "--allow-private-addresses")
    assert status == 0 and "1 image in 1 class" in out, out + err
    assert "3 image(s) left out: their hosts opted out since the harvest" in err
    kept = [r for r in read_jsonl(output / "records.jsonl") if r["url"].endswith("/a.jpg")]
    assert [p.name for p in (tmp_path / "rechecked").rglob("*.jpg")] == \
        [Path(kept[0]["file"]["path"]).name]


def test_export_rechecks_opt_outs_with_the_user_agent_of_a_run(host, harvest, recipe_file,
                                                                tmp_path):
    status, _, err, stored = run(harvest, recipe_file, tmp_path, ["/a.jpg"], host)
    assert status == 0 and stored == {"/a.jpg"}, err
    run_agents = host.agents.pop("/robots.txt")
    status, out, err = harvest("export", tmp_path / "out", tmp_path / "rechecked",
                               "--recheck-opt-outs", "--allow-private-addresses")
    assert status == 0, out + err
    assert host.agents["/robots.txt"] == run_agents == {RUN_DEFAULTS["user_agent"]}


def test_every_run_setting_defaults_to_its_option_default():
    from dataclasses import fields

    from harvest.core.contract.recipe import RunSettings

    declared = {f.name: f.default for f in fields(RunSettings) if f.name != "images"}
    assert declared == RUN_DEFAULTS


PATHOLOGICAL_LOCATION = "*" * 40 + "x$"


def test_location_patterns_match_in_linear_time():
    """A tdmrep.json location of forty ``*`` then ``x$`` sent a regex into hours of
    backtracking; patterns are matched without one, in milliseconds however they look."""
    path = "/" + "a" * 5000 + ".jpg"
    started = time.monotonic()
    assert not location_matches(PATHOLOGICAL_LOCATION, path)
    assert location_matches(PATHOLOGICAL_LOCATION, path + "x")
    assert not location_matches("*a" * 2000 + "b$", "a" * 5000)
    assert time.monotonic() - started < 0.1
    cases = [("/images/*", "/images/a.jpg", True), ("/images/*", "/other/a.jpg", False),
             ("/images/", "/images/a.jpg", True), ("/a.jpg$", "/a.jpg", True),
             ("/a.jpg$", "/a.jpgx", False), ("/*.jpg$", "/x/y.jpg", True),
             ("/*.jpg$", "/x/y.jpg.png", False), ("/*a*b$", "/xaab", True),
             ("/*ab*ab$", "/ab", False), ("*", "/", True), ("/x$", "/", False),
             ("/a*b*c", "/a-c-b-c", True), ("/a.b", "/aXb", False)]
    assert [location_matches(p, s) for p, s, _ in cases] == [want for _, _, want in cases]


def test_a_pathological_location_pattern_does_not_hang_the_run(host, harvest, recipe_file,
                                                               tmp_path):
    host.tdmrep = (200, json.dumps([{"location": PATHOLOGICAL_LOCATION, "tdm-reservation": 1},
                                    {"location": "/reserved/*", "tdm-reservation": 1}]))
    started = time.monotonic()
    status, out, err, stored = run(harvest, recipe_file, tmp_path,
                                   ["/" + "a" * 60 + ".jpg", "/b.jpgx", "/reserved/c.jpg"],
                                   host, ", workers: 2")
    assert time.monotonic() - started < 20
    assert status == 0, err
    assert stored == {"/" + "a" * 60 + ".jpg"}
    assert "2  urls download: TDM rights reserved by 127.0.0.1" in out


SPIN_IN_WORKERS = """
import re, sys, threading, time
if "--multiprocessing-fork" in sys.orig_argv:
    def spin():
        while threading.active_count() < 4:  # until the worker's own threads run
            time.sleep(0.02)
        re.match(r"(a|aa)*c", "a" * 60)  # C code that never gives back the GIL
    threading.Thread(target=spin, daemon=True).start()
"""


def test_download_workers_die_with_harvest_even_holding_the_gil(host, recipe_file, tmp_path,
                                                                 isolated_home):
    """kill -9 of harvest while every download worker is stuck in C code holding the GIL
    (as a backtracking regex did): the flusher's check of the parent never runs, yet no
    worker outlives harvest (the kernel kills them: PR_SET_PDEATHSIG)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SPIN_IN_WORKERS)
    (tmp_path / "list.txt").write_text(f"{host.base}/a.jpg\n")
    recipe = recipe_file(f"""
terms: [x]
output: {tmp_path / "out"}
run: {{allow_private_addresses: true, workers: 2}}
sources: [{{use: urls, options: {{path: list.txt}}}}]
""")
    env = dict(os.environ, HOME=str(isolated_home), PYTHONPATH=str(tmp_path / "site"))
    process = subprocess.Popen([HARVEST, "run", str(recipe), "--no-progress"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        workers: list[int] = []
        while len(workers) < 2:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
            workers = [int(pid) for pid in subprocess.run(
                ["pgrep", "-f", "-P", str(process.pid), "spawn_main"], capture_output=True,
                text=True).stdout.split()]
        time.sleep(0.5)  # the workers are spinning now
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, [pid for pid in workers if _alive(pid)]
            time.sleep(0.05)
    finally:
        process.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def tdmrep_dripping(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for byte in b'[{"location": "/*", "tdm-reservation": 1}]':
        handler.wfile.write(bytes([byte]))
        time.sleep(0.2)


def tdmrep_cut_off(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b'[{"location": "/*", "tdm-reser')
    handler.close_connection = True


def tdmrep_of_60_mb(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    entry = b'{"location": "/*", "tdm-reservation": 1},' * 1000
    handler.wfile.write(b"[")
    for _ in range(60_000_000 // len(entry)):
        handler.wfile.write(entry)


@pytest.mark.parametrize("tdmrep, why", [
    ((503, "busy"), "HTTP 503"),
    (tdmrep_dripping, "took longer than"),
    (tdmrep_cut_off, "connection broken before the end"),
    (tdmrep_of_60_mb, "larger than 512 KiB"),
    ((200, "[" * 150_000 + "]" * 150_000), "nested too deep"),
    ((200, '[{"location": "/*", "tdm-reservation": 1'), "not JSON"),
])
def test_an_unreadable_tdmrep_disallows_for_now(tdmrep, why, host, harvest, recipe_file,
                                                tmp_path):
    """A tdmrep.json that cannot be read was taken for "no reservation" (and cached for a
    day): three images stored from a host that reserves them, exit 0. Unreadable now
    means disallowed for now, as for robots.txt: not stored, exit 3, asked again."""
    host.tdmrep = tdmrep
    paths = ["/a.jpg", "/b.jpg", "/c.jpg"]
    status, out, err, stored = run(harvest, recipe_file, tmp_path, paths, host,
                                   ", download_deadline: 2, workers: 1")
    assert status == 3 and stored == set(), out + err
    assert why in out, out
    # A dripping file's reading and the download it belongs to end by the same deadline:
    # whichever comes first names the failure (the host, or the download's deadline).
    assert "127.0.0.1" in out or "took longer than run.download_deadline" in out, out
    assert not any(host.requests(path) for path in paths)
    host.tdmrep = (200, json.dumps([{"location": "/b.jpg", "tdm-reservation": 1}]))
    status, out, err = harvest("run", tmp_path / "r.yml", "--no-progress")
    assert status == 0, out + err
    assert host.requests("/a.jpg") == host.requests("/c.jpg") == 1
    assert host.requests("/b.jpg") == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_huge_crawl_delay_is_capped_and_named_in_the_summary(workers, host, harvest,
                                                               recipe_file, tmp_path):
    """``Crawl-delay: 99999`` parked a run for about 27 hours; it is cut to
    run.max_crawl_delay, and the summary names the host and what it asked for."""
    host.robots = (200, "User-agent: *\nCrawl-delay: 99999\n")
    paths = [f"/{i}.jpg" for i in range(3)]
    started = time.monotonic()
    status, out, err, stored = run(harvest, recipe_file, tmp_path, paths, host,
                                   f", max_crawl_delay: 0.3, workers: {workers}")
    assert time.monotonic() - started < 15
    assert status == 0 and len(stored) == 3, out + err
    netloc = host.base.split("//")[1]
    assert out.count(f"robots.txt of {netloc} asks for Crawl-delay 99999 s; waiting "
                     f"run.max_crawl_delay (0.3 s) instead") == 1, out
    times = sorted(t for t, p in host.log if p.endswith(".jpg"))
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.25
