"""The embed and relevance enrichers: EfficientNet-Lite0 read without torch and run on
onnxruntime, held to the reference implementation; embeddings stored once, resumably;
relevance scores that rank real photos of a term above the others."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import test_review

from harvest.core.output.embeddings import EmbeddingStore, projection
from harvest.plugins.enrichers import efficientnet_lite as lite

review_server = test_review.review_server  # the fixture: a running `harvest review`
request = test_review.request

FIXTURE = Path(__file__).parent / "fixtures" / "efficientnet_lite0_reference.npz"
SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "exif-samples" / "jpg"
BUILDINGS = ["gps/DSCN0025.jpg", "gps/DSCN0027.jpg", "gps/DSCN0029.jpg", "gps/DSCN0038.jpg",
             "gps/DSCN0040.jpg", "gps/DSCN0042.jpg"]  # streets and squares of one town
NOT_BUILDINGS = ["gps/DSCN0012.jpg", "gps/DSCN0021.jpg",  # a park, a monument among trees
                 "exif-org/fujifilm-mx1700.jpg", "exif-org/sony-powershota5.jpg"]  # starfish, pumpkin


@pytest.fixture(scope="module")
def network():
    return lite.Network()


def test_the_network_matches_the_reference_implementation(network):
    """Features and logits within 1e-4 of efficientnet_lite_pytorch on torch (the fixture),
    for inputs made from arithmetic and for real photos, preprocessed here."""
    reference = np.load(FIXTURE)
    photos = [lite.preprocess(lite.load_image(SAMPLES / name)) for name in reference["photos"]]
    inputs = np.concatenate([lite.reference_patterns(), np.stack(photos)])
    features, logits = network.run(inputs)
    assert np.abs(features - reference["features"]).max() < 1e-4
    assert np.abs(logits - reference["logits"]).max() < 1e-4
    names = lite.ImageNetTable().names
    best = [names[i] for i in logits[3:].argmax(axis=1)]
    assert best == ["starfish", "jack-o'-lantern", "cannon", "monastery"]


def _legacy_file(path: Path, payload) -> None:
    with path.open("wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump(payload, handle, protocol=2)
        pickle.dump([], handle, protocol=2)


class _Runs:
    def __reduce__(self):
        import os
        return (os.system, ("touch ran-code",))


def test_a_weights_file_that_asks_for_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _legacy_file(tmp_path / "evil.pth", {"_fc.weight": _Runs()})
    with pytest.raises(lite.WeightsError, match="posix.system|os.system"):
        lite.read_legacy_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "ran-code").exists()
    (tmp_path / "short.pth").write_bytes((tmp_path / "evil.pth").read_bytes()[:20])
    with pytest.raises(lite.WeightsError):
        lite.read_legacy_state_dict(tmp_path / "short.pth")
    # Code in a header pickle, before the state dict: refused too (it ran before).
    with (tmp_path / "header.pth").open("wb") as handle:
        pickle.dump(_Runs(), handle, protocol=2)
    with pytest.raises(lite.WeightsError):
        lite.read_legacy_state_dict(tmp_path / "header.pth")
    assert not (tmp_path / "ran-code").exists()


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    """A storage of 4 floats declared as 4,000,000 read past the buffer (a segfault)."""
    with (tmp_path / "long.pth").open("wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)

        class Persist(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", "FloatStorage", "0", "cpu", 4) if obj is marker else None

        marker = object()

        class Rebuild:
            def __reduce__(self):
                import torch_stub
                return (torch_stub._rebuild_tensor_v2, (marker, 0, (2000, 2000), (2000, 1)))

        import sys
        import types
        stub = types.ModuleType("torch._utils")
        stub._rebuild_tensor_v2 = lambda *a: None
        stub._rebuild_tensor_v2.__module__ = "torch._utils"
        stub._rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
        sys.modules.setdefault("torch", types.ModuleType("torch"))
        sys.modules["torch._utils"] = stub
        sys.modules["torch_stub"] = stub
        try:
            Persist(handle, protocol=2).dump({"_fc.weight": Rebuild()})
        finally:
            del sys.modules["torch._utils"], sys.modules["torch_stub"]
            if not hasattr(sys.modules["torch"], "__file__"):
                del sys.modules["torch"]
        pickle.dump(["0"], handle, protocol=2)
        handle.write(struct.pack("<q", 4) + np.zeros(4, np.float32).tobytes())
    with pytest.raises(lite.WeightsError, match="past the end"):
        lite.read_legacy_state_dict(tmp_path / "long.pth")


def test_the_real_weights_read_without_torch():
    weights = lite.read_legacy_state_dict(lite.weights_path())
    assert len(weights) == 296
    assert sum(a.size for a in weights.values() if a.dtype == np.float32) == 4_694_024
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)


def test_the_projection_is_orthonormal_and_keeps_distances():
    matrix = projection(256)
    assert matrix.shape == (256, 1280)
    assert np.abs(matrix @ matrix.T - np.eye(256)).max() < 1e-5
    assert projection(1280) is None
    points = np.random.default_rng(1).random((50, 1280)).astype(np.float32)
    points -= points.mean(axis=0)
    before = np.linalg.norm(points[:, None] - points[None], axis=-1)
    after = np.linalg.norm((points @ matrix.T)[:, None] - (points @ matrix.T)[None], axis=-1)
    ratio = after[before > 0] / before[before > 0] / np.sqrt(256 / 1280)
    assert 0.75 < ratio.min() and ratio.max() < 1.25


def test_rows_a_crash_left_unnamed_are_written_over(tmp_path):
    """Killed after a row was synced but before the index named it, or in the middle of
    one: the next add writes over them, so no picture's embedding stays in the file where
    the index (and so a takedown) cannot find it."""
    store = EmbeddingStore(tmp_path, 16)
    one = {"aa" * 32: np.arange(1280, dtype=np.float32)}
    store.add(one)
    with store.path.open("ab") as handle:  # killed after a whole row, then in the next
        handle.write(b"\x01" * (16 * 2 + 7))
    two = {"bb" * 32: np.ones(1280, np.float32)}
    store.add(two)
    store.add(two)
    assert len(store) == 2
    assert store.path.stat().st_size == 2 * 16 * 2
    got = store.vectors(["aa" * 32, "bb" * 32])
    assert np.allclose(got["bb" * 32], store.reduce(two["bb" * 32][None])[0], atol=1e-3)
    assert np.allclose(got["aa" * 32], store.reduce(one["aa" * 32][None])[0], rtol=1e-2)
    store.close()
    with pytest.raises(Exception, match="256 dimensions|16 dimensions"):
        EmbeddingStore(tmp_path, 256)


def _photos(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(SAMPLES / name, folder / name.replace("/", "-"))


def _records(output: Path) -> dict[str, dict]:
    lines = (output / "records.jsonl").read_text().splitlines()
    return {Path(r["file"]["path"]).name.split("-", 1)[1]: r for r in map(json.loads, lines)}


EMBED_RECIPE = """
    name: embedded
    terms: [building]
    output: out
    sources:
      - use: folder
        options: {{path: photos, term: building}}
    enrichers:
      - use: embed
        options: {{dims: {dims}}}
      - use: relevance
        options: {{keep_if: {{imagenet.building: ">=0.06"}}}}
    sinks:
      - use: jsonl
        options: {{path: records.jsonl}}
"""


def test_embed_stores_each_picture_once_and_a_rerun_adds_nothing(recipe_file, harvest,
                                                                 tmp_path, network):
    _photos(tmp_path / "photos", BUILDINGS[:3] + NOT_BUILDINGS[2:])
    shutil.copyfile(SAMPLES / BUILDINGS[0], tmp_path / "photos" / "again.jpg")  # same bytes
    recipe = recipe_file(EMBED_RECIPE.format(dims=1280))
    code, out, err = harvest("run", str(recipe))
    assert code == 0, err
    records = _records(tmp_path / "out")
    assert records["exif-org-fujifilm-mx1700.jpg"]["imagenet"]["starfish"] > 0.9
    assert len(records["exif-org-fujifilm-mx1700.jpg"]["imagenet"]) == 5
    state = tmp_path / "out" / ".harvest"
    store = EmbeddingStore(state)
    assert len(store) == 5 and store.path.stat().st_size == 5 * 1280 * 2
    photo = SAMPLES / BUILDINGS[1]
    features, _ = network.run(lite.preprocess(lite.load_image(photo))[None])
    sha = next(r["file"]["sha256"] for r in records.values() if r["file"]["path"].endswith("DSCN0027.jpg"))
    assert np.allclose(store.vectors([sha])[sha], features[0], atol=2e-3)
    store.close()

    code, out, err = harvest("export", str(tmp_path / "out"), str(tmp_path / "dataset"),
                             "--format", "manifest", "--embeddings")
    assert code == 0, err
    table = np.load(tmp_path / "dataset" / "embeddings.npy")
    ids = (tmp_path / "dataset" / "embeddings-ids.txt").read_text().splitlines()
    manifest = [json.loads(line)["id"] for line in
                (tmp_path / "dataset" / "manifest.jsonl").read_text().splitlines()]
    assert ids == manifest, (ids, manifest)
    assert table.shape == (3, 1280) and table.dtype == np.float16  # the starfish and pumpkin fail keep_if
    by_id = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "records.jsonl")
                                      .read_text().splitlines())}
    row = next(k for k, i in enumerate(ids) if by_id[i]["file"]["sha256"] == sha)
    assert np.allclose(table[row], features[0], atol=2e-3)

    code, out, err = harvest("run", str(recipe))  # resumed: nothing new to embed
    assert code == 0, err
    store = EmbeddingStore(state)
    assert len(store) == 5 and store.path.stat().st_size == 5 * 1280 * 2
    store.close()


def _auc(positives: list[float], negatives: list[float]) -> float:
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs)


def test_relevance_ranks_real_photos_of_the_term_first(recipe_file, harvest, tmp_path):
    """Six street photos of one town and four that show no building (two of the same
    town's parks), all found for "building": both scores put every building first, and
    keep_if marks the others."""
    _photos(tmp_path / "photos", BUILDINGS + NOT_BUILDINGS)
    code, out, err = harvest("run", str(recipe_file(EMBED_RECIPE.format(dims=256))))
    assert code == 0, err
    records = _records(tmp_path / "out")
    for score in ("imagenet.building", "typicality.building"):
        positives = [records[n.replace("/", "-")]["relevance"][score] for n in BUILDINGS]
        negatives = [records[n.replace("/", "-")]["relevance"][score] for n in NOT_BUILDINGS]
        assert _auc(positives, negatives) >= 0.95, (score, positives, negatives)
    for name in NOT_BUILDINGS:
        assert records[name.replace("/", "-")]["keep"] is False
    assert sum(records[n.replace("/", "-")]["keep"] for n in BUILDINGS) >= 5
    scoring = json.loads((tmp_path / "out" / ".harvest" / "scoring.json").read_text())
    assert "relevance" in scoring["fields"]
    assert scoring["keep_if"] == {"relevance.imagenet.building": [">=", 0.06]}


def test_a_term_wordnet_does_not_know_is_mapped_with_classes(recipe_file, harvest, tmp_path):
    _photos(tmp_path / "photos", ["exif-org/fujifilm-mx1700.jpg", "exif-org/nikon-e950.jpg"])
    recipe = recipe_file("""
        name: mapped
        terms: [seestern]
        output: out
        sources:
          - use: folder
            options: {path: photos, term: seestern}
        enrichers:
          - use: relevance
            options: {classes: {seestern: [starfish]}, scores: [imagenet]}
        sinks:
          - use: jsonl
            options: {path: records.jsonl}
    """)
    code, out, err = harvest("run", str(recipe))
    assert code == 0, err
    records = _records(tmp_path / "out")
    assert records["exif-org-fujifilm-mx1700.jpg"]["relevance"]["imagenet.seestern"] > 0.9
    assert records["exif-org-nikon-e950.jpg"]["relevance"]["imagenet.seestern"] < 0.05

    bad = recipe_file(recipe.read_text().replace("[starfish]", "[no-such-class]"), "bad.yml")
    code, out, err = harvest("run", str(bad))
    assert code == 2
    assert "no-such-class" in err and len(err.strip().splitlines()) == 1


OTHERS = ["exif-org/fujifilm-dx10.jpg", "exif-org/fujifilm-finepix40i.jpg",
          "exif-org/fujifilm-mx1700.jpg", "exif-org/kodak-dc210.jpg", "exif-org/kodak-dc240.jpg",
          "exif-org/olympus-d320l.jpg", "exif-org/sanyo-vpcsx550.jpg",
          "exif-org/sony-powershota5.jpg", "gps/DSCN0012.jpg"]  # pies, dogs, a party, a park...


def _variants(source: Path, count: int, seed: int) -> list[bytes]:
    """Other shots of one scene: crops of 60-100% at other places, mirrored or not,
    brighter or darker, saved at another JPEG quality."""
    import io
    import random

    from PIL import Image, ImageEnhance

    rng = random.Random(seed)
    made = []
    with Image.open(source) as image:
        image = image.convert("RGB")
        for _ in range(count):
            scale = rng.uniform(0.6, 1.0)
            w, h = int(image.width * scale), int(image.height * scale)
            left, top = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
            shot = image.crop((left, top, left + w, top + h))
            if rng.random() < 0.5:
                shot = shot.transpose(Image.FLIP_LEFT_RIGHT)
            shot = ImageEnhance.Brightness(shot).enhance(rng.uniform(0.75, 1.25))
            out = io.BytesIO()
            shot.save(out, "JPEG", quality=rng.randint(70, 95))
            made.append(out.getvalue())
    return made


def test_harvest_train_learns_the_term_from_twenty_marks(recipe_file, harvest, tmp_path):
    """36 pictures of a town's streets (six scenes, six shots of each) found for
    "building", with 9 pictures of other things (20%). Twenty marks, on three scenes and
    five of the others, train learned.building; on the scenes and pictures no mark saw it
    scores F1 >= 0.9, and the cross-validated figures are printed."""
    photos = tmp_path / "photos"
    photos.mkdir()
    truth = {}
    for scene, name in enumerate(BUILDINGS):
        for shot, data in enumerate(_variants(SAMPLES / name, 6, seed=scene)):
            (photos / f"scene{scene}-{shot}.jpg").write_bytes(data)
            truth[f"scene{scene}-{shot}.jpg"] = True
    for other, name in enumerate(OTHERS):
        shutil.copyfile(SAMPLES / name, photos / f"other{other}.jpg")
        truth[f"other{other}.jpg"] = False
    recipe = recipe_file("""
        name: town
        terms: [building]
        output: out
        sources:
          - use: folder
            options: {path: photos, term: building}
        enrichers:
          - use: embed
        sinks:
          - use: jsonl
            options: {path: records.jsonl}
    """)
    code, out, err = harvest("run", str(recipe))
    assert code == 0, err
    output = tmp_path / "out"
    records = {Path(r["file"]["path"]).name.split("-", 1)[1]: r
               for r in map(json.loads, (output / "records.jsonl").read_text().splitlines())}
    marked = [f"scene{s}-{i}.jpg" for s in range(3) for i in range(5)][:15]
    marked += [f"other{i}.jpg" for i in range(5)]
    import sqlite3

    from harvest.core.commands.review import Review

    Review(output).db.close()  # makes review.sqlite as the page does
    db = sqlite3.connect(output / ".harvest" / "review.sqlite")
    with db:
        db.executemany("INSERT INTO decisions VALUES (?, ?, 0)",
                       [(records[name]["id"], "keep" if truth[name] else "reject")
                        for name in marked])
    db.close()

    code, out, err = harvest("train", str(output))
    assert code == 0, err
    assert "building" in out and "precision" in out
    learned = json.loads((output / ".harvest" / "scores" / "learned.json").read_text())
    unseen = [name for name in truth if name not in marked and not name.startswith(
        ("scene0", "scene1", "scene2"))]
    predicted = {name: learned[records[name]["id"]]["building"] >= 0.5 for name in unseen}
    hits = sum(predicted[n] and truth[n] for n in unseen)
    precision = hits / max(1, sum(predicted.values()))
    recall = hits / sum(truth[n] for n in unseen)
    f1 = 2 * precision * recall / (precision + recall)
    print(f"learned.building on unseen pictures: precision {precision:.2f} recall {recall:.2f} "
          f"F1 {f1:.2f}")
    assert f1 >= 0.9, (precision, recall, {n: learned[records[n]["id"]] for n in unseen})
    positives = [learned[records[n]["id"]]["building"] for n in unseen if truth[n]]
    negatives = [learned[records[n]["id"]]["building"] for n in unseen if not truth[n]]
    assert _auc(positives, negatives) >= 0.9, (positives, negatives)

    # The review page and export see the learned scores as a score of their own.
    review = Review(output)
    assert any(k["key"] == "learned.building" for k in review.keys)
    review.store_thresholds({"learned.building": {"op": ">=", "value": 0.5, "enabled": True}})
    review.db.close()
    code, out, err = harvest("export", str(output), str(tmp_path / "dataset"),
                             "--format", "manifest")
    assert code == 0, err
    exported = (tmp_path / "dataset" / "manifest.csv").read_text().count("\n") - 1
    decided = {records[name]["id"]: truth[name] for name in marked}
    expected = sum(decided.get(r["id"], learned[r["id"]]["building"] >= 0.5)
                   for r in records.values())
    assert exported == expected and 0 < exported < len(records)

    # Fitted on a sample of the weak labels (as for a term of a million pictures), every
    # picture is still scored, the unsampled ones by the model directly.
    from harvest.core.commands.train import train

    report = train(output, max_weak=8)
    sampled = json.loads((output / ".harvest" / "scores" / "learned.json").read_text())
    assert report.scored == len(sampled) == len(records)
    positives = [sampled[records[n]["id"]]["building"] for n in unseen if truth[n]]
    negatives = [sampled[records[n]["id"]]["building"] for n in unseen if not truth[n]]
    assert _auc(positives, negatives) >= 0.8, (positives, negatives)


def test_the_review_page_trains_and_shows_the_figures(recipe_file, harvest, tmp_path,
                                                      review_server):
    """The Train button's call: marks in, a report with cross-validated figures out, and
    the learned scores are a slider at once; without embeddings, a clear 400."""
    _photos(tmp_path / "photos", BUILDINGS + NOT_BUILDINGS)
    code, out, err = harvest("run", str(recipe_file(EMBED_RECIPE.format(dims=256))))
    assert code == 0, err
    output = tmp_path / "out"
    server = review_server(output)
    headers = {"Content-Type": "application/json", "X-Harvest-Token": server.token}
    records = _records(output)
    for names, decision in ((BUILDINGS[:3], "keep"), (NOT_BUILDINGS[:3], "reject")):
        for name in names:
            body = json.dumps({"id": records[name.replace("/", "-")]["id"],
                               "decision": decision}).encode()
            assert request(f"{server.base}/api/decision", method="POST", body=body,
                           headers=headers)[0] == 200
    status, body = request(f"{server.base}/api/train", method="POST", body=b"{}",
                           headers=headers)
    assert status == 200, body
    report = json.loads(body)
    (term,) = report["terms"]
    assert (term["term"], term["kept"], term["rejected"]) == ("building", 3, 3)
    assert term["precision"] is not None and term["recall"] is not None
    status, body = request(f"{server.base}/api/meta", headers=headers)
    meta = json.loads(body)
    assert "learned.building" in [k["key"] for k in meta["keys"]]
    assert meta["training"]["terms"][0]["kept"] == 3

    (output / ".harvest" / "embeddings.sqlite").unlink()
    status, body = request(f"{server.base}/api/train", method="POST", body=b"{}",
                           headers=headers)
    assert status == 400 and b"embed" in body


@pytest.mark.parametrize("killed", [None, "audited"])
def test_a_takedown_forgets_the_embedding_and_the_learned_score(recipe_file, harvest,
                                                                tmp_path, killed):
    """What was computed from a picture goes with it: its embedding row is zeroed and
    unnamed, its learned score leaves the overlay, its review thumbnail is deleted, and
    typicality no longer counts it; killed -9 before that, the next takedown finishes it."""
    from test_takedown import killed_at

    _photos(tmp_path / "photos", BUILDINGS + NOT_BUILDINGS)
    recipe = recipe_file(EMBED_RECIPE.format(dims=256))
    assert harvest("run", str(recipe))[0] == 0
    output = tmp_path / "out"
    records = _records(output)
    for name, decision in (("gps-DSCN0025.jpg", "keep"), ("gps-DSCN0027.jpg", "keep"),
                           ("gps-DSCN0012.jpg", "reject"), ("exif-org-fujifilm-mx1700.jpg", "reject")):
        from harvest.core.commands.review import Review

        review = Review(output)
        review.decide(records[name]["id"], decision)
        review.db.close()
    assert harvest("train", str(output))[0] == 0
    gone = records["gps-DSCN0029.jpg"]
    sha = gone["file"]["sha256"]
    store = EmbeddingStore(output / ".harvest")
    row = store.db.execute("SELECT row FROM rows WHERE sha256 = ?", (bytes.fromhex(sha),)).fetchone()[0]
    assert store.vectors([sha])[sha].any()
    store.close()
    review = Review(output)
    thumb = review.thumbnail(sha)  # what the page showed of it
    review.db.close()
    assert thumb is not None and thumb.is_file()
    if killed:
        killed_at(killed, "takedown", output, "--sha256", sha)
    code, out, err = harvest("takedown", str(output), "--sha256", sha)
    assert code == 0, err
    store = EmbeddingStore(output / ".harvest")
    assert store.vectors([sha]) == {} and len(store) == len(records) - 1
    table = np.memmap(store.path, dtype=np.float16, mode="r").reshape(-1, store.dims)
    assert not table[row].any()
    store.close()
    learned = json.loads((output / ".harvest" / "scores" / "learned.json").read_text())
    assert gone["id"] not in learned and len(learned) == len(records) - 1
    assert not thumb.exists()
    # The next run's typicality sample lets the picture go, freeing its place.
    assert sha in (output / ".harvest" / "typicality-relevance.json").read_text()
    assert harvest("run", str(recipe))[0] == 0
    assert sha not in (output / ".harvest" / "typicality-relevance.json").read_text()


def test_typicality_without_embed_is_a_one_line_error(recipe_file, harvest, tmp_path):
    """On a fresh output, and on one where an earlier run made the store (it passed
    there, and new pictures silently got no typicality)."""
    _photos(tmp_path / "photos", BUILDINGS[:1])
    full = recipe_file(EMBED_RECIPE.format(dims=256))
    without = EMBED_RECIPE.format(dims=256).replace("      - use: embed\n        options: {dims: 256}\n", "")
    reversed_order = EMBED_RECIPE.format(dims=256).replace(
        "      - use: embed\n        options: {dims: 256}\n", "").replace(
        "    sinks:", "      - use: embed\n        options: {dims: 256}\n    sinks:")
    code, out, err = harvest("run", str(recipe_file(without, "without.yml")))
    assert code == 2 and "typicality needs the embed enricher" in err
    assert len(err.strip().splitlines()) == 1
    assert harvest("run", str(full))[0] == 0
    for text, name in ((without, "without.yml"), (reversed_order, "reversed.yml")):
        code, out, err = harvest("run", str(recipe_file(text, name)))
        assert code == 2 and "typicality needs the embed enricher before it" in err, (name, err)


def test_the_cleaning_demo_gives_the_review_page_its_sliders(harvest, tmp_path):
    from harvest.core.commands.review import Review

    repo = Path(__file__).resolve().parents[1]
    output = tmp_path / "demo-cleaning"
    code, out, err = harvest("run", repo / "configs" / "demo-cleaning.yml", "--output", output,
                             "--no-progress")
    assert code == 0, err
    review = Review(output)
    keys = {k["key"] for k in review.keys}
    assert {"relevance.imagenet.animals", "relevance.typicality.animals"} <= keys
    assert review.meta()["thresholds"]["relevance.imagenet.animals"]["value"] == 0.2
    shapes = [r["relevance"]["imagenet.animals"] for r in review.records]
    assert len(shapes) >= 8 and max(shapes) < 0.5  # coloured shapes are no animals
    review.db.close()


def test_the_network_runs_in_the_download_workers(recipe_file, harvest, tmp_path, monkeypatch):
    """With worker processes, every picture's forward pass is made there: the engine's
    process cannot build the network at all here, and every picture is still embedded."""
    from collections import OrderedDict

    def refuse(*args, **kwargs):
        raise AssertionError("the network was built in the engine's process")

    monkeypatch.setattr(lite, "Network", refuse)
    monkeypatch.setattr(lite.SharedNetwork, "_network", None)
    monkeypatch.setattr(lite.SharedNetwork, "_recent", OrderedDict())
    _photos(tmp_path / "photos", BUILDINGS + NOT_BUILDINGS)
    recipe = EMBED_RECIPE.format(dims=256).replace("output: out", "output: out\n    run: {workers: 2}")
    code, out, err = harvest("run", str(recipe_file(recipe)))
    assert code == 0, err
    records = _records(tmp_path / "out")
    assert len(records) == 10
    assert all("imagenet" in r and "typicality.building" in r["relevance"] for r in records.values())
    store = EmbeddingStore(tmp_path / "out" / ".harvest")
    assert len(store) == 10
    store.close()


@test_review.needs_browser
def test_the_train_button_in_the_browser(recipe_file, harvest, tmp_path, review_server):
    """The page as a user drives it: marks made, Train pressed; the page comes back with
    the cross-validated figures, a learned.building slider and the "most uncertain first"
    sort."""
    from playwright.sync_api import expect

    from harvest.core.commands.review import Review

    _photos(tmp_path / "photos", BUILDINGS + NOT_BUILDINGS)
    assert harvest("run", str(recipe_file(EMBED_RECIPE.format(dims=256))))[0] == 0
    output = tmp_path / "out"
    records = _records(output)
    review = Review(output)
    for names, decision in ((BUILDINGS[:3], "keep"), (NOT_BUILDINGS[:3], "reject")):
        for name in names:
            review.decide(records[name.replace("/", "-")]["id"], decision)
    review.db.close()
    server = review_server(output)
    with test_review.review_page(server) as page:
        expect(page.locator("#training")).to_contain_text("Not trained yet")
        page.locator("#train").click()
        expect(page.locator('[id="slider-learned.building"]')).to_be_attached(timeout=30_000)
        page.wait_for_selector("body[data-ready=yes]")
        expect(page.locator("#training table")).to_contain_text("building")
        expect(page.locator("#training table")).to_contain_text("3/3")
        uncertain = page.locator("#sort option", has_text="most uncertain first")
        expect(uncertain).to_have_count(1)
        page.locator("#sort").select_option(uncertain.get_attribute("value"))
        expect(page.locator(".tile")).to_have_count(10)


def test_a_per_term_threshold_judges_only_the_pictures_of_its_term():
    """learned.monkey exists only for monkey pictures: a slider on it must not drop every
    cage picture (it did, and with typicality thresholds for two terms, a page or export
    kept nothing)."""
    from harvest.core.cleaning.curation import Verdicts

    monkey = {"id": "m", "term": "monkey", "learned": {"monkey": 0.9},
              "relevance": {"typicality.monkey": 0.8}}
    cage = {"id": "c", "term": "cage", "learned": {"cage": 0.2},
            "relevance": {"typicality.cage": 0.3}}
    unscored = {"id": "u", "term": "monkey"}
    rule = {"op": ">=", "value": 0.5, "enabled": True}
    judge = Verdicts({"learned.monkey": rule}, {})
    assert [judge(r)[0] for r in (monkey, cage, unscored)] == [True, True, False]
    judge = Verdicts({"relevance.typicality.monkey": rule, "relevance.typicality.cage": rule}, {})
    assert [judge(r)[0] for r in (monkey, cage)] == [True, False]
    assert "typicality.cage" in judge(cage)[2]


def test_train_without_scikit_learn_is_one_line(tmp_path, harvest, monkeypatch):
    """A clean CI without scikit-learn showed a ModuleNotFoundError traceback, and the
    page an internal error: one line naming the extra instead."""
    import sys

    (tmp_path / "out" / ".harvest").mkdir(parents=True)
    (tmp_path / "out" / "records.jsonl").write_text("")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    code, out, err = harvest("train", str(tmp_path / "out"))
    assert code == 2 and "scikit-learn" in err and "relevance" in err
    assert len(err.strip().splitlines()) == 1


def test_embed_relevance_and_train_on_a_cluster(recipe_file, harvest, tmp_path, dask_cluster):
    """The folder cut into shards that run on two Dask workers: each shard's embeddings go
    to its own state folder, and train and export --embeddings find all of them."""
    _photos(tmp_path / "photos", BUILDINGS + NOT_BUILDINGS)
    recipe = EMBED_RECIPE.format(dims=256).replace(
        "{path: photos, term: building}", "{path: photos, term: building, shard_size: 3}")
    assert "shard_size: 3" in recipe
    code, out, err = harvest("run", str(recipe_file(recipe)), "--cluster",
                             dask_cluster.scheduler_address, "--no-progress")
    assert code == 0, err
    output = tmp_path / "out"
    records = _records(output)
    assert len(records) == 10
    assert all("imagenet" in r and "imagenet.building" in r["relevance"] for r in records.values())
    from harvest.core.contract.shards import state_dirs

    stores = [d for d in state_dirs(output) if (d / "embeddings.sqlite").is_file()]
    assert len(stores) >= 2  # the shards' own
    from harvest.core.commands.review import Review

    review = Review(output)
    for names, decision in ((BUILDINGS[:3], "keep"), (NOT_BUILDINGS[:3], "reject")):
        for name in names:
            review.decide(records[name.replace("/", "-")]["id"], decision)
    review.db.close()
    code, out, err = harvest("train", str(output))
    assert code == 0 and "without an embedding" not in out, (out, err)
    learned = json.loads((output / ".harvest" / "scores" / "learned.json").read_text())
    assert len(learned) == 10
    code, out, err = harvest("export", str(output), str(tmp_path / "dataset"), "--all",
                             "--format", "manifest", "--embeddings")
    assert code == 0, err
    assert np.load(tmp_path / "dataset" / "embeddings.npy").shape == (10, 256)


def test_train_and_export_embeddings_killed_midway(recipe_file, harvest, tmp_path):
    """kill -9 while train writes its scores: the overlay readers see stays the old one,
    whole, and the next train replaces it and clears what the killed one left. kill -9
    while export writes the embeddings: no dataset at the destination; the next export
    equals one never stopped."""
    from test_takedown import killed_at

    from harvest.core.commands.review import Review

    _photos(tmp_path / "photos", BUILDINGS + NOT_BUILDINGS)
    recipe = recipe_file(EMBED_RECIPE.format(dims=256))
    assert harvest("run", str(recipe))[0] == 0
    output = tmp_path / "out"
    records = _records(output)
    assert harvest("train", str(output))[0] == 0
    learned = output / ".harvest" / "scores" / "learned.json"
    before = learned.read_bytes()
    for name, decision in (("gps-DSCN0025.jpg", "keep"), ("gps-DSCN0012.jpg", "reject")):
        review = Review(output)
        review.decide(records[name]["id"], decision)
        review.db.close()
    killed_at("learned-term", "train", output)
    assert learned.read_bytes() == before
    left = list(learned.parent.glob(".learned.*.tmp"))
    assert len(left) == 1  # what the kill left
    # A fresh one may be a live writer's that has not locked it yet: the kill is older.
    os.utime(left[0], (time.time() - 120, time.time() - 120))
    assert harvest("train", str(output))[0] == 0
    assert learned.read_bytes() != before and json.loads(learned.read_text())
    assert list(learned.parent.glob(".*.tmp")) == []

    destination = tmp_path / "dataset"
    killed_at("embeddings-rows", "export", output, destination, "--format", "manifest",
              "--embeddings")
    assert not destination.exists()
    assert harvest("export", str(output), str(destination), "--format", "manifest",
                   "--embeddings")[0] == 0
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    whole = tmp_path / "whole"
    assert harvest("export", str(output), str(whole), "--format", "manifest",
                   "--embeddings")[0] == 0
    for name in ("embeddings.npy", "embeddings-ids.txt", "manifest.jsonl"):
        assert (destination / name).read_bytes() == (whole / name).read_bytes(), name
