"""Backup names and the retention policy. Pure except `scan`, which lists a directory.

A backup is a sealed, self-contained base snapshot of kind "backup" in STATE_DIR/backups/, named with the UTC time
and the generation of the snapshot it follows: ``sessions.20261125T101530Z.g000123.enc``.

Retention follows borg/restic prune: keep the `last` N, then the newest backup of each of the last N hours, days,
ISO weeks and months (UTC). A backup kept by an earlier rule does not count towards a later one, as in borg's
prune_split; when a rule runs out of backups, the oldest is kept for it. The newest backup is always kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .clock import compact_utc

DIRNAME = "backups"
NAME = re.compile(r"sessions\.(\d{8}T\d{6}Z)\.g(\d{6,})\.enc\Z")


def backup_name(now_ms: int, generation: int) -> str:
    return f"sessions.{compact_utc(now_ms)}.g{generation:06d}.enc"


@dataclass(frozen=True, order=True)
class BackupInfo:
    time: datetime
    generation: int
    name: str


def parse_name(name: str) -> BackupInfo | None:
    m = NAME.match(name)
    if not m:
        return None
    try:
        time = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:  # the right shape, an impossible date: not one of ours
        return None
    return BackupInfo(time, int(m.group(2)), name)


def scan(directory: str) -> list[BackupInfo]:
    """The backups in `directory`, oldest first (other names are ignored)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(info for n in names if (info := parse_name(n)))


@dataclass(frozen=True)
class Retention:
    last: int = 10
    hourly: int = 24
    daily: int = 7
    weekly: int = 4
    monthly: int = 6


@dataclass
class PruneResult:
    keep: dict[str, list[str]] = field(default_factory=dict)  # name -> the rules that keep it
    remove: list[BackupInfo] = field(default_factory=list)


_PERIODS: dict[str, Callable[[datetime], object]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
}


def plan_prune(backups: list[BackupInfo], policy: Retention, protect: str | None = None) -> PruneResult:
    """Which backups the policy keeps (with the rules that keep each) and which it removes; `protect` names one
    that is kept whatever the rules say (the newest backup known to authenticate)."""
    newest_first = sorted(backups, reverse=True)
    result = PruneResult()
    if not newest_first:
        return result
    reasons: dict[str, list[str]] = {}
    for i, info in enumerate(newest_first[: policy.last]):
        reasons.setdefault(info.name, []).append(f"last #{i + 1}")
    for rule, period in _PERIODS.items():
        wanted = getattr(policy, rule)
        kept, last_period = 0, None
        for info in newest_first:
            if kept >= wanted:
                break
            p = period(info.time)
            if p != last_period:
                last_period = p
                if info.name not in reasons:
                    kept += 1
                    reasons[info.name] = [f"{rule} #{kept}"]
        oldest = newest_first[-1]
        if kept < wanted and oldest.name not in reasons:  # borg's prune_split keeps the oldest then
            reasons[oldest.name] = [f"{rule} (oldest)"]
    reasons.setdefault(newest_first[0].name, []).append("newest")
    if protect is not None and any(b.name == protect for b in newest_first):
        reasons.setdefault(protect, []).append("newest good")
    result.keep = reasons
    result.remove = [b for b in newest_first if b.name not in reasons]
    return result
