"""What the fault scripts share: a private tmpfs, a fresh store on it, and ways to record what happened as JSON.

The scripts run inside ``unshare -m --propagation private`` (tests/test_faults.py starts them): every mount they make
lives in their own mount namespace and vanishes with them, so nothing on the host is ever mounted or left mounted.
They check nothing themselves: they print one JSON object of observations, and the test asserts on it, so a failure
reads as a pytest assertion with the numbers in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from typing import Any

from natalia_secure import atomicfile, keyring, masterkey
from natalia_secure.clock import iso_utc, now_ms
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store

T0 = 1_764_065_730_000


def mount(*args: str) -> int:
    """Run mount(8); returns its exit status (32 is "mount failure", e.g. EBUSY)."""
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode


def umount(path: str) -> int:
    return subprocess.run(["umount", path], capture_output=True, check=False).returncode


def tmpfs(path: str, size: str = "2m") -> None:
    os.makedirs(path, exist_ok=True)
    if mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path) != 0:
        raise SystemExit(f"cannot mount a tmpfs at {path}")


def new_store_dir(path: str, key_file: str) -> tuple[str, MasterKey]:
    master = masterkey.read_key_file(key_file)
    atomicfile.ensure_private_dir(path, create=True)
    keyring.save(path, keyring.Keyring.new(iso_utc(now_ms())), master, now_ms())
    return path, master


def describe(exc: BaseException | None) -> dict[str, Any] | None:
    """An exception as data: its type, errno (its own or its cause's) and message."""
    if exc is None:
        return None
    errno_ = getattr(exc, "errno", None) or getattr(exc.__cause__, "errno", None)
    return {"type": type(exc).__name__, "errno": errno_, "message": str(exc)}


def attempt(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Call fn; None if it returned, else the exception described."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        return describe(exc)
    return None


def wait_durable(store: Store, lsn: int) -> str:
    """What wait_durable(lsn) answers: "durable", or the exception's type."""
    try:
        asyncio.run(store.wait_durable(lsn))
    except Exception as exc:
        return type(exc).__name__
    return "durable"


def contents(store: Store) -> dict[str, Any]:
    return {phone: store.get(phone) for phone in store.phones()}


def texts(store: Store) -> set[str]:
    return {m["content"] for _, s in store.items() for m in s["messages"]}


def digests(directory: str) -> dict[str, str]:
    """sha256 of every file under `directory` (relative names), temps included: nothing may change unseen."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return found


def temps(directory: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(r, n), directory) for r, _, ns in os.walk(directory) for n in ns if n.endswith(".tmp")
    )


def emit(observations: dict[str, Any]) -> None:
    print(json.dumps(observations), flush=True)
