"""Authenticate every sealed file under a state directory, one report line per file; writes nothing.

Used by `natalia-secure verify` (and, later, a daily timer): a file that fails is named with the reason, every
other file is still checked, and the store as a whole is then opened read-only to prove the chain and journal fit.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from . import backups, envelope, journal, keyring, snapshot
from .errors import NataliaError
from .lock import LOCK_NAME
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


def _check(path: str, rel: str, keys: dict[str, bytes] | None, kind: str) -> FileReport:
    report = FileReport(rel, ok=False)
    try:
        with open(path, "rb") as f:
            start = f.read(len(envelope.MAGIC) + 2 + envelope.MAX_HEADER_LEN)
        header, _ = envelope.parse_prefix(start)
        _fill(report, header)
        if keys is None:
            report.error = "not checked: the keyring does not open"
            return report
        if kind == "journal":
            read = journal.read_segment(path, int(journal.SEGMENT_NAME.match(os.path.basename(path)).group(1)), keys)  # type: ignore[union-attr]
            report.note = f"{len(read.payloads)} records" + (", torn tail dropped (never acknowledged)" if read.torn else "")
        else:
            _, data = snapshot.read_file(path, keys, kind)
            report.note = f"{len(data.sessions)} sessions" + (f", {len(data.tombstones)} removed" if data.tombstones else "")
        report.ok = True
    except (NataliaError, OSError) as exc:
        report.error = str(exc).removeprefix(path + ": ")
    return report


def verify_state_dir(state_dir: str, master: MasterKey) -> Report:
    from .store import Store  # late: store imports this package's modules too

    report = Report()
    ring_path = os.path.join(state_dir, keyring.FILENAME)
    keys: dict[str, bytes] | None = None
    ring_report = FileReport(keyring.FILENAME, ok=False)
    try:
        with open(ring_path, "rb") as f:
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

    entries = sorted(os.listdir(state_dir))
    for name in entries:
        path = os.path.join(state_dir, name)
        if snapshot.NAME.match(name):
            report.files.append(_check(path, name, keys, "snapshot"))
        elif journal.SEGMENT_NAME.match(name):
            report.files.append(_check(path, name, keys, "journal"))
        elif name not in (keyring.FILENAME, LOCK_NAME, backups.DIRNAME) and not name.endswith(".tmp"):
            report.files.append(FileReport(name, ok=True, note="not a natalia-secure file; ignored"))
    for info in backups.scan(os.path.join(state_dir, backups.DIRNAME)):
        rel = os.path.join(backups.DIRNAME, info.name)
        report.files.append(_check(os.path.join(state_dir, rel), rel, keys, "backup"))

    try:
        store = Store.open(state_dir, master, readonly=True)
        report.store = {"ok": True, "sessions": len(store), "lsn": store.lsn, "generation": store.generation}
    except (NataliaError, OSError) as exc:
        report.store = {"ok": False, "error": str(exc)}
    return report
