"""One writer at a time: an exclusive flock(2) on the state directory itself.

flock is released by the kernel when the holder dies, even by SIGKILL, so a crash never leaves a stale lock. The
directory is locked rather than a file in it: a lock file could be deleted and recreated while held, letting a
second writer in, and nothing at all needs to be written under the state directory to lock it.
"""

from __future__ import annotations

import fcntl
import os
import time

from .errors import LockHeldError


class StoreLock:
    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: str, wait: float = 0.0) -> StoreLock:
        """Take the lock, waiting up to `wait` seconds; LockHeldError names the way out."""
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(fd, state_dir)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockHeldError(
                        f"another natalia-secure process is writing {state_dir} (the daemon, or another admin command); "
                        "stop it, or retry with --wait SECONDS"
                    ) from None
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
