"""The benchmark runs end to end at tiny sizes, so it cannot rot (timings are not checked)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
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


def test_stand_in_servers_take_a_burst_of_connections():
    """A client that opens a connection per image sends a burst of SYNs; real hosts queue
    thousands (nginx: backlog=4096), Python's default of 5 drops the rest to retransmit.
    Nothing accepts here (the server is not started), so only the listen queue holds them."""
    from fakes import LocalServer, serve_in_thread

    idle = LocalServer(lambda *request: (200, {}, b""))
    threaded, _ = serve_in_thread(BaseHTTPRequestHandler)
    threaded.shutdown()  # stops accepting; the listening socket stays open
    try:
        for port in (idle.httpd.server_address[1], threaded.server_address[1]):
            opened = []
            try:
                for _ in range(64):
                    opened.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except TimeoutError:
                pass
            finally:
                for connection in opened:
                    connection.close()
            assert len(opened) == 64, f"port {port} queued only {len(opened)} connections"
    finally:
        idle.httpd.server_close()
        threaded.server_close()


def _real_host_tools_missing() -> str | None:
    missing = [tool for tool in ("nginx", "curl", "openssl")
               if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
    return f"bench/real_host.py needs {', '.join(missing)} (apt-get install -y nginx-light curl)" \
        if missing else None


@pytest.mark.skipif(_real_host_tools_missing() is not None,
                    reason=_real_host_tools_missing() or "")
def test_real_host_benchmark_smoke(tmp_path):
    """harvest and curl against nginx at a tiny size; every file must be on disk. img2dataset
    joins only when its environment already exists (a test never installs it)."""
    venv = Path("~/.cache/harvest-bench/img2dataset-venv").expanduser()
    tools = "harvest,curl" + (",img2dataset" if (venv / "bin" / "img2dataset").exists()
                              and os.environ.get("HARVEST_BENCH_IMG2DATASET") else "")
    figures_file = tmp_path / "real-host.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real_host.py"), "--small", "50", "--photos", "0",
         "--schemes", "http", "--tools", tools, "--rounds", "1", "--json", str(figures_file)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(figures_file.read_text())
    runs = {run["tool"]: run for run in figures["runs"]}
    assert set(runs) == set(tools.split(","))
    for run in runs.values():
        assert run["stored"] == 50 and run["stored_bytes"] == figures["site"]["small"]["bytes"]
        assert run["images_per_s"] > 0 and run["cpu_ms_per_image"] > 0
    assert figures["failures"] == []
    assert "harvest/curl speed, CPU" in done.stdout
