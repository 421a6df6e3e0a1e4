"""The urls and folder sources."""

from __future__ import annotations

import json

import pytest
from conftest import FakePhoto, read_jsonl


def test_url_lists_in_every_format(flickr, recipe_file, harvest, tmp_path):
    flickr.photos = [FakePhoto(id=str(i), title="x") for i in range(1, 7)]
    base = flickr.url + "/img/"
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text(f"{base}1_l.jpg\n\n# a comment\n{base}2_l.jpg\n")
    (lists / "b.csv").write_text(f"url,caption,license,term\n{base}3_l.jpg,\"Un singe, 猿\","
                                 f"CC-BY-4.0,monkey\n{base}4_l.jpg,,,\n")
    (lists / "c.jsonl").write_text(json.dumps({"url": f"{base}5_l.jpg", "caption": "قرد"}) + "\n"
                                   + "not json\n" + json.dumps({"url": f"{base}6_l.jpg"}) + "\n")
    output = tmp_path / "out"
    recipe = recipe_file(f"""
terms: [monkey]
output: {output}
run: {{allow_private_addresses: true}}
sources:
  - {{use: urls, name: text, options: {{path: {lists}/a.txt}}}}
  - {{use: urls, name: table, options: {{path: {lists}/b.csv, term: cage}}}}
  - {{use: urls, name: lines, options: {{path: {lists}/c.jsonl}}}}
sinks: [jsonl]
""")
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = {r["url"].rsplit("/", 1)[-1]: r for r in read_jsonl(output / "records.jsonl")}
    assert len(records) == 6
    assert records["3_l.jpg"]["title"] == "Un singe, 猿"
    assert records["3_l.jpg"]["license"] == "CC-BY-4.0" and records["3_l.jpg"]["term"] == "monkey"
    assert records["4_l.jpg"]["term"] == "cage" and records["4_l.jpg"]["list_row"] == 3
    assert records["5_l.jpg"]["title"] == "قرد"
    assert "term" not in records["1_l.jpg"]
    assert len({r["id"] for r in records.values()}) == 6


def test_a_url_listed_many_times_is_stored_once(flickr, recipe_file, harvest, tmp_path):
    """The run state is read a chunk of records at a time; a URL seen again after its
    first copy was stored (in the same chunk or a later one) is still skipped."""
    flickr.photos = [FakePhoto(id=str(i), title="x") for i in range(1, 41)]
    flickr.image_latency = 0.002
    base = flickr.url + "/img/"
    lines = [f"{base}{i}_l.jpg" for i in range(1, 41)]
    listing = lines + lines[::-1] + lines[::3] * 3 + lines
    (tmp_path / "list.txt").write_text("\n".join(listing) + "\n")
    output = tmp_path / "out"
    recipe = recipe_file(f"""
terms: [x]
output: {output}
run: {{allow_private_addresses: true, batch_size: 1, concurrency: 2, rate_per_host: 1000}}
sources: [{{use: urls, options: {{path: list.txt}}}}]
""")
    for _ in range(2):
        status, out, err = harvest("run", recipe, "--no-progress")
        assert status == 0, err
        ids = [r["id"] for r in read_jsonl(output / "records.jsonl")]
        assert len(ids) == len(set(ids)) == 40


def _source(cls, tmp_path, **options):
    import logging

    from harvest.core.contract.plugin import Context
    from harvest.core.download.http import HttpClient

    declared = {o.name: o.default for o in cls.options}
    declared.update(options)
    cls.check_options(declared)
    http = HttpClient(rate_per_host=1000, timeout=10, retries=1, backoff=0.01, user_agent="t")
    return cls(declared, Context("t", tmp_path, tmp_path, [], http,
                              logging.getLogger("harvest.tests.sources")))


def _by_parts(source) -> tuple[list, list]:
    from harvest.core.record import Query

    whole = [(r.id, r.url, r.term, r.fields) for r in source.records(None)]
    parts = source.partitions(None, None)
    split = [(r.id, r.url, r.term, r.fields)
             for part, _ in parts
             for r in source.records(None if part is None else Query("", "", "", part))]
    return whole, split, parts


def test_a_url_list_splits_into_byte_ranges_that_give_the_whole_list(tmp_path):
    """What a cluster's workers read side by side, shard by shard, is the list itself: the
    same rows in the same order with the same row numbers, a caption with line breaks in
    it never cut, a leading BOM dropped."""
    from harvest.plugins.sources.urls import UrlListSource

    rows = ['url,caption,term']
    for i in range(400):
        caption = f'"line one {i}\nline ""two"", {i}"' if i % 7 == 0 else f"plain {i}"
        rows.append(f"http://example.org/{i}.jpg,{caption},{'t' + str(i % 3) if i % 2 else ''}")
        if i % 50 == 0:
            rows.append("")  # blank lines are skipped, in every shard
    (tmp_path / "list.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "list.txt").write_text("\ufeff" + "".join(f"http://example.org/{i}.jpg\n"
                                                          for i in range(500)))
    (tmp_path / "list.jsonl").write_text("".join(
        json.dumps({"url": f"http://example.org/{i}.jpg", "caption": f"c\n{i}"}) + "\n"
        + ("not json\n" if i % 90 == 0 else "") for i in range(300)))
    for name in ("list.csv", "list.txt", "list.jsonl"):
        source = _source(UrlListSource, tmp_path, path=str(tmp_path / name), shard_size=700)
        whole, split, parts = _by_parts(source)
        assert len(parts) > 10, name
        assert split == whole, name
        assert len(whole) in (400, 500, 300)
    csv_rows = [r for r in _source(UrlListSource, tmp_path, path=str(tmp_path / "list.csv"))
                .records(None)]
    assert csv_rows[7].fields["title"] == 'line one 7\nline "two", 7'
    assert csv_rows[0].fields["list_row"] == 2 and csv_rows[1].fields["list_row"] == 5
    # Small lists (and a count that binds) stay one shard.
    assert _source(UrlListSource, tmp_path, path=str(tmp_path / "list.txt")) \
        .partitions(None, None) == [(None, None)]
    assert _source(UrlListSource, tmp_path, path=str(tmp_path / "list.txt"), shard_size=700) \
        .partitions(None, 10) == [(None, 10)]


def test_a_folder_splits_into_runs_of_files_that_give_the_whole_folder(tmp_path):
    from harvest.plugins.sources.folder import FolderSource

    root = tmp_path / "photos"
    for folder, count in (("", 3), ("a", 25), ("a/deep", 4), ("b", 1), ("c", 0), ("d", 12)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / folder / f"{i:03d}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(8))
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "d" / "noext").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    source = _source(FolderSource, tmp_path, path=str(root), shard_size=7)
    whole, split, parts = _by_parts(source)
    assert len(whole) == 3 + 25 + 4 + 1 + 12 + 1
    assert split == whole
    assert len(parts) >= 6
    # A big folder is cut into several ranges; a part is a list of (folder, first, last).
    assert sum(1 for part, _ in parts for folder, _, _ in part if folder == "a") >= 3
    json.dumps([part for part, _ in parts])  # parts travel to cluster workers as JSON
    assert _source(FolderSource, tmp_path, path=str(root)).partitions(None, None) == [(None, None)]


def test_a_folder_recipe_needs_no_terms(recipe_file, harvest, tmp_path):
    from imagegen import make_image

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(make_image(3))
    recipe = recipe_file(f"""
output: {tmp_path / "out"}
sources: [{{use: folder, options: {{path: photos}}}}]
""")
    status, out, err = harvest("validate", recipe)
    assert status == 0 and "0 terms" in out, err
    assert harvest("run", recipe, "--no-progress")[0] == 0
    assert len(read_jsonl(tmp_path / "out" / "records.jsonl")) == 1


def test_url_lists_from_parquet_arrow_csv_and_tsv_with_named_columns(flickr, recipe_file,
                                                                     harvest, tmp_path):
    """img2dataset's inputs: a table with its own column names (url_col, caption_col there),
    and the columns asked for (save_additional_columns) carried into each record."""
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    flickr.photos = [FakePhoto(id=str(i), title="x") for i in range(1, 9)]
    base = flickr.url + "/img/"
    lists = tmp_path / "lists"
    lists.mkdir()

    def table(first: int):
        return pa.table({"URL": [f"{base}{first}_l.jpg", f"{base}{first + 1}_l.jpg"],
                         "TEXT": [f"caption {first}", None],
                         "similarity": [0.31, 0.29], "NSFW": ["UNLIKELY", "UNSURE"]})

    pq.write_table(table(1), lists / "a.parquet")
    feather.write_feather(table(3), lists / "b.arrow")
    (lists / "c.csv").write_text(f"URL,TEXT,similarity,NSFW\n{base}5_l.jpg,caption 5,0.31,"
                                 f"UNLIKELY\n{base}6_l.jpg,,0.29,UNSURE\n")
    (lists / "d.tsv").write_text(f"URL\tTEXT\tsimilarity\tNSFW\n{base}7_l.jpg\tcaption 7\t"
                                 f"0.31\tUNLIKELY\n{base}8_l.jpg\t\t0.29\tUNSURE\n")
    sources = "\n".join(
        f"  - {{use: urls, name: {name.split('.')[0]}, options: {{path: lists/{name}, "
        f"url_column: URL, caption_column: TEXT, "
        f"save_additional_columns: [similarity, NSFW]}}}}"
        for name in ("a.parquet", "b.arrow", "c.csv", "d.tsv"))
    output = tmp_path / "out"
    recipe = recipe_file(f"""
output: {output}
run: {{allow_private_addresses: true}}
sources:
{sources}
""")
    status, _, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    records = {r["url"].rsplit("/", 1)[-1]: r for r in read_jsonl(output / "records.jsonl")}
    assert len(records) == 8
    for first in (1, 3, 5, 7):
        assert records[f"{first}_l.jpg"]["title"] == f"caption {first}"
        assert records[f"{first}_l.jpg"]["NSFW"] == "UNLIKELY"
        assert "title" not in records[f"{first + 1}_l.jpg"]
        assert records[f"{first + 1}_l.jpg"]["NSFW"] == "UNSURE"
    # Parquet and Arrow keep the column's type; CSV and TSV have text only.
    assert records["1_l.jpg"]["similarity"] == records["3_l.jpg"]["similarity"] == 0.31
    assert records["5_l.jpg"]["similarity"] == records["7_l.jpg"]["similarity"] == "0.31"
    assert records["2_l.jpg"]["list_row"] == 2 and records["6_l.jpg"]["list_row"] == 3


def test_a_jsonl_list_whose_lines_have_keys_of_their_own_is_valid(recipe_file, harvest,
                                                                  tmp_path):
    """JSONL declares no columns: a key the first line lacks may be on the others, so
    validate does not judge the list by its first line (it refused this recipe)."""
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"url": "http://example.org/1.jpg"}) + "\n"
        + json.dumps({"url": "http://example.org/2.jpg", "caption": "a cat", "width": 10}) + "\n")
    recipe = recipe_file("""
output: out
sources: [{use: urls, options: {path: list.jsonl, caption_column: caption,
                                save_additional_columns: [width]}}]
""")
    status, out, err = harvest("validate", recipe)
    assert status == 0, err


@pytest.mark.parametrize("name", ["list.csv", "list.tsv", "list.parquet", "list.arrow"])
@pytest.mark.parametrize("option", ["url_column: link", "caption_column: TEXT",
                                    "save_additional_columns: [width, NSFW]"])
def test_a_column_the_list_lacks_is_one_line_naming_the_file_and_the_column(
        name, option, recipe_file, harvest, tmp_path):
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    table = pa.table({"url": ["http://example.org/1.jpg"], "width": [10]})
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(table, path)
    elif name.endswith(".arrow"):
        feather.write_feather(table, path)
    elif name.endswith(".jsonl"):
        path.write_text(json.dumps({"url": "http://example.org/1.jpg", "width": 10}) + "\n")
    else:
        separator = "\t" if name.endswith(".tsv") else ","
        path.write_text(f"url{separator}width\nhttp://example.org/1.jpg{separator}10\n")
    recipe = recipe_file(f"""
output: out
sources: [{{use: urls, options: {{path: {name}, {option}}}}}]
""")
    status, out, err = harvest("validate", recipe)
    missing = option.split(": ")[1].strip("[]").split(", ")[-1]
    assert status == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and f"no column {missing!r}" in lines[0]
    assert "it has: url, width" in lines[0]
    assert f"sources[0].options.{option.split(':')[0]}" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_plain_url_list_has_no_columns_to_save(recipe_file, harvest, tmp_path):
    (tmp_path / "list.txt").write_text("http://example.org/1.jpg\n")
    recipe = recipe_file("""
output: out
sources: [{use: urls, options: {path: list.txt, save_additional_columns: [width]}}]
""")
    status, _, err = harvest("validate", recipe)
    assert status == 2 and "list.txt is a plain list of URLs: it has no columns" in err
