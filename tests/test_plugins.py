"""Third-party plugins arrive through a real `harvest` entry point and run from a recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO, read_jsonl
from imagegen import make_image

HARVEST = os.path.join(os.path.dirname(sys.executable), "harvest")

PLUGIN_MODULE = '''
"""A source written the way a third party would: only harvest.core's public types."""
from pathlib import Path

from harvest.core import Int, Option, Record, Source, Str, hookimpl


class GallerySource(Source):
    """Numbered pictures from a gallery folder, one set per term."""

    reads_local_files = True  # its file: URLs are pictures on this machine by design

    options = (
        Option("folder", Str(), required=True, help="where the pictures are"),
        Option("per_term", Int(1, 50), 2, help="pictures per term"),
    )

    def records(self, query):
        folder = Path(self.config["folder"])
        for index in range(self.config["per_term"]):
            path = folder / f"{query.term}-{index}.jpg"
            yield Record(source="gallery", source_id=f"{query.term}-{query.lang}-{index}",
                         url=path.as_uri(), fields={"title": f"{query.text} #{index}"})


@hookimpl
def harvest_sources():
    return {"gallery": GallerySource}
'''


def install_plugin_distribution(site):
    """A tiny installed distribution: its module and a dist-info with the entry point."""
    (site / "harvest_gallery.py").write_text(PLUGIN_MODULE)
    dist_info = site / "harvest_gallery-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: harvest-gallery\n"
                                        "Version: 0.3\n")
    (dist_info / "entry_points.txt").write_text("[harvest]\ngallery = harvest_gallery\n")


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
