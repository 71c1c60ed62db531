"""One JSON object per line from a child process's stdout: the parent's side of the fork servers' protocols
(tests/crash_writer.py, tests/chaos_daemon.py)."""

from __future__ import annotations

import json
import os
import select
import subprocess
from typing import Any


class JsonLines:
    """Reads `proc`'s stdout (unbuffered, bytes); a child silent for `timeout` seconds fails the test instead of
    hanging it, and one that died says so with its exit status."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        self.proc = proc
        self.timeout = timeout
        self._buffer = b""

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            readable, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            if not readable:
                raise TimeoutError(f"the fork server said nothing for {self.timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer
