from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeFlickr, FakePhoto  # noqa: E402

from harvest.core.commands.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own HOME, so nothing is read from or written to the real one."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("FLICKER_KEY", "FLICKER_SECRET", "HARVEST_CREDENTIALS", "GOOGLE_VISION_KEY"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def flickr(monkeypatch):
    from harvest.plugins.sources import flickr as flickr_source

    # The license table is read once per process and endpoint; a later fake server can get
    # an earlier one's port, and would then never be asked for it.
    flickr_source._LICENSE_TABLES.clear()
    fake = FakeFlickr().start()
    monkeypatch.setenv("FLICKER_KEY", fake.api_key)
    monkeypatch.setenv("FLICKER_SECRET", "test-secret-abcdef")
    yield fake
    fake.stop()


def monkey_photos(n: int, start: int = 1, **overrides) -> list[FakePhoto]:
    return [FakePhoto(id=str(1000 + i), title=f"monkey {i}", tags="monkey animal",
                      dateupload=1_500_000_000 + i * 60, **overrides)
            for i in range(start, start + n)]


@pytest.fixture
def recipe_file(tmp_path):
    """Writes a recipe (YAML text, dedented) and returns its path."""
    def write(text: str, name: str = "recipe.yml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path
    return write


@pytest.fixture
def harvest(capsys):
    """Runs the CLI in-process; returns (exit status, stdout, stderr)."""
    def run(*args: str):
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err
    return run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def flickr_recipe(endpoint: str, output: Path, *, terms: str = "[monkey]", run: str = "",
                  options: str = "") -> str:
    # The fake servers live on 127.0.0.1, which harvest refuses unless told otherwise.
    settings = {"concurrency": 4, "rate_per_host": 1000, "backoff": 0.01,
                "allow_private_addresses": True}
    settings.update(yaml.safe_load(textwrap.dedent(run)) or {})
    return f"""
name: flickr-test
terms: {terms}
output: {output}
run: {json.dumps(settings)}
sources:
  - use: flickr
    options:
      endpoint: {endpoint}
      per_page: 10
{textwrap.indent(textwrap.dedent(options).strip(), '      ') if options.strip() else ''}
"""


@pytest.fixture
def mongo(tmp_path):
    from mongo_server import MongoServer

    server = MongoServer(tmp_path / "mongo-data").start()
    yield server
    server.stop(graceful=False)


@pytest.fixture
def key_file(tmp_path):
    from harvest.core.output.crypto import generate_key_file

    path = tmp_path / "keys" / "harvest.key"
    generate_key_file(path)
    return path


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A real local Dask cluster: a scheduler and two worker processes on 127.0.0.1."""
    from distributed import LocalCluster

    with pytest.MonkeyPatch.context() as patch:
        # The workers inherit the environment they start with.
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("HOME", str(tmp_path_factory.mktemp("worker-home")))
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=":0")
    yield cluster
    cluster.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root and a kernel that lets this process mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)
