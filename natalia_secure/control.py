"""The control socket: admin commands that change the store reach the running daemon through it, never around it.

Issue 5 and DESIGN.md guarantee 6 (exactly one writer): while the daemon holds the store lock, `keys rotate`,
`forget`, `backup`, `purge`... are sent to it here and run inside it; with the daemon down the CLI takes the lock
itself (`call()` returns None). The socket is `<state_dir>/control.sock`, 0600, and the peer's uid (SO_PEERCRED,
unix(7)) must be root or the service user; the check comes before a single byte is read.

Protocol, one request per connection, newline-delimited JSON (orjson):
- request: `{"command": str, "args": {...}}`, at most 64 MiB, sent within 10 s;
- answer: zero or more `{"progress": "text"}` lines, then exactly one final line, `{"ok": true, "result": {...}}` or
  `{"ok": false, "error": "one line", "exit_code": N}` (README's exit codes), then the daemon closes.
Commands run one at a time; one whose client goes away still runs to its end (an admin operation is never
half-cancelled), and `close()` waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from typing import Any

import orjson
import structlog

from .errors import ConfigError, LockHeldError, NataliaError, StoreUnavailable, UsageError

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024 * 1024
READ_TIMEOUT_S = 10.0
SUN_PATH_MAX = 107  # unix(7): sun_path is 108 bytes; portable code keeps the terminating NUL
WAITING = "waiting for another admin command"

Handler = Callable[[dict[str, Any], Callable[[str], None]], Awaitable[dict[str, Any]]]

log = structlog.get_logger("natalia_secure.control")


class RemoteError(NataliaError):
    """An error the daemon answered: `str()` is its one line, `exit_code` the code it gave."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


@contextlib.contextmanager
def _sun_path(path: str) -> Iterator[str]:
    """An address for bind/connect that fits sun_path: `path` itself, or the same file reached through
    /proc/self/fd/<fd of its directory, opened O_PATH> (proc(5): the link resolves to the directory). The fd stays
    open only while the caller binds or connects."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "error"


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _failure(exc: NataliaError) -> dict[str, Any]:
    return {"ok": False, "error": _one_line(str(exc) or type(exc).__name__), "exit_code": exc.exit_code}


def _parse_request(data: bytes) -> tuple[str, dict[str, Any]]:
    """(command, args) from one request line; UsageError says what is wrong with its shape."""
    try:
        request = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UsageError("malformed control request: not JSON") from None
    if not isinstance(request, dict):
        raise UsageError("malformed control request: not a JSON object")
    unknown = set(request) - {"command", "args"}
    if unknown:
        # Refused rather than ignored: a newer CLI's option that this daemon does not know must not be dropped silently.
        raise UsageError(f"malformed control request: unknown field(s) {', '.join(sorted(map(repr, unknown)))[:200]}")
    command, args = request.get("command"), request.get("args", {})
    if not isinstance(command, str):
        raise UsageError("malformed control request: `command` is not a string")
    if not isinstance(args, dict):
        raise UsageError("malformed control request: `args` is not an object")
    return command, args


class ControlServer:
    """The daemon's side: listens on `<state_dir>/control.sock` and runs one handler at a time."""

    def __init__(
        self,
        state_dir: str,
        handlers: Mapping[str, Handler],
        allowed_uids: Collection[int] | None = None,
        *,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        self.path = socket_path(state_dir)
        self._handlers = dict(handlers)
        self._allowed = frozenset({0, os.geteuid()} if allowed_uids is None else allowed_uids)
        self._read_timeout = read_timeout
        self._lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self._closing = False
        self._reading: set[asyncio.Task[Any]] = set()  # connections still reading their request: nothing started yet
        self._connections: set[asyncio.Task[Any]] = set()
        self._commands: set[asyncio.Task[dict[str, Any]]] = set()

    async def start(self) -> None:
        """Replace a stale socket (the caller holds the store lock, so no other daemon owns it) and listen, 0600."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"{self.path} exists and is not a socket; refusing to remove it: move it away")
            os.unlink(self.path)  # left by a daemon that was killed: nobody can be listening on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # umask 077, not 177: umask is process-wide and a 177 would strip the x bit off a directory another thread
            # creates meanwhile. 077 already makes the socket owner-only from the moment it exists; chmod then drops x.
            old = os.umask(0o077)
            try:
                with _sun_path(self.path) as address:
                    sock.bind(address)
            finally:
                os.umask(old)
            st = os.lstat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o600)
            # limit + 1: readuntil counts the newline; the reader's buffer is bounded by the same figure.
            self._server = await asyncio.start_unix_server(self._connection, sock=sock, limit=MAX_REQUEST + 1)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on the control socket {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        log.info("control_listening", path=self.path)

    async def close(self, timeout: float = 30.0) -> bool:
        """Stop accepting, let a command in progress finish (up to `timeout` s) and remove the socket if still ours.
        True when no command was left running."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in self._reading:
            task.cancel()  # only waiting for a request: nothing has started, nothing to finish
        deadline = time.monotonic() + timeout
        drained = True
        if self._commands:
            _, pending = await asyncio.wait(set(self._commands), timeout=timeout)
            if pending:
                drained = False
                log.error("control_command_still_running", commands=len(pending), timeout_s=timeout)
        if self._connections:  # their final lines: usually already written
            await asyncio.wait(set(self._connections), timeout=max(0.1, deadline - time.monotonic()))
        self._unlink_if_ours()
        return drained

    def _unlink_if_ours(self) -> None:
        if self._identity is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        self._identity = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._converse(task, reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()
            # The peer may be gone already: nothing left to tell it.
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, task: asyncio.Task[Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(obj: dict[str, Any]) -> None:
            # A client that went away (Ctrl-C) does not stop the command: its lines are dropped. Checking first keeps
            # asyncio from logging "socket.send() raised exception" for every line written after the loss.
            if not writer.is_closing():
                writer.write(_line(obj))

        sock = writer.get_extra_info("socket")
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid not in self._allowed:
            log.warning("control_peer_refused", uid=uid, pid=pid)
            send(_failure(ConfigError(f"uid {uid} may not use the control socket: run as root or the service user")))
            return

        self._reading.add(task)
        try:
            command, args = _parse_request(await self._read_request(reader))
        except NataliaError as exc:
            send(_failure(exc))
            return
        except asyncio.CancelledError:
            if not self._closing:
                raise
            send(_failure(LockHeldError("the daemon is stopping; run the command again once it is down")))
            return
        finally:
            self._reading.discard(task)
        handler = self._handlers.get(command)
        if handler is None:
            send(_failure(UsageError(f"unknown command {command[:80]!r}")))
            return

        def progress(text: str) -> None:
            send({"progress": text})

        if self._lock.locked():
            progress(WAITING)
        started = time.monotonic()
        run = asyncio.create_task(self._run(handler, args, progress))
        self._commands.add(run)
        run.add_done_callback(self._commands.discard)
        # asyncio.wait, unlike awaiting the task, never cancels it: if this connection is cancelled the command goes on.
        await asyncio.wait({run})
        answer, exit_code = self._answer(command, run)
        seconds = round(time.monotonic() - started, 3)
        log.info("control_command", command=command, uid=uid, pid=pid, exit_code=exit_code, seconds=seconds)
        if not writer.is_closing():
            writer.write(answer)
            with contextlib.suppress(ConnectionError):  # the client left: the command is done, the answer is dropped
                await writer.drain()

    @staticmethod
    def _answer(command: str, run: asyncio.Future[dict[str, Any]]) -> tuple[bytes, int]:
        """The final line for a finished command, and its exit code."""
        try:
            return _line({"ok": True, "result": run.result()}), 0
        except NataliaError as exc:
            failure = _failure(exc)
        except asyncio.CancelledError:
            failure = _failure(NataliaError("the command was cancelled in the daemon; see its log"))
        except Exception as exc:  # a bug in a handler, or a result orjson cannot encode: never a traceback to the client
            log.error("control_command_crashed", command=command, error_type=type(exc).__name__, exc_info=exc)
            failure = _failure(NataliaError(f"internal error in the daemon: {type(exc).__name__}; see its log"))
        return _line(failure), failure["exit_code"]

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes:
        try:
            return await asyncio.wait_for(reader.readuntil(b"\n"), self._read_timeout)
        except TimeoutError:
            raise UsageError(f"no complete control request within {self._read_timeout:g} s") from None
        except asyncio.LimitOverrunError:
            raise UsageError(f"control request larger than {MAX_REQUEST // (1024 * 1024)} MiB") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise UsageError("empty control request") from None
            return exc.partial  # the client half-closed after its request without a final newline

    async def _run(self, handler: Handler, args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
        """One command, holding the lock, so commands never overlap even if their connections are gone."""
        async with self._lock:
            if self._closing:
                raise LockHeldError("the daemon is stopping and did not start this command; run it again once it is down")
            result = await handler(args, progress)
        if not isinstance(result, dict):
            raise TypeError(f"a control handler returned {type(result).__name__}, not a dict")
        return result


def call(
    state_dir: str,
    command: str,
    args: dict[str, Any],
    on_progress: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any] | None:
    """Run `command` in the daemon and return its result; None when no daemon is listening (the caller then takes
    the store lock itself). The daemon's error is raised as a RemoteError with its exit code. `timeout` bounds the
    whole exchange in seconds; None waits for ever (rotating a big store takes minutes)."""
    path = socket_path(state_dir)
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            with _sun_path(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no socket, or one left by a killed daemon: nobody is listening
        except PermissionError:
            raise ConfigError(f"may not reach the daemon's control socket {path}: run as root or the service user") from None
        except TimeoutError:
            raise StoreUnavailable(f"the daemon did not accept the control connection within {timeout:g} s") from None
        try:
            sock.sendall(_line({"command": command, "args": args}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused before reading it all (peer uid, size): its answer is waiting to be read
        except TimeoutError:
            raise StoreUnavailable(f"the daemon did not take the request within {timeout:g} s") from None
        return _answer(sock, deadline, on_progress)


def _answer(sock: socket.socket, deadline: float | None, on_progress: Callable[[str], None] | None) -> dict[str, Any]:
    gone = StoreUnavailable("the daemon closed the control connection without an answer (did it stop?)")
    with sock.makefile("rb") as lines:
        while True:
            if deadline is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                line = lines.readline()
            except ConnectionResetError:
                raise gone from None
            except TimeoutError:
                raise StoreUnavailable("no answer from the daemon in time; the command may still finish (see its log)") from None
            if not line.endswith(b"\n"):
                raise gone
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                message = None
            if not isinstance(message, dict):
                raise NataliaError("the daemon sent a malformed line on the control socket")
            if "progress" in message:
                if on_progress is not None:
                    on_progress(str(message["progress"]))
            elif message.get("ok") is True and isinstance(message.get("result"), dict):
                result: dict[str, Any] = message["result"]
                return result
            elif message.get("ok") is False and isinstance(message.get("exit_code"), int):
                raise RemoteError(_one_line(str(message.get("error", ""))), message["exit_code"])
            else:
                raise NataliaError("the daemon sent a malformed line on the control socket")
