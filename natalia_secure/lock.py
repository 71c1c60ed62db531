"""One writer at a time: an exclusive flock(2) on `STATE_DIR/lock`.

flock is released by the kernel when the holder dies, even by SIGKILL, so a crash never leaves a stale lock.
The lock file stays empty: nothing readable is ever written under the state directory.
"""

from __future__ import annotations

import fcntl
import os
import time

from .errors import LockHeldError

LOCK_NAME = "lock"


class StoreLock:
    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: str, wait: float = 0.0) -> StoreLock:
        """Take the lock, waiting up to `wait` seconds; LockHeldError names the way out."""
        path = os.path.join(state_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(fd, path)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockHeldError(
                        f"another natalia-secure process holds {path} (the daemon, or another admin command); "
                        "stop it, or retry with --wait SECONDS"
                    ) from None
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
