"""Embeddings at scale: N pictures' embeddings (default 1,000,000, 256 dimensions) written
through the store ``embed`` uses, their size on disk, then ``harvest train`` on them (two
terms, 20 marks each) with its peak memory, to check that neither the store nor training
holds every embedding in memory.

    python bench/embeddings_scale.py [--n 1000000]

The records and vectors are made up (two clusters, one per term, 20% of each term drawn
from the other's): this measures sizes and memory, not how well training learns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    from harvest.core.output.embeddings import EmbeddingStore

    n = ARGS.n
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 1280)).astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        output = Path(work) / "out"
        state = output / ".harvest"
        store = EmbeddingStore(state, 256)
        started = time.perf_counter()
        with (output / "records.jsonl").open("w") as records:
            for start in range(0, n, 10_000):
                batch = {}
                for i in range(start, min(n, start + 10_000)):
                    sha = hashlib.sha256(b"%d" % i).hexdigest()
                    term = i % 2
                    shown = term if rng.random() >= 0.2 else 1 - term
                    batch[sha] = centres[shown] + rng.standard_normal(1280).astype(np.float32)
                    records.write(json.dumps({"id": f"bench:{i}", "term": f"term{term}",
                                              "file": {"path": f"images/{i}.jpg",
                                                       "sha256": sha}}) + "\n")
                store.add(batch)
        rows = len(store)
        store.close()
        written = time.perf_counter() - started
        vectors_mb = (state / "embeddings-256.f16").stat().st_size / 1e6
        index_mb = (state / "embeddings.sqlite").stat().st_size / 1e6
        print(f"{rows} embeddings of 256 float16 written in {written:.0f} s: "
              f"{vectors_mb:.0f} MB of rows + {index_mb:.0f} MB of index = "
              f"{vectors_mb + index_mb:.0f} MB on disk")
        review = sqlite3.connect(state / "review.sqlite")
        review.execute("CREATE TABLE decisions (id TEXT PRIMARY KEY, decision TEXT NOT NULL, "
                       "updated REAL NOT NULL)")
        review.execute("CREATE TABLE thresholds (term TEXT PRIMARY KEY, rule TEXT NOT NULL)")
        review.executemany("INSERT INTO decisions VALUES (?, ?, 0)",
                           [(f"bench:{i}", "keep" if i % 4 else "reject") for i in range(40)])
        review.commit()
        review.close()
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "harvest.core.commands.cli", "train",
                               str(output)], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(done.stdout.strip() or done.stderr.strip())
        print(f"harvest train on {n} pictures: {seconds:.0f} s, peak RSS {peak:.0f} MB "
              f"(every embedding as float32 would be {n * 256 * 4 / 1e6:.0f} MB)")
    return 0 if done.returncode == 0 else 1


ARGS = argparse.Namespace(n=1_000_000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="pictures")
    ARGS = parser.parse_args()
    sys.exit(main())
