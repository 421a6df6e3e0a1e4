"""The download stage: records go out to a pool, and each comes back as a ``Download``
for the files stage (``placing``).

Two pools: worker processes on one machine, so that every core checks images
(``fetchpool``), or threads (``stopping.DaemonPool``), on a cluster shard (the Dask worker
is the process) or with ``run.workers: 1``. Either way the engine thread receives a
Future whose result is the whole hand-off: nothing else is shared with the thread that
made it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ..download.fetch import Fetched
from ..download.fetchpool import ProcessFetchPool
from ..record import Record
from .stopping import DaemonPool


@dataclass
class Download:
    """A checked download. ``claim``: on a cluster, the (path, answer) of the content
    claim the download thread made on the scheduler, so that the engine thread does not
    wait for it; None on one machine."""

    fetched: Fetched
    claim: tuple[str, dict] | None = None


class ThreadDownloads:
    def __init__(self, threads: int, download: Callable[[Record], Download]):
        self.pool = DaemonPool(threads, "download")
        self.download = download

    def submit(self, record: Record) -> Future:
        return self.pool.submit(self.download, record)

    def shutdown(self) -> None:
        self.pool.shutdown()


class ProcessDownloads:
    def __init__(self, pool: ProcessFetchPool):
        self.pool = pool

    def submit(self, record: Record) -> Future:
        fetching = self.pool.submit(record.url, record.local_file_ok, record.expect_sha1)
        handed: Future = Future()

        def hand_over(done: Future) -> None:
            if done.cancelled():
                handed.cancel()
            elif done.exception() is not None:
                handed.set_exception(done.exception())
            else:
                handed.set_result(Download(done.result()))

        fetching.add_done_callback(hand_over)
        return handed

    def shutdown(self) -> None:
        self.pool.shutdown()
