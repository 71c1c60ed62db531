"""The store's interface: changes survive flush and reopen, read-only opens, claims, import, backups, file modes,
tampering refused at open, and a model test (hypothesis) against a plain dict."""

from __future__ import annotations

import copy
import errno
import os
import shutil
import stat
import tempfile
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from natalia_secure import atomicfile, envelope, keyring, masterkey, snapshot
from natalia_secure.backups import Retention
from natalia_secure.clock import iso_utc
from natalia_secure.errors import InputError, IntegrityError, KeyMaterialError, NataliaError, StoreUnavailable
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import DAY_MS, Store, StoreOptions
from natalia_secure.verify import verify_state_dir

from .conftest import flipped_bytes, tree_bytes

OPTIONS = StoreOptions(chunk=4096)
T0 = 1_764_065_730_000  # 2025-11-25T10:15:30Z


def ms(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() * 1000)


class Clock:
    """A clock the test moves: Store.open(..., clock=clock)."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def contents(store: Store) -> dict[str, Any]:
    return {phone: store.get(phone) for phone in store.phones()}


def tree(path: str) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under `path` (itself included): mode, size, mtime and inode, to prove nothing was written."""
    found = {}
    for root, dirs, names in os.walk(path):
        for name in [".", *dirs, *names]:
            p = os.path.normpath(os.path.join(root, name))
            st_ = os.lstat(p)
            found[os.path.relpath(p, path)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_ino)
    return found


def keys_of(state_dir: str, master: MasterKey) -> dict[str, bytes]:
    return keyring.load(state_dir, master).usable()


def fill(store: Store, phones: int, messages: int, size: int = 100, ts: int = T0) -> None:
    for p in range(phones):
        for m in range(messages):
            store.add_message(f"+3460000{p:04d}", "user" if m % 2 else "assistant", f"{p}/{m} " + "x" * size, ts + m)


def test_changes_survive_flush_and_reopen(state_dir: str, master: MasterKey) -> None:
    """add_message, claim, purge and purge_inactive, once flushed, are what a read-only open and a reopen see:
    the same session for every phone and the same claims."""
    clock = Clock()
    store = Store.open(state_dir, master, OPTIONS, clock=clock)
    fill(store, 5, 3)
    store.add_message("+34600000001", "user", '¿Qué tal? 👋 "quotes" \\ and\nnewline', T0 + 10)
    store.add_message("+44000000000", "user", "old", T0 - 400 * DAY_MS)
    store.add_message("+44000000001", "assistant", "old too", T0 - 366 * DAY_MS)
    assert store.claim("wamid.1", T0) == store.lsn and store.claim("wamid.2", T0) is not None
    assert store.claim("wamid.1", T0) is None, "a second claim of the same id is refused"
    assert store.purge("+34600000002") is not None and store.purge("+34600000002") is None
    assert sorted(store.purge_inactive(365 * DAY_MS)) == ["+44000000000", "+44000000001"]
    store.flush()
    expected = contents(store)
    assert len(expected) == 4 and "+34600000002" not in expected
    # durable now, while the writer is still open
    assert contents(Store.open(state_dir, master, OPTIONS, readonly=True)) == expected
    store.close()
    reopened = Store.open(state_dir, master, OPTIONS, clock=clock)
    assert contents(reopened) == expected
    assert reopened.is_claimed("wamid.1") and reopened.is_claimed("wamid.2") and not reopened.is_claimed("wamid.3")
    assert reopened.claim("wamid.2", T0) is None
    reopened.close()


def test_a_message_with_its_id_is_one_record_claimed_with_it(state_dir: str, master: MasterKey) -> None:
    """add_message(message_id=...) makes the message and its claim one record: claim_lsn names it until it is
    durable, a second message with the id is refused, and after a reopen both are there."""
    store = Store.open(state_dir, master, OPTIONS, clock=Clock())  # claims expire claim_ttl_ms after their timestamp
    lsn = store.add_message("+34600000001", "user", "hola", T0, message_id="wamid.A")
    assert store.lsn == lsn and store.is_claimed("wamid.A") and store.claim_lsn("wamid.A") == lsn
    assert store.claim_lsn("wamid.never") is None
    with pytest.raises(InputError, match="already claimed"):
        store.add_message("+34600000001", "user", "hola again", T0, message_id="wamid.A")
    assert store.claim("wamid.A", T0) is None and store.lsn == lsn, "a refused id appends nothing"
    store.flush()
    store.close()
    reopened = Store.open(state_dir, master, OPTIONS, clock=Clock())
    assert reopened.is_claimed("wamid.A") and [m["content"] for m in reopened.get("+34600000001")["messages"]] == ["hola"]
    claim_lsn = reopened.claim_lsn("wamid.A")
    assert claim_lsn is not None and claim_lsn <= lsn, "a redelivery after a restart waits on nothing not yet durable"
    reopened.close()


def test_readonly_open_sees_flushed_state_and_writes_nothing(state_dir: str, master: MasterKey) -> None:
    """A read-only open works while a writer holds the lock, sees exactly what was flushed, and changes nothing in the
    directory (listing, sizes, mtimes), not even a stale temp or a torn tail a writing open would deal with."""
    writer = Store.open(state_dir, master, OPTIONS)
    writer.add_message("+34600000001", "user", "flushed", T0)
    writer.flush()
    writer.snapshot()
    writer.add_message("+34600000001", "user", "flushed 2", T0 + 1)
    writer.flush()
    writer.add_message("+34600000001", "user", "not flushed", T0 + 2)
    stale = os.path.join(state_dir, ".snapshot.g000009.enc.0123456789ab.tmp")
    with open(stale, "wb") as f:
        f.write(b"half a snapshot")
    before = tree(state_dir)
    reader = Store.open(state_dir, master, OPTIONS, readonly=True)
    assert [m["content"] for m in reader.get("+34600000001")["messages"]] == ["flushed", "flushed 2"]
    with pytest.raises(NataliaError, match="read-only"):
        reader.add_message("+34600000001", "user", "x", T0)
    reader.close()
    assert tree(state_dir) == before
    writer.flush()
    assert len(Store.open(state_dir, master, readonly=True).get("+34600000001")["messages"]) == 3
    writer.close()
    Store.open(state_dir, master, OPTIONS).close()
    assert not os.path.exists(stale), "a writing open removes stale temps"


def test_max_messages_truncation_survives_replay(state_dir: str, master: MasterKey) -> None:
    """Beyond max_messages=250 the oldest leave first, and a reopen (snapshot plus journal replay) agrees."""
    store = Store.open(state_dir, master, OPTIONS)
    for n in range(1, 301):
        store.add_message("+34600000001", "user", str(n), T0 + n)
        if n == 120:
            store.snapshot()
    expected = store.get("+34600000001")
    assert [int(m["content"]) for m in expected["messages"]] == list(range(51, 301))
    assert expected["firstInteraction"] == T0 + 1 and expected["lastActivity"] == T0 + 300
    store.close()
    assert Store.open(state_dir, master, OPTIONS, readonly=True).get("+34600000001") == expected


def test_claims_expire_after_the_ttl(state_dir: str, master: MasterKey) -> None:
    """Claims older than claim_ttl_ms are dropped at the next snapshot and at open; younger ones are kept."""
    clock = Clock(10_000)
    options = StoreOptions(chunk=4096, claim_ttl_ms=1_000)
    store = Store.open(state_dir, master, options, clock=clock)
    store.claim("old", 10_000)
    store.claim("young", 10_600)
    store.flush()
    clock.now = 11_100
    generation = store.snapshot()
    _, data = snapshot.read_file(os.path.join(state_dir, snapshot.snapshot_name(generation)), keys_of(state_dir, master))
    assert data.claims == {"young": 10_600}
    assert not store.is_claimed("old") and store.claim("old", 11_100) is not None, "an expired id may be claimed again"
    store.close()
    reopened = Store.open(state_dir, master, options, readonly=True, clock=Clock(11_599))
    assert reopened.is_claimed("young") and reopened.is_claimed("old")
    later = Store.open(state_dir, master, options, readonly=True, clock=Clock(12_101))
    assert not later.is_claimed("young") and not later.is_claimed("old")


def test_import_sessions_is_atomic_and_refuses_phones_present(state_dir: str, master: MasterKey) -> None:
    """import_sessions writes one new base holding the sessions; with any phone already present nothing is imported."""
    store = Store.open(state_dir, master, OPTIONS)
    store.add_message("+34600000001", "user", "existing", T0)
    imported = [
        (
            "+34600000002",
            {"messages": [{"role": "user", "content": "hola", "timestamp": T0}], "lastActivity": T0, "firstInteraction": T0},
        ),
        ("+34600000003", {"messages": [], "lastActivity": T0, "firstInteraction": T0, "legacyField": [1, 2]}),
    ]
    before = tree_bytes(state_dir)
    with pytest.raises(InputError, match="1 of the imported phones"):
        store.import_sessions([*imported, ("+34600000001", imported[1][1])])
    assert store.phones() == ["+34600000001"] and tree_bytes(state_dir) == before
    store.import_sessions(imported)
    assert store.generation == 1 and store.stats()["base_generation"] == 1
    expected = contents(store)
    store.close()
    assert contents(Store.open(state_dir, master, OPTIONS, readonly=True)) == expected
    assert expected["+34600000003"]["legacyField"] == [1, 2]


def test_a_failed_import_leaves_nothing_behind(state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import whose snapshot cannot be written leaves no trace, in memory or after a later snapshot."""
    store = Store.open(state_dir, master, OPTIONS)

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(snapshot, "write_file", full)
        with pytest.raises(StoreUnavailable, match="No space left"):
            store.import_sessions([("+34600000002", {"messages": [], "lastActivity": T0, "firstInteraction": T0})])
    store.add_message("+34600000001", "user", "later", T0)
    store.snapshot()
    store.close()
    assert "+34600000002" not in Store.open(state_dir, master, OPTIONS, readonly=True)


def test_backup_is_named_sealed_and_opens_to_the_same_sessions(state_dir: str, master: MasterKey) -> None:
    """backup() writes backups/sessions.<UTC>.g<generation>.enc, 0600, of kind backup, holding the current sessions."""
    clock = Clock(ms("2026-11-25T10:15:30Z"))
    store = Store.open(state_dir, master, OPTIONS, clock=clock)
    fill(store, 4, 3)
    store.snapshot()
    store.add_message("+34600000001", "user", "after the snapshot", T0 + 9)
    path = store.backup()
    assert path == os.path.join(state_dir, "backups", "sessions.20261125T101530Z.g000001.enc")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        header, _ = envelope.parse_prefix(f.read(8192))
    assert header.kind == "backup" and header.generation == 1 and header.created == "2026-11-25T10:15:30Z"
    _, data = snapshot.read_file(path, keys_of(state_dir, master), kind="backup")
    assert {p: orjson_loads(b) for p, b in data.sessions.items()} == contents(store)
    assert [b.name for b in store.list_backups()] == [os.path.basename(path)]
    with pytest.raises(NataliaError, match="already exists"):
        store.backup()  # same second, same generation: the name is taken, the first backup is kept
    store.close()


def orjson_loads(data: bytes) -> Any:
    import orjson

    return orjson.loads(data)


def test_prune_backups_dry_run_removes_nothing(state_dir: str, master: MasterKey) -> None:
    """prune_backups(dry_run=True) lists what it would remove and removes nothing; the real run removes exactly that."""
    clock = Clock(ms("2026-11-25T00:00:00Z"))
    store = Store.open(state_dir, master, OPTIONS, clock=clock)
    store.add_message("+34600000001", "user", "x", T0)
    for _ in range(6):
        store.backup()
        clock.now += 3_600_000
    policy = Retention(last=2, hourly=0, daily=0, weekly=0, monthly=0)
    before = tree_bytes(state_dir)
    plan = store.prune_backups(policy, dry_run=True)
    assert len(plan.remove) == 4 and len(plan.keep) == 2
    assert tree_bytes(state_dir) == before
    done = store.prune_backups(policy)
    assert [b.name for b in done.remove] == [b.name for b in plan.remove]
    assert sorted(os.listdir(os.path.join(state_dir, "backups"))) == sorted(plan.keep)
    store.close()


def test_every_file_is_0600_in_0700_directories_whatever_the_umask(tmp_path, master: MasterKey) -> None:  # type: ignore[no-untyped-def]
    """With umask 0, every file the store writes (keyring, segments, snapshots, backups) is 0600 and the state
    directory and backups/ are 0700."""
    path = str(tmp_path / "state")
    old = os.umask(0)
    try:
        atomicfile.ensure_private_dir(path, create=True)
        keyring.save(path, keyring.Keyring.new(iso_utc(T0)), master, T0)
        store = Store.open(path, master, OPTIONS)
        fill(store, 3, 2)
        store.flush()
        store.snapshot()
        store.add_message("+34600000001", "user", "delta", T0)
        store.snapshot()
        store.add_message("+34600000001", "user", "journal", T0)
        store.flush()
        store.backup()
        store.close()
    finally:
        os.umask(old)
    seen = set()
    for root, _, names in os.walk(path):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o600, name
            seen.add(name.split(".")[0])
    assert seen == {"keyring", "journal", "snapshot", "sessions"}
    assert os.path.isdir(os.path.join(path, "backups"))


# ---- tampering, at the store's level ----


def small_store(state_dir: str, master: MasterKey) -> dict[str, str]:
    """A store with one file of each kind: keyring, base, delta, a live journal segment and a backup."""
    store = Store.open(state_dir, master, StoreOptions(chunk=64))
    store.add_message("+34600000001", "user", "base", T0)
    store.add_message("+34600000002", "user", "base too", T0)
    store.claim("wamid.1", T0)
    store.flush()  # (a record still pending at a snapshot would bring its covered segment back: test_snapshot.py)
    store.snapshot()
    store.add_message("+34600000001", "assistant", "delta", T0 + 1)
    store.flush()
    store.snapshot()
    backup = store.backup()
    store.add_message("+34600000002", "assistant", "journal", T0 + 2)
    store.close()
    names = sorted(os.listdir(state_dir))
    assert names == ["backups", "journal.000003.enc", "keyring.enc", "snapshot.g000001.enc", "snapshot.g000002.enc"]
    return {
        "keyring": "keyring.enc",
        "base": "snapshot.g000001.enc",
        "delta": "snapshot.g000002.enc",
        "segment": "journal.000003.enc",
        "backup": os.path.relpath(backup, state_dir),
    }


@pytest.mark.parametrize("kind", ["keyring", "base", "delta", "segment"])
def test_flipping_any_byte_of_a_store_file_refuses_the_open_and_keeps_the_file(
    state_dir: str, master: MasterKey, kind: str
) -> None:
    """A flipped bit anywhere in the keyring, a snapshot base or delta, or a journal segment makes a writing open raise
    IntegrityError or KeyMaterialError, and the file is byte-identical afterwards (never repaired or deleted)."""
    name = small_store(state_dir, master)[kind]
    path = os.path.join(state_dir, name)
    expected = contents(Store.open(state_dir, master, readonly=True))
    for i, bad in flipped_bytes(path):
        before = tree(state_dir)
        with pytest.raises((IntegrityError, KeyMaterialError)) as info:
            Store.open(state_dir, master, StoreOptions(chunk=64))
        assert tree(state_dir) == before, f"byte {i}: the open changed the directory"
        with open(path, "rb") as f:
            assert f.read() == bad
        if kind != "keyring":
            assert name in str(info.value), f"byte {i}: the error does not name the file: {info.value}"
    assert contents(Store.open(state_dir, master, StoreOptions(chunk=64))) == expected


def test_a_tampered_backup_is_reported_and_left_alone(state_dir: str, master: MasterKey) -> None:
    """Store.open never reads backups; a flipped bit in one is reported by verify and refused by the backup reader,
    and neither an open nor verify changes or removes it."""
    name = small_store(state_dir, master)["backup"]
    path = os.path.join(state_dir, name)
    with open(path, "rb") as f:
        good = f.read()
    keys = keys_of(state_dir, master)
    for i in range(0, len(good), 7):
        bad = bytearray(good)
        bad[i] ^= 0x80
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(IntegrityError):
            snapshot.read_file(path, keys, kind="backup")
        report = verify_state_dir(state_dir, master)
        assert [f.file for f in report.files if not f.ok] == [name]
        Store.open(state_dir, master, StoreOptions(chunk=64)).close()
        with open(path, "rb") as f:
            assert f.read() == bad


# ---- model test ----

PHONES = ["+1000", "+2000", "+3000", "+4000"]
CLAIM_IDS = [f"wamid.{i}" for i in range(6)]
MODEL_MAX = 4


class StoreVersusDict(RuleBasedStateMachine):
    """Random add/purge/claim/flush/snapshot/reopen sequences: the store always equals a plain dict model, a read-only
    open equals the model as of the last flush or snapshot, and a reopen equals the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="natalia-model-")
        self.master = masterkey.create_key_file(os.path.join(self.tmp, "master.key"))
        self.dir = os.path.join(self.tmp, "state")
        os.mkdir(self.dir, 0o700)
        keyring.save(self.dir, keyring.Keyring.new(iso_utc(T0)), self.master, T0)
        # claims ride on message timestamps here (0..10^6 ms): a TTL beyond them keeps expiry out of this model
        self.options = StoreOptions(chunk=64, max_messages=MODEL_MAX, max_deltas=3, delta_ratio=0.6, claim_ttl_ms=10 * T0)
        self.store = Store.open(self.dir, self.master, self.options, clock=Clock())
        self.model: dict[str, dict[str, Any]] = {}
        self.claims: set[str] = set()
        self.durable: tuple[dict[str, dict[str, Any]], set[str]] = ({}, set())

    def _mark_durable(self) -> None:
        self.durable = (copy.deepcopy(self.model), set(self.claims))

    @rule(
        phone=st.sampled_from(PHONES),
        role=st.sampled_from(["user", "assistant"]),
        content=st.text(max_size=12),
        ts=st.integers(0, 10**6),
    )
    def add(self, phone: str, role: str, content: str, ts: int) -> None:
        self.store.add_message(phone, role, content, ts)
        self._model_add(phone, role, content, ts)

    def _model_add(self, phone: str, role: str, content: str, ts: int) -> None:
        session = self.model.setdefault(phone, {"messages": [], "lastActivity": ts, "firstInteraction": ts})
        messages = [*session["messages"], {"role": role, "content": content, "timestamp": ts}]
        if len(messages) > MODEL_MAX:  # the oldest leave, and are counted (the history's cache alignment, claude.py)
            session.setdefault("natalia", {"dropped": 0})["dropped"] += len(messages) - MODEL_MAX
        session["messages"] = messages[-MODEL_MAX:]
        session["lastActivity"] = max(session["lastActivity"], ts)

    @rule(phone=st.sampled_from(PHONES), message_id=st.sampled_from(CLAIM_IDS), ts=st.integers(0, 10**6))
    def add_with_id(self, phone: str, message_id: str, ts: int) -> None:
        if message_id in self.claims:
            with pytest.raises(InputError):
                self.store.add_message(phone, "user", message_id, ts, message_id=message_id)
            return
        self.store.add_message(phone, "user", message_id, ts, message_id=message_id)
        self.claims.add(message_id)
        self._model_add(phone, "user", message_id, ts)

    @rule(phone=st.sampled_from(PHONES))
    def purge(self, phone: str) -> None:
        assert (self.store.purge(phone) is not None) == (phone in self.model)
        self.model.pop(phone, None)

    @rule(idle=st.integers(0, 10**6), now=st.integers(0, 2 * 10**6))
    def purge_inactive(self, idle: int, now: int) -> None:
        gone = sorted(p for p, s in self.model.items() if now - s["lastActivity"] > idle)
        assert sorted(self.store.purge_inactive(idle, now)) == gone
        for phone in gone:
            del self.model[phone]

    @rule(message_id=st.sampled_from(CLAIM_IDS))
    def claim(self, message_id: str) -> None:
        assert (self.store.claim(message_id, T0) is None) == (message_id in self.claims)
        self.claims.add(message_id)

    @rule()
    def flush(self) -> None:
        self.store.flush()
        self._mark_durable()

    @rule(full=st.booleans())
    def snapshot(self, full: bool) -> None:
        self.store.snapshot(full=full)
        self._mark_durable()

    @rule()
    def peek_readonly(self) -> None:
        reader = Store.open(self.dir, self.master, self.options, readonly=True, clock=Clock())
        model, claims = self.durable
        assert contents(reader) == model
        assert {c for c in CLAIM_IDS if reader.is_claimed(c)} == claims

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store.open(self.dir, self.master, self.options, clock=Clock())
        self._mark_durable()
        assert contents(self.store) == self.model
        assert {c for c in CLAIM_IDS if self.store.is_claimed(c)} == self.claims

    @invariant()
    def memory_equals_the_model(self) -> None:
        assert contents(self.store) == self.model

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp)


StoreVersusDict.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_store_equals_a_dict_model = StoreVersusDict.TestCase


def test_messages_to_a_cold_session_are_seen_at_once_and_trimmed(state_dir: str, master: MasterKey) -> None:
    """Messages added to a session held as bytes (after a snapshot) are read back at once, trimmed to max_messages
    in order, dropped by a purge, and written whole by the next snapshot."""
    store = Store.open(state_dir, master, StoreOptions(chunk=4096, max_messages=3))
    for i in range(2):
        store.add_message("+34600000001", "user", f"old{i}", T0 + i)
        store.add_message("+34600000002", "user", f"old{i}", T0 + i)
    store.snapshot(full=True)  # both sessions are cold bytes now
    for i in range(3):
        store.add_message("+34600000001", "assistant", f"new{i}", T0 + 10 + i)
    store.add_message("+34600000002", "user", "gone", T0 + 20)
    store.purge("+34600000002")
    shown = store.get("+34600000001")
    assert [m["content"] for m in shown["messages"]] == ["new0", "new1", "new2"]
    assert shown["lastActivity"] == T0 + 12 and shown["firstInteraction"] == T0
    assert "+34600000002" not in store
    store.flush()
    store.snapshot()
    store.close()
    reopened = Store.open(state_dir, master, StoreOptions(chunk=4096, max_messages=3), readonly=True)
    assert reopened.get("+34600000001") == shown and reopened.phones() == ["+34600000001"]


def test_after_recovery_the_abandoned_journal_is_never_flushed_again(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write fails while a second record waits; the recovery snapshot holds both. Closing afterwards flushes only
    the new journal: no second degradation, and both messages are there after a reopen."""
    import asyncio
    import time

    from natalia_secure import journal

    real = journal.Journal._write
    failures = [OSError(errno.EIO, "Input/output error")]

    def write(self: journal.Journal, batch: journal.Batch) -> None:
        if failures:
            time.sleep(0.05)  # long enough for the second record to be appended meanwhile
            raise failures.pop()
        real(self, batch)

    monkeypatch.setattr(journal.Journal, "_write", write)

    async def go() -> list[str]:
        store = Store.open(state_dir, master)
        degradations: list[str] = []
        store.on_degraded = degradations.append
        first = store.add_message("34600000001", "user", "a", store.clock(), message_id="w1")
        waiting = asyncio.ensure_future(store.wait_durable(first))
        await asyncio.sleep(0.01)
        store.add_message("34600000002", "user", "b", store.clock(), message_id="w2")  # pending while batch 1 fails
        with pytest.raises(StoreUnavailable):
            await waiting
        await store.snapshot_async(full=True)
        assert store.degraded is None
        await store.aclose()
        return degradations

    assert len(asyncio.run(go())) == 1
    with Store.open(state_dir, master, readonly=True) as again:
        assert again.is_claimed("w1") and again.is_claimed("w2") and len(again) == 2


def test_a_journal_write_that_hangs_shows_as_a_stall(state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung fsync neither fails nor finishes: stalled_s grows while it hangs (the daemon's health and watchdog
    use it) and is 0 again once it returns."""
    import asyncio
    import threading

    release = threading.Event()
    real_fsync = os.fsync

    def hanging(fd: int) -> None:
        release.wait(10)
        real_fsync(fd)

    async def go() -> tuple[float, float, float]:
        store = Store.open(state_dir, master)
        before = store.stalled_s()
        monkeypatch.setattr(os, "fsync", hanging)
        waiting = asyncio.ensure_future(store.wait_durable(store.add_message("34600000001", "user", "a", 1)))
        await asyncio.sleep(0.3)
        during = store.stalled_s()
        release.set()
        await waiting
        after = store.stalled_s()
        await store.aclose()
        return before, during, after

    before, during, after = asyncio.run(go())
    assert before == 0 and during >= 0.25 and after == 0


def test_session_state_travels_with_messages_through_journal_snapshot_and_cold_tails(state_dir: str, master: MasterKey) -> None:
    """meta on a message and set_meta alone are journaled, replayed, snapshotted and applied to cold sessions in
    order; a None value removes a key and an empty state leaves no field behind."""
    phone = "34600000001"
    with Store.open(state_dir, master) as store:
        store.add_message(phone, "user", "fotos", 1)
        store.add_message(phone, "assistant", "aquí", 2, meta={"photos": {"salado": 3}, "pending": {"parts": [1]}})
        store.flush()
        store.snapshot()  # the session goes cold (bytes)
        store.set_meta(phone, {"pending": None})
        store.add_message(phone, "assistant", "más", 3, meta={"photos": {"salado": 6}})
        assert store.meta(phone) == {"photos": {"salado": 6}}
        assert store.set_meta("34699999999", {"x": 1}) is None
        store.flush()
    with Store.open(state_dir, master) as store:  # replayed from the journal over the snapshot
        assert store.meta(phone) == {"photos": {"salado": 6}}
        assert [m["content"] for m in store.get(phone)["messages"]] == ["fotos", "aquí", "más"]
        store.set_meta(phone, {"photos": None})
        store.flush()
        store.snapshot()
    with Store.open(state_dir, master, readonly=True) as store:
        assert store.meta(phone) == {} and "natalia" not in store.get(phone)
    with Store.open(state_dir, master) as store, pytest.raises(InputError):
        store.add_message(phone, "user", "x", 4, meta=["not", "a", "dict"])  # type: ignore[arg-type]


def test_two_backups_in_the_same_second_both_succeed(store: Store) -> None:
    """Backups are named by the second: a second one right after the first waits for the next second (the daemon's
    own backup and an operator's `backup` may meet) instead of failing."""
    store.add_message("15550001111", "user", "hola", store.clock())
    store.flush()
    first = store.backup()
    second = store.backup()
    assert first != second and os.path.exists(first) and os.path.exists(second)
