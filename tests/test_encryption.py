"""Keys, field encryption, decrypt, rekey and export (JSONL sink)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import FakePhoto, flickr_recipe, monkey_photos, read_jsonl
from imagegen import make_image

from harvest.core.output.crypto import ENCRYPTED, FieldCipher, Keyring, generate_key_file

OWNER = "Zoë Fotógrafa 猿"


def photos():
    result = monkey_photos(4, ownername=OWNER, pathalias="zoe_alias")
    result[0].image = make_image(7, gps=(14.5995, 120.9842))
    return result


def run(harvest, recipe_file, flickr, output, sink_options, name="recipe.yml", enrichers="[exif]"):
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output)
                         + f"enrichers: {enrichers}\nsinks:\n  - use: jsonl\n"
                         + f"    options: {sink_options}\n", name)
    status, out, err = harvest("run", recipe, "--no-progress")
    return status, out, err, recipe


def test_keygen_makes_a_private_key_and_refuses_to_overwrite(tmp_path, harvest):
    path = tmp_path / "k" / "harvest.key"
    status, out, _ = harvest("keygen", "--key-file", path)
    assert status == 0 and "(mode 0600)" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() not in out
    status, _, err = harvest("keygen", "--key-file", path)
    assert status == 2 and "refusing to overwrite" in err


def test_keygen_refuses_a_git_work_tree_unless_forced(tmp_path, harvest):
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    path = tmp_path / "repo" / "secrets" / "harvest.key"
    status, _, err = harvest("keygen", "--key-file", path)
    assert status == 2 and "inside a git work tree" in err and not path.exists()
    assert harvest("keygen", "--key-file", path, "--force")[0] == 0


def test_encrypted_run_leaves_no_personal_field_in_clear_and_decrypts_exactly(
        flickr, recipe_file, harvest, tmp_path, key_file):
    flickr.photos = photos()
    clear_output, secret_output = tmp_path / "clear", tmp_path / "secret"
    status, *_ = run(harvest, recipe_file, flickr, clear_output, "{personal_fields: clear}", "a.yml")
    assert status == 0
    status, out, err, _ = run(harvest, recipe_file, flickr, secret_output,
                              f"{{personal_fields: encrypt, key_file: {key_file}}}", "b.yml")
    assert status == 0, err
    needles = [OWNER.encode(), b"zoe_alias", b"12345678@N00", b"Test Camera Owner", b"HarvestCam"]
    for path in secret_output.rglob("*"):
        if path.is_file() and "images" not in path.parts:
            data = path.read_bytes()
            assert not any(needle in data for needle in needles), (path, data[:200])
    encrypted = {r["id"]: r for r in read_jsonl(secret_output / "records.jsonl")}
    key_id = Keyring.load(key_file).current_id
    assert all(r[ENCRYPTED]["key_id"] == key_id for r in encrypted.values())
    assert set(encrypted["flickr:1001"][ENCRYPTED]["fields"]) == \
        {"owner", "owner_name", "path_alias", "exif", "exif_gps", "latitude", "longitude"}

    decrypted = tmp_path / "decrypted.jsonl"
    status, _, err = harvest("decrypt", secret_output / "records.jsonl", "--key-file", key_file,
                             "-o", decrypted)
    assert status == 0, err
    assert stat.S_IMODE(decrypted.stat().st_mode) == 0o600
    clear = {r["id"]: r for r in read_jsonl(clear_output / "records.jsonl")}
    for record in read_jsonl(decrypted):
        assert record == clear[record["id"]]
    assert clear["flickr:1001"]["owner_name"] == OWNER
    assert clear["flickr:1001"]["exif_gps"]["latitude"] == pytest.approx(14.5995, abs=1e-4)


def test_wrong_or_missing_key_is_one_line_and_writes_nothing(flickr, recipe_file, harvest,
                                                            tmp_path, key_file, monkeypatch):
    flickr.photos = photos()
    output = tmp_path / "out"
    assert run(harvest, recipe_file, flickr, output,
               f"{{personal_fields: encrypt, key_file: {key_file}}}")[0] == 0
    other = tmp_path / "other.key"
    generate_key_file(other)
    target = tmp_path / "decrypted.jsonl"
    status, out, err = harvest("decrypt", output / "records.jsonl", "--key-file", other,
                               "-o", target)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "does not decrypt" in err and "Traceback" not in err
    assert not target.exists() and not list(tmp_path.glob("decrypted*"))

    monkeypatch.delenv("HARVEST_KEY", raising=False)
    status, _, err, _ = run(harvest, recipe_file, flickr, tmp_path / "nokey",
                            "{personal_fields: encrypt}", "c.yml")
    assert status == 2 and "no encryption key: set HARVEST_KEY" in err
    assert not (tmp_path / "nokey" / "records.jsonl").exists()


def test_key_from_the_environment(flickr, recipe_file, harvest, tmp_path, key_file, monkeypatch):
    flickr.photos = photos()[:1]
    monkeypatch.setenv("HARVEST_KEY", key_file.read_text().strip())
    output = tmp_path / "out"
    assert run(harvest, recipe_file, flickr, output, "{personal_fields: encrypt}")[0] == 0
    clear = tmp_path / "clear.jsonl"
    status, _, _ = harvest("decrypt", output / "records.jsonl", "--key-env", "HARVEST_KEY",
                           "-o", clear)
    assert status == 0 and OWNER in clear.read_text(encoding="utf-8")


def test_key_file_readable_by_others_is_refused(flickr, recipe_file, harvest, tmp_path, key_file):
    flickr.photos = photos()[:1]
    os.chmod(key_file, 0o644)
    status, _, err, _ = run(harvest, recipe_file, flickr, tmp_path / "out",
                            f"{{personal_fields: encrypt, key_file: {key_file}}}")
    assert status == 2 and "readable by others" in err


def test_rekey_is_idempotent_and_resumed_runs_still_append(flickr, recipe_file, harvest,
                                                           tmp_path, key_file):
    flickr.photos = photos()
    output = tmp_path / "out"
    status, _, _, recipe = run(harvest, recipe_file, flickr, output,
                               f"{{personal_fields: encrypt, key_file: {key_file}}}")
    assert status == 0
    new_key = tmp_path / "new.key"
    generate_key_file(new_key)
    status, out, err = harvest("rekey", recipe, "--new-key-file", new_key)
    assert status == 0, err
    assert "jsonl: 4 record(s) re-encrypted" in out
    status, out, _ = harvest("rekey", recipe, "--new-key-file", new_key)
    assert "jsonl: 0 record(s) re-encrypted" in out
    assert harvest("decrypt", output / "records.jsonl", "--key-file", key_file,
                   "-o", tmp_path / "old.jsonl")[0] == 2
    status, _, _ = harvest("decrypt", output / "records.jsonl", "--key-file", new_key,
                           "-o", tmp_path / "new.jsonl")
    assert status == 0 and (tmp_path / "new.jsonl").read_text(encoding="utf-8").count(OWNER) == 4

    recipe.write_text(recipe.read_text().replace(str(key_file), str(new_key)))
    flickr.photos = photos() + monkey_photos(2, start=10)
    assert harvest("run", recipe, "--no-progress")[0] == 0
    ids = [r["id"] for r in read_jsonl(output / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 6


def test_export_is_an_image_folder_tree_with_a_reproducible_manifest(
        flickr, recipe_file, harvest, tmp_path, key_file):
    same = make_image(3)
    flickr.photos = [FakePhoto(id="1", title="monkey a"), FakePhoto(id="2", title="monkey b",
                     image=same), FakePhoto(id="3", title="monkey c", image=same),
                     FakePhoto(id="4", title="cage d", ownername=OWNER)]
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output, terms="[monkey, cage]")
                         + "enrichers: [license]\n"
                         + f"sinks: [{{use: jsonl, options: {{personal_fields: encrypt, "
                           f"key_file: {key_file}}}}}]\n")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    destination = tmp_path / "dataset"
    status, out, _ = harvest("export", output, destination, "--key-file", key_file)
    assert status == 0 and "3 images in 2 classes" in out

    # What an ImageFolder-style loader does: one class per folder, files inside.
    classes = sorted(p.name for p in destination.iterdir() if p.is_dir())
    samples = [(path, classes.index(path.parent.name))
               for path in sorted(destination.rglob("*.jpg"))]
    assert classes == ["cage", "monkey"]
    assert [label for _, label in samples] == [0, 1, 1]
    manifest = [json.loads(line) for line in (destination / "manifest.jsonl").open()]
    assert {m["path"] for m in manifest} == {p.relative_to(destination).as_posix()
                                             for p, _ in samples}
    cage = next(m for m in manifest if m["class"] == "cage")
    assert cage["attribution"].startswith('"cage d" by ' + OWNER)
    assert set(cage) >= {"path", "term", "lang", "scores", "license", "attribution", "country",
                         "city"}
    header = (destination / "manifest.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("path,class,id,source,term,lang")
    assert OWNER in (destination / "CREDITS.md").read_text(encoding="utf-8")

    again = tmp_path / "again"
    assert harvest("export", output, again, "--key-file", key_file)[0] == 0
    for name in ("manifest.jsonl", "manifest.csv", "CREDITS.md", "credits.csv"):
        assert (again / name).read_bytes() == (destination / name).read_bytes(), name

    listing = tmp_path / "listing"
    status, out, _ = harvest("export", output, listing, "--format", "manifest")
    assert status == 0
    rows = [json.loads(line) for line in (listing / "manifest.jsonl").open()]
    assert not list(listing.rglob("*.jpg"))
    assert all((listing / row["path"]).is_file() for row in rows)


def test_the_default_key_file_is_the_default_everywhere(flickr, recipe_file, harvest, tmp_path,
                                                        monkeypatch):
    """keygen writes ~/.config/harvest/harvest.key; the sinks, validate and decrypt find it
    there without being told."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HARVEST_KEY", raising=False)
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output)
                         + "sinks: [{use: jsonl, options: {personal_fields: encrypt}}]\n")
    status, _, err = harvest("validate", recipe)
    assert status == 2 and "harvest keygen" in err and ".config/harvest/harvest.key" in err
    assert harvest("keygen")[0] == 0
    assert (tmp_path / "home" / ".config" / "harvest" / "harvest.key").is_file()
    flickr.photos = monkey_photos(2, ownername=OWNER)
    assert harvest("validate", recipe)[0] == 0
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert OWNER.encode() not in (output / "records.jsonl").read_bytes()
    status, _, err = harvest("decrypt", output / "records.jsonl", "-o", tmp_path / "clear.jsonl")
    assert status == 0, err
    assert OWNER in (tmp_path / "clear.jsonl").read_text(encoding="utf-8")


def hold_lock(output):
    """Another process holding the output's lock, as a run does, until it is killed."""
    import subprocess
    import sys

    lock = output / ".harvest" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, b"%d\\n" % os.getpid())
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_rekey_and_takedown_refuse_an_output_another_process_writes(
        flickr, recipe_file, harvest, tmp_path, key_file):
    flickr.photos = photos()
    output = tmp_path / "out"
    status, _, _, recipe = run(harvest, recipe_file, flickr, output,
                               f"{{personal_fields: encrypt, key_file: {key_file}}}")
    assert status == 0
    before = (output / "records.jsonl").read_bytes()
    new_key = tmp_path / "new.key"
    generate_key_file(new_key)
    holder = hold_lock(output)
    try:
        for command in (("rekey", recipe, "--new-key-file", new_key),
                        ("takedown", recipe, "--source-id", "flickr:" + flickr.photos[0].id)):
            status, out, err = harvest(*command)
            assert status == 2, (command, out, err)
            assert err.count("\n") == 1 and f"(pid {holder.pid})" in err, err
            assert (output / "records.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert harvest("rekey", recipe, "--new-key-file", new_key)[0] == 0


def test_rekey_beside_a_running_harvest_loses_no_record(flickr, recipe_file, harvest, tmp_path,
                                                        key_file, isolated_home):
    from test_resume import start_run, wait_for_lines, wait_for_lock

    flickr.photos = monkey_photos(40)
    flickr.image_latency = 0.05
    output = tmp_path / "out"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output,
                                       run="concurrency: 2\nbatch_size: 4\nlimit_per_term: 40")
                         + f"sinks: [{{use: jsonl, options: {{personal_fields: encrypt, "
                           f"key_file: {key_file}}}}}]\n")
    new_key = tmp_path / "new.key"
    generate_key_file(new_key)
    process = start_run(recipe, isolated_home)
    wait_for_lock(output, process)
    wait_for_lines(output / "records.jsonl", 4, process)
    status, _, err = harvest("rekey", recipe, "--new-key-file", new_key)
    assert status == 2 and f"(pid {process.pid})" in err, err
    assert process.wait(timeout=60) == 0, process.communicate()
    ids = [r["id"] for r in read_jsonl(output / "records.jsonl")]
    assert sorted(ids) == sorted({"flickr:" + p.id for p in flickr.photos})


def harvested_into_every_sink(flickr, recipe_file, harvest, output, key_file):
    """A harvest of four photos into JSONL, WebDataset and Parquet, all encrypting with
    ``key_file``; returns its recipe."""
    flickr.photos = photos()
    protect = f"personal_fields: encrypt, key_file: {key_file}"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output) + f"""
sinks:
  - {{use: jsonl, options: {{{protect}}}}}
  - {{use: webdataset, options: {{shard_size: 3, {protect}}}}}
  - {{use: parquet, options: {{shard_size: 3, {protect}}}}}
""")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    return recipe


def test_rekey_re_encrypts_the_shard_sinks_too(flickr, recipe_file, harvest, tmp_path, key_file):
    import pyarrow.parquet as pq
    from test_takedown import shard_documents

    output = tmp_path / "out"
    recipe = harvested_into_every_sink(flickr, recipe_file, harvest, output, key_file)
    new_key = tmp_path / "new.key"
    generate_key_file(new_key)
    status, out, err = harvest("rekey", recipe, "--new-key-file", new_key)
    assert status == 0, err
    for label in ("jsonl", "webdataset", "parquet"):
        assert f"{label}: 4 record(s) re-encrypted" in out, out
    new_id = Keyring.load(new_key, None).current_id
    documents = {**shard_documents(output), "jsonl": read_jsonl(output / "records.jsonl")}
    for label, stored in documents.items():
        assert len(stored) == 4, label
        assert {d[ENCRYPTED]["key_id"] for d in stored} == {new_id}, label
    assert pq.read_table(output / "parquet").num_rows == 4
    status, out, _ = harvest("rekey", recipe, "--new-key-file", new_key)
    assert status == 0 and "parquet: 0 record(s) re-encrypted" in out


def test_a_rekey_killed_between_sinks_is_finished_by_the_next(flickr, recipe_file, harvest,
                                                              tmp_path, key_file):
    """kill -9 after each sink of a rekey: the output is under two keys for a moment, and
    the next rekey finishes it (documents already under the new key are skipped), with
    every record still there and readable with the new key alone."""
    from test_takedown import killed_at, shard_documents

    output = tmp_path / "out"
    recipe = harvested_into_every_sink(flickr, recipe_file, harvest, output, key_file)
    old_id = Keyring.load(key_file, None).current_id
    for step, done in (("rekeyed:jsonl", 1), ("rekeyed:webdataset", 2)):
        new_key = tmp_path / f"new-{done}.key"
        generate_key_file(new_key)
        new_id = Keyring.load(new_key, None).current_id
        killed_at(step, "rekey", recipe, "--new-key-file", new_key)
        documents = {"jsonl": read_jsonl(output / "records.jsonl"), **shard_documents(output)}
        for position, label in enumerate(("jsonl", "webdataset", "parquet")):
            assert {d[ENCRYPTED]["key_id"] for d in documents[label]} == \
                ({new_id} if position < done else {old_id}), (step, label)
        status, out, err = harvest("rekey", recipe, "--new-key-file", new_key)
        assert status == 0, err
        assert "jsonl: 0 record(s) re-encrypted" in out and "parquet: 4 record(s)" in out
        documents = {"jsonl": read_jsonl(output / "records.jsonl"), **shard_documents(output)}
        reader = FieldCipher(Keyring.load(new_key, None))
        for label, stored in documents.items():
            assert len(stored) == 4, (step, label)
            assert {d[ENCRYPTED]["key_id"] for d in stored} == {new_id}, (step, label)
            assert all(ENCRYPTED not in reader.decrypt(d) for d in stored), (step, label)
        # The next round rotates from this key: the recipe points at it now.
        recipe.write_text(recipe.read_text().replace(str(key_file), str(new_key)))
        key_file, old_id = new_key, new_id


def test_rekey_touches_no_sink_when_one_cannot_re_encrypt(flickr, recipe_file, harvest,
                                                           tmp_path, key_file, monkeypatch):
    import harvest.plugins as builtin_plugins

    monkeypatch.setattr(builtin_plugins, "BUILTIN_MODULES",
                        builtin_plugins.BUILTIN_MODULES + ("enricher_plugins",))
    flickr.photos = photos()
    output = tmp_path / "out"
    protect = f"personal_fields: encrypt, key_file: {key_file}"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, output) + f"""
sinks:
  - {{use: jsonl, options: {{{protect}}}}}
  - {{use: forgetful, options: {{{protect}}}}}
""")
    assert harvest("run", recipe, "--no-progress")[0] == 0
    before = (output / "records.jsonl").read_bytes()
    new_key = tmp_path / "new.key"
    generate_key_file(new_key)
    status, out, err = harvest("rekey", recipe, "--new-key-file", new_key)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "sinks[1]" in err and "cannot re-encrypt" in err, err
    assert (output / "records.jsonl").read_bytes() == before
