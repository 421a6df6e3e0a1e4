"""Stopping a run cleanly: signals become a request the engine honours at a safe point,
and download threads never keep the process alive."""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
from concurrent.futures import Future


class Interrupted(BaseException):
    """The run was asked to stop (SIGINT, SIGTERM, or a cluster client). A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` in a plugin swallows it."""


class StopSignals:
    """SIGINT and SIGTERM set ``requested``; the engine checks it between steps, so a
    stop never lands in the middle of a sink's write and its commit (where it could
    leave a batch written but not recorded, and written again on the next run).

    A second signal exits at once, as kill -9 would: the run state is consistent at
    every commit, so the next run resumes from the last one.
    """

    def __init__(self, requested: threading.Event):
        self.requested = requested
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested.is_set():
            sys.stderr.write("harvest: stopped at once; run again to resume\n")
            sys.stderr.flush()
            os._exit(130)
        self.requested.set()


class DaemonPool:
    """A fixed pool of daemon threads running submitted calls, returning Futures.

    ``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter
    exits, so one download stuck on a silent server would keep a stopped run alive;
    these threads are abandoned instead (their sockets are shut by the caller).
    """

    def __init__(self, workers: int, name: str):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True)
                         for index in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._work.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Cancels what has not started and lets the threads end when their call does."""
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._work.put(None)
