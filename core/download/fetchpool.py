"""Downloads in worker processes, so that a run on one machine uses all of its cores.

Why this split. Profiles of a 20,000-URL run put nearly all of the per-image CPU in the
download threads: HTTP parsing, sha256, writing the file and Pillow's check of the image
(a third of it on its own). Those threads share one GIL, so one process does about what
one core can. What is left on the engine's thread (the run state, placing files,
enrichers, sinks) is what makes a run exactly-once and resumable, and it stays as it is,
in one process: workers only turn a URL into a checked file under ``.harvest/tmp`` and
say what they found (size, sha256, width, height, format, or why not). A worker that
dies loses only downloads in flight, which were never recorded; the engine's thread
treats them as transient failures, retried by the next run.

Each worker has its own download threads and its share of the decode memory; the
per-host rate is paced for all of them together, in shared memory (``SharedSpacing``), so
a host sees requests no closer than the recipe (or its robots.txt Crawl-delay) allows.
Workers ignore Ctrl-C (the terminal sends it to the whole process group): the engine
stops them, and each one exits by itself if the engine's process disappears.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
import zlib
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from ..errors import DiskFull, RecordError, one_line
from .fetch import Fetcher

RESULT_BATCH_SECONDS = 0.005
WORKER_CHECK_SECONDS = 0.5


class ProcessFetchPool:
    """``submit(url, local_files) -> Future[Fetched]``, served by worker processes."""

    def __init__(self, settings, temp_dir: Path, workers: int, on_notice=None,
                 analyses: tuple[str, ...] = ()):
        """``settings``: the run's ``RunSettings``; each worker builds its downloader from
        them with its share of the decode memory, and all pace each host together.
        ``on_notice(text)``: the workers' lines for the run's summary. ``analyses``: the
        enrichers' picture analyses, run by the workers on each picture."""
        self.on_notice = on_notice or (lambda text: None)
        context = multiprocessing.get_context("spawn")
        self.jobs = context.Queue()
        self.results = context.Queue()
        self.futures: dict[int, Future] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.closed = False
        self.context = context
        threads = -(-settings.concurrency // workers)  # concurrency shared out, rounded up
        self.spacing = SharedSpacing(context)
        self.worker_args = (settings, str(temp_dir), workers, threads, self.jobs,
                            self.results, os.getpid(), self.spacing, tuple(analyses))
        self.workers = workers
        self.processes: list = []

    def _start(self) -> None:
        """At the first download, not before: a re-run that skips everything starts no
        process (a worker's start-up costs about a quarter of a second)."""
        self.processes = [self._start_worker() for _ in range(self.workers)]
        threading.Thread(target=self._collect, name="fetch-results", daemon=True).start()

    def _start_worker(self):
        process = self.context.Process(target=_worker, name="harvest-fetch",
                                       args=self.worker_args, daemon=True)
        with _main_script_hidden():
            process.start()
        return process

    def submit(self, url: str, local_files: bool, expect_sha1: str | None = None) -> Future:
        if not self.processes:
            self._start()
        future: Future = Future()
        future.set_running_or_notify_cancel()
        job = next(self.ids)
        with self.lock:
            self.futures[job] = future
        self.jobs.put((job, url, local_files, expect_sha1))
        return future

    def _collect(self) -> None:
        last_check = time.monotonic()
        while True:
            if time.monotonic() - last_check >= WORKER_CHECK_SECONDS:
                # Also while results flow: the others' answers must not hide a dead one.
                last_check = time.monotonic()
                self._check_workers()
            try:
                batch = self.results.get(timeout=WORKER_CHECK_SECONDS)
            except Exception:  # queue.Empty, or the queue closed under us at shutdown
                if self.closed:
                    return
                continue
            if batch is None:
                return
            for job, outcome, payload in batch:
                if outcome == "notice":
                    self.on_notice(payload)
                    continue
                with self.lock:
                    future = self.futures.pop(job, None)
                if future is None:
                    continue
                if outcome == "ok":
                    future.set_result(payload)
                elif outcome == "rejected":
                    reason, permanent, dropped = payload
                    future.set_exception(RecordError(reason, permanent=permanent,
                                                     dropped=dropped))
                elif outcome == "disk_full":
                    future.set_exception(DiskFull(payload))
                else:
                    future.set_exception(RecordError(f"unexpected {payload}", permanent=False))

    def _check_workers(self) -> None:
        """A worker that died (killed, out of memory) took its downloads with it. Which
        ones is not known here, so every download in flight fails transiently (the next
        run retries them; late answers for them are ignored), and a new worker takes the
        dead one's place."""
        dead = [p for p in self.processes if not p.is_alive()]
        if not dead or self.closed:
            return
        with self.lock:
            lost, self.futures = self.futures, {}
        for future in lost.values():
            future.set_exception(RecordError("download worker died", permanent=False))
        self.processes = [p for p in self.processes if p.is_alive()]
        self.processes += [self._start_worker() for _ in dead]

    def shutdown(self) -> None:
        """Stops every worker now: downloads in flight are abandoned (their temporary
        files are removed with ``.harvest/tmp`` at the end of the run)."""
        if self.closed:
            return
        self.closed = True
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 2.0
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        with self.lock:
            lost, self.futures = self.futures, {}
        for future in lost.values():
            future.cancel()
        for queue in (self.jobs, self.results):
            queue.cancel_join_thread()
            queue.close()


@contextmanager
def _main_script_hidden():
    """Spawn re-runs the parent's main script in each child so that functions defined
    there can be found. The worker's function lives in this module, and the main script is
    the ``harvest`` command, whose import of the whole CLI cost each worker about 0.3 s of
    CPU: without ``__file__`` (as in an interactive session) spawn skips it."""
    main = sys.modules["__main__"]
    with _MAIN_LOCK:
        script = main.__dict__.pop("__file__", None)
        try:
            yield
        finally:
            if script is not None:
                main.__file__ = script


_MAIN_LOCK = threading.Lock()


class SharedSpacing:
    """Per-host request spacing shared by every download process of the run: a slot per
    host (by hash) in shared memory holds when its next request may go. So the per-host
    rate (and a robots.txt Crawl-delay) holds across processes request by request, not
    only on average; two hosts that share a slot are paced together (65,536 slots)."""

    SLOTS = 65_536

    def __init__(self, context):
        self.times = context.RawArray("d", self.SLOTS)
        self.lock = context.Lock()

    def reserve(self, key: str, rate: float, burst: float = 1.0) -> float:
        slot = zlib.crc32(key.encode("utf-8", "replace")) % self.SLOTS
        with self.lock:
            now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
            start = max(self.times[slot], now)
            self.times[slot] = start + 1.0 / rate
        return start - now


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """The kernel kills this worker when the engine's process dies (kill -9 included),
    whatever the worker is doing: the flusher's own check needs the GIL, which a thread
    stuck in C code (a decoder, a pathological pattern) may never give back. The signal
    comes when the thread that started the worker ends; the engine's thread and the
    result collector, which start them, live as long as the pool. Elsewhere than Linux
    only the flusher's check remains."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(0)  # the parent died before prctl: no signal will ever come


def _worker(settings, temp_dir: str, share: int, threads: int, jobs, results,
            parent: int, spacing: SharedSpacing, analyses: tuple[str, ...] = ()) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    fetcher = Fetcher.for_run(settings, Path(temp_dir), share=share, threads=threads,
                              reserve=spacing.reserve, analyses=analyses)
    outbox: list = []
    outbox_lock = threading.Lock()

    def send(item) -> None:
        with outbox_lock:
            outbox.append(item)

    fetcher.on_notice = lambda text: send((None, "notice", text))

    def flusher() -> None:
        # Results go back in small batches: one pickle and one pipe write for several.
        while True:
            time.sleep(RESULT_BATCH_SECONDS)
            if os.getppid() != parent:
                os._exit(0)  # the engine's process is gone (kill -9): nobody to report to
            with outbox_lock:
                batch = outbox[:]
                outbox.clear()
            if batch:
                results.put(batch)

    def work() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            job_id, url, local_files, expect_sha1 = job
            try:
                fetched = fetcher.fetch(url, local_files=local_files, expect_sha1=expect_sha1)
            except DiskFull as exc:
                send((job_id, "disk_full", str(exc.where)))
            except RecordError as exc:
                send((job_id, "rejected", (exc.reason, exc.permanent, exc.dropped)))
            except Exception as exc:  # a bug must fail its record, not the worker
                send((job_id, "bug", one_line(exc)))
            else:
                send((job_id, "ok", fetched))  # the dataclass whole: it pickles as it is

    threading.Thread(target=flusher, daemon=True).start()
    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
