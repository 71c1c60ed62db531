"""Authenticate every sealed file under a state directory, one report line per file; writes nothing.

Used by `natalia-secure verify` (and, later, a daily timer): a file that fails is named with the reason, every
other file is still checked, and the store as a whole is then opened read-only to prove the chain and journal fit.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

from . import atomicfile, backups, envelope, journal, keyring, snapshot
from .errors import NataliaError
from .masterkey import MasterKey


@dataclass
class FileReport:
    file: str
    ok: bool
    kind: str | None = None
    kid: str | None = None
    generation: int | None = None
    created: str | None = None
    error: str | None = None
    note: str | None = None


@dataclass
class Report:
    files: list[FileReport] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files) and bool(self.store.get("ok"))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "files": [asdict(f) for f in self.files], "store": self.store}

    def summary(self) -> str:
        bad = sum(not f.ok for f in self.files)
        store = (
            f"store opens: {self.store['sessions']} sessions, lsn {self.store['lsn']}, generation {self.store['generation']}"
            if self.store.get("ok")
            else f"store does not open: {self.store.get('error')}"
        )
        return f"{len(self.files)} files, {bad} failed; {store}"


def _fill(report: FileReport, header: envelope.Header) -> None:
    report.kind, report.kid, report.generation, report.created = header.kind, header.kid, header.generation, header.created


def _check(path: str, rel: str, keys: dict[str, bytes] | None, kind: str, generation: int) -> FileReport:
    report = FileReport(rel, ok=False)
    try:
        header = read_header(path)
        _fill(report, header)
        if header.generation != generation:
            report.error = f"the file says generation {header.generation}, its name says {generation}"
            return report
        if keys is None:
            report.error = "not checked: the keyring does not open"
            return report
        if kind == "journal":
            read = journal.read_segment(path, generation, keys)
            report.note = f"{len(read.payloads)} records" + (", torn tail dropped (never acknowledged)" if read.torn else "")
        else:
            _, data = snapshot.read_file(path, keys, kind)
            report.note = f"{len(data.sessions)} sessions" + (f", {len(data.tombstones)} removed" if data.tombstones else "")
        report.ok = True
    except FileNotFoundError:
        # A running daemon compacts: a file listed a moment ago may be gone. The store check below covers the rest.
        report.ok, report.note = True, "removed while verifying (compacted by the daemon)"
    except (NataliaError, OSError) as exc:
        report.error = str(exc).removeprefix(path + ": ")
    return report


@dataclass(frozen=True)
class SealedFile:
    rel: str  # relative to the state directory, as reports name it
    path: str
    kind: str  # the kind its name promises: "snapshot", "journal" or "backup"
    generation: int  # from its name (a segment's number for the journal)


QUARANTINE = "quarantine"  # where `recover` moves files it cannot use (recover.py): evidence, never changed
CONTROL_SOCKET = "control.sock"  # a running daemon's (control.py)
# a quarantined file: its original name, then the UTC time it was moved (and a counter if that name was taken)
QUARANTINED_NAME = re.compile(r"(.+\.enc)\.\d{8}T\d{6}Z(?:\.\d+)?\Z")


def _kind_of(name: str) -> tuple[str, int] | None:
    if m := snapshot.NAME.match(name):
        return "snapshot", int(m.group(1))
    if m := journal.SEGMENT_NAME.match(name):
        return "journal", int(m.group(1))
    if info := backups.parse_name(name):
        return "backup", info.generation
    return None


def _is(path: str, kind: int) -> bool:
    try:
        return stat.S_IFMT(os.lstat(path).st_mode) == kind
    except FileNotFoundError:
        return False


def sealed_files(state_dir: str) -> tuple[list[SealedFile], list[str]]:
    """Every sealed data file (snapshots, journal segments, backups) by name, and the names of unexpected files.
    Besides those, the keyring (checked apart), the backups and quarantine directories and a running daemon's control
    socket belong here; anything else, even under one of those names but of the wrong type, is unexpected."""
    files: list[SealedFile] = []
    unexpected: list[str] = []
    for name in sorted(os.listdir(state_dir)):
        path = os.path.join(state_dir, name)
        found = _kind_of(name)
        if found is not None and found[0] != "backup":
            files.append(SealedFile(name, path, *found))
        elif name.endswith(atomicfile.TEMP_SUFFIX):
            continue  # a crash's leftover, removed by the next writer
        elif name == keyring.FILENAME or (name == CONTROL_SOCKET and _is(path, stat.S_IFSOCK)):
            continue
        elif name in (backups.DIRNAME, QUARANTINE) and _is(path, stat.S_IFDIR):
            continue
        else:
            unexpected.append(name)
    for info in backups.scan(os.path.join(state_dir, backups.DIRNAME)):
        rel = os.path.join(backups.DIRNAME, info.name)
        files.append(SealedFile(rel, os.path.join(state_dir, rel), "backup", info.generation))
    return files, unexpected


def quarantined_files(state_dir: str) -> list[SealedFile]:
    """The files `recover` moved aside that still have a sealed file's name: some authenticate (good files it could
    not use) and may hold personal data or need a key, so forget and key retirement look at them too."""
    directory = os.path.join(state_dir, QUARANTINE)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if (m := QUARANTINED_NAME.match(name)) and (found := _kind_of(m.group(1))):
            out.append(SealedFile(os.path.join(QUARANTINE, name), os.path.join(directory, name), *found))
    return out


def read_header(path: str) -> envelope.Header:
    """A sealed file's header, unauthenticated (the key id a file names, for `keys list`; verify authenticates)."""
    with atomicfile.open_regular(path) as f:
        start = f.read(len(envelope.MAGIC) + 2 + envelope.MAX_HEADER_LEN)
    header, _ = envelope.parse_prefix(start)
    return header


def key_usage(state_dir: str) -> dict[str, list[str]]:
    """Data key id -> the files whose header names it, quarantined ones included (a key may be retired only once
    this list is empty: a retired key would leave a quarantined file that authenticates unreadable).
    A file removed meanwhile (a running daemon compacts) is skipped; one whose header does not parse is listed
    under "?" so that nothing is retired on a guess."""
    usage: dict[str, list[str]] = {}
    for f in [*sealed_files(state_dir)[0], *quarantined_files(state_dir)]:
        try:
            kid = read_header(f.path).kid
        except FileNotFoundError:
            continue
        except (NataliaError, OSError):
            kid = "?"
        usage.setdefault(kid, []).append(f.rel)
    return usage


def verify_state_dir(state_dir: str, master: MasterKey, *, retries: int = 3) -> Report:
    from .store import file_identity  # late: store imports this package's modules too

    ring_path = os.path.join(state_dir, keyring.FILENAME)
    before = file_identity(ring_path)
    report = _verify(state_dir, master, ring_path)
    if not report.ok and retries and file_identity(ring_path) != before:
        # a key rotation ran meanwhile (the daemon's, through its control socket): files sealed under a key newer
        # than the keyring we read are not failures; look again with the new keyring
        return verify_state_dir(state_dir, master, retries=retries - 1)
    return report


def _verify(state_dir: str, master: MasterKey, ring_path: str) -> Report:
    from .store import Store

    report = Report()
    keys: dict[str, bytes] | None = None
    ring_report = FileReport(keyring.FILENAME, ok=False)
    try:
        with atomicfile.open_regular(ring_path) as f:
            blob = f.read()
        header, _ = envelope.parse_prefix(blob)
        _fill(ring_report, header)
        ring = keyring.open_keyring(blob, master, ring_path)
        keys = ring.usable()
        ring_report.ok = True
        ring_report.note = f"{len(ring.keys)} data keys, primary {ring.primary.id}"
    except (NataliaError, OSError) as exc:
        ring_report.error = str(exc).removeprefix(ring_path + ": ")
    report.files.append(ring_report)

    files, unexpected = sealed_files(state_dir)
    for sealed in files:
        report.files.append(_check(sealed.path, sealed.rel, keys, sealed.kind, sealed.generation))
    for name in unexpected:  # guarantee 2: everything here is sealed by us, so anything else deserves a look
        report.files.append(FileReport(name, ok=False, error="unexpected file: not a natalia-secure sealed file"))

    try:
        store = Store.open(state_dir, master, readonly=True)
        report.store = {"ok": True, "sessions": len(store), "lsn": store.lsn, "generation": store.generation}
    except (NataliaError, OSError) as exc:
        report.store = {"ok": False, "error": str(exc)}
    return report
