"""``harvest get URLS OUTPUT``: img2dataset's one line, with a recipe written to resume."""

from __future__ import annotations

import io
import tarfile

import pytest
import yaml
from conftest import FakePhoto, read_jsonl
from PIL import Image


def _url_list(flickr, tmp_path, count: int = 5):
    flickr.photos = [FakePhoto(id=str(i), title="x") for i in range(1, count + 1)]
    path = tmp_path / "list.csv"
    path.write_text("link,text,similarity\n" + "".join(
        f"{flickr.url}/img/{i}_l.jpg,caption {i},0.{i}\n" for i in range(1, count + 1)))
    return path


def test_get_downloads_a_list_in_one_line_and_the_same_line_resumes(flickr, harvest, tmp_path):
    urls = _url_list(flickr, tmp_path)
    output = tmp_path / "out"
    command = ("get", urls, output, "--format", "webdataset", "--image-size", "64",
               "--url-col", "link", "--caption-col", "text",
               "--save-additional-columns", "similarity", "--allow-private-addresses",
               "--no-progress")
    status, out, err = harvest(*command)
    assert status == 0, err
    assert "complete" in out and f"harvest run {output / 'recipe.yml'}" in out
    records = read_jsonl(output / "records.jsonl")
    assert len(records) == 5 and flickr.image_requests() == 5
    by_name = {r["url"].rsplit("/", 1)[-1]: r for r in records}
    assert by_name["3_l.jpg"]["title"] == "caption 3" and by_name["3_l.jpg"]["similarity"] == "0.3"
    # img2dataset's default mode with --image-size: border, a square of that side.
    with tarfile.open(next((output / "webdataset").glob("*.tar"))) as tar:
        pictures = [m for m in tar if m.name.endswith(".jpg")]
        assert len(pictures) == 5
        assert Image.open(io.BytesIO(tar.extractfile(pictures[0]).read())).size == (64, 64)
    recipe = yaml.safe_load((output / "recipe.yml").read_text())
    assert recipe["images"] == {"resize_mode": "border", "image_size": 64}
    assert recipe["sources"][0]["options"]["url_column"] == "link"

    # The same line again, then the recipe it wrote: nothing downloaded twice.
    status, out, err = harvest(*command)
    assert status == 0, err
    status, out, err = harvest("run", output / "recipe.yml", "--no-progress")
    assert status == 0, err
    assert flickr.image_requests() == 5
    assert len(read_jsonl(output / "records.jsonl")) == 5

    # An edited recipe is not overwritten by the line: harvest run goes on with it.
    edited = (output / "recipe.yml").read_text().replace("image_size: 64", "image_size: 32")
    (output / "recipe.yml").write_text(edited)
    status, out, err = harvest(*command)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"`harvest run {output / 'recipe.yml'}` goes on with it" in err
    assert (output / "recipe.yml").read_text() == edited


def test_a_list_grown_since_is_finished_by_the_same_line(flickr, harvest, tmp_path):
    urls = _url_list(flickr, tmp_path, count=3)
    output = tmp_path / "out"
    command = ("get", urls, output, "--url-col", "link", "--allow-private-addresses",
               "--no-progress")
    assert harvest(*command)[0] == 0
    _url_list(flickr, tmp_path, count=6)
    status, out, err = harvest(*command)
    assert status == 0, err
    assert flickr.image_requests() == 6
    ids = [r["id"] for r in read_jsonl(output / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 6
    assert not (output / "webdataset").exists()  # --format files: images and records.jsonl


@pytest.mark.parametrize("fmt", ["tfrecord", "dummy", "arrow", "tar"])
def test_a_format_harvest_does_not_write_is_one_line_and_exit_2(fmt, flickr, harvest, tmp_path):
    urls = _url_list(flickr, tmp_path)
    status, out, err = harvest("get", urls, tmp_path / "out", "--format", fmt)
    assert status == 2 and not out
    assert len(err.strip().splitlines()) == 1
    assert f"--format {fmt}" in err and "webdataset, parquet" in err
    assert not (tmp_path / "out").exists()


def test_a_column_the_list_lacks_leaves_no_recipe_behind(flickr, harvest, tmp_path):
    urls = _url_list(flickr, tmp_path)
    output = tmp_path / "out"
    status, out, err = harvest("get", urls, output, "--no-progress")  # no column 'url'
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"{urls}: no column 'url' (it has: link, text, similarity)" in err
    assert not output.exists()
    status, out, err = harvest("get", urls, output, "--url-col", "link",
                               "--allow-private-addresses", "--no-progress")
    assert status == 0, err
    assert len(read_jsonl(output / "records.jsonl")) == 5


def test_get_writes_parquet_with_the_images(flickr, harvest, tmp_path):
    import pyarrow.parquet as pq

    urls = _url_list(flickr, tmp_path, count=2)
    output = tmp_path / "out"
    status, _, err = harvest("get", urls, output, "--url-col", "link", "--format", "parquet",
                             "--allow-private-addresses", "--no-progress")
    assert status == 0, err
    table = pq.read_table(next((output / "parquet").glob("*.parquet")))
    assert table.num_rows == 2 and all(table.column("image").to_pylist())
