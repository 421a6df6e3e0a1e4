"""The MongoDB sink through pymongo, against a real wire-protocol server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import bson
from conftest import FakePhoto, flickr_recipe, monkey_photos, read_jsonl

from harvest.core.output.crypto import ENCRYPTED, FieldCipher, Keyring

OWNER = "Ana Fotógrafa"


def mongo_recipe(flickr, output, mongo, key_file, run="", extra_sinks="", terms="[monkey]") -> str:
    return flickr_recipe(flickr.endpoint, output, run=run, terms=terms) + f"""
sinks:
  - use: mongodb
    options:
      uri: {mongo.uri}
      database: harvest_test
      collection: monkeys
      key_file: {key_file}
      timeout_ms: 500
{extra_sinks}"""


def test_upserts_encrypted_documents_once(flickr, mongo, recipe_file, harvest, tmp_path, key_file):
    flickr.photos = monkey_photos(12)
    output = tmp_path / "out"
    recipe = recipe_file(mongo_recipe(flickr, output, mongo, key_file))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    flickr.photos = monkey_photos(15)
    for path in (output / ".harvest").glob("state.sqlite*"):
        path.unlink()  # even without run state, upserts by id never duplicate
    assert harvest("run", recipe, "--no-progress")[0] == 0

    client = mongo.client()
    collection = client.harvest_test.monkeys
    documents = list(collection.find())
    assert len(documents) == 15 and len({d["id"] for d in documents}) == 15
    index_keys = {tuple(spec["key"]) for spec in collection.index_information().values()}
    assert ("id",) in {tuple(k for k, _ in key) for key in index_keys}
    unique = [spec for spec in collection.index_information().values() if spec.get("unique")]
    assert [list(spec["key"]) for spec in unique] == [[("id", 1)]]
    for document in documents:
        raw = bson.encode(document)
        assert OWNER.encode() not in raw and b"12345678@N00" not in raw
        assert set(document[ENCRYPTED]["fields"]) == {"owner", "owner_name", "path_alias"}
    cipher = FieldCipher(Keyring.load(key_file))
    plain = cipher.decrypt({k: v for k, v in documents[0].items() if k != "_id"})
    assert plain["owner_name"] == OWNER and plain["term"] == "monkey"
    client.close()


def test_server_stopped_and_restarted_mid_run_loses_nothing(flickr, mongo, recipe_file, harvest,
                                                            tmp_path, key_file):
    flickr.photos = monkey_photos(40)
    flickr.image_latency = 0.05
    output = tmp_path / "out"
    recipe = recipe_file(mongo_recipe(flickr, output, mongo, key_file,
                                      run="concurrency: 2\nbatch_size: 4\nlimit_per_term: 40"))

    def outage():
        time.sleep(0.4)
        mongo.stop()
        time.sleep(1.5)
        mongo.start()

    thread = threading.Thread(target=outage)
    thread.start()
    status, out, err = harvest("run", recipe, "--no-progress")
    thread.join()
    assert status == 0, err
    client = mongo.client()
    ids = [d["id"] for d in client.harvest_test.monkeys.find()]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert "failed a batch" in (output / ".harvest" / "harvest.log").read_text()
    totals = json.loads((output / ".harvest" / "last-run.json").read_text())["totals"]
    assert totals["stored"] == 40 and totals["failed"] == 0
    client.close()


def test_server_down_until_the_next_run(flickr, mongo, recipe_file, harvest, tmp_path, key_file):
    flickr.photos = monkey_photos(6)
    output = tmp_path / "out"
    recipe = recipe_file(mongo_recipe(flickr, output, mongo, key_file,
                                      run="sink_retry_seconds: 1",
                                      extra_sinks="  - use: jsonl\n"))
    mongo.stop()
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 3, err  # finished, but not everything is stored
    assert "incomplete" in out.splitlines()[0]
    assert "6 record(s) not finished; run again" in out
    assert len(read_jsonl(output / "records.jsonl")) == 6  # the other sink has them already
    fetched = flickr.image_requests()

    mongo.start()
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert flickr.image_requests() == fetched  # written from the files on disk
    client = mongo.client()
    assert client.harvest_test.monkeys.count_documents({}) == 6
    client.close()
    ids = [r["id"] for r in read_jsonl(output / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 6  # the JSONL sink was not written twice


def test_rekey_in_mongodb(flickr, mongo, recipe_file, harvest, tmp_path, key_file):
    from harvest.core.output.crypto import generate_key_file

    flickr.photos = monkey_photos(3)
    recipe = recipe_file(mongo_recipe(flickr, tmp_path / "out", mongo, key_file))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    new_key = tmp_path / "new.key"
    generate_key_file(new_key)
    status, out, _ = harvest("rekey", recipe, "--new-key-file", new_key)
    assert status == 0 and "mongodb: 3 record(s) re-encrypted" in out
    assert "mongodb: 0 record(s)" in harvest("rekey", recipe, "--new-key-file", new_key)[1]
    client = mongo.client()
    new_id = Keyring.load(new_key).current_id
    assert {d[ENCRYPTED]["key_id"] for d in client.harvest_test.monkeys.find()} == {new_id}
    client.close()


def test_decrypt_a_collection(flickr, mongo, recipe_file, harvest, tmp_path, key_file):
    import stat

    flickr.photos = monkey_photos(3)
    recipe = recipe_file(mongo_recipe(flickr, tmp_path / "out", mongo, key_file))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    target = tmp_path / "clear.jsonl"
    status, out, err = harvest("decrypt", "--mongo-uri", mongo.uri, "--database", "harvest_test",
                               "--collection", "monkeys", "--key-file", key_file, "-o", target)
    assert status == 0, err
    rows = read_jsonl(target)
    assert [r["id"] for r in rows] == ["flickr:1001", "flickr:1002", "flickr:1003"]
    assert {r["owner_name"] for r in rows} == {OWNER}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_same_content_from_two_runs_is_claimed_once(flickr, mongo, recipe_file, harvest, tmp_path,
                                                    key_file):
    """Two runs with their own outputs share a collection; the same picture under two ids
    is one original and one duplicate_of, decided by the contents collection's unique
    _id index, and rerunning changes nothing."""
    from imagegen import make_image

    picture = make_image(777, size=(160, 120))
    first = monkey_photos(3)
    second = [FakePhoto(id=str(2000 + i), title=f"ape {i}") for i in range(3)]
    first[1].image = second[2].image = picture
    flickr.photos = first + second
    recipe_a = recipe_file(mongo_recipe(flickr, tmp_path / "a", mongo, key_file), "a.yml")
    recipe_b = recipe_file(mongo_recipe(flickr, tmp_path / "b", mongo, key_file,
                                        terms="[ape]"), "b.yml")
    assert harvest("run", recipe_a, "--no-progress")[0] == 0
    assert harvest("run", recipe_b, "--no-progress")[0] == 0
    assert harvest("run", recipe_a, "--no-progress")[0] == 0  # idempotent
    client = mongo.client()
    documents = {d["id"]: d for d in client["harvest_test"]["monkeys"].find()}
    contents = list(client["harvest_test"]["monkeys.contents"].find())
    client.close()
    assert len(documents) == 6
    original, twin = f"flickr:{first[1].id}", f"flickr:{second[2].id}"
    assert documents[twin]["duplicate_of"] == original
    assert "duplicate_of" not in documents[original]
    assert [d for d in documents if documents[d].get("duplicate_of")] == [twin]
    assert len(contents) == 5 and {c["_id"] for c in contents} == {
        d["file"]["sha256"] for d in documents.values()}


def test_verify_sinks_writes_again_what_a_sink_lost(flickr, mongo, recipe_file, harvest,
                                                    tmp_path, key_file):
    """A store that lost acknowledged records (a restore from backup, a server that
    dropped writes): the state says done, so a plain rerun skips them; --verify-sinks finds
    them and writes them again, to that sink only."""
    flickr.photos = monkey_photos(20)
    output = tmp_path / "out"
    recipe = recipe_file(mongo_recipe(flickr, output, mongo, key_file, extra_sinks="  - use: jsonl\n"))
    assert harvest("run", recipe, "--no-progress")[0] == 0
    client = mongo.client()
    collection = client.harvest_test.monkeys
    lost = ["flickr:1003", "flickr:1007", "flickr:1011", "flickr:1019"]
    assert collection.delete_many({"id": {"$in": lost}}).deleted_count == 4
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert collection.count_documents({}) == 16  # a plain run trusts its state

    fetched = flickr.image_requests()
    status, out, err = harvest("run", recipe, "--no-progress", "--verify-sinks")
    assert status == 0, err
    assert "verify: 4 stored record(s) missing from a sink" in out
    assert sorted(d["id"] for d in collection.find()) == sorted(f"flickr:{p.id}"
                                                                for p in flickr.photos)
    ids = [r["id"] for r in read_jsonl(output / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 20  # the sink that had them was not written twice
    assert flickr.image_requests() == fetched  # from the files on disk
    status, out, err = harvest("run", recipe, "--no-progress", "--verify-sinks")
    assert "verify: every sink has every stored record" in out
    client.close()


def test_server_killed_mid_run_loses_no_acknowledged_write(flickr, mongo, recipe_file, harvest,
                                                          tmp_path, key_file):
    """kill -9 of the database in the middle of a run, restarted on the same files: with
    journaled writes nothing the run counted as stored is missing."""
    flickr.photos = monkey_photos(300)
    flickr.image_latency = 0.005
    output = tmp_path / "out"
    recipe = recipe_file(mongo_recipe(flickr, output, mongo, key_file,
                                      run="concurrency: 4\nbatch_size: 8\nlimit_per_term: 300\n"
                                          "sink_retry_seconds: 30"))

    def crash():
        client = mongo.client()
        deadline = time.monotonic() + 30
        while client.harvest_test.monkeys.estimated_document_count() < 60 \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        client.close()
        mongo.stop(graceful=False)
        time.sleep(1.0)
        mongo.start()

    thread = threading.Thread(target=crash)
    thread.start()
    status, out, err = harvest("run", recipe, "--no-progress")
    thread.join()
    assert status == 0, err
    client = mongo.client()
    ids = [d["id"] for d in client.harvest_test.monkeys.find()]
    assert len(ids) == len(set(ids)) == 300
    client.close()
    status, out, err = harvest("run", recipe, "--no-progress", "--verify-sinks")
    assert "verify: every sink has every stored record" in out
