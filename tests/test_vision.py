"""The vision scorer: the real google-cloud-vision client against a local REST server."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_jsonl
from fakes import FakeVision
from imagegen import coloured_image

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


@pytest.fixture
def vision_server(monkeypatch):
    fake = FakeVision().start()
    monkeypatch.setenv("GOOGLE_VISION_KEY", fake.api_key)
    yield fake
    fake.stop()


def gallery(tmp_path, colours):
    folder = tmp_path / "gallery"
    folder.mkdir()
    for index, (name, colour) in enumerate(colours):
        (folder / f"{name}-{index:02d}.jpg").write_bytes(coloured_image(colour, index))
    return folder


def recipe_text(folder, output, endpoint, options: str) -> str:
    return f"""
terms:
  - {{en: monkey, ja: 猿}}
  - cage
output: {output}
sources: [{{use: folder, options: {{path: {folder}}}}}]
enrichers:
  - use: vision
    options:
      endpoint: {endpoint}
      max_side: 320
{options}
sinks: [{{use: jsonl, options: {{personal_fields: clear}}}}]
"""


def by_name(output):
    return {r["relative_path"].split("-")[0] + r["relative_path"][-6:-4]: r
            for r in read_jsonl(output / "records.jsonl")}


def test_scores_marks_batches_and_caches(vision_server, tmp_path, recipe_file, harvest):
    colours = [("red", RED)] * 12 + [("blue", BLUE)] * 6 + [("green", GREEN)] * 2
    folder = gallery(tmp_path, colours)
    output = tmp_path / "out"
    recipe = recipe_file(recipe_text(folder, output, vision_server.url, """
      synonyms: {monkey: [macaque]}
      keep_if: {monkey: ">=0.6", cage: "<0.3"}"""))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = by_name(output)
    assert len(records) == 20
    red, blue, green = records["red00"], records["blue12"], records["green18"]
    assert red["scores"] == {"monkey": 0.93, "cage": 0.0}
    assert red["score_source"] == "google-cloud-vision" and red["keep"] is True
    assert blue["scores"] == {"monkey": 0.0, "cage": 0.84} and blue["keep"] is False
    assert blue["keep_failures"] == ["monkey 0.00 fails >=0.6", "cage 0.84 fails <0.3"]
    assert green["scores"]["monkey"] == 0.55  # through the synonym
    assert vision_server.batches == [16, 4]
    assert max(max(size) for size in vision_server.image_sizes) <= 320  # downsized, not 1200

    # Run state lost, label cache kept: nothing is paid for twice.
    for path in [output / "records.jsonl", *(output / ".harvest").glob("state.sqlite*")]:
        path.unlink()
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert vision_server.batches == [16, 4]
    assert by_name(output)["red00"]["scores"]["monkey"] == 0.93


def test_drop_action(vision_server, tmp_path, recipe_file, harvest):
    folder = gallery(tmp_path, [("red", RED), ("blue", BLUE)])
    output = tmp_path / "out"
    recipe = recipe_file(recipe_text(folder, output, vision_server.url, """
      keep_if: {monkey: ">0.5"}
      action: drop"""))
    status, out, _ = harvest("run", recipe, "--no-progress")
    assert status == 0
    assert list(by_name(output)) == ["red00"]
    assert "score: monkey 0.00 fails >0.5" in out


def test_quota_errors_are_retried(vision_server, tmp_path, recipe_file, harvest):
    vision_server.quota_errors = 2
    folder = gallery(tmp_path, [("red", RED)])
    output = tmp_path / "out"
    recipe = recipe_file(recipe_text(folder, output, vision_server.url, ""))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert by_name(output)["red00"]["scores"]["monkey"] == 0.93
    assert vision_server.quota_errors == 0


def test_refused_key_stops_the_run_with_a_clear_error(vision_server, tmp_path, recipe_file,
                                                     harvest, monkeypatch):
    monkeypatch.setenv("GOOGLE_VISION_KEY", "not-the-key-42")
    folder = gallery(tmp_path, [("red", RED)])
    recipe = recipe_file(recipe_text(folder, tmp_path / "out", vision_server.url, ""))
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 2
    assert "harvest: error: vision: Cloud Vision refused the API key" in err
    assert "not-the-key-42" not in out + err


def test_an_image_vision_cannot_read_fails_alone(vision_server, tmp_path, recipe_file, harvest):
    vision_server.bad_images = {"green"}
    folder = gallery(tmp_path, [("red", RED), ("green", GREEN), ("blue", BLUE)])
    output = tmp_path / "out"
    recipe = recipe_file(recipe_text(folder, output, vision_server.url, ""))
    status, out, _ = harvest("run", recipe, "--no-progress")
    assert status == 3  # green is retried by the next run
    assert sorted(by_name(output)) == ["blue02", "red00"]
    assert "Bad image data" in out


def test_thresholds_must_name_recipe_terms(vision_server, tmp_path, recipe_file, harvest):
    folder = gallery(tmp_path, [("red", RED)])
    recipe = recipe_file(recipe_text(folder, tmp_path / "out", vision_server.url,
                                     '      keep_if: {gorilla: ">=0.5"}'))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 2 and "'gorilla' is not one of the recipe's terms" in err


def test_bad_threshold_is_a_recipe_error(vision_server, tmp_path, recipe_file, harvest):
    folder = gallery(tmp_path, [("red", RED)])
    recipe = recipe_file(recipe_text(folder, tmp_path / "out", vision_server.url,
                                     '      keep_if: {monkey: "about 0.5"}'))
    status, _, err = harvest("validate", recipe)
    assert status == 2
    assert "enrichers[0].options.keep_if" in err and "expected a comparison" in err


def test_a_takedown_deletes_the_labels_and_hashes_kept_of_the_picture(vision_server, tmp_path,
                                                                      recipe_file, harvest):
    """The labels Cloud Vision returned for a picture and its perceptual hashes are kept in
    the plugins' own stores; a takedown deletes them there too, overwritten in the files,
    even when the recipe is gone and only the output folder is given."""
    folder = gallery(tmp_path, [("red", RED)] * 3 + [("blue", BLUE)] * 3)
    output = tmp_path / "out"
    recipe = recipe_file(recipe_text(folder, output, vision_server.url, """
  - use: near_duplicates"""))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    gone = by_name(output)["blue03"]
    sha, record_id = gone["file"]["sha256"], gone["id"]
    labels = output / ".harvest" / "scores-vision.sqlite"
    hashes = output / ".harvest" / "near-duplicates.sqlite"
    assert sha.encode() in labels.read_bytes() and record_id.encode() in hashes.read_bytes()
    Path(recipe).unlink()

    status, _, err = harvest("takedown", str(output), "--sha256", sha)
    assert status == 0, err
    assert sha.encode() not in labels.read_bytes()
    assert record_id.encode() not in hashes.read_bytes()
    kept = by_name(output)["red00"]
    assert kept["file"]["sha256"].encode() in labels.read_bytes()
    assert kept["id"].encode() in hashes.read_bytes()
