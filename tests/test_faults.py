"""Faults under the store: disk full (ENOSPC) and a read-only filesystem on real tmpfs mounts in private mount
namespaces (tests/faults/), and EIO from fsync injected in-process. What cannot be persisted is never reported
durable (guarantee 1), the store degrades and refuses changes until a full snapshot succeeds, and no file is harmed
(guarantee 3)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from natalia_secure import masterkey
from natalia_secure.errors import StoreUnavailable
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store, StoreOptions

from .conftest import DATA

FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults")
OPTIONS = StoreOptions(chunk=4096)
T0 = 1_764_065_730_000


def namespaces_unavailable() -> str | None:
    """Why private mount namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root: mounts a tmpfs in a private mount namespace (the CI runs as root)"
    if shutil.which("unshare") is None:
        return "needs unshare(1) from util-linux to make a private mount namespace"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"unshare -m is not permitted here: {probe.stderr.strip()}"
    return None


def run_in_namespace(tmp_path_factory: pytest.TempPathFactory, script: str, scenario: str, *extra: str) -> dict[str, Any]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp(scenario)
    key = str(base / "master.key")
    masterkey.create_key_file(key)
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            os.path.join(FAULTS, script),
            scenario,
            str(mountpoint),
            key,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip(), f"{script} {scenario} failed:\n{proc.stderr}"
    assert os.listdir(mountpoint) == [], "the tmpfs was mounted in the private namespace only"
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert "unexpected" not in result, result
    return result


@pytest.fixture(scope="module")
def enospc_recover(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_in_namespace(tmp_path_factory, "enospc.py", "recover")


@pytest.fixture(scope="module")
def enospc_restart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_in_namespace(tmp_path_factory, "enospc.py", "restart")


@pytest.fixture(scope="module")
def readonly_remount(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_in_namespace(tmp_path_factory, "readonly.py", "remount", os.path.join(DATA, "legacy-sessions-example.json"))


@pytest.fixture(scope="module")
def readonly_bind(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_in_namespace(tmp_path_factory, "readonly.py", "bind", os.path.join(DATA, "legacy-sessions-example.json"))


def is_clear(error: dict[str, Any] | None, code: int, words: str) -> bool:
    return (
        error is not None
        and error["type"] in ("StoreUnavailable", "OSError")
        and (error["errno"] == code or words in error["message"])
    )


# ---- disk full ----


@pytest.mark.root
def test_disk_full_fails_the_flush_clearly_and_degrades(enospc_recover: dict[str, Any]) -> None:
    """On a full disk, flush raises StoreUnavailable naming ENOSPC, the store reports degraded and refuses changes."""
    obs = enospc_recover
    assert obs["groups_before_full"] > 10, "the disk filled later than at once"
    assert obs["flush_error"]["type"] == "StoreUnavailable" and "No space left on device" in obs["flush_error"]["message"]
    assert obs["degraded_after_flush"] and "No space left" in obs["degraded_after_flush"]
    assert obs["add_while_degraded"]["type"] == "StoreUnavailable"
    assert obs["claim_while_degraded"]["type"] == "StoreUnavailable"
    assert obs["wait_failed_lsn"] == "StoreUnavailable"


@pytest.mark.root
def test_disk_full_snapshot_fails_clearly_and_harms_nothing(enospc_recover: dict[str, Any]) -> None:
    """A snapshot on the full disk fails with ENOSPC, leaves no temp, keeps the old snapshot files intact, and a
    restart then (read-only: the writer keeps the lock) has every acknowledged message."""
    obs = enospc_recover
    assert is_clear(obs["snapshot_while_full"], errno.ENOSPC, "No space left"), obs["snapshot_while_full"]
    assert obs["degraded_after_failed_snapshot"]
    assert obs["temps_after_failed_snapshot"] == []
    assert obs["old_snapshots"] == ["snapshot.g000001.enc", "snapshot.g000002.enc"] and obs["old_snapshots_intact"]
    assert obs["acknowledged"] > 100 and obs["missing_after_restart_while_full"] == []


@pytest.mark.root
def test_disk_full_a_full_snapshot_after_freeing_space_recovers(enospc_recover: dict[str, Any]) -> None:
    """Once space is freed, snapshot(full=True) ends the degraded state and makes memory durable (the failed batch
    included); the reopened store equals memory, every file authenticates, no temp is left."""
    obs = enospc_recover
    assert obs["recovery_snapshot"] is None and obs["degraded_after_recovery"] is None
    assert obs["add_after_recovery"] is None
    assert obs["reopened_equals_memory"] and obs["missing_after_reopen"] == []
    assert obs["failed_batch_durable_after_recovery"]
    assert obs["verify_ok"] and obs["temps_after_reopen"] == []


@pytest.mark.root
def test_disk_full_a_failed_recovery_snapshot_reports_nothing_durable(enospc_recover: dict[str, Any]) -> None:
    """After a recovery snapshot that fails (disk still full), a record whose flush failed is still not durable
    (a regression test: the new journal once took the failed journal's last lsn as durable)."""
    assert enospc_recover["wait_failed_lsn_after_failed_snapshot"] == "StoreUnavailable"


@pytest.mark.root
def test_disk_full_then_restart_keeps_every_acknowledged_message(enospc_restart: dict[str, Any]) -> None:
    """Closed while degraded by a full disk and reopened for writing after space is freed, the store has every
    acknowledged message, left the old snapshots intact, and writes and snapshots again."""
    obs = enospc_restart
    assert obs["flush_error"]["type"] == "StoreUnavailable" and obs["degraded_after_flush"]
    assert is_clear(obs["snapshot_while_full"], errno.ENOSPC, "No space left"), obs["snapshot_while_full"]
    assert obs["old_snapshots_intact"]
    assert obs["acknowledged"] > 100 and obs["missing_after_restart"] == []
    assert obs["temps_after_reopen"] == [] and obs["add_after_restart"] is None and obs["snapshot_after_restart"] is None
    assert obs["after_restart_durable"] and obs["verify_ok"]


# ---- read-only filesystem ----


@pytest.mark.root
def test_a_readonly_filesystem_refuses_writers_clearly_and_changes_nothing(readonly_remount: dict[str, Any]) -> None:
    """On a tmpfs remounted read-only, a writer fails clearly with EROFS (at open, or at its first flush, with nothing
    reported durable) and the import command exits 7 with one line; read-only opens and verify still work and see
    everything; no file changes."""
    obs = readonly_remount
    assert obs["remount_ro"] == 0
    if obs["writing_open"] is not None:
        assert is_clear(obs["writing_open"], errno.EROFS, "Read-only file system"), obs["writing_open"]
    else:
        assert is_clear(obs["first_flush"], errno.EROFS, "Read-only file system"), obs["first_flush"]
        assert obs["first_flush"]["type"] == "StoreUnavailable" and obs["first_wait"] == "StoreUnavailable"
    assert obs["readonly_equals"] and obs["verify_ok"]
    assert obs["cli_import_exit"] == StoreUnavailable.exit_code
    assert obs["cli_import_stderr"].count("\n") == 1 and "Read-only file system" in obs["cli_import_stderr"]
    assert obs["intact"]


@pytest.mark.root
def test_a_directory_turned_readonly_under_a_running_store(readonly_bind: dict[str, Any]) -> None:
    """With the state directory turned read-only under a running store, flush fails with EROFS, the record is not
    reported durable, changes are refused, a snapshot fails clearly, no file changes, and a reader sees exactly what
    was durable; once writable again, a full snapshot recovers and makes memory durable."""
    obs = readonly_bind
    # (obs["remount_ro_while_open"] is 32 today: the kernel refuses while the journal holds a segment open for writing)
    assert obs["bind_ro"] == 0
    assert is_clear(obs["flush"], errno.EROFS, "Read-only file system") and obs["flush"]["type"] == "StoreUnavailable"
    assert obs["degraded"] and obs["wait_failed_lsn"] == "StoreUnavailable"
    assert obs["add_while_degraded"]["type"] == "StoreUnavailable"
    assert is_clear(obs["snapshot_while_ro"], errno.EROFS, "Read-only file system"), obs["snapshot_while_ro"]
    assert obs["intact"] and obs["temps"] == [] and obs["readonly_sees_exactly_the_durable"]
    assert obs["umount_bind"] == 0 and obs["recovery_snapshot"] is None and obs["degraded_after_recovery"] is None
    assert obs["reopened_equals_memory"] and obs["failed_record_durable_after_recovery"] and obs["verify_ok"]


@pytest.mark.root
def test_a_readonly_directory_a_failed_recovery_snapshot_reports_nothing_durable(readonly_bind: dict[str, Any]) -> None:
    """After a recovery snapshot fails on the read-only directory, the record whose flush failed is still not durable
    (a reader does not see it either)."""
    assert readonly_bind["wait_failed_lsn_after_failed_snapshot"] == "StoreUnavailable"


# ---- EIO from fsync, in-process ----


def eio_once(monkeypatch: pytest.MonkeyPatch, target: Callable[[str], bool]) -> list[str]:
    """os.fsync raises EIO once, on the first descriptor whose path `target` accepts; returns the paths it failed."""
    real = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not failed and target(path):
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def is_segment(path: str) -> bool:
    return os.path.basename(path).startswith("journal.") and path.endswith(".enc")


def messages(store: Store, phone: str) -> list[str]:
    return [m["content"] for m in store.get(phone)["messages"]]


def test_eio_from_fsync_degrades_and_a_full_snapshot_recovers(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync of a segment failing with EIO: flush raises StoreUnavailable, the store is degraded and refuses changes,
    the failed records are not reported durable; snapshot(full=True) recovers and makes memory durable."""
    store = Store.open(state_dir, master, OPTIONS)
    store.add_message("+34600000001", "user", "durable", T0)
    store.flush()
    failed = eio_once(monkeypatch, is_segment)
    lost = [store.add_message("+34600000001", "user", f"unsure {i}", T0 + i) for i in range(3)]
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        store.flush()
    assert failed and is_segment(failed[0])
    assert store.degraded and "Input/output error" in store.degraded
    with pytest.raises(StoreUnavailable):
        store.add_message("+34600000001", "user", "refused", T0 + 9)
    with pytest.raises(StoreUnavailable):
        store.claim("wamid.x", T0)

    async def waits() -> list[BaseException | None]:
        return await asyncio.gather(*(store.wait_durable(lsn) for lsn in lost), return_exceptions=True)

    assert all(isinstance(r, StoreUnavailable) for r in asyncio.run(waits()))
    store.snapshot(full=True)
    assert store.degraded is None
    assert asyncio.run(waits()) == [None, None, None], "the recovery snapshot holds them: durable now"
    store.add_message("+34600000001", "user", "after recovery", T0 + 10)
    store.flush()
    memory = messages(store, "+34600000001")
    assert memory == ["durable", "unsure 0", "unsure 1", "unsure 2", "after recovery"]
    store.close()
    assert messages(Store.open(state_dir, master, OPTIONS, readonly=True), "+34600000001") == memory


def test_eio_under_group_commit_answers_every_waiter_with_an_error(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 16 coroutines waiting on one group commit whose fsync fails, every waiter gets StoreUnavailable (none is
    told durable), the store is degraded, and later waits on those lsns fail at once."""
    store = Store.open(state_dir, master, OPTIONS)
    store.add_message("+34600000001", "user", "first", T0)
    store.flush()
    eio_once(monkeypatch, is_segment)

    async def one(i: int) -> int:
        lsn = store.add_message(f"+3460000{i:04d}", "user", f"m{i}", T0 + i)
        await store.wait_durable(lsn)
        return lsn

    async def main() -> list[int | BaseException]:
        results = await asyncio.gather(*(one(i) for i in range(16)), return_exceptions=True)
        assert store.degraded
        with pytest.raises(StoreUnavailable):
            await store.wait_durable(5)
        await store.aclose()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, StoreUnavailable) for r in results), results


def test_eio_recovery_fails_then_succeeds(state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recovery snapshot whose own fsync fails keeps the store degraded and refusing; the next one recovers."""
    store = Store.open(state_dir, master, OPTIONS)
    store.add_message("+34600000001", "user", "durable", T0)
    store.flush()
    eio_once(monkeypatch, is_segment)
    store.add_message("+34600000001", "user", "unsure", T0 + 1)
    with pytest.raises(StoreUnavailable):
        store.flush()
    eio_once(monkeypatch, lambda path: ".snapshot." in path)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        store.snapshot(full=True)
    assert store.degraded
    with pytest.raises(StoreUnavailable):
        store.add_message("+34600000001", "user", "refused", T0 + 2)
    store.snapshot(full=True)
    assert store.degraded is None
    store.close()
    assert messages(Store.open(state_dir, master, OPTIONS, readonly=True), "+34600000001") == ["durable", "unsure"]


def test_eio_a_failed_recovery_never_reports_the_failed_records_durable(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After EIO and a recovery snapshot that fails too, wait_durable on a record whose fsync failed still raises."""
    store = Store.open(state_dir, master, OPTIONS)
    store.add_message("+34600000001", "user", "durable", T0)
    store.flush()
    eio_once(monkeypatch, is_segment)
    lsn = store.add_message("+34600000001", "user", "unsure", T0 + 1)
    with pytest.raises(StoreUnavailable):
        store.flush()
    eio_once(monkeypatch, lambda path: ".snapshot." in path)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        store.snapshot(full=True)
    with pytest.raises(StoreUnavailable):
        asyncio.run(store.wait_durable(lsn))
