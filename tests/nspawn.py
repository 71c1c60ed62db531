"""A throwaway Debian 12 container that boots a real systemd 252, for the tests that run the shipped unit files
(tests/test_systemd_service.py).

The recipe is the design notes' "Real systemd in tests": a `debootstrap --variant=minbase` tree of bookworm, built
once per machine and cached (a marker written last, so a half-built tree is rebuilt), then `systemd-nspawn
--volatile=overlay --boot`: systemd runs as the container's PID 1 on a throwaway overlay, so every test starts from
the same pristine tree and nothing it does reaches the cache. We drive it with nsenter(1) (`systemctl`, the CLI, ...)
and reach its files through /proc/PID1/root. It shares the host's network, so the tests post webhooks to the
service on 127.0.0.1.

Two things this machine taught us (no systemd on the host, a hybrid cgroup tree):
- Without a host systemd to make it a scope, nspawn (`--keep-unit`) puts the container in `payload/` and itself in
  `supervisor/` below its own cgroup. Two containers started from the same cgroup would share `payload/` and two
  systemds would fight over one tree, so each container gets a cgroup of its own first (`natalia-nspawn-<pid>-<n>`),
  removed with everything below it once the container is gone (nspawn leaves those directories behind).
- Stop it with SIGRTMIN+4 to its PID 1 (systemd(1): "halt and power off"); `systemctl poweroff` through nsenter
  hangs. If that does not end it in time, cgroup.kill (cgroups(7), Linux 5.14) ends every process of the container.
Never run `systemd --user` or a bare `unshare ... /lib/systemd/systemd` instead: they move host processes between
cgroups or start gettys on the host (the design notes).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

CACHE_DIR = "/var/cache/natalia-secure-tests"
SUITE = "bookworm"  # Debian 12: systemd 252 and CPython 3.11, the versions the unit and the package are made for
# procps for /bin/kill (the unit's ExecReload=; every Debian but minbase has it); python3 runs the package
PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3")
MARKER = ".natalia-rootfs-complete"  # written last, holding what was built: anything else is rebuilt
DEFAULT_MIRROR = "http://deb.debian.org/debian"
TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "nsenter": "util-linux"}
# What a root shell inside the container would have; never the test's own environment (its PATH holds the venv).
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
CGROUP_ROOT = "/sys/fs/cgroup"
PROPAGATE_DIR = "/run/systemd/nspawn/propagate"

_serial = itertools.count()


class ContainerError(RuntimeError):
    """The container could not be built, booted or driven; the message carries the command's output."""


def unavailable() -> str | None:
    """Why a container cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: boots systemd in a container with systemd-nspawn (the CI runs as root)"
    if not os.path.isdir(CGROUP_ROOT):
        return f"needs cgroups ({CGROUP_ROOT} is missing)"
    return None


def ensure_tools(tools: Mapping[str, str] = TOOLS) -> None:
    """Install the Debian packages of the missing `tools` (command -> package; default systemd-nspawn and debootstrap)
    with apt-get (the CI's Debian 12 runs as root with the package registries reachable)."""
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        _run(["apt-get", "update", "-qq"], env=env, timeout=600)
        _run(install, env=env, timeout=600)
    still = [tool for tool in tools if shutil.which(tool) is None]
    if still:
        raise ContainerError(f"{', '.join(still)} still missing after apt-get install {' '.join(missing)}")


def debian_mirror(sources_dir: str = "/etc/apt") -> str:
    """The host's Debian mirror for SUITE (deb822 .sources files or one-line sources.list), else deb.debian.org."""
    for path in sorted(glob.glob(os.path.join(sources_dir, "sources.list.d", "*.sources"))):
        with open(path, encoding="utf-8") as f:
            for stanza in re.split(r"\n\s*\n", f.read()):
                fields: dict[str, list[str]] = {}
                for key, _, value in (line.partition(":") for line in stanza.splitlines()):
                    if value and not key.startswith("#"):
                        fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []) and fields.get("uris"):
                    return fields["uris"][0]
    lists = [os.path.join(sources_dir, "sources.list"), *sorted(glob.glob(os.path.join(sources_dir, "sources.list.d", "*.list")))]
    for path in lists:
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
            for line in f:
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()  # drop "[signed-by=...]" options
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return DEFAULT_MIRROR


def _run(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise ContainerError(f"{' '.join(argv)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def _mounts_under(path: str) -> list[str]:
    """Mount points at or below `path`, deepest first (debootstrap mounts /proc and /sys in its target)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _discard(path: str) -> None:
    """Remove a half-built tree, unmounting first what an interrupted debootstrap left mounted in it."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    if _mounts_under(path):
        raise ContainerError(f"{path} still has mounts under it; not removing it")
    if os.path.lexists(path):
        shutil.rmtree(path)


def rootfs(cache_dir: str = CACHE_DIR) -> str:
    """The cached bookworm tree, built now (~1 minute, ~300 MB) unless a complete one is there. Concurrent test runs
    wait for the one that builds it (a lock file beside it)."""
    ensure_tools()
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    path = os.path.join(cache_dir, SUITE)
    want = f"{SUITE} {','.join(PACKAGES)}\n"
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError), open(os.path.join(path, MARKER), encoding="utf-8") as f:
            if f.read() == want:
                return path
        _discard(path)
        mirror = debian_mirror()
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, path, mirror]
        _run(argv, timeout=1200)
        with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
            f.write(want)
    return path


def _hierarchies() -> list[str]:
    """Where nspawn puts its cgroups: the unified tree (cgroup v2), or the hybrid layout's named systemd v1 tree and
    its unified tree, or the legacy named tree alone."""
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        return [CGROUP_ROOT]
    return [os.path.join(CGROUP_ROOT, h) for h in ("systemd", "unified") if os.path.isdir(os.path.join(CGROUP_ROOT, h))]


def _own_cgroup(hierarchy: str) -> str:
    """This process's cgroup in `hierarchy`, as a directory."""
    v2 = os.path.exists(os.path.join(hierarchy, "cgroup.controllers"))
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if (v2 and controllers == "") or (not v2 and "name=systemd" in controllers.split(",")):
                return os.path.join(hierarchy, path.lstrip("/"))
    raise ContainerError(f"this process has no cgroup in {hierarchy}")


class Container:
    """One booted container; `stop()` (or leaving the `with` block) ends it and removes what it left behind."""

    def __init__(self, tree: str, bind_ro: Mapping[str, str] | None = None) -> None:
        self.tree = tree
        self.bind_ro = dict(bind_ro or {})  # host path -> path in the container, read-only
        self.name = f"natalia-nspawn-{os.getpid()}-{next(_serial)}"
        self.cgroups = [os.path.join(_own_cgroup(h), self.name) for h in _hierarchies()]
        self._logdir = tempfile.mkdtemp(prefix=self.name + "-")
        self.console = os.path.join(self._logdir, "console.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None

    def __enter__(self) -> Container:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ---- start ----

    def _enter_cgroups(self) -> None:
        """In the child, before exec: move into the container's own cgroups (so its payload/ is its own)."""
        for cgroup in self.cgroups:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write("0")

    def start(self, timeout: float = 60.0) -> Container:
        """Boot, and return once systemd says the boot is finished (`is-system-running --wait`)."""
        for cgroup in self.cgroups:
            os.mkdir(cgroup)
        binds = [f"--bind-ro={host}:{inside}" for host, inside in self.bind_ro.items()]
        argv = [
            "systemd-nspawn", "--quiet", f"--directory={self.tree}", "--volatile=overlay", "--register=no",
            "--keep-unit", f"--machine={self.name}", "--boot", *binds,
        ]  # fmt: skip
        with open(self.console, "wb") as console:
            # preexec_fn runs between fork and exec: fine here, nothing else forks meanwhile
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, preexec_fn=self._enter_cgroups
            )
        deadline = time.monotonic() + timeout
        try:
            self._pid1 = self._find_pid1(deadline)
            while True:
                state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout)
                if state.stdout.strip() in ("running", "degraded"):
                    break
                if time.monotonic() > deadline:
                    raise ContainerError(f"boot did not finish: {state.stdout.strip()}\n{self.console_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_pid1(self, deadline: float) -> int:
        """The container's systemd: the child of nspawn that is PID 1 in its own PID namespace."""
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self._proc.returncode}\n{self.console_tail()}")
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                with open(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children", encoding="ascii") as f:
                    children = [int(pid) for pid in f.read().split()]
                for pid in children:
                    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
                        nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
                    if len(nspid) > 1 and nspid[-1] == "1":
                        return pid
            time.sleep(0.02)
        raise ContainerError(f"no PID 1 in the container\n{self.console_tail()}")

    @property
    def pid1(self) -> int:
        if self._pid1 is None:
            raise ContainerError("the container is not running")
        return self._pid1

    def console_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.console, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    # ---- inside ----

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` as root inside the container (its mount, UTS, IPC, network and PID namespaces)."""
        command = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "--", *argv]
        environment = {**CONTAINER_ENV, **(env or {})}
        proc = subprocess.run(command, input=input, env=environment, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ContainerError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sh(self, script: str, *, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`sh -ec script` inside the container."""
        return self.run(["sh", "-ec", script], check=check, timeout=timeout)

    def path(self, inside: str) -> str:
        """The host's way to a path inside the container (its root, through /proc)."""
        return f"/proc/{self.pid1}/root/{inside.lstrip('/')}"

    def write(self, inside: str, content: str | bytes, mode: int = 0o644) -> None:
        """Create or replace a file inside the container (parents made 0755), owned by root, with `mode`."""
        host = self.path(inside)
        os.makedirs(os.path.dirname(host), mode=0o755, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)

    # ---- stop ----

    def stop(self, timeout: float = 30.0) -> None:
        """Power the container off, kill what is left if that fails, and remove its cgroups. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None and self._pid1 is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid1, signal.SIGRTMIN + 4)  # systemd(1): power off
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_all()
                proc.kill()
                proc.wait(10)
        self._pid1 = None
        self._kill_all()
        self._remove_cgroups()
        # nspawn's mount propagation directory: it removes it itself, unless it had to be killed (an empty directory)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.path.join(PROPAGATE_DIR, self.name))
        shutil.rmtree(self._logdir, ignore_errors=True)

    def _kill_all(self) -> None:
        """SIGKILL every process left in the container's cgroups (cgroup.kill where the kernel has it)."""
        for cgroup in self.cgroups:
            if not os.path.isdir(cgroup):
                continue
            if os.path.exists(os.path.join(cgroup, "cgroup.kill")):
                with open(os.path.join(cgroup, "cgroup.kill"), "w") as f:
                    f.write("1")
                continue
            for procs in glob.glob(os.path.join(glob.escape(cgroup), "**", "cgroup.procs"), recursive=True):
                with open(procs, encoding="ascii") as f:
                    for pid in f.read().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)

    def _remove_cgroups(self, timeout: float = 10.0) -> None:
        """rmdir each cgroup, deepest first; processes killed a moment ago may take a little while to leave."""
        deadline = time.monotonic() + timeout
        for cgroup in self.cgroups:
            while os.path.isdir(cgroup):
                dirs = sorted((root for root, _, _ in os.walk(cgroup)), key=len, reverse=True)
                try:
                    for directory in dirs:
                        os.rmdir(directory)
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise ContainerError(f"cannot remove the container's cgroup {cgroup}: {exc}") from None
                    self._kill_all()
                    time.sleep(0.05)
