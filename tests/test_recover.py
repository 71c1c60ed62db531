"""recover: bad files go aside byte for byte, the newest usable state plus the journal is sealed as a new base, and
the report says exactly which lsn ranges and files were lost. Real stores, damaged by a flipped byte."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from natalia_secure import masterkey, recover
from natalia_secure.clock import compact_utc, iso_utc
from natalia_secure.errors import IntegrityError, KeyMaterialError, LockHeldError, NotFoundError, UsageError
from natalia_secure.lock import StoreLock
from natalia_secure.masterkey import MasterKey
from natalia_secure.recover import LostRange
from natalia_secure.store import Store, StoreOptions

from .conftest import tree_bytes

OPTIONS = StoreOptions(chunk=4096, delta_ratio=1e9)  # deltas until told otherwise
PHONES = ("+15550000001", "+15550000002", "+15550000003")
T0 = 1_770_000_000_000
NOW = T0 + 86_400_000
MOVED = compact_utc(NOW)


class Writer:
    """Message n is the text "m<n>", timestamp T0 + n seconds, and (only messages are written) the record of lsn n."""

    def __init__(self) -> None:
        self.n = 0
        self.ms = T0

    def clock(self) -> int:  # a second per call: backups taken in one test get distinct names
        self.ms += 1000
        return self.ms

    def open(self, state_dir: str, master: MasterKey) -> Store:
        return Store.open(state_dir, master, OPTIONS, clock=self.clock)

    def batch(self, store: Store, count: int = 5) -> set[str]:
        written = set()
        for _ in range(count):
            self.n += 1
            store.add_message(PHONES[self.n % len(PHONES)], "user", f"m{self.n}", T0 + self.n * 1000)
            written.add(f"m{self.n}")
        store.flush()
        return written


def at(n: int) -> str:
    """The time the report gives for message n."""
    return iso_utc(T0 + n * 1000)


def flip(path: str) -> bytes:
    """Flip one bit in the middle of the file (mode and name kept); returns the bad content."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


def messages(state_dir: str, master: MasterKey) -> set[str]:
    """Every message text, read through a normal writing open (which must succeed)."""
    with Store.open(state_dir, master, OPTIONS) as store:
        return {m["content"] for _, s in store.items() for m in s["messages"]}


def kept_everything(before: dict[str, bytes], after: dict[str, bytes]) -> bool:
    """Every file's content from before is still somewhere under the state directory: nothing was deleted or changed."""
    return not Counter(before.values()) - Counter(after.values())


def three_deltas(state_dir: str, master: MasterKey) -> tuple[list[set[str]], str]:
    """g1 base (lsn 5), g2 delta (10), g3 delta (15), then lsn 16-20 in the journal; g3 is flipped."""
    w = Writer()
    with w.open(state_dir, master) as store:
        batches = []
        for _ in range(3):
            batches.append(w.batch(store))
            store.snapshot()
        batches.append(w.batch(store))
    return batches, os.path.join(state_dir, "snapshot.g000003.enc")


def test_a_bad_newest_delta_goes_aside_and_the_chain_before_it_plus_the_journal_is_restored(
    state_dir: str, master: MasterKey
) -> None:
    """A flipped bit in the newest delta: it is renamed into quarantine/ unchanged, g1+g2 and lsn 16-20 give the rest,
    lsn 11-15 (held only by g3) are reported lost with the time around them, and the store opens with every other
    message; a second run finds nothing to recover."""
    (b1, b2, b3, b4), bad_path = three_deltas(state_dir, master)
    bad = flip(bad_path)
    with pytest.raises(IntegrityError):
        Store.open(state_dir, master, OPTIONS)
    before = tree_bytes(state_dir)

    report = recover.recover(state_dir, master, now_ms=NOW)

    quarantined = f"quarantine/snapshot.g000003.enc.{MOVED}"
    assert [(m.file, m.to) for m in report.moved] == [("snapshot.g000003.enc", quarantined)]
    assert "bad:" in report.moved[0].why
    after = tree_bytes(state_dir)
    assert after[quarantined] == bad and "snapshot.g000003.enc" not in after
    assert len(after) == len(before) + 1 and kept_everything(before, after)  # + the new base
    assert oct(os.stat(os.path.join(state_dir, "quarantine")).st_mode & 0o777) == "0o700"
    assert report.restored is not None
    assert (report.restored.kind, report.restored.files, report.restored.lsn) == (
        "chain",
        ["snapshot.g000001.enc", "snapshot.g000002.enc"],
        10,
    )
    assert (report.replayed, report.replayed_lsns) == (5, (16, 20))
    assert report.lost_ranges == [LostRange(11, 15, report.restored.created, at(16))]  # after g2 was cut
    assert [f.file for f in report.lost_files] == ["snapshot.g000003.enc"]
    assert report.new_base == {"file": "snapshot.g000004.enc", "generation": 4, "lsn": 20, "segment": 5, "sessions": 3}
    text = "\n".join(report.lines())
    assert "LOST: lsn 11-15 (5 records)" in text and "LOST: snapshot.g000003.enc" in text
    assert report.to_json()["lost_ranges"][0]["last_lsn"] == 15

    again = recover.recover(state_dir, master, now_ms=NOW + 1000)
    assert again.nothing_to_recover and tree_bytes(state_dir) == after
    assert messages(state_dir, master) == b1 | b2 | b4
    assert not b3 & messages(state_dir, master)


def backups_then_a_delta(state_dir: str, master: MasterKey) -> tuple[list[set[str]], dict[str, str]]:
    """g1 base (lsn 5), backup "old" (5), backup "new" (10), g2 delta (15: lsn 6-15 compacted away), lsn 16-20."""
    w = Writer()
    names = {}
    with w.open(state_dir, master) as store:
        b1 = w.batch(store)
        store.snapshot()
        names["old"] = os.path.relpath(store.backup(), state_dir)
        b2 = w.batch(store)
        names["new"] = os.path.relpath(store.backup(), state_dir)
        b3 = w.batch(store)
        store.snapshot()
        b4 = w.batch(store)
    return [b1, b2, b3, b4], names


@pytest.mark.parametrize("which", ["newest", "old"])
def test_a_bad_base_is_replaced_by_a_backup_and_the_journal_after_it(state_dir: str, master: MasterKey, which: str) -> None:
    """A flipped bit in the base makes the chain unusable: the newest good backup (or the one named) plus the records
    after it are restored; the base goes aside as bad, its delta as not usable, and the lost range is exact."""
    (b1, b2, _, b4), names = backups_then_a_delta(state_dir, master)
    flip(os.path.join(state_dir, "snapshot.g000001.enc"))
    before = tree_bytes(state_dir)

    report = recover.recover(state_dir, master, None if which == "newest" else names["old"], now_ms=NOW)

    assert report.restored is not None
    assert report.restored.kind == "backup"
    assert [(m.file, m.why.split(":")[0]) for m in report.moved] == [
        ("snapshot.g000001.enc", "bad"),
        ("snapshot.g000002.enc", "not usable"),
    ]
    assert (report.replayed, report.replayed_lsns) == (5, (16, 20))
    if which == "newest":
        assert (report.restored.files, report.restored.lsn) == ([names["new"]], 10)
        assert report.lost_ranges == [LostRange(11, 15, report.restored.created, at(16))]
        assert messages(state_dir, master) == b1 | b2 | b4
    else:
        assert (report.restored.files, report.restored.lsn) == ([names["old"]], 5)
        assert report.lost_ranges == [LostRange(6, 15, report.restored.created, at(16))]
        assert messages(state_dir, master) == b1 | b4
    assert report.lost_files == []  # the bad base's content is older than the backup: nothing of it is missing
    assert report.new_base is not None and report.new_base["generation"] == 3 and report.new_base["lsn"] == 20
    after = tree_bytes(state_dir)
    assert kept_everything(before, after) and len(after) == len(before) + 1


def test_an_unknown_or_bad_backup_name_changes_nothing(state_dir: str, master: MasterKey) -> None:
    """--from-backup with a name that is not in backups/ is NotFoundError, with one that fails authentication
    IntegrityError; the directory is untouched either way."""
    _, names = backups_then_a_delta(state_dir, master)
    flip(os.path.join(state_dir, "snapshot.g000001.enc"))
    flip(os.path.join(state_dir, names["old"]))
    before = tree_bytes(state_dir)
    with pytest.raises(NotFoundError):
        recover.recover(state_dir, master, "sessions.20200101T000000Z.g000001.enc", now_ms=NOW)
    with pytest.raises(IntegrityError, match="does not open"):
        recover.recover(state_dir, master, os.path.basename(names["old"]), now_ms=NOW)
    assert tree_bytes(state_dir) == before


def segments_one_per_open(state_dir: str, master: MasterKey) -> list[set[str]]:
    """g1 base (lsn 5), then one journal segment per open: journal.000002 (6-10), .000003 (11-15), .000004 (16-20)."""
    w = Writer()
    batches = []
    with w.open(state_dir, master) as store:
        batches.append(w.batch(store))
        store.snapshot()
    for _ in range(3):
        with w.open(state_dir, master) as store:
            batches.append(w.batch(store))
    return batches


def test_a_bad_segment_in_the_middle_loses_its_range_and_the_records_after_it_are_replayed(
    state_dir: str, master: MasterKey
) -> None:
    """A flipped bit in journal.000003: it goes aside, lsn 6-10 and 16-20 are replayed on g1, 11-15 reported lost
    between the neighbouring messages' times, and the new base names a segment number never used."""
    b1, b2, b3, b4 = segments_one_per_open(state_dir, master)
    bad = flip(os.path.join(state_dir, "journal.000003.enc"))
    report = recover.recover(state_dir, master, now_ms=NOW)

    assert [m.file for m in report.moved] == ["journal.000003.enc"]
    assert tree_bytes(state_dir)[f"quarantine/journal.000003.enc.{MOVED}"] == bad
    assert report.restored is not None and (report.restored.files, report.restored.lsn) == (["snapshot.g000001.enc"], 5)
    assert (report.replayed, report.replayed_lsns) == (10, (6, 20))
    assert report.lost_ranges == [LostRange(11, 15, at(10), at(16))]
    assert [f.file for f in report.lost_files] == ["journal.000003.enc"]
    assert report.new_base is not None and (report.new_base["lsn"], report.new_base["segment"]) == (20, 5)
    assert messages(state_dir, master) == b1 | b2 | b4
    assert not b3 & messages(state_dir, master)


def test_a_bad_last_segment_is_lost_up_to_an_unknown_end(state_dir: str, master: MasterKey) -> None:
    """When no good segment follows the bad one, how far it went cannot be known: the range is open-ended."""
    b1, b2, b3, _ = segments_one_per_open(state_dir, master)
    flip(os.path.join(state_dir, "journal.000004.enc"))
    report = recover.recover(state_dir, master, now_ms=NOW)
    assert report.lost_ranges == [LostRange(16, None, at(15), None)]
    assert "LOST: lsn 16 and after (how many records is unknown)" in "\n".join(report.lines())
    assert messages(state_dir, master) == b1 | b2 | b3


def test_a_store_that_never_took_a_snapshot_is_rebuilt_from_the_journal_alone(state_dir: str, master: MasterKey) -> None:
    """No snapshot, no backup, and the journal still starts at lsn 1: the start is the empty store, every record that
    opens is replayed, and the new base is generation 1."""
    w = Writer()
    batches = []
    for _ in range(3):
        with w.open(state_dir, master) as store:
            batches.append(w.batch(store))
    flip(os.path.join(state_dir, "journal.000002.enc"))
    report = recover.recover(state_dir, master, now_ms=NOW)
    assert report.restored is not None and (report.restored.kind, report.restored.lsn) == ("empty", 0)
    assert (report.replayed, report.lost_ranges) == (10, [LostRange(6, 10, at(5), at(11))])
    assert report.new_base is not None and (report.new_base["generation"], report.new_base["segment"]) == (1, 4)
    assert messages(state_dir, master) == batches[0] | batches[2]


def healthy(state_dir: str, master: MasterKey) -> dict[str, str]:
    w = Writer()
    with w.open(state_dir, master) as store:
        w.batch(store)
        store.snapshot()
        name = os.path.relpath(store.backup(), state_dir)
        w.batch(store)
    return {"backup": name}


def test_a_healthy_store_is_left_exactly_as_it_is(state_dir: str, master: MasterKey) -> None:
    """Every file authenticates and the store opens: nothing changes on disk (not even a quarantine/ directory), the
    report says so, and --from-backup is refused as a usage error."""
    names = healthy(state_dir, master)
    before = tree_bytes(state_dir)
    listing = sorted(os.listdir(state_dir))
    report = recover.recover(state_dir, master, now_ms=NOW)
    assert report.nothing_to_recover and report.lines()[0].startswith("nothing to recover")
    assert report.to_json()["nothing_to_recover"] is True
    with pytest.raises(UsageError, match="the store opens"):
        recover.recover(state_dir, master, os.path.basename(names["backup"]), now_ms=NOW)
    assert tree_bytes(state_dir) == before and sorted(os.listdir(state_dir)) == listing


def test_a_bad_backup_beside_a_store_that_opens_only_goes_aside(state_dir: str, master: MasterKey) -> None:
    """The store opens but a backup fails: the backup is moved, no new base is written, the sessions are as before."""
    names = healthy(state_dir, master)
    expected = messages(state_dir, master)
    before = tree_bytes(state_dir)
    bad = flip(os.path.join(state_dir, names["backup"]))
    report = recover.recover(state_dir, master, now_ms=NOW)
    moved = f"quarantine/{os.path.basename(names['backup'])}.{MOVED}"
    assert [(m.file, m.to) for m in report.moved] == [(names["backup"], moved)]
    assert report.new_base is None and report.restored is None and not report.nothing_to_recover
    after = tree_bytes(state_dir)
    assert after[moved] == bad and set(after) == set(before) - {names["backup"]} | {moved}
    assert messages(state_dir, master) == expected


def test_while_another_process_holds_the_lock_nothing_changes(state_dir: str, master: MasterKey) -> None:
    """A running daemon (or admin command) holds the store lock: LockHeldError, and the damaged store is untouched."""
    three_deltas(state_dir, master)
    flip(os.path.join(state_dir, "snapshot.g000003.enc"))
    before = tree_bytes(state_dir)
    lock = StoreLock.acquire(state_dir)
    try:
        with pytest.raises(LockHeldError):
            recover.recover(state_dir, master, now_ms=NOW)
    finally:
        lock.release()
    assert tree_bytes(state_dir) == before


@pytest.mark.parametrize("damage", ["wrong master key", "flipped keyring", "no keyring"])
def test_without_the_keyring_nothing_is_recovered_or_changed(tmp_path, state_dir: str, master: MasterKey, damage: str) -> None:  # type: ignore[no-untyped-def]
    """A wrong master key, a keyring that fails authentication or none at all: the error says nothing can be
    recovered without it, and the directory is untouched."""
    three_deltas(state_dir, master)
    flip(os.path.join(state_dir, "snapshot.g000003.enc"))
    ring = os.path.join(state_dir, "keyring.enc")
    key = master
    if damage == "wrong master key":
        key = masterkey.create_key_file(str(tmp_path / "other.key"))
    elif damage == "flipped keyring":
        with open(ring, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
    else:
        os.rename(ring, str(tmp_path / "keyring.enc"))
    before = tree_bytes(state_dir)
    expected = IntegrityError if damage == "flipped keyring" else KeyMaterialError
    with pytest.raises(expected, match="nothing can be recovered without the keyring"):
        recover.recover(state_dir, key, now_ms=NOW)
    assert tree_bytes(state_dir) == before


def test_with_nothing_to_restore_from_nothing_changes(state_dir: str, master: MasterKey) -> None:
    """The only base is bad, no backup exists and the journal no longer starts at lsn 1: recover refuses to build a
    store from a fragment, and changes nothing."""
    segments_one_per_open(state_dir, master)
    flip(os.path.join(state_dir, "snapshot.g000001.enc"))
    before = tree_bytes(state_dir)
    with pytest.raises(IntegrityError, match="nothing to restore from"):
        recover.recover(state_dir, master, now_ms=NOW)
    assert tree_bytes(state_dir) == before


CHILD = """
import sys
from natalia_secure import masterkey, recover
master = masterkey.read_key_file(sys.argv[2])
sys.stdout.write("ready\\n")
sys.stdout.flush()
recover.recover(sys.argv[1], master)
sys.stdout.write("done\\n")
sys.stdout.flush()
"""


def test_a_recover_killed_at_any_instant_is_finished_by_a_rerun(  # type: ignore[no-untyped-def]
    tmp_path, master_key_file: str, master: MasterKey, state_dir: str
) -> None:
    """SIGKILL at a random instant of a recover run in another process (a bad base, three deltas to set aside, a
    backup to restore), then a rerun: the store opens with exactly what an uninterrupted run gives, and every byte
    of the damaged directory is still there. RECOVER_SEED=N reruns a schedule."""
    template = state_dir  # copied for every run, never recovered itself
    w = Writer()
    with w.open(template, master) as store:
        for step in range(4):
            for i in range(300):
                store.add_message(f"+1555{i:07d}", "user", f"m{w.n}-{i}", T0 + w.n)
            w.batch(store)
            store.snapshot()
            if step < 2:
                store.backup()
        w.batch(store)
    flip(os.path.join(template, "snapshot.g000001.enc"))
    original = tree_bytes(template)

    def run(directory: str, kill_after: float | None) -> float:
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        child = subprocess.Popen([sys.executable, "-c", CHILD, directory, master_key_file], stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        started = time.monotonic()
        if kill_after is not None:
            time.sleep(kill_after)
            child.send_signal(signal.SIGKILL)
        code = child.wait(timeout=30)
        assert kill_after is not None or code == 0
        return time.monotonic() - started

    clean = str(tmp_path / "clean")
    shutil.copytree(template, clean)
    duration = run(clean, None)
    expected = messages(clean, master)
    seed = int(os.environ.get("RECOVER_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    for trial in range(6):
        directory = str(tmp_path / f"trial{trial}")
        shutil.copytree(template, directory)
        run(directory, rng.uniform(0, duration * 1.2))
        recover.recover(directory, master)
        assert kept_everything(original, tree_bytes(directory)), f"seed {seed}, trial {trial}"
        assert messages(directory, master) == expected, f"seed {seed}, trial {trial}"
        assert recover.recover(directory, master).nothing_to_recover, f"seed {seed}, trial {trial}"
