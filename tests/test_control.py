"""The control socket over real AF_UNIX sockets: the server on its own event loop in a thread, as beside Tornado."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from natalia_secure import control
from natalia_secure.control import ControlServer, Handler, RemoteError
from natalia_secure.errors import ConfigError, NataliaError, NotFoundError, StoreUnavailable


class Daemon:
    """A ControlServer started on an event loop that runs in its own thread."""

    def __init__(self, state_dir: str, handlers: dict[str, Handler], **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(state_dir, handlers, **kwargs)
        self.closed = False
        try:
            self.run(self.server.start())
        except BaseException:
            self.stop()
            raise

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self, timeout: float = 5.0) -> Any:
        """close() scheduled on the loop: the future lets a test watch it wait."""
        self.closed = True
        return asyncio.run_coroutine_threadsafe(self.server.close(timeout), self.loop)

    def stop(self) -> None:
        if not self.closed and self.server._server is not None:
            self.close().result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def state(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return str(path)


@pytest.fixture
def serve(state: str) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(handlers: dict[str, Handler], state_dir: str = state, **kwargs: Any) -> Daemon:
        daemon = Daemon(state_dir, handlers, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


async def echo(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    progress("one")
    progress("two\nlines")
    return {"echo": args}


def raw(state_dir: str, data: bytes, *, shut: bool = False) -> list[dict[str, Any]]:
    """Send bytes as they are and read every line the daemon answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(control.socket_path(state_dir))
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        with sock.makefile("rb") as f:
            return [orjson.loads(line) for line in f]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run fn in a thread; the list gets its return value or the exception it raised."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def gated(started: threading.Event, gate: threading.Event, finished: list[str], name: str = "slow") -> Handler:
    """A handler that signals it has begun, then waits (off the loop) until the test opens the gate."""

    async def handler(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        started.set()
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 5)
        finished.append(name)
        return {"done": name}

    return handler


# ---- the protocol ----


def test_socket_path_is_control_sock_in_the_state_directory() -> None:
    """The CLI and the daemon agree on one place: <state_dir>/control.sock."""
    assert control.socket_path("/var/lib/natalia-secure") == "/var/lib/natalia-secure/control.sock"


def test_round_trip_relays_progress_lines_then_returns_the_result(serve: Callable[..., Daemon], state: str) -> None:
    """The handler gets the args, its progress lines reach on_progress in order (one line each), its dict comes back."""
    serve({"echo": echo})
    lines: list[str] = []
    result = control.call(state, "echo", {"phone": "x", "n": [1, 2]}, on_progress=lines.append, timeout=5)
    assert result == {"echo": {"phone": "x", "n": [1, 2]}}
    assert lines == ["one", "two\nlines"]


def test_a_natalia_error_in_the_handler_keeps_its_message_and_exit_code(serve: Callable[..., Daemon], state: str) -> None:
    """A handler's NotFoundError reaches the CLI as a RemoteError (a NataliaError) with exit code 8 and the same line."""

    async def missing(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        raise NotFoundError("no session for that phone")

    serve({"forget": missing})
    with pytest.raises(RemoteError) as caught:
        control.call(state, "forget", {}, timeout=5)
    assert isinstance(caught.value, NataliaError)
    assert caught.value.exit_code == 8 and str(caught.value) == "no session for that phone"


def test_an_unexpected_exception_is_exit_1_and_logged_with_its_traceback(serve: Callable[..., Daemon], state: str) -> None:
    """A bug in a handler answers exit 1 with its type only, and the daemon logs it with exc_info; the next call works."""

    async def buggy(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        raise ZeroDivisionError("secret detail")

    serve({"buggy": buggy, "echo": echo})
    with capture_logs() as logs, pytest.raises(RemoteError) as caught:
        control.call(state, "buggy", {}, timeout=5)
    assert caught.value.exit_code == 1
    assert str(caught.value) == "internal error in the daemon: ZeroDivisionError; see its log"
    crashed = [entry for entry in logs if entry["event"] == "control_command_crashed"]
    assert len(crashed) == 1 and isinstance(crashed[0]["exc_info"], ZeroDivisionError)
    assert control.call(state, "echo", {}, timeout=5) == {"echo": {}}


def test_a_result_that_is_not_a_json_dict_is_an_internal_error(serve: Callable[..., Daemon], state: str) -> None:
    """A handler returning something orjson cannot encode, or not a dict, is a bug: exit 1, never a broken line."""

    async def unencodable(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        return {"x": object()}

    async def a_list(args: dict[str, Any], progress: Callable[[str], None]) -> Any:
        return [1]

    serve({"unencodable": unencodable, "list": a_list})
    for command in ("unencodable", "list"):
        with pytest.raises(RemoteError) as caught:
            control.call(state, command, {}, timeout=5)
        assert caught.value.exit_code == 1


def test_an_unknown_command_is_a_usage_error(serve: Callable[..., Daemon], state: str) -> None:
    """A command the daemon has no handler for answers exit 2 and names it."""
    serve({"echo": echo})
    with pytest.raises(RemoteError) as caught:
        control.call(state, "rotate-everything", {}, timeout=5)
    assert caught.value.exit_code == 2 and "rotate-everything" in str(caught.value)


@pytest.mark.parametrize(
    "request_line",
    [b"not json\n", b"[1, 2]\n", b'{"args": {}}\n', b'{"command": 5}\n', b'{"command": "echo", "args": []}\n',
     b'{"command": "echo", "args": {}, "force": true}\n', b"\n"],
)
def test_a_malformed_request_is_a_usage_error_and_runs_nothing(
    serve: Callable[..., Daemon], state: str, request_line: bytes
) -> None:
    """Not JSON, not an object, no string command, args not an object, an unknown field, empty: one final line, exit 2."""
    ran: list[dict[str, Any]] = []

    async def record(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        ran.append(args)
        return {}

    serve({"echo": record})
    answer = raw(state, request_line)
    assert len(answer) == 1 and answer[0]["ok"] is False and answer[0]["exit_code"] == 2
    assert "\n" not in answer[0]["error"]
    assert ran == []


def test_a_request_without_args_or_final_newline_is_accepted(serve: Callable[..., Daemon], state: str) -> None:
    """`args` defaults to {} and a request ended by half-closing the connection instead of a newline still counts."""
    serve({"echo": echo})
    answer = raw(state, b'{"command": "echo"}', shut=True)
    assert answer[-1] == {"ok": True, "result": {"echo": {}}}


def test_a_request_over_64_mib_is_refused(serve: Callable[..., Daemon], state: str) -> None:
    """A request line longer than 64 MiB answers exit 2 without reaching the handler, and call() reads that answer."""
    ran: list[int] = []

    async def record(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        ran.append(1)
        return {}

    serve({"echo": record})
    with pytest.raises(RemoteError) as caught:
        control.call(state, "echo", {"blob": "x" * control.MAX_REQUEST}, timeout=10)
    assert caught.value.exit_code == 2 and "64 MiB" in str(caught.value)
    assert ran == []


def test_an_idle_client_times_out_without_holding_up_others(serve: Callable[..., Daemon], state: str) -> None:
    """A client that connects and sends nothing gets exit 2 after the read timeout; meanwhile other commands run."""
    serve({"echo": echo}, read_timeout=0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.settimeout(5)
        idle.connect(control.socket_path(state))
        assert control.call(state, "echo", {}, timeout=5) == {"echo": {}}
        began = time.monotonic()
        answer = orjson.loads(idle.makefile("rb").readline())
    assert answer["ok"] is False and answer["exit_code"] == 2
    assert time.monotonic() - began < 2


# ---- the socket file ----


def test_the_socket_is_0600_and_a_stale_one_is_replaced(serve: Callable[..., Daemon], state: str) -> None:
    """A socket left by a killed daemon is removed at start; the new one is 0600 whatever the umask, and answers."""
    path = control.socket_path(state)
    old_umask = os.umask(0)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(path)  # bound, never listened, closed: what SIGKILL leaves behind (0777 under umask 0)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o777
        serve({"echo": echo})  # binding where a file still exists would fail (EADDRINUSE): it was removed
    finally:
        os.umask(old_umask)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert control.call(state, "echo", {}, timeout=5) == {"echo": {}}


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_something_that_is_not_a_socket_at_the_path_is_refused_and_kept(state: str, kind: str) -> None:
    """start() refuses (ConfigError) to remove a file, directory or symlink named control.sock, and leaves it as it was."""
    path = control.socket_path(state)
    if kind == "file":
        pathlib.Path(path).write_bytes(b"keep me")
    elif kind == "directory":
        os.mkdir(path)
    else:
        os.symlink("/nonexistent", path)
    before = os.lstat(path)
    with pytest.raises(ConfigError, match="not a socket"):
        Daemon(state, {"echo": echo})
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_size) == (before.st_ino, before.st_mode, before.st_size)


def test_call_returns_none_without_a_daemon(state: str) -> None:
    """No socket file, a stale socket (ECONNREFUSED) or no state directory at all: None, so the CLI takes the lock."""
    assert control.call(state, "echo", {}) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(control.socket_path(state))
    assert control.call(state, "echo", {}) is None
    assert control.call(os.path.join(state, "missing"), "echo", {}) is None


def open_on(directory: str) -> list[str]:
    """This process's descriptors open on `directory` itself (other tests' threads may open and close others)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == directory:
                found.append(fd)
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, another thread's)
    return found


def test_a_path_too_long_for_sun_path_goes_through_proc_self_fd(serve: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    """A state directory deeper than sun_path's 107 bytes still gets its socket there, reachable by call(), and removed."""
    deep = tmp_path.joinpath(*["d" * 40] * 4)
    deep.mkdir(parents=True, mode=0o700)
    path = control.socket_path(str(deep))
    assert len(os.fsencode(path)) > control.SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as too_long, pytest.raises(OSError):
        too_long.bind(path)  # the limit is real: without the detour this fails
    daemon = serve({"echo": echo}, state_dir=str(deep))
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert control.call(str(deep), "echo", {"deep": True}, timeout=5) == {"echo": {"deep": True}}
    assert control.call(str(deep), "echo", {}, timeout=5) == {"echo": {}}
    assert not open_on(str(deep))  # the directory fd is not kept open (by the client or the server)
    assert daemon.close().result(5) is True
    assert not os.path.lexists(path)


# ---- who may connect ----


def test_a_peer_uid_not_allowed_is_refused_before_anything_is_read(serve: Callable[..., Daemon], state: str) -> None:
    """With our uid not allowed, call() gets exit 3 (ConfigError), the handler never runs and the uid is logged."""
    ran: list[int] = []

    async def record(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        ran.append(1)
        return {}

    other = os.geteuid() + 4242
    serve({"echo": record}, allowed_uids={other})
    with capture_logs() as logs, pytest.raises(RemoteError) as caught:
        control.call(state, "echo", {}, timeout=5)
    assert caught.value.exit_code == 3 and "root or the service user" in str(caught.value)
    assert ran == []
    refused = [entry for entry in logs if entry["event"] == "control_peer_refused"]
    assert refused and refused[0]["uid"] == os.geteuid() and refused[0]["log_level"] == "warning"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_user_cannot_connect_to_the_0600_socket(serve: Callable[..., Daemon]) -> None:
    """Run as nobody (65534) in a forked child, call() on root's 0600 socket in a world-searchable directory raises
    ConfigError: the file mode alone keeps other users out."""
    base = tempfile.mkdtemp(prefix="natalia-control-")
    try:
        os.chmod(base, 0o755)
        serve({"echo": echo}, state_dir=base)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what call() did through the pipe, then leave without running pytest's atexit
            os.close(read_end)
            outcome = b"?"
            try:
                os.setgid(65534)
                os.setuid(65534)
                control.call(base, "echo", {}, timeout=5)
                outcome = b"returned"
            except ConfigError as exc:
                outcome = b"ConfigError " + str(exc).encode()
            except BaseException as exc:
                outcome = type(exc).__name__.encode()
            finally:
                os.write(write_end, outcome)
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            outcome = f.read()
        os.waitpid(pid, 0)
        assert outcome.startswith(b"ConfigError ") and b"root or the service user" in outcome
    finally:
        shutil.rmtree(base)


# ---- one at a time, and never half-cancelled ----


def test_two_clients_are_served_one_at_a_time(serve: Callable[..., Daemon], state: str) -> None:
    """While one command runs, a second waits its turn (told so by a progress line) and only starts after the first ends."""
    started, gate = threading.Event(), threading.Event()
    finished: list[str] = []

    async def quick(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        finished.append("quick")
        return {"done": "quick"}

    serve({"slow": gated(started, gate, finished), "quick": quick})
    first, first_out = in_thread(lambda: control.call(state, "slow", {}, timeout=10))
    assert started.wait(5)
    second_progress: list[str] = []
    second, second_out = in_thread(lambda: control.call(state, "quick", {}, on_progress=second_progress.append, timeout=10))
    deadline = time.monotonic() + 5
    while not second_progress and time.monotonic() < deadline:
        time.sleep(0.01)
    assert second_progress == [control.WAITING]
    time.sleep(0.1)
    assert finished == []  # the second is waiting, not running
    gate.set()
    first.join(5)
    second.join(5)
    assert finished == ["slow", "quick"]
    assert first_out == [{"done": "slow"}] and second_out == [{"done": "quick"}]


def test_a_client_that_disconnects_does_not_cancel_its_command(serve: Callable[..., Daemon], state: str) -> None:
    """The client hangs up mid-command: the command still finishes, its answer is dropped, and the daemon serves on."""
    started, gate = threading.Event(), threading.Event()
    finished: list[str] = []
    serve({"slow": gated(started, gate, finished), "echo": echo})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(control.socket_path(state))
        client.sendall(b'{"command": "slow", "args": {}}\n')
        assert started.wait(5)
    time.sleep(0.1)  # let the daemon see the hang-up before the command ends
    gate.set()
    assert control.call(state, "echo", {}, timeout=5) == {"echo": {}}  # queued behind "slow": runs once it finished
    assert finished == ["slow"]


def test_close_waits_for_the_command_in_progress_then_removes_the_socket(serve: Callable[..., Daemon], state: str) -> None:
    """close() stops accepting at once, lets the running command finish and answer, then unlinks control.sock."""
    started, gate = threading.Event(), threading.Event()
    finished: list[str] = []
    daemon = serve({"slow": gated(started, gate, finished)})
    client, out = in_thread(lambda: control.call(state, "slow", {}, timeout=10))
    assert started.wait(5)
    closing = daemon.close(timeout=10)
    time.sleep(0.2)
    assert not closing.done() and finished == []
    assert control.call(state, "slow", {}, timeout=5) is None  # no longer accepting: the CLI would wait for the lock
    gate.set()
    assert closing.result(5) is True
    client.join(5)
    assert out == [{"done": "slow"}]
    assert not os.path.lexists(control.socket_path(state))


def test_close_gives_up_after_its_timeout_without_cancelling(serve: Callable[..., Daemon], state: str) -> None:
    """A command longer than close()'s timeout is left running (False, logged), never half-cancelled."""
    started, gate = threading.Event(), threading.Event()
    finished: list[str] = []
    daemon = serve({"slow": gated(started, gate, finished)})
    client, out = in_thread(lambda: control.call(state, "slow", {}, timeout=10))
    assert started.wait(5)
    with capture_logs() as logs:
        assert daemon.close(timeout=0.2).result(5) is False
    assert any(entry["event"] == "control_command_still_running" for entry in logs)
    gate.set()
    client.join(5)
    assert finished == ["slow"] and out == [{"done": "slow"}]


def test_close_leaves_a_socket_that_is_no_longer_ours(serve: Callable[..., Daemon], state: str) -> None:
    """If control.sock was replaced after start (another inode), close() does not remove it."""
    daemon = serve({"echo": echo})
    path = control.socket_path(state)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)
    inode = os.lstat(path).st_ino
    daemon.close().result(5)
    assert os.lstat(path).st_ino == inode


# ---- the client's side of failures ----


def test_a_connection_closed_without_a_final_line_is_store_unavailable(state: str) -> None:
    """A daemon that hangs up after progress but before its answer (it stopped) raises StoreUnavailable in call()."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(control.socket_path(state))
        listener.listen()

        def half_answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.makefile("rb").readline()
                conn.sendall(b'{"progress": "rotating"}\n')

        thread = threading.Thread(target=half_answer, daemon=True)
        thread.start()
        lines: list[str] = []
        with pytest.raises(StoreUnavailable, match="without an answer"):
            control.call(state, "keys-rotate", {}, on_progress=lines.append, timeout=5)
        thread.join(5)
    assert lines == ["rotating"]


def test_call_timeout_bounds_the_whole_exchange(serve: Callable[..., Daemon], state: str) -> None:
    """With a timeout, call() gives up in about that time with StoreUnavailable; the command itself still finishes."""
    started, gate = threading.Event(), threading.Event()
    finished: list[str] = []
    serve({"slow": gated(started, gate, finished)})
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match="may still finish"):
        control.call(state, "slow", {}, timeout=0.3)
    assert 0.25 < time.monotonic() - began < 2
    gate.set()
    deadline = time.monotonic() + 5
    while not finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert finished == ["slow"]
