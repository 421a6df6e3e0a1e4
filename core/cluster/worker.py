"""On a worker: one shard of the recipe, run by the normal pipeline (a Dask task).

Images go straight to the output folder, which every worker must see at the same path
(a local cluster, or a shared file system); run state and the parts of unshared sinks go
to ``.harvest/shards/<shard>/`` inside it. With ``run.cluster_store``, the worker sees no
folder of the client's: the shard runs in a scratch folder of the worker's and is sent
whole through the store (``transfer``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distributed import get_worker
from distributed.utils import sync

from ..contract.recipe import Recipe
from ..contract.shards import SHARDS_DIR, Shard
from ..errors import HarvestError
from ..pipeline.summary import Summary
from ..secrets import RedactingFilter
from .scheduler import SchedulerCoordinator
from .transfer import ShardStore, attempt_name


class ClusterCoordinator(SchedulerCoordinator):
    """A shard's coordinator: every question goes to the scheduler, from the worker's loop."""

    def __init__(self, run: str, shard: str):
        super().__init__(run, shard)
        self.worker = get_worker()

    def _call(self, handler: str, **kwargs) -> Any:
        return sync(self.worker.loop, getattr(self.worker.scheduler, handler), **kwargs)


@dataclass
class ShardJob:
    recipe: Recipe
    run: str
    shard: Shard
    part_dir: str
    tombstones: tuple[str, ...] = ()  # content taken down (harvest takedown): never stored
    # run.cluster_store and its options: the shard runs in scratch, then travels there.
    store: tuple[str, dict] | None = None


def run_shard(job: ShardJob) -> dict:
    """A Dask task: the normal pipeline on one shard. Returns its summary (and, through a
    store, the marker of the shard it sent)."""
    if job.store is None:
        return _run_shard(job, job.recipe, Path(job.part_dir))
    scratch = Path(tempfile.mkdtemp(prefix="harvest-shard-",
                                    dir=get_worker().local_directory))
    try:
        part_name = attempt_name(job.shard.key)
        part_dir = scratch / SHARDS_DIR / part_name
        result = _run_shard(job, replace(job.recipe, output=scratch), part_dir)
        if part_dir.is_dir():  # not when stopped before it began
            result["sent"] = ShardStore(*job.store).send(scratch, part_name,
                                                         result["summary"]["outcome"])
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_shard(job: ShardJob, recipe: Recipe, part_dir: Path) -> dict:
    from ..pipeline.engine import Engine
    from ..pipeline.scope import ShardScope
    from ..pipeline.stopping import Interrupted

    (part_dir / ".harvest").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(part_dir / ".harvest" / "harvest.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(recipe.resolver))
    logger = logging.getLogger("harvest")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    # A worker's own log handlers do not know the recipe's secrets: harvest's records go
    # only to the redacting handler above.
    logger.propagate = False
    try:
        coordinator = ClusterCoordinator(job.run, job.shard.key)
        if coordinator.report([]):  # the client stopped the run before this shard began
            return {"shard": job.shard.key, "summary": Summary(recipe.name).to_dict()}
        scope = ShardScope([job.shard], part_dir, tombstones=set(job.tombstones))
        engine = Engine(recipe, progress=False, scope=scope, coordinator=coordinator)
        summary = engine.run()
        try:
            engine.report_progress()
        except (Exception, Interrupted):  # the final counts travel in the task's result anyway
            pass
        return {"shard": job.shard.key, "summary": summary.to_dict()}
    finally:
        logger.removeHandler(handler)
        handler.close()


def check_store(url: str, storage_options: dict) -> str | None:
    """Can this worker write to the cluster store? None when it can."""
    try:
        ShardStore(url, storage_options).check()
    except HarvestError as exc:
        return str(exc)
    return None


def check_output(output: str, token: str) -> str | None:
    """Can this worker see the client's output folder? None when it can."""
    probe = Path(output) / ".harvest" / f"cluster-probe-{token}"
    try:
        return None if probe.read_text() == token else "probe file has other content"
    except OSError as exc:
        return f"{exc.__class__.__name__}: {exc.strerror or exc}"
