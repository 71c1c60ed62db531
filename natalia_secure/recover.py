"""`natalia-secure recover`: bring a store that refuses to open back to one that opens, and say exactly what was lost.

Guarantee 3 (DESIGN.md): tampering is detected, never repaired. So nothing is repaired in place: a file that fails
authentication or parsing is renamed into `quarantine/` (never copied, changed or deleted; its bytes stay there for
an investigation; nothing it holds is loaded, the report reads only its header and, for a snapshot, a meta frame
that authenticates), and a new state is built beside the files that still authenticate:

    1. the store lock is held for the whole run (the daemon must be stopped) and the keyring opened;
    2. every snapshot, journal segment and backup is authenticated; a store that opens while every file does is
       left exactly as it is ("nothing to recover"), and one that opens beside bad files only has those moved;
    3. the start is the newest usable state: a snapshot chain (a base and its deltas up to the first one that
       cannot be used) or a good backup, whichever covers the higher lsn, or the backup the operator names;
    4. every journal record after it that authenticates is replayed in lsn order through the store's own apply
       path; the lsn ranges that no surviving file holds are the loss, reported with the time around them;
    5. bad files, and good snapshots holding changes newer than the start that cannot be used (a delta whose
       parent is bad), go aside: the next compaction would otherwise delete the latter, and they are evidence;
    6. the result is sealed as a new base snapshot, one generation above any ever seen, naming a journal segment
       number never used, so that a normal open loads exactly it and starts a fresh segment.

Good files the new base supersedes stay where they are: the next snapshot compacts them, as after any base.
Every change is a rename, and the new base appears atomically (temp, fsync, rename) only after the renames, so a
SIGKILL at any point leaves a directory that a rerun finishes: the moved files contributed nothing to the rebuild,
so a rerun computes the same state from the same good files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from . import atomicfile, backups, journal, keyring, snapshot, verify
from .clock import compact_utc, iso_utc
from .clock import now_ms as clock_now_ms
from .envelope import DEFAULT_CHUNK, Header
from .errors import IntegrityError, KeyMaterialError, NataliaError, NotFoundError, StoreUnavailable, UsageError
from .lock import StoreLock
from .masterkey import MasterKey
from .store import Store, StoreOptions

# What _move makes of a name: `snapshot.g000003.enc.20261125T101530Z`, `.1` added if that name is taken.
_MOVED = verify.QUARANTINED_NAME


# ---- the report ----


@dataclass
class MovedFile:
    file: str  # relative to the state directory, as before the move
    to: str  # relative to the state directory
    why: str


@dataclass
class Restored:
    kind: str  # "chain", "backup", or "empty" (no snapshot ever, the journal from lsn 1)
    files: list[str]  # the chain's snapshots (base first) or the backup
    created: str | None  # when the newest of them was written
    lsn: int
    sessions: int


@dataclass
class LostRange:
    first_lsn: int
    last_lsn: int | None  # None: as far as a bad file went, which cannot be known
    after: str | None  # the newest time known before the range (a record's timestamp, or the start's)
    before: str | None  # the oldest time known after it

    def describe(self) -> str:
        if self.last_lsn is None:
            what = f"lsn {self.first_lsn} and after (how many records is unknown)"
        else:
            what = f"lsn {self.first_lsn}-{self.last_lsn} ({self.last_lsn - self.first_lsn + 1} records)"
        what += f", written after {self.after}" if self.after else ""
        return what + (f" and before {self.before}" if self.before else "")


@dataclass
class LostFile:
    file: str
    what: str  # a snapshot or segment whose content is unknown, and what can be said of it
    created: str | None  # from its header (unauthenticated when the header does not open)
    modified: str | None  # the file system's last write


@dataclass
class RecoveryReport:
    state_dir: str
    moved: list[MovedFile] = field(default_factory=list)
    restored: Restored | None = None
    replayed: int = 0
    replayed_lsns: tuple[int, int] | None = None
    lost_ranges: list[LostRange] = field(default_factory=list)
    lost_files: list[LostFile] = field(default_factory=list)
    new_base: dict[str, Any] | None = None  # file, generation, lsn, segment, sessions
    notes: list[str] = field(default_factory=list)

    @property
    def nothing_to_recover(self) -> bool:
        return not self.moved and self.new_base is None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["nothing_to_recover"] = self.nothing_to_recover
        return out

    def lines(self) -> list[str]:
        if self.nothing_to_recover:
            return ["nothing to recover: the store opens and every file authenticates", *self.notes]
        out = [f"moved aside: {m.file} -> {m.to} ({m.why})" for m in self.moved]
        if self.restored is not None:
            r = self.restored
            what = {"chain": "snapshot chain ", "backup": "backup ", "empty": "an empty store"}[r.kind] + " + ".join(r.files)
            written = f", written {r.created}" if r.created else ""
            out.append(f"restored from: {what} (lsn {r.lsn}{written}, {r.sessions} sessions)")
        if self.replayed_lsns is not None:
            first, last = self.replayed_lsns
            out.append(f"replayed: {self.replayed} journal records, lsn {first}-{last}")
        elif self.restored is not None:
            out.append("replayed: no journal record follows the restored state")
        out += [f"LOST: {r.describe()}: in no file recover could use" for r in self.lost_ranges]
        out += [f"LOST: {f.file}: {f.what}" + _span(f.created, f.modified) for f in self.lost_files]
        if self.restored is not None and not self.lost_ranges and not self.lost_files:
            out.append("lost: nothing")
        if self.new_base is not None:
            b = self.new_base
            out.append(f"new base: {b['file']} ({b['sessions']} sessions, lsn {b['lsn']}); the store opens from it")
        return out + self.notes


def _span(created: str | None, modified: str | None) -> str:
    parts = ([f"its header says written {created}"] if created else []) + ([f"last modified {modified}"] if modified else [])
    return f" ({'; '.join(parts)})" if parts else ""


# ---- what every file holds ----


@dataclass
class _File:
    rel: str
    path: str
    kind: str  # "snapshot", "journal" or "backup"
    number: int  # generation (a backup: the one it follows) or segment number
    error: str | None = None  # why it is bad; None: it authenticates
    created: str | None = None
    meta: dict[str, Any] | None = None  # a bad snapshot's too, when its first chunk authenticates (for the report)
    first_lsn: int | None = None  # a good segment's
    payloads: list[bytes] = field(default_factory=list, repr=False)
    torn: bool = False

    @property
    def lsn(self) -> int | None:
        return None if self.meta is None else int(self.meta["lsn"])


def _scan(state_dir: str, keys: dict[str, bytes]) -> list[_File]:
    """Authenticate every sealed data file whole (verify.sealed_files names them; quarantine/ is not among them)."""
    found = []
    for sealed in verify.sealed_files(state_dir)[0]:
        f = _File(sealed.rel, sealed.path, sealed.kind, sealed.generation)
        try:
            if f.kind == "journal":
                read = journal.read_segment(f.path, f.number, keys)
                f.first_lsn, f.payloads, f.torn = read.first_lsn, read.payloads, read.torn
            else:
                header, data = snapshot.read_file(f.path, keys, f.kind)
                if header.generation != f.number:
                    raise IntegrityError(f"the file says generation {header.generation}, its name says {f.number}")
                f.meta, f.created = data.meta, header.created
        except FileNotFoundError:  # we hold the lock: a file vanishing now is someone else's doing
            raise IntegrityError(f"{f.path} vanished while recover read the directory; nothing was changed") from None
        except (NataliaError, OSError) as exc:
            f.error = str(exc).removeprefix(f.path + ": ")
            _inspect_bad(f, keys)
        found.append(f)
    return found


def _inspect_bad(f: _File, keys: dict[str, bytes]) -> None:
    """What a bad file still says, for the report only: its header's time, and a snapshot's meta frame when the
    chunks holding it authenticate (snapshot.read_meta), which bounds the lsn range it held."""
    try:
        f.created = verify.read_header(f.path).created
    except (NataliaError, OSError):
        return
    if f.kind == "snapshot":
        try:
            header, meta = snapshot.read_meta(f.path, keys)
        except (NataliaError, OSError):
            return
        if header.generation == f.number and type(meta["lsn"]) is int:
            f.meta, f.created = meta, header.created


def _usable(files: list[_File]) -> dict[int, int]:
    """Good snapshots whose whole chain is good: generation -> its base (Store._chain and _check_snapshot's rules)."""
    usable: dict[int, int] = {}
    for f in sorted((f for f in files if f.kind == "snapshot" and not f.error), key=lambda f: f.number):
        assert f.meta is not None
        parent = f.meta["parent"]
        if parent is None:
            usable[f.number] = f.number
        elif type(parent) is int and parent < f.number and parent in usable and f.meta["base"] == usable[parent]:
            usable[f.number] = usable[parent]
    return usable


def _chain(files: list[_File], newest: int) -> list[_File]:
    by_number = {f.number: f for f in files if f.kind == "snapshot" and not f.error}
    chain = [by_number[newest]]
    while chain[-1].meta is not None and chain[-1].meta["parent"] is not None:
        chain.append(by_number[chain[-1].meta["parent"]])
    return chain[::-1]


def _opens(state_dir: str, master: MasterKey, files: list[_File]) -> bool:
    """Would Store.open succeed? Decided from the scan first (a missing chain file would make a read-only open retry
    for seconds, Store._open_readonly), then by the store itself, which also replays every record."""
    generations = [f.number for f in files if f.kind == "snapshot"]
    lsn, segment = 0, 1
    if generations:
        newest = max(generations)
        if newest not in _usable(files):
            return False
        meta = _chain(files, newest)[-1].meta
        assert meta is not None
        lsn, segment = meta["lsn"], meta["segment"]
    expected = lsn + 1
    for f in sorted((f for f in files if f.kind == "journal" and f.number >= segment), key=lambda f: f.number):
        if f.error or f.first_lsn != expected:
            return False
        expected += len(f.payloads)
    try:
        Store.open(state_dir, master, readonly=True).close()
    except IntegrityError:
        return False
    return True


# ---- the start, and the rebuild ----


@dataclass
class _Start:
    kind: str
    files: list[_File]
    lsn: int
    generation: int  # of the newest snapshot it holds (a backup's: the one it follows); 0 for empty
    created: str | None


def _choose_start(state_dir: str, files: list[_File], from_backup: str | None) -> _Start:
    good_backups = [f for f in files if f.kind == "backup" and not f.error]
    if from_backup is not None:
        name = from_backup.removeprefix(backups.DIRNAME + "/")
        named = [f for f in files if f.kind == "backup" and f.rel == os.path.join(backups.DIRNAME, name)]
        if not named:
            where = os.path.join(state_dir, backups.DIRNAME)
            raise NotFoundError(f"no backup named {from_backup!r} in {where} (`natalia-secure backup --list`); nothing changed")
        if named[0].error:
            raise IntegrityError(f"backup {name} does not open ({named[0].error}); name another one; nothing changed")
        return _backup_start(named[0])
    candidates = [(f.lsn or 0, 0, f.number, _backup_start(f)) for f in good_backups]
    for newest in _usable(files):
        chain = _chain(files, newest)
        candidates.append((chain[-1].lsn or 0, 1, newest, _Start("chain", chain, chain[-1].lsn or 0, newest, chain[-1].created)))
    if candidates:  # the highest lsn; on a tie a chain (the files a normal open reads), then the newer
        return max(candidates, key=lambda c: c[:3])[3]
    segments = [f for f in files if f.kind == "journal" and not f.error and f.payloads]
    if segments and min(f.first_lsn or 0 for f in segments) == 1:
        return _Start("empty", [], 0, 0, None)  # the journal still holds every change from the first
    raise IntegrityError(
        "nothing to restore from: no snapshot chain is intact, no backup opens and the journal does not start at the "
        "first change; restore the state directory from your own copy; nothing was changed"
    )


def _backup_start(f: _File) -> _Start:
    return _Start("backup", [f], f.lsn or 0, f.number, f.created)


class _Rebuild:
    """A Store that never touches a file, fed the start's snapshots and the journal's records through the store's own
    apply path, exactly as Store._load does at open."""

    def __init__(self, state_dir: str, master: MasterKey, now: int) -> None:
        self.store = Store(state_dir, master, StoreOptions(), lambda: now)

    def apply(self, data: snapshot.SnapshotData) -> None:
        self.store.apply_snapshot(data)

    def replay(self, payload: bytes, lsn: int, path: str) -> None:
        self.store.replay(payload, lsn, path)

    def contents(self) -> tuple[dict[str, bytes], dict[str, int]]:
        return self.store.contents()


def _when(payload: bytes) -> str | None:
    """The time a record carries (messages and claims do), as the report shows it."""
    op = orjson.loads(payload)
    ts = op.get("ts") if isinstance(op, dict) else None
    return iso_utc(ts) if type(ts) is int and ts >= 0 else None


def _records(files: list[_File]) -> Iterator[tuple[int, bytes, _File]]:
    for f in sorted((f for f in files if f.kind == "journal" and not f.error), key=lambda f: (f.first_lsn or 0, f.number)):
        for i, payload in enumerate(f.payloads):
            yield (f.first_lsn or 0) + i, payload, f


# ---- moving aside ----


def _quarantined(state_dir: str) -> list[str]:
    """The original names of what earlier runs moved aside."""
    try:
        names = os.listdir(os.path.join(state_dir, verify.QUARANTINE))
    except FileNotFoundError:
        return []
    return [m.group(1) for n in names if (m := _MOVED.match(n))]


def _move(state_dir: str, f: _File, now: int) -> str:
    """Rename one file into quarantine/ under a name never used there; both directories fsynced (rename(2))."""
    directory = atomicfile.ensure_subdir(state_dir, verify.QUARANTINE)
    target = os.path.join(directory, f"{os.path.basename(f.rel)}.{compact_utc(now)}")
    n = 0
    while os.path.lexists(target):  # we hold the lock: nobody else adds names here meanwhile
        n += 1
        target = os.path.join(directory, f"{os.path.basename(f.rel)}.{compact_utc(now)}.{n}")
    os.rename(f.path, target)
    atomicfile.fsync_dir(directory)
    atomicfile.fsync_dir(os.path.dirname(f.path))
    return os.path.relpath(target, state_dir)


def _modified(path: str) -> str | None:
    try:
        return iso_utc(os.stat(path, follow_symlinks=False).st_mtime_ns // 1_000_000)
    except OSError:
        return None


# ---- the whole run ----


def recover(
    state_dir: str, master: MasterKey, from_backup: str | None = None, *, now_ms: int | None = None, lock_wait: float = 0.0
) -> RecoveryReport:
    """Recover a store that refuses to open (see the module docstring); `from_backup` names the backup to restore
    (its file name in backups/). Every refusal comes before the first change: LockHeldError (the daemon runs),
    KeyMaterialError or IntegrityError (the keyring does not open, or nothing usable is left), UsageError
    (--from-backup on a store that opens), NotFoundError (no such backup)."""
    now = clock_now_ms() if now_ms is None else now_ms
    state_dir = os.path.abspath(state_dir)
    atomicfile.ensure_private_dir(state_dir, create=False)
    lock = StoreLock.acquire(state_dir, lock_wait)
    try:
        return _recover(state_dir, master, from_backup, now)
    finally:
        lock.release()


def _recover(state_dir: str, master: MasterKey, from_backup: str | None, now: int) -> RecoveryReport:
    way_out = "nothing can be recovered without the keyring that sealed these files: restore keyring.enc from your own copy"
    if not os.path.lexists(os.path.join(state_dir, keyring.FILENAME)):  # not `keys init`: a new keyring opens nothing here
        raise KeyMaterialError(f"no {keyring.FILENAME} in {state_dir}; {way_out}")
    try:
        ring = keyring.load(state_dir, master)
    except KeyMaterialError as exc:
        raise KeyMaterialError(f"{exc}; {way_out}, or give the right master key") from None
    except IntegrityError as exc:
        raise IntegrityError(f"{exc}; {way_out}, or give the right master key") from None
    files = _scan(state_dir, ring.usable())
    report = RecoveryReport(state_dir)
    earlier = _quarantined(state_dir)
    if earlier:
        report.notes.append(f"{verify.QUARANTINE}/ already holds {len(earlier)} files moved aside by an earlier run")
    if _opens(state_dir, master, files):
        if from_backup is not None:
            raise UsageError("the store opens; recover only repairs a store that refuses to open")
        for f in files:
            if f.error:
                report.moved.append(MovedFile(f.rel, _move(state_dir, f, now), f"bad: {f.error}"))
        if report.moved:
            report.notes.append("the store opens: only bad files were moved aside; the live state lost nothing")
        return report

    start = _choose_start(state_dir, files, from_backup)
    rebuild = _Rebuild(state_dir, master, now)
    keys = ring.usable()
    for f in start.files:  # read again: the scan kept only their meta (memory stays at one copy of the state)
        _, data = snapshot.read_file(f.path, keys, f.kind)
        rebuild.apply(data)
    restored = Restored(start.kind, [f.rel for f in start.files], start.created, start.lsn, len(rebuild.store))

    expected, last_when, first = start.lsn + 1, start.created, None
    for lsn, payload, f in _records(files):
        if lsn < expected:
            continue  # covered by the start
        rebuild.replay(payload, lsn, f.path)
        when = _when(payload)
        if lsn > expected:
            report.lost_ranges.append(LostRange(expected, lsn - 1, last_when, when))
        first = lsn if first is None else first
        report.replayed += 1
        expected, last_when = lsn + 1, when or last_when
    last = expected - 1
    if first is not None:
        report.replayed_lsns = (first, last)
    table, claims = rebuild.contents()
    report.restored = restored

    moves = _account(files, start, last, last_when, report)
    for f, why in moves:
        report.moved.append(MovedFile(f.rel, _move(state_dir, f, now), why))
    report.new_base = _write_base(state_dir, ring, files, last, now, table, claims)
    return report


def _account(
    files: list[_File], start: _Start, last: int, last_when: str | None, report: RecoveryReport
) -> list[tuple[_File, str]]:
    """What goes aside, and the loss beyond the gaps the replay found: snapshots newer than the state rebuilt
    (their lsn, when known, bounds it), and bad segments after the last good one (then it has no known end)."""
    moves: list[tuple[_File, str]] = []
    newest_known, newest_when, unbounded = last, None, False
    segments = [f for f in files if f.kind == "journal" and not f.error]
    for f in files:
        newer = f.lsn is not None and f.lsn > start.lsn
        if f.error:
            moves.append((f, f"bad: {f.error}"))
            if f.kind == "snapshot" and (newer or (f.lsn is None and f.number > start.generation)):
                what = "a snapshot whose content is unknown" + (f" (it held changes up to lsn {f.lsn})" if f.lsn else "")
                report.lost_files.append(LostFile(f.rel, what, f.created, _modified(f.path)))
            elif f.kind == "journal":
                after = [g.first_lsn for g in segments if g.number > f.number and g.first_lsn is not None]
                if after and min(after) - 1 <= start.lsn:
                    continue  # its records all precede the start
                unbounded = unbounded or not after
                what = "a journal segment whose records are unknown"
                report.lost_files.append(LostFile(f.rel, what, f.created, _modified(f.path)))
        elif f.kind == "snapshot" and newer and f not in start.files:
            moves.append((f, f"not usable: holds changes up to lsn {f.lsn}, newer than the state restored"))
        if f.kind != "journal" and f.lsn is not None and f.lsn > newest_known and f not in start.files:
            newest_known, newest_when = f.lsn, f.created
    if unbounded:
        report.lost_ranges.append(LostRange(last + 1, None, last_when, None))
    elif newest_known > last:
        report.lost_ranges.append(LostRange(last + 1, newest_known, last_when, newest_when))
    for f in files:
        if f.torn and not f.error:
            report.notes.append(f"{f.rel}: a torn tail (a write cut by a crash, never acknowledged) was dropped")
    return moves


def _write_base(
    state_dir: str,
    ring: keyring.Keyring,
    files: list[_File],
    last: int,
    now: int,
    table: dict[str, bytes],
    claims: dict[str, int],
) -> dict[str, Any]:
    """Seal the rebuilt state as a new base: a generation and a segment number above any ever used (moved files
    included), and an lsn above any a file still names, so that no number ever means two different things."""
    moved = _quarantined(state_dir)
    generations = [f.number for f in files if f.kind != "journal"]
    segments = [f.number for f in files if f.kind == "journal"]
    for name in moved:
        if m := snapshot.NAME.match(name):
            generations.append(int(m.group(1)))
        elif m := journal.SEGMENT_NAME.match(name):
            segments.append(int(m.group(1)))
        elif info := backups.parse_name(name):
            generations.append(info.generation)
    segments += [f.meta["segment"] - 1 for f in files if f.meta and type(f.meta["segment"]) is int]
    generation = max(generations, default=0) + 1
    lsn = max([last, *(f.lsn for f in files if f.lsn is not None)])
    segment = max(segments, default=0) + 1
    meta = {"lsn": lsn, "segment": segment, "base": None, "parent": None, "sessions": len(table), "tombstones": 0}
    primary = ring.primary
    header = Header(kind="snapshot", kid=primary.id, generation=generation, created=iso_utc(now), chunk=DEFAULT_CHUNK)
    path = os.path.join(state_dir, snapshot.snapshot_name(generation))
    try:
        snapshot.write_file(path, header, primary.key, snapshot.payload_pieces(meta, claims, table.items(), []))
    except OSError as exc:
        raise StoreUnavailable(
            f"cannot write {path}: {exc.strerror or exc}; the bad files are in {verify.QUARANTINE}/, run recover again"
        ) from exc
    return {"file": os.path.basename(path), "generation": generation, "lsn": lsn, "segment": segment, "sessions": len(table)}

