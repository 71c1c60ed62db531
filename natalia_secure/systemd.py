"""The one systemd notifier: readiness, reload, stop and status messages, and a watchdog fed from the event loop.

The daemon runs as a `Type=notify` service with `WatchdogSec=`. The protocol, from sd_notify(3) and
sd_watchdog_enabled(3):
- systemd puts the address of its notify socket in NOTIFY_SOCKET: a filesystem path, or `@name` for the Linux
  abstract namespace (bound as "\\0name"). Unset or empty means we are not under systemd: every call is a no-op.
- A message is one datagram of newline-separated `VAR=value` assignments, UTF-8: READY=1, RELOADING=1, STOPPING=1,
  STATUS=<one line>, WATCHDOG=1.
- WATCHDOG_USEC is the watchdog timeout in microseconds; systemd recommends pinging at half of it. WATCHDOG_PID, when
  set, names the one process the watchdog is meant for: any other process must not ping.
- With `NotifyAccess=main` (the default) systemd only accepts messages from the main PID, so only the daemon's main
  process may send; a helper process gets its messages dropped (and logged by systemd).
The `sdnotify` package does the sending, with `debug=True`: without it sdnotify swallows every error, and ours must
never be swallowed (STYLE.md point 4): a failing send raises OSError out of `Notifier.notify()`. `Watchdog` pings only
after a health check passes, so a hung loop or an unhealthy store stops the pings and systemd restarts us.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import sdnotify
import structlog
from tornado.ioloop import PeriodicCallback

USEC_INFINITY = 2**64 - 1  # systemd's "no timeout" value; sd_watchdog_enabled(3) rejects it like 0

log = structlog.get_logger("natalia_secure.systemd")


def _positive_int(value: str | None) -> int | None:
    """The value as a positive decimal integer, else None (systemd's safe_atou64 accepts digits only, no sign)."""
    if not value or not (value.isascii() and value.isdigit()):
        return None
    number = int(value)
    return number if number > 0 else None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when there is no valid watchdog meant for `pid`."""
    usec = _positive_int(environ.get("WATCHDOG_USEC"))
    if usec is None or usec >= USEC_INFINITY:
        return None
    # sd_watchdog_enabled(3): when WATCHDOG_PID is set and is not our PID, the watchdog is another process's.
    if "WATCHDOG_PID" in environ and _positive_int(environ["WATCHDOG_PID"]) != pid:
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    """STATUS= takes one line: a newline would end it and could smuggle in another assignment (e.g. READY=1)."""
    return " ".join(text.splitlines())


class Notifier:
    """Does nothing outside systemd (NOTIFY_SOCKET unset or empty)."""

    def __init__(self, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET", "")
        self.enabled = bool(self._address)
        # Without a socket to ping there is no watchdog to feed, whatever WATCHDOG_USEC says.
        self.watchdog_interval_s = watchdog_interval(env, os.getpid() if pid is None else pid) if self.enabled else None
        self._sender: Any = None  # an sdnotify.SystemdNotifier, connected on the first notify()

    def _connect(self) -> Any:
        # sdnotify.SystemdNotifier.__init__ connects to os.environ["NOTIFY_SOCKET"] only, while our address comes from
        # `environ` (tests, or a caller that scrubbed its environment). So we connect the socket ourselves with the same
        # `@` rule and hand it to a SystemdNotifier whose __init__ is skipped; debug=True makes its notify() re-raise.
        # Connecting here rather than in __init__ means a missing socket raises out of notify(), where callers expect it.
        target = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        sender = sdnotify.SystemdNotifier.__new__(sdnotify.SystemdNotifier)
        sender.debug = True
        sender.socket = sock
        return sender

    def notify(self, *assignments: str) -> None:
        """Send the `VAR=value` assignments as one datagram; OSError when the socket cannot be reached."""
        if not self.enabled or not assignments:
            return
        for assignment in assignments:
            if "=" not in assignment or "\n" in assignment:
                raise ValueError(f"not one VAR=value assignment: {assignment!r}")
        if self._sender is None:
            self._sender = self._connect()
        # sdnotify encodes with latin-1, while sd_notify(3) messages are UTF-8: hand it the UTF-8 bytes spelled as
        # latin-1 characters so what goes on the wire is UTF-8 (and a non-latin-1 STATUS does not raise).
        message = "\n".join(assignments).encode("utf-8").decode("latin-1")
        try:
            self._sender.notify(message)
        except OSError:
            # Reconnect next time: systemd may have been re-executed (`systemctl daemon-reexec`) and rebound its socket.
            self.close()
            raise

    def ready(self, status: str | None = None) -> None:
        """READY=1: start-up (or a reload) is finished."""
        self.notify("READY=1", *self._status(status))

    def reloading(self) -> None:
        """RELOADING=1: a reload started; call ready() when it is done (sd_notify(3))."""
        self.notify("RELOADING=1")

    def stopping(self, status: str | None = None) -> None:
        """STOPPING=1: shutdown started."""
        self.notify("STOPPING=1", *self._status(status))

    def status(self, text: str) -> None:
        """STATUS=<text>, newlines replaced by spaces: the line `systemctl status` shows."""
        self.notify(*self._status(text))

    def watchdog(self) -> None:
        """WATCHDOG=1: we are alive; must come every watchdog_interval_s."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (a later notify() reconnects)."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.socket.close()

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return () if text is None else ("STATUS=" + _one_line(text),)


class Watchdog:
    """Pings WATCHDOG=1 from the running asyncio/Tornado event loop every notifier.watchdog_interval_s, but only when
    healthy() returns True: a blocked loop sends nothing (so systemd kills the hung process), and so does an
    unhealthy store. No-op when the notifier has no watchdog interval."""

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.healthy = healthy
        self.pings = 0
        self.skipped = 0
        self._callback: PeriodicCallback | None = None

    def start(self) -> None:
        """Start pinging from the current loop; the first ping goes at once if healthy."""
        interval = self.notifier.watchdog_interval_s
        if interval is None or self._callback is not None:
            return
        # PeriodicCallback skips the ticks a blocked loop missed instead of bursting them, so a hang shows as a gap.
        self._callback = PeriodicCallback(self._tick, interval * 1000)
        self._tick()
        self._callback.start()

    def stop(self) -> None:
        """Stop pinging; systemd then kills us after WATCHDOG_USEC unless we stop first."""
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    def _tick(self) -> None:
        if not self.healthy():
            self.skipped += 1
            return
        try:
            self.notifier.watchdog()
        except OSError as exc:
            # Logged, not raised: one lost datagram must not stop the loop; systemd judges by the pings that arrive.
            log.error("watchdog_ping_failed", error=str(exc))
            return
        self.pings += 1
