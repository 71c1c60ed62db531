"""The writer that tests/test_crash.py kills: a fork server that pays the imports once, then forks one writer per trial.

Run as ``python tests/crash_writer.py``. It reads one JSON command per line on stdin,
``{"state_dir": ..., "key": MASTER_KEY_FILE, "seed": int, "mode": "sync"|"async"}``, and for each:

1. makes a pipe and forks a writer child (a real process: the parent SIGKILLs it by pid);
2. answers ``{"pid": PID}`` on stdout, at once;
3. reads everything the child writes to the pipe until EOF (the child's death closes it); answers ``{"ready": true}``
   as soon as the child has opened the store and started writing (or failed), ``{"ready": false}`` at EOF if it never
   did, so the parent can time a kill from either moment whatever the machine's load;
4. reaps the child with waitpid and answers ``{"pid", "signal", "exit", "durable", "phase", "error", ...}``. Only
   after this answer is the child gone for good (its lock released), so the parent reopens the store only then.

The child never exits on its own (an error is reported, then it waits to be killed; a 60 s guard ends a child whose
parent vanished), so the pid the parent kills is always the live child, never a recycled number.

What a child writes, one token per line (each a single write(2) of a few bytes, so it is in the pipe or not at all):
``o`` opening, ``a`` appending, ``f`` flushing, ``D n`` "message n and every one before it are durable" (written only
after flush()/wait_durable() returned), ``s``/``S`` snapshot start/end, ``b``/``B`` backup start/end, ``p``/``P`` prune
start/end, ``X`` the store degraded (async mode: the writer stops writing), ``E json`` an unexpected error.

Message n is the text ``str(n)`` in the session of ``phone_of(n)``, claimed as ``claim_id(n)``; a writer continues from
the highest message the store holds, so over many trials a state directory accumulates snapshots, deltas, segments
and backups, and the parent checks that the messages present are exactly 1..M, each once, in order, M >= every n ever
reported durable.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable

from natalia_secure import masterkey
from natalia_secure.backups import Retention
from natalia_secure.clock import now_ms
from natalia_secure.errors import NataliaError, StoreUnavailable
from natalia_secure.store import Store, StoreOptions

PHONES = 37
GUARD_S = 60.0
PRUNE = Retention(last=2, hourly=1, daily=1, weekly=1, monthly=1)


def options() -> StoreOptions:
    """Small chunks and a low max_deltas so that trials cross chunk boundaries and base rewrites often; no
    truncation (max_messages), since the check wants every message ever written."""
    return StoreOptions(chunk=1024, max_messages=10**9, max_deltas=4, delta_ratio=0.5)


def phone_of(n: int) -> str:
    """The phone message n goes to: a fixed pseudo-random spread (Knuth's multiplicative hash) over PHONES phones."""
    return f"+54911{(n * 2654435761) % 2**32 % PHONES:04d}"


def claim_id(n: int) -> str:
    return f"wamid.{n}"


def last_message(store: Store) -> int:
    return max((int(m["content"]) for _, s in store.items() for m in s["messages"]), default=0)


def _append(store: Store, n: int) -> int:
    """Message n and its claim, one record (as the daemon does); real time, so claims are young at the check."""
    return store.add_message(phone_of(n), "user" if n % 2 else "assistant", str(n), now_ms(), message_id=claim_id(n))


def run_sync(store: Store, rng: random.Random, say: Callable[[str], None]) -> None:
    """Groups of appends, each group flushed and then reported durable; snapshots (full or delta), backups, prunes."""
    n = last_message(store)
    started = time.monotonic()
    while time.monotonic() - started < GUARD_S:
        say("a")
        for _ in range(rng.randint(1, 12)):
            n += 1
            _append(store, n)
        say("f")
        store.flush()
        say(f"D {n}")
        if rng.random() < 0.3:  # idle after an acknowledgement, as a daemon between requests: a wide window for kills
            time.sleep(rng.uniform(0, 0.002))
        r = rng.random()
        if r < 0.25:
            say("s")
            store.snapshot(full=rng.random() < 0.2)
            say("S")
        elif r < 0.28:
            say("b")
            try:
                store.backup()
            except NataliaError:  # a backup was already taken this second: the name is taken
                pass
            say("B")
        elif r < 0.29:
            say("p")
            store.prune_backups(PRUNE)
            say("P")


async def run_async(store: Store, rng: random.Random, say: Callable[[str], None]) -> None:
    """The daemon's way: concurrent writers awaiting wait_durable (group commit), snapshot_async and backup_async
    running alongside. If the store degrades (StoreUnavailable), the writer says ``X`` and stops writing: the daemon
    would answer 503 from then on, and the parent still checks that nothing reported durable is lost."""
    n = last_message(store)
    started = time.monotonic()
    degraded = False
    say("a")

    async def writer() -> None:
        nonlocal n, degraded
        while not degraded and time.monotonic() - started < GUARD_S:
            try:
                for _ in range(rng.randint(1, 4)):
                    n += 1
                    top = n
                    try:
                        lsn = _append(store, n)
                    except StoreUnavailable:
                        n -= 1  # nothing ran since the increment and nothing was appended: the next writer takes n
                        raise
                await store.wait_durable(lsn)
            except StoreUnavailable:
                if not degraded:
                    degraded = True
                    say("X")
                return
            say(f"D {top}")  # wait_durable(lsn) covers every lsn before it, so every message <= top
            if rng.random() < 0.1:
                await asyncio.sleep(rng.uniform(0, 0.002))

    async def background() -> None:
        while not degraded and time.monotonic() - started < GUARD_S:
            await asyncio.sleep(rng.uniform(0, 0.004))
            if rng.random() < 0.9:
                say("s")
                await store.snapshot_async(full=rng.random() < 0.2)
                say("S")
            else:
                say("b")
                try:
                    await store.backup_async()
                except NataliaError:
                    pass
                say("B")

    await asyncio.gather(*(writer() for _ in range(8)), background())


def child(command: dict[str, object], fd: int) -> None:
    def say(line: str) -> None:
        os.write(fd, line.encode() + b"\n")

    rng = random.Random(int(command["seed"]))  # type: ignore[call-overload]
    say("o")
    master = masterkey.read_key_file(str(command["key"]))
    store = Store.open(str(command["state_dir"]), master, options())
    if command["mode"] == "async":
        asyncio.run(run_async(store, rng, say))
    else:
        run_sync(store, rng, say)


def summarise(data: bytes) -> dict[str, object]:
    """What the parent needs from a child's tokens: the highest durable message and what it was doing when killed."""
    durable, phase, error, degraded = 0, "fork", None, False
    counts: dict[str, int] = {}
    open_ops: dict[str, int] = {"s": 0, "b": 0, "p": 0}
    for line in data.decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "D":
            durable = max(durable, int(rest))
            phase = "append"
        elif kind == "E":
            error = json.loads(rest)
        elif kind == "X":
            degraded, phase = True, "degraded"
        elif kind in open_ops:
            open_ops[kind] += 1
        elif kind.lower() in open_ops:
            open_ops[kind.lower()] -= 1
        elif kind in ("o", "a", "f"):
            phase = {"o": "open", "a": "append", "f": "flush"}[kind]
    for kind, name in (("p", "prune"), ("b", "backup"), ("s", "snapshot")):
        if open_ops[kind] > 0:
            phase = name
    return {
        "durable": durable,
        "phase": phase,
        "error": error,
        "snapshots": counts.get("S", 0),
        "backups": counts.get("B", 0),
        "flushes": counts.get("D", 0),
        "degraded": degraded,
    }


def serve() -> int:
    for line in sys.stdin:
        command = json.loads(line)
        r, w = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the writer: never returns into this loop
            os.close(r)
            try:
                child(command, w)
            except BaseException:
                os.write(w, b"E " + json.dumps(traceback.format_exc()).encode() + b"\n")
            # Stopped (an error, or a degraded store): wait to be killed, so that the parent's SIGKILL always finds
            # this process (never a recycled pid).
            deadline = time.monotonic() + GUARD_S
            while time.monotonic() < deadline:
                signal.sigtimedwait([signal.SIGUSR1], 1.0)
            os._exit(70)
        os.close(w)
        print(json.dumps({"pid": pid}), flush=True)
        data, ready = b"", False
        while chunk := os.read(r, 1 << 16):
            data += chunk
            if not ready and (data.startswith((b"o\na\n", b"E ")) or b"\nE " in data):
                ready = True  # opened and writing (or failed): the parent may start its random delay now
                print(json.dumps({"ready": True}), flush=True)
        os.close(r)
        if not ready:
            print(json.dumps({"ready": False}), flush=True)
        _, status = os.waitpid(pid, 0)
        result = summarise(data)
        result.update(
            pid=pid,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            exit=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        )
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
