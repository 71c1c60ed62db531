"""Snapshots: deltas hold only what changed, tombstones, when a base is rewritten, what is removed after, refusal of
files in the wrong place, the payload framing, failures, and snapshot_async while writers run."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natalia_secure import journal, keyring, snapshot
from natalia_secure.errors import IntegrityError, StoreUnavailable
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store, StoreOptions
from natalia_secure.verify import verify_state_dir

OPTIONS = StoreOptions(chunk=4096)
CHAIN = StoreOptions(chunk=4096, delta_ratio=100.0)  # tiny stores: deltas stay deltas whatever their size
T0 = 1_764_065_730_000


def contents(store: Store) -> dict[str, Any]:
    return {phone: store.get(phone) for phone in store.phones()}


def keys_of(state_dir: str, master: MasterKey) -> dict[str, bytes]:
    return keyring.load(state_dir, master).usable()


def phone(i: int) -> str:
    return f"+3460000{i:04d}"


def fill(store: Store, phones: range, messages: int, size: int = 100) -> None:
    for p in phones:
        for m in range(messages):
            store.add_message(phone(p), "user" if m % 2 else "assistant", f"{p}/{m} " + "x" * size, T0 + m)


def names(state_dir: str, pattern: Any) -> list[str]:
    return sorted(n for n in os.listdir(state_dir) if pattern.match(n))


def read(state_dir: str, master: MasterKey, generation: int) -> snapshot.SnapshotData:
    return snapshot.read_file(os.path.join(state_dir, snapshot.snapshot_name(generation)), keys_of(state_dir, master))[1]


def size(state_dir: str, generation: int) -> int:
    return os.path.getsize(os.path.join(state_dir, snapshot.snapshot_name(generation)))


def test_a_delta_holds_only_the_sessions_changed(state_dir: str, master: MasterKey) -> None:
    """After three of 100 sessions change, the delta holds those three only (a small fraction of the base's bytes),
    points at its base, and the store reopens equal."""
    store = Store.open(state_dir, master, OPTIONS)
    fill(store, range(100), 5)
    assert store.snapshot() == 1
    for p in (3, 50, 99):
        store.add_message(phone(p), "user", "changed", T0 + 100)
    assert store.snapshot() == 2
    delta = read(state_dir, master, 2)
    assert set(delta.sessions) == {phone(3), phone(50), phone(99)} and delta.tombstones == []
    assert delta.meta["parent"] == 1 and delta.meta["base"] == 1
    assert size(state_dir, 2) * 20 < size(state_dir, 1), (size(state_dir, 2), size(state_dir, 1))
    assert read(state_dir, master, 1).meta["parent"] is None and len(read(state_dir, master, 1).sessions) == 100
    expected = contents(store)
    store.close()
    assert contents(Store.open(state_dir, master, OPTIONS, readonly=True)) == expected


def test_tombstones_survive_reopen(state_dir: str, master: MasterKey) -> None:
    """A purge reaches the next delta as a tombstone; once the journal holding it is dropped, the reopened store still
    lacks the session; a phone purged then written again comes back as a session, not a tombstone."""
    store = Store.open(state_dir, master, OPTIONS)
    fill(store, range(3), 2)
    store.snapshot()
    store.purge(phone(1))
    store.purge(phone(2))
    store.add_message(phone(2), "user", "again", T0 + 5)
    store.flush()
    store.snapshot()
    delta = read(state_dir, master, 2)
    assert delta.tombstones == [phone(1)] and set(delta.sessions) == {phone(2)}
    store.close()
    assert names(state_dir, journal.SEGMENT_NAME) == [], "the segment holding the purge is gone"
    reopened = Store.open(state_dir, master, OPTIONS)
    assert sorted(reopened.phones()) == [phone(0), phone(2)]
    assert [m["content"] for m in reopened.get(phone(2))["messages"]] == ["again"]
    reopened.snapshot(full=True)
    reopened.close()
    assert sorted(read(state_dir, master, 3).sessions) == [phone(0), phone(2)]


def predict_full(base: int, deltas: list[int], options: StoreOptions) -> bool:
    return len(deltas) >= options.max_deltas or sum(deltas) >= base * options.delta_ratio


@pytest.mark.parametrize(
    "options",
    [StoreOptions(chunk=4096, max_deltas=3, delta_ratio=100.0), StoreOptions(chunk=4096, max_deltas=1000, delta_ratio=0.25)],
    ids=["max_deltas", "delta_ratio"],
)
def test_the_base_is_rewritten_when_deltas_grow_and_old_files_go(
    state_dir: str, master: MasterKey, options: StoreOptions
) -> None:
    """A snapshot is a new base exactly when the deltas since the last base reach max_deltas or delta_ratio of its
    size (counted again after a reopen); then the older snapshots go, and every segment the newest covers goes."""
    store = Store.open(state_dir, master, options)
    fill(store, range(40), 3)
    store.flush()
    store.snapshot()
    base, deltas, kinds = size(state_dir, 1), [], []
    for generation in range(2, 14):
        fill(store, range(generation, generation + 3), 1, size=400)  # a few sessions change: a delta of ~3 sessions
        store.flush()
        full = predict_full(base, deltas, options)
        assert store.snapshot() == generation
        data = read(state_dir, master, generation)
        assert (data.meta["parent"] is None) == full, f"generation {generation}: base {base}, deltas {deltas}"
        kinds.append("base" if full else "delta")
        if full:
            base, deltas = size(state_dir, generation), []
        else:
            deltas.append(size(state_dir, generation))
        chain = list(range(generation - len(deltas), generation + 1))
        assert names(state_dir, snapshot.NAME) == [snapshot.snapshot_name(g) for g in chain]
        assert all(
            int(journal.SEGMENT_NAME.match(n).group(1)) >= data.meta["segment"] for n in names(state_dir, journal.SEGMENT_NAME)
        )  # type: ignore[union-attr]
        if generation == 7:
            expected = contents(store)
            store.close()
            store = Store.open(state_dir, master, options)
            assert contents(store) == expected
    assert "base" in kinds and kinds.count("delta") >= 3, kinds
    expected = contents(store)
    store.close()
    assert contents(Store.open(state_dir, master, options, readonly=True)) == expected


def test_a_snapshot_under_another_generation_name_is_refused(state_dir: str, master: MasterKey) -> None:
    """A base copied over a delta's name (or two generations swapped) is refused, naming the file."""
    store = Store.open(state_dir, master, CHAIN)
    fill(store, range(3), 1)
    store.snapshot()
    store.add_message(phone(0), "user", "delta", T0)
    store.snapshot()
    store.close()
    g1, g2 = (os.path.join(state_dir, snapshot.snapshot_name(g)) for g in (1, 2))
    shutil.copy(g1, g1 + ".orig")
    shutil.copy(g2, g2 + ".orig")
    os.replace(g1 + ".orig", g2)  # g2's name, g1's bytes
    with pytest.raises(IntegrityError, match=r"snapshot\.g000002\.enc: the file says generation 1"):
        Store.open(state_dir, master, CHAIN)
    os.replace(g2 + ".orig", g1)  # and g1's name, g2's bytes: swapped
    with pytest.raises(IntegrityError, match=r"snapshot\.g00000[12]\.enc"):
        Store.open(state_dir, master, CHAIN, readonly=True)


def test_a_backup_under_a_snapshot_name_is_refused(state_dir: str, master: MasterKey) -> None:
    """A backup (a sealed base of kind backup) copied over the newest snapshot's name is refused by its kind."""
    store = Store.open(state_dir, master, CHAIN)
    fill(store, range(3), 1)
    store.snapshot()
    backup = store.backup()
    store.close()
    shutil.copy(backup, os.path.join(state_dir, snapshot.snapshot_name(1)))
    with pytest.raises(IntegrityError, match=r"snapshot\.g000001\.enc: expected a snapshot file, found a backup file"):
        Store.open(state_dir, master, CHAIN)


def test_a_delta_from_a_diverged_copy_is_refused(tmp_path, state_dir: str, master: MasterKey) -> None:  # type: ignore[no-untyped-def]
    """A delta written on another history (a copy of the directory that went on differently) is refused."""
    store = Store.open(state_dir, master, CHAIN)
    fill(store, range(3), 1)
    store.snapshot()
    store.add_message(phone(0), "user", "g2", T0)
    store.snapshot()
    store.close()
    other = str(tmp_path / "copy")
    shutil.copytree(state_dir, other)
    with Store.open(state_dir, master, CHAIN) as a:  # here: g3 is a base, g4 a delta on it
        a.add_message(phone(1), "user", "g3", T0)
        a.snapshot(full=True)
        a.add_message(phone(1), "user", "g4", T0)
        a.snapshot()
    with Store.open(other, master, CHAIN) as b:  # there: g3 is a delta on base 1
        b.add_message(phone(2), "user", "g3 elsewhere", T0)
        b.snapshot()
    shutil.copy(os.path.join(state_dir, snapshot.snapshot_name(4)), other)
    with pytest.raises(IntegrityError, match=r"snapshot\.g000004\.enc: a delta of base 3 found on base 1"):
        Store.open(other, master, CHAIN)


def test_a_missing_delta_breaks_the_chain(state_dir: str, master: MasterKey) -> None:
    """A delta removed from the middle of a chain is refused, naming the missing file."""
    store = Store.open(state_dir, master, CHAIN)
    for g in range(3):
        store.add_message(phone(g), "user", str(g), T0)
        store.snapshot()
    store.close()
    os.unlink(os.path.join(state_dir, snapshot.snapshot_name(2)))
    with pytest.raises(IntegrityError, match=r"snapshot chain is broken: .*snapshot\.g000002\.enc is missing"):
        Store.open(state_dir, master, CHAIN)


def test_a_failed_snapshot_keeps_the_old_files_and_the_store_working(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot whose write fails leaves no temp and the old files as they were; the store stays writable and the
    next snapshot carries the changes the failed one held."""
    store = Store.open(state_dir, master, OPTIONS)
    fill(store, range(5), 2)
    store.snapshot()
    store.add_message(phone(1), "user", "in the failed delta", T0)
    store.purge(phone(2))
    before = {n: open(os.path.join(state_dir, n), "rb").read() for n in names(state_dir, snapshot.NAME)}

    def rename_fails(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error", dst)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename_fails)
        with pytest.raises(StoreUnavailable, match="Input/output error"):
            store.snapshot()
    assert {n: open(os.path.join(state_dir, n), "rb").read() for n in names(state_dir, snapshot.NAME)} == before
    assert [n for n in os.listdir(state_dir) if n.endswith(".tmp")] == []
    assert store.degraded is None
    store.add_message(phone(3), "user", "after", T0)
    store.flush()
    store.snapshot()
    delta = read(state_dir, master, 2)
    assert set(delta.sessions) == {phone(1), phone(3)} and delta.tombstones == [phone(2)]
    expected = contents(store)
    store.close()
    assert contents(Store.open(state_dir, master, OPTIONS, readonly=True)) == expected


# ---- the payload's framing (pure) ----

session_bodies = st.dictionaries(st.text(min_size=1, max_size=20), st.binary(max_size=300), max_size=8)


@given(
    sessions=session_bodies,
    tombstones=st.lists(st.text(min_size=1, max_size=20), max_size=5),
    claims=st.dictionaries(st.text(max_size=10), st.integers(0, 2**53)),
    cuts=st.lists(st.integers(1, 64), max_size=40),
)
def test_the_payload_framing_round_trips_however_it_is_chunked(
    sessions: dict[str, bytes], tombstones: list[str], claims: dict[str, int], cuts: list[int]
) -> None:
    """payload_pieces, cut into arbitrary chunks, parses back to the same meta, claims, sessions and tombstones."""
    meta = {"lsn": 7, "segment": 2, "base": None, "parent": None, "sessions": len(sessions), "tombstones": len(tombstones)}
    blob = b"".join(snapshot.payload_pieces(meta, claims, sessions.items(), tombstones))
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(blob[pos : pos + cut])
        pos += cut
    chunks.append(blob[pos:])
    data = snapshot.parse_payload(snapshot.iter_frames(chunks))
    assert (data.meta, data.claims, data.sessions, data.tombstones) == (meta, claims, sessions, tombstones)


def test_a_payload_cut_or_miscounted_is_refused() -> None:
    """A payload that ends inside a frame, or holds other counts than its meta says, is an IntegrityError."""
    meta = {"lsn": 1, "segment": 1, "base": None, "parent": None, "sessions": 1, "tombstones": 0}
    blob = b"".join(snapshot.payload_pieces(meta, {}, [("+1", b"{}")], []))
    with pytest.raises(IntegrityError, match="inside a frame"):
        snapshot.parse_payload(snapshot.iter_frames([blob[:-1]]))
    wrong = b"".join(snapshot.payload_pieces({**meta, "sessions": 2}, {}, [("+1", b"{}")], []))
    with pytest.raises(IntegrityError, match="does not hold"):
        snapshot.parse_payload(snapshot.iter_frames([wrong]))


# ---- snapshot_async and the journal ----


def test_snapshot_async_while_writers_run_loses_nothing(state_dir: str, master: MasterKey) -> None:
    """Writers awaiting wait_durable and snapshot_async (full and delta) interleave; at the end everything every
    writer was told is durable is in the reopened store, and every file authenticates."""
    store = Store.open(state_dir, master, StoreOptions(chunk=512, max_deltas=3))
    acknowledged: dict[str, list[str]] = {}

    async def writer(w: int) -> None:
        for i in range(40):
            lsn = store.add_message(phone(w), "user", f"{w}/{i}", T0 + i)
            await store.wait_durable(lsn)
            acknowledged.setdefault(phone(w), []).append(f"{w}/{i}")

    async def snapshotter() -> list[int]:
        generations = []
        for i in range(8):
            generations.append(await store.snapshot_async(full=i % 4 == 3))
            await asyncio.sleep(0)
        return generations

    async def main() -> list[int]:
        results = await asyncio.gather(snapshotter(), *(writer(w) for w in range(12)))
        await store.aclose()
        return results[0]  # type: ignore[no-any-return]

    assert asyncio.run(main()) == list(range(1, 9))
    reopened = Store.open(state_dir, master, OPTIONS, readonly=True)
    assert {p: [m["content"] for m in s["messages"]] for p, s in contents(reopened).items()} == acknowledged
    assert verify_state_dir(state_dir, master).ok


def test_a_record_pending_at_a_snapshot_does_not_bring_back_its_segment(state_dir: str, master: MasterKey) -> None:
    """A record appended but not flushed when a snapshot is taken is covered by it: no covered segment remains after."""
    store = Store.open(state_dir, master, OPTIONS)
    store.add_message(phone(1), "user", "pending at the snapshot", T0)
    store.snapshot()
    store.flush()
    store.close()
    assert names(state_dir, journal.SEGMENT_NAME) == []
    assert verify_state_dir(state_dir, master).ok


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_snapshot_during_a_journal_write_fails_nothing(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A snapshot cut while a batch is being fsynced, with a record of the same segment queued behind it, neither fails
    the journal nor leaves a file that does not authenticate nor a covered segment (a regression test: the old
    journal reopened or re-created segment 1 by path after the snapshot had removed it)."""
    store = Store.open(state_dir, master, OPTIONS)
    in_fsync, cut_done, release = threading.Event(), threading.Event(), threading.Event()
    real_fsync, real_write = os.fsync, store._write

    def fsync(fd: int) -> None:
        # hold the journal thread in the fsync of segment 1 itself (not its head's temp or the directory)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/journal.000001.enc") and not release.is_set():
            in_fsync.set()
            release.wait(10)
        real_fsync(fd)

    def write(plan: Any) -> int:  # runs right after the cut (the journal rotated), before the snapshot is written
        cut_done.set()
        return real_write(plan)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store, "_write", write)
    releaser = threading.Thread(target=lambda: (cut_done.wait(10), release.set()))

    async def main() -> int:
        first = asyncio.ensure_future(store.wait_durable(store.add_message(phone(1), "user", "batch 1", T0)))
        assert await asyncio.get_running_loop().run_in_executor(None, in_fsync.wait, 10)
        second = store.add_message(phone(1), "user", "batch 2, same segment", T0 + 1)
        if mode == "sync":
            releaser.start()
            generation = store.snapshot()  # blocks the loop: the releaser thread lets batch 1 finish after the cut
        else:
            snap = asyncio.ensure_future(store.snapshot_async())
            assert await asyncio.get_running_loop().run_in_executor(None, cut_done.wait, 10)
            release.set()
            generation = await snap
        await first
        await store.wait_durable(second)
        await store.aclose()
        return generation

    generation = asyncio.run(main())
    if releaser.is_alive() or mode == "sync":
        releaser.join()
    assert release.is_set() and store.degraded is None
    report = verify_state_dir(state_dir, master)
    assert report.ok, [(f.file, f.error) for f in report.files if not f.ok]
    first_segment = read(state_dir, master, generation).meta["segment"]
    assert all(int(n[8:14]) >= first_segment for n in names(state_dir, journal.SEGMENT_NAME))
    reopened = Store.open(state_dir, master, OPTIONS, readonly=True)
    assert [m["content"] for m in reopened.get(phone(1))["messages"]] == ["batch 1", "batch 2, same segment"]


def test_a_delta_carries_only_the_claims_added_since_its_parent(state_dir: str, master: MasterKey) -> None:
    """Claims are written once (in the delta after they are made, and in each new base), and every claim is still
    there after reopening through the chain."""
    store = Store.open(state_dir, master, StoreOptions(chunk=4096, delta_ratio=1e9), clock=lambda: T0)
    store.add_message(phone(1), "user", "a", T0, message_id="wamid.1")
    store.claim("wamid.2", T0)
    assert store.snapshot(full=True) == 1
    store.add_message(phone(1), "user", "b", T0, message_id="wamid.3")
    assert store.snapshot() == 2
    assert store.snapshot() == 3  # nothing new
    store.close()
    assert read(state_dir, master, 1).claims == {"wamid.1": T0, "wamid.2": T0}
    assert read(state_dir, master, 2).claims == {"wamid.3": T0}
    assert read(state_dir, master, 3).claims == {}
    reopened = Store.open(state_dir, master, OPTIONS, readonly=True, clock=lambda: T0)
    assert all(reopened.is_claimed(f"wamid.{i}") for i in (1, 2, 3))
