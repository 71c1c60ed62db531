"""Periodic store work: snapshots, backups with retention, purge of inactive sessions, recovery from degraded."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from natalia_secure import backups, journal
from natalia_secure.maintenance import Maintenance, MaintenancePolicy
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import DAY_MS, Store, StoreOptions

T0 = 1_795_000_000_000  # 2026-11-19, ms


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def open_store(state_dir: str, master: MasterKey, clock: Clock) -> Store:
    return Store.open(state_dir, master, StoreOptions(chunk=4096), clock=clock)


def test_snapshot_every_interval(state_dir: str, master: MasterKey, clock: Clock) -> None:
    """A snapshot is taken once the interval has passed since the last one, not before."""

    async def scenario() -> None:
        store = open_store(state_dir, master, clock)
        m = Maintenance(store, MaintenancePolicy(snapshot_every_s=300, backup_every_s=10**9, inactive_days=None))
        m._last_backup = clock()  # no backup in this test
        lsn = store.add_message("34600000001", "user", "hola", clock())
        await store.wait_durable(lsn)
        assert "snapshot" not in await m.run_once()
        clock.advance(299)
        assert "snapshot" not in await m.run_once()
        clock.advance(2)
        assert "snapshot" in await m.run_once()
        assert store.generation == 1
        await store.aclose()

    asyncio.run(scenario())
    assert Store.open(state_dir, master, readonly=True).get("34600000001")["messages"][0]["content"] == "hola"


def test_backup_at_start_then_hourly_and_pruned(state_dir: str, master: MasterKey, clock: Clock) -> None:
    """With no backup yet one is taken at once; the next only after the interval; retention prunes the old ones."""

    async def scenario() -> None:
        store = open_store(state_dir, master, clock)
        policy = MaintenancePolicy(snapshot_every_s=10**9, backup_every_s=3600, inactive_days=None)
        policy.retention = backups.Retention(last=3, hourly=0, daily=0, weekly=0, monthly=0)
        m = Maintenance(store, policy)
        assert "backup" in await m.run_once()
        clock.advance(1800)
        assert "backup" not in await m.run_once()
        for _ in range(5):
            clock.advance(3600)
            store.add_message("34600000001", "user", "x", clock())
            assert "backup" in await m.run_once()
        await store.aclose()

    asyncio.run(scenario())
    names = sorted(os.listdir(os.path.join(state_dir, backups.DIRNAME)))
    assert len(names) == 3  # keep-last 3 of 6
    assert all(n.startswith("sessions.") and n.endswith(".enc") for n in names)


def test_prune_never_removes_the_newest_good_backup(state_dir: str, master: MasterKey, clock: Clock) -> None:
    """When the newest backup is corrupt, the newest one that authenticates is kept whatever the policy says."""
    store = open_store(state_dir, master, clock)
    paths = []
    for i in range(4):
        store.add_message("34600000001", "user", f"m{i}", clock())
        paths.append(store.backup())
        clock.advance(3600)
    with open(paths[-1], "r+b") as f:  # corrupt the newest
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    policy = backups.Retention(last=1, hourly=0, daily=0, weekly=0, monthly=0)
    dry = store.prune_backups(policy, dry_run=True)
    assert len(os.listdir(os.path.dirname(paths[0]))) == 4  # a dry run removes nothing
    result = store.prune_backups(policy)
    assert [b.name for b in result.remove] == [b.name for b in dry.remove]
    left = sorted(os.listdir(os.path.dirname(paths[0])))
    assert left == sorted(os.path.basename(p) for p in paths[2:])
    assert "newest good" in result.keep[os.path.basename(paths[2])]
    store.close()


def test_inactive_sessions_are_purged(state_dir: str, master: MasterKey, clock: Clock) -> None:
    """Sessions idle longer than inactive_days are removed (durably); active ones stay."""

    async def scenario() -> None:
        store = open_store(state_dir, master, clock)
        store.add_message("34600000001", "user", "old", clock() - 400 * DAY_MS)
        store.add_message("34600000002", "user", "recent", clock() - 10 * DAY_MS)
        m = Maintenance(store, MaintenancePolicy(snapshot_every_s=10**9, backup_every_s=10**9, inactive_days=365))
        m._last_backup = clock()
        assert "purge" in await m.run_once()
        await store.wait_durable(store.lsn)
        await store.aclose()

    asyncio.run(scenario())
    assert Store.open(state_dir, master, readonly=True).phones() == ["34600000002"]


def test_degraded_store_recovers_by_itself(
    state_dir: str, master: MasterKey, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an fsync EIO the store is degraded and refuses changes; maintenance's full snapshot recovers it."""
    real_fsync = os.fsync
    failures = {"left": 1}

    def failing_fsync(fd: int) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    async def scenario() -> None:
        store = open_store(state_dir, master, clock)
        m = Maintenance(store, MaintenancePolicy(snapshot_every_s=10**9, backup_every_s=10**9, inactive_days=None, retry_s=0.01))
        told: list[str | None] = []
        m.on_recovered = lambda: told.append(store.degraded)  # the daemon's STATUS= update: told once it is over
        lsn = store.add_message("34600000001", "user", "before the fault", clock())
        monkeypatch.setattr(journal.os, "fsync", failing_fsync)
        with pytest.raises(Exception, match="Input/output error"):
            await store.wait_durable(lsn)
        assert store.degraded
        assert m.next_wait_s() == 0.01
        with pytest.raises(Exception, match="degraded"):
            store.add_message("34600000001", "user", "refused", clock())
        assert told == []
        assert await m.run_once() == ["recovered"]
        assert store.degraded is None and told == [None]
        await store.wait_durable(lsn)  # memory held it: the recovery snapshot made it durable
        await store.wait_durable(store.add_message("34600000001", "user", "after", clock()))
        await store.aclose()

    asyncio.run(scenario())
    contents = [m["content"] for m in Store.open(state_dir, master, readonly=True).get("34600000001")["messages"]]
    assert contents == ["before the fault", "after"]


def test_run_stops_when_asked(state_dir: str, master: MasterKey, clock: Clock) -> None:
    """run() does the due work and returns promptly once its stop event is set."""

    async def scenario() -> None:
        store = open_store(state_dir, master, clock)
        m = Maintenance(store, MaintenancePolicy(inactive_days=None))
        stop = asyncio.Event()
        task = asyncio.create_task(m.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert store.list_backups()  # the first backup was due at once
        await store.aclose()

    asyncio.run(scenario())
