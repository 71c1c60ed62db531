"""The systemd notifier and watchdog over real AF_UNIX datagram sockets, bound at a path and in the abstract namespace."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from natalia_secure.systemd import Notifier, Watchdog


class Receiver:
    """systemd's side of the notify socket: a thread that timestamps every datagram as it arrives."""

    def __init__(self, bind: str, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.settimeout(0.02)
        self.address = address
        self.datagrams: list[tuple[float, bytes]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.datagrams.append((time.monotonic(), data))

    def messages(self, wait_for: int = 0, timeout: float = 2.0) -> list[bytes]:
        """The datagrams so far, after waiting up to `timeout` for at least `wait_for` of them."""
        end = time.monotonic() + timeout
        while len(self.datagrams) < wait_for and time.monotonic() < end:
            time.sleep(0.005)
        return [data for _, data in self.datagrams]

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Receiver]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        r = Receiver(path, path)
    else:
        name = f"natalia-test-{uuid.uuid4().hex}"
        r = Receiver("\0" + name, "@" + name)
    yield r
    r.close()


def run_watchdog(notifier: Notifier, healthy: Callable[[], bool], body: Callable[[], object]) -> Watchdog:
    """Start a Watchdog inside a real asyncio loop, await `body()`, stop it; the loop then idles 0.15 s more."""
    watchdog = Watchdog(notifier, healthy)

    async def main() -> None:
        watchdog.start()
        await body()  # type: ignore[misc]
        watchdog.stop()
        await asyncio.sleep(0.15)

    asyncio.run(main())
    return watchdog


# ---- Notifier ----


def test_ready_arrives_as_one_datagram(receiver: Receiver) -> None:
    """ready("...") sends READY=1 and the status in one datagram, at a path and in the abstract namespace alike."""
    notifier = Notifier({"NOTIFY_SOCKET": receiver.address})
    assert notifier.enabled
    notifier.ready("serving 3 sessions")
    assert receiver.messages(wait_for=1) == [b"READY=1\nSTATUS=serving 3 sessions"]
    notifier.close()


def test_every_message_has_its_assignments(receiver: Receiver) -> None:
    """reloading, stopping, status and watchdog send exactly the assignments sd_notify(3) names, in order."""
    notifier = Notifier({"NOTIFY_SOCKET": receiver.address})
    notifier.reloading()
    notifier.ready()
    notifier.status("line one\nline two\r\nREADY=1")
    notifier.watchdog()
    notifier.stopping("draining")
    notifier.notify("STATUS=raw", "ERRNO=0")
    assert receiver.messages(wait_for=6) == [
        b"RELOADING=1",
        b"READY=1",
        b"STATUS=line one line two READY=1",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=draining",
        b"STATUS=raw\nERRNO=0",
    ]
    notifier.close()


def test_status_is_sent_as_utf8(receiver: Receiver) -> None:
    """A status outside latin-1 (sdnotify's own encoding) goes out as UTF-8, as sd_notify(3) expects."""
    notifier = Notifier({"NOTIFY_SOCKET": receiver.address})
    notifier.status("atención ✓")
    assert receiver.messages(wait_for=1) == ["STATUS=atención ✓".encode()]
    notifier.close()


def test_an_assignment_with_a_newline_is_refused(receiver: Receiver) -> None:
    """notify() will not send an assignment that would smuggle in another line, nor a string that assigns nothing."""
    notifier = Notifier({"NOTIFY_SOCKET": receiver.address})
    with pytest.raises(ValueError, match="assignment"):
        notifier.notify("STATUS=x\nREADY=1")
    with pytest.raises(ValueError, match="assignment"):
        notifier.notify("READY")
    time.sleep(0.05)
    assert receiver.messages() == []


def test_os_environ_is_the_default(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `environ`, NOTIFY_SOCKET and WATCHDOG_USEC come from os.environ and WATCHDOG_PID is checked against our pid."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    assert notifier.watchdog_interval_s == 1.5
    notifier.ready()
    assert receiver.messages(wait_for=1) == [b"READY=1"]
    notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "200000"}])
def test_outside_systemd_everything_is_a_silent_no_op(environ: dict[str, str]) -> None:
    """With NOTIFY_SOCKET unset or empty nothing is sent or raised, and there is no watchdog to feed."""
    notifier = Notifier(environ)
    assert not notifier.enabled
    notifier.notify("READY=1")
    notifier.ready("x")
    notifier.reloading()
    notifier.stopping("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.close()
    watchdog = Watchdog(notifier, lambda: True)
    watchdog.start()  # outside any loop: it must not even try to schedule
    watchdog.stop()
    assert watchdog.pings == 0
    assert watchdog.skipped == 0
    assert notifier.watchdog_interval_s is None


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-200000"}, None),
        ({"WATCHDOG_USEC": "+200000"}, None),
        ({"WATCHDOG_USEC": "2e5"}, None),
        ({"WATCHDOG_USEC": " 200000"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": str(2**64 - 1)}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid_only(environ: dict[str, str], interval: float | None) -> None:
    """WATCHDOG_USEC=200000 gives 0.1 s; another process's WATCHDOG_PID, zero, infinity or garbage give None."""
    assert Notifier({"NOTIFY_SOCKET": "@unused", **environ}, pid=4242).watchdog_interval_s == interval


def test_a_missing_socket_raises(tmp_path: pathlib.Path) -> None:
    """A NOTIFY_SOCKET that names nothing raises out of notify() instead of being swallowed as sdnotify would."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    with pytest.raises(FileNotFoundError):
        notifier.ready()
    abstract = Notifier({"NOTIFY_SOCKET": f"@natalia-test-absent-{uuid.uuid4().hex}"})
    with pytest.raises(ConnectionRefusedError):
        abstract.ready()


def test_a_receiver_that_went_away_raises_and_a_new_one_is_reached(tmp_path: pathlib.Path) -> None:
    """A send to a socket nobody listens on any more raises; the next notify() reconnects to the rebound socket."""
    path = str(tmp_path / "notify")
    first = Receiver(path, path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready()
    assert first.messages(wait_for=1) == [b"READY=1"]
    first.close()
    with pytest.raises(ConnectionRefusedError):
        notifier.watchdog()
    os.unlink(path)
    second = Receiver(path, path)
    notifier.watchdog()
    assert second.messages(wait_for=1) == [b"WATCHDOG=1"]
    notifier.close()
    second.close()


# ---- Watchdog ----


def test_watchdog_pings_at_half_the_timeout(receiver: Receiver) -> None:
    """WATCHDOG_USEC=100000 means a ping every 0.05 s: about 10 in 0.5 s, the first at once, none after stop()."""
    notifier = Notifier({"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "100000"})
    started = time.monotonic()
    watchdog = run_watchdog(notifier, lambda: True, lambda: asyncio.sleep(0.5))
    stopped_by = started + 0.5 + 0.1
    sent = watchdog.pings
    assert 6 <= sent <= 14
    assert watchdog.skipped == 0
    assert receiver.messages(wait_for=sent) == [b"WATCHDOG=1"] * sent
    assert receiver.datagrams[0][0] - started < 0.04  # the first ping does not wait for an interval
    time.sleep(0.1)
    assert len(receiver.datagrams) == sent
    assert all(t < stopped_by for t, _ in receiver.datagrams)
    notifier.close()


def test_an_unhealthy_process_sends_nothing(receiver: Receiver) -> None:
    """While healthy() is False no ping is sent and every tick is counted as skipped; pings resume when it recovers."""
    notifier = Notifier({"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "100000"})
    state = {"healthy": False}
    seen_while_unhealthy: list[int] = []

    async def body() -> None:
        await asyncio.sleep(0.3)
        seen_while_unhealthy.append(len(receiver.datagrams))
        state["healthy"] = True
        await asyncio.sleep(0.2)

    watchdog = run_watchdog(notifier, lambda: state["healthy"], body)
    assert seen_while_unhealthy == [0]
    assert 4 <= watchdog.skipped <= 9
    assert watchdog.pings >= 2
    assert receiver.messages(wait_for=watchdog.pings) == [b"WATCHDOG=1"] * watchdog.pings
    notifier.close()


def test_a_blocked_loop_leaves_a_gap(receiver: Receiver) -> None:
    """time.sleep(0.4) inside the loop stops the pings for those 0.4 s, and the missed ticks are not sent in a burst."""
    notifier = Notifier({"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "100000"})
    block: list[float] = []

    async def body() -> None:
        await asyncio.sleep(0.2)
        block.append(time.monotonic())
        time.sleep(0.4)  # the hang systemd must notice
        block.append(time.monotonic())
        await asyncio.sleep(0.2)

    watchdog = run_watchdog(notifier, lambda: True, body)
    times = [t for t, _ in receiver.datagrams]
    assert len(times) == watchdog.pings
    start, end = block
    assert times[0] < start and times[-1] > end  # pings before and after the hang
    assert not [t for t in times if start + 0.02 < t < end]  # nothing during it (a ping in flight may land just after start)
    assert len([t for t in times if end <= t < end + 0.03]) <= 1  # one catch-up tick at most, not the 8 missed
    assert watchdog.pings <= 18
    notifier.close()


def test_a_failing_ping_is_logged_and_the_loop_goes_on(tmp_path: pathlib.Path) -> None:
    """When the notify socket goes away each ping fails with a logged error, and the watchdog keeps ticking."""
    path = str(tmp_path / "notify")
    receiver = Receiver(path, path)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})

    async def body() -> None:
        await asyncio.sleep(0.12)
        receiver.close()
        await asyncio.sleep(0.2)

    with capture_logs() as logs:
        watchdog = run_watchdog(notifier, lambda: True, body)
    failures = [entry for entry in logs if entry["event"] == "watchdog_ping_failed"]
    assert 2 <= len(failures)
    assert all(entry["log_level"] == "error" and entry["error"] for entry in failures)
    assert 2 <= watchdog.pings <= 4
    notifier.close()
