"""Time in the legacy system's unit (Unix milliseconds) and its one text form (UTC, RFC 3339, seconds)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compact_utc(ms: int) -> str:
    """The timestamp used in file names: 20261125T101530Z."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")
