"""The offline demo recipe that the README tells a new user to run."""

from __future__ import annotations

import json

from conftest import REPO, read_jsonl


def test_demo_recipe_runs_offline(tmp_path, harvest):
    output = tmp_path / "demo"
    status, out, err = harvest("run", REPO / "configs" / "demo.yml", "--output", output,
                               "--no-progress")
    assert status == 0, err
    assert "harvest demo: complete" in out
    records = read_jsonl(output / "records.jsonl")
    assert len(records) == 11  # 12 images found, 1 truncated
    names = {r["relative_path"] for r in records}
    assert "misc/no-extension" in names and "misc/notes.txt" not in names
    duplicate = next(r for r in records if r["relative_path"] == "misc/copy-of-animal-00.jpg")
    assert duplicate["duplicate_of"] == "folder:animals/animal-00.jpg"
    assert len([p for p in (output / "images").rglob("*") if p.is_file()]) == 10
    summary = json.loads((output / ".harvest" / "last-run.json").read_text())
    assert summary["totals"]["rejected"] == 1 and summary["totals"]["stored"] == 11


def test_every_shipped_recipe_validates(harvest, monkeypatch):
    monkeypatch.setenv("FLICKER_KEY", "k" * 32)
    monkeypatch.setenv("FLICKER_SECRET", "s" * 16)
    for recipe in sorted((REPO / "configs").glob("*.yml")):
        status, _, err = harvest("validate", recipe)
        assert status == 0, (recipe.name, err)
