"""Made tests/golden/v1-*.enc: sealed files of format v1 that every future version must still open.

NEVER RERUN THIS SCRIPT TO "FIX" A FAILING GOLDEN TEST. The golden files pin format v1 forever: if
tests/test_envelope.py cannot open them, the code has broken compatibility with files already on operators'
disks, and the code is what must be fixed. Rewriting the goldens would hide exactly the bug they exist to catch.
(A new format version gets new goldens, v2-*.enc, next to these; these stay.) The script is kept as the record
of how the files were made, so a second implementation (SECURITY.md) can check itself against them.

The keys below are TEST-ONLY, public and worthless: bytes(range(...)). They never protect real data. The data key
and wrap nonce of each file are fixed too, so running this script again reproduces the files byte for byte
(AES-GCM is deterministic given key and nonce); that is a property, not an invitation.

    .venv/bin/python tests/golden/make_golden.py   # wrote the files on 2026-11-25; do not run again
"""

from __future__ import annotations

import json
import os
import struct
import sys

from natalia_secure import envelope
from natalia_secure.masterkey import MasterKey

HERE = os.path.dirname(os.path.abspath(__file__))

# TEST-ONLY KEYS (public, never used for real data).
TEST_MASTER_KEY = bytes(range(32))  # the master key (KEK) that seals v1-keyring.enc
TEST_KEY_OLD = bytes(range(64, 96))  # data key "d-000000000000", status enabled in the golden keyring
TEST_KEY_PRIMARY = bytes(range(32, 64))  # data key "d-000000000001", the golden keyring's primary
KID_OLD = "d-000000000000"
KID_PRIMARY = "d-000000000001"
CREATED = "2026-11-25T10:15:30Z"


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def session_frame(phone: str, session: bytes) -> bytes:
    p = phone.encode()
    return frame(b"S" + struct.pack(">H", len(p)) + p + session)


SESSION_A = (
    '{"messages":[{"role":"user","content":"Hola ¿qué tal? 👋","timestamp":1770155790963},'
    '{"role":"assistant","content":"¡Hola! Soy Natalia \\"quotes\\" \\\\ and\\nnewline","timestamp":1770155794155}],'
    '"lastActivity":1770155794155,"firstInteraction":1770155790963}'
).encode()
SESSION_B = b'{"messages":[],"lastActivity":1770160000000,"firstInteraction":1770160000000}'

# A snapshot payload in snapshot.py's framing (meta, claims, sessions), so the golden is a real v1 snapshot.
SNAPSHOT_PAYLOAD = (
    frame(b'{"lsn":7,"segment":2,"base":null,"parent":null,"sessions":2,"tombstones":0}')
    + frame(b'{"wamid.golden-1":1770155790963}')
    + session_frame("34698189848", SESSION_A)
    + session_frame("447700900123", SESSION_B)
)
BACKUP_PAYLOAD = (
    frame(b'{"lsn":9,"segment":null,"base":null,"parent":null,"sessions":1,"tombstones":0}')
    + frame(b"{}")
    + session_frame("5215512345678", SESSION_A)
)
KEYRING_PAYLOAD = (
    '{"keys":['
    f'{{"id":"{KID_OLD}","status":"enabled","created":"2026-01-01T00:00:00Z","key":"{TEST_KEY_OLD.hex()}"}},'
    f'{{"id":"{KID_PRIMARY}","status":"primary","created":"{CREATED}","key":"{TEST_KEY_PRIMARY.hex()}"}}'
    "]}"
).encode()
JOURNAL_RECORDS = [
    json.dumps(
        {"op": "message", "phone": "34698189848", "role": "user", "content": "¿Abren mañana? 🕐", "ts": 1770155900000},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode(),
    b'{"op":"claim","id":"wamid.golden-2","ts":1770155900001}',
    b"",  # an empty record is legal: it pins that a bare tag authenticates
    b'{"op":"purge","phone":"447700900123"}',
]
JOURNAL_FIRST_LSN = 41


def build() -> dict[str, bytes]:
    master_kid = MasterKey(TEST_MASTER_KEY, "golden").kid
    files = {}
    files["v1-snapshot.enc"] = envelope.seal(
        envelope.Header(kind="snapshot", kid=KID_PRIMARY, generation=3, created=CREATED, chunk=64),
        TEST_KEY_PRIMARY,
        SNAPSHOT_PAYLOAD,
        data_key=bytes(range(128, 160)),
        wrap_nonce=bytes(range(1, 13)),
    )
    files["v1-backup.enc"] = envelope.seal(
        envelope.Header(kind="backup", kid=KID_OLD, generation=123, created=CREATED, chunk=100),
        TEST_KEY_OLD,
        BACKUP_PAYLOAD,
        data_key=bytes(range(160, 192)),
        wrap_nonce=bytes(range(13, 25)),
    )
    files["v1-keyring.enc"] = envelope.seal(
        envelope.Header(kind="keyring", kid=master_kid, generation=2, created=CREATED, chunk=4096),
        TEST_MASTER_KEY,
        KEYRING_PAYLOAD,
        data_key=bytes(range(192, 224)),
        wrap_nonce=bytes(range(25, 37)),
    )
    head, start = envelope.new_head(
        envelope.Header(kind="journal", kid=KID_PRIMARY, generation=3, created=CREATED, lsn=JOURNAL_FIRST_LSN),
        TEST_KEY_PRIMARY,
        data_key=bytes(range(224, 256)),
        wrap_nonce=bytes(range(37, 49)),
    )
    sealer = envelope.RecordSealer(head)
    files["v1-journal.enc"] = start + b"".join(sealer.seal(r) for r in JOURNAL_RECORDS)
    return files


def main() -> int:
    for name, blob in build().items():
        path = os.path.join(HERE, name)
        if os.path.exists(path):
            print(f"{path} exists: golden files are never rewritten (see this script's docstring)", file=sys.stderr)
            return 1
        with open(path, "xb") as f:
            f.write(blob)
        print(f"wrote {path} ({len(blob)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
