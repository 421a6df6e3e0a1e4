"""The documentation: the MkDocs site builds with --strict (no broken link or page), the
options reference is what the code declares, every option says what it does, and the
README stays short, with its recipe valid."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO


def test_options_reference_is_generated_from_the_code(harvest):
    status, out, _ = harvest("plugins", "--markdown")
    assert status == 0
    assert (REPO / "docs" / "reference.md").read_text(encoding="utf-8") == out, \
        "docs/reference.md is stale: run `harvest plugins --markdown > docs/reference.md`"


def test_record_field_reference_is_generated_from_the_code(harvest):
    status, out, _ = harvest("plugins", "--fields")
    assert status == 0
    assert (REPO / "docs" / "record-fields.md").read_text(encoding="utf-8") == out, \
        "docs/record-fields.md is stale: run `harvest plugins --fields > docs/record-fields.md`"


def test_every_field_the_output_readers_use_is_declared():
    from harvest.core.commands.export import HF_COLUMNS
    from harvest.core.commands.review import FACETS
    from harvest.core.fields import BY_NAME
    from harvest.core.output.credits import COLUMNS
    from harvest.core.output.takedown import OWNER_FIELDS

    read = {*COLUMNS, *HF_COLUMNS, *FACETS, *OWNER_FIELDS}
    assert sorted(read - set(BY_NAME)) == []


def test_every_option_has_a_description():
    from harvest.core.contract.recipe import RUN_OPTIONS
    from harvest.core.contract.registry import load_registry
    from harvest.core.download.shaping import IMAGE_OPTIONS

    registry = load_registry()
    plugins = [(info.name, info.cls.options) for kind in ("sources", "enrichers", "sinks")
               for info in registry.all(kind)]
    missing = [f"{owner}.{option.name}" for owner, options in
               [("run", RUN_OPTIONS), ("images", IMAGE_OPTIONS), *plugins]
               for option in options if len((option.help or "").strip()) < 8]
    assert not missing


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(REPO / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1",
                                                              "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "troubleshooting" / "index.html").is_file()


def test_readme_is_short_and_its_recipe_is_valid(harvest, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) < 10_500
    # Two commands before the demo: a light install that runs it, then the tests' own.
    setup = readme[readme.index("## Set-up"):readme.index("## The demo")]
    commands = re.findall(r"```sh\n(.*?)\n```", setup, re.S)
    assert commands[0].endswith("pip install -e . && harvest run configs/demo.yml"), commands
    assert commands[1] == "pip install -e '.[test]' && python -m pytest -q", commands
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines(), "`.ci/run` runs the README's test command"
    recipe = re.search(r"## A recipe\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "recipe.yml").write_text(recipe, encoding="utf-8")
    monkeypatch.setenv("FLICKR_KEY", "k" * 32)  # the other spelling than the default's
    monkeypatch.setenv("FLICKR_SECRET", "s" * 16)
    monkeypatch.delenv("FLICKER_KEY", raising=False)
    monkeypatch.delenv("FLICKER_SECRET", raising=False)
    status, out, err = harvest("validate", tmp_path / "recipe.yml")
    assert status == 0, err
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).is_file(), link
