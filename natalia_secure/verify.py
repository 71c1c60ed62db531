"""Authenticate every sealed file under a state directory, one report line per file; writes nothing.

Used by `natalia-secure verify` (and, later, a daily timer): a file that fails is named with the reason, every
other file is still checked, and the store as a whole is then opened read-only to prove the chain and journal fit.
"""

from __future__ import annotations

import os
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


# Names under the state directory that are not data files: the keyring (sealed by the master key, checked apart),
# the backups directory (listed below), the control socket of a running daemon, and what `recover` moved aside.
NOT_DATA = (keyring.FILENAME, backups.DIRNAME, "control.sock", "quarantine")


def sealed_files(state_dir: str) -> tuple[list[SealedFile], list[str]]:
    """Every sealed data file (snapshots, journal segments, backups) by name, and the names of unexpected files."""
    files: list[SealedFile] = []
    unexpected: list[str] = []
    for name in sorted(os.listdir(state_dir)):
        path = os.path.join(state_dir, name)
        if m := snapshot.NAME.match(name):
            files.append(SealedFile(name, path, "snapshot", int(m.group(1))))
        elif m := journal.SEGMENT_NAME.match(name):
            files.append(SealedFile(name, path, "journal", int(m.group(1))))
        elif name in NOT_DATA or name.endswith(atomicfile.TEMP_SUFFIX):
            continue  # temps are a crash's leftovers, removed by the next writer
        else:
            unexpected.append(name)
    for info in backups.scan(os.path.join(state_dir, backups.DIRNAME)):
        rel = os.path.join(backups.DIRNAME, info.name)
        files.append(SealedFile(rel, os.path.join(state_dir, rel), "backup", info.generation))
    return files, unexpected


def read_header(path: str) -> envelope.Header:
    """A sealed file's header, unauthenticated (the key id a file names, for `keys list`; verify authenticates)."""
    with atomicfile.open_regular(path) as f:
        start = f.read(len(envelope.MAGIC) + 2 + envelope.MAX_HEADER_LEN)
    header, _ = envelope.parse_prefix(start)
    return header


def key_usage(state_dir: str) -> dict[str, list[str]]:
    """Data key id -> the files whose header names it (a key may be retired only once this list is empty).
    A file removed meanwhile (a running daemon compacts) is skipped; one whose header does not parse is listed
    under "?" so that nothing is retired on a guess."""
    usage: dict[str, list[str]] = {}
    for f in sealed_files(state_dir)[0]:
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
