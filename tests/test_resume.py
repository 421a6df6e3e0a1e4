"""Interrupted runs (kill -9, Ctrl-C, SIGTERM) finish on the next start, without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import flickr_recipe, monkey_photos, read_jsonl

HARVEST = os.path.join(os.path.dirname(sys.executable), "harvest")


def start_run(recipe, env_home) -> subprocess.Popen:
    env = dict(os.environ, HOME=str(env_home))
    return subprocess.Popen([HARVEST, "run", str(recipe), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path, count: int, process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("the run made no progress")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_lock(output, process, timeout: float = 30.0) -> None:
    """Until ``process`` holds the output's lock: from then on a signal is a clean stop
    (before, Python's default handlers apply, as for any program still starting)."""
    lock = output / ".harvest" / "lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip() == str(process.pid):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("the run never took the lock")


def check_complete(output, expected_ids: set[str]) -> None:
    records = read_jsonl(output / "records.jsonl")
    counts = Counter(r["source_id"] for r in records)
    assert set(counts) == expected_ids
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1]
    files = [p for p in (output / "images").rglob("*") if p.is_file()]
    assert len(files) == len(expected_ids)
    assert {r["file"]["path"] for r in records} == {p.relative_to(output).as_posix() for p in files}
    assert not list((output / ".harvest").glob("tmp/*"))


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_without_duplicates(how, flickr, recipe_file, tmp_path,
                                                    isolated_home, harvest):
    flickr.photos = monkey_photos(60)
    flickr.image_latency = 0.03
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output,
                                       run="concurrency: 2\nbatch_size: 4\nlimit_per_term: 60\n"
                                           "workers: 2"))
    process = start_run(recipe, isolated_home)
    wait_for_lines(output / "records.jsonl", 8, process)
    workers = [int(pid) for pid in subprocess.run(
        ["pgrep", "-f", "-P", str(process.pid), "spawn_main"], capture_output=True,
        text=True).stdout.split()]
    assert workers  # the downloads run in worker processes
    process.send_signal(how)
    process.wait(timeout=30)
    # No download worker outlives the run, however it ended (kill -9 included).
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, [pid for pid in workers if _alive(pid)]
        time.sleep(0.05)
    if how == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, process.communicate()
    partial = read_jsonl(output / "records.jsonl")
    assert 8 <= len(partial) < 60
    requests_before = flickr.image_requests()

    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    check_complete(output, {p.id for p in flickr.photos})
    # Finished images are not fetched again: at most the batch in flight is.
    assert flickr.image_requests() - requests_before <= 60 - len(partial) + 2 * 4 + 4


def test_jsonl_tail_from_an_uncommitted_batch_is_discarded(flickr, recipe_file, tmp_path, harvest):
    flickr.photos = monkey_photos(10)
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, run="batch_size: 3"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    sink_file = output / "records.jsonl"
    # As a crash between the sink's write and the state commit would leave it:
    # the same records again, the last one cut off mid-line.
    lines = sink_file.read_bytes().splitlines(keepends=True)
    sink_file.write_bytes(b"".join(lines) + b"".join(lines[:3]) + lines[3][:20])
    assert harvest("run", recipe, "--no-progress")[0] == 0
    check_complete(output, {p.id for p in flickr.photos})


def test_state_lost_but_jsonl_kept(flickr, recipe_file, tmp_path, harvest):
    flickr.photos = monkey_photos(6)
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    for path in (output / ".harvest").glob("state.sqlite*"):
        path.unlink()
    assert harvest("run", recipe, "--no-progress")[0] == 0
    check_complete(output, {p.id for p in flickr.photos})


KILL_LOOPS = int(os.environ.get("HARVEST_KILL_LOOPS", "8"))


def test_many_stops_in_a_row_never_write_a_record_twice(flickr, recipe_file, tmp_path,
                                                        isolated_home, harvest):
    """Stop runs again and again at random moments, by every kind of signal; after each
    clean stop the file has no duplicate, and a last run completes the set. When a round's
    set is complete, the next round starts on a new output folder.
    (HARVEST_KILL_LOOPS=200 runs it as the issue asked, locally.)"""
    import random

    rng = random.Random(int(os.environ.get("HARVEST_KILL_SEED", "7")))
    flickr.photos = monkey_photos(300)
    flickr.image_latency = 0.005
    expected = {p.id for p in flickr.photos}
    stops, rounds = 0, 0
    loop = 0
    while loop < KILL_LOOPS:
        rounds += 1
        output = tmp_path / f"out{rounds}"
        recipe = recipe_file(flickr_recipe(flickr.endpoint, output,
                                           run="concurrency: 4\nbatch_size: 3\n"
                                               "limit_per_term: 300"), name=f"r{rounds}.yml")
        sink = output / "records.jsonl"
        while loop < KILL_LOOPS:
            before = sink.read_bytes().count(b"\n") if sink.exists() else 0
            if before >= 280:
                break
            loop += 1
            process = start_run(recipe, isolated_home)
            wait_for_lock(output, process)
            wait_for_lines(sink, before + 1, process)
            time.sleep(rng.uniform(0, 0.3))
            how = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
            process.send_signal(how)
            out, err = process.communicate(timeout=30)
            if process.returncode == 0 or ": complete in" in out:
                # Finished before the signal landed (or it landed while Python was
                # shutting down, when the default handlers are back: any program's race).
                break
            stops += 1
            assert process.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 130), \
                (loop, how, out, err)
            if how != signal.SIGKILL:
                counts = Counter(r["id"] for r in read_jsonl(sink))
                assert max(counts.values()) == 1, (loop, how,
                                                   [i for i, n in counts.items() if n > 1])
                assert "sink jsonl failed" not in err
        status, out, err = harvest("run", recipe, "--no-progress")
        assert status == 0, err
        check_complete(output, expected)
    assert stops >= KILL_LOOPS // 2


def test_a_second_run_on_the_same_output_is_refused(flickr, recipe_file, tmp_path,
                                                    isolated_home, harvest):
    flickr.photos = monkey_photos(40)
    flickr.image_latency = 0.05
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output,
                                       run="concurrency: 2\nbatch_size: 4\nlimit_per_term: 40"))
    process = start_run(recipe, isolated_home)
    wait_for_lines(output / "records.jsonl", 4, process)
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 2
    assert err.strip() == (f"harvest: error: {output}: another harvest run (pid {process.pid}) "
                           f"is using this output folder; wait for it to finish or stop it")
    assert process.wait(timeout=60) == 0, process.communicate()
    check_complete(output, {p.id for p in flickr.photos})
    # The lock dies with its process: a run after a kill -9 is not refused.
    process = start_run(recipe, isolated_home)
    process.kill()
    process.wait()
    assert harvest("run", recipe, "--no-progress")[0] == 0


def test_a_full_disk_stops_the_run_in_one_line_and_the_next_run_recovers(
        flickr, recipe_file, tmp_path, harvest, small_disk):
    import random as _random

    from conftest import FakePhoto
    from PIL import Image

    photos = []
    for index in range(40):  # ~90 KB each: 3.6 MB in all, for a 2 MB disk
        noise = _random.Random(index).randbytes(240 * 240 * 3)
        buffer = __import__("io").BytesIO()
        Image.frombytes("RGB", (240, 240), noise).save(buffer, "JPEG", quality=95)
        photos.append(FakePhoto(id=str(2000 + index), title="monkey", image=buffer.getvalue()))
    flickr.photos = photos
    output = small_disk / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output,
                                       run="concurrency: 4\nbatch_size: 4\nlimit_per_term: 40"))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 1, out + err
    assert err.splitlines() == [f"harvest: error: no space left on the device of {output}; "
                                f"free some space and run again to resume"], err
    assert out.startswith("harvest flickr-test: failed")
    sink = output / "records.jsonl"
    data = sink.read_bytes() if sink.exists() else b""
    assert not data or data.endswith(b"\n")  # no half line
    assert len(read_jsonl(sink)) < 40 if data else True

    subprocess.run(["mount", "-o", "remount,size=20M", str(small_disk)], check=True)
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, out + err
    check_complete(output, {p.id for p in photos})


def test_a_download_worker_killed_mid_run_costs_only_its_downloads(flickr, recipe_file,
                                                                    tmp_path, isolated_home,
                                                                    harvest):
    flickr.photos = monkey_photos(300)
    flickr.image_latency = 0.05
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output,
                                       run="concurrency: 4\nbatch_size: 2\nlimit_per_term: 300\n"
                                           "workers: 2"))
    process = start_run(recipe, isolated_home)
    wait_for_lock(output, process)
    wait_for_lines(output / "records.jsonl", 6, process)
    workers = subprocess.run(["pgrep", "-f", "-P", str(process.pid), "spawn_main"],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGKILL)
    # Replaced while the run goes on, though the other worker's answers keep flowing.
    deadline = time.monotonic() + 3
    while True:
        now = subprocess.run(["pgrep", "-f", "-P", str(process.pid), "spawn_main"],
                             capture_output=True, text=True).stdout.split()
        if len(now) == 2 and workers[0] not in now:
            break
        assert time.monotonic() < deadline and process.poll() is None, now
        time.sleep(0.05)
    out, err = process.communicate(timeout=60)
    assert process.returncode in (0, 3), err  # 3: the lost downloads wait for a rerun
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    check_complete(output, {p.id for p in flickr.photos})
