"""Shared fixtures: a master key and an initialised state directory, made fresh for every test (never a real key)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from natalia_secure import keyring, logs, masterkey
from natalia_secure.clock import iso_utc, now_ms
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store, StoreOptions

from .daemon_process import DaemonProcess
from .figures import Figures, Recorder

DATA = os.path.join(os.path.dirname(__file__), "data")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the long trials (crash loops, big sizes)")
    parser.addoption("--figures", metavar="FILE", help="write the reliability figures as a Markdown table (tests/figures.py)")


_FIGURES = Figures()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Recorder:
    """Record a reliability figure (tests/figures.py): printed at the end of the session, written by --figures."""
    return Recorder(_FIGURES, request.node.nodeid, bool(request.config.getoption("--long")))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _FIGURES.rows:
        return
    terminalreporter.section("reliability figures")
    for line in _FIGURES.table():
        terminalreporter.write_line(line)
    path = config.getoption("--figures")
    if path:
        with open(path, "w") as f:
            f.write(_FIGURES.markdown())
        terminalreporter.write_line(f"written to {path}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: use --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging if the body blocks, e.g. opening a FIFO that has no writer."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def tree_bytes(path: str) -> dict[str, bytes]:
    """Every file under `path` (relative name -> content): to show that something changed nothing."""
    found = {}
    for root, _, names in os.walk(path):
        for name in names:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                found[os.path.relpath(p, path)] = f.read()
    return found


def flipped_bytes(path: str) -> Iterator[tuple[int, bytes]]:
    """borg's loop: for each byte of the file in turn, write it back with that byte's bit (i % 8) flipped and yield
    (i, the flipped content); the original content is restored at the end."""
    with open(path, "rb") as f:
        good = f.read()
    try:
        for i in range(len(good)):
            bad = bytearray(good)
            bad[i] ^= 1 << (i % 8)
            with open(path, "wb") as f:
                f.write(bad)
            yield i, bytes(bad)
    finally:
        with open(path, "wb") as f:
            f.write(good)


@pytest.fixture
def master_key_file(tmp_path) -> str:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "master.key")
    masterkey.create_key_file(path)
    return path


@pytest.fixture
def master(master_key_file: str) -> MasterKey:
    return masterkey.read_key_file(master_key_file)


@pytest.fixture
def state_dir(tmp_path, master: MasterKey) -> str:  # type: ignore[no-untyped-def]
    """An initialised state directory (0700, keyring sealed by `master`), as `keys init` leaves it."""
    path = str(tmp_path / "state")
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)
    now = now_ms()
    keyring.save(path, keyring.Keyring.new(iso_utc(now)), master, now)
    return path


@pytest.fixture
def store(state_dir: str, master: MasterKey) -> Iterator[Store]:
    s = Store.open(state_dir, master, StoreOptions(chunk=4096))
    yield s
    s.close()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts (appended here) is killed at the end, whatever happened."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.close()


@contextlib.contextmanager
def configured_logs(level: str, pseudonym_key: bytes | None = None) -> Iterator[io.StringIO]:
    """The daemon's real log chain (logs.configure, JSON) into a buffer; structlog, the root logger and the
    pseudonym key restored after. Not capture_logs: module-level loggers are cached at their first use."""
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    out = io.StringIO()
    logs.configure(fmt="json", level=level, stream=out, pseudonym_key=pseudonym_key)
    try:
        yield out
    finally:
        structlog.reset_defaults()
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)
        logs.set_pseudonym_key(None)
