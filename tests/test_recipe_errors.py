"""Every kind of bad recipe: exit status 2 and one line naming file, key path and line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

GOOD_SOURCE = """
sources:
  - use: flickr
    options:
      bbox: "116.9,4.5,127.0,21.0"
"""


def check_one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("FLICKER_KEY", "k" * 16)
    monkeypatch.setenv("FLICKER_SECRET", "s" * 16)


CASES = {
    "folder that does not exist": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: folder\n"
        "    options:\n      path: no/such/folder\n",
        ["recipe.yml:7", "sources[0].options.path", "no such folder", "no/such/folder"]),
    "URL list that does not exist": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: urls\n"
        "    options: {path: urls.txt}\n",
        ["recipe.yml:6", "sources[0].options.path", "no such file", "urls.txt"]),
    "encrypting sink without a key": (
        "name: x\nterms: [monkey]\noutput: out\nsources: [{use: folder, options: {path: .}}]\n"
        "sinks:\n  - use: jsonl\n    options:\n      personal_fields: encrypt\n"
        "      key_file: keys/none.key\n",
        ["recipe.yml:9", "sinks[0].options.key_file", "key file not found", "harvest keygen"]),
    "encrypting sink, key variable unset": (
        "name: x\nterms: [monkey]\noutput: out\nsources: [{use: folder, options: {path: .}}]\n"
        "sinks:\n  - use: jsonl\n    options: {personal_fields: encrypt}\n",
        ["recipe.yml:7", "sinks[0].options.key_env", "no encryption key: set HARVEST_KEY"]),
    "unknown plugin": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flikr\n",
        ["recipe.yml:5", "sources[0].use", "unknown source 'flikr'", "flickr", "folder"]),
    "unknown option": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      per_pag: 10\n",
        ["recipe.yml:7", "sources[0].options.per_pag", "unknown option", "per_page"]),
    "mistyped option": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      count: ten\n",
        ["recipe.yml:7", "sources[0].options.count", "expected an integer", "'ten'"]),
    "bbox with min above max": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      bbox: [127, 4.5, 116.9, 21]\n",
        ["recipe.yml:7", "sources[0].options.bbox", "min_lon 127 must be less than max_lon 116.9"]),
    "bbox latitude out of range": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      bbox: 116.9,4.5,127.0,95\n",
        ["sources[0].options.bbox", "latitude 95 is outside -90..90"]),
    "bbox wrong shape": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      bbox: 116.9,4.5\n",
        ["sources[0].options.bbox", "expected four numbers"]),
    "yaml syntax": (
        "name: x\nterms: [monkey\noutput: out\n",
        ["recipe.yml:", "YAML syntax error"]),
    "unknown top-level key": (
        "name: x\nterms: [monkey]\noutput: out\nsorces: []\n",
        ["recipe.yml:4", "sorces", "unknown key"]),
    "no terms": (
        "name: x\noutput: out\n" + GOOD_SOURCE,
        ["terms", "required: flickr searches by terms"]),
    "empty terms": (
        "name: x\nterms: []\noutput: out\n" + GOOD_SOURCE,
        ["terms", "expected a non-empty list of terms"]),
    "bad language code": (
        "name: x\nterms:\n  - {English: monkey}\noutput: out\n" + GOOD_SOURCE,
        ["recipe.yml:3", "terms[0].English", "language code"]),
    "duplicate key": (
        "name: x\nterms: [monkey]\noutput: out\noutput: other\n" + GOOD_SOURCE,
        ["recipe.yml:4", "output", "duplicate key (first at line 3)"]),
    "secret written in clear": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      api_key: 0123456789abcdef\n",
        ["recipe.yml:7", "sources[0].options.api_key", "secrets are never written in a recipe"]),
    "bad run setting": (
        "name: x\nterms: [monkey]\noutput: out\nrun:\n  concurrency: 0\n" + GOOD_SOURCE,
        ["recipe.yml:5", "run.concurrency", "out of range"]),
    "bad date": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      min_taken_date: last tuesday\n",
        ["sources[0].options.min_taken_date", "expected a date"]),
    "bad choice": (
        "name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
        "    options:\n      sort: newest\n",
        ["sources[0].options.sort", "expected one of relevance"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_exits_2_with_one_clear_line(case, keys, recipe_file, harvest):
    text, needles = CASES[case]
    path = recipe_file(text)
    status, out, err = harvest("validate", path)
    assert status == 2
    check_one_line(err, str(path), *needles)


def test_missing_secret_names_the_variable(recipe_file, harvest):
    path = recipe_file("name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n")
    status, _, err = harvest("validate", path)
    assert status == 2
    # Both missing secrets at once: the user sets both before trying again.
    key, secret = err.strip().splitlines()
    assert "sources[0].options.api_key" in key and "${FLICKER_KEY} is not set" in key
    assert "sources[0].options.api_secret" in secret and "${FLICKER_SECRET} is not set" in secret


def test_missing_recipe_file(tmp_path, harvest):
    status, _, err = harvest("run", tmp_path / "nope.yml")
    assert status == 2
    check_one_line(err, "nope.yml", "no such recipe file")


def test_good_recipe_validates(keys, recipe_file, harvest):
    path = recipe_file("name: x\nterms:\n  - monkey\n  - {en: cage, ja: 檻, ar: قفص}\n"
                       "output: out\n" + GOOD_SOURCE)
    status, out, err = harvest("validate", path)
    assert status == 0, err
    assert "ok (2 terms, 1 source, 0 enrichers, 1 sink)" in out


def test_validate_makes_no_network_call_and_writes_nothing(keys, recipe_file, harvest, tmp_path):
    path = recipe_file("name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: flickr\n"
                       "    options:\n      endpoint: http://127.0.0.1:9/services/rest/\n")
    status, _, err = harvest("validate", path)
    assert status == 0, err
    assert not (tmp_path / "out").exists()


def test_credentials_file_in_the_seed_format(recipe_file, harvest, tmp_path):
    credentials = tmp_path / "credentials.json"
    credentials.write_text('{"FLICKER_KEY": "abcdef0123", "FLICKER_SECRET": "xyz987", '
                           '"GOOGLE_VISION_KEY": "g"}')
    credentials.chmod(0o600)
    path = recipe_file(f"name: x\nterms: [monkey]\noutput: out\ncredentials: {credentials}\n"
                       "sources: [flickr]\n")
    status, _, err = harvest("validate", path)
    assert status == 0, err


def test_credentials_file_readable_by_others_is_refused(recipe_file, harvest, tmp_path):
    credentials = tmp_path / "credentials.json"
    credentials.write_text('{"FLICKER_KEY": "abcdef0123", "FLICKER_SECRET": "xyz987"}')
    credentials.chmod(0o644)
    path = recipe_file(f"name: x\nterms: [monkey]\noutput: out\ncredentials: {credentials}\n"
                       "sources: [flickr]\n")
    status, _, err = harvest("validate", path)
    assert status == 2
    check_one_line(err, str(credentials), "readable by others", "chmod 600")


def test_console_script_exit_status(recipe_file, tmp_path):
    """The installed `harvest` command, as a user runs it, exits 2 on a bad recipe."""
    path = recipe_file("name: x\nterms: [monkey]\noutput: out\nsources:\n  - use: nosuch\n")
    harvest_bin = os.path.join(os.path.dirname(sys.executable), "harvest")
    done = subprocess.run([harvest_bin, "validate", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    check_one_line(done.stderr, "sources[0].use", "unknown source 'nosuch'")


BILLION_LAUGHS = "name: x\noutput: out\nsources: [{use: folder, options: {path: .}}]\n" \
    "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n"
        for i in range(8)) + "terms: *i\n"


@pytest.mark.parametrize("text, needle", [
    (BILLION_LAUGHS, "values once its aliases are expanded"),
    ("name: x\nterms: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels deep"),
    ("name: x\nterms: " + "[" * 80 + "a" + "]" * 80 + "\n", "nested more than 64 levels deep"),
    ("name: x\nterms: [a]\n# " + "x" * 1_100_000 + "\n", "a recipe is at most 1,000,000 bytes"),
])
def test_hostile_recipes_fail_fast_in_one_line(text, needle, tmp_path, harvest):
    import time

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text, encoding="utf-8")
    started = time.monotonic()
    status, out, err = harvest("validate", recipe)
    assert time.monotonic() - started < 5
    assert status == 2
    check_one_line(err, str(recipe), needle)


def test_a_failed_search_makes_the_run_incomplete(recipe_file, harvest, tmp_path, keys):
    """Exit 3: the run went to the end, but not everything it was asked for is stored."""
    path = recipe_file(f"name: x\nterms: [monkey]\noutput: {tmp_path / 'out'}\n"
                       "run: {retries: 0}\nsources:\n  - use: flickr\n    options:\n"
                       "      endpoint: http://127.0.0.1:9/services/rest/\n")
    status, out, err = harvest("run", path, "--no-progress")
    assert status == 3, err
    assert out.startswith("harvest x: incomplete")


def encodings(secret: str) -> set[bytes]:
    """``secret`` as the code can write it: raw, percent-encoded (path and form style),
    JSON-escaped (ASCII-only or not) and as a Python repr."""
    import json
    from urllib.parse import quote, quote_plus

    forms = {secret, quote(secret), quote(secret, safe=""), quote_plus(secret),
             json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             repr(secret)[1:-1], quote(secret).lower()}
    return {form.encode() for form in forms}


def test_a_secret_reaches_no_output_in_any_encoding(tmp_path, harvest, recipe_file,
                                                    monkeypatch):
    """A ${NAME} value with a space, an é and a quote, used as the folder read and as the
    output folder: no file of the output or of its export, no printout, holds it raw,
    percent-encoded, JSON-escaped or as a repr; the export's card is not titled by it."""
    from imagegen import coloured_image

    secret = 'Pl ace é"9x'
    folder = tmp_path / secret
    folder.mkdir()
    for index in range(2):
        (folder / f"animal-{index}.jpg").write_bytes(coloured_image((200, 30, 30), index,
                                                                    (64, 48)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    monkeypatch.setenv("SECRET_DIR", str(folder))
    monkeypatch.setenv("SECRET_OUT", str(tmp_path / f"out-{secret}"))
    recipe = recipe_file("""
terms: [animal]
output: "${SECRET_OUT}"
sources: [{use: folder, options: {path: "${SECRET_DIR}"}}]
""")
    forms = encodings(secret)
    status, out, err = harvest("-v", "run", recipe, "--no-progress")
    printed = (out + err).encode()
    assert status == 0, err
    output = tmp_path / f"out-{secret}"
    destination = tmp_path / "dataset"
    status, export_out, export_err = harvest("export", output, destination)
    assert status == 0, export_err
    printed += (export_out + export_err).encode()
    assert not [form for form in forms if form in printed], (out, err)
    files = [p for p in [*output.rglob("*"), *destination.rglob("*")] if p.is_file()]
    assert len(files) > 8 and any(p.name == "harvest.log" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not [form for form in forms if form in data], path
    assert "*" not in (destination / "README.md").read_text().split("\n# ", 1)[1].splitlines()[0]


def test_a_logged_traceback_is_redacted_too():
    """-v logs an unexpected error with its traceback (harvest.log): the exception's text
    quotes whatever the failing call had, a resolved secret included, in any encoding."""
    import io
    import logging
    from urllib.parse import quote

    from harvest.core.secrets import RedactingFilter, SecretResolver

    secret = 'Pl ace é"9x'
    resolver = SecretResolver(environ={"SECRET_DIR": secret})
    assert resolver.lookup("SECRET_DIR") == secret
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(resolver))
    logger = logging.getLogger("harvest.test-redaction")
    logger.addHandler(handler)
    try:
        try:
            raise OSError(f"cannot open file:///{quote(secret)}/x ({secret!r})")
        except OSError:
            logger.error("unexpected error for %s", secret, exc_info=True)
            logger.error("and once more", stack_info=True, extra={"detail": secret})
    finally:
        logger.removeHandler(handler)
    text = written.getvalue()
    assert "Traceback" in text and "OSError" in text and "***" in text
    assert not [form for form in encodings(secret) if form in text.encode()], text


@pytest.mark.parametrize("recipe, expected", [
    ("sources: [{use: foldr, options: {path: .}}]", "unknown source 'foldr': did you mean 'folder'?"),
    ("sources: [{use: folder, options: {path: ., recursiv: true}}]",
     "unknown option: did you mean 'recursive'?"),
    ("sources: [{use: folder, option: {path: .}}]", "unknown key: did you mean 'options'?"),
    ("source: [{use: folder, options: {path: .}}]", "unknown key: did you mean 'sources'?"),
])
def test_a_misspelt_name_gets_a_suggestion(recipe, expected, recipe_file, harvest, tmp_path):
    code, out, err = harvest("validate", recipe_file(f"output: {tmp_path / 'out'}\n{recipe}\n"))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_validate_refuses_an_output_folder_that_cannot_be_made(recipe_file, harvest, tmp_path):
    """It said ok, and the run then failed (issue 28)."""
    (tmp_path / "a-file").write_text("not a folder")
    for output, expected in ((tmp_path / "a-file", "the output is a file"),
                             (tmp_path / "a-file" / "out", "a-file is a file")):
        recipe = recipe_file(f"output: {output}\nsources: [{{use: folder, options: {{path: .}}}}]\n")
        code, out, err = harvest("validate", recipe)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "a-file").is_dir()
    code, out, err = harvest("validate", recipe_file(
        f"output: {tmp_path / 'new' / 'out'}\nsources: [{{use: folder, options: {{path: .}}}}]\n"))
    assert code == 0 and not (tmp_path / "new").exists(), err


def test_a_face_confidence_under_the_detectors_floor_is_refused(recipe_file, harvest, tmp_path):
    """NudeNet reports nothing under 0.25: 0.2 promised faces it never finds (issue 26)."""
    recipe = recipe_file(f"output: {tmp_path / 'out'}\nimages: {{blur_faces: true, "
                         "blur_min_confidence: 0.2}\nsources: [{use: folder, options: {path: .}}]\n")
    code, out, err = harvest("validate", recipe)
    assert code == 2 and "blur_min_confidence" in err and "0.25" in err, err


def test_a_quoted_number_is_the_number(recipe_file, harvest, tmp_path):
    """`shard_size: '1000'` was refused as not an integer (issue 28); text stays refused."""
    from harvest.core.options import Float, Int

    assert Int(1, None).convert("1000") == 1000 and Int().convert(" -3 ") == -3
    assert Float(0, 1).convert("0.25") == 0.25 and Float().convert("1e-3") == 0.001
    for bad in ("ten", "1.5", "0x10", "nan", "", "1 000"):
        with pytest.raises(ValueError):
            Int().convert(bad)
    for bad in ("nan", "inf", "one", "1,5"):
        with pytest.raises(ValueError):
            Float().convert(bad)
    recipe = recipe_file(f"output: {tmp_path / 'out'}\nrun: {{concurrency: '8'}}\n"
                         "sources: [{use: folder, options: {path: ., shard_size: '1000'}}]\n")
    code, out, err = harvest("validate", recipe)
    assert code == 0, err
    code, out, err = harvest("validate", recipe_file(recipe.read_text().replace("'8'", "'eight'"),
                                                     "bad.yml"))
    assert code == 2 and "run.concurrency" in err, err


def test_a_missing_extra_names_the_plugin_not_an_option(recipe_file, harvest, tmp_path,
                                                         monkeypatch):
    """It said sinks[1].options.use, a key the recipe cannot have (issue 28)."""
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    recipe = recipe_file(f"output: {tmp_path / 'out'}\n"
                         "sources: [{use: folder, options: {path: .}}]\n"
                         "sinks: [jsonl, parquet]\n")
    code, out, err = harvest("validate", recipe)
    assert code == 2 and "sinks[1].use" in err and "options.use" not in err, err
    assert "harvest-dataset[parquet]" in err


def test_validate_reports_every_error_at_once_in_the_order_of_the_file(recipe_file, harvest,
                                                                       tmp_path):
    """Fixing a recipe took a round per error; now one round: each error one line with
    its file, line and key path, a misspelt key not also reported as missing."""
    path = recipe_file("""name: x
outptu: out
run: {concurrency: many, retries: 2}
sources:
  - use: foldr
  - use: urls
    options: {path: missing.txt, formt: csv}
sinks: [jsonl, parquets]
retain_days: 0
""")
    status, out, err = harvest("validate", path)
    assert status == 2 and not out
    lines = err.strip().splitlines()
    expected = [
        ("recipe.yml:2: outptu", "did you mean 'output'?"),
        ("recipe.yml:3: run.concurrency", "expected"),
        ("recipe.yml:5: sources[0].use", "did you mean 'folder'?"),
        ("recipe.yml:7: sources[1].options.formt", "did you mean 'format'?"),
        ("recipe.yml:7: sources[1].options.path", "no such file"),
        ("recipe.yml:8: sinks[1].use", "did you mean 'parquet'?"),
        ("recipe.yml:9: retain_days", "expected"),
    ]
    assert len(lines) == len(expected), err
    for line, (where, what) in zip(lines, expected, strict=True):
        assert line.startswith("harvest: error: ") and where in line and what in line, line
    assert "output: required" not in err


def test_at_most_twenty_errors_are_said(recipe_file, harvest):
    sources = "".join(f"  - {{use: nope{i}, name: s{i}}}\n" for i in range(30))
    path = recipe_file(f"name: x\noutput: out\nsources:\n{sources}")
    status, _, err = harvest("validate", path)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 21
    assert all("unknown source" in line for line in lines[:20])
    assert lines[20].endswith("recipe.yml: and 10 more errors")


@pytest.mark.parametrize("text, line, column", [
    ("name: x\noutput: out\nsources:\n\t- use: folder\n", 4, 1),
    ("name: x\noutput: out\nsources:\n  - use: folder\n    options:\n\t  path: .\n", 6, 1),
    ("name:\tx\noutput: out\nsources: [{use: folder, options: {path: .}}]\n", 1, 6),
])
def test_a_tab_in_the_recipe_is_named_with_its_line(text, line, column, recipe_file, harvest):
    status, _, err = harvest("validate", recipe_file(text))
    assert status == 2
    check_one_line(err, f"recipe.yml:{line}: YAML syntax error: a tab at column {column}",
                   "YAML forbids tabs for indentation", "use spaces")
