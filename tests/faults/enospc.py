"""Disk full under a running store, on a 2 MiB tmpfs in a private mount namespace (tests/test_faults.py runs it).

    unshare -m --propagation private python tests/faults/enospc.py recover|restart MOUNTPOINT MASTER_KEY_FILE

Both scenarios build a store (a base, a delta, a journal), put a filler file on the disk, then append and flush
until the disk is full. "recover" stays in the same process: it probes the degraded store, takes a failed snapshot
while the disk is still full, opens the store read-only as a restart would, deletes the filler and takes a full
snapshot, which must end the degraded state. "restart" closes the degraded store instead, deletes the filler and
opens the store again for writing. Prints one JSON object of observations.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from scenario import T0, attempt, contents, describe, digests, emit, new_store_dir, temps, texts, tmpfs, wait_durable

from natalia_secure import snapshot
from natalia_secure.errors import StoreUnavailable
from natalia_secure.store import Store, StoreOptions
from natalia_secure.verify import verify_state_dir

OPTIONS = StoreOptions(chunk=4096)
FILLER = 1_200_000


def phone(i: int) -> str:
    return f"+3460000{i % 5:04d}"


def fill_until_full(store: Store, obs: dict[str, Any]) -> tuple[list[str], list[tuple[int, str]]]:
    """Append in flushed groups of 8 until a flush fails; returns the texts acknowledged and the (lsn, text) that
    failed."""
    acknowledged: list[str] = []
    for group in range(10_000):
        batch = []
        for j in range(8):
            text = f"fill {group}.{j} " + "z" * 1000
            batch.append((store.add_message(phone(j), "user", text, T0 + group), text))
        try:
            store.flush()
        except Exception as exc:
            obs["flush_error"] = describe(exc)
            obs["groups_before_full"] = group
            return acknowledged, batch
        acknowledged += [t for _, t in batch]
    raise SystemExit("the disk never filled")


def prepare(
    mountpoint: str, key_file: str, obs: dict[str, Any]
) -> tuple[Store, str, Any, list[str], list[tuple[int, str]], dict[str, str]]:
    tmpfs(mountpoint)
    state, master = new_store_dir(os.path.join(mountpoint, "state"), key_file)
    store = Store.open(state, master, OPTIONS)
    acknowledged = []
    for i in range(20):
        text = f"base {i}"
        store.add_message(phone(i), "user", text, T0 + i)
        acknowledged.append(text)
    store.flush()
    store.snapshot(full=True)
    for i in range(5):
        text = f"delta {i}"
        store.add_message(phone(i), "assistant", text, T0 + 100 + i)
        acknowledged.append(text)
    store.flush()
    store.snapshot()
    old_snapshots = {n: d for n, d in digests(state).items() if snapshot.NAME.match(n)}
    obs["old_snapshots"] = sorted(old_snapshots)
    with open(os.path.join(mountpoint, "filler"), "wb") as f:
        f.write(os.urandom(FILLER))
        os.fsync(f.fileno())
    more, failed = fill_until_full(store, obs)
    return store, state, master, acknowledged + more, failed, old_snapshots


def recover(mountpoint: str, key_file: str) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    store, state, master, acknowledged, failed, old_snapshots = prepare(mountpoint, key_file, obs)
    obs["acknowledged"] = len(acknowledged)
    obs["degraded_after_flush"] = store.degraded
    obs["add_while_degraded"] = attempt(store.add_message, phone(0), "user", "refused?", T0)
    obs["claim_while_degraded"] = attempt(store.claim, "wamid.degraded", T0)
    obs["wait_failed_lsn"] = wait_durable(store, failed[-1][0])
    obs["snapshot_while_full"] = attempt(store.snapshot, full=True)
    obs["degraded_after_failed_snapshot"] = store.degraded
    obs["temps_after_failed_snapshot"] = temps(state)
    obs["wait_failed_lsn_after_failed_snapshot"] = wait_durable(store, failed[-1][0])
    obs["old_snapshots_intact"] = {n: d for n, d in digests(state).items() if n in old_snapshots} == old_snapshots
    # A restart while the disk is still full sees every acknowledged message (the writer keeps the lock: read-only).
    seen = texts(Store.open(state, master, OPTIONS, readonly=True))
    obs["missing_after_restart_while_full"] = [t[:12] for t in acknowledged if t not in seen]
    os.unlink(os.path.join(mountpoint, "filler"))
    obs["recovery_snapshot"] = attempt(store.snapshot, full=True)
    obs["degraded_after_recovery"] = store.degraded
    obs["add_after_recovery"] = attempt(lambda: (store.add_message(phone(1), "user", "after recovery", T0), store.flush()))
    memory = contents(store)
    store.close()
    with Store.open(state, master, OPTIONS) as again:
        obs["reopened_equals_memory"] = contents(again) == memory
        seen = texts(again)
    obs["missing_after_reopen"] = [t[:12] for t in [*acknowledged, "after recovery"] if t not in seen]
    obs["failed_batch_durable_after_recovery"] = all(t in seen for _, t in failed)
    obs["verify_ok"] = verify_state_dir(state, master).ok
    obs["temps_after_reopen"] = temps(state)
    return obs


def restart(mountpoint: str, key_file: str) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    store, state, master, acknowledged, _, old_snapshots = prepare(mountpoint, key_file, obs)
    obs["acknowledged"] = len(acknowledged)
    obs["degraded_after_flush"] = store.degraded
    obs["snapshot_while_full"] = attempt(store.snapshot)
    store.close()  # the daemon dies or is restarted while the disk is full
    obs["old_snapshots_intact"] = {n: d for n, d in digests(state).items() if n in old_snapshots} == old_snapshots
    os.unlink(os.path.join(mountpoint, "filler"))
    with Store.open(state, master, OPTIONS) as again:
        seen = texts(again)
        obs["temps_after_reopen"] = temps(state)
        obs["add_after_restart"] = attempt(lambda: (again.add_message(phone(1), "user", "after restart", T0), again.flush()))
        obs["snapshot_after_restart"] = attempt(again.snapshot, full=True)
    obs["missing_after_restart"] = [t[:12] for t in acknowledged if t not in seen]
    obs["verify_ok"] = verify_state_dir(state, master).ok
    with Store.open(state, master, OPTIONS, readonly=True) as last:
        obs["after_restart_durable"] = "after restart" in texts(last)
    return obs


if __name__ == "__main__":
    scenario, mountpoint, key_file = sys.argv[1:4]
    try:
        emit({"recover": recover, "restart": restart}[scenario](mountpoint, key_file))
    except StoreUnavailable as exc:  # unexpected here: say so as data, the test shows it
        emit({"unexpected": describe(exc)})
