"""One run context: outcomes counted under the recipe's labels, each recorded once."""

from __future__ import annotations

import json

from conftest import read_jsonl
from imagegen import make_image


def last_run(output) -> dict:
    return json.loads((output / ".harvest" / "last-run.json").read_text(encoding="utf-8"))


def test_two_instances_of_one_source_report_under_their_labels(recipe_file, harvest, tmp_path):
    """Two `folder` sources named `cats` and `dogs`: the summary's rows, its reasons and
    the printed table name each label, not the plugin (`folder`) both are."""
    for name, seeds in (("cats", (1, 2)), ("dogs", (3, 4, 5))):
        (tmp_path / name).mkdir()
        for seed in seeds:
            (tmp_path / name / f"{name}-{seed}.jpg").write_bytes(make_image(seed))
    (tmp_path / "dogs" / "dogs-broken.jpg").write_bytes(make_image(9)[:200])
    output = tmp_path / "out"
    recipe = recipe_file(f"""
output: {output}
sources:
  - {{use: folder, name: cats, options: {{path: cats}}}}
  - {{use: folder, name: dogs, options: {{path: dogs}}}}
sinks: [jsonl]
""")
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    assert len(read_jsonl(output / "records.jsonl")) == 5
    summary = last_run(output)
    rows = {row["source"]: row for row in summary["by_source_term"]}
    assert set(rows) == {"cats", "dogs"}
    assert rows["cats"]["found"] == 2 and rows["cats"]["stored"] == 2
    assert rows["dogs"]["found"] == 4 and rows["dogs"]["stored"] == 3
    assert rows["dogs"]["rejected"] == 1 and rows["cats"]["rejected"] == 0
    assert [(f["source"], f["stage"]) for f in summary["failures"]] == [("dogs", "download")]
    table = out.splitlines()
    assert any(line.split()[:2] == ["cats", "-"] for line in table)
    assert any(line.split()[:2] == ["dogs", "-"] for line in table)
    assert not any(line.split()[:1] == ["folder"] for line in table)

    status, out, err = harvest("run", recipe, "--no-progress")  # again: all skipped, by label
    assert status == 0, err
    rows = {row["source"]: row for row in last_run(output)["by_source_term"]}
    assert set(rows) == {"cats", "dogs"}
    assert rows["cats"]["skipped"] == 2 and rows["dogs"]["skipped"] == 4


def test_the_ledger_writes_each_outcome_to_the_summary_and_the_run_state_together(tmp_path):
    """``finish`` counts under the record's label and writes the run state's status in
    one call; ``count`` leaves the run state alone; a sink's refusal, which names only
    the plugin's source, is counted under the one label that yielded that source."""
    import threading

    from harvest.core.contract.plugin import Refusal
    from harvest.core.contract.recipe import load_recipe
    from harvest.core.contract.registry import load_registry
    from harvest.core.contract.shards import Coordinator
    from harvest.core.pipeline.run import RunContext
    from harvest.core.record import FileInfo, Record

    (tmp_path / "cats").mkdir()
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(f"output: {tmp_path / 'out'}\n"
                           "sources: [{use: folder, name: cats, options: {path: cats}}]\n")
    recipe = load_recipe(recipe_path, load_registry())
    context = RunContext(recipe, root=recipe.output, coordinator=Coordinator(),
                         stop_requested=threading.Event())
    (recipe.output / ".harvest").mkdir(parents=True)
    state = context.open_state()
    kept, broken = (Record(source="folder", source_id=name, url=f"file:///{name}",
                           source_label="cats") for name in ("a.jpg", "b.jpg"))
    for record in (kept, broken):
        context.found(record)
    kept.file = FileInfo("images/folder/a.jpg", 10, "ab" * 32, 1, 1, "JPEG")
    context.finish(kept, "files", "downloaded")
    context.finish(broken, "download", "rejected", "corrupt image")
    context.count(kept, "failed", "sink", "not stored yet (jsonl: disk error)")
    context.refused(Refusal(kept.id, "folder", None, "left out"), "webdataset", first=True)
    context.refused(Refusal(kept.id, "folder", None, "left out"), "parquet", first=False)
    context.finish(kept, "sink", "stored")
    state.commit()

    summary = context.summary.to_dict()
    assert [row["source"] for row in summary["by_source_term"]] == ["cats"]
    row = summary["by_source_term"][0]
    assert (row["found"], row["downloaded"], row["rejected"], row["failed"], row["stored"]) \
        == (2, 1, 1, 2, 1)
    assert {(f["source"], f["stage"], f["reason"]) for f in summary["failures"]} == {
        ("cats", "download", "corrupt image"),
        ("cats", "sink", "not stored yet (jsonl: disk error)"),
        ("cats", "sink webdataset", "left out"), ("cats", "sink parquet", "left out")}
    assert state.record(kept.id).status == "done" and state.record(kept.id).sha256 == "ab" * 32
    assert state.record(broken.id).status == "rejected"
    state.close()
