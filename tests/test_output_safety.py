"""Nothing is written outside the output folder, whatever is planted in it, and a folder
that cannot be written is one line and exit 2."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO, read_jsonl

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
                                     ".harvest/state.sqlite", ".harvest/harvest.log"])
def test_a_planted_link_is_refused_and_nothing_lands_outside(planted, recipe_file, harvest,
                                                             tmp_path):
    output = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    link = output / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    target = elsewhere if not planted.endswith((".jsonl", ".sqlite", ".log")) \
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
