"""Third-party plugins arrive through a real `harvest` entry point and run from a recipe."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import textwrap

from conftest import REPO, read_jsonl
from imagegen import make_image

HARVEST = os.path.join(os.path.dirname(sys.executable), "harvest")

# The plugin and entry points docs/writing-plugins.md shows, as it shows them: what a
# plugin author copies from the guide is what runs here.
GUIDE = (REPO / "docs" / "writing-plugins.md").read_text(encoding="utf-8")


def guide_block(language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", GUIDE, re.S).group(1)


def guide_entry_points() -> str:
    """The guide's ``pyproject.toml`` entry points as pip writes them (entry_points.txt);
    the guide's ``setup.cfg`` spelling must name the same ones. (A table of TOML strings
    reads as INI with quoted values: no tomllib before Python 3.11.)"""
    pyproject, setup_cfg = configparser.ConfigParser(), configparser.ConfigParser()
    pyproject.read_string(guide_block("toml"))
    setup_cfg.read_string(guide_block("ini"))
    groups = {section.removeprefix("project.entry-points."):
              {name: json.loads(value) for name, value in pyproject[section].items()}
              for section in pyproject.sections()}
    assert set(groups) == set(setup_cfg["options.entry_points"])
    for group, text in setup_cfg["options.entry_points"].items():
        lines = [line.partition("=") for line in text.strip().splitlines()]
        assert {name.strip(): value.strip() for name, _, value in lines} == groups[group]
    return "".join(f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in
                                            entries.items())
                   for group, entries in groups.items())


def install_plugin_distribution(site):
    """A tiny installed distribution: its module and a dist-info with the entry point."""
    (site / "harvest_gallery.py").write_text(guide_block("python"))
    dist_info = site / "harvest_gallery-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: harvest-gallery\n"
                                        "Version: 0.3\n")
    (dist_info / "entry_points.txt").write_text(guide_entry_points())


def run(args, site, home):
    env = dict(os.environ, PYTHONPATH=str(site), HOME=str(home))
    return subprocess.run([HARVEST, *args], env=env, capture_output=True, text=True, timeout=120)


def test_entry_point_plugin_is_listed_and_runs(tmp_path, isolated_home):
    site = tmp_path / "site"
    site.mkdir()
    install_plugin_distribution(site)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for seed, term in enumerate(["monkey", "cage"]):
        for index in range(3):
            (gallery / f"{term}-{index}.jpg").write_bytes(make_image(seed * 10 + index))

    listing = run(["plugins", "--json"], site, isolated_home)
    assert listing.returncode == 0, listing.stderr
    sources = {p["name"]: p for p in json.loads(listing.stdout)["sources"]}
    assert sources["gallery"]["origin"] == "harvest-gallery 0.3"
    assert sources["flickr"]["origin"] == "built-in"
    assert [o["name"] for o in sources["gallery"]["options"]] == ["folder", "per_term"]
    text = run(["plugins"], site, isolated_home).stdout
    assert "gallery  [harvest-gallery 0.3]" in text

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(textwrap.dedent(f"""
        name: gallery
        terms: [monkey, {{en: cage, fr: cage}}]
        output: {tmp_path / "out"}
        sources:
          - use: gallery
            options: {{folder: {gallery}, per_term: 2}}
    """))
    done = run(["run", str(recipe), "--no-progress"], site, isolated_home)
    assert done.returncode == 0, done.stderr
    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert sorted(r["source_id"] for r in records) == [
        "cage-en-0", "cage-en-1", "cage-fr-0", "cage-fr-1", "monkey-en-0", "monkey-en-1"]
    # cage in French found the same files as cage in English: stored once.
    assert sum(1 for r in records if r.get("duplicate_of")) == 2

    bad = recipe.read_text().replace("per_term: 2", "per_term: 99")
    recipe.write_text(bad)
    done = run(["validate", str(recipe)], site, isolated_home)
    assert done.returncode == 2
    assert "sources[0].options.per_term" in done.stderr and "between 1 and 50" in done.stderr


def test_non_editable_install_works(tmp_path, isolated_home):
    """`pip install .` (not only -e) gives a working harvest.core and harvest.plugins."""
    target = tmp_path / "target"
    env = dict(os.environ, HOME=str(isolated_home))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(target), str(REPO)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (target / "harvest" / "__init__.py").exists()  # a namespace package
    probe = ("import harvest.core.commands.cli, harvest.plugins.sources.flickr, sys;"
             "print(harvest.core.commands.cli.__file__);"
             "from harvest.core.contract.registry import load_registry;"
             "print(load_registry().names('sources'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=str(target)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path, names = done.stdout.splitlines()
    assert path.startswith(str(target))
    assert "flickr" in names and "folder" in names


def test_version_and_a_closed_pipe(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    harvest = Path(sys.executable).with_name("harvest")
    done = subprocess.run([str(harvest), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("harvest 0.")
    # `harvest plugins | head -1`: the reader leaves early; no traceback.
    piped = subprocess.run(f"'{harvest}' plugins | head -1", shell=True, capture_output=True,
                           text=True)
    assert piped.stdout == "sources:\n"
    assert piped.stderr == "", piped.stderr
