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
    # Offline scorers: the review page has sliders to show.
    from harvest.core.commands.review import Review

    review = Review(output)
    keys = {k["key"] for k in review.keys}
    assert {"quality.blur", "quality.brightness"} <= keys, keys
    review.db.close()


def test_every_shipped_recipe_validates(harvest, monkeypatch):
    monkeypatch.setenv("FLICKER_KEY", "k" * 32)
    monkeypatch.setenv("FLICKER_SECRET", "s" * 16)
    for recipe in sorted((REPO / "configs").glob("*.yml")):
        status, _, err = harvest("validate", recipe)
        assert status == 0, (recipe.name, err)


def test_the_demo_as_a_training_set_in_every_format(tmp_path, harvest):
    import datasets
    import pyarrow.parquet as pq
    import webdataset as wds

    output = tmp_path / "demo"
    status, _, err = harvest("run", REPO / "configs" / "demo-training.yml", "--output", output,
                             "--no-progress")
    assert status == 0, err
    records = read_jsonl(output / "records.jsonl")
    assert {(r["file"]["width"], r["file"]["height"]) for r in records} == {(224, 224)}
    # A training set has each picture once: the byte-for-byte copy is no sample.
    pictures = {r["file"]["sha256"] for r in records}
    assert len(pictures) == len(records) - 1
    samples = list(wds.WebDataset([str(output / "webdataset" / "00000.tar")],
                                  shardshuffle=False))
    assert sorted(json.loads(s["json"])["file"]["sha256"] for s in samples) == sorted(pictures)
    table = pq.read_table(output / "parquet")
    assert sorted(table.column("sha256").to_pylist()) == sorted(pictures)
    assert not any(table.column("duplicate_of").to_pylist())
    for fmt in ("imagefolder", "manifest", "hf"):
        status, out, err = harvest("export", output, tmp_path / fmt, "--format", fmt)
        assert status == 0, err
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "hf"), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == len({r["file"]["sha256"] for r in records})
    assert loaded[0]["image"].size == (224, 224)


def test_first_hour_edges(tmp_path, harvest, monkeypatch):
    """Small things a new user hit: export --by with a field no record has, credits
    naming file:/// paths of the user's machine, progress showing 2e+4."""
    import io

    output = tmp_path / "demo"
    assert harvest("run", REPO / "configs" / "demo.yml", "--output", output,
                   "--no-progress")[0] == 0
    status, _, err = harvest("export", output, tmp_path / "x", "--by", "bogus")
    assert status == 2 and "--by bogus: no record has this field" in err
    assert not (tmp_path / "x").exists()
    assert harvest("credits", output)[0] == 0
    credits = (output / "CREDITS.md").read_text() + (output / "credits.csv").read_text()
    assert "file://" not in credits and str(REPO) not in credits

    from harvest.core.pipeline.summary import Progress, Summary

    summary = Summary("big")
    for _ in range(23_456):
        summary.count("urls", None, "found")
    screen = io.StringIO()
    screen.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", screen)
    progress = Progress(summary)
    progress.update()
    progress.bar.refresh()
    progress.close()
    assert "found=23,456" in screen.getvalue() and "e+" not in screen.getvalue()


def test_the_demo_training_shards_keep_the_copies_when_told(tmp_path, harvest):
    import pyarrow.parquet as pq
    import webdataset as wds

    recipe = (REPO / "configs" / "demo-training.yml").read_text(encoding="utf-8")
    recipe = recipe.replace("path: demo-images", f"path: {REPO / 'configs' / 'demo-images'}")
    recipe = recipe.replace("{shard_size: 1000}", "{shard_size: 1000, keep_copies: true}")
    recipe = recipe.replace("{images: true}", "{images: true, keep_copies: true}")
    assert recipe.count("keep_copies: true") == 2
    (tmp_path / "recipe.yml").write_text(recipe, encoding="utf-8")
    output = tmp_path / "demo"
    status, _, err = harvest("run", tmp_path / "recipe.yml", "--output", output, "--no-progress")
    assert status == 0, err
    ids = {r["id"] for r in read_jsonl(output / "records.jsonl")}
    samples = list(wds.WebDataset([str(output / "webdataset" / "00000.tar")],
                                  shardshuffle=False))
    assert sorted(json.loads(s["json"])["id"] for s in samples) == sorted(ids)
    table = pq.read_table(output / "parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    # The copy is whichever of the two equal files came second (the order varies).
    pair = {"folder:animals/animal-00.jpg", "folder:misc/copy-of-animal-00.jpg"}
    copies = [(i, d) for i, d in zip(table.column("id").to_pylist(),
                                     table.column("duplicate_of").to_pylist(), strict=True) if d]
    assert len(copies) == 1 and set(copies[0]) == pair, copies
