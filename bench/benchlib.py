"""What both benchmarks print about where they ran, and where they keep their state. Imported by bench/store.py and
bench/webhook.py (run as scripts: their directory is on sys.path)."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
import tempfile


def machine(software: str) -> list[str]:
    """The date, the machine, `software` (the versions that matter to the caller) and the package measured."""
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    import natalia_secure

    package = os.path.dirname(natalia_secure.__file__)
    digest = hashlib.sha256()  # the sources measured, whatever git says (a dirty tree has no commit of its own)
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as fh:
                digest.update(name.encode() + b"\0" + fh.read())
    try:
        commit = subprocess.run(
            ["git", "-C", package, "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = "?"
    return [
        f"date       {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"machine    {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}, {mem / 2**30:.1f} GiB, "
        f"Linux {platform.release()}, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"software   Python {platform.python_version()}, {software}",
        f"package    {package} (git {commit or '?'}, sources sha256 {digest.hexdigest()[:12]})",
    ]


def fs_of(path: str) -> str:
    """ "<type> on <device>" of the file system holding `path` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best = ("?", "?", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (dev, fstype, mnt)
    return f"{best[1]} on {best[0]}"


def default_base() -> str:
    """A writable directory on a real disk: on a tmpfs fsync costs nothing, which would flatter every durable write."""
    for candidate in ("/var/tmp", "/work", tempfile.gettempdir()):  # noqa: S108 - checked for tmpfs just below
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK) and not fs_of(candidate).startswith("tmpfs"):
            return candidate
    raise SystemExit("no writable directory on a real disk: give --state-dir")
