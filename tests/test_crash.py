"""Crash trials: a real writer process (tests/crash_writer.py) is SIGKILLed at a random instant, then the store is
reopened and checked (guarantee 1: nothing reported durable is lost; guarantee 3: every file still authenticates).

The writer is forked from a long-lived server that imported everything once, so a trial costs a fork, not a Python
start. A state directory is continued across TRIALS_PER_DIR trials, so kills land on stores with snapshot chains,
several segments, torn tails left by earlier kills, and backups. Each trial: fork a writer, wait until it reports
that it is writing (or, for some trials, not), sleep a random delay (that is the kill instant, not a
synchronisation), SIGKILL it, wait until the server has reaped it, then check. Seeds are printed on failure;
CRASH_SEED=N reruns the same schedule.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from natalia_secure import backups, keyring
from natalia_secure.clock import iso_utc, now_ms
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store
from natalia_secure.verify import verify_state_dir

from . import crash_writer
from .figures import Recorder
from .json_lines import JsonLines

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_writer.py")
TRIALS = 200
LONG_TRIALS = 10_000
TRIALS_PER_DIR = 20
MAX_DELAY = 0.04  # after the writer started writing
EARLY = 0.15  # the share of kills timed from the fork instead: they land while the store is being opened
EARLY_DELAY = 0.01
READ_TIMEOUT = 30


class ForkServer:
    """The parent's side of tests/crash_writer.py's protocol (one JSON object per line each way)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._lines = JsonLines(self.proc, READ_TIMEOUT)

    def _read(self) -> dict[str, Any]:
        """The server's next line; a server silent for READ_TIMEOUT seconds fails the test instead of hanging it."""
        return self._lines.read()

    def trial(self, state_dir: str, key: str, seed: int, mode: str, delay: float, early: bool) -> dict[str, Any]:
        """Fork a writer and SIGKILL it `delay` seconds after the fork (early: it may still be opening the store) or
        after it started writing; returns once it is reaped, with its reports."""
        assert self.proc.stdin is not None
        command = {"state_dir": state_dir, "key": key, "seed": seed, "mode": mode}
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        pid = self._read()["pid"]
        try:
            if not early:
                assert self._read() == {"ready": True}  # the event: the child opened the store and writes
            time.sleep(delay)  # the random kill instant
        finally:
            os.kill(pid, signal.SIGKILL)  # the child never exits by itself: this pid is still it
        while "pid" not in (result := self._read()):
            pass  # an early kill may come before or after the child's "ready"
        assert result["pid"] == pid
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    fs = ForkServer()
    yield fs
    fs.close()


def new_state_dir(path: str, master: MasterKey) -> str:
    os.mkdir(path, 0o700)
    now = now_ms()
    keyring.save(path, keyring.Keyring.new(iso_utc(now)), master, now)
    return path


def temps(state_dir: str) -> list[str]:
    found = []
    for directory in (state_dir, os.path.join(state_dir, backups.DIRNAME)):
        if os.path.isdir(directory):
            found += [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".tmp")]
    return found


def check_state(state_dir: str, master: MasterKey, durable: int) -> int:
    """The checks after a kill; returns M, the number of messages the store holds (they must be exactly 1..M)."""
    report = verify_state_dir(state_dir, master)
    assert report.ok, [f for f in report.files if not f.ok] or report.store
    with Store.open(state_dir, master, crash_writer.options()) as store:
        assert temps(state_dir) == [], "a writing open leaves no temp behind"
        seen: set[int] = set()
        for phone, session in store.items():
            numbers = [int(m["content"]) for m in session["messages"]]
            assert numbers == sorted(numbers), f"{phone}: messages out of order"
            assert len(set(numbers)) == len(numbers), f"{phone}: a message is there twice"
            assert all(crash_writer.phone_of(n) == phone for n in numbers), f"{phone}: holds another phone's message"
            assert seen.isdisjoint(numbers)
            seen.update(numbers)
        top = max(seen, default=0)
        assert seen == set(range(1, top + 1)), f"not a prefix: missing {sorted(set(range(1, top + 1)) - seen)[:10]}"
        assert top >= durable, f"messages {top + 1}..{durable} were reported durable and are lost"
        missing_claims = [n for n in range(1, durable + 1) if not store.is_claimed(crash_writer.claim_id(n))]
        assert missing_claims == [], f"claims reported durable are lost: {missing_claims[:10]}"
    return top


def run_trials(tmp_path: Any, server: ForkServer, master_key_file: str, master: MasterKey, trials: int) -> dict[str, Any]:
    base_seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(base_seed)
    phases: collections.Counter[str] = collections.Counter()
    snapshots = flushes = kept = degraded = 0
    state_dir, durable = "", 0
    for trial in range(trials):
        if trial % TRIALS_PER_DIR == 0:
            state_dir = new_state_dir(str(tmp_path / f"state{trial // TRIALS_PER_DIR}"), master)
            durable = 0
        seed, mode = rng.randrange(2**32), rng.choice(("sync", "async"))
        early = rng.random() < EARLY
        delay = rng.uniform(0, EARLY_DELAY if early else MAX_DELAY)
        since = "the fork" if early else "it started writing"
        where = f"trial {trial} (CRASH_SEED={base_seed}, seed {seed}, {mode}, killed {delay * 1000:.1f} ms after {since})"
        result = server.trial(state_dir, master_key_file, seed, mode, delay, early)
        assert result["error"] is None, f"{where}: the writer failed:\n{result['error']}"
        assert result["signal"] == signal.SIGKILL, f"{where}: the writer was not killed: {result}"
        durable = max(durable, result["durable"])
        try:
            kept = check_state(state_dir, master, durable)
        except AssertionError as exc:
            raise AssertionError(f"{where}, killed while {result['phase']}: {exc}") from None
        phases[result["phase"]] += 1
        degraded += result["degraded"]
        snapshots += result["snapshots"]
        flushes += result["flushes"]
    summary = {
        "trials": trials,
        "phases": dict(phases),
        "snapshots": snapshots,
        "flushes": flushes,
        "degraded": degraded,  # trials whose writer saw StoreUnavailable: nothing here injects a fault
        "last_dir_messages": kept,
    }
    print(f"crash trials: {summary}")
    return summary


def record(figures: Recorder, summary: dict[str, Any]) -> None:
    phases = ", ".join(f"{n:,} {p}" for p, n in sorted(summary["phases"].items(), key=lambda x: -x[1]))
    figures.record(
        "Crash",
        "SIGKILL of a store writer at random instants (opening, appending, fsyncing, snapshotting, backing up)",
        f"{summary['trials']:,} trials (killed while: {phases}): 0 durable messages lost or repeated, every file opens",
        "0 lost, every file opens",
        True,
    )


@pytest.mark.reliability
def test_crash_trials(tmp_path, server: ForkServer, master_key_file: str, master: MasterKey, figures: Recorder) -> None:  # type: ignore[no-untyped-def]
    """200 SIGKILLs at random instants (opening, appending, fsyncing, snapshotting, backing up): after each, every
    message reported durable is there exactly once and in order, every file authenticates, and no temp survives."""
    summary = run_trials(tmp_path, server, master_key_file, master, TRIALS)
    # The kills must land inside the interesting windows, or the test proves little.
    assert summary["phases"].get("snapshot", 0) >= 5, summary
    assert summary["phases"].get("append", 0) + summary["phases"].get("flush", 0) >= 20, summary
    assert summary["phases"].get("open", 0) >= 3, summary
    assert summary["snapshots"] >= TRIALS // 4 and summary["flushes"] >= TRIALS, summary
    assert summary["degraded"] == 0, "a plain crash trial injects no fault: the store must never degrade"
    record(figures, summary)


@pytest.mark.long
@pytest.mark.reliability
def test_crash_trials_long(tmp_path, server: ForkServer, master_key_file: str, master: MasterKey, figures: Recorder) -> None:  # type: ignore[no-untyped-def]
    """The same as test_crash_trials with 10,000 kills."""
    summary = run_trials(tmp_path, server, master_key_file, master, LONG_TRIALS)
    assert summary["phases"].get("snapshot", 0) >= 250 and summary["degraded"] == 0, summary
    record(figures, summary)


def test_writer_reports_durable_only_after_the_flush_returns(tmp_path, master_key_file: str, master: MasterKey) -> None:  # type: ignore[no-untyped-def]
    """The writer's protocol itself: a trial's tokens parse to the highest message reported after a flush."""
    tokens = b"o\na\nf\nD 7\na\nf\nD 12\na\nf\ns\n"
    summary = crash_writer.summarise(tokens)
    assert summary["durable"] == 12 and summary["phase"] == "snapshot" and summary["flushes"] == 2
    assert crash_writer.summarise(b"o\n")["phase"] == "open"
    assert crash_writer.summarise(b"o\na\nf\nD 3\na\nf\n")["phase"] == "flush"
