"""The write-ahead journal: sealed records appended to numbered segment files, made durable by group commit.

A record is one change (a message, a purge, a dedup claim...) with a log sequence number (lsn) that the next
record's is one more than, across segments. Each segment is a sealed file (kind "journal") with its own data key;
the snapshot rotates to a new segment and drops the ones it covers (Redis AOF+RDB, PostgreSQL WAL).

Group commit: an fsync costs ~0.14 ms here (DESIGN.md), ~7k/s one at a time, so every record that arrives while a
write+fsync is in flight joins the next one; callers wait for `durable_lsn` to pass their record. The write runs in
a thread: os.write and fsync release the GIL, so the event loop keeps serving.

Segments are created lazily, with their first batch: the head alone is written as an atomic file (temp, fsync,
link into place, fsync dir), so a segment never has a torn head and every head that fails to parse is tampering.
A segment is never appended to by a later process: after a restart a new one starts, so a torn tail left by a crash
stays where it is (guarantee 3: nothing is repaired in place).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import atomicfile, envelope
from .errors import EnvelopeError, IntegrityError, StoreUnavailable

SEGMENT_NAME = re.compile(r"journal\.(\d{6,})\.enc\Z")


def segment_name(number: int) -> str:
    return f"journal.{number:06d}.enc"


@dataclass
class Segment:
    number: int
    path: str
    sealer: envelope.RecordSealer
    head_bytes: bytes = field(repr=False)
    created: bool = False  # the file exists (its head is durable)
    fd: int | None = None  # open for appending; only the writing thread touches it


@dataclass
class Batch:
    """Records taken from the pending queue, in order, each with the segment it belongs to."""

    items: list[tuple[Segment, bytes]]
    last_lsn: int
    seq: int  # batches are written strictly in the order they were taken


class Journal:
    """Appends sealed records; `write` makes a batch durable. One process (the lock holder) writes a journal.

    Threads: `append`, `rotate` and `take_pending` run on the owner's thread (the event loop); `write` runs on any
    thread, batches strictly in the order taken (a condition variable orders them), so durable_lsn never passes a
    record that is not on disk.
    """

    def __init__(
        self,
        state_dir: str,
        next_segment: int,
        next_lsn: int,
        seal_key: Callable[[], tuple[str, bytes]],
        created: Callable[[], str],
        durable_lsn: int | None = None,
    ) -> None:
        self._dir = state_dir
        self._seal_key = seal_key  # the keyring's primary key, asked for at each rotation (key rotation needs no restart)
        self._created = created
        self._pending: list[tuple[Segment, bytes]] = []
        self._order = threading.Condition()
        self._taken = 0
        self._written = 0
        self._open: list[Segment] = []
        self.last_lsn = next_lsn - 1
        self.durable_lsn = next_lsn - 1 if durable_lsn is None else durable_lsn
        self.failure: str | None = None
        self._current = self._new_segment(next_segment, next_lsn)

    @property
    def segment(self) -> int:
        return self._current.number

    def _new_segment(self, number: int, first_lsn: int) -> Segment:
        kid, key = self._seal_key()
        header = envelope.Header(kind="journal", kid=kid, generation=number, created=self._created(), lsn=first_lsn)
        head, head_bytes = envelope.new_head(header, key)
        return Segment(number, os.path.join(self._dir, segment_name(number)), envelope.RecordSealer(head), head_bytes)

    def append(self, payload: bytes) -> int:
        """Seal one record and queue it; returns its lsn. Not durable until `write` of a batch holding it returns."""
        if self.failure:
            raise StoreUnavailable(f"the journal is degraded ({self.failure}); nothing more is accepted until it recovers")
        lsn = self._current.sealer.next_lsn
        self._pending.append((self._current, self._current.sealer.seal(payload)))
        self.last_lsn = lsn
        return lsn

    def rotate(self) -> int:
        """Start a new segment for the records after `last_lsn`; returns its number (the file appears with its first batch)."""
        self._current = self._new_segment(self._current.number + 1, self.last_lsn + 1)
        return self._current.number

    def has_pending(self) -> bool:
        return bool(self._pending)

    def take_pending(self) -> Batch:
        items, self._pending = self._pending, []
        self._taken += 1
        return Batch(items, self.last_lsn if items else self.durable_lsn, self._taken)

    def write(self, batch: Batch) -> None:
        """Write and fsync a batch (any thread). On OSError the journal is degraded for good: a failed fsync is
        never retried and trusted (fsyncgate); only a new snapshot, on a new journal, brings the store back."""
        with self._order:
            while self._written != batch.seq - 1:
                self._order.wait()
            try:
                if self.failure:
                    raise StoreUnavailable(f"the journal is degraded ({self.failure})")
                try:
                    self._write(batch)
                except OSError as exc:
                    self.failure = f"{exc.strerror or exc} writing {os.path.basename(exc.filename or self._current.path)}"
                    self._close_open()
                    raise StoreUnavailable(f"journal write failed: {self.failure}") from exc
                self.durable_lsn = max(self.durable_lsn, batch.last_lsn)
            finally:
                self._written = batch.seq
                self._order.notify_all()

    def _write(self, batch: Batch) -> None:
        i = 0
        while i < len(batch.items):
            seg = batch.items[i][0]
            j = i
            while j < len(batch.items) and batch.items[j][0] is seg:
                j += 1
            data = b"".join(rec for _, rec in batch.items[i:j])
            try:
                if not seg.created:
                    atomicfile.write_atomic(seg.path, [seg.head_bytes], overwrite=False)
                    seg.created = True
                if seg.fd is None:
                    seg.fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
                    self._open.append(seg)
                atomicfile.write_all(seg.fd, data)
                os.fsync(seg.fd)
            except OSError as exc:
                exc.filename = exc.filename or seg.path
                raise
            i = j
        # Keep open only the segment the newest record went to: records never go back to an older segment, so
        # every other descriptor is finished (one per rotation would otherwise leak).
        if batch.items:
            self._close_open(keep=batch.items[-1][0])

    def _close_open(self, keep: Segment | None = None) -> None:
        for seg in self._open:
            if seg is not keep and seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None
        self._open = [keep] if keep is not None and keep.fd is not None else []

    def flush(self) -> None:
        """Synchronous group commit: everything appended so far becomes durable (ordered after batches in flight)."""
        if self._pending:
            self.write(self.take_pending())

    def close(self) -> None:
        with self._order:
            self._close_open()


@dataclass
class SegmentRead:
    number: int
    path: str
    first_lsn: int
    payloads: list[bytes]
    torn: bool


def read_segment(path: str, number: int, keys: dict[str, bytes]) -> SegmentRead:
    """Authenticate a whole segment. A torn tail is reported, not an error; anything else wrong is IntegrityError."""
    with atomicfile.open_regular(path) as f:
        data = f.read()
    try:
        head = envelope.read_head(data, keys, kind="journal")
    except EnvelopeError as exc:
        raise IntegrityError(f"{path}: {exc}") from None
    if head.header.generation != number:
        raise IntegrityError(f"{path}: the file says it is segment {head.header.generation}, its name says {number}")
    try:
        records = envelope.open_records(data, head)
    except EnvelopeError as exc:
        raise IntegrityError(f"{path}: {exc}") from None
    assert head.header.lsn is not None
    return SegmentRead(number, path, head.header.lsn, records.payloads, records.torn)


class GroupCommitter:
    """Async face of the journal: `await wait(lsn)` returns once the record is durable.

    Policy "always": a flush starts as soon as someone waits and none is running; records appended meanwhile share
    the next fsync. Policy "interval": flushes run every `interval_ms`; waiters are answered then.
    """

    def __init__(
        self,
        journal: Journal,
        policy: str = "always",
        interval_ms: int = 10,
        on_failure: Callable[[StoreUnavailable], None] | None = None,
    ) -> None:
        if policy not in ("always", "interval"):
            raise ValueError(f"unknown durability policy {policy!r}")
        self.journal = journal
        self.policy = policy
        self.interval = interval_ms / 1000
        self._on_failure = on_failure
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self.fsyncs = 0
        self.observe: Callable[[float], None] | None = None  # seconds per batch write + fsync (metrics)
        self.batch_started: float | None = None  # time.monotonic() of the batch being written now, if any

    async def wait(self, lsn: int) -> None:
        fut = self.future(lsn)
        if fut is not None:
            await fut

    def future(self, lsn: int) -> asyncio.Future[None] | None:
        """`wait` as a future to await: None if record `lsn` is durable already; its exception StoreUnavailable if
        the journal fails first."""
        if lsn <= self.journal.durable_lsn:
            return None
        if self.journal.failure:
            raise StoreUnavailable(f"the journal is degraded ({self.journal.failure})")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, fut))
        if self.policy == "always":
            self.kick()
        elif self._ticker is None:
            self._ticker = asyncio.create_task(self._tick())
        return fut

    def kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def drain(self) -> None:
        """Flush everything appended so far (shutdown, snapshot)."""
        while self.journal.has_pending() or (self._task and not self._task.done()):
            self.kick()
            assert self._task is not None
            await self._task

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.journal.has_pending() or self._waiters:
                self.kick()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.journal.has_pending():
            batch = self.journal.take_pending()
            started = time.perf_counter()
            self.batch_started = time.monotonic()
            try:
                await loop.run_in_executor(self._executor, self.journal.write, batch)
            except StoreUnavailable as exc:
                waiters, self._waiters = self._waiters, []
                for _, fut in waiters:
                    if not fut.done():
                        fut.set_exception(StoreUnavailable(str(exc)))
                if self._on_failure:
                    self._on_failure(exc)
                return
            finally:
                self.batch_started = None
            self.fsyncs += 1
            if self.observe is not None:
                self.observe(time.perf_counter() - started)
            self._release()
        self._release()

    def _release(self) -> None:
        durable = self.journal.durable_lsn
        keep = []
        for lsn, fut in self._waiters:
            if lsn <= durable:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((lsn, fut))
        self._waiters = keep

    def close(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        self._executor.shutdown(wait=True)
