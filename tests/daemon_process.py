"""A real `natalia-secure serve` in a subprocess, with a NOTIFY_SOCKET of our own (what systemd would bind) and
every line it logs captured: for tests/test_daemon.py (and the privacy scan over all of them)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from natalia_secure import whatsapp

SECRET = "daemon-test-app-secret"
TOKEN = "daemon-test-verify-token"


class NotifyReceiver:
    """A datagram socket standing in for systemd's notify socket; `abstract` binds it in the abstract namespace
    (NOTIFY_SOCKET=@name), else at a path."""

    def __init__(self, path: str, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"natalia-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(path)
            self.address = path
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self, name: str) -> list[tuple[float, str]]:
        """Every value sent for `name` (e.g. READY, WATCHDOG, STATUS), with the time it arrived."""
        found = []
        for t, message in list(self.messages):
            for line in message.split("\n"):
                key, _, value = line.partition("=")
                if key == name:
                    found.append((t, value))
        return found

    def wait_for(self, name: str, timeout: float = 20.0, after: float = 0.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hits = [t for t, _ in self.fields(name) if t >= after]
            if hits:
                return hits[0]
            time.sleep(0.01)
        raise AssertionError(f"no {name}= within {timeout} s; got {self.messages[-5:]}")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class DaemonProcess:
    def __init__(
        self,
        workdir: str,
        state_dir: str,
        key_file: str,
        env: dict[str, str] | None = None,
        abstract: bool = False,
        wrap: Sequence[str] = (),
    ) -> None:
        self.notify = NotifyReceiver(os.path.join(workdir, f"notify-{time.monotonic_ns()}.sock"), abstract)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("NATALIA_", "WHATSAPP_", "NOTIFY_", "WATCHDOG_"))}
        self.env.update(
            NATALIA_STATE_DIR=state_dir,
            NATALIA_MASTER_KEY_FILE=key_file,
            NATALIA_LISTEN="127.0.0.1:0",
            NATALIA_LOG_FORMAT="json",
            WHATSAPP_APP_SECRET=SECRET,
            WHATSAPP_VERIFY_TOKEN=TOKEN,
            NOTIFY_SOCKET=self.notify.address,
            PYTHONUNBUFFERED="1",
        )
        self.env.update(env or {})
        self.lines: list[str] = []  # stdout and stderr, every line
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "natalia_secure", "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started = time.monotonic()
        self._readers = [
            threading.Thread(target=self._read, args=(s,), daemon=True) for s in (self.proc.stdout, self.proc.stderr)
        ]
        for r in self._readers:
            r.start()
        self.port: int | None = None

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                event["_t"] = time.monotonic()
                self.events.append(event)

    def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in list(self.events):
                if e.get("event") == name:
                    return e
            if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                break
            time.sleep(0.01)
        raise AssertionError(f"no {name!r} event; exit {self.proc.poll()}; output:\n" + "\n".join(self.lines[-30:]))

    def wait_ready(self, timeout: float = 30.0) -> DaemonProcess:
        self.port = int(self.event("listening", timeout)["port"])
        self.notify.wait_for("READY", timeout)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(  # noqa: S310  (loopback, our own URL)
            self.url + path, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310  (loopback, our own URL)
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, body: bytes, secret: str = SECRET) -> tuple[int, dict[str, Any]]:
        code, data = self.request(
            "/webhook",
            body,
            {whatsapp.SIGNATURE_HEADER: whatsapp.sign(secret.encode(), body), "Content-Type": "application/json"},
        )
        return code, json.loads(data)

    def metric(self, name: str) -> float:
        """One sample's value from /metrics (e.g. 'natalia_replies_total{outcome="sent"}'); 0 if absent."""
        _, text = self.request("/metrics")
        for line in text.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def until(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if check():
                return
            time.sleep(0.02)
        lines = [line for line in self.lines if "http_request" not in line]
        raise AssertionError("condition not reached; output:\n" + "\n".join(lines[-20:]))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        for r in self._readers:
            r.join(5)
        return code

    def stop(self) -> int:
        """SIGTERM and the exit code; SIGKILL if it does not stop in time (a failure the caller sees)."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait(30)
        finally:
            self.close()

    def kill(self) -> None:
        self.proc.kill()
        self.wait(10)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()
