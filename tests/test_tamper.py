"""Tamper figures (issue 7): a sealed file of any kind, altered in any way, is refused where the store reads it;
nothing tampered is ever loaded, and nothing under the state directory is ever written, truncated or deleted.

tests/test_envelope.py flips every byte of the format in memory. Here the files are real files of a real store,
each read the way the store reads it, per kind: the base snapshot, a delta, a journal segment, a backup, the keyring.

1. Every byte of a small file of each kind, flipped (xor 0x01, then xor 0x80), one at a time, in a real state
   directory: `Store.open` refuses it (IntegrityError, or KeyMaterialError when the keyring's header names another
   master key) and `verify_state_dir` names the file. Backups are not read by `Store.open` (it loads the snapshot
   chain and the journal): for them the store opens with its own content unchanged and `newest_good_backup` (what
   pruning protects, what `recover` would restore) never returns the flipped file. The one leniency the format
   allows, a torn tail (SECURITY.md, "Durability and the journal's tail"), is checked to apply only to a tail that was
   never acknowledged: in a segment whose records are all complete every flip is refused; in a segment that a
   SIGKILL cut inside its last record, a flip in the cut record's ciphertext is still a torn tail (the store opens
   without it and says so), a flip anywhere else is refused.
2. Random mutations of a large store (thousands of sessions, a 64 KiB-chunked base, deltas, several journal
   segments, backups, a keyring after a key rotation): byte flips and bursts, truncations, extensions (random bytes,
   zeros, a chunk or record of the same or another file), deleted and inserted ranges, chunks or records swapped
   within a file or copied from another file, and whole files swapped between generations. Two levels:
   - the file's own reader on a mutated copy of one file (`snapshot.read_file`, `journal.read_segment`,
     `keyring.load`): these are the functions `Store.open` reads every file of this store through (chain,
     replayed segments, keyring) and `verify`/`recover` read backups through, so a refusal there is the store's
     refusal, and what such a reader returns is all the store would ever load from that file;
   - the whole store (`Store.open`, writing, on a copy of the state directory with the mutation in place, the tree
     compared byte for byte before and after): every whole-file swap (the name is part of what is checked), every
     journal mutation the segment reader accepts (bytes cut off or appended read as a torn tail: whether that is
     allowed depends on the segments after it), and one in STORE_SAMPLE of the others, also through `verify`.
   Two outcomes are the format's documented limits, counted apart: bytes appended to a segment that read as a torn
   tail (fewer than a record head, or zeros: dropped, reported, never loaded, nothing lost), and the newest segment
   cut short (SECURITY.md "What is not protected": indistinguishable from a crash; the store loads exactly the
   records before the cut and reports the torn tail unless the cut falls on a record boundary).
TAMPER_SEED=N replays a schedule (the seed is printed and named in every failure).
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from natalia_secure import backups, envelope, journal, keyring, masterkey, sessions, snapshot
from natalia_secure.clock import iso_utc, now_ms
from natalia_secure.envelope import RECORD_HEAD, TAG_LEN, WRAPPED_KEY_LEN
from natalia_secure.errors import IntegrityError, KeyMaterialError
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store, StoreOptions
from natalia_secure.verify import verify_state_dir

from .conftest import tree_bytes
from .figures import Recorder

REFUSED = (IntegrityError, KeyMaterialError)  # EnvelopeError is an IntegrityError
SMALL = StoreOptions(chunk=envelope.MIN_CHUNK)  # 64-byte chunks: a small file still has several
LARGE = StoreOptions(chunk=64 * 1024, delta_ratio=100.0, max_deltas=64, max_messages=10**6)
MUTATIONS = 10_000
LONG_MUTATIONS = 100_000
STORE_SAMPLE = 100  # one in this many file-level mutations is also tried on the whole store (and verify)
SESSIONS = 2_000
SEGMENTS = 3  # journal segments after the newest snapshot
RECORDS = 200  # records per segment
MASKS = (0x01, 0x80)


class Clock:
    """A clock the builder moves: backups are named by the second, and claims must stay young (7 days)."""

    def __init__(self) -> None:
        self.now = now_ms() - 3_600_000

    def __call__(self) -> int:
        return self.now


def new_state_dir(path: str, master: MasterKey, now: int) -> str:
    os.mkdir(path, 0o700)
    keyring.save(path, keyring.Keyring.new(iso_utc(now)), master, now)
    return path


def phone(i: int) -> str:
    return f"3460{i:07d}"  # fictitious numbers in the shape WhatsApp sends


def contents(store: Store) -> tuple[dict[str, bytes], dict[str, int], int]:
    """What a store holds: every session as bytes, the claims, the lsn (equal tuples: the same state)."""
    table, claims = store.contents()
    return dict(table), dict(claims), store.lsn


def failed_files(state_dir: str, master: MasterKey) -> tuple[bool, list[str], dict[str, str | None]]:
    report = verify_state_dir(state_dir, master)
    return report.ok, [f.file for f in report.files if not f.ok], {f.file: f.note for f in report.files}


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# ---- 1. every byte of a small file of each kind ----


@dataclass
class SmallStore:
    state: str
    files: dict[str, str]  # kind -> path relative to the state directory
    torn_at: int  # where the torn copy of the segment cuts its last record
    reference: tuple[dict[str, bytes], dict[str, int], int]  # what the store holds
    reference_torn: tuple[dict[str, bytes], dict[str, int], int]  # what it holds with the torn segment


def build_small(root: str, master: MasterKey) -> SmallStore:
    """A base (two sessions), a delta, a segment of three complete records after it, a backup, the keyring."""
    clock = Clock()
    state = new_state_dir(os.path.join(root, "state"), master, clock.now)
    with Store.open(state, master, SMALL, clock=clock) as store:
        store.add_message(phone(1), "user", "hola", clock.now, message_id="wamid.S1")
        store.add_message(phone(2), "user", "buenas tardes", clock.now, message_id="wamid.S2")
        store.flush()
        store.snapshot(full=True)
        store.add_message(phone(1), "assistant", "hola, que tal", clock.now + 1)
        store.flush()
        store.snapshot()
        for i in range(3):
            store.add_message(phone(2), "user", f"mensaje {i}", clock.now + 2 + i, message_id=f"wamid.J{i}")
        store.flush()
        clock.now += 1000
        store.backup()
    names = sorted(os.listdir(state))
    [segment] = [n for n in names if journal.SEGMENT_NAME.match(n)]
    [backup] = os.listdir(os.path.join(state, backups.DIRNAME))
    files = {
        "base snapshot": snapshot.snapshot_name(1),
        "delta snapshot": snapshot.snapshot_name(2),
        "journal segment": segment,
        "backup": os.path.join(backups.DIRNAME, backup),
        "keyring": keyring.FILENAME,
    }
    assert snapshot.snapshot_name(1) in names and snapshot.snapshot_name(2) in names
    with Store.open(state, master, readonly=True) as store:
        reference = contents(store)
        assert len(store.replayed) == 1 and len(store.replayed[0].payloads) == 3
    # The torn copy: the segment as a SIGKILL during its last record's write leaves it (a prefix of that record).
    with open(os.path.join(state, segment), "rb") as f:
        data = f.read()
    starts = record_starts(data)
    torn_at = starts[-1] + RECORD_HEAD.size + 20
    torn_state = os.path.join(root, "torn")
    shutil.copytree(state, torn_state)
    os.truncate(os.path.join(torn_state, segment), torn_at)
    with Store.open(torn_state, master, readonly=True) as store:
        reference_torn = contents(store)
        assert store.dropped_torn_tails == 1 and reference_torn[2] == reference[2] - 1
    shutil.rmtree(torn_state)
    return SmallStore(state, files, torn_at, reference, reference_torn)


def record_starts(data: bytes) -> list[int]:
    """Offsets of a segment's records (its complete ones and a torn one at the end, if any)."""
    _, end = envelope.parse_prefix(data)
    pos, starts = end + WRAPPED_KEY_LEN, []
    while pos + RECORD_HEAD.size <= len(data):
        starts.append(pos)
        n, _ = RECORD_HEAD.unpack_from(data, pos)
        pos += RECORD_HEAD.size + n
    return starts


def flips(path: str) -> Iterator[tuple[int, int]]:
    """Each byte of the file xor each of MASKS in turn, written in place (yields offset, mask); restored at the end."""
    with open(path, "rb") as f:
        good = f.read()
    try:
        for i in range(len(good)):
            for mask in MASKS:
                bad = bytearray(good)
                bad[i] ^= mask
                write(path, bytes(bad))
                yield i, mask
    finally:
        write(path, good)


def check_flips(small: SmallStore, master: MasterKey, kind: str, torn_from: int | None = None) -> collections.Counter[str]:
    """Flip every byte of one file: refused by Store.open and named by verify (a backup: never chosen, never loaded),
    or, at offsets >= torn_from (the torn record's ciphertext), a torn tail. The tree never changes."""
    rel = small.files[kind]
    path = os.path.join(small.state, rel)
    outcomes: collections.Counter[str] = collections.Counter()
    for i, mask in flips(path):
        where = f"{kind} {rel}, byte {i} xor {mask:#04x}"
        before = tree_bytes(small.state)
        torn = torn_from is not None and i >= torn_from
        if kind == "backup":
            with Store.open(small.state, master, SMALL) as store:
                assert contents(store) == small.reference, f"{where}: the store changed"
                assert store.newest_good_backup() is None, f"{where}: a flipped backup was taken as good"
            outcome = "never chosen"
        elif torn:
            with Store.open(small.state, master, SMALL) as store:
                assert contents(store) == small.reference_torn, f"{where}: the torn tail was loaded"
                assert store.dropped_torn_tails == 1, where
            outcome = "torn tail dropped"
        else:
            with pytest.raises(REFUSED) as refused:
                Store.open(small.state, master, SMALL).close()
            outcome = f"refused ({type(refused.value).__name__})"
        ok, failed, notes = failed_files(small.state, master)
        if torn:
            assert ok and "torn tail" in (notes[rel] or ""), f"{where}: verify must note the torn tail: {failed}"
        else:
            assert not ok and rel in failed, f"{where}: verify did not name the file: {failed}"
        assert tree_bytes(small.state) == before, f"{where}: the state directory was written"
        outcomes[outcome] += 1
    return outcomes


@pytest.mark.reliability
def test_every_flipped_byte_of_each_file_kind_is_refused_at_the_store_level(
    tmp_path: Any, master: MasterKey, figures: Recorder
) -> None:
    """Every byte of a base, a delta, a journal segment, a backup and the keyring, flipped (0x01 and 0x80): the store
    refuses to open (a backup is never chosen), verify names the file, nothing is written; in a segment cut inside
    its last record by a crash only that record's ciphertext may flip and still read as a torn tail."""
    small = build_small(str(tmp_path), master)
    counts: dict[str, collections.Counter[str]] = {}
    for kind in small.files:
        counts[kind] = check_flips(small, master, kind)
    # The same segment as a SIGKILL inside its last record leaves it: flips in that record's head are refused
    # (the CRC), in its ciphertext the tail is still torn (never acknowledged); before it, refused as ever.
    segment = os.path.join(small.state, small.files["journal segment"])
    with open(segment, "rb") as f:
        whole = f.read()
    os.truncate(segment, small.torn_at)
    try:
        torn_from = record_starts(whole)[-1] + RECORD_HEAD.size
        counts["torn segment"] = check_flips(small, master, "journal segment", torn_from)
    finally:
        write(segment, whole)
    assert tree_bytes(small.state)[small.files["journal segment"]] == whole
    sizes = {kind: os.path.getsize(os.path.join(small.state, rel)) for kind, rel in small.files.items()}
    sizes["torn segment"] = small.torn_at
    for kind, outcome in counts.items():
        assert sum(outcome.values()) == 2 * sizes[kind], (kind, outcome)
        legal = outcome["torn tail dropped"] + outcome["never chosen"]
        assert legal == {"torn segment": 2 * (small.torn_at - torn_from), "backup": 2 * sizes["backup"]}.get(kind, 0)
    total = sum(sum(c.values()) for c in counts.values())
    refused = sum(n for c in counts.values() for o, n in c.items() if o.startswith("refused"))
    print(f"flips: {dict(counts)}")
    figures.record(
        "Tamper",
        "every byte of a small file of each kind flipped (xor 0x01, xor 0x80): base, delta, journal segment, backup, "
        "keyring, and a segment a crash cut inside its last record; Store.open and verify on the real directory",
        f"{total:,} flips ({', '.join(f'{k} {2 * sizes[k]:,}' for k in counts)}): {refused:,} refused by Store.open "
        f"and named by verify, {counts['backup']['never chosen']:,} backup flips named by verify and never chosen; "
        f"{counts['torn segment']['torn tail dropped']} flips inside the crash-cut record read as its torn tail "
        "(never acknowledged, not loaded); 0 loaded, 0 files written",
        "100% refused, never loaded, never overwritten",
        True,
    )


# ---- 2. random mutations of a large store ----


@dataclass
class LargeStore:
    state: str  # the pristine state directory: never changed
    master: MasterKey
    keys: dict[str, bytes]
    files: dict[str, bytes]  # relative path -> bytes
    kinds: dict[str, str]  # relative path -> base, delta, journal, backup, keyring
    segments: list[str]  # replayed segments, oldest first
    payloads: dict[str, list[bytes]]  # segment -> its records' payloads
    attic: dict[str, bytes]  # files the store no longer uses: an older keyring, obsolete segments, a foreign keyring
    reference: tuple[dict[str, bytes], dict[str, int], int]
    pieces: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # chunks or records: (start, end)

    def kind(self, name: str) -> str:
        """A file's kind, the attic's included (segments and keyrings there)."""
        if name in self.kinds:
            return self.kinds[name]
        return "journal" if journal.SEGMENT_NAME.match(name) else "keyring"


def build_large(root: str, master: MasterKey) -> LargeStore:
    """SESSIONS sessions imported as a base, a key rotation, three deltas (20% of sessions changed each), backups
    after the first and the third, then SEGMENTS journal segments of RECORDS records each (one per writing open)."""
    rng = random.Random(7)  # the content: fixed, so the store has the same shape every run
    clock = Clock()
    state = new_state_dir(os.path.join(root, "state"), master, clock.now)
    attic: dict[str, bytes] = {}
    with open(os.path.join(state, keyring.FILENAME), "rb") as f:
        attic["keyring.enc (before the rotation)"] = f.read()
    n = 0
    with Store.open(state, master, LARGE, clock=clock) as store:
        pairs = []
        for i in range(SESSIONS):
            session = sessions.new_session(clock.now)
            for k in range(3):
                text = f"mensaje {k} de la conversacion {i} " + "x" * rng.randint(0, 40)
                sessions.append_message(session, ("user", "assistant")[k % 2], text, clock.now + k)
            pairs.append((phone(i), session))
        store.import_sessions(pairs)
        store.save_keyring(store.keyring.rotated(iso_utc(clock.now)))
        for d in range(3):
            for i in rng.sample(range(SESSIONS), SESSIONS // 5):
                n += 1
                clock.now += 7
                text = f"nuevo {n} " + "y" * rng.randint(0, 100)
                store.add_message(phone(i), "user", text, clock.now, message_id=f"wamid.T{n}")
            store.flush()
            for name in os.listdir(state):  # the segment this snapshot makes obsolete: kept for the swaps
                if journal.SEGMENT_NAME.match(name):
                    with open(os.path.join(state, name), "rb") as f:
                        attic[name] = f.read()
            store.snapshot()
            if d != 1:
                clock.now += 1000
                store.backup()
    for _ in range(SEGMENTS):
        with Store.open(state, master, LARGE, clock=clock) as store:
            for _ in range(RECORDS):
                n += 1
                clock.now += 7
                text = f"cola {n} " + "z" * rng.randint(0, 100)
                store.add_message(phone(rng.randrange(SESSIONS)), "user", text, clock.now, message_id=f"wamid.T{n}")
                if rng.random() < 0.1:
                    store.flush()
    foreign = os.path.join(root, "foreign")
    os.mkdir(foreign)
    other = masterkey.create_key_file(os.path.join(foreign, "master.key"))
    new_state_dir(os.path.join(foreign, "state"), other, clock.now)
    with open(os.path.join(foreign, "state", keyring.FILENAME), "rb") as f:
        attic["keyring.enc (another installation's)"] = f.read()
    shutil.rmtree(foreign)

    files = tree_bytes(state)
    keys = keyring.load(state, master).usable()
    kinds = {rel: kind_of(os.path.join(state, rel), keys) for rel in files}
    segments = sorted(r for r, k in kinds.items() if k == "journal")
    with Store.open(state, master, readonly=True) as store:
        reference = contents(store)
        assert [os.path.basename(r.path) for r in store.replayed] == segments
        payloads = {os.path.basename(r.path): r.payloads for r in store.replayed}
    large = LargeStore(state, master, keys, files, kinds, segments, payloads, attic, reference)
    for rel, data in files.items():
        large.pieces[rel] = pieces_of(data)
    for name, data in attic.items():
        large.pieces[name] = pieces_of(data)
    shape = collections.Counter(kinds.values())
    assert shape == {"base": 1, "delta": 3, "journal": SEGMENTS, "backup": 2, "keyring": 1}, shape
    assert len(large.pieces[snapshot.snapshot_name(1)]) >= 10 and all(
        len(large.pieces[r]) >= 3 for r, k in kinds.items() if k in ("delta", "backup")
    ), "several chunks per file"
    return large


def kind_of(path: str, keys: dict[str, bytes]) -> str:
    name = os.path.basename(path)
    if backups.parse_name(name):
        return "backup"
    if name.startswith(keyring.FILENAME):
        return "keyring"
    if journal.SEGMENT_NAME.match(name):
        return "journal"
    return "base" if snapshot.read_meta(path, keys)[1]["parent"] is None else "delta"


def pieces_of(data: bytes) -> list[tuple[int, int]]:
    """The body's chunks (stream kinds) or records (journal), as (start, end) offsets."""
    header, end = envelope.parse_prefix(data)
    start = end + WRAPPED_KEY_LEN
    if header.kind == "journal":
        starts = record_starts(data)
        return list(zip(starts, [*starts[1:], len(data)], strict=True))
    assert header.chunk is not None
    size = header.chunk + TAG_LEN
    return [(p, min(p + size, len(data))) for p in range(start, len(data), size)]


@dataclass
class Mutation:
    rel: str  # the file it changes (the target of a swap)
    what: str  # e.g. "flip 1 byte", "truncate", "swap names with journal.000006.enc"
    data: bytes | None = None  # the file's new content (None: a swap done by `apply`)
    apply: Callable[[str], None] | None = None  # a swap: done on a state directory
    kind: str = ""  # of the target file


def structure_points(large: LargeStore, rel: str) -> list[int]:
    """Offsets worth aiming at: the header, the wrapped key, each chunk's or record's start and tag."""
    data = large.files.get(rel) or large.attic[rel]
    _, end = envelope.parse_prefix(data)
    points = [0, len(envelope.MAGIC), len(envelope.MAGIC) + 2, end - 1, end, end + WRAPPED_KEY_LEN - 1]
    for start, stop in large.pieces[rel]:
        points += [start, start + 4, start + RECORD_HEAD.size, stop - TAG_LEN, stop - 1]
    return [p for p in points if 0 <= p < len(data)]


def random_mutation(large: LargeStore, rng: random.Random) -> Mutation:
    """One in-file mutation of one file of the store, never a no-op."""
    rel = rng.choice(sorted(large.files))
    data = large.files[rel]
    kind = large.kinds[rel]
    pieces = large.pieces[rel]
    op = rng.choice(("flip", "truncate", "extend", "splice", "swap pieces", "foreign piece"))
    if op == "swap pieces" and len(pieces) < 2:
        op = "flip"

    def point() -> int:
        if rng.random() < 0.5:
            return rng.randrange(len(data))
        return min(len(data) - 1, max(0, rng.choice(structure_points(large, rel)) + rng.randint(-2, 2)))

    def other_piece() -> bytes:
        """A chunk of another stream file with the same chunk size, or a record of another segment."""
        same = [r for r in [*large.files, *large.attic] if r != rel and (large.kind(r) == "journal") == (kind == "journal")]
        if kind != "journal":
            size = pieces[0][1] - pieces[0][0]
            same = [r for r in same if (large.pieces[r][0][1] - large.pieces[r][0][0] == size) or kind == "keyring"]
        src = rng.choice(same)
        blob = large.files.get(src) or large.attic[src]
        start, stop = rng.choice(large.pieces[src])
        return blob[start:stop]

    if op == "flip":
        at, width = point(), 1 if rng.random() < 0.7 else rng.randint(2, 16)
        bad = bytearray(data)
        for i in range(at, min(at + width, len(data))):
            bad[i] ^= rng.randint(1, 255)
        return Mutation(rel, f"flip {width} byte(s) at {at}", bytes(bad), kind=kind)
    if op == "truncate":
        cut = point()
        return Mutation(rel, f"truncate to {cut} bytes", data[:cut], kind=kind)
    if op == "extend":
        how = rng.choice(("random", "zeros", "own piece", "other piece"))
        if how == "random":
            extra = rng.randbytes(rng.randint(1, 300))
        elif how == "zeros":
            extra = bytes(rng.randint(1, 4096))
        elif how == "own piece":
            start, stop = rng.choice(pieces)
            extra = data[start:stop]
        else:
            extra = other_piece()
        return Mutation(rel, f"extend by {len(extra)} bytes ({how})", data + extra, kind=kind)
    if op == "splice":
        at = point()
        if rng.random() < 0.5:
            gone = rng.randint(1, 200)
            return Mutation(rel, f"delete {gone} bytes at {at}", data[:at] + data[at + gone :], kind=kind)
        extra = rng.randbytes(rng.randint(1, 64))
        return Mutation(rel, f"insert {len(extra)} bytes at {at}", data[:at] + extra + data[at:], kind=kind)
    if op == "swap pieces":
        (a0, a1), (b0, b1) = sorted(rng.sample(pieces, 2))
        swapped = data[:a0] + data[b0:b1] + data[a1:b0] + data[a0:a1] + data[b1:]
        return Mutation(rel, f"swap {'records' if kind == 'journal' else 'chunks'} at {a0} and {b0}", swapped, kind=kind)
    start, stop = rng.choice(pieces)
    piece = other_piece()
    return Mutation(rel, f"replace the piece at {start} by one of another file", data[:start] + piece + data[stop:], kind=kind)


def swaps(large: LargeStore) -> list[Mutation]:
    """Whole files between generations: deltas and segments exchanged or renamed, an obsolete segment in place of a
    replayed one, backups exchanged or renamed to another generation, a backup or a segment in place of a
    snapshot, an older keyring (before the rotation) and another installation's keyring."""
    out: list[Mutation] = []
    snaps = sorted(r for r, k in large.kinds.items() if k in ("base", "delta"))
    segs = large.segments
    bks = sorted(r for r, k in large.kinds.items() if k == "backup")

    def exchange(a: str, b: str) -> Mutation:
        def apply(state: str) -> None:
            pa, pb = os.path.join(state, a), os.path.join(state, b)
            os.rename(pa, pa + ".x")
            os.rename(pb, pa)
            os.rename(pa + ".x", pb)

        return Mutation(b, f"exchange {a} and {b}", apply=apply, kind=large.kinds[b])

    def rename(a: str, b: str) -> Mutation:
        def apply(state: str) -> None:
            os.rename(os.path.join(state, a), os.path.join(state, b))

        return Mutation(a, f"rename {a} to {b}", apply=apply, kind=large.kinds[a])

    def put(content: bytes, b: str, what: str) -> Mutation:
        return Mutation(b, f"{what} in place of {b}", content, kind=large.kinds[b])

    for i, a in enumerate(snaps):
        for b in snaps[i + 1 :]:
            out.append(exchange(a, b))
    last = snapshot.list_generations(large.state)[-1]
    for rel in snaps[1:]:
        out.append(rename(rel, snapshot.snapshot_name(last + 1 + snaps.index(rel))))  # a delta as a newer generation
    for i, a in enumerate(segs):
        for b in segs[i + 1 :]:
            out.append(exchange(a, b))
    newest_segment = int(journal.SEGMENT_NAME.match(segs[-1]).group(1))  # type: ignore[union-attr]
    out.append(rename(segs[-1], journal.segment_name(newest_segment + 1)))
    for name, content in large.attic.items():
        if journal.SEGMENT_NAME.match(name):
            for b in segs:
                out.append(put(content, b, f"obsolete segment {name}"))
    out.append(exchange(bks[0], bks[1]))
    for rel in bks:
        info = backups.parse_name(os.path.basename(rel))
        assert info is not None
        for generation in (info.generation - 1, info.generation + 1):
            renamed = f"sessions.{info.time.strftime('%Y%m%dT%H%M%SZ')}.g{generation:06d}.enc"
            out.append(rename(rel, os.path.join(backups.DIRNAME, renamed)))
    out.append(put(large.files[bks[-1]], snaps[-1], f"backup {bks[-1]}"))
    out.append(put(large.files[snaps[0]], bks[-1], f"base {snaps[0]}"))
    out.append(put(large.files[segs[0]], snaps[-1], f"segment {segs[0]}"))
    out.append(put(large.files[snaps[-1]], segs[-1], f"snapshot {snaps[-1]}"))
    for name, content in large.attic.items():
        if name.startswith(keyring.FILENAME):
            out.append(put(content, keyring.FILENAME, name))
    return out


def read_one(large: LargeStore, scratch: str, mutation: Mutation) -> Any:
    """The mutated file read by its own reader from a scratch directory; returns what the reader returned."""
    assert mutation.data is not None
    name = os.path.basename(mutation.rel)
    path = os.path.join(scratch, name)
    write(path, mutation.data)
    try:
        if mutation.kind == "keyring":
            return keyring.load(scratch, large.master)
        if mutation.kind == "journal":
            number = int(journal.SEGMENT_NAME.match(name).group(1))  # type: ignore[union-attr]
            return journal.read_segment(path, number, large.keys)
        return snapshot.read_file(path, large.keys, "backup" if mutation.kind == "backup" else "snapshot")
    finally:
        with open(path, "rb") as f:
            assert f.read() == mutation.data, f"{mutation.what}: the reader changed the file"
        os.unlink(path)


def store_trial(large: LargeStore, work: str, mutation: Mutation, expect: str, with_verify: bool) -> str:
    """The mutation in place in `work` (a copy of the pristine directory), the whole store opened for writing, the
    tree compared byte for byte, the mutation undone. `expect`: "refused", "unchanged" (opens with the reference
    content: the file is not one the store loads, or the mutation only appended a torn tail) or "cut" (the newest
    segment cut short: opens with exactly the records before the cut). Returns the outcome."""
    if mutation.apply is not None:
        mutation.apply(work)
        before = tree_bytes(work)
    else:
        assert mutation.data is not None
        write(os.path.join(work, mutation.rel), mutation.data)
        before = {**large.files, mutation.rel: mutation.data}
    after = before
    try:
        outcome = ""
        try:
            store = Store.open(work, large.master, LARGE)
        except REFUSED:
            outcome = "refused by Store.open"
        else:
            with store:
                state = contents(store)
                torn = store.dropped_torn_tails > 0
            if expect == "cut":
                assert mutation.data is not None
                size = len(mutation.data)
                ends = [end for _, end in large.pieces[mutation.rel]]
                kept = sum(end <= size for end in ends)
                at_boundary = size in (large.pieces[mutation.rel][0][0], *ends)
                assert state[2] == large.reference[2] - (len(ends) - kept), f"{mutation.what}: not the records before the cut"
                assert torn == (not at_boundary), f"{mutation.what}: torn tail {torn}, cut at a record boundary {at_boundary}"
                outcome = "newest segment cut" + (" at a record boundary" if at_boundary else "")
            else:
                assert state == large.reference, f"{mutation.what}: the store loaded something else"
                outcome = "read as a torn tail" if torn else "not loaded by Store.open"
        after = tree_bytes(work)
        assert after == before, f"{mutation.what}: the state directory was written"
        if outcome.startswith("refused"):
            assert expect == "refused", f"{mutation.what}: refused, expected {expect}"
        else:
            assert expect != "refused", f"{mutation.what}: the store opened"
        if with_verify or outcome == "not loaded by Store.open":
            ok, failed, _ = failed_files(work, large.master)
            if outcome == "not loaded by Store.open":
                assert not ok and failed, f"{mutation.what}: verify did not flag it"
                if mutation.kind == "backup":
                    with Store.open(work, large.master, LARGE, readonly=True) as store:
                        good = store.newest_good_backup()
                    assert good is None or os.path.join(backups.DIRNAME, good.name) not in failed, mutation.what
                outcome = "flagged by verify (not loaded by the store)"
            elif outcome.startswith("refused"):
                assert not ok, f"{mutation.what}: verify passed it"
            else:  # a torn tail or a cut: what a crash leaves, so verify passes it, and says so when there is a trace
                assert ok, f"{mutation.what}: verify failed {failed}"
            after = tree_bytes(work)
            assert after == before, f"{mutation.what}: verify wrote"
        return outcome
    finally:
        restore(large, work, after)


def restore(large: LargeStore, work: str, found: dict[str, bytes]) -> None:
    """Put `work`, holding `found`, back to the pristine tree: stray names removed, changed files rewritten."""
    for rel in found.keys() - large.files.keys():
        os.unlink(os.path.join(work, rel))
    for rel, data in large.files.items():
        if found.get(rel) != data:
            path = os.path.join(work, rel)
            write(path, data)
            os.chmod(path, 0o600)


def run_mutations(tmp_path: Any, master: MasterKey, count: int) -> dict[str, Any]:
    seed = int(os.environ.get("TAMPER_SEED", random.randrange(2**32)))
    print(f"TAMPER_SEED={seed}")
    rng = random.Random(seed)
    large = build_large(str(tmp_path), master)
    scratch = str(tmp_path / "scratch")
    os.mkdir(scratch, 0o700)
    work = str(tmp_path / "work")
    shutil.copytree(large.state, work)
    outcomes: collections.Counter[str] = collections.Counter()
    ops: collections.Counter[str] = collections.Counter()
    store_level = 0
    for mutation in swaps(large):
        where = f"TAMPER_SEED={seed}, swap: {mutation.what}"
        try:
            outcome = store_trial(large, work, mutation, "refused" if mutation.kind != "backup" else "unchanged", True)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        assert outcome in ("refused by Store.open", "flagged by verify (not loaded by the store)"), (where, outcome)
        outcomes[outcome] += 1
        ops["whole-file swap"] += 1
        store_level += 1
    for trial in range(count - ops["whole-file swap"]):
        mutation = random_mutation(large, rng)
        assert mutation.data != large.files[mutation.rel]
        where = f"TAMPER_SEED={seed}, mutation {trial}: {mutation.what} of {mutation.rel}"
        ops[mutation.what.split(" ")[0]] += 1
        try:
            try:
                result = read_one(large, scratch, mutation)
            except REFUSED:
                outcome = "refused by the file's reader"
                if trial % STORE_SAMPLE == 0:  # the store agrees (a backup: verify flags it, nothing loads it)
                    store_trial(large, work, mutation, "unchanged" if mutation.kind == "backup" else "refused", True)
                    store_level += 1
            else:
                # Only a journal segment may read (a torn tail, or records cut at a boundary), and only as a
                # prefix of what was written: never a changed record.
                assert mutation.kind == "journal", f"{where}: the reader accepted it"
                name = os.path.basename(mutation.rel)
                assert isinstance(result, journal.SegmentRead)
                assert result.payloads == large.payloads[name][: len(result.payloads)], f"{where}: altered records read"
                appended = mutation.what.startswith("extend")
                assert appended or mutation.what.startswith(("truncate", "delete")), f"{where}: accepted"
                if appended:
                    assert result.torn and result.payloads == large.payloads[name], where
                    expect = "unchanged"
                elif name == large.segments[-1]:
                    expect = "cut"
                else:
                    expect = "refused"
                outcome = store_trial(large, work, mutation, expect, trial % STORE_SAMPLE == 0)
                store_level += 1
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        outcomes[outcome] += 1
    assert tree_bytes(large.state) == large.files and tree_bytes(work) == large.files, "the work copy was not restored"
    summary = {"seed": seed, "mutations": count, "store_level": store_level, "outcomes": dict(outcomes), "ops": dict(ops)}
    print(f"tamper: {summary}")
    return summary


def record(figures: Recorder, summary: dict[str, Any]) -> None:
    o = collections.Counter(summary["outcomes"])
    cuts, boundary = o["newest segment cut"], o["newest segment cut at a record boundary"]
    limits = o["read as a torn tail"] + cuts + boundary
    ops = ", ".join(f"{n:,} {op}" for op, n in sorted(summary["ops"].items(), key=lambda x: -x[1]))
    figures.record(
        "Tamper",
        f"random mutations of a large store ({SESSIONS:,} sessions, 64 KiB chunks; base, 3 deltas, {SEGMENTS} "
        "journal segments, 2 backups, keyring after a key rotation): each file's reader on its mutated copy, "
        f"Store.open on {summary['store_level']:,} (every swap, every journal change the reader accepts, 1 in "
        f"{STORE_SAMPLE} of the rest), verify on the swaps and the sample",
        f"{summary['mutations']:,} mutations ({ops}), each detected or a documented journal-tail limit: "
        f"{summary['mutations'] - limits:,} refused or flagged ({o['refused by the file' + chr(39) + 's reader']:,} "
        f"by the file's reader, {o['refused by Store.open']:,} by Store.open, "
        f"{o['flagged by verify (not loaded by the store)']:,} backups by verify); limits (SECURITY.md): "
        f"{o['read as a torn tail']:,} appended tails dropped as torn, {cuts + boundary:,} cuts of the newest segment "
        f"loading exactly the records before the cut ({boundary:,} at a record boundary leave no trace); "
        "0 altered records loaded, 0 files written",
        "100% detected, never loaded, never overwritten",
        True,
    )


@pytest.mark.reliability
def test_random_mutations_of_a_large_store_are_detected(tmp_path: Any, master: MasterKey, figures: Recorder) -> None:
    """10,000 mutations of a large store's files (flips, cuts, extensions, splices, chunk and record swaps, pieces of
    other files, whole-file swaps between generations): each refused by its reader or the store, or flagged by
    verify; none loaded, none written; journal cuts and appended tails behave exactly as SECURITY.md documents."""
    summary = run_mutations(tmp_path, master, MUTATIONS)
    assert summary["ops"]["whole-file swap"] >= 20 and all(summary["ops"][op] >= 500 for op in ("flip", "truncate", "extend"))
    record(figures, summary)


@pytest.mark.long
@pytest.mark.reliability
def test_random_mutations_of_a_large_store_long(tmp_path: Any, master: MasterKey, figures: Recorder) -> None:
    """The same with 100,000 mutations."""
    summary = run_mutations(tmp_path, master, LONG_MUTATIONS)
    record(figures, summary)


def test_pieces_of_cut_a_file_into_its_chunks_and_records(tmp_path: Any, master: MasterKey) -> None:
    """The mutation helpers' map of a file is right: chunks of chunk+16 bytes from the end of the wrapped key to the
    end of the file, records that read back with the segment reader, so mutations aimed at them land on them."""
    small = build_small(str(tmp_path), master)
    keys = keyring.load(small.state, master).usable()
    with open(os.path.join(small.state, small.files["base snapshot"]), "rb") as f:
        blob = f.read()
    chunks = pieces_of(blob)
    head = envelope.read_head(blob, keys)
    assert chunks[0][0] == head.size and chunks[-1][1] == len(blob) and len(chunks) >= 3
    assert all(b - a == SMALL.chunk + TAG_LEN for a, b in chunks[:-1])
    with open(os.path.join(small.state, small.files["journal segment"]), "rb") as f:
        seg = f.read()
    records = pieces_of(seg)
    assert len(records) == 3 and records[-1][1] == len(seg)
    assert all(struct.unpack(">I", seg[a : a + 4])[0] + RECORD_HEAD.size == b - a for a, b in records)
