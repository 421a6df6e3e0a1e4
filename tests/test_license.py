"""License filter, attribution, server-side pushdown and the credits files."""

from __future__ import annotations

import csv

import pytest
from conftest import FakePhoto, flickr_recipe, read_jsonl

from harvest.plugins.enrichers.license import PRESETS, LicenseEnricher

MIXED = [FakePhoto(id=str(number), title=f"monkey {number}", license=str(number))
         for number in (0, 1, 4, 5, 6, 7, 9, 10)]


def test_redistributable_preset_is_pushed_to_flickr(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = MIXED
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output)
                         + "enrichers:\n  - use: license\n    options: {allow: redistributable}\n")
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    assert flickr.searches[0]["license"] == "4,5,7,9,10"
    kept = sorted(r["license"] for r in read_jsonl(output / "records.jsonl"))
    assert kept == ["CC-BY-2.0", "CC-BY-SA-2.0", "CC0-1.0", "NKCR", "PDM-1.0"]


def test_enricher_filters_what_the_source_let_through(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = MIXED
    output = tmp_path / "out"
    recipe = recipe_file(
        flickr_recipe(flickr.endpoint, output, options="licenses: [0, 1, 4, 5, 6, 7, 9, 10]")
        + "enrichers:\n  - use: license\n    options: {allow: [modifiable]}\n"
        + "sinks:\n  - use: jsonl\n    options: {personal_fields: clear}\n")
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert sorted(records) == ["1", "10", "4", "5", "7", "9"]  # not 0 (ARR) nor 6 (ND)
    assert records["4"]["attribution"] == (
        '"monkey 4" by Ana Fotógrafa, CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/), '
        + records["4"]["page_url"])
    assert "license ARR not allowed" in out and "license CC-BY-ND-2.0 not allowed" in out

    status, out, _ = harvest("credits", output)
    assert status == 0 and "6 credits written" in out
    rows = list(csv.DictReader((output / "credits.csv").open(encoding="utf-8")))
    assert len(rows) == 6 and {r["author"] for r in rows} == {"Ana Fotógrafa"}
    markdown = (output / "CREDITS.md").read_text(encoding="utf-8")
    assert markdown.count("\n- `images/monkey/flickr-") == 6


def test_attribution_is_personal_and_omitted_by_default(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = MIXED[2:3]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output)
                         + "enrichers: [license]\n")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    [record] = read_jsonl(output / "records.jsonl")
    assert "attribution" not in record and "Ana" not in (output / "records.jsonl").read_text()
    assert harvest("credits", output)[0] == 0
    assert "CC-BY-2.0 (https://creativecommons.org/licenses/by/2.0/)" in \
        (output / "CREDITS.md").read_text()


def test_presets():
    assert "CC-BY-NC" in PRESETS["research"] and "CC-BY-NC" not in PRESETS["commercial"]
    assert "CC-BY-ND" not in PRESETS["modifiable"] and "CC-BY-ND" in PRESETS["commercial"]
    assert "ARR" not in set().union(*PRESETS.values())


def test_unknown_preset_is_a_recipe_error(recipe_file, harvest, tmp_path):
    path = recipe_file(f"terms: [x]\noutput: {tmp_path}/o\nsources: [{{use: folder, options: "
                       "{path: .}}]\nenrichers:\n  - use: license\n    options: {allow: [free]}\n")
    status, _, err = harvest("validate", path)
    assert status == 2
    assert "enrichers[0].options.allow" in err and "'free' is neither a preset" in err


@pytest.mark.parametrize("license_id, allowed", [("CC-BY-4.0", True), ("CC-BY-NC-2.0", False),
                                                 ("CC0-1.0", True), ("ARR", False)])
def test_families_match_any_version(license_id, allowed, tmp_path):
    import logging

    from harvest.core.contract.plugin import Context

    enricher = LicenseEnricher({"allow": ["commercial"], "keep_unknown": False},
                               Context("t", tmp_path, tmp_path, [], None, logging.getLogger("t")))
    enricher.open()
    assert enricher.allowed(license_id) is allowed


def test_reconsider_after_changing_the_recipe(recipe_file, harvest, tmp_path):
    """Records dropped under the old recipe go through again once the option that dropped
    them changed (the run state keeps the enricher's options), and --reconsider sends them
    through again when asked; what was stored stays stored once."""
    from imagegen import make_image

    (tmp_path / "photos").mkdir()
    for i in range(3):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(make_image(40 + i))
    output = tmp_path / "out"

    def recipe(keep_unknown: bool):
        return recipe_file(f"""
output: {output}
sources: [{{use: folder, options: {{path: photos}}}}]
enrichers: [{{use: license, options: {{keep_unknown: {str(keep_unknown).lower()}}}}}]
""")

    assert harvest("run", recipe(False), "--no-progress")[0] == 0
    assert not (output / "records.jsonl").exists() or not (output / "records.jsonl").read_text()
    assert harvest("run", recipe(False), "--no-progress")[0] == 0  # unchanged: skipped
    assert not (output / "records.jsonl").exists() or not (output / "records.jsonl").read_text()
    status, _, err = harvest("run", recipe(True), "--no-progress")
    assert status == 0 and "options.keep_unknown changed since the last run" in err
    assert len(read_jsonl(output / "records.jsonl")) == 3
    status, out, err = harvest("run", recipe(True), "--no-progress", "--reconsider", "dropped")
    assert status == 0, err
    ids = [r["id"] for r in read_jsonl(output / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 3
    assert harvest("run", recipe(True), "--no-progress", "--reconsider", "dropped")[0] == 0
    assert len(read_jsonl(output / "records.jsonl")) == 3
    status, _, err = harvest("run", recipe(True), "--reconsider", "done")
    assert status == 2 and "--reconsider done: expected dropped, rejected" in err
