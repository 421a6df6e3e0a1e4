"""Offline cleaning: near-duplicates by perceptual hashes (real files, real runs)."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_jsonl
from imagegen import make_image
from PIL import Image, ImageEnhance

from harvest.core.cleaning.curation import set_aside_ids
from harvest.plugins.enrichers.near_duplicates_hamming import HammingIndex


def variant(data: bytes, kind: str) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    if kind == "half":
        image = image.resize((w // 2, h // 2))
    elif kind == "crop":
        image = image.crop((int(w * .025), int(h * .025), int(w * .975), int(h * .975)))
    elif kind == "bright":
        image = ImageEnhance.Brightness(image).enhance(1.2)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=40 if kind == "q40" else 90)
    return out.getvalue()


def recipe(folder, output, action="mark") -> str:
    return f"""
name: clean
terms: [x]
output: {output}
sources: [{{use: folder, options: {{path: {folder}}}}}]
enrichers: [{{use: near_duplicates, options: {{action: {action}}}}}]
sinks: [jsonl]
"""


def test_near_duplicates_across_runs_and_the_best_copy_is_kept(recipe_file, harvest, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    originals = {i: make_image(100 + i, size=(320, 240)) for i in range(6)}
    for i, data in originals.items():
        (photos / f"{i}-a.jpg").write_bytes(data)
    for kind, i in (("q40", 0), ("crop", 1), ("bright", 2)):
        (photos / f"{i}-b-{kind}.jpg").write_bytes(variant(originals[i], kind))
    # A smaller copy first, the larger one after it: the larger is kept.
    (photos / "3-a.jpg").write_bytes(variant(originals[3], "half"))
    (photos / "3-b-big.jpg").write_bytes(originals[3])
    output = tmp_path / "out"
    status, _, err = harvest("run", recipe_file(recipe(photos, output)), "--no-progress")
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    marked = {name: r.get("near_duplicate_of") for name, r in records.items()}
    # Copies of the same size: whichever was stored first is kept (downloads finish in
    # any order); a smaller copy never is.
    for first, second in (("0-a.jpg", "0-b-q40.jpg"), ("2-a.jpg", "2-b-bright.jpg")):
        assert {marked[first], marked[second]} == {None, f"folder:{first}"} \
            or {marked[first], marked[second]} == {None, f"folder:{second}"}, marked
        copy = records[first if marked[first] else second]
        assert copy["near_duplicate_distance"] <= 10
    # A smaller copy stored first is set aside when the larger one arrives.
    aside = set_aside_ids(output)
    assert marked["1-a.jpg"] is None and marked["3-b-big.jpg"] is None
    assert marked["1-b-crop.jpg"] == "folder:1-a.jpg" or "folder:1-b-crop.jpg" in aside
    assert marked["3-a.jpg"] == "folder:3-b-big.jpg" or "folder:3-a.jpg" in aside
    assert all(marked[f"{i}-a.jpg"] is None for i in (1, 4, 5))  # distinct pictures
    assert len(records["4-a.jpg"]["phash"]) == 16

    # Later runs compare against earlier ones (the index lives in the output folder).
    (photos / "5-c-later.jpg").write_bytes(variant(originals[5], "q40"))
    status, _, err = harvest("run", tmp_path / "recipe.yml", "--no-progress")
    assert status == 0, err
    later = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}["5-c-later.jpg"]
    assert later["near_duplicate_of"] == "folder:5-a.jpg"

    # The export has each picture once: the copies and the smaller 3-a are left out.
    status, out, _ = harvest("export", output, tmp_path / "dataset")
    assert status == 0 and "6 images" in out
    exported = {json.loads(line)["id"] for line in (tmp_path / "dataset" / "manifest.jsonl")
                .read_text().splitlines()}
    assert "folder:3-b-big.jpg" in exported and "folder:3-a.jpg" not in exported
    assert "folder:1-b-crop.jpg" not in exported


def test_drop_action_counts_drops(recipe_file, harvest, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    data = make_image(7, size=(320, 240))
    (photos / "a.jpg").write_bytes(data)
    (photos / "b.jpg").write_bytes(variant(data, "q40"))
    output = tmp_path / "out"
    status, out, _ = harvest("run", recipe_file(recipe(photos, output, "drop")), "--no-progress")
    assert status == 0
    kept = [r["source_id"] for r in read_jsonl(output / "records.jsonl")]
    assert len(kept) == 1
    other = "b.jpg" if kept == ["a.jpg"] else "a.jpg"
    assert f"near duplicate of folder:{kept[0]}" in out and other not in kept
    summary = json.loads((output / ".harvest" / "last-run.json").read_text())
    assert summary["totals"]["dropped"] == 1


def test_hamming_index_finds_exactly_what_brute_force_finds():
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 2**64 - 1, 50_000, dtype=np.uint64)
    index = HammingIndex()
    index.add(stored[:40_000], np.arange(40_000))
    index.merge()
    index.add(stored[40_000:], np.arange(40_000, 50_000))  # some still in the buffer
    queries = stored[rng.integers(0, 50_000, 200)].copy()
    for i in range(200):
        for bit in rng.choice(64, size=int(rng.integers(0, 13)), replace=False):
            queries[i] ^= np.uint64(1) << np.uint64(int(bit))
    for radius in (0, 4, 10, 11):
        found = index.search(queries, radius)
        for query, matches in zip(queries, found, strict=True):
            distances = np.bitwise_count(stored ^ query)
            expected = sorted((int(j), int(distances[j]))
                              for j in np.flatnonzero(distances <= radius))
            assert sorted(matches) == expected


def quality_images(folder) -> None:
    from PIL import ImageFilter

    folder.mkdir()
    rng = np.random.default_rng(5)
    sharp = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    sharp.save(folder / "sharp.png")
    sharp.filter(ImageFilter.GaussianBlur(6)).save(folder / "blurred.png")
    Image.new("RGB", (400, 300), (5, 5, 8)).save(folder / "dark.png")
    Image.new("RGB", (400, 300), (250, 250, 250)).save(folder / "white.png")
    Image.new("RGB", (400, 300), (128, 128, 128)).save(folder / "flat-grey.png")
    Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8)).convert("RGB") \
        .save(folder / "grey-noise.png")
    Image.fromarray(rng.integers(0, 256, (40, 900, 3), dtype=np.uint8)).save(folder / "strip.png")


def test_quality_scores_match_what_the_pictures_are(recipe_file, harvest, tmp_path):
    quality_images(tmp_path / "photos")
    rules = ('{keep_if: {blur: ">=100", dark: "<0.5", entropy: ">=1", aspect_ratio: "<=4"}, '
             'action: ACTION}')
    for action in ("mark", "drop"):
        output = tmp_path / action
        text = recipe(tmp_path / "photos", output).replace(
            "{use: near_duplicates, options: {action: mark}}",
            "{use: quality, options: " + rules.replace("ACTION", action) + "}")
        status, out, err = harvest("run", recipe_file(text, f"{action}.yml"), "--no-progress")
        assert status == 0, err
        records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
        if action == "drop":
            assert set(records) == {"sharp.png", "grey-noise.png"}
            assert "quality: blur" in out and "dark 1 not <0.5" in out
            summary = json.loads((output / ".harvest" / "last-run.json").read_text())
            assert summary["totals"]["dropped"] == 5
            continue
        scores = {name: r["quality"] for name, r in records.items()}
        assert scores["sharp.png"]["blur"] > 100 > scores["blurred.png"]["blur"]
        assert scores["dark.png"]["dark"] == 1 and scores["dark.png"]["brightness"] < 0.05
        assert scores["white.png"]["overexposed"] == 1 and scores["white.png"]["brightness"] > 0.95
        assert scores["flat-grey.png"]["entropy"] == 0 and scores["sharp.png"]["entropy"] > 7
        assert scores["grey-noise.png"]["grayscale"] == 1 and scores["sharp.png"]["grayscale"] == 0
        assert scores["sharp.png"]["saturation"] > 0.3
        assert scores["strip.png"]["aspect_ratio"] == 22.5
        assert records["sharp.png"]["quality_ok"] is True
        assert records["strip.png"]["quality_failed"] == ["aspect_ratio 22.5 not <=4"]
        assert records["white.png"]["quality_ok"] is False  # flat: no edges at all


def test_unknown_quality_score_is_a_one_line_error(recipe_file, harvest, tmp_path):
    (tmp_path / "photos").mkdir()
    text = recipe(tmp_path / "photos", tmp_path / "out").replace(
        "{use: near_duplicates, options: {action: mark}}",
        '{use: quality, options: {keep_if: {sharpness: ">=1"}}}')
    status, _, err = harvest("validate", recipe_file(text))
    assert status == 2 and "sharpness: not a quality score" in err


SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "exif-samples" / "jpg"


def test_safety_scores_faces_on_real_photos(recipe_file, harvest, tmp_path):
    """NudeNet's model, run for real: a camera sample with a person's face and two
    landscapes (from ../shared/testdata)."""
    pytest.importorskip("nudenet")
    if not SAMPLES.is_dir():
        pytest.skip("../shared/testdata is not beside the checkout")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("exif-org/fujifilm-finepix40i.jpg", "gps/DSCN0010.jpg", "gps/DSCN0012.jpg"):
        shutil.copy(SAMPLES / name, photos / Path(name).name)
    for action, kept in (("mark", 3), ("drop", 2)):
        output = tmp_path / action
        text = recipe(photos, output).replace(
            "{use: near_duplicates, options: {action: mark}}",
            f'{{use: safety, options: {{keep_if: {{faces: "<1", nsfw: "<0.5"}}, '
            f'action: {action}}}}}')
        status, out, err = harvest("run", recipe_file(text, f"{action}.yml"), "--no-progress")
        assert status == 0, err
        records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
        assert len(records) == kept
        if action == "drop":
            assert "fujifilm-finepix40i.jpg" not in records and "faces 1.00 fails <1" in out
            continue
        person = records["fujifilm-finepix40i.jpg"]["safety"]
        assert person["faces"] >= 1 and person["face_confidence"] > 0.5
        face = next(b for b in person["boxes"] if b["class"].startswith("FACE"))
        assert all(0 <= v <= 1 for v in face["box"]) and face["box"][2] > 0
        assert records["fujifilm-finepix40i.jpg"]["keep"] is False
        for landscape in ("DSCN0010.jpg", "DSCN0012.jpg"):
            assert records[landscape]["safety"]["faces"] == 0
            assert records[landscape]["safety"]["nsfw"] < 0.2 and records[landscape]["keep"]


def test_a_mirrored_copy_is_found_unless_told_not_to(recipe_file, harvest, tmp_path):
    from PIL import ImageOps

    photos = tmp_path / "photos"
    photos.mkdir()
    data = make_image(31, size=(320, 240))
    (photos / "a.jpg").write_bytes(data)
    out = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(data))).resize((300, 225)).save(out, "JPEG")
    (photos / "b-flipped.jpg").write_bytes(out.getvalue())
    for mirrored, expected in (("true", True), ("false", False)):
        output = tmp_path / mirrored
        text = recipe(photos, output).replace(
            "{action: mark}", f"{{action: mark, mirrored: {mirrored}}}")
        status, _, err = harvest("run", recipe_file(text, f"{mirrored}.yml"), "--no-progress")
        assert status == 0, err
        records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
        flipped, aside = records["b-flipped.jpg"], set_aside_ids(output)
        # The smaller copy is left out: marked when it came second, set aside when first.
        found = flipped.get("near_duplicate_of") == "folder:a.jpg" or "folder:b-flipped.jpg" in aside
        assert found is expected, (flipped, aside)
        if flipped.get("near_duplicate_of"):
            assert flipped["near_duplicate_mirrored"] is True
        assert not records["a.jpg"].get("near_duplicate_of")


def test_a_copy_stored_sideways_with_an_exif_orientation_is_found(recipe_file, harvest,
                                                                  tmp_path):
    """The same picture as displayed: stored rotated, with the EXIF orientation that turns
    it upright (as cameras and phones write it), for each of orientations 2-8. Hashed as
    stored, none of them was found (issue 26: 1/7 on real photos)."""
    from PIL import ImageOps

    photos = tmp_path / "photos"
    photos.mkdir()
    upright = Image.open(SAMPLES / "gps" / "DSCN0040.jpg").convert("RGB")
    upright.thumbnail((480, 480))
    upright.save(photos / "upright.jpg", quality=90)
    # The stored pixels for each orientation: what exif_transpose turns back into upright.
    stored_as = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
                 5: Image.TRANSPOSE, 6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}
    for orientation, method in stored_as.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        sideways = upright.transpose(method)
        sideways.save(photos / f"oriented-{orientation}.jpg", quality=90, exif=exif)
        with Image.open(photos / f"oriented-{orientation}.jpg") as check:
            assert np.abs(np.asarray(ImageOps.exif_transpose(check), dtype=int)
                          - np.asarray(upright, dtype=int)).mean() < 8
    output = tmp_path / "out"
    status, _, err = harvest("run", recipe_file(recipe(photos, output)), "--no-progress")
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    assert len(records) == 8
    # One picture: one record kept, the seven others linked to it (or set aside for it).
    aside = set_aside_ids(output)
    kept = [r["id"] for r in records.values()
            if not r.get("near_duplicate_of") and r["id"] not in aside]
    assert len(kept) == 1, {n: r.get("near_duplicate_of") for n, r in records.items()}
    ids = {r["id"] for r in records.values()}
    assert all(r.get("near_duplicate_of") in ids or r["id"] in aside or r["id"] in kept
               for r in records.values())


@pytest.mark.parametrize("rotated", [True, False])
def test_copies_turned_by_a_quarter_are_found_unless_told_not_to(recipe_file, harvest,
                                                                 tmp_path, rotated):
    """Real photos, each also turned by 90, 180 and 270 degrees (no EXIF tag: the pixels
    turned, as an editor saves them) and made smaller: each photo keeps one picture, the
    original, and no two different photos are linked. Issue 26 measured 1/85 for 90
    degrees."""
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["gps/DSCN0010.jpg", "exif-org/fujifilm-mx1700.jpg", "exif-org/nikon-e950.jpg",
             "exif-org/kodak-dc240.jpg", "gps/DSCN0040.jpg", "exif-org/sony-powershota5.jpg"]
    turned = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_270}
    for k, name in enumerate(names):
        image = Image.open(SAMPLES / name).convert("RGB")
        image.thumbnail((480, 480))
        image.save(photos / f"p{k}-0.jpg", quality=92)  # before its copies, by name
        if k < 3:
            for degrees, method in turned.items():
                copy = image.transpose(method)
                copy.thumbnail((360, 360))
                copy.save(photos / f"p{k}-turned-{degrees}.jpg", quality=85)
    output = tmp_path / "out"
    text = recipe(photos, output).replace("{action: mark}",
                                          f"{{action: mark, rotated: {str(rotated).lower()}}}")
    status, _, err = harvest("run", recipe_file(text), "--no-progress")
    assert status == 0, err
    records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
    aside = set_aside_ids(output)

    def group(name: str) -> str:
        return name.split("-")[0]

    for name, record in records.items():
        linked = record.get("near_duplicate_of")
        if linked:  # never across photos
            assert group(linked.split(":", 1)[1]) == group(name), (name, linked)
    # Pictures arrive in any order (downloads run side by side): whichever copy came
    # first, each photo ends with one picture kept, its largest, the original.
    kept = {name for name, r in records.items()
            if not r.get("near_duplicate_of") and f"folder:{name}" not in aside}
    for k in range(3):
        group_kept = {name for name in kept if group(name) == f"p{k}"}
        if rotated:
            assert group_kept == {f"p{k}-0.jpg"}, (k, group_kept)
        else:
            assert group_kept == {f"p{k}-0.jpg"} | {f"p{k}-turned-{d}.jpg" for d in turned}
    assert {f"p{k}-0.jpg" for k in range(3, 6)} <= kept
    views = {r.get("near_duplicate_view") for r in records.values() if r.get("near_duplicate_of")}
    assert views <= {"rotated 90", "rotated 180", "rotated 270"}


def test_groups_do_not_depend_on_the_order_pictures_arrive_in(recipe_file, harvest, tmp_path):
    """A photo, a crop of it, and a tighter crop that is near the first crop but not the
    photo: in every one of the six orders, one group, and the photo kept. Matched only
    against each group's kept picture, the order C, A, B left two groups (issue 26)."""
    import itertools

    from harvest.plugins.enrichers.near_duplicates import perceptual_hashes

    def jpeg(image) -> bytes:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        return out.getvalue()

    def distance(a: bytes, b: bytes) -> int:
        return (perceptual_hashes(io.BytesIO(a))[0] ^ perceptual_hashes(io.BytesIO(b))[0]).bit_count()

    chain = None
    for name in ("exif-org/ricoh-rdc5300.jpg", "gps/DSCN0042.jpg", "exif-org/sony-cybershot.jpg",
                 "exif-org/fujifilm-mx1700.jpg"):
        image = Image.open(SAMPLES / name).convert("RGB")
        image.thumbnail((480, 480))
        w, h = image.size
        a, b, c = (jpeg(image.crop((int(w * f), int(h * f), w - int(w * f), h - int(h * f))))
                   for f in (0, 0.04, 0.09))
        if distance(a, b) <= 8 and distance(b, c) <= 8 and distance(a, c) >= 11:
            chain = {"A": a, "B": b, "C": c}
            break
    assert chain, "no sample photo makes a chain A ~ B ~ C with A far from C"
    for number, order in enumerate(itertools.permutations("ABC")):
        photos = tmp_path / f"photos{number}"
        photos.mkdir()
        for position, key in enumerate(order):
            (photos / f"{position}-{key}.jpg").write_bytes(chain[key])
        output = tmp_path / f"out{number}"
        text = recipe(photos, output).replace("sinks: [jsonl]",
                                              "sinks: [jsonl]\nrun: {concurrency: 1, workers: 1}")
        status, _, err = harvest("run", recipe_file(text, f"r{number}.yml"), "--no-progress")
        assert status == 0, err
        records = {r["source_id"].split("-")[1][0]: r for r in read_jsonl(output / "records.jsonl")}
        aside = set_aside_ids(output)
        kept = sorted(key for key, r in records.items()
                      if not r.get("near_duplicate_of") and r["id"] not in aside)
        assert kept == ["A"], (order, kept, {k: r.get("near_duplicate_of") for k, r in records.items()},
                               aside)


def test_default_quality_rules_keep_real_photos_and_flag_degraded_ones(recipe_file, harvest,
                                                                        tmp_path):
    """A recipe that writes nothing gets rules: real camera photos pass, a thumbnail does
    not score as sharp, and a large photo blurred at full size (sharp-looking at 512 px) is
    caught; ``defaults: false`` keeps everything."""
    from PIL import ImageFilter

    photos = tmp_path / "photos"
    photos.mkdir()
    good = ("gps/DSCN0010.jpg", "exif-org/canon-ixus.jpg", "exif-org/nikon-e950.jpg")
    for name in good:
        shutil.copy(SAMPLES / name, photos / name.replace("/", "-"))
    photo = Image.open(SAMPLES / "gps" / "DSCN0010.jpg").convert("RGB")
    photo.resize((96, 72)).save(photos / "tiny.jpg", quality=90)
    large = Image.new("RGB", (1920, 1440))  # a large sharp picture: the photo 3 x 3
    for x in range(3):
        for y in range(3):
            large.paste(photo, (x * 640, y * 480))
    large.save(photos / "large.jpg", quality=90)
    large.filter(ImageFilter.GaussianBlur(2)).save(photos / "large-blurred.jpg", quality=90)
    ImageEnhance.Brightness(photo).enhance(0.15).save(photos / "dark.jpg", quality=90)
    ImageEnhance.Brightness(photo).enhance(2.5).save(photos / "overexposed.jpg", quality=90)
    kept = {name.replace("/", "-") for name in good} | {"large.jpg"}
    flagged = {"tiny.jpg": {"blur", "pixels"}, "large-blurred.jpg": {"blur_native"},
               "dark.jpg": {"dark"}, "overexposed.jpg": {"overexposed"}}
    for options, expect_rules in (("", True), (", options: {defaults: false}", False)):
        output = tmp_path / f"out{len(options)}"
        text = recipe(photos, output).replace(
            "{use: near_duplicates, options: {action: mark}}", "{use: quality" + options + "}")
        status, _, err = harvest("run", recipe_file(text, f"q{len(options)}.yml"),
                                 "--no-progress")
        assert status == 0, err
        records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
        assert records["tiny.jpg"]["quality"]["blur"] < 50 < records[
            "gps-DSCN0010.jpg"]["quality"]["blur"]
        assert records["large-blurred.jpg"]["quality"]["blur"] > 100  # sharp at 512 px
        if not expect_rules:
            assert all("quality_ok" not in r and r.get("keep", True) for r in records.values())
            assert "default rules" not in err
            continue
        # Rules the recipe never wrote are said on the terminal when they flag pictures.
        assert f"quality: {len(flagged)} picture(s) failed its default rules" in err, err
        assert {name for name, r in records.items() if r["quality_ok"]} == kept, {
            name: r.get("quality_failed") for name, r in records.items()}
        for name, scores in flagged.items():
            failed = {rule.split()[0] for rule in records[name]["quality_failed"]}
            assert scores <= failed, (name, records[name]["quality_failed"])
            assert records[name]["keep"] is False


def test_embeddings_find_crops_and_turns_the_hashes_miss(recipe_file, harvest, tmp_path):
    """With embed before it, a 20% corner crop and a 5-degree turn of real photos are found
    (their hashes are too far), distinct photos stay apart, and later runs compare against
    the stored embeddings; min_similarity: 1 leaves the copies apart."""
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ("gps/DSCN0010.jpg", "gps/DSCN0025.jpg", "gps/DSCN0038.jpg",
             "exif-org/canon-ixus.jpg")
    for name in names:
        shutil.copy(SAMPLES / name, photos / name.split("/")[1])
    first = Image.open(SAMPLES / names[0]).convert("RGB")
    w, h = first.size
    first.crop((0, 0, int(w * 0.894), int(h * 0.894))).save(photos / "corner-crop.jpg",
                                                            quality=90)
    second = Image.open(SAMPLES / names[3]).convert("RGB")
    second.rotate(5, Image.Resampling.BICUBIC).resize((w // 2, h // 2)).save(
        photos / "turned.jpg", quality=90)
    for option, linked in (("", True), (", min_similarity: 1", False)):
        output = tmp_path / f"out{len(option)}"
        text = recipe(photos, output).replace(
            "enrichers: [{use: near_duplicates, options: {action: mark}}]",
            "enrichers: [embed, {use: near_duplicates, options: {action: mark"
            + option + "}}]")
        status, _, err = harvest("run", recipe_file(text, f"e{len(option)}.yml"),
                                 "--no-progress")
        assert status == 0, err
        records = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
        marked = {name: r.get("near_duplicate_of") for name, r in records.items()}
        aside = set(set_aside_ids(output))
        if not linked:
            assert not any(marked.values()) and not aside, (marked, aside)
            continue
        # The smaller copy is marked, or set aside when the original came after it.
        for copy, original in (("corner-crop.jpg", "DSCN0010.jpg"),
                               ("turned.jpg", "canon-ixus.jpg")):
            assert marked[original] is None
            assert marked[copy] == f"folder:{original}" or f"folder:{copy}" in aside, \
                (marked, aside)
        assert not aside - {"folder:corner-crop.jpg", "folder:turned.jpg"}, aside
        assert {name for name, of in marked.items() if of} <= {"corner-crop.jpg",
                                                               "turned.jpg"}, marked
        # A later run: a copy is found by the embedding of a picture stored before.
        first.crop((int(w * 0.1), 0, w, int(h * 0.9))).save(photos / "later-crop.jpg",
                                                            quality=90)
        status, _, err = harvest("run", tmp_path / f"e{len(option)}.yml", "--no-progress")
        assert status == 0, err
        later = {r["source_id"]: r for r in read_jsonl(output / "records.jsonl")}
        assert later["later-crop.jpg"]["near_duplicate_of"] == "folder:DSCN0010.jpg"
        assert 0.85 <= later["later-crop.jpg"]["near_duplicate_similarity"] < 1
        (photos / "later-crop.jpg").unlink()


def test_the_same_harvest_gives_the_same_groups_however_it_is_run(recipe_file, harvest,
                                                                  tmp_path):
    """The demo's pictures and a half-size JPEG copy of one, harvested four times with
    other concurrency, batch sizes and worker counts: the copy is linked every time, and
    the groups are the same, whether the copy arrives after the original (it carries
    near_duplicate_of) or before it (it is set aside when the original comes). The issue
    saw the copy linked in 2 of 6 identical runs, when pictures of one batch were not
    compared with each other."""
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(REPO / "configs" / "demo-images", photos)
    with Image.open(photos / "animals" / "animal-03.jpg") as image:
        half = image.convert("RGB").resize((image.width // 2, image.height // 2))
        half.save(photos / "misc" / "half-of-animal-03.jpg", "JPEG", quality=80)
    groups = []
    for number, run in enumerate(("{concurrency: 1, workers: 1, batch_size: 1}",
                                  "{concurrency: 16, workers: 2, batch_size: 64}",
                                  "{concurrency: 4, workers: 1, batch_size: 3}",
                                  "{concurrency: 8, workers: 2, batch_size: 2}")):
        output = tmp_path / f"out{number}"
        text = recipe(photos, output) + f"run: {run}\n"
        status, _, err = harvest("run", recipe_file(text, f"r{number}.yml"), "--no-progress")
        assert status in (0, 1), err  # the demo holds a broken download on purpose
        records = {r["relative_path"]: r for r in read_jsonl(output / "records.jsonl")}
        by_id = {r["id"]: path for path, r in records.items()}
        # Each picture that is not kept, and the picture kept of its group: a copy that
        # came first is set aside later (its record was written already), a copy that came
        # second carries near_duplicate_of; either way the same group.
        heads = {path: by_id.get(r["near_duplicate_of"]) for path, r in records.items()
                 if r.get("near_duplicate_of")}
        store = sqlite3.connect(output / ".harvest" / "near-duplicates.sqlite")
        heads.update({by_id[i]: by_id.get(copy_of) for i, copy_of in store.execute(
            "SELECT id, copy_of FROM hashes WHERE set_aside = 1") if i in by_id})
        store.close()
        groups.append(heads)
        assert heads.get("misc/half-of-animal-03.jpg") == "animals/animal-03.jpg", (run, heads)
    assert all(group == groups[0] for group in groups), groups


def test_a_takedown_with_near_duplicates_follows_set_aside_copies(recipe_file, harvest,
                                                                  tmp_path):
    """A half-size copy harvested before its original is set aside when the original
    comes (its record, written already, has no near_duplicate_of). A takedown of either
    with --near-duplicates takes both, and the set-aside list forgets the removed ids."""
    photo = Image.open(SAMPLES / "gps" / "DSCN0010.jpg").convert("RGB")
    photo.thumbnail((800, 800))
    for direction in ("original", "copy"):
        photos = tmp_path / f"photos-{direction}"
        photos.mkdir()
        photo.resize((photo.width // 2, photo.height // 2)).save(photos / "0-copy.jpg",
                                                                 quality=85)
        photo.save(photos / "1-original.jpg", quality=92)
        shutil.copyfile(SAMPLES / "gps" / "DSCN0042.jpg", photos / "2-other.jpg")
        output = tmp_path / f"out-{direction}"
        text = recipe(photos, output) + "run: {concurrency: 1, workers: 1}\n"
        assert harvest("run", recipe_file(text, f"{direction}.yml"), "--no-progress")[0] == 0
        records = {r["relative_path"][0]: r for r in read_jsonl(output / "records.jsonl")}
        assert set_aside_ids(output).keys() == {records["0"]["id"]}
        assert not records["0"].get("near_duplicate_of")
        target = records["1" if direction == "original" else "0"]
        status, out, err = harvest("takedown", str(output), "--sha256",
                                   target["file"]["sha256"], "--near-duplicates")
        assert status == 0, err
        left = {r["relative_path"][0] for r in read_jsonl(output / "records.jsonl")}
        assert left == {"2"}, (direction, left)
        assert set_aside_ids(output) == {}
