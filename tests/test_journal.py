"""The journal through the store: segments and lsns, gap detection, torn tails, never touching old files, group commit."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from natalia_secure import journal
from natalia_secure.errors import IntegrityError
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store, StoreOptions

from .conftest import flipped_bytes, tree_bytes

OPTIONS = StoreOptions(chunk=4096)


def segments(state_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(state_dir) if journal.SEGMENT_NAME.match(n))


def contents(store: Store) -> dict[str, object]:
    return {phone: store.get(phone) for phone in store.phones()}


def write_sessions(state_dir: str, master: MasterKey, per_open: list[int]) -> list[int]:
    """One writing open per entry, each adding that many messages flushed one by one; returns the size of the
    open's segment after each flush (the record boundaries), for the last open."""
    n = 0
    boundaries: list[int] = []
    for count in per_open:
        with Store.open(state_dir, master, OPTIONS) as store:
            boundaries = []
            for _ in range(count):
                n += 1
                store.add_message(f"+1555000{n % 3}", "user", f"message {n}", 1_000 + n)
                store.flush()
                boundaries.append(os.path.getsize(os.path.join(state_dir, segments(state_dir)[-1])))
    return boundaries


def test_each_writing_open_starts_a_segment_at_the_next_lsn(state_dir: str, master: MasterKey) -> None:
    """Three writing opens make three segments whose lsns follow on, and a reopen replays all of them in order."""
    write_sessions(state_dir, master, [3, 4, 5])
    assert segments(state_dir) == ["journal.000001.enc", "journal.000002.enc", "journal.000003.enc"]
    store = Store.open(state_dir, master, readonly=True)
    assert store.lsn == 12
    messages = [m["content"] for p in sorted(store.phones()) for m in store.get(p)["messages"]]
    assert sorted(messages, key=lambda c: int(c.split()[1])) == [f"message {n}" for n in range(1, 13)]
    for phone in store.phones():
        numbers = [int(m["content"].split()[1]) for m in store.get(phone)["messages"]]
        assert numbers == sorted(numbers)


def test_a_missing_middle_segment_is_a_gap_naming_the_file(state_dir: str, master: MasterKey) -> None:
    """Deleting a middle segment makes both opens refuse with IntegrityError naming the segment after the gap; nothing
    else is touched."""
    write_sessions(state_dir, master, [3, 3, 3])
    os.unlink(os.path.join(state_dir, "journal.000002.enc"))
    before = tree_bytes(state_dir)
    for readonly in (False, True):
        with pytest.raises(IntegrityError, match=r"journal\.000003\.enc: journal gap: expected lsn 4"):
            Store.open(state_dir, master, OPTIONS, readonly=readonly)
    assert tree_bytes(state_dir) == before


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_whole_records_cut_from_a_non_last_segment_is_a_gap(state_dir: str, master: MasterKey, keep: int) -> None:
    """A segment cut at a record boundary (not torn, so it looks complete) is caught by the next segment's first lsn."""
    boundaries = write_sessions(state_dir, master, [5])
    write_sessions(state_dir, master, [2])
    first = os.path.join(state_dir, "journal.000001.enc")
    head = boundaries[0] - (boundaries[1] - boundaries[0])  # all records here have the same size
    os.truncate(first, boundaries[keep - 1] if keep else head)
    before = tree_bytes(state_dir)
    with pytest.raises(IntegrityError, match=rf"journal\.000002\.enc: journal gap: expected lsn {keep + 1}, .* starts at 6"):
        Store.open(state_dir, master, OPTIONS)
    assert tree_bytes(state_dir) == before


def test_a_missing_first_segment_after_the_snapshot_is_a_gap(state_dir: str, master: MasterKey) -> None:
    """The first segment the snapshot points at, deleted while a later one exists, is refused as a gap."""
    with Store.open(state_dir, master, OPTIONS) as store:
        store.add_message("+15550001", "user", "before", 1)
        store.flush()
        store.snapshot()
        store.add_message("+15550001", "user", "after 1", 2)
    write_sessions(state_dir, master, [1])
    assert segments(state_dir) == ["journal.000002.enc", "journal.000003.enc"]
    os.unlink(os.path.join(state_dir, "journal.000002.enc"))
    with pytest.raises(IntegrityError, match=r"journal\.000003\.enc: journal gap"):
        Store.open(state_dir, master, OPTIONS)


def test_a_segment_under_another_number_is_refused(state_dir: str, master: MasterKey) -> None:
    """A segment copied over another's name is refused: its authenticated header names its own number."""
    write_sessions(state_dir, master, [2, 2])
    with open(os.path.join(state_dir, "journal.000001.enc"), "rb") as f:
        old = f.read()
    with open(os.path.join(state_dir, "journal.000002.enc"), "wb") as f:
        f.write(old)
    with pytest.raises(IntegrityError, match=r"journal\.000002\.enc: the file says it is segment 1"):
        Store.open(state_dir, master, OPTIONS)


def test_a_torn_tail_in_the_last_segment_is_dropped(state_dir: str, master: MasterKey) -> None:
    """Cut anywhere inside the last record (or followed by zeros, as after power loss on an extended file), the last
    segment's tail is dropped, every earlier record is there, and no open rewrites the torn file."""
    boundaries = write_sessions(state_dir, master, [4])
    path = os.path.join(state_dir, "journal.000001.enc")
    with open(path, "rb") as f:
        whole = f.read()
    with Store.open(state_dir, master, OPTIONS, readonly=True) as full:
        assert full.lsn == 4
    start, end = boundaries[2], boundaries[3]
    variants = [whole[:cut] for cut in range(start + 1, end)] + [whole[:start] + bytes(n) for n in (1, 8, 4096)]
    for torn in variants:
        with open(path, "wb") as f:
            f.write(torn)
        for readonly in (True, False):
            with Store.open(state_dir, master, OPTIONS, readonly=readonly) as store:
                assert store.lsn == 3 and store.stats()["dropped_torn_tails"] == 1
                assert [m["content"] for p in store.phones() for m in store.get(p)["messages"]].count("message 4") == 0
            with open(path, "rb") as f:
                assert f.read() == torn, "the torn segment was changed"
    assert segments(state_dir) == ["journal.000001.enc"], "opens without a change created a segment"


def test_after_a_torn_tail_new_records_go_to_a_new_segment(state_dir: str, master: MasterKey) -> None:
    """Records after a restart continue the lsns in a new segment; the torn segment keeps its bytes and reopens fine."""
    boundaries = write_sessions(state_dir, master, [3])
    path = os.path.join(state_dir, "journal.000001.enc")
    os.truncate(path, boundaries[2] - 5)
    before = tree_bytes(state_dir)
    with Store.open(state_dir, master, OPTIONS) as store:
        assert store.lsn == 2
        lsn = store.add_message("+15550009", "assistant", "after the crash", 99)
        assert lsn == 3
    after = tree_bytes(state_dir)
    assert {k: v for k, v in after.items() if k != "journal.000002.enc"} == before
    assert "journal.000002.enc" in after
    with Store.open(state_dir, master, OPTIONS, readonly=True) as store:
        assert store.lsn == 3 and store.get("+15550009")["messages"][0]["content"] == "after the crash"


def test_reopening_never_modifies_old_files(state_dir: str, master: MasterKey) -> None:
    """A writing open followed by new records starts segment N+1 and leaves every existing file byte-identical."""
    write_sessions(state_dir, master, [2])
    with Store.open(state_dir, master, OPTIONS) as store:
        store.add_message("+15550001", "user", "x", 5)
        store.snapshot()
        store.add_message("+15550001", "user", "y", 6)
    before = tree_bytes(state_dir)
    numbers = [int(re.findall(r"\d+", s)[0]) for s in segments(state_dir)]
    with Store.open(state_dir, master, OPTIONS) as store:
        store.add_message("+15550002", "user", "z", 7)
        store.flush()
    after = tree_bytes(state_dir)
    new = set(after) - set(before)
    assert new == {journal.segment_name(max(numbers) + 1)}
    assert {k: after[k] for k in before} == before


def test_a_record_tampered_anywhere_in_a_segment_is_refused(state_dir: str, master: MasterKey) -> None:
    """Every single-byte flip in a segment (head, lengths, CRCs, ciphertexts, even the last record) is refused, never
    taken for a torn tail, and the file is left as it was."""
    write_sessions(state_dir, master, [2])
    path = os.path.join(state_dir, "journal.000001.enc")
    for _, bad in flipped_bytes(path):
        with pytest.raises(IntegrityError):
            Store.open(state_dir, master, OPTIONS, readonly=True)
        with open(path, "rb") as f:
            assert f.read() == bad
    Store.open(state_dir, master, OPTIONS)


# ---- group commit ----


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_64_concurrent_writers_share_few_fsyncs(state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 coroutines each add a message and await wait_durable: every lsn is durable, with a handful of fsyncs."""
    store = Store.open(state_dir, master, OPTIONS)
    fsyncs = count_fsyncs(monkeypatch)

    async def one(i: int) -> int:
        lsn = store.add_message(f"+1555{i:04d}", "user", f"hello {i}", 1_000 + i)
        await store.wait_durable(lsn)
        assert store._journal is not None and store._journal.durable_lsn >= lsn
        return lsn

    async def main() -> list[int]:
        lsns = await asyncio.gather(*(one(i) for i in range(64)))
        assert store._committer is not None
        assert store._committer.fsyncs <= 4, f"{store._committer.fsyncs} group commits for 64 records"
        await store.aclose()
        return lsns

    lsns = asyncio.run(main())
    assert sorted(lsns) == list(range(1, 65))
    assert len(fsyncs) <= 12, f"{len(fsyncs)} fsync calls for 64 records"  # a batch: temp, dir, segment
    reopened = Store.open(state_dir, master, OPTIONS, readonly=True)
    assert reopened.lsn == 64 and len(reopened) == 64


def test_interval_policy_answers_waiters(state_dir: str, master: MasterKey) -> None:
    """With durability "interval", waiters are answered by the periodic flush, and what they waited for is durable."""
    store = Store.open(state_dir, master, StoreOptions(chunk=4096, durability="interval", interval_ms=5))

    async def one(i: int) -> None:
        await store.wait_durable(store.add_message("+15550000", "user", f"m{i}", i))

    async def main() -> int:
        for _ in range(3):
            await asyncio.gather(*(one(i) for i in range(20)))
            # durable now: a read-only open (a second reader) sees everything awaited so far
            assert Store.open(store.state_dir, master, readonly=True).lsn == store.lsn
        assert store._committer is not None
        fsyncs = store._committer.fsyncs
        await store.aclose()
        return fsyncs

    fsyncs = asyncio.run(main())
    assert 1 <= fsyncs <= 30
    assert len(Store.open(state_dir, master, readonly=True).get("+15550000")["messages"]) == 60


def test_wait_durable_on_an_already_durable_lsn_returns_at_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter whose record was flushed before it waited is answered without another fsync."""
    lsn = store.add_message("+15550000", "user", "x", 1)
    store.flush()
    fsyncs = count_fsyncs(monkeypatch)
    asyncio.run(store.wait_durable(lsn))
    assert fsyncs == []
