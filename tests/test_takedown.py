"""`harvest takedown` and `harvest purge`: gone from every sink and file, logged, and
never collected again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import FakePhoto, flickr_recipe, monkey_photos, read_jsonl
from imagegen import make_image

SINKS = """
sinks:
  - jsonl
  - use: webdataset
    options: {shard_size: 3}
  - use: parquet
    options: {shard_size: 4}
"""


def shard_documents(output) -> dict[str, list[dict]]:
    """The documents in the webdataset and parquet shards, as their readers see them."""
    import pyarrow.parquet as pq
    import webdataset as wds

    tars = sorted(str(p) for p in (output / "webdataset").glob("*.tar"))
    return {
        "webdataset": [json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)],
        "parquet": [json.loads(text) for text in pq.read_table(
            output / "parquet", columns=["record"]).column("record").to_pylist()],
    }


def everywhere(output) -> dict[str, set[str]]:
    found = {label: {d["id"] for d in documents}
             for label, documents in shard_documents(output).items()}
    return {"jsonl": {r["id"] for r in read_jsonl(output / "records.jsonl")}, **found}


def test_takedown_removes_everywhere_and_for_good(flickr, recipe_file, harvest, tmp_path):
    twin = make_image(4242, size=(120, 90))
    flickr.photos = monkey_photos(6)
    flickr.photos[1].image = flickr.photos[4].image = twin  # the same picture twice
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output) + SINKS)
    assert harvest("run", recipe, "--no-progress")[0] == 0
    url = next(r["url"] for r in read_jsonl(output / "records.jsonl")
               if r["id"] == "flickr:" + flickr.photos[1].id)
    path = next(r["file"]["path"] for r in read_jsonl(output / "records.jsonl")
                if r["id"] == "flickr:" + flickr.photos[1].id)

    status, out, err = harvest("takedown", recipe, "--url", url, "--reason", "owner asked")
    assert status == 0, err
    gone = {"flickr:" + flickr.photos[1].id, "flickr:" + flickr.photos[4].id}
    assert "taken down: 2 records, 1 image file" in out
    for sink, ids in everywhere(output).items():
        assert not ids & gone, sink
        assert len(ids) == 4, sink
    assert not (output / path).exists()
    audit = [json.loads(line) for line in (output / "takedowns.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "takedown" and set(audit[-1]["ids"]) == gone
    assert audit[-1]["reason"] == "owner asked" and audit[-1]["url"] == url

    # The next run stores neither again, nor the same picture under a new id.
    flickr.photos.append(FakePhoto(id="9999", title="monkey again", image=twin))
    status, out, _ = harvest("run", recipe, "--no-progress")
    assert status == 0
    assert everywhere(output)["jsonl"] == everywhere(output)["webdataset"]
    ids = everywhere(output)["jsonl"]
    assert not ids & gone and "flickr:9999" not in ids and len(ids) == 4
    assert "taken down" in out


def test_takedown_by_owner_needs_the_key_of_an_encrypted_harvest(flickr, recipe_file, harvest,
                                                                 tmp_path, key_file):
    flickr.photos = monkey_photos(3) + [FakePhoto(id="77", title="monkey", ownername="Zé Lima")]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output) + f"""
sinks: [{{use: jsonl, options: {{personal_fields: encrypt, key_file: {key_file}}}}}]
""")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    status, _, err = harvest("takedown", output, "--owner", "Zé Lima")
    assert status == 2 and "no record matches" in err and "--key-file" in err
    status, out, err = harvest("takedown", output, "--owner", "zé lima", "--key-file", key_file)
    assert status == 0, err
    assert [r["id"] for r in read_jsonl(output / "records.jsonl")].count("flickr:77") == 0
    assert len(read_jsonl(output / "records.jsonl")) == 3
    log = (output / "takedowns.jsonl").read_text()
    assert "Zé Lima" not in log and "Lima" not in log and '"owner": "sha256:' in log


def test_purge_deletes_what_is_past_retention(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = monkey_photos(5)
    output = tmp_path / "out"
    text = "retain_days: 30\n" + flickr_recipe(flickr.endpoint, output)
    recipe = recipe_file(text)
    assert harvest("run", recipe, "--no-progress")[0] == 0
    records = read_jsonl(output / "records.jsonl")
    old = records[:2]
    past = time.time() - 40 * 86400
    for record in old:
        os.utime(output / record["file"]["path"], (past, past))

    status, out, err = harvest("purge", recipe, "--keep-metadata")
    assert status == 0, err
    assert "purged: 2 image files" in out
    assert len(read_jsonl(output / "records.jsonl")) == 5  # metadata kept
    assert not (output / old[0]["file"]["path"]).exists()

    # A run warns when the harvest holds images past its retention.
    import sqlite3

    with sqlite3.connect(output / ".harvest" / "state.sqlite") as db:
        db.execute("UPDATE records SET updated = ?", (past,))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0 and "older than retain_days (30)" in err, err

    status, out, err = harvest("purge", output, "--older-than", "0m")
    assert status == 0, err
    left = read_jsonl(output / "records.jsonl")
    assert sorted(r["id"] for r in left) == sorted(r["id"] for r in old)  # files purged before
    assert not list((output / "images").rglob("*.jpg"))
    assert [json.loads(line)["action"] for line in
            (output / "takedowns.jsonl").read_text().splitlines()] == ["purge", "purge"]
    # The output folder knows its recipe, and so its retain_days; without it, none.
    status, out, err = harvest("purge", output)
    assert status == 0 and "purged: 0 records, 0 image files" in out, err
    recipe.rename(recipe.with_name("moved.yml"))
    status, _, err = harvest("purge", output)
    assert status == 2 and "--older-than" in err


def test_takedown_reaches_mongodb(flickr, mongo, recipe_file, harvest, tmp_path, key_file):
    from test_mongodb import mongo_recipe

    flickr.photos = monkey_photos(4)
    output = tmp_path / "out"
    recipe = recipe_file(mongo_recipe(flickr, output, mongo, key_file,
                                      extra_sinks="  - jsonl"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    target = "flickr:" + flickr.photos[2].id
    status, out, err = harvest("takedown", recipe, "--source-id", target)
    assert status == 0, err
    assert "mongodb: 1 removed" in out and "jsonl: 1 removed" in out
    collection = mongo.client().harvest_test.monkeys
    assert collection.count_documents({}) == 3 and not collection.find_one({"id": target})
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert collection.count_documents({}) == 3


def harvested(flickr, recipe_file, harvest, tmp_path, sinks=SINKS):
    """A finished harvest of six pictures."""
    flickr.photos = monkey_photos(6)
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output) + sinks)
    assert harvest("run", recipe, "--no-progress")[0] == 0
    return recipe, output


def killed_at(step: str, *args) -> None:
    from test_resume import HARVEST

    process = subprocess.run([HARVEST, *map(str, args)], capture_output=True, text=True,
                             env=dict(os.environ, HARVEST_TEST_KILL_AT=step), timeout=60)
    assert process.returncode == -signal.SIGKILL, (step, process.stdout, process.stderr)


def audit_lines(output) -> list[dict]:
    log = output / "takedowns.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("step", ["decided", "audited", "removed:jsonl", "removed:webdataset",
                                  "removed:parquet", "deleted"])
def test_a_takedown_killed_at_any_step_is_finished_by_the_next(flickr, recipe_file, harvest,
                                                               tmp_path, step):
    recipe, output = harvested(flickr, recipe_file, harvest, tmp_path)
    target = "flickr:" + flickr.photos[2].id
    path = next(r["file"]["path"] for r in read_jsonl(output / "records.jsonl")
                if r["id"] == target)
    killed_at(step, "takedown", recipe, "--source-id", target, "--reason", "owner asked")
    # A run in between, even one told to check its sinks, never puts the picture back.
    status, _, err = harvest("run", recipe, "--no-progress", "--verify-sinks")
    assert status == 0 and "a takedown or purge was interrupted" in err, err
    for sink, ids in everywhere(output).items():
        assert len(ids) in (5, 6), (step, sink)

    status, out, err = harvest("takedown", recipe, "--source-id", target)
    assert status == 0, err
    for sink, ids in everywhere(output).items():
        assert target not in ids and len(ids) == 5, (step, sink)
    assert not (output / path).exists()
    assert [(a["action"], a["ids"], a["reason"]) for a in audit_lines(output)] == [
        ("takedown", [target], "owner asked")]
    assert harvest("run", recipe, "--no-progress", "--verify-sinks")[0] == 0
    for sink, ids in everywhere(output).items():
        assert target not in ids and len(ids) == 5, (step, sink)


@pytest.mark.parametrize("step", ["decided", "audited", "removed:webdataset", "deleted"])
def test_a_purge_killed_at_any_step_is_finished_by_the_next(flickr, recipe_file, harvest,
                                                            tmp_path, step):
    recipe, output = harvested(flickr, recipe_file, harvest, tmp_path)
    old = read_jsonl(output / "records.jsonl")[:3]
    past = time.time() - 40 * 86400
    for record in old:
        os.utime(output / record["file"]["path"], (past, past))
    killed_at(step, "purge", recipe, "--older-than", "30d")

    status, out, err = harvest("purge", recipe, "--older-than", "30d")
    assert status == 0, err
    gone = {r["id"] for r in old}
    for sink, ids in everywhere(output).items():
        assert not ids & gone and len(ids) == 3, (step, sink)
    assert not any((output / r["file"]["path"]).exists() for r in old)
    assert [(a["action"], sorted(a["ids"])) for a in audit_lines(output)] == [
        ("purge", sorted(gone))]


def test_takedown_of_an_output_folder_reaches_its_shard_sinks(flickr, recipe_file, harvest,
                                                              tmp_path):
    recipe, output = harvested(flickr, recipe_file, harvest, tmp_path)
    first, second = ("flickr:" + photo.id for photo in flickr.photos[1:3])
    status, out, err = harvest("takedown", output, "--source-id", first)
    assert status == 0, err
    assert "webdataset: 1 removed" in out and "parquet: 1 removed" in out
    for sink, ids in everywhere(output).items():
        assert first not in ids and len(ids) == 5, sink

    # Without the recipe the run recorded, the shard sinks cannot be reached: said, not
    # claimed, and the takedown stays pending until it is given.
    recipe.rename(tmp_path / "moved.yml")
    status, out, err = harvest("takedown", output, "--source-id", second)
    assert status == 3
    assert err.strip().startswith("harvest: error: not reached: webdataset, parquet")
    assert err.count("\n") == 1 and "give the recipe" in err
    assert second not in everywhere(output)["jsonl"]
    assert second in everywhere(output)["parquet"]
    status, out, err = harvest("takedown", tmp_path / "moved.yml", "--source-id", second)
    assert status == 0, err
    for sink, ids in everywhere(output).items():
        assert not {first, second} & ids and len(ids) == 4, sink
    assert [a["ids"] for a in audit_lines(output)] == [[first], [second]]


def test_a_derived_store_declaration_is_checked_before_any_sql(tmp_path):
    """derived.json sits in the output folder, where anyone may have written it: a name
    that is not a plain SQL name is refused (nothing deleted from anywhere), naming the file."""
    import sqlite3

    from harvest.core.errors import UsageError
    from harvest.core.output.derived import declare, forget_derived

    state = tmp_path / ".harvest"
    declare(state, "labels.sqlite", "labels", "sha256", "sha256")
    db = sqlite3.connect(state / "labels.sqlite")
    db.execute("CREATE TABLE labels (sha256 TEXT PRIMARY KEY, labels TEXT)")
    db.executemany("INSERT INTO labels VALUES (?, '{}')", [("a" * 64,), ("b" * 64,)])
    db.commit()
    db.close()
    assert forget_derived([state], {"a" * 64}, set()) == 1
    (state / "derived.json").write_text(json.dumps([{
        "file": "labels.sqlite", "table": 'labels" WHERE 1; --', "column": "sha256",
        "key": "sha256"}]))
    with pytest.raises(UsageError, match="derived.json"):
        forget_derived([state], {"b" * 64}, set())
    db = sqlite3.connect(state / "labels.sqlite")
    assert db.execute("SELECT count(*) FROM labels").fetchone()[0] == 1
    db.close()


def test_near_duplicates_follow_every_link_of_a_record(tmp_path):
    """A record can be a later copy of one picture and set aside for another: a takedown
    of either, with near-duplicates, takes it (one link per record kept only the last)."""
    from harvest.core.output.takedown import select

    records = tmp_path / "records.jsonl"
    rows = [{"id": "a", "file": {"sha256": "1" * 64, "path": "images/a.jpg"}},
            {"id": "b", "file": {"sha256": "2" * 64, "path": "images/b.jpg"}},
            {"id": "c", "near_duplicate_of": "a",
             "file": {"sha256": "3" * 64, "path": "images/c.jpg"}}]
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for target, expected in (("1", {"a", "c", "b"}), ("2", {"b", "c", "a"})):
        chosen = select(records, sha256=target * 64, near_duplicates=True,
                        set_aside_copies={"c": "b"})
        assert chosen.ids == expected, (target, chosen.ids)
    assert select(records, sha256="1" * 64, set_aside_copies={"c": "b"}).ids == {"a"}
