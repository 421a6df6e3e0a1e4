"""The benchmark runs end to end at tiny sizes, so it cannot rot (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_smoke(tmp_path):
    figures_file = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--n", "12", "--latency", "0.001",
         "--concurrency", "4", "--flat", "30,60", "--micro", "--scale", "0.005",
         "--json", str(figures_file)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(figures_file.read_text())
    pipeline = figures["pipeline"]
    assert pipeline["harvest"]["stored"] == 12 and pipeline["harvest_first_run"]["stored"] == 12
    assert pipeline["baseline"]["images_per_s"] > 0 and pipeline["speedup"] > 0
    assert set(figures["flat"]) == {"30", "60"}
    assert figures["micro"]["exif_images_per_s"] > 0
    assert "harvest / baseline" in done.stdout


def test_cluster_benchmark_smoke(tmp_path):
    figures_file = tmp_path / "cluster.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cluster.py"), "--n", "12", "--latency", "0.001",
         "--concurrency", "4", "--workers", "1", "--shards", "2", "--empty-shards", "2",
         "--json", str(figures_file)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(figures_file.read_text())
    assert figures["runs"]["one process"]["stored"] == 12
    assert figures["runs"]["1 workers"]["stored"] == 12
    assert figures["runs"]["1 workers"]["shards"] >= 2
    assert "per-shard overhead" in done.stdout
