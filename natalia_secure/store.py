"""The sealed session store: the one way sessions reach the disk, and the narrow interface the daemon sees.

    open  -> newest snapshot chain (a base and the deltas after it) + replay of the newer journal records
    add_message / claim / purge -> journal record first (refused while degraded), then memory; returns an lsn
    wait_durable(lsn) / flush() -> the record is sealed and fsynced (group commit)
    snapshot() -> compacts: only sessions changed since the last snapshot are re-encoded and written
    get / phones / summaries -> reads

Memory: a session is held as its compact JSON bytes (cold), as a dict only when new, and messages added to a cold
session wait in a small "tail" list until the next snapshot (or a read) decodes it once and applies them, so
everything loaded costs about the JSON size (plain dicts took 3.8x, DESIGN.md) and a message costs no decode
(bench/store.py row 6: ~19k/s decoding on arrival at 100k sessions, ~47k/s with tails). A snapshot first encodes the hot
sessions back to bytes, then takes a consistent cut on the caller's thread (a dict copy, a journal rotation), and
seals and writes in a worker thread: encrypt_into, os.write and fsync release the GIL, so the loop keeps serving.

Failure: a journal write or fsync that fails marks the store degraded; every change is then refused
(StoreUnavailable: the daemon answers 503 and Meta retries) until a full snapshot of memory succeeds, which makes
durable everything memory holds, on a new journal segment. Old files are never touched in between.

A second backend (PostgreSQL, rows sealed on the client) would implement the same public methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import atomicfile, backups, journal, keyring, sessions, snapshot
from .clock import iso_utc, now_ms
from .envelope import DEFAULT_CHUNK, MAX_RECORD, Header
from .errors import InputError, IntegrityError, NataliaError, NotFoundError, StoreUnavailable
from .lock import StoreLock
from .masterkey import MasterKey
from .snapshot import SnapshotData

DAY_MS = 86_400_000
# Said once, by open(), after every reason a store refuses to open (guarantee 3: name the file, say how to recover).
RECOVER_HINT = (
    "the store refuses to open and changes nothing; run `natalia-secure verify` to see every file's state "
    "and follow README.md, section Recovery"
)


def file_identity(path: str) -> tuple[int, int] | None:
    """Which version of a file this is (atomic replacement makes a new inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass
class StoreOptions:
    max_messages: int = sessions.MAX_MESSAGES
    durability: str = "always"  # or "interval"
    interval_ms: int = 10
    claim_ttl_ms: int = 7 * DAY_MS  # Meta redelivers for up to 7 days
    chunk: int = DEFAULT_CHUNK
    delta_ratio: float = 0.5  # a base is rewritten once the deltas since it add up to half its size...
    max_deltas: int = 64  # ...or there are this many of them (bounds open time)
    lock_wait: float = 0.0


@dataclass
class _Plan:
    """A consistent cut of the store, to be sealed into one snapshot (or backup) file."""

    kind: str  # "snapshot" or "backup"
    path: str
    generation: int
    full: bool
    meta: dict[str, Any]
    claims: dict[str, int]
    sessions: Collection[tuple[str, bytes]] = field(repr=False)
    tombstones: list[str]
    changed: set[str] = field(repr=False)
    new_claims: set[str] = field(repr=False)
    kid: str
    key: bytes = field(repr=False)
    recovering: bool = False  # cut while degraded: on a new journal segment, so success ends the degraded state


class Store:
    def __init__(self, state_dir: str, master: MasterKey, options: StoreOptions, clock: Callable[[], int]) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.master = master
        self.options = options
        self.clock = clock
        self.keyring = keyring.load(self.state_dir, master)
        self._table: dict[str, bytes | sessions.Session] = {}  # bytes: cold (as on disk); dict: hot (changed)
        self._hot: set[str] = set()  # to encode before the next snapshot: hot dicts, and cold bytes with a tail
        # messages added to a cold session, applied when it is next encoded or read: no decode on the request path
        # (role, content, ts, meta); role None: a meta change alone
        self._tails: dict[str, list[dict[str, Any]]] = {}  # the ops themselves, applied in order by _change
        self._changed: set[str] = set()  # changed or removed since the last snapshot: the next delta's content
        self._claims: dict[str, int] = {}  # message id -> claimed at (ms)
        self._new_claims: set[str] = set()  # claimed since the last snapshot: a delta carries only these
        self._claim_lsn: dict[str, int] = {}  # ids claimed by this process -> the lsn that makes the claim durable
        self.lsn = 0
        self.generation = 0  # of the newest snapshot
        self._base_generation: int | None = None
        self._base_bytes = 0
        self._delta_bytes = 0
        self._deltas = 0
        self._next_segment = 1
        self._replayed: list[journal.SegmentRead] = []
        self._journal: journal.Journal | None = None
        self._committer: journal.GroupCommitter | None = None
        self._lock: StoreLock | None = None
        self._snapshot_executor: ThreadPoolExecutor | None = None
        self._snapshot_lock: asyncio.Lock | None = None
        self._backups_lock = threading.Lock()  # pruning (a default-executor thread) and re-sealing never interleave
        self.degraded: str | None = None
        self.last_snapshot_ms: int | None = None
        self.dropped_torn_tails = 0
        self.observe_journal_write: Callable[[float], None] | None = None  # seconds per group commit (metrics)
        self.on_degraded: Callable[[str], None] | None = None  # told once when the store turns degraded

    # ---- opening ----

    @classmethod
    def open(
        cls,
        state_dir: str,
        master: MasterKey,
        options: StoreOptions | None = None,
        *,
        readonly: bool = False,
        clock: Callable[[], int] = now_ms,
    ) -> Store:
        """Open for writing (takes the lock, removes stale temps) or read-only (no lock, writes nothing)."""
        options = options or StoreOptions()
        atomicfile.ensure_private_dir(state_dir, create=False)
        try:
            if readonly:
                return cls._open_readonly(state_dir, master, options, clock)
            lock = StoreLock.acquire(state_dir, options.lock_wait)
            try:
                store = cls(state_dir, master, options, clock)
                store._lock = lock
                store._load()
                store._start_writing()
            except BaseException:
                lock.release()
                raise
            return store
        except FileNotFoundError as exc:  # the lock holder's view: a file the chain names is gone
            raise IntegrityError(f"snapshot chain is broken: {exc.filename} is missing; {RECOVER_HINT}") from None
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}; {RECOVER_HINT}") from None

    @classmethod
    def _open_readonly(cls, state_dir: str, master: MasterKey, options: StoreOptions, clock: Callable[[], int]) -> Store:
        # A running daemon may compact while we read: a file we listed can vanish. The cut we read is still
        # consistent once we read a chain and segments that all exist, so retry from the start. A key rotation
        # may also seal new files under a key newer than the keyring we read: retry if the keyring changed.
        ring_path = os.path.join(state_dir, keyring.FILENAME)
        for attempt in range(20):
            ring_before = file_identity(ring_path)
            store = cls(state_dir, master, options, clock)
            try:
                store._load()
                return store
            except FileNotFoundError:
                time.sleep(0.05 * (attempt + 1))
            except IntegrityError:
                if file_identity(ring_path) == ring_before:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise FileNotFoundError(errno.ENOENT, "a file kept vanishing while the store was read", state_dir)

    def _load(self) -> None:
        keys = self.keyring.usable()
        names = os.listdir(self.state_dir)
        generations = snapshot.list_generations(self.state_dir)
        segments = sorted(int(m.group(1)) for n in names if (m := journal.SEGMENT_NAME.match(n)))
        start_segment = 1
        if generations:
            chain = self._chain(generations[-1], keys)
            for i, gen in enumerate(chain):
                path = os.path.join(self.state_dir, snapshot.snapshot_name(gen))
                header, data = snapshot.read_file(path, keys)
                self._check_snapshot(path, header, data.meta, gen, chain[0], i)
                self._apply_snapshot(data)
                size = os.path.getsize(path)
                if i == 0:
                    self._base_bytes = size
                else:
                    self._delta_bytes += size
                    self._deltas += 1
            self.generation = chain[-1]
            self._base_generation = chain[0]
            self.lsn = data.meta["lsn"]
            start_segment = data.meta["segment"]
        expected = self.lsn + 1
        for number in segments:
            if number < start_segment:
                continue  # covered by the snapshot; removed at the next snapshot
            read = journal.read_segment(os.path.join(self.state_dir, journal.segment_name(number)), number, keys)
            self._replayed.append(read)
            if read.first_lsn != expected:
                raise IntegrityError(
                    f"{read.path}: journal gap: expected lsn {expected}, the segment starts at {read.first_lsn} "
                    f"(records are missing)"
                )
            for offset, payload in enumerate(read.payloads):
                self._replay(payload, expected + offset, read.path)
            expected += len(read.payloads)
            self.dropped_torn_tails += read.torn
        self.lsn = expected - 1
        self._next_segment = max([start_segment - 1, *segments]) + 1
        self._expire_claims()

    def _chain(self, newest: int, keys: dict[str, bytes]) -> list[int]:
        """Generations from the base to `newest`, following each delta's parent."""
        chain = [newest]
        while True:
            path = os.path.join(self.state_dir, snapshot.snapshot_name(chain[-1]))
            if not os.path.exists(path):  # a reader retries (the writer compacted meanwhile); open() reports it otherwise
                raise FileNotFoundError(errno.ENOENT, "missing", path)
            _, meta = snapshot.read_meta(path, keys)
            if meta["parent"] is None:
                return chain[::-1]
            if not isinstance(meta["parent"], int) or meta["parent"] >= chain[-1]:
                raise IntegrityError(f"{path}: impossible parent generation")
            chain.append(meta["parent"])

    def _check_snapshot(self, path: str, header: Header, meta: dict[str, Any], gen: int, base: int, index: int) -> None:
        if header.generation != gen:
            raise IntegrityError(f"{path}: the file says generation {header.generation}, its name says {gen}")
        if index and meta["base"] != base:
            raise IntegrityError(f"{path}: a delta of base {meta['base']} found on base {base}")

    def _apply_snapshot(self, data: snapshot.SnapshotData) -> None:
        self._table.update(data.sessions)
        for phone in data.tombstones:
            self._table.pop(phone, None)
        self._claims.update(data.claims)  # claims only leave by expiry, which open() recomputes

    def _start_writing(self) -> None:
        if os.statvfs(self.state_dir).f_flag & os.ST_RDONLY:  # fail at start, not at the first acknowledgement
            raise StoreUnavailable(f"{self.state_dir}: Read-only file system; the store cannot be opened for writing")
        atomicfile.remove_stale_temps(self.state_dir)
        atomicfile.remove_stale_temps(atomicfile.ensure_subdir(self.state_dir, backups.DIRNAME))
        for read in self._replayed:  # what we replayed (maybe only in the page cache after a SIGKILL) is built upon
            fd = os.open(read.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._journal = self._new_journal(self._next_segment, self.lsn + 1)

    def _new_journal(self, segment: int, first_lsn: int, durable_lsn: int | None = None) -> journal.Journal:
        def primary() -> tuple[str, bytes]:
            key = self.keyring.primary
            return key.id, key.key

        return journal.Journal(self.state_dir, segment, first_lsn, primary, lambda: iso_utc(self.clock()), durable_lsn)

    # ---- applying changes (live and replay share one path) ----

    def _replay(self, payload: bytes, lsn: int, path: str) -> None:
        try:
            op = orjson.loads(payload)
            self._apply(op)
        except (orjson.JSONDecodeError, KeyError, TypeError, InputError) as exc:
            raise IntegrityError(f"{path}: record lsn {lsn} is not a change this version understands ({exc})") from None

    def _apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "message":
            phone = op["phone"]
            value = self._table.get(phone)
            if isinstance(value, bytes):  # cold: no decode on the request path (measured: it halved throughput)
                self._tails.setdefault(phone, []).append(op)
                self._hot.add(phone)
            else:
                if value is None:
                    value = self._table[phone] = sessions.new_session(op["ts"])
                    self._hot.add(phone)
                self._change(value, op)
            self._changed.add(phone)
            if "id" in op:
                self._claims[op["id"]] = op["ts"]
                self._new_claims.add(op["id"])
        elif kind == "meta":
            phone = op["phone"]
            value = self._table.get(phone)
            if isinstance(value, bytes):
                self._tails.setdefault(phone, []).append(op)
                self._hot.add(phone)
            elif value is not None:
                self._change(value, op)
            self._changed.add(phone)
        elif kind == "purge":
            self._table.pop(op["phone"], None)
            self._hot.discard(op["phone"])
            self._tails.pop(op["phone"], None)
            self._changed.add(op["phone"])
        elif kind == "claim":
            self._claims[op["id"]] = op["ts"]
            self._new_claims.add(op["id"])
        else:
            raise KeyError(f"unknown op {kind!r}")

    def _change(self, session: sessions.Session, op: dict[str, Any]) -> None:
        """A message or meta op applied to one session (live, on replay, or from a cold session's tail)."""
        if op["op"] == "message":
            before = op.get("before", 0)
            sessions.append_message(session, op["role"], op["content"], op["ts"], self.options.max_messages, before)
        if "meta" in op:
            sessions.update_meta(session, op["meta"])

    def _current(self, phone: str, consume: bool = False) -> sessions.Session:
        """The session as it stands: the hot dict, or the cold bytes decoded (a copy) with its tail applied."""
        value = self._table[phone]
        if isinstance(value, dict):
            return value
        session = sessions.decode(value)
        tail = self._tails.pop(phone, ()) if consume else self._tails.get(phone, ())
        for op in tail:
            self._change(session, op)
        return session

    def _record(self, op: dict[str, Any]) -> int:
        if self.degraded:
            raise StoreUnavailable(f"the store is degraded ({self.degraded}); changes are refused until it recovers")
        if self._journal is None:
            raise NataliaError("the store is open read-only")
        try:
            payload = orjson.dumps(op)
        except TypeError as exc:  # e.g. a lone surrogate: not representable in UTF-8
            raise InputError(f"a change cannot be encoded: {exc}") from None
        if len(payload) > MAX_RECORD:
            raise InputError(f"a change of {len(payload)} bytes is larger than the journal's {MAX_RECORD}-byte record limit")
        lsn = self._journal.append(payload)
        self._apply(op)
        self.lsn = lsn
        return lsn

    # ---- the change interface ----

    def add_message(
        self,
        phone: str,
        role: str,
        content: str,
        timestamp: int,
        message_id: str | None = None,
        meta: dict[str, Any] | None = None,
        before_last: int = 0,
    ) -> int:
        """Append one message to a phone's session (created if new); returns the record's lsn.

        With `message_id` (WhatsApp's wamid) the message and its dedup claim are one record, durable together or
        not at all; an id already claimed is refused (ask `claim_lsn` first). `meta` changes the session's
        daemon state (sessions.update_meta) in the same record: a reply and its delivery state are one change."""
        sessions.check_phone(phone)
        if role not in sessions.ROLES or not isinstance(content, str) or type(timestamp) is not int:
            raise InputError("a message needs role user|assistant, text content and an integer timestamp")
        op: dict[str, Any] = {"op": "message", "phone": phone, "role": role, "content": content, "ts": timestamp}
        if meta is not None:
            op["meta"] = sessions.check_meta(meta)
        if before_last:
            if type(before_last) is not int or before_last < 0:
                raise InputError("before_last must be a non-negative integer")
            op["before"] = before_last
        if message_id is not None:
            self._check_claimable(message_id)
            op["id"] = message_id
        lsn = self._record(op)
        if message_id is not None:
            self._claim_lsn[message_id] = lsn
        return lsn

    def claim(self, message_id: str, timestamp: int) -> int | None:
        """Claim a message id on its own (dedup of what is not a message): the claim's lsn, or None if the id
        was claimed already (then wait for `claim_lsn(id)` before answering the redelivery)."""
        if message_id in self._claims:
            return None
        self._check_claimable(message_id)
        if type(timestamp) is not int:
            raise InputError("a claim needs an integer timestamp")
        lsn = self._record({"op": "claim", "id": message_id, "ts": timestamp})
        self._claim_lsn[message_id] = lsn
        return lsn

    def set_meta(self, phone: str, meta: dict[str, Any]) -> int | None:
        """Change a session's daemon state (e.g. a reply was sent); None if there is no such session."""
        if phone not in self._table:
            return None
        return self._record({"op": "meta", "phone": phone, "meta": sessions.check_meta(meta)})

    def meta(self, phone: str) -> dict[str, Any]:
        """A copy of the session's daemon state ({} if none or no session)."""
        if phone not in self._table:
            return {}
        state: dict[str, Any] = self.view(phone).get(sessions.META, {})
        return orjson.loads(orjson.dumps(state))  # type: ignore[no-any-return]

    def view(self, phone: str) -> sessions.Session:
        """The live session, for the reply path: the caller must never change it (changes go through records).
        A cold session is decoded once and kept as a dict until the next snapshot re-encodes it: a conversation
        in progress is read several times per reply, and a JSON copy each time cost 20-200 us (bench/webhook.py)."""
        value = self._table.get(phone)
        if value is None:
            raise NotFoundError("no session for that phone")
        if isinstance(value, bytes):
            value = self._current(phone, consume=True)
            self._table[phone] = value
            self._hot.add(phone)
        return value

    def _check_claimable(self, message_id: str) -> None:
        if not isinstance(message_id, str) or not 0 < len(message_id) <= 512:
            raise InputError("a message id must be a string of 1 to 512 characters")
        if message_id in self._claims:
            raise InputError("that message id is already claimed")

    def claim_lsn(self, message_id: str) -> int | None:
        """None if the id was never claimed; else the lsn to wait_durable on before treating a redelivery as done
        (a duplicate that arrives while the first delivery is still being made durable must not be answered first)."""
        if message_id not in self._claims:
            return None
        return self._claim_lsn.get(message_id, 0)

    def is_claimed(self, message_id: str) -> bool:
        return message_id in self._claims

    def purge(self, phone: str) -> int | None:
        if phone not in self._table:
            return None
        return self._record({"op": "purge", "phone": phone})

    def purge_inactive(self, max_idle_ms: int, now: int | None = None) -> list[str]:
        """Remove sessions inactive longer than `max_idle_ms`; returns the phones removed (make them durable after
        with flush(), or wait_durable(store.lsn))."""
        now = self.clock() if now is None else now
        idle = [p for p in list(self._table) if sessions.is_inactive(self._session_view(p), now, max_idle_ms)]
        for phone in idle:
            self.purge(phone)
        return idle

    async def inactive_async(self, max_idle_ms: int, slice_ms: float = 5.0) -> dict[str, int]:
        """The sessions inactive longer than `max_idle_ms` (phone -> last activity), examined in slices between which
        the loop runs (decoding every cold session at once would stall the daemon for a large store)."""
        now = self.clock()
        idle: dict[str, int] = {}
        t0 = time.perf_counter()
        for phone in list(self._table):
            if phone in self._table and sessions.is_inactive(session := self._session_view(phone), now, max_idle_ms):
                idle[phone] = session["lastActivity"]
            if time.perf_counter() - t0 > slice_ms / 1000:
                await asyncio.sleep(0)
                t0 = time.perf_counter()
        return idle

    async def purge_inactive_async(self, max_idle_ms: int, slice_ms: float = 5.0) -> list[str]:
        """purge_inactive for the daemon: sessions are examined in slices between which the loop runs."""
        now = self.clock()
        idle = await self.inactive_async(max_idle_ms, slice_ms)
        # Re-checked now, synchronously: a message may have arrived for one of them meanwhile.
        gone = [p for p in idle if p in self._table and sessions.is_inactive(self._session_view(p), now, max_idle_ms)]
        for phone in gone:
            self.purge(phone)
        return gone

    def import_sessions(self, pairs: list[tuple[str, sessions.Session]]) -> None:
        """Add whole sessions (legacy import) in one atomic step: a new base snapshot holds them or nothing does."""
        self._add_imported(pairs)
        try:
            self.snapshot(full=True)
        except BaseException:
            self._drop_imported(pairs)
            raise

    async def import_sessions_async(self, pairs: list[tuple[str, sessions.Session]]) -> None:
        """import_sessions for the daemon: the base snapshot is sealed and written in a worker thread."""
        self._add_imported(pairs)
        try:
            await self.snapshot_async(full=True)
        except BaseException:
            self._drop_imported(pairs)
            raise

    def _add_imported(self, pairs: list[tuple[str, sessions.Session]]) -> None:
        clash = [p for p, _ in pairs if p in self._table]
        if clash:
            raise InputError(f"{len(clash)} of the imported phones already have a session in the store; nothing imported")
        if self.degraded:
            raise StoreUnavailable(f"the store is degraded ({self.degraded}); nothing imported")
        for phone, session in pairs:
            self._table[phone] = sessions.encode(session)
            self._changed.add(phone)

    def _drop_imported(self, pairs: list[tuple[str, sessions.Session]]) -> None:
        # reported as failed, so it must not be done later by the next snapshot either
        for phone, _ in pairs:
            self._table.pop(phone, None)
            self._changed.discard(phone)

    def forget_claims(self, matches: Callable[[str], bool]) -> int:
        """Drop the dedup claims whose message id `matches` (forget: WhatsApp's ids carry the sender's number).
        Memory only: the next full snapshot is written without them (a crash before it brings them back from the
        journal, and `forget` run again drops them again)."""
        gone = [k for k in self._claims if matches(k)]
        for k in gone:
            del self._claims[k]
            self._new_claims.discard(k)
            self._claim_lsn.pop(k, None)
        return len(gone)

    # ---- durability ----

    def flush(self) -> None:
        """Make every change so far durable (synchronous; the daemon uses wait_durable)."""
        assert self._journal is not None
        try:
            self._journal.flush()
        except StoreUnavailable as exc:
            self._degrade(str(exc))
            raise

    def flush_soon(self) -> None:
        """Start a group commit of what is pending without waiting for it (nobody needs the answer, but the record
        should not sit in memory until the next change: e.g. "this reply part was sent")."""
        if self._journal is not None and self._journal.has_pending() and not self.degraded:
            self._group_committer().kick()

    async def wait_durable(self, lsn: int) -> None:
        """Return once the record `lsn` (and every one before it) is sealed and fsynced; StoreUnavailable if the
        store is degraded and the record is not durable (it may never be)."""
        assert self._journal is not None
        if lsn <= self._journal.durable_lsn:
            return
        if self.degraded:
            raise StoreUnavailable(f"the store is degraded ({self.degraded}); the change is not durable")
        # the committer's future awaited here, not through a coroutine of its own: every webhook and reply part
        # waits here, and each coroutine level is resumed again when the fsync is done
        fut = self._group_committer().future(lsn)
        if fut is not None:
            await fut

    def _group_committer(self) -> journal.GroupCommitter:
        assert self._journal is not None
        if self._committer is None:
            self._committer = journal.GroupCommitter(
                self._journal, self.options.durability, self.options.interval_ms, lambda exc: self._degrade(str(exc))
            )
        self._committer.journal = self._journal
        self._committer.observe = self.observe_journal_write
        return self._committer

    def stalled_s(self) -> float:
        """How long the journal write in progress has been running (0 if none): a hung disk neither fails nor
        finishes, so the daemon counts a long stall as unhealthy (no 200 can be given meanwhile)."""
        started = self._committer.batch_started if self._committer is not None else None
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    def _degrade(self, reason: str) -> None:
        if self.degraded:
            return
        self.degraded = reason
        if self.on_degraded is not None:
            self.on_degraded(reason)

    # ---- snapshots ----

    def _encode_hot(self, limit: int | None = None) -> int:
        """Turn hot sessions back into bytes (all, or at most `limit`); returns how many are left hot."""
        # set.pop resumes where the last pop stopped: list(self._hot)[:limit] (or islice from the start, which
        # walks the slots emptied so far) costs O(hot) per call and made the sliced encoding quadratic
        for _ in range(len(self._hot) if limit is None else min(limit, len(self._hot))):
            phone = self._hot.pop()
            try:
                self._table[phone] = sessions.encode(self._current(phone, consume=True))
            except BaseException:
                self._hot.add(phone)
                raise
        return len(self._hot)

    def _expire_claims(self) -> None:
        horizon = self.clock() - self.options.claim_ttl_ms
        self._claims = {k: t for k, t in self._claims.items() if t >= horizon}
        durable = self._journal.durable_lsn if self._journal else self.lsn
        self._claim_lsn = {k: n for k, n in self._claim_lsn.items() if n > durable and k in self._claims}

    def _cut(self, full: bool) -> _Plan:
        assert self._journal is not None
        self._encode_hot()
        self._expire_claims()
        full = (
            full
            or self._base_generation is None
            or bool(self.degraded)
            or self._deltas >= self.options.max_deltas
            or self._delta_bytes >= self._base_bytes * self.options.delta_ratio
        )
        lsn = self._journal.last_lsn
        if self.degraded:  # the failed journal is abandoned, never trusted again (fsyncgate)
            old = self._journal
            old.close()
            # Records after old.durable_lsn live only in memory until this snapshot commits: never report them durable before.
            self._journal = self._new_journal(old.segment + 1, lsn + 1, durable_lsn=old.durable_lsn)
            if self._committer is not None:  # the old journal's leftover records are in this snapshot: never flush them
                self._committer.journal = self._journal
            segment = self._journal.segment
        else:
            segment = self._journal.rotate()
        changed, self._changed = self._changed, set()
        new_claims, self._new_claims = self._new_claims, set()
        claims = dict(self._claims) if full else {k: self._claims[k] for k in new_claims if k in self._claims}
        table: dict[str, bytes] = self._table  # type: ignore[assignment]  # every value is bytes after _encode_hot
        items: Collection[tuple[str, bytes]]
        if full:
            items, tombstones = dict(table).items(), []  # one copy, no tuple per session: iterated in the worker
        else:
            items = [(p, table[p]) for p in changed if p in table]
            tombstones = [p for p in changed if p not in table]
        meta = {
            "lsn": lsn,
            "segment": segment,
            "base": None if full else self._base_generation,
            "parent": None if full else self.generation,
            "sessions": len(items),
            "tombstones": len(tombstones),
        }
        primary = self.keyring.primary
        generation = self.generation + 1
        path = os.path.join(self.state_dir, snapshot.snapshot_name(generation))
        recovering = bool(self.degraded)
        return _Plan(
            "snapshot",
            path,
            generation,
            full,
            meta,
            claims,
            items,
            tombstones,
            changed,
            new_claims,
            primary.id,
            primary.key,
            recovering,
        )

    def _write(self, plan: _Plan) -> int:
        """Seal and write a plan's file (any thread: it reads only the plan, whose bytes are immutable)."""
        created = iso_utc(self.clock())
        header = Header(kind=plan.kind, kid=plan.kid, generation=plan.generation, created=created, chunk=self.options.chunk)
        pieces = snapshot.payload_pieces(plan.meta, plan.claims, plan.sessions, plan.tombstones)
        try:
            return snapshot.write_file(plan.path, header, plan.key, pieces)
        except FileExistsError:
            raise NataliaError(f"{plan.path} already exists: a backup was taken this second; try again") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {plan.path}: {exc.strerror or exc}; the previous files are intact") from exc

    def _commit(self, plan: _Plan, size: int) -> None:
        self.generation = plan.generation
        if plan.full:
            self._base_generation, self._base_bytes, self._delta_bytes, self._deltas = plan.generation, size, 0, 0
        else:
            self._delta_bytes += size
            self._deltas += 1
        if plan.recovering:  # the snapshot holds everything memory had at the cut: now it is durable
            assert self._journal is not None
            self._journal.durable_lsn = max(self._journal.durable_lsn, plan.meta["lsn"])
            self.degraded = None
        if atomicfile.LEFT_BEHIND:  # temps a fault kept a write from removing: gone once writes work again
            atomicfile.remove_left_behind()
        self.last_snapshot_ms = self.clock()

    def _remove_obsolete(self, base_generation: int, first_segment: int) -> None:
        """Drop snapshots older than the current base and journal segments the newest snapshot covers.
        Any thread: it touches only files no open would read again."""
        removed = False
        for name in os.listdir(self.state_dir):
            m = snapshot.NAME.match(name) or journal.SEGMENT_NAME.match(name)
            if not m:
                continue
            limit = base_generation if name.startswith("snapshot") else first_segment
            if int(m.group(1)) < limit:
                os.unlink(os.path.join(self.state_dir, name))
                removed = True
        if removed:
            atomicfile.fsync_dir(self.state_dir)

    def _abort(self, plan: _Plan) -> None:
        self._changed |= plan.changed  # the next snapshot carries them (memory holds their newest state)
        self._new_claims |= plan.new_claims

    def snapshot(self, full: bool = False) -> int:
        """Write a snapshot now (synchronously); returns its generation. `full` forces a base."""
        plan = self._cut(full)
        try:
            size = self._write(plan)
        except BaseException:
            self._abort(plan)
            raise
        self._commit(plan, size)
        assert self._journal is not None
        if self._journal.durable_lsn < plan.meta["lsn"]:
            try:
                self.flush()
            except StoreUnavailable:
                return plan.generation  # the snapshot stands; old files stay until a later one can drop them
        self._remove_obsolete(*self._obsolete_limits(plan))
        return plan.generation

    def _obsolete_limits(self, plan: _Plan) -> tuple[int, int]:
        assert self._base_generation is not None
        return self._base_generation, plan.meta["segment"]

    async def snapshot_async(self, full: bool = False) -> int:
        """The daemon's snapshot: hot sessions are encoded in slices between which the loop runs, the cut is
        short, and sealing and writing happen in a worker thread."""
        async with self._background() as executor:
            plan = self._cut(full)
            try:
                size = await asyncio.get_running_loop().run_in_executor(executor, self._write, plan)
            except BaseException:
                self._abort(plan)
                raise
            self._commit(plan, size)
            # Old segments go only once every record before the cut is written: the journal thread may still be
            # appending them, and must never find its segment unlinked under it.
            try:
                await self.wait_durable(plan.meta["lsn"])
            except StoreUnavailable:
                return plan.generation
            # unlinking a large base frees many extents: not on the loop
            await asyncio.get_running_loop().run_in_executor(executor, self._remove_obsolete, *self._obsolete_limits(plan))
            return plan.generation

    @contextlib.asynccontextmanager
    async def _background(self, slice_ms: float = 5.0) -> AsyncIterator[ThreadPoolExecutor]:
        """One snapshot or backup at a time, after encoding the hot sessions in slices that keep the loop free."""
        if self._snapshot_lock is None or self._snapshot_executor is None:
            self._snapshot_lock = asyncio.Lock()
            self._snapshot_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        async with self._snapshot_lock:
            while self._hot:
                t0 = time.perf_counter()
                while self._hot and time.perf_counter() - t0 < slice_ms / 1000:
                    self._encode_hot(8)  # a 250-message session takes ~0.3 ms to re-encode: stay near the slice
                await asyncio.sleep(0)
            yield self._snapshot_executor

    # ---- backups ----

    def _backup_name_wait_s(self) -> float:
        """Backups are named by the second: one already taken this second (the daemon's own, then an operator's
        `backup`) means waiting for the next second, not failing. 0 when the name is free."""
        now = self.clock()
        taken = os.path.exists(os.path.join(self.state_dir, backups.DIRNAME, backups.backup_name(now, self.generation)))
        return (1000 - now % 1000) / 1000 if taken else 0.0

    def _backup_plan(self) -> _Plan:
        self._encode_hot()
        table: dict[str, bytes] = self._table  # type: ignore[assignment]  # every value is bytes after _encode_hot
        items = list(table.items())
        meta = {"lsn": self.lsn, "segment": None, "base": None, "parent": None, "sessions": len(items), "tombstones": 0}
        primary = self.keyring.primary
        path = os.path.join(self.state_dir, backups.DIRNAME, backups.backup_name(self.clock(), self.generation))
        claims = dict(self._claims)
        return _Plan("backup", path, self.generation, True, meta, claims, items, [], set(), set(), primary.id, primary.key)

    def backup(self) -> str:
        """Seal a self-contained copy of the current state into backups/; returns its path. Only durable state is
        copied: the lsn a backup names must never be reused by a record that a crash made vanish."""
        if self._journal is not None:
            self.flush()
        time.sleep(self._backup_name_wait_s())
        plan = self._backup_plan()
        self._write(plan)
        return plan.path

    async def backup_async(self) -> str:
        """The daemon's backup: like snapshot_async, sealed and written in a worker thread (once its cut is durable)."""
        async with self._background() as executor:
            await asyncio.sleep(self._backup_name_wait_s())
            plan = self._backup_plan()
            await self.wait_durable(plan.meta["lsn"])
            await asyncio.get_running_loop().run_in_executor(executor, self._write, plan)
            return plan.path

    def list_backups(self) -> list[backups.BackupInfo]:
        return backups.scan(os.path.join(self.state_dir, backups.DIRNAME))

    def newest_good_backup(self) -> backups.BackupInfo | None:
        """The newest backup that authenticates and parses (newest first: usually one read)."""
        keys = self.keyring.usable()
        directory = os.path.join(self.state_dir, backups.DIRNAME)
        for info in reversed(self.list_backups()):
            try:
                header, _ = snapshot.read_file(os.path.join(directory, info.name), keys, "backup")
            except (NataliaError, OSError):
                continue
            if header.generation == info.generation:
                return info
        return None

    def prune_backups(self, policy: backups.Retention, dry_run: bool = False) -> backups.PruneResult:
        """Apply the retention policy; the newest backup that authenticates is always kept."""
        directory = os.path.join(self.state_dir, backups.DIRNAME)
        with self._backups_lock:
            good = self.newest_good_backup()
            result = backups.plan_prune(self.list_backups(), policy, protect=good.name if good else None)
            if not dry_run:
                for info in result.remove:
                    os.unlink(os.path.join(directory, info.name))
                if result.remove:
                    atomicfile.fsync_dir(directory)
        return result

    async def reseal_backups_async(
        self, forget: str | None = None, forget_claim: Callable[[str], bool] | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """Re-seal under the primary key every backup sealed by another key, or holding `forget`'s session or a
        claim `forget_claim` matches (written without them). Same name, generation and creation time: a backup
        keeps its place in the retention policy. Each file is replaced atomically, so a crash leaves every backup
        whole under one key or the other. Returns (names rewritten, {name: why it could not be} for backups that
        do not open: they are left as they are)."""
        async with self._background() as executor:
            primary = self.keyring.primary
            keys = self.keyring.usable()

            def work() -> tuple[list[str], dict[str, str]]:
                rewritten: list[str] = []
                failed: dict[str, str] = {}
                with self._backups_lock:
                    for info in self.list_backups():
                        try:
                            if self._reseal_backup(info.name, keys, primary, forget, forget_claim):
                                rewritten.append(info.name)
                        except FileNotFoundError:
                            continue
                        except IntegrityError as exc:
                            failed[info.name] = str(exc)
                return rewritten, failed

            return await asyncio.get_running_loop().run_in_executor(executor, work)

    def _reseal_backup(
        self,
        name: str,
        keys: dict[str, bytes],
        primary: keyring.DataKey,
        forget: str | None,
        forget_claim: Callable[[str], bool] | None,
    ) -> bool:
        path = os.path.join(self.state_dir, backups.DIRNAME, name)
        header, data = snapshot.read_file(path, keys, "backup")
        claims = {k: t for k, t in data.claims.items() if forget_claim is None or not forget_claim(k)}
        if header.kid == primary.id and forget not in data.sessions and len(claims) == len(data.claims):
            return False
        items = [(p, body) for p, body in data.sessions.items() if p != forget]
        meta = {**data.meta, "sessions": len(items)}
        new = Header(kind="backup", kid=primary.id, generation=header.generation, created=header.created, chunk=header.chunk)
        try:
            snapshot.write_file(path, new, primary.key, snapshot.payload_pieces(meta, claims, items, []), replace=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot rewrite {path}: {exc.strerror or exc}; the backup is intact") from exc
        return True

    # ---- rebuilding (recover.py): a Store that never touches a file, fed snapshots and records ----

    def apply_snapshot(self, data: SnapshotData) -> None:
        """Apply a snapshot's content, exactly as open does (a base or delta, in chain order)."""
        self._apply_snapshot(data)

    def replay(self, payload: bytes, lsn: int, path: str) -> None:
        """Apply one journal record, exactly as open does; IntegrityError names the record if it is not a change."""
        self._replay(payload, lsn, path)

    def contents(self) -> tuple[dict[str, bytes], dict[str, int]]:
        """Every session as its encoded bytes, and the claims: what a base snapshot of this state would hold."""
        self._encode_hot()
        table: dict[str, bytes] = self._table  # type: ignore[assignment]  # every value is bytes after _encode_hot
        return table, self._claims

    # ---- reads ----

    def _session_view(self, phone: str) -> sessions.Session:
        return self._current(phone)

    def get(self, phone: str) -> sessions.Session:
        """A copy of one session; NotFoundError if there is none."""
        value = self._table.get(phone)
        if value is None:
            raise NotFoundError("no session for that phone")
        if phone in self._tails:
            return self._current(phone)  # a fresh decode: already a copy
        return sessions.decode(value if isinstance(value, bytes) else sessions.encode(value))

    def phones(self) -> list[str]:
        return list(self._table)

    def items(self) -> Iterator[tuple[str, sessions.Session]]:
        for phone in list(self._table):
            if phone in self._table:
                yield phone, self.get(phone)

    @property
    def replayed(self) -> list[journal.SegmentRead]:
        """The journal segments replayed at open (after the newest snapshot)."""
        return list(self._replayed)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, phone: object) -> bool:
        return phone in self._table

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self._table),
            "lsn": self.lsn,
            "generation": self.generation,
            "base_generation": self._base_generation,
            "deltas": self._deltas,
            "claims": len(self._claims),
            "degraded": self.degraded,
            "dropped_torn_tails": self.dropped_torn_tails,
        }

    # ---- keys ----

    def save_keyring(self, ring: keyring.Keyring, master: MasterKey | None = None) -> keyring.Keyring:
        """Durably replace keyring.enc with `ring`, sealed by `master` (default: the current master key), and use
        it from now on: files sealed afterwards use its primary key (the journal from its next segment)."""
        master = master or self.master
        if self._journal is None:
            raise NataliaError("the store is open read-only")
        saved = keyring.save(self.state_dir, ring, master, self.clock())
        self.master, self.keyring = master, saved
        return saved

    def reload_keyring(self, master: MasterKey | None = None) -> None:
        """Re-read keyring.enc (after a rotation, or with a new master key): files sealed from now on use its
        primary key, and the journal picks it up at its next segment. The old keyring stays in use on failure."""
        master = master or self.master
        ring = keyring.load(self.state_dir, master)
        self.master, self.keyring = master, ring

    # ---- closing ----

    async def aclose(self) -> None:
        """Drain the journal (everything appended becomes durable), then close."""
        if self._committer is not None and not self.degraded:
            await self._committer.drain()
        self.close()

    def close(self) -> None:
        try:
            if self._committer is not None:
                self._committer.close()  # batches already handed to the journal thread are written first
            if self._journal is not None and not self.degraded and self._journal.has_pending():
                self.flush()
        finally:
            if self._snapshot_executor is not None:
                self._snapshot_executor.shutdown(wait=True)
            if self._journal is not None:
                self._journal.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
