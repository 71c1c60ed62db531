"""Deadlines swept once a second, for timeouts that almost never fire and are set thousands of times a second.

asyncio.timeout and Tornado's timeouts arm a timer per use (a handle in the event loop's heap, compared in Python on
every push, and cancelled after): per webhook and per reply that was ~5-10% of the daemon's CPU at saturation
(bench/README.md). Here `set` and `clear` cost a dict entry, and one timer a second, while anything is due, calls
what is late. A timeout fires between its time and SWEEP_S after it: enough for the 30 s, 75 s and 300 s ones here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

SWEEP_S = 1.0


class Deadlines:
    """Keys with a deadline and what to call if it passes first (the module docstring says why not a timer each)."""

    def __init__(self) -> None:
        self._due: dict[object, tuple[float, Callable[[], None]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def set(self, key: object, seconds: float, expire: Callable[[], None]) -> None:
        """Call `expire` once `seconds` have passed, unless `key` is set again or cleared first."""
        loop = asyncio.get_running_loop()
        self._due[key] = (loop.time() + seconds, expire)
        if self._sweep is None or self._loop is not loop:  # (a sweep of a loop gone, e.g. in tests, runs no more)
            self._loop = loop
            self._sweep = loop.call_later(SWEEP_S, self._expire)

    def clear(self, key: object) -> None:
        self._due.pop(key, None)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = loop.time()
            for key in [key for key, (due, _) in self._due.items() if due <= now]:
                entry = self._due.pop(key, None)  # (an earlier callback may have cleared it)
                if entry is not None:
                    entry[1]()
        finally:  # a callback that raises (logged by the loop) stops this sweep, never the ones after it
            self._sweep = loop.call_later(SWEEP_S, self._expire) if self._due else None
