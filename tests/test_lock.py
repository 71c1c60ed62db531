"""Exactly one writer (guarantee 6): the flock on STATE_DIR/lock, waiting for it, and its release by a killed holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from natalia_secure import lock as lock_module
from natalia_secure.errors import IntegrityError, LockHeldError
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store, StoreOptions

HOLDER = """
import sys
from natalia_secure import masterkey
from natalia_secure.store import Store
store = Store.open(sys.argv[1], masterkey.read_key_file(sys.argv[2]))
store.add_message("+34600000001", "user", "from the holder", 1)
store.flush()
print("holding", flush=True)
sys.stdin.read()  # hold the lock until killed
"""


def test_a_second_writer_is_refused_at_once(state_dir: str, master: MasterKey) -> None:
    """While one store is open for writing, a second writing open raises LockHeldError at once, naming the way out."""
    first = Store.open(state_dir, master)
    t0 = time.monotonic()
    with pytest.raises(LockHeldError, match=rf"is writing {state_dir} .*--wait SECONDS"):
        Store.open(state_dir, master)
    assert time.monotonic() - t0 < 0.5
    first.close()
    Store.open(state_dir, master).close()


def test_lock_wait_succeeds_once_the_holder_closes(state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """With lock_wait, a writing open waits while the lock is held and succeeds once the holder (closed by a thread)
    lets go."""
    first = Store.open(state_dir, master)
    first.add_message("+34600000001", "user", "from the first", 1)
    waiting = threading.Event()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:  # acquire() sleeps between tries: the sign that it is waiting
        waiting.set()
        real_sleep(seconds)

    monkeypatch.setattr(lock_module.time, "sleep", sleep)

    def close_when_waited_for() -> None:
        assert waiting.wait(10)
        first.close()

    closer = threading.Thread(target=close_when_waited_for)
    closer.start()
    second = Store.open(state_dir, master, StoreOptions(lock_wait=10))
    closer.join()
    assert waiting.is_set()
    assert [m["content"] for m in second.get("+34600000001")["messages"]] == ["from the first"]
    second.close()


def test_lock_wait_gives_up_after_the_wait(state_dir: str, master: MasterKey) -> None:
    """A lock held for longer than lock_wait makes the open fail with LockHeldError after about that long."""
    first = Store.open(state_dir, master)
    t0 = time.monotonic()
    with pytest.raises(LockHeldError):
        Store.open(state_dir, master, StoreOptions(lock_wait=0.3))
    assert 0.3 <= time.monotonic() - t0 < 2
    first.close()


def test_a_sigkilled_holder_releases_the_lock(state_dir: str, master_key_file: str, master: MasterKey) -> None:
    """A holder in another process blocks writers; SIGKILLed, it releases the lock (flock dies with it) and what it
    flushed is there."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, state_dir, master_key_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with pytest.raises(LockHeldError):
            Store.open(state_dir, master)
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(10) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with Store.open(state_dir, master) as store:
        assert [m["content"] for m in store.get("+34600000001")["messages"]] == ["from the holder"]


def test_a_readonly_open_takes_no_lock(state_dir: str, master: MasterKey) -> None:
    """Read-only opens neither wait for the lock nor hold it: a writer opens while a reader is open."""
    reader = Store.open(state_dir, master, readonly=True)
    writer = Store.open(state_dir, master)
    Store.open(state_dir, master, readonly=True).close()
    writer.close()
    reader.close()


def test_a_failed_open_releases_the_lock(state_dir: str, master: MasterKey) -> None:
    """An open that fails (a tampered keyring here) leaves the lock free for the next writer."""
    path = os.path.join(state_dir, "keyring.enc")
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError):
        Store.open(state_dir, master)
    with open(path, "wb") as f:
        f.write(good)
    Store.open(state_dir, master).close()


def test_locking_writes_nothing_under_the_state_directory(state_dir: str, master: MasterKey) -> None:
    """The lock is a flock on the directory itself: no lock file, so a writing open and close that change nothing
    leave the directory exactly as it was (names, sizes, mtimes), even with a reader and a refused writer around."""
    Store.open(state_dir, master).close()  # the first writing open creates backups/
    before = {n: (st.st_size, st.st_mtime_ns) for n in os.listdir(state_dir) if (st := os.stat(os.path.join(state_dir, n)))}
    dir_mtime = os.stat(state_dir).st_mtime_ns
    with Store.open(state_dir, master):
        with pytest.raises(LockHeldError):
            Store.open(state_dir, master)
        Store.open(state_dir, master, readonly=True).close()
    after = {n: (st.st_size, st.st_mtime_ns) for n in os.listdir(state_dir) if (st := os.stat(os.path.join(state_dir, n)))}
    assert after == before and os.stat(state_dir).st_mtime_ns == dir_mtime
    assert "lock" not in after
