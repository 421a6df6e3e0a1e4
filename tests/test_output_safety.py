"""Nothing is written outside the output folder, whatever is planted in it, and a folder
that cannot be written is one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from conftest import REPO, read_jsonl
from imagegen import make_image

DEMO_IMAGES = REPO / "configs" / "demo-images" / "animals"


def folder_recipe(recipe_file, output, folder=DEMO_IMAGES, sink_options="", source_options=""):
    return recipe_file(f"""
terms: [x]
output: {output}
sources: [{{use: folder, options: {{path: {folder}{source_options}}}}}]
sinks: [{{use: jsonl{sink_options}}}]
""")


def everything_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("planted", ["images", "images/animals", ".harvest/tmp", "records.jsonl",
                                     ".harvest/state.sqlite", ".harvest/harvest.log",
                                     ".harvest/.sinks.json.tmp"])
def test_a_planted_link_is_refused_and_nothing_lands_outside(planted, recipe_file, harvest,
                                                             tmp_path):
    output = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    link = output / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    target = elsewhere if not planted.endswith((".jsonl", ".sqlite", ".log", ".tmp")) \
        else elsewhere / "keep.txt"
    link.symlink_to(target)
    recipe = folder_recipe(recipe_file, output)
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 2, out + err
    assert err.count("\n") == 1 and "symbolic link" in err and "Traceback" not in err, err
    assert everything_under(elsewhere) == {"keep.txt"}
    assert (elsewhere / "keep.txt").read_text() == "mine"


def test_a_sink_path_that_leaves_the_output_is_a_recipe_error(recipe_file, harvest, tmp_path):
    output = tmp_path / "deep" / "out"
    for path in ("../../../x.jsonl", "/tmp/x.jsonl", "sub/../../x.jsonl"):
        recipe = folder_recipe(recipe_file, output, sink_options=f", options: {{path: '{path}'}}")
        for command in ("validate", "run"):
            status, out, err = harvest(command, recipe)
            assert status == 2, (command, path, out)
            assert "sinks[0].options.path" in err and "leaves the output folder" in err
    assert not (tmp_path / "x.jsonl").exists() and not list(tmp_path.glob("deep/*.jsonl"))
    recipe = folder_recipe(recipe_file, output, sink_options=", options: {path: parts/all.jsonl}")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert len(read_jsonl(output / "parts" / "all.jsonl")) == 8


def test_the_folder_source_does_not_follow_links_out_of_its_folder(recipe_file, harvest,
                                                                   tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(DEMO_IMAGES / "animal-00.jpg", folder / "own.jpg")
    secret = tmp_path / "private"
    secret.mkdir()
    shutil.copy(DEMO_IMAGES / "animal-01.jpg", secret / "someone-else.jpg")
    (folder / "link.jpg").symlink_to(secret / "someone-else.jpg")
    (folder / "linked-dir").symlink_to(secret)
    (folder / "inner.jpg").symlink_to(folder / "own.jpg")  # a link inside is fine
    output = tmp_path / "out"
    assert harvest("run", folder_recipe(recipe_file, output, folder=folder), "--no-progress")[0] == 0
    assert sorted(r["relative_path"] for r in read_jsonl(output / "records.jsonl")) == \
        ["inner.jpg", "own.jpg"]
    output = tmp_path / "out2"
    recipe = folder_recipe(recipe_file, output, folder=folder,
                           source_options=", follow_links: true")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert sorted(r["relative_path"] for r in read_jsonl(output / "records.jsonl")) == \
        ["inner.jpg", "link.jpg", "linked-dir/someone-else.jpg", "own.jpg"]


@pytest.mark.parametrize("kind", ["file", "unwritable", "proc"])
def test_an_output_that_cannot_be_written_is_one_line(kind, recipe_file, harvest, tmp_path):
    if kind == "file":
        output = tmp_path / "out"
        output.write_text("not a folder")
        expected = "the output is a file, not a folder"
    elif kind == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes everywhere")
        output = tmp_path / "locked" / "out"
        output.parent.mkdir()
        output.parent.chmod(0o500)
        expected = "cannot create the output folder"
    else:
        output = Path("/proc/harvest-out")
        expected = "cannot create the output folder"
    status, out, err = harvest("run", folder_recipe(recipe_file, output), "--no-progress")
    assert status == 2
    assert err.startswith(f"harvest: error: {output}: {expected}") and err.count("\n") == 1, err


def _shard_recipe(flickr, recipe_file, output) -> Path:
    from conftest import flickr_recipe, monkey_photos

    flickr.photos = monkey_photos(60)
    flickr.image_latency = 0.02
    return recipe_file(flickr_recipe(flickr.endpoint, output,
                                     run="concurrency: 2\nbatch_size: 4\nlimit_per_term: 60")
                       + """
sinks:
  - jsonl
  - webdataset
  - {use: parquet, options: {images: true}}
""")


def _run_while(harvest, recipe, action):
    """Runs ``recipe`` while a thread does ``action(ended)``; ``ended`` (an Event) is set
    when the run returns."""
    import threading

    ended = threading.Event()
    thread = threading.Thread(target=action, args=(ended,))
    thread.start()
    try:
        return harvest("run", recipe, "--no-progress")
    finally:
        ended.set()
        thread.join()


def _check_completed_once(harvest, recipe, output, photos) -> None:
    """The next run completes the harvest: every record once in every sink."""
    from test_formats import assert_each_once_in_every_sink

    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, out + err
    assert_each_once_in_every_sink(output, {f"flickr:{photo.id}" for photo in photos})


def _wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_a_folder_swapped_for_a_link_mid_run_sends_nothing_outside_and_is_no_success(
        flickr, recipe_file, harvest, tmp_path):
    """While a run writes images/monkey, a thread moves that folder away and puts a link to
    a folder outside in its place: no image lands outside, the shard sinks read nothing
    through the link, the records they could not pack fail with the reason (exit 3), and
    once the folder is put back the next run completes them, each sample once."""
    output = tmp_path / "out"
    recipe = _shard_recipe(flickr, recipe_file, output)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder, moved = output / "images" / "monkey", output / "images" / "monkey-moved"
    swapped_after: list[int] = []

    def swap(ended) -> None:
        if _wait_for(lambda: folder.is_dir() and len(os.listdir(folder)) >= 8):
            folder.rename(moved)
            folder.symlink_to(elsewhere, target_is_directory=True)
            swapped_after.append(len(os.listdir(moved)))

    status, out, err = _run_while(harvest, recipe, swap)
    assert swapped_after and swapped_after[0] < 60  # the swap came mid-run
    assert os.listdir(elsewhere) == []
    assert status == 3, out + err
    assert "incomplete" in out and "symbolic link" in out, out
    # The shards are built at the end, after the swap: none of their images was read
    # through the link, and each record left out is a failure the summary gives.
    for shard in (output / "webdataset").glob("*.tar"):
        with tarfile.open(shard) as tar:
            assert not tar.getnames(), tar.getnames()[:3]
    summary = json.loads((output / ".harvest" / "last-run.json").read_text())
    assert summary["totals"]["failed"] >= 8, summary["totals"]

    folder.unlink()
    moved.rename(folder)
    _check_completed_once(harvest, recipe, output, flickr.photos)


def test_an_image_swapped_for_a_link_mid_run_is_not_packed_and_is_no_success(
        flickr, recipe_file, harvest, tmp_path):
    """A stored image replaced by a link to a file outside before its shard is built: the
    shard sinks do not read through it (its bytes are in no shard), the record fails for
    them with the reason (exit 3, where they used to leave it out and say complete), and
    with the file put back the next run packs it, once."""
    output = tmp_path / "out"
    recipe = _shard_recipe(flickr, recipe_file, output)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(make_image(99, size=(64, 48)))
    records = output / "records.jsonl"
    swapped: list[Path] = []

    def swap(ended) -> None:
        if _wait_for(lambda: records.exists() and records.read_bytes().count(b"\n") >= 8):
            image = output / read_jsonl(records)[0]["file"]["path"]
            image.rename(image.with_name("kept-aside"))
            image.symlink_to(outside)
            swapped.append(image)
            stored_at_swap.append(len(read_jsonl(records)))

    stored_at_swap: list[int] = []
    status, out, err = _run_while(harvest, recipe, swap)
    assert swapped and stored_at_swap[0] < 60  # the swap came mid-run
    assert status == 3, out + err
    assert "incomplete" in out and "symbolic link" in out, out
    secret = outside.read_bytes()[200:400]
    for path in [*(output / "webdataset").glob("*.tar"), *(output / "parquet").glob("*")]:
        assert secret not in path.read_bytes(), path

    swapped[0].unlink()
    swapped[0].with_name("kept-aside").rename(swapped[0])
    _check_completed_once(harvest, recipe, output, flickr.photos)


def test_the_temporary_folder_swapped_for_a_link_mid_run_takes_no_download_outside(
        flickr, recipe_file, harvest, tmp_path):
    """Downloads are written to .harvest/tmp first: swapped for a link to a folder outside
    while the run goes on, it gets no file (a watcher looks until the run ends), and the
    downloads that could not be written fail (exit 3) and are done by the next run."""
    output = tmp_path / "out"
    recipe = _shard_recipe(flickr, recipe_file, output)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    temp, moved = output / ".harvest" / "tmp", output / ".harvest" / "tmp-moved"
    records = output / "records.jsonl"
    seen_outside: set[str] = set()

    def swap(ended) -> None:
        if _wait_for(lambda: records.exists() and records.read_bytes().count(b"\n") >= 8):
            temp.rename(moved)
            temp.symlink_to(elsewhere, target_is_directory=True)
            stored_at_swap.append(len(read_jsonl(records)))
            while not ended.is_set():
                seen_outside.update(os.listdir(elsewhere))

    stored_at_swap: list[int] = []
    status, out, err = _run_while(harvest, recipe, swap)
    assert stored_at_swap and stored_at_swap[0] < 60  # the swap came mid-run
    assert not seen_outside and os.listdir(elsewhere) == []
    assert status == 3, out + err
    assert "symbolic link" in out, out
    temp.unlink()
    _check_completed_once(harvest, recipe, output, flickr.photos)
