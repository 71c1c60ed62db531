"""Read-only views of a state directory for the admin commands: stats, keys, backups, one person's data. Writes
nothing; works with the daemon running (it reads the durable state: files, never the daemon's memory).

`find_person` is also `forget`'s proof: it decrypts every sealed file and says where a phone still appears.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from . import backups, journal, keyring, snapshot
from .clock import iso_utc
from .errors import IntegrityError, NataliaError
from .store import Store
from .verify import SealedFile, key_usage, quarantined_files, read_header, sealed_files


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:  # compacted by a running daemon meanwhile
        return 0


def _age_s(created: str, now_ms: int) -> float:
    from datetime import datetime

    then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").timestamp()
    return max(0.0, now_ms / 1000 - then)


def stats(store: Store, now_ms: int) -> dict[str, Any]:
    """The legacy `stats` (sessions, messages, store size) and the store's health, from a read-only store."""
    files, _ = sealed_files(store.state_dir)
    by_kind: dict[str, list[SealedFile]] = {"snapshot": [], "journal": [], "backup": []}
    for f in files:
        by_kind[f.kind].append(f)
    messages = sum(len(s["messages"]) for _, s in store.items())
    newest = max(by_kind["snapshot"], key=lambda f: f.generation, default=None)
    last_snapshot = None
    if newest is not None:
        try:
            created = read_header(newest.path).created
            last_snapshot = {"file": newest.rel, "created": created, "age_s": round(_age_s(created, now_ms), 1)}
        except (NataliaError, OSError):
            last_snapshot = {"file": newest.rel, "created": None, "age_s": None}
    backup_list = store.list_backups()
    usage = key_usage(store.state_dir)
    total = sum(_size(f.path) for f in files) + _size(os.path.join(store.state_dir, keyring.FILENAME))
    st = store.stats()
    return {
        "sessions": len(store),
        "messages": messages,
        "state_dir": store.state_dir,
        "store_bytes": total,
        "generation": st["generation"],
        "base_generation": st["base_generation"],
        "deltas": st["deltas"],
        "lsn": st["lsn"],
        "claims": st["claims"],
        "last_snapshot": last_snapshot,
        "journal": {
            "segments": len(by_kind["journal"]),
            "bytes": sum(_size(f.path) for f in by_kind["journal"]),
            "records_since_snapshot": sum(len(r.payloads) for r in store.replayed),
        },
        "backups": {
            "count": len(backup_list),
            "bytes": sum(_size(f.path) for f in by_kind["backup"]),
            "newest": backup_list[-1].name if backup_list else None,
            "newest_age_s": round(now_ms / 1000 - backup_list[-1].time.timestamp(), 1) if backup_list else None,
        },
        "keys": keys_table(store.keyring, usage, now_ms),
    }


def keys_table(ring: keyring.Keyring, usage: dict[str, list[str]], now_ms: int) -> list[dict[str, Any]]:
    """One row per data key: id, status, created, age, and the files whose header names it."""
    return [
        {
            "id": k.id,
            "status": k.status,
            "created": k.created,
            "age_days": round(_age_s(k.created, now_ms) / 86400, 1),
            "files": sorted(usage.get(k.id, [])),
        }
        for k in ring.keys
    ]


def backups_table(state_dir: str) -> list[dict[str, Any]]:
    """Every backup, oldest first: name, time, generation, size, the key its header names (not authenticated:
    `verify` does that)."""
    rows = []
    directory = os.path.join(state_dir, backups.DIRNAME)
    for info in backups.scan(directory):
        path = os.path.join(directory, info.name)
        try:
            kid: str | None = read_header(path).kid
        except (NataliaError, OSError):
            kid = None
        rows.append(
            {"name": info.name, "time": iso_utc(int(info.time.timestamp() * 1000)), "generation": info.generation,
             "bytes": _size(path), "kid": kid}
        )
    return rows


def wamid_names(message_id: str, phone: str) -> bool:
    """Whether a WhatsApp message id carries this phone number. Meta's ids are "wamid." + base64 of a small binary
    record whose first field is the sender's number, length-prefixed (e.g. "wamid.HBgLMTU1NTAx..." decodes to
    b"\x1c\x18\x0b15550..."), so an id is personal data: forget drops such claims. The field is compared whole, so
    a number one digit short never matches someone else's; an id of another shape matches only where the number
    stands alone between non-digits."""
    body = message_id.removeprefix("wamid.")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True) if body else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) > 3 and raw[1] == 0x18 and 3 + raw[2] <= len(raw):
        return raw[3 : 3 + raw[2]] == phone.encode()
    return re.search(rf"(?<!\d){re.escape(phone)}(?!\d)", message_id) is not None


@dataclass(frozen=True)
class Trace:
    file: str
    where: str  # "session", "tombstone", "record", "claim": the person's own data | "mention": in someone else's text
    #             | "unreadable": a quarantined file that does not open (it may hold anything)
    count: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "where": self.where, "count": self.count}


def find_person(state_dir: str, keys: dict[str, bytes], phone: str) -> list[Trace]:
    """Decrypt every sealed file and say where `phone` still appears: as a session, a tombstone, a journal record
    of theirs or a claim of one of their message ids (their data), or as text inside other sessions (a "mention":
    what someone else wrote, not theirs to erase). Files `recover` moved to quarantine/ are read too (evidence it
    kept: some authenticate); one of them that does not open is reported "unreadable". Any other file that does not
    open raises IntegrityError: a proof that skipped a file would prove nothing."""
    traces: list[Trace] = []
    needle = phone.encode()
    for f in sealed_files(state_dir)[0]:
        try:
            traces += _in_file(f, keys, phone, needle)
        except FileNotFoundError:
            continue  # compacted meanwhile: its content is in the newer files we read after it
    for f in quarantined_files(state_dir):
        try:
            traces += _in_file(f, keys, phone, needle)
        except IntegrityError:
            traces.append(Trace(f.rel, "unreadable"))
        except FileNotFoundError:
            continue
    return traces


def _in_file(f: SealedFile, keys: dict[str, bytes], phone: str, needle: bytes) -> list[Trace]:
    return _in_segment(f, keys, phone, needle) if f.kind == "journal" else _in_snapshot(f, keys, phone, needle)


def _in_snapshot(f: SealedFile, keys: dict[str, bytes], phone: str, needle: bytes) -> list[Trace]:
    _, data = snapshot.read_file(f.path, keys, f.kind)
    out = []
    if phone in data.sessions:
        out.append(Trace(f.rel, "session"))
    if phone in data.tombstones:
        out.append(Trace(f.rel, "tombstone"))
    claims = sum(wamid_names(k, phone) for k in data.claims)
    if claims:
        out.append(Trace(f.rel, "claim", claims))
    mentions = sum(needle in body for p, body in data.sessions.items() if p != phone)
    if mentions:
        out.append(Trace(f.rel, "mention", mentions))
    return out


def _in_segment(f: SealedFile, keys: dict[str, bytes], phone: str, needle: bytes) -> list[Trace]:
    read = journal.read_segment(f.path, f.generation, keys)
    counts = {"record": 0, "claim": 0, "mention": 0}
    for payload in read.payloads:
        op = orjson.loads(payload)
        if op.get("phone") == phone:
            counts["record"] += 1
        elif "id" in op and wamid_names(op["id"], phone):
            counts["claim"] += 1
        elif needle in payload:
            counts["mention"] += 1
    return [Trace(f.rel, where, n) for where, n in counts.items() if n]


def own_data(traces: Iterable[Trace]) -> list[Trace]:
    """What may be theirs: everything but mentions (an unreadable file cannot be shown not to hold them)."""
    return [t for t in traces if t.where != "mention"]


def export(store: Store, phone: str, now_ms: int) -> dict[str, Any]:
    """One person's data (an access request): their conversation as stored (the legacy fields, and under "natalia"
    the daemon's state for it: photos sent, a reply in progress), and the backups that still hold a copy."""
    session = store.get(phone)
    held = sorted(
        {t.file for t in own_data(find_person(store.state_dir, store.keyring.usable(), phone)) if t.file.startswith("backups/")}
    )
    return {
        "phone": phone,
        "exported": iso_utc(now_ms),
        "session": session,
        "messages": len(session["messages"]),
        "first_interaction": iso_utc(session["firstInteraction"]),
        "last_activity": iso_utc(session["lastActivity"]),
        "backups_holding_a_copy": [name.removeprefix("backups/") for name in held],
    }
