"""The urls and folder sources."""

from __future__ import annotations

import json

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
