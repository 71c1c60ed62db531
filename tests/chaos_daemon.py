"""The daemons that tests/test_chaos.py kills: a fork server that pays the imports once, then forks one real
`natalia-secure serve` per start.

Run as ``python tests/chaos_daemon.py``. A Python start with natalia_secure.daemon, Tornado and the crypto imported
costs ~0.3-0.5 s on the 2-CPU test machine, which 500 crash trials cannot afford; a fork costs milliseconds.
The child runs the command line's own `serve` path (`cli.main(["serve"], env)`) on a fresh event loop: this
process never creates an event loop, a thread or a signal handler, so the child inherits none (fork(2) copies only
the calling thread, and an inherited loop or lock would be shared state between two processes).

It reads one JSON command per line on stdin, ``{"env": {...}, "log": PATH}``, and for each:

1. forks a daemon whose stdout and stderr are a pipe, stdin /dev/null, and whose environment is exactly `env`;
2. answers ``{"pid": PID}`` at once;
3. copies every line the daemon writes to PATH (JSON log lines, and a traceback if there ever is one) and answers
   ``{"ready": PORT}`` when the daemon logs ``natalia_ready`` (after READY=1: the store is open, the port listens),
   or ``{"ready": null}`` if its output ends first;
4. answers ``{"exited": CODE}`` if `serve` returns by itself (SIGTERM, or a refused start);
5. at the end of its output reaps it and answers ``{"pid", "signal", "exit", "lines"}``. Only after this answer is
   the daemon gone for good (its store lock released), so the parent restarts it only then.

A child whose `serve` returned does not exit: it waits to be killed (a 60 s guard ends it if its parent vanished),
so the pid the parent signals is always that child, never a recycled number (as tests/crash_writer.py does).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback

from natalia_secure import cli, daemon  # noqa: F401  (daemon: imported here once, so that no child pays for it)

GUARD_S = 60.0
PR_SET_PDEATHSIG = 1  # prctl(2)
EXITED = b"chaos-daemon-exited "  # the line a child writes when serve returned, before it waits to be killed


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (prctl(2) PR_SET_PDEATHSIG): if the test process is killed, the
    server goes with it, and a daemon with the server, instead of serving on for ever."""
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the call
        os._exit(70)


def child(env: dict[str, str], out: int) -> None:
    """The daemon: never returns into the server's loop."""
    try:
        die_with_parent()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(devnull)
        code = cli.main(["serve"], env)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        os.write(2, traceback.format_exc().encode())
        code = 70
    os.write(1, EXITED + str(code).encode() + b"\n")
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        signal.sigtimedwait([signal.SIGUSR1], 1.0)
    os._exit(70)


def answer(message: dict[str, object]) -> None:
    print(json.dumps(message), flush=True)


def watch(pid: int, r: int, log_path: str) -> None:
    """Copy the daemon's output to its log file, telling the parent when it is ready and when serve returned."""
    port: int | None = None
    ready = False
    lines = 0
    pending = b""
    with open(log_path, "ab") as log:
        while chunk := os.read(r, 1 << 16):
            log.write(chunk)
            log.flush()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                lines += 1
                if line.startswith(EXITED):
                    answer({"exited": int(line[len(EXITED) :])})
                    continue
                if ready or not line.startswith(b"{"):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "listening":
                    port = int(event["port"])
                elif event.get("event") == "natalia_ready":
                    ready = True
                    answer({"ready": port})
        lines += bool(pending)
    os.close(r)
    if not ready:
        answer({"ready": None})
    _, status = os.waitpid(pid, 0)
    answer(
        {
            "pid": pid,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "lines": lines,
        }
    )


def serve() -> int:
    die_with_parent()
    for line in sys.stdin:
        command = json.loads(line)
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child(dict(command["env"]), w)
        os.close(w)
        answer({"pid": pid})
        watch(pid, r, str(command["log"]))
    return 0


if __name__ == "__main__":
    sys.exit(serve())
