"""The store's periodic work, run by the daemon beside the webhook: snapshots, backups, retention, recovery.

- a snapshot every 5 minutes by default (the legacy system saved every 5 minutes; here it only compacts the journal,
  since every change is already durable when acknowledged);
- a sealed backup at most once per interval (hourly by default), then the retention policy (never the newest
  backup that authenticates);
- sessions inactive longer than the configured period (365 days, the legacy "timeout 1 año") are purged;
- while the store is degraded, a full snapshot is retried every `retry_s` seconds: its success ends the degraded
  state (store.py).
Failures are logged (without personal data) and retried at the next turn; they never stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from . import backups
from .errors import NataliaError
from .store import DAY_MS, Store

log = structlog.get_logger("natalia_secure.maintenance")


@dataclass
class MaintenancePolicy:
    snapshot_every_s: float = 300.0
    backup_every_s: float = 3600.0
    retention: backups.Retention = field(default_factory=backups.Retention)
    inactive_days: int | None = 365  # None: never purge
    retry_s: float = 10.0  # while degraded


class Maintenance:
    def __init__(
        self, store: Store, policy: MaintenancePolicy | None = None, observe: Callable[[str, float], None] | None = None
    ) -> None:
        self.store = store
        self.policy = policy or MaintenancePolicy()
        self.observe = observe  # ("snapshot" | "backup", seconds): durations for metrics
        self.on_recovered: Callable[[], None] | None = None  # the daemon tells systemd at once (STATUS=)
        now = store.clock()
        self._last_snapshot = now
        newest = store.list_backups()
        self._last_backup: int | None = int(newest[-1].time.timestamp() * 1000) if newest else None
        self._last_purge: int | None = None
        self.failures = 0
        self._wake = asyncio.Event()

    def _due(self, last: int | None, every_s: float, now: int) -> bool:
        return last is None or now - last >= every_s * 1000

    async def run_once(self) -> list[str]:
        """Do whatever is due now; returns what was done (for tests and STATUS=)."""
        store, policy, done = self.store, self.policy, []
        now = store.clock()
        try:
            if store.degraded:
                with self._timed("snapshot"):
                    await store.snapshot_async(full=True)
                self._last_snapshot = now
                log.info("store_recovered", generation=store.generation)
                if self.on_recovered is not None:
                    self.on_recovered()
                done.append("recovered")
                return done
            if policy.inactive_days is not None and self._due(self._last_purge, 86_400, now):
                purged = await store.purge_inactive_async(policy.inactive_days * DAY_MS)
                self._last_purge = now
                if purged:
                    log.info("sessions_purged", count=len(purged), inactive_days=policy.inactive_days)
                done.append("purge")
            if self._due(self._last_snapshot, policy.snapshot_every_s, now):
                with self._timed("snapshot"):
                    generation = await store.snapshot_async()
                self._last_snapshot = now
                log.info("snapshot", generation=generation, sessions=len(store))  # the legacy "saved N sessions"
                done.append("snapshot")
            if self._due(self._last_backup, policy.backup_every_s, now):
                with self._timed("backup"):
                    path = await store.backup_async()
                self._last_backup = now
                result = await asyncio.get_running_loop().run_in_executor(None, store.prune_backups, policy.retention)
                log.info("backup", file=path.rsplit("/", 1)[-1], pruned=len(result.remove), kept=len(result.keep))
                done.append("backup")
        except (NataliaError, OSError) as exc:
            self.failures += 1
            log.error("maintenance_failed", error=str(exc), degraded=store.degraded)
            done.append("failed")
        return done

    @contextlib.contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        """Report how long the block took (only when it succeeds: a failed snapshot has no duration worth a metric)."""
        started = time.perf_counter()
        yield
        if self.observe is not None:
            self.observe(what, time.perf_counter() - started)

    def next_wait_s(self) -> float:
        """Seconds until something may be due (bounded, so a changed clock or policy is noticed)."""
        if self.store.degraded:
            return self.policy.retry_s
        now = self.store.clock()
        waits = [self.policy.snapshot_every_s - (now - self._last_snapshot) / 1000]
        if self._last_backup is not None:
            waits.append(self.policy.backup_every_s - (now - self._last_backup) / 1000)
        return max(0.05, min([60.0, *waits]))

    def wake(self) -> None:
        """Look at once (e.g. the store just turned degraded: start recovering now, not at the next snapshot)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set."""
        while not stop.is_set():
            self._wake.clear()  # before the work: a wake-up during it is kept for the next turn
            await self.run_once()
            stopped = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([stopped, woken], timeout=self.next_wait_s(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                woken.cancel()

    def status(self) -> dict[str, Any]:
        return {"last_snapshot_ms": self._last_snapshot, "last_backup_ms": self._last_backup, "failures": self.failures}
