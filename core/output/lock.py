"""One run per output folder: an exclusive lock held for the whole run.

Two runs on one output would each clear the other's temporary files and append the
same records to the same sinks. The lock is ``flock`` on ``.harvest/lock``: the kernel
releases it when the process dies however it dies (kill -9 included), so a stale lock
never blocks the next run. The file holds the holder's pid, for the error message.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

try:
    import fcntl
except ImportError:  # Windows without WSL: no flock; runs are not guarded there
    fcntl = None


class OutputLock:
    def __init__(self, output: Path):
        self.output = output
        self.path = output / ".harvest" / "lock"
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.output}: another harvest run (pid {holder}) is using this "
                             f"output folder; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
