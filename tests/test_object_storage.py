"""Shards and exports to object storage through fsspec/s3fs, against moto's S3 server on
127.0.0.1 (the S3 REST wire protocol, driven by botocore): never a mock object."""

from __future__ import annotations

import json
import tarfile

import pytest
from conftest import flickr_recipe, monkey_photos

pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A client of the server, with throwaway credentials in the environment (where
    harvest's fsspec reads them, like any AWS tool)."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = boto3.client("s3", endpoint_url=s3_server)
    return client


def sink_recipe(flickr, output, endpoint, bucket, keep_local=True) -> str:
    return flickr_recipe(flickr.endpoint, output) + f"""
sinks:
  - jsonl
  - use: webdataset
    options:
      shard_size: 4
      upload_to: s3://{bucket}/shards
      storage_options: {{endpoint_url: "{endpoint}"}}
      keep_local: {str(keep_local).lower()}
"""


def test_shards_are_uploaded_whole_and_resumed_runs_add_no_sample_twice(
        s3, s3_server, flickr, recipe_file, harvest, tmp_path):
    s3.create_bucket(Bucket="datasets")
    flickr.photos = monkey_photos(10)
    output = tmp_path / "out"
    recipe = recipe_file(sink_recipe(flickr, output, s3_server, "datasets", keep_local=False))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="datasets")["Contents"])
    assert keys == ["shards/00000.tar", "shards/00000_stats.json", "shards/00001.tar",
                    "shards/00001_stats.json", "shards/00002.tar", "shards/00002_stats.json"]
    assert not list((output / "webdataset").glob("*.tar"))  # keep_local: false

    def remote_ids():
        ids = []
        for key in keys:
            if key.endswith(".tar"):
                body = s3.get_object(Bucket="datasets", Key=key)["Body"].read()
                with tarfile.open(fileobj=__import__("io").BytesIO(body)) as tar:
                    ids += [json.load(tar.extractfile(m))["id"] for m in tar
                            if m.name.endswith(".json")]
        return ids

    assert sorted(remote_ids()) == sorted(f"flickr:{p.id}" for p in flickr.photos)
    # More photos: the last shard (2 samples) is completed and re-uploaded, none twice.
    flickr.photos = monkey_photos(14)
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="datasets")["Contents"])
    assert [k for k in keys if k.endswith(".tar")] == [f"shards/0000{i}.tar" for i in range(4)]
    ids = remote_ids()
    assert len(ids) == len(set(ids)) == 14


def test_missing_bucket_and_refused_credentials_are_one_line(s3, s3_server, flickr,
                                                             recipe_file, harvest, tmp_path,
                                                             monkeypatch):
    flickr.photos = monkey_photos(2)
    recipe = recipe_file(sink_recipe(flickr, tmp_path / "out", s3_server, "no-such-bucket"))
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1, err

    bad = recipe_file(flickr_recipe(flickr.endpoint, tmp_path / "out2") + """
sinks:
  - use: webdataset
    options: {upload_to: "s3://b/x", storage_options: {secret: abc}}
""", "bad.yml")
    status, _, err = harvest("validate", bad)
    assert status == 2 and "storage_options" in err and "environment" in err, err


def test_export_to_a_bucket(s3, s3_server, flickr, recipe_file, harvest, tmp_path):
    s3.create_bucket(Bucket="exports")
    flickr.photos = monkey_photos(3)
    output = tmp_path / "out"
    assert harvest("run", recipe_file(flickr_recipe(flickr.endpoint, output)),
                   "--no-progress")[0] == 0
    status, out, err = harvest("export", output, "s3://exports/monkeys", "--format", "hf",
                               "--storage-option", f"endpoint_url={s3_server}")
    assert status == 0, err
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="exports")["Contents"]}
    assert {"monkeys/metadata.jsonl", "monkeys/README.md", "monkeys/croissant.json",
            "monkeys/CREDITS.md"} <= keys
    assert sum(k.endswith(".jpg") for k in keys) == 3
    # Not over an export that is already there.
    status, _, err = harvest("export", output, "s3://exports/monkeys",
                             "--storage-option", f"endpoint_url={s3_server}")
    assert status == 2 and "not empty" in err


def test_credentials_in_a_url_are_refused_in_one_line_never_echoed(flickr, recipe_file,
                                                                   harvest, tmp_path):
    """``user:password@`` in an upload_to URL fails validate, naming the key; in export's
    destination it is one line, exit 2, no traceback; neither shows the credentials."""
    key, secret = "AKIAEXAMPLEKEY", "wJalr/SECRET+xyz"
    recipe = recipe_file(flickr_recipe(flickr.endpoint, tmp_path / "out") + f"""
sinks:
  - use: webdataset
    options: {{upload_to: "s3://{key}:{secret}@bucket/shards"}}
""")
    for command in ("validate", "run"):
        status, out, err = harvest(command, recipe, "--no-progress")[:3] if command == "run" \
            else harvest(command, recipe)
        assert status == 2, (command, out, err)
        assert len(err.strip().splitlines()) == 1 and "upload_to" in err, err
        assert "credentials" in err and "environment" in err, err
        assert key not in out + err and secret not in out + err, err
    flickr.photos = monkey_photos(2)
    output = tmp_path / "harvested"
    assert harvest("run", recipe_file(flickr_recipe(flickr.endpoint, output), "ok.yml"),
                   "--no-progress")[0] == 0
    for destination in (f"s3://{key}:{secret}@bucket/", f"s3://{key}@bucket/x",
                        f"gs://{key}:{secret}@bucket"):
        status, out, err = harvest("export", output, destination)
        assert status == 2, (destination, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "credentials" in err and key not in out + err and secret not in out + err, err
