"""Faults under the running daemon (issue 7's "Faults" figures): disk full, I/O errors, a read-only file system and a
permission change, each while 4 threads post signed webhooks to a real `natalia-secure serve`.

For each fault the same script (`run_fault`): the daemon serves and snapshots every second; the fault appears; from
then on every webhook is answered 503 (never a 200: the store cannot make it durable), /healthz is 503 with the
fault in its reason, STATUS= says DEGRADED, natalia_store_degraded is 1 and WATCHDOG=1 stops; no file changes while
degraded, and every file from before the fault is still there byte for byte (the open journal segment may only have
grown by records written before the fault). Then the fault clears and the daemon recovers by itself (its full
snapshot retried every 10 s, maintenance.py): /healthz 200, STATUS= serving, pings again, new 200s. Every 503'd
message is retried as Meta would, and after SIGTERM and a restart every acknowledged message is in its session
exactly once and every file authenticates. Every log line of every daemon is scanned for phones and message texts.

The faults, and why each is made this way (all of them real kernel errors, nothing patched inside the daemon):

- disk full: a tmpfs filled up by a file, ENOSPC (test_daemon.py's setting, with a restart);
- I/O errors: tests/faults/eiofs.py, a FUSE pass-through that answers EIO to every write request on demand (this
  VM's kernel has no device-mapper, so no dm-flakey; /dev/fuse is there, and FUSE needs no package);
- read-only file system: `mount -o remount,ro` of the tmpfs is tried first, but the kernel refuses it with EBUSY
  while a file on it is open for writing (the journal segment always is: sb_prepare_remount_readonly), so a read-only
  bind mount is laid over the state directory: every new file fails with EROFS, and the segment already open keeps
  taking records (durable ones) until the next snapshot rotates the journal to a new file, a second later;
- permissions: `chmod 0500` of the state directory, with the daemon running without CAP_DAC_OVERRIDE (setpriv drops
  it from the bounding set; as root it would ignore the mode, unlike the service's DynamicUser); as with read-only,
  the fault shows at the next new file.

The disk full and read-only faults need a mount namespace that outlives one daemon (the restart must find the same
tmpfs): a holder process (`unshare -m`) keeps it, the daemons and the FUSE server join it with `nsenter -m`, and the
test reads the files through /proc/<holder>/root. Nothing is mounted on the host; the namespace, its mounts and its
processes go when the test ends, whatever happened (or when pytest dies: the holder and the FUSE server exit when
their standard input closes). FAULTS_SEED=N replays a run's random choices (how many messages are acknowledged before each fault).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from natalia_secure import journal, snapshot, whatsapp
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store
from natalia_secure.verify import verify_state_dir

from .daemon_process import SECRET, DaemonProcess
from .figures import Recorder
from .test_faults import namespaces_unavailable

EIOFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults", "eiofs.py")
SENDERS = 4
PAUSE_S = 0.02  # between one sender's posts: a steady load that leaves the 2 CPUs to the daemon
PER_PHONE = 20  # messages per phone: sessions stay far below the 250 kept per session (sessions.MAX_MESSAGES)
MARK = "ciruela"  # begins every message text: a log line holding any part of a text's start holds this
PHONE = re.compile(r"(?<!\d)3461\d{7}(?!\d)")  # every phone the load uses, and nothing else a log line holds
DEGRADED_S = 2.0  # how long the load runs against the degraded daemon
WAIT_S = 40.0  # a bound for every wait on the daemon (recovery is retried every 10 s); never a timing assertion
ENV = {
    "WATCHDOG_USEC": "200000",  # a ping every 100 ms while healthy
    "NATALIA_SNAPSHOT_INTERVAL": "1",  # snapshots (new files, journal rotations) keep happening under the load
    "NATALIA_LOG_LEVEL": "debug",  # the privacy scan reads the most the daemon can say
}


# ---- the load ----


@dataclass
class Post:
    wamid: str
    phone: str
    text: str
    sent: float = 0.0
    answered: float = 0.0
    code: int = 0
    error: str | None = None


@dataclass
class Load:
    """SENDERS threads posting signed webhooks, one message each, until stopped; every answer is kept."""

    daemon: DaemonProcess
    label: str
    posts: list[Post] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._sender, args=(k,), daemon=True) for k in range(SENDERS)]
        for t in self.threads:
            t.start()
        return self

    def _sender(self, k: int) -> None:
        for i in range(20_000):  # bounded: at PAUSE_S this is over 6 minutes, beyond any test here
            if self.stop_event.is_set():
                return
            phone = f"3461{k:02d}{i // PER_PHONE:05d}"
            post = Post(f"wamid.{self.label}-{k}-{i}", phone, f"{MARK} {self.label} {k}-{i}")
            send(self.daemon, post)
            with self.lock:
                self.posts.append(post)
            time.sleep(PAUSE_S)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def answered(self, code: int, after: float = 0.0, before: float = float("inf")) -> list[Post]:
        """The posts answered `code` that were sent within (after, before)."""
        with self.lock:
            return [p for p in self.posts if p.code == code and after < p.sent and p.answered < before]

    def wait_for(self, code: int, count: int, after: float = 0.0) -> None:
        end = time.monotonic() + WAIT_S
        while len(self.answered(code, after)) < count:
            assert time.monotonic() < end, f"fewer than {count} answers {code} after {WAIT_S} s"
            time.sleep(0.05)


def send(daemon: DaemonProcess, post: Post) -> None:
    body = whatsapp.text_webhook([(post.wamid, post.phone, post.text, 1_770_000_000)])
    post.sent = time.monotonic()
    try:
        post.code, _ = daemon.post(body)
    except (OSError, urllib.error.URLError) as exc:  # a refused or dropped connection: the daemon did not stay up
        post.code, post.error = -1, str(exc)
    post.answered = time.monotonic()


# ---- where the daemon runs ----


class Namespace:
    """A private mount namespace kept by a holder process; daemons join it with `nsenter -m`."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", "echo ready && exec cat >/dev/null"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline().strip() == "ready"
        self.wrap = ["nsenter", "-t", str(self.holder.pid), "-m"]

    def inside(self, path: str) -> str:
        """`path` as the namespace sees it, reached from the host."""
        return f"/proc/{self.holder.pid}/root{path}"

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.wrap, *argv], capture_output=True, text=True, timeout=60, check=False)

    def tmpfs(self, mountpoint: str, size: str, copy_from: str) -> None:
        script = f"mount -t tmpfs -o size={size},mode=0700 tmpfs {mountpoint} && cp -a {copy_from}/. {mountpoint}/"
        done = self.run("sh", "-c", script)
        assert done.returncode == 0, done.stderr

    def close(self) -> None:
        assert self.holder.stdin is not None
        self.holder.stdin.close()
        try:
            self.holder.wait(10)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait(10)


class Fault:
    """One fault: where the daemon runs and reads its state, how the fault is made and undone."""

    name = ""
    errno_text = ""  # what the daemon's reason must name
    how = ""  # for the figure: how the fault was made here
    refuses_unlink = True  # a failed write's temp may stay until the fault clears (EIO, EROFS, EACCES on unlink)

    def __init__(self, tmp_path: str, state_dir: str) -> None:
        self.tmp_path, self.state_dir = tmp_path, state_dir
        self.daemon_state = state_dir  # the state directory as the daemon is told
        self.view = state_dir  # the same files, read by the test
        self.wrap: list[str] = []
        self.env: dict[str, str] = {}

    def setup(self) -> None:
        """Make what the daemon will run on (close() undoes it, also when this fails halfway)."""

    def inject(self) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Undo everything, whatever state the test left it in."""


class InNamespace(Fault):
    def __init__(self, tmp_path: str, state_dir: str) -> None:
        super().__init__(tmp_path, state_dir)
        self.ns = Namespace()
        self.wrap = self.ns.wrap
        self.mountpoint = os.path.join(tmp_path, "mnt")
        os.mkdir(self.mountpoint, 0o700)
        self.daemon_state = self.mountpoint
        self.view = self.ns.inside(self.mountpoint)

    def close(self) -> None:
        self.ns.close()


class DiskFull(InNamespace):
    name = "disk full"
    errno_text = "No space left on device"
    refuses_unlink = False  # a full disk still lets a file go

    how = "a 64 MiB tmpfs in a private mount namespace, filled up by a file"

    def setup(self) -> None:
        self.ns.tmpfs(self.mountpoint, "64m", self.state_dir)
        self.filler = os.path.join(self.view, "filler")

    def inject(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while True:
                os.write(fd, bytes(65536))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def clear(self) -> None:
        os.unlink(self.filler)


class IoErrors(InNamespace):
    name = "I/O errors"
    errno_text = "Input/output error"

    how = "tests/faults/eiofs.py, a FUSE pass-through answering EIO to every write request (no device-mapper here)"

    def __init__(self, tmp_path: str, state_dir: str) -> None:
        super().__init__(tmp_path, state_dir)
        self.stats_file = os.path.join(tmp_path, "eiofs.json")
        self.server: subprocess.Popen[str] | None = None
        self.switch = self.ns.inside(self.mountpoint)  # the control names are looked up through the mount
        self.view = state_dir  # the backing directory: the bytes really on disk, read without the FUSE layer

    def setup(self) -> None:
        self.server = subprocess.Popen(
            [*self.wrap, sys.executable, EIOFS, self.state_dir, self.mountpoint, self.stats_file],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None and self.server.stderr is not None
        line = self.server.stdout.readline().strip()
        if line.startswith("cannot mount"):
            pytest.skip(f"FUSE cannot be mounted here ({line}); tests/test_faults.py injects EIO into fsync in-process")
        assert line == "mounted", f"eiofs failed: {line} {self.server.stderr.read()}"

    def _lookup(self, name: str) -> None:
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(self.switch, name))

    def inject(self) -> None:
        self._lookup(".eiofs-fail")

    def clear(self) -> None:
        self._lookup(".eiofs-pass")

    def failed(self) -> dict[str, int]:
        with open(self.stats_file) as f:
            stats: dict[str, int] = json.load(f)["failed"]
        return stats

    def close(self) -> None:
        if self.server is not None:
            assert self.server.stdin is not None
            self.server.stdin.close()  # eiofs exits when its standard input closes
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)
        super().close()


class ReadOnly(InNamespace):
    name = "read-only file system"
    errno_text = "Read-only file system"

    def __init__(self, tmp_path: str, state_dir: str) -> None:
        super().__init__(tmp_path, state_dir)
        self.remounted: bool | None = None

    def setup(self) -> None:
        self.ns.tmpfs(self.mountpoint, "64m", self.state_dir)

    def inject(self) -> None:
        remount = self.ns.run("mount", "-o", "remount,ro", self.mountpoint)
        self.remounted = remount.returncode == 0
        if self.remounted:
            self.how = "the tmpfs remounted read-only under the daemon"
            return
        said = remount.stderr.strip().splitlines()[0].rsplit(": ", 1)[-1].rstrip(".") if remount.stderr.strip() else "?"
        self.how = (
            f"`mount -o remount,ro` refused ({said}: the kernel's answer while a file is open for writing), so a "
            "read-only bind mount over the state directory"
        )
        bind = self.ns.run("mount", "--bind", "-o", "ro", self.mountpoint, self.mountpoint)
        assert bind.returncode == 0, bind.stderr

    def clear(self) -> None:
        done = self.ns.run(*(("mount", "-o", "remount,rw") if self.remounted else ("umount",)), self.mountpoint)
        assert done.returncode == 0, done.stderr


class Permissions(Fault):
    name = "permission change"
    errno_text = "Permission denied"
    how = "chmod 0500 of the state directory under a daemon without CAP_DAC_OVERRIDE (setpriv)"

    def __init__(self, tmp_path: str, state_dir: str) -> None:
        super().__init__(tmp_path, state_dir)
        self.wrap = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]

    def inject(self) -> None:
        os.chmod(self.state_dir, 0o500)

    def clear(self) -> None:
        os.chmod(self.state_dir, 0o700)

    def close(self) -> None:
        self.clear()


# ---- what the test reads ----


def files(directory: str) -> dict[str, bytes]:
    """Every regular file under `directory` (relative name -> bytes); the control socket is not a file to compare."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with contextlib.suppress(FileNotFoundError):  # the daemon removed it meanwhile (an obsolete snapshot)
                if stat.S_ISREG(os.lstat(path).st_mode) and name != "filler":
                    with open(path, "rb") as f:
                        found[os.path.relpath(path, directory)] = f.read()
    return found


def compare(before: dict[str, bytes], during: dict[str, bytes]) -> dict[str, list[str]]:
    """What became of each file of `before` by the time `during` was read: "identical"; "grown", a journal segment
    that only grew (records written before the fault showed); "obsolete", a snapshot or segment that a newer snapshot
    covered and removed before the fault showed; anything else is "harmed"."""
    lowest = {
        kind: min((int(m.group(1)) for n in during if (m := pattern.match(n))), default=0)
        for kind, pattern in (("snapshot", snapshot.NAME), ("journal", journal.SEGMENT_NAME))
    }
    found: dict[str, list[str]] = {"identical": [], "grown": [], "obsolete": [], "harmed": []}
    for name, data in before.items():
        now = during.get(name)
        m = snapshot.NAME.match(name) or journal.SEGMENT_NAME.match(name)
        if now == data:
            found["identical"].append(name)
        elif now is not None and journal.SEGMENT_NAME.match(name) and now.startswith(data):
            found["grown"].append(name)
        elif now is None and m and int(m.group(1)) < lowest["snapshot" if name.startswith("snapshot") else "journal"]:
            found["obsolete"].append(name)
        else:
            found["harmed"].append(name)
    return found


def notified(d: DaemonProcess, prefix: str, after: float) -> bool:
    return any(v.startswith(prefix) for t, v in d.notify.fields("STATUS") if t > after)


def leaks(lines: list[str]) -> list[str]:
    """test_daemon.py's rules: no phone number, no message text, no message id, no app secret in any line."""
    return [line for line in lines if PHONE.search(line) or MARK in line or "wamid." in line or SECRET in line]


def user_texts(store: Store) -> dict[str, list[str]]:
    return {phone: [m["content"] for m in s["messages"] if m["role"] == "user"] for phone, s in store.items()}


# ---- the scenario ----


@dataclass
class Cycle:
    """One fault, from its injection to the daemon's recovery."""

    degraded_503: int  # webhooks sent while the daemon said degraded: every one answered 503
    degraded_s: float
    files: dict[str, list[str]]  # compare(): what became of the files from before the fault
    bytes_kept: int  # their size
    recovered_s: float  # from the fault clearing to /healthz 200
    temps: int  # temps of failed writes the fault would not let the daemon remove (gone after the recovery)


@dataclass
class Outcome:
    cycles: list[Cycle]
    retried: int
    acknowledged: int
    log_lines: int
    seed: int



@contextlib.contextmanager
def fault_of(kind: Callable[[str, str], Fault], tmp_path: Any, state_dir: str) -> Iterator[Fault]:
    """The fault set up (or the test skipped, saying why), and undone at the end whatever happened."""
    if kind is not Permissions:
        reason = namespaces_unavailable()
        if reason:
            pytest.skip(reason)
    if kind is IoErrors and not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: the EIO fault needs FUSE here (tests/test_faults.py injects EIO into fsync in-process)")
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts, or a root daemon without CAP_DAC_OVERRIDE")
    fault = kind(str(tmp_path), state_dir)
    try:
        fault.setup()
        yield fault
    finally:
        fault.close()


def one_cycle(fault: Fault, d: DaemonProcess, load: Load, where: str) -> Cycle:
    """Inject the fault under the load, check everything the daemon says and keeps while degraded, clear it, and
    wait for the daemon to recover by itself."""
    before = files(fault.view)
    fault.inject()
    injected = time.monotonic()
    d.until(lambda: d.request("/healthz")[0] == 503, timeout=WAIT_S)
    degraded = time.monotonic()
    during = files(fault.view)
    code, body = d.request("/healthz")
    health = json.loads(body)
    assert code == 503 and health["status"] == "degraded" and fault.errno_text in health["reason"], (where, health)
    d.until(lambda: notified(d, "DEGRADED", injected), timeout=WAIT_S)
    assert d.metric("natalia_store_degraded") == 1.0, where
    time.sleep(DEGRADED_S)  # the load goes on against the degraded daemon
    cleared = time.monotonic()
    still = files(fault.view)
    fates = compare(before, during)
    assert fates["harmed"] == [], f"{where}: files from before the fault changed or vanished: {fates['harmed']}"
    assert still == during, f"{where}: files changed while degraded: {sorted(n for n in still if still[n] != during.get(n))}"
    if not fault.refuses_unlink:
        assert not any(n.endswith(".tmp") for n in still), f"{where}: a temp file was left"
    assert d.proc.poll() is None, f"{where}: the daemon did not stay up"
    pings = [t for t, _ in d.notify.fields("WATCHDOG") if degraded + 0.3 < t < cleared]
    assert pings == [], f"{where}: WATCHDOG=1 while degraded"
    refused = load.answered(503, after=degraded, before=cleared)
    assert len(refused) >= 5 and load.answered(200, after=degraded, before=cleared) == [], f"{where}: a 200 while degraded"
    fault.clear()
    d.until(lambda: d.request("/healthz")[0] == 200, timeout=WAIT_S)  # by itself: nothing but the fault was touched
    recovered = time.monotonic()

    def stale() -> list[str]:  # (a new write's temp may be there)
        return [n for n in files(fault.view) if n.endswith(".tmp") and n in during]

    d.until(lambda: stale() == [], timeout=WAIT_S)  # by the next snapshot: a fault's leftovers do not stay
    assert d.metric("natalia_store_degraded") == 0.0, where
    d.until(lambda: notified(d, "serving", recovered), timeout=WAIT_S)
    d.until(lambda: any(t > recovered for t, _ in d.notify.fields("WATCHDOG")), timeout=WAIT_S)
    load.wait_for(200, 10, after=recovered)
    kept = fates["identical"] + fates["grown"]
    temps = sum(n.endswith(".tmp") for n in during)
    return Cycle(len(refused), cleared - degraded, fates, sum(len(before[n]) for n in kept), recovered - cleared, temps)


def retry(d: DaemonProcess, posts: list[Post]) -> None:
    """Meta's retries of what got 503, from SENDERS threads."""
    chunks = [posts[k::SENDERS] for k in range(SENDERS)]
    threads = [threading.Thread(target=lambda c=c: [send(d, p) for p in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def run_fault(
    fault: Fault, daemons: list[DaemonProcess], tmp_path: Any, master: MasterKey, key_file: str, cycles: int = 1
) -> Outcome:
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(2**32)))
    print(f"{fault.name}: FAULTS_SEED={seed}")  # shown by pytest on failure
    rng = random.Random(seed)
    where = f"{fault.name} (FAULTS_SEED={seed})"

    def start() -> DaemonProcess:
        d = DaemonProcess(str(tmp_path), fault.daemon_state, key_file, env={**ENV, **fault.env}, wrap=fault.wrap)
        daemons.append(d)
        return d.wait_ready()

    d = start()
    load = Load(d, fault.name.split()[0]).start()
    results = []
    for _ in range(cycles):
        load.wait_for(200, rng.randint(20, 60), after=time.monotonic())  # the fault comes at a random point of the load
        assert d.notify.fields("WATCHDOG"), f"{where}: no WATCHDOG=1 while healthy"
        results.append(one_cycle(fault, d, load, where))
    load.stop()
    assert [p for p in load.posts if p.code not in (200, 503)] == [], f"{where}: answers other than 200 and 503"

    # Each retried message is acknowledged: new, or claimed by a record that the recovery snapshot made durable.
    refused = [p for p in load.posts if p.code == 503]
    retry(d, refused)
    unacked = [p for p in refused if p.code != 200]
    assert unacked == [], (
        f"{where}: {len(unacked)} retried messages not acknowledged: answers {sorted({p.code for p in unacked})}, "
        f"health {d.request('/healthz')}, log {[line for line in d.lines if 'http_request' not in line][-5:]}"
    )
    assert d.stop() == 0, where
    again = start()
    assert again.request("/healthz")[0] == 200
    assert again.stop() == 0, where

    report = verify_state_dir(fault.view, master)
    assert report.ok, f"{where}: {[f for f in report.files if not f.ok] or report.store}"
    with Store.open(fault.view, master, readonly=True) as store:
        held = user_texts(store)
    acked = [p for p in load.posts if p.code == 200]
    wrong = [p.wamid for p in acked if held.get(p.phone, []).count(p.text) != 1]
    assert wrong == [], f"{where}: acknowledged messages missing or repeated: {wrong[:10]}"

    lines = d.lines + again.lines
    assert lines and leaks(lines) == [], f"{where}: personal data in the log: {leaks(lines)[:3]}"
    return Outcome(results, len(refused), len(acked), len(lines), seed)


def record(figures: Recorder, fault: Fault, out: Outcome, extra: str = "") -> None:
    cycles = out.cycles
    n = len(cycles)
    kept = sum(len(c.files["identical"]) + len(c.files["grown"]) for c in cycles)
    grown = sum(len(c.files["grown"]) for c in cycles)
    recovery = max(c.recovered_s for c in cycles)
    left = sum(c.temps for c in cycles)
    temps = f"{left} temp(s) of failed writes it could not unlink, removed by the first snapshot after" if left else "0 temps"
    identical = (
        f"byte-identical but {grown} open journal segment(s), grown by records written before" if grown else "byte-identical"
    )
    figures.record(
        "Faults",
        f"{fault.name} under {SENDERS} senders of signed webhooks, snapshots every second"
        f"{f', {n} times' if n > 1 else ''}: {fault.how}",
        f"{sum(c.degraded_503 for c in cycles):,} webhooks sent while degraded "
        f"({sum(c.degraded_s for c in cycles):.0f} s): all 503, 0 acknowledged; /healthz 503 ({fault.errno_text}), "
        f"STATUS= DEGRADED, natalia_store_degraded 1, 0 WATCHDOG=1; {kept} files from before "
        f"{'each fault (counted per fault)' if n > 1 else 'the fault'}, {sum(c.bytes_kept for c in cycles):,} bytes, intact "
        f"({identical}), unchanged "
        f"while degraded, {temps}{extra}; recovered by itself within {recovery:.0f} s of the fault clearing (the retry "
        f"period is 10 s); {out.retried:,} 503s retried and acknowledged; after SIGTERM and restart "
        f"{out.acknowledged:,} acknowledged messages each present once, every file authenticates",
        "503 never 200, degraded in health/STATUS=/metrics, old files intact, self-recovery, 0 lost",
        True,
    )
    figures.record(
        "Log privacy",
        f"every line of the daemons of the {fault.name} fault{'s' if n > 1 else ''} (degraded, recovery, restart; debug level)",
        f"{out.log_lines:,} lines: 0 phone numbers, 0 message texts, 0 message ids, 0 secrets",
        "0 phones, 0 texts",
        True,
    )


# ---- the faults ----

FAULTS = {"disk_full": DiskFull, "io_errors": IoErrors, "read_only": ReadOnly, "permissions": Permissions}
LONG_CYCLES = 5


def check(
    kind: Callable[[str, str], Fault],
    cycles: int,
    tmp_path: Any,
    state_dir: str,
    master: MasterKey,
    key_file: str,
    daemons: list[DaemonProcess],
    figures: Recorder,
) -> None:
    with fault_of(kind, tmp_path, state_dir) as fault:
        out = run_fault(fault, daemons, tmp_path, master, key_file, cycles)
        extra = ""
        if isinstance(fault, IoErrors):  # the EIOs reached the daemon's system calls, not only its reading of them
            failed = fault.failed()
            assert failed.get("write", 0) + failed.get("fsync", 0) + failed.get("create", 0) >= cycles, failed
            extra = "; EIO answered to " + ", ".join(f"{n:,} {op}" for op, n in sorted(failed.items()))
        record(figures, fault, out, extra)


@pytest.mark.root
@pytest.mark.reliability
@pytest.mark.parametrize("kind", FAULTS.values(), ids=FAULTS.keys())
def test_a_fault_under_the_loaded_daemon(
    kind, tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons, figures: Recorder
) -> None:  # type: ignore[no-untyped-def]
    """Disk full, I/O errors, a read-only file system, a permission change, under webhook load: 503 and never 200
    while degraded, degraded in /healthz, STATUS= and /metrics, no WATCHDOG=1, no file harmed; recovery by itself
    once the fault clears, and after a restart every acknowledged message is there exactly once."""
    check(kind, 1, tmp_path, state_dir, master, master_key_file, daemons, figures)


@pytest.mark.long
@pytest.mark.root
@pytest.mark.reliability
@pytest.mark.parametrize("kind", FAULTS.values(), ids=FAULTS.keys())
def test_a_fault_under_the_loaded_daemon_long(
    kind, tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons, figures: Recorder
) -> None:  # type: ignore[no-untyped-def]
    """The same, each fault made and cleared LONG_CYCLES times under one daemon's load before the restart."""
    check(kind, LONG_CYCLES, tmp_path, state_dir, master, master_key_file, daemons, figures)


# ---- the instruments themselves ----


def test_compare_tells_a_grown_segment_from_a_harmed_file() -> None:
    """compare() accepts only an identical file, a journal segment that grew by appending, and an obsolete snapshot
    or segment removed beside a newer one; a rewritten byte, a shrunk segment or a vanished keyring is harm."""
    before = {
        "keyring.enc": b"ring",
        "snapshot.g000001.enc": b"old base",
        "snapshot.g000002.enc": b"base",
        "journal.000001.enc": b"head+r1",
        "journal.000002.enc": b"head+r2",
    }
    during = {"snapshot.g000002.enc": b"base", "journal.000002.enc": b"head+r2+r3", "journal.000003.enc": b"new"}
    fates = compare(before, {**during, "keyring.enc": b"ring"})
    assert fates == {
        "identical": ["keyring.enc", "snapshot.g000002.enc"],
        "grown": ["journal.000002.enc"],
        "obsolete": ["snapshot.g000001.enc", "journal.000001.enc"],
        "harmed": [],
    }
    assert compare(before, during)["harmed"] == ["keyring.enc"]
    assert compare(before, {**before, "snapshot.g000002.enc": b"bAse"})["harmed"] == ["snapshot.g000002.enc"]
    assert compare(before, {**before, "journal.000002.enc": b"head+"})["harmed"] == ["journal.000002.enc"]


def test_the_log_scan_finds_a_phone_a_text_an_id_and_the_secret() -> None:
    """leaks() flags a line holding a load phone, the start of a message text, a wamid or the app secret, and
    nothing in lines with timestamps, ports and pseudonyms."""
    clean = [
        '{"event": "webhook", "phone": "p:3f9a1c", "ts": 1770000000123, "port": 34611234}',
        '{"event": "snapshot", "generation": 3461, "lsn": 34612345678901}',
    ]
    dirty = ['{"phone": "34610000042"}', f'{{"text": "{MARK} disk 0-1"}}', '{"id": "wamid.disk-0-1"}', f"secret={SECRET}"]
    assert leaks(clean) == [] and leaks(dirty) == dirty


@pytest.mark.root
def test_eiofs_fails_every_write_on_demand_and_passes_through_otherwise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the FUSE layer files are created, written, fsynced, linked and renamed into the backing directory;
    after ".eiofs-fail" each of those answers EIO and leaves the backing bytes as they were, reads still work, and
    after ".eiofs-pass" writing works again; the counts of what failed are written at each switch."""
    reason = namespaces_unavailable()
    if reason or not os.path.exists("/dev/fuse"):
        pytest.skip(reason or "no /dev/fuse")
    backing = tmp_path / "backing"
    backing.mkdir(mode=0o700)
    fault = IoErrors(str(tmp_path), str(backing))
    try:
        fault.setup()
        mnt = fault.switch
        with open(os.path.join(mnt, "a"), "wb") as f:
            f.write(b"x" * 200_000)
            f.flush()
            os.fsync(f.fileno())
        os.link(os.path.join(mnt, "a"), os.path.join(mnt, "b"))
        os.rename(os.path.join(mnt, "b"), os.path.join(mnt, "c"))
        assert sorted(os.listdir(backing)) == ["a", "c"] and (backing / "c").read_bytes() == b"x" * 200_000
        fd = os.open(os.path.join(mnt, "a"), os.O_WRONLY | os.O_APPEND)
        try:
            fault.inject()
            attempts: list[Callable[[], object]] = [
                lambda: os.write(fd, b"y"),
                lambda: os.fsync(fd),
                lambda: os.open(os.path.join(mnt, "d"), os.O_WRONLY | os.O_CREAT, 0o600),
                lambda: os.rename(os.path.join(mnt, "c"), os.path.join(mnt, "e")),
                lambda: os.unlink(os.path.join(mnt, "c")),
                lambda: os.mkdir(os.path.join(mnt, "f")),
            ]
            for attempt in attempts:
                with pytest.raises(OSError) as raised:
                    attempt()
                assert raised.value.errno == errno.EIO
            with open(os.path.join(mnt, "c"), "rb") as f:
                assert f.read() == b"x" * 200_000
            assert sorted(os.listdir(backing)) == ["a", "c"] and (backing / "a").read_bytes() == b"x" * 200_000
            fault.clear()
            os.write(fd, b"z")
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (backing / "a").read_bytes() == b"x" * 200_000 + b"z"
        assert fault.failed() == {"write": 1, "fsync": 1, "create": 1, "rename": 1, "unlink": 1, "mkdir": 1}
    finally:
        fault.close()
