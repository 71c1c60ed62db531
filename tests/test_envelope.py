"""Sealed file format v1 (natalia_secure/envelope.py): round trips, pinned vectors, golden files, and tampering.

The tampering tests follow borg's testsuite (flip every byte, truncate everywhere): a sealed file either opens to
exactly what was sealed or raises EnvelopeError, and a journal never passes a damaged complete record off as a torn
tail (that would silently drop an acknowledged message, guarantee 1).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natalia_secure import envelope, keyring, snapshot
from natalia_secure.envelope import (
    DEFAULT_CHUNK,
    MIN_CHUNK,
    RECORD_HEAD,
    STREAM_KINDS,
    TAG_LEN,
    WRAPPED_KEY_LEN,
    Header,
    Records,
    RecordSealer,
)
from natalia_secure.errors import EnvelopeError
from natalia_secure.masterkey import MasterKey

KEK = bytes(range(32))  # test-only key
OTHER_KEK = bytes(range(1, 33))
KEYS = {"k1": KEK}
CREATED = "2026-11-25T10:15:30Z"
GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def header(kind: str = "snapshot", chunk: int = 64, **kw: Any) -> Header:
    fields: dict[str, Any] = {"kid": "k1", "generation": 1, "created": CREATED}
    fields.update(kw)
    if kind == "journal":
        return Header(kind=kind, lsn=fields.pop("lsn", 1), **fields)
    return Header(kind=kind, chunk=chunk, **fields)


def sealed(kind: str = "snapshot", payload: bytes = b"", chunk: int = 64, kek: bytes = KEK, **kw: Any) -> bytes:
    return envelope.seal(header(kind, chunk, **kw), kek, payload)


def sealed_journal(payloads: list[bytes], kek: bytes = KEK, **kw: Any) -> tuple[bytes, list[int]]:
    """A journal segment and the offset where each record starts (plus the end)."""
    head, start = envelope.new_head(header("journal", **kw), kek)
    sealer = RecordSealer(head)
    out, offsets = bytearray(start), []
    for p in payloads:
        offsets.append(len(out))
        out += sealer.seal(p)
    offsets.append(len(out))
    return bytes(out), offsets


def open_journal(blob: bytes, keys: dict[str, bytes] = KEYS) -> Records:
    return envelope.open_records(blob, envelope.read_head(blob, keys, "journal"))


def chunk_offsets(blob: bytes, chunk: int) -> list[int]:
    """File offsets where each sealed chunk of a stream file starts (and the end)."""
    start = envelope.read_head(blob, {"k1": KEK, "k2": OTHER_KEK}).size
    return [*range(start, len(blob), chunk + TAG_LEN), len(blob)]


def with_header(blob: bytes, raw: bytes) -> bytes:
    """Replace the header JSON of a sealed file by `raw`, fixing the length field so only the JSON differs."""
    _, end = envelope.parse_prefix(blob)
    return envelope.MAGIC + struct.pack(">H", len(raw)) + raw + blob[end:]


def header_obj(blob: bytes) -> dict[str, Any]:
    _, end = envelope.parse_prefix(blob)
    obj: dict[str, Any] = json.loads(blob[len(envelope.MAGIC) + 2 : end])
    return obj


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def flipped(blob: bytes, i: int, mask: int) -> bytes:
    b = bytearray(blob)
    b[i] ^= mask
    return bytes(b)


# ---- round trips ----


@st.composite
def stream_cases(draw: st.DrawFn) -> tuple[str, int, bytes, list[int]]:
    kind = draw(st.sampled_from(STREAM_KINDS))
    chunk = draw(st.one_of(st.integers(MIN_CHUNK, 4096), st.just(DEFAULT_CHUNK)))
    size = draw(
        st.one_of(
            st.integers(0, 300_000),
            # sizes next to a chunk boundary: where the last-chunk rule can go wrong
            st.builds(lambda k, d: max(0, k * chunk + d), st.integers(0, max(1, 300_000 // chunk)), st.integers(-1, 1)),
        )
    )
    payload = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=6)))
    return kind, chunk, payload, cuts


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_cases())
def test_stream_round_trip(case: tuple[str, int, bytes, list[int]]) -> None:
    """Any payload sealed in any chunk size, fed as any split of pieces, opens to exactly itself with the size the spec gives."""
    kind, chunk, payload, cuts = case
    bounds = [0, *cuts, len(payload)]
    pieces: list[bytes | bytearray | memoryview] = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        part = payload[a:b]
        pieces.append((bytes, bytearray, memoryview)[i % 3](part))
    head, start = envelope.new_head(header(kind, chunk), KEK)
    out = io.BytesIO()
    out.write(start)
    assert envelope.seal_stream(head, pieces, out.write) == len(payload)
    blob = out.getvalue()
    n_chunks = max(1, -(-len(payload) // chunk))
    assert len(blob) == head.size + len(payload) + n_chunks * TAG_LEN
    got_header, got = envelope.open_sealed(blob, KEYS, kind)
    assert got == payload
    assert got_header == head.header


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=3000), max_size=25),
    lsn=st.integers(1, 2**62),
    generation=st.integers(0, 2**40),
)
def test_journal_round_trip(payloads: list[bytes], lsn: int, generation: int) -> None:
    """Any list of records sealed into a segment opens to the same list, complete and not torn."""
    blob, offsets = sealed_journal(payloads, lsn=lsn, generation=generation)
    records = open_journal(blob)
    assert records.payloads == payloads
    assert records.end == len(blob) == offsets[-1]
    assert records.torn is False


def test_seal_one_shot_matches_streamed() -> None:
    """seal() is seal_stream() of the same head: one format, two entry points."""
    payload = os.urandom(1000)
    dk, wn = os.urandom(32), os.urandom(12)
    head, start = envelope.new_head(header(), KEK, data_key=dk, wrap_nonce=wn)
    out = io.BytesIO()
    out.write(start)
    envelope.seal_stream(head, [payload[:10], payload[10:]], out.write)
    assert out.getvalue() == envelope.seal(header(), KEK, payload, data_key=dk, wrap_nonce=wn)


def test_fresh_data_key_per_file() -> None:
    """Sealing the same payload twice gives different bytes: each file gets its own random data key and wrap nonce."""
    a, b = sealed(payload=b"same"), sealed(payload=b"same")
    assert a != b
    assert envelope.open_sealed(a, KEYS)[1] == envelope.open_sealed(b, KEYS)[1] == b"same"


# ---- fixed vectors ----

VECTOR_KEK = bytes(range(32))
VECTOR_DATA_KEY = bytes(range(32, 64))
VECTOR_WRAP_NONCE = bytes(range(64, 76))
VECTOR_PAYLOAD = b"natalia-secure fixed vector: " * 5  # 145 bytes: chunks of 64, 64 and 17
VECTOR_RECORDS = [b"first record", "second record \U0001f44b".encode()]
VECTOR_STREAM_HEX = (
    "6e6174616c69612d7365637572650a00997b22616c67223a224145532d3235362d47434d222c226368756e6b223a36342c2263726561746564223a22"
    "323032362d31312d32355431303a31353a33305a222c22666f726d6174223a226e6174616c69612d736563757265222c2267656e65726174696f6e22"
    "3a372c226b6964223a226b2d766563746f72222c226b696e64223a22736e617073686f74222c2276657273696f6e223a317d40414243444546474849"
    "4a4bc2988c000219a124e5ed3d1db7493d7449f7606f830039144f7e74deab2ed3e49fe5f5c6a72011d66864487f2aa7300e8d4f9538f8360574bb3c"
    "873714da2f06054c1262815f60efc6505e9ccc9ffe82c0c6b365115c4198e61794905865f3aca2b4b87a1cafc8ed3fdc4b06852bc4d9d4a44a1be66e"
    "51ce367f0d5db62fc9f1efb0213ade4747eb0296dac226d5698b86afc5fa2e7b5b2807eb75eabda555c8bc3d128c426bae49417f6703ca18995cb226"
    "f62401e4a2decfb95bd2bf74e35432e02f872b250e0917787b6d7cb27dae195f7ec9ef0232ffa3b5ee19b8282b9a632a807da86bda38b4073cd4185f"
    "4ce431"
)
VECTOR_JOURNAL_HEX = (
    "6e6174616c69612d7365637572650a00977b22616c67223a224145532d3235362d47434d222c2263726561746564223a22323032362d31312d323554"
    "31303a31353a33305a222c22666f726d6174223a226e6174616c69612d736563757265222c2267656e65726174696f6e223a372c226b6964223a226b"
    "2d766563746f72222c226b696e64223a226a6f75726e616c222c226c736e223a3130302c2276657273696f6e223a317d404142434445464748494a4b"
    "c2988c000219a124e5ed3d1db7493d7449f7606f830039144f7e74deab2ed3e4cc817e12884ec3b8f42d310a6970edbf0000001c354583538547932a"
    "e07f163cab369626132e287f7e44753aa84e67407030352c00000022f4249ef8788e0bd017be6fd425a5fa53b56ab4bc9339c9c05f6393927c55b31a"
    "df5727551102"
)
VECTOR_STREAM_HEADER = (
    b'{"alg":"AES-256-GCM","chunk":64,"created":"2026-11-25T10:15:30Z","format":"natalia-secure",'
    b'"generation":7,"kid":"k-vector","kind":"snapshot","version":1}'
)
VECTOR_JOURNAL_HEADER = (
    b'{"alg":"AES-256-GCM","created":"2026-11-25T10:15:30Z","format":"natalia-secure",'
    b'"generation":7,"kid":"k-vector","kind":"journal","lsn":100,"version":1}'
)


def vector_stream() -> bytes:
    h = Header(kind="snapshot", kid="k-vector", generation=7, created=CREATED, chunk=64)
    return envelope.seal(h, VECTOR_KEK, VECTOR_PAYLOAD, data_key=VECTOR_DATA_KEY, wrap_nonce=VECTOR_WRAP_NONCE)


def vector_journal() -> bytes:
    h = Header(kind="journal", kid="k-vector", generation=7, created=CREATED, lsn=100)
    head, start = envelope.new_head(h, VECTOR_KEK, data_key=VECTOR_DATA_KEY, wrap_nonce=VECTOR_WRAP_NONCE)
    sealer = RecordSealer(head)
    return start + b"".join(sealer.seal(r) for r in VECTOR_RECORDS)


def test_fixed_vector_stream() -> None:
    """With fixed keys, nonce and time, a 3-chunk snapshot seals to exactly the pinned bytes (format v1 never drifts)."""
    assert vector_stream().hex() == VECTOR_STREAM_HEX
    assert envelope.open_sealed(bytes.fromhex(VECTOR_STREAM_HEX), {"k-vector": VECTOR_KEK})[1] == VECTOR_PAYLOAD


def test_fixed_vector_journal() -> None:
    """With fixed keys, nonce and time, a 2-record journal segment seals to exactly the pinned bytes."""
    assert vector_journal().hex() == VECTOR_JOURNAL_HEX
    assert open_journal(bytes.fromhex(VECTOR_JOURNAL_HEX), {"k-vector": VECTOR_KEK}).payloads == VECTOR_RECORDS


def spec_prefix(header_json: bytes) -> bytes:
    return b"natalia-secure\n" + len(header_json).to_bytes(2, "big") + header_json


def spec_wrapped(prefix: bytes) -> bytes:
    return VECTOR_WRAP_NONCE + AESGCM(VECTOR_KEK).encrypt(VECTOR_WRAP_NONCE, VECTOR_DATA_KEY, prefix)


def test_stream_vector_follows_written_spec() -> None:
    """A second implementation written from envelope.py's docstring alone (raw AES-GCM) produces the same stream file."""
    prefix = spec_prefix(VECTOR_STREAM_HEADER)
    aead = AESGCM(VECTOR_DATA_KEY)
    pieces = [VECTOR_PAYLOAD[i : i + 64] for i in range(0, len(VECTOR_PAYLOAD), 64)]
    body = b"".join(
        aead.encrypt(i.to_bytes(11, "big") + (b"\x01" if i == len(pieces) - 1 else b"\x00"), p, prefix)
        for i, p in enumerate(pieces)
    )
    assert prefix + spec_wrapped(prefix) + body == vector_stream()


def test_journal_vector_follows_written_spec() -> None:
    """A second implementation written from the docstring (length, CRC of the length, AES-GCM with lsn in the aad) agrees."""
    prefix = spec_prefix(VECTOR_JOURNAL_HEADER)
    aead = AESGCM(VECTOR_DATA_KEY)
    body = b""
    for i, payload in enumerate(VECTOR_RECORDS):
        ct = aead.encrypt(i.to_bytes(12, "big"), payload, prefix + (100 + i).to_bytes(8, "big"))
        length = len(ct).to_bytes(4, "big")
        body += length + zlib.crc32(length).to_bytes(4, "big") + ct
    assert prefix + spec_wrapped(prefix) + body == vector_journal()


# ---- golden files (made once by tests/golden/make_golden.py; they must open forever) ----

# TEST-ONLY keys, the same as make_golden.py's (public, never real).
GOLDEN_MASTER_KEY = bytes(range(32))
GOLDEN_KEYS = {"d-000000000000": bytes(range(64, 96)), "d-000000000001": bytes(range(32, 64))}
GOLDEN_SHA256 = {
    "v1-snapshot.enc": "118529e3ff8eda5761237902d247d6cb3a1db57879952c3ea7114a042354f0fb",
    "v1-backup.enc": "1987fbee5c08ff1b0f8b12e5c35471083e92852c694f185d0d8702ce6597a061",
    "v1-keyring.enc": "552cf87102623859bb9d47c35fdc6eebee03c19e2e68fa6cf5c4d6718db285f4",
    "v1-journal.enc": "2db5c749033b42f60f77f11e4cca8ecfcfa3f55586a39ee94f7bf05242120dff",
}


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _session_frame(phone: bytes, session: bytes) -> bytes:
    return _frame(b"S" + len(phone).to_bytes(2, "big") + phone + session)


GOLDEN_SESSION_A = (
    '{"messages":[{"role":"user","content":"Hola ¿qué tal? 👋","timestamp":1770155790963},'
    '{"role":"assistant","content":"¡Hola! Soy Natalia \\"quotes\\" \\\\ and\\nnewline","timestamp":1770155794155}],'
    '"lastActivity":1770155794155,"firstInteraction":1770155790963}'
).encode()
GOLDEN_SESSION_B = b'{"messages":[],"lastActivity":1770160000000,"firstInteraction":1770160000000}'
GOLDEN_PAYLOADS = {
    "v1-snapshot.enc": _frame(b'{"lsn":7,"segment":2,"base":null,"parent":null,"sessions":2,"tombstones":0}')
    + _frame(b'{"wamid.golden-1":1770155790963}')
    + _session_frame(b"34698189848", GOLDEN_SESSION_A)
    + _session_frame(b"447700900123", GOLDEN_SESSION_B),
    "v1-backup.enc": _frame(b'{"lsn":9,"segment":null,"base":null,"parent":null,"sessions":1,"tombstones":0}')
    + _frame(b"{}")
    + _session_frame(b"5215512345678", GOLDEN_SESSION_A),
    "v1-keyring.enc": (
        b'{"keys":[{"id":"d-000000000000","status":"enabled","created":"2026-01-01T00:00:00Z",'
        b'"key":"404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"},'
        b'{"id":"d-000000000001","status":"primary","created":"2026-11-25T10:15:30Z",'
        b'"key":"202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"}]}'
    ),
}
GOLDEN_RECORDS = [
    '{"op":"message","phone":"34698189848","role":"user","content":"¿Abren mañana? 🕐","ts":1770155900000}'.encode(),
    b'{"op":"claim","id":"wamid.golden-2","ts":1770155900001}',
    b"",
    b'{"op":"purge","phone":"447700900123"}',
]
GOLDEN_HEADERS = {
    "v1-snapshot.enc": Header(kind="snapshot", kid="d-000000000001", generation=3, created=CREATED, chunk=64),
    "v1-backup.enc": Header(kind="backup", kid="d-000000000000", generation=123, created=CREATED, chunk=100),
    "v1-keyring.enc": Header(kind="keyring", kid="m-adcfb069e617", generation=2, created=CREATED, chunk=4096),
    "v1-journal.enc": Header(kind="journal", kid="d-000000000001", generation=3, created=CREATED, lsn=41),
}


def golden(name: str) -> bytes:
    with open(os.path.join(GOLDEN, name), "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", sorted(GOLDEN_SHA256))
def test_golden_files_are_unchanged(name: str) -> None:
    """The golden files are the bytes made once for v1; a rewritten golden would hide a compatibility break."""
    assert hashlib.sha256(golden(name)).hexdigest() == GOLDEN_SHA256[name]


@pytest.mark.parametrize("name", ["v1-snapshot.enc", "v1-backup.enc", "v1-keyring.enc"])
def test_golden_stream_files_open(name: str) -> None:
    """Each golden v1 stream file opens with the test key to exactly the payload and header it was made with."""
    keys = {**GOLDEN_KEYS, MasterKey(GOLDEN_MASTER_KEY, "golden").kid: GOLDEN_MASTER_KEY}
    h, payload = envelope.open_sealed(golden(name), keys, GOLDEN_HEADERS[name].kind)
    assert h == GOLDEN_HEADERS[name]
    assert payload == GOLDEN_PAYLOADS[name]


def test_golden_journal_opens() -> None:
    """The golden v1 journal segment opens to exactly its four records (lsn 41-44), complete and not torn."""
    blob = golden("v1-journal.enc")
    head = envelope.read_head(blob, GOLDEN_KEYS, "journal")
    assert head.header == GOLDEN_HEADERS["v1-journal.enc"]
    assert envelope.open_records(blob, head) == Records(GOLDEN_RECORDS, len(blob), torn=False)


def test_golden_keyring_chain() -> None:
    """The golden keyring opens with the test master key (pinning the master key id) and its keys open the other goldens."""
    ring = keyring.open_keyring(golden("v1-keyring.enc"), MasterKey(GOLDEN_MASTER_KEY, "golden"), "v1-keyring.enc")
    assert ring.generation == 2
    assert ring.primary.id == "d-000000000001"
    assert ring.usable() == GOLDEN_KEYS
    assert envelope.open_sealed(golden("v1-backup.enc"), ring.usable())[1] == GOLDEN_PAYLOADS["v1-backup.enc"]


def test_golden_snapshot_loads_as_a_snapshot() -> None:
    """The golden snapshot is a real v1 snapshot: snapshot.read_file parses its frames into the sessions it holds."""
    h, data = snapshot.read_file(os.path.join(GOLDEN, "v1-snapshot.enc"), GOLDEN_KEYS)
    assert h.generation == 3
    assert data.meta["lsn"] == 7
    assert data.claims == {"wamid.golden-1": 1770155790963}
    assert data.sessions == {"34698189848": GOLDEN_SESSION_A, "447700900123": GOLDEN_SESSION_B}


# ---- flip every byte (borg) ----

FLIP_PAYLOAD = bytes(range(256))[:200]  # 200 bytes in chunks of 64: four chunks, the last one short


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_every_flipped_byte_of_a_stream_file_is_refused(kind: str) -> None:
    """Flipping any bit pattern (0x01, 0x80, 0xff) in any byte of a 4-chunk stream file makes it refuse to open."""
    blob = sealed(kind, FLIP_PAYLOAD, chunk=64)
    assert len(chunk_offsets(blob, 64)) == 5
    assert envelope.open_sealed(blob, KEYS, kind)[1] == FLIP_PAYLOAD
    for i in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            with pytest.raises(EnvelopeError):
                envelope.open_sealed(flipped(blob, i, mask), KEYS, kind)


def test_every_flipped_byte_of_a_journal_is_refused() -> None:
    """Flipping any byte of a journal segment raises: never a torn-tail result that drops a record, never other payloads."""
    payloads = [b"alpha", b"", b"gamma" * 20, b"delta"]
    blob, _ = sealed_journal(payloads, lsn=7)
    assert open_journal(blob).payloads == payloads
    for i in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            with pytest.raises(EnvelopeError):
                open_journal(flipped(blob, i, mask))


# ---- truncation, extension, reordering ----


@pytest.mark.parametrize("size", [200, 256])  # last chunk short / last chunk exactly full
def test_truncation_anywhere_is_refused(size: int) -> None:
    """A multi-chunk stream file cut at any byte, chunk boundaries included, is refused."""
    blob = sealed(payload=os.urandom(size), chunk=64)
    for n in range(len(blob)):
        with pytest.raises(EnvelopeError):
            envelope.open_sealed(blob[:n], KEYS)


@pytest.mark.parametrize("size", [200, 256])
def test_truncation_at_each_chunk_boundary_is_refused(size: int) -> None:
    """Dropping whole trailing chunks (a cut exactly at a chunk boundary) is caught by the last-chunk flag."""
    blob = sealed(payload=os.urandom(size), chunk=64)
    offsets = chunk_offsets(blob, 64)
    for cut in offsets[:-1]:
        with pytest.raises(EnvelopeError, match=r"truncated|fails authentication"):
            envelope.open_sealed(blob[:cut], KEYS)


@pytest.mark.parametrize("size", [0, 200, 256])
@pytest.mark.parametrize("extra", [b"\x00", bytes(TAG_LEN), os.urandom(TAG_LEN + 1), os.urandom(64 + TAG_LEN)])
def test_extension_is_refused(size: int, extra: bytes) -> None:
    """Bytes appended after the last chunk are refused, whether the last chunk was empty, short or full."""
    blob = sealed(payload=os.urandom(size), chunk=64)
    with pytest.raises(EnvelopeError):
        envelope.open_sealed(blob + extra, KEYS)


def test_appended_chunk_from_another_file_is_refused() -> None:
    """A whole sealed chunk taken from another file and appended is refused."""
    blob = sealed(payload=os.urandom(128), chunk=64)
    other = sealed(payload=os.urandom(256), chunk=64)
    off = chunk_offsets(other, 64)
    with pytest.raises(EnvelopeError):
        envelope.open_sealed(blob + other[off[2] : off[3]], KEYS)


def test_empty_last_chunk_after_full_chunks_is_refused() -> None:
    """A correctly sealed empty last chunk after full ones is refused: only an empty payload has an empty chunk."""
    payload = os.urandom(128)
    blob = sealed(payload=payload, chunk=64)
    head = envelope.read_head(blob, KEYS)
    aead = AESGCM(head.data_key)
    # Re-seal by hand with the real data key: two full non-last chunks then an empty last one.
    body = b"".join(
        aead.encrypt(i.to_bytes(11, "big") + last, part, head.prefix)
        for i, (part, last) in enumerate([(payload[:64], b"\x00"), (payload[64:], b"\x00"), (b"", b"\x01")])
    )
    with pytest.raises(EnvelopeError, match="truncated"):
        envelope.open_sealed(blob[: head.size] + body, KEYS)


def _swap(blob: bytes, off: list[int], i: int, j: int) -> bytes:
    parts = [blob[off[k] : off[k + 1]] for k in range(len(off) - 1)]
    parts[i], parts[j] = parts[j], parts[i]
    return blob[: off[0]] + b"".join(parts)


def test_reordered_chunks_are_refused() -> None:
    """Swapping, duplicating or dropping sealed chunks is refused (the counter is in every nonce)."""
    blob = sealed(payload=os.urandom(256), chunk=64)
    off = chunk_offsets(blob, 64)
    assert len(off) == 5
    for i, j in [(0, 1), (1, 2), (0, 2), (2, 3), (0, 3)]:
        with pytest.raises(EnvelopeError):
            envelope.open_sealed(_swap(blob, off, i, j), KEYS)
    duplicated = blob[: off[1]] + blob[off[0] : off[1]] + blob[off[2] :]
    dropped = blob[: off[1]] + blob[off[2] :]
    for bad in (duplicated, dropped):
        with pytest.raises(EnvelopeError):
            envelope.open_sealed(bad, KEYS)


def test_chunk_from_another_file_is_refused() -> None:
    """A chunk with the same index from another file is refused, even one sealed with the same data key and KEK."""
    dk = os.urandom(32)
    blob = envelope.seal(header(generation=1), KEK, os.urandom(256), data_key=dk)
    for other in (
        sealed(payload=os.urandom(256), generation=1),  # another file: its own data key
        envelope.seal(header(generation=2), KEK, os.urandom(256), data_key=dk),  # same key, other header (aad)
    ):
        a, b = chunk_offsets(blob, 64), chunk_offsets(other, 64)
        assert a == b
        for k in range(len(a) - 1):
            with pytest.raises(EnvelopeError):
                envelope.open_sealed(blob[: a[k]] + other[a[k] : a[k + 1]] + blob[a[k + 1] :], KEYS)


def test_wrapped_key_from_another_file_is_refused() -> None:
    """Transplanting the head (header + wrapped key) of one file onto another's body is refused."""
    a = sealed(payload=os.urandom(200))
    b = sealed(payload=os.urandom(200))
    size = envelope.read_head(a, KEYS).size
    with pytest.raises(EnvelopeError):
        envelope.open_sealed(a[:size] + b[size:], KEYS)


# ---- header ----

KEYS2 = {"k1": KEK, "k2": OTHER_KEK, "same": KEK}


def _mutated(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(obj)
    for k, v in changes.items():
        if v is _DROP:
            del out[k]
        else:
            out[k] = v
    return out


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "backup"}, "fails authentication"),  # a well-formed header, but not the one the key was wrapped with
        ({"kid": "k2"}, "fails authentication"),
        ({"kid": "same"}, "fails authentication"),  # same KEK under another id: the kid itself is authenticated
        ({"generation": 2}, "fails authentication"),
        ({"created": "2026-11-25T10:15:31Z"}, "fails authentication"),
        ({"chunk": 65}, "fails authentication"),
        ({"version": 2}, "unsupported format version"),
        ({"version": "1"}, "unsupported format version"),
        ({"alg": "AES-128-GCM"}, "unsupported algorithm"),
        ({"alg": "ChaCha20-Poly1305"}, "unsupported algorithm"),
        ({"format": "natalia"}, "unknown format"),
        ({"compression": "zstd"}, "unknown header fields"),
        ({"kid": "unknown"}, "unknown key id"),
        ({"kid": "../k1"}, "malformed key id"),
        ({"kind": "sessions"}, "unknown kind"),
        ({"kind": "journal"}, "journal needs"),
        ({"lsn": 1}, "no lsn"),
        ({"chunk": _DROP}, "chunk size"),
        ({"kid": _DROP}, "lacks"),
        ({"generation": -1}, "generation"),
        ({"generation": 1.0}, "generation"),
        ({"generation": True}, "generation"),
        ({"generation": "1"}, "generation"),
        ({"created": "2026-11-25 10:15:30"}, "created"),
        ({"chunk": MIN_CHUNK - 1}, "chunk size"),
        ({"chunk": envelope.MAX_CHUNK + 1}, "chunk size"),
    ],
)
def test_changed_header_is_refused(changes: dict[str, Any], message: str) -> None:
    """Each change to a header field, rewritten in canonical form with a correct length, is refused for its own reason."""
    blob = sealed(payload=os.urandom(100))
    raw = canonical(_mutated(header_obj(blob), **changes))
    with pytest.raises(EnvelopeError, match=message):
        envelope.open_sealed(with_header(blob, raw), KEYS2)
    if message != "fails authentication":
        # Sealed with that header by another writer (so it authenticates), it is still refused, for the same reason.
        with pytest.raises(EnvelopeError, match=message):
            envelope.open_sealed(seal_raw(raw, b"payload"), KEYS2)


def seal_raw(raw_header: bytes, payload: bytes, kek: bytes = KEK, chunk: int = 64) -> bytes:
    """A file written by a foreign writer from the spec, with any header bytes: it authenticates, whatever they say."""
    prefix = envelope.MAGIC + struct.pack(">H", len(raw_header)) + raw_header
    data_key, nonce = os.urandom(32), os.urandom(12)
    pieces = [payload[i : i + chunk] for i in range(0, len(payload), chunk)] or [b""]
    aead = AESGCM(data_key)
    body = b"".join(
        aead.encrypt(i.to_bytes(11, "big") + (b"\x01" if i == len(pieces) - 1 else b"\x00"), p, prefix)
        for i, p in enumerate(pieces)
    )
    return prefix + nonce + AESGCM(kek).encrypt(nonce, data_key, prefix) + body


def test_seal_raw_writes_valid_files() -> None:
    """The foreign writer above makes files this reader opens when their header is canonical (so its refusals count)."""
    raw = canonical(header_obj(sealed()))
    assert envelope.open_sealed(seal_raw(raw, b"x" * 200), KEYS) == (header(), b"x" * 200)


def test_changed_journal_header_is_refused() -> None:
    """Changing a journal segment's first lsn (which every record's aad depends on) is refused."""
    blob, _ = sealed_journal([b"a", b"b"], lsn=5)
    for lsn in (4, 6):
        with pytest.raises(EnvelopeError, match="fails authentication"):
            open_journal(with_header(blob, canonical(_mutated(header_obj(blob), lsn=lsn))))


def _noncanonical(obj: dict[str, Any]) -> list[bytes]:
    text = canonical(obj).decode()
    return [
        json.dumps(obj, sort_keys=True).encode(),  # spaces after separators
        json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":")).encode(),
        (text + " ").encode(),
        (" " + text).encode(),
        text.replace('"snapshot"', '"\\u0073napshot"').encode(),  # same string, escaped
        text.replace('"kid":"k1"', '"kid":"k2","kid":"k1"').encode(),  # duplicate key, last wins in json.loads
        text.encode("utf-16"),  # json.loads detects UTF-16 in bytes
    ]


def test_noncanonical_header_is_refused() -> None:
    """A header saying the same thing in another JSON spelling is refused, even when it authenticates (one spelling only)."""
    blob = sealed(payload=b"x")
    variants = _noncanonical(header_obj(blob))
    assert len(set(variants)) == len(variants) == 7
    for raw in variants:
        with pytest.raises(EnvelopeError):
            envelope.open_sealed(with_header(blob, raw), KEYS)
        with pytest.raises(EnvelopeError, match="canonical form"):
            envelope.open_sealed(seal_raw(raw, b"x"), KEYS)


def test_float_generation_is_refused() -> None:
    """A generation written as a float (1.0e0), even by a writer whose file authenticates, is refused."""
    raw = canonical(header_obj(sealed())).replace(b'"generation":1', b'"generation":1.0e0')
    with pytest.raises(EnvelopeError, match="generation"):
        envelope.open_sealed(seal_raw(raw, b"x"), KEYS)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"natalia-secret\n" + b[15:],
        lambda b: b"",
        lambda b: b[:10],
        lambda b: envelope.MAGIC + b"\x00\x00" + b[17:],  # header length 0
        lambda b: envelope.MAGIC + struct.pack(">H", envelope.MAX_HEADER_LEN + 1) + b[17:],
        lambda b: envelope.MAGIC + struct.pack(">H", 0xFFFF) + b[17:],
        lambda b: with_header(b, b"not json"),
        lambda b: with_header(b, b"[1,2]"),
        lambda b: with_header(b, b"null"),
        lambda b: with_header(b, b"\xff\xfe"),
        lambda b: with_header(b, b"[" * 2048 + b"]" * 2048),  # nesting deep enough for a RecursionError
    ],
)
def test_malformed_prefix_is_refused(mangle: Callable[[bytes], bytes]) -> None:
    """Bad magic, impossible header lengths and headers that are not a JSON object are refused."""
    with pytest.raises(EnvelopeError):
        envelope.open_sealed(mangle(sealed(payload=b"payload")), KEYS)


def test_unknown_key_id_is_refused() -> None:
    """A file sealed under a key id the keyring does not hold is refused, naming the id."""
    blob = sealed(payload=b"x")
    with pytest.raises(EnvelopeError, match="unknown key id 'k1'"):
        envelope.open_sealed(blob, {"k2": KEK})
    with pytest.raises(EnvelopeError, match="unknown key id"):
        envelope.open_sealed(blob, {})


def test_wrong_kek_is_refused() -> None:
    """A file opened with the wrong key under its key id is refused before any chunk is decrypted."""
    with pytest.raises(EnvelopeError, match="wrapped data key"):
        envelope.open_sealed(sealed(payload=b"x"), {"k1": OTHER_KEK})
    blob, _ = sealed_journal([b"x"])
    with pytest.raises(EnvelopeError, match="wrapped data key"):
        open_journal(blob, {"k1": OTHER_KEK})


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_expected_kind_mismatch_is_refused(kind: str) -> None:
    """A file of one kind offered where another is expected is refused (a backup is never loaded as a keyring)."""
    blob = sealed(kind, b"x")
    for other in envelope.KINDS:
        if other != kind:
            with pytest.raises(EnvelopeError, match=f"expected a {other} file"):
                envelope.open_sealed(blob, KEYS, other)


def test_journal_has_no_stream_body() -> None:
    """A journal segment is refused by the stream reader even when no kind is expected."""
    blob, _ = sealed_journal([b"x"])
    with pytest.raises(EnvelopeError, match="no stream body"):
        envelope.open_sealed(blob, KEYS)


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "nope", "chunk": 64},
        {"kind": "snapshot"},
        {"kind": "snapshot", "chunk": 64, "lsn": 1},
        {"kind": "snapshot", "chunk": 63},
        {"kind": "journal"},
        {"kind": "journal", "lsn": 0},
        {"kind": "journal", "lsn": 1, "chunk": 64},
        {"kind": "journal", "lsn": True},
        {"kind": "snapshot", "chunk": 64, "kid": ""},
        {"kind": "snapshot", "chunk": 64, "kid": "a" * 65},
        {"kind": "snapshot", "chunk": 64, "kid": "k\n"},
        {"kind": "snapshot", "chunk": 64, "created": "2026-11-25T10:15:30"},
        {"kind": "snapshot", "chunk": 64, "created": "2026-11-25T10:15:30Z\n"},
        {"kind": "snapshot", "chunk": 64, "generation": -1},
        {"kind": "snapshot", "chunk": 64, "generation": 2**63},
        {"kind": "journal", "lsn": 2**63},
        {"kind": "snapshot", "chunk": 64, "created": "\u0662\u0660\u0662\u0666-11-25T10:15:30Z"},  # Arabic-Indic digits
        {"kind": "snapshot", "chunk": 64, "kid": "k\u0661"},
    ],
)
def test_header_refuses_invalid_fields(fields: dict[str, Any]) -> None:
    """Header() itself refuses a field the format does not allow, so nothing invalid is ever written."""
    base: dict[str, Any] = {"kid": "k1", "generation": 0, "created": CREATED}
    with pytest.raises(EnvelopeError, match="invalid header"):
        Header(**{**base, **fields})


def test_header_bounds_accepted() -> None:
    """The largest generation and first lsn the format allows (2^63-1, the lsn is a u64 in the aad) are accepted."""
    top = envelope.MAX_COUNTER
    assert top == 2**63 - 1
    assert Header(kind="snapshot", kid="k1", generation=top, created=CREATED, chunk=envelope.MAX_CHUNK).generation == top
    blob, _ = sealed_journal([b"a"], lsn=top)
    assert open_journal(blob).payloads == [b"a"]


def test_record_sealer_refuses_oversized_records() -> None:
    """A record above MAX_RECORD is refused when sealed, since every reader would refuse it as corruption."""
    head, start = envelope.new_head(header("journal"), KEK)
    sealer = RecordSealer(head)
    with pytest.raises(ValueError, match="at most"):
        sealer.seal(bytes(envelope.MAX_RECORD + 1))
    assert sealer.count == 0  # nothing was consumed: the next record still gets the first lsn
    biggest = bytes(envelope.MAX_RECORD)
    assert open_journal(start + sealer.seal(b"ok") + sealer.seal(biggest)).payloads == [b"ok", biggest]


# ---- journal: torn tails versus tampering ----

JOURNAL_PAYLOADS = [b"first", b"", b"third record " * 10, b"last record"]


def test_journal_cut_anywhere_is_torn_or_complete() -> None:
    """A segment cut at any byte after its head keeps every record before the cut: torn inside a record, whole at a boundary."""
    blob, off = sealed_journal(JOURNAL_PAYLOADS)
    for cut in range(off[0], len(blob) + 1):
        k = max(i for i, o in enumerate(off) if o <= cut)  # records wholly before the cut
        records = open_journal(blob[:cut])
        assert records.payloads == JOURNAL_PAYLOADS[:k]
        assert records.end == off[k]
        assert records.torn is (cut != off[k])


def test_journal_cut_inside_the_last_record_is_torn() -> None:
    """A cut inside the last record's 8-byte head or its body gives torn=True and the earlier records intact."""
    blob, off = sealed_journal(JOURNAL_PAYLOADS)
    last = off[-2]
    for cut in [last + 1, last + RECORD_HEAD.size - 1, last + RECORD_HEAD.size, last + RECORD_HEAD.size + 1, len(blob) - 1]:
        assert open_journal(blob[:cut]) == Records(JOURNAL_PAYLOADS[:-1], last, torn=True)


def test_journal_cut_inside_the_head_is_refused() -> None:
    """A segment cut inside its header or wrapped key is refused (heads are written atomically, never torn)."""
    blob, off = sealed_journal([b"x"])
    for cut in range(off[0]):
        with pytest.raises(EnvelopeError):
            open_journal(blob[:cut])


@pytest.mark.parametrize("zeros", [1, 7, 8, 9, 40, 4096])
def test_journal_all_zero_tail_is_torn(zeros: int) -> None:
    """An all-zero tail (file extended, data never written before power loss) is torn; every record before it is kept."""
    blob, _ = sealed_journal(JOURNAL_PAYLOADS)
    assert open_journal(blob + bytes(zeros)) == Records(JOURNAL_PAYLOADS, len(blob), torn=True)


def test_journal_zero_tail_after_a_cut_record_is_torn() -> None:
    """A record cut short and then followed by a few zero bytes, still shorter than its length, is torn."""
    blob, off = sealed_journal(JOURNAL_PAYLOADS)
    cut = off[-2] + RECORD_HEAD.size + 2
    assert open_journal(blob[:cut] + bytes(3)) == Records(JOURNAL_PAYLOADS[:-1], off[-2], torn=True)


@pytest.mark.parametrize("index", range(len(JOURNAL_PAYLOADS)))
def test_journal_corrupt_length_crc_is_refused(index: int) -> None:
    """A record head whose CRC does not match its length is tampering, not a torn tail, wherever the record is."""
    blob, off = sealed_journal(JOURNAL_PAYLOADS)
    for pos in range(off[index] + 4, off[index] + 8):
        with pytest.raises(EnvelopeError, match="corrupt length"):
            open_journal(flipped(blob, pos, 0x10))


@pytest.mark.parametrize("n", [0, TAG_LEN - 1, envelope.MAX_RECORD + TAG_LEN + 1, 0xFFFFFFFF])
def test_journal_impossible_length_with_valid_crc_is_refused(n: int) -> None:
    """A CRC-valid head announcing an impossible length is refused, not taken for a torn tail (even past the file's end)."""
    blob, off = sealed_journal(JOURNAL_PAYLOADS)
    bad = blob[: off[-2]] + envelope.record_head(n) + blob[off[-2] + RECORD_HEAD.size :]
    with pytest.raises(EnvelopeError, match="impossible length"):
        open_journal(bad)


def test_journal_complete_record_failing_authentication_is_refused() -> None:
    """A complete last record whose body fails authentication raises: it may have been acknowledged, so it is not dropped."""
    blob, off = sealed_journal(JOURNAL_PAYLOADS)
    for pos in (off[-2] + RECORD_HEAD.size, len(blob) - 1):
        with pytest.raises(EnvelopeError, match=r"record 3 .* fails authentication"):
            open_journal(flipped(blob, pos, 0x01))


def test_journal_records_cannot_be_reordered_or_dropped() -> None:
    """Swapping two records or removing one from the middle is refused (record index in the nonce, lsn in the aad)."""
    blob, off = sealed_journal(JOURNAL_PAYLOADS)
    recs = [blob[off[i] : off[i + 1]] for i in range(len(JOURNAL_PAYLOADS))]
    swapped = blob[: off[0]] + recs[1] + recs[0] + recs[2] + recs[3]
    dropped = blob[: off[0]] + recs[0] + recs[2] + recs[3]
    for bad in (swapped, dropped):
        with pytest.raises(EnvelopeError, match="fails authentication"):
            open_journal(bad)


def test_journal_record_from_another_segment_is_refused() -> None:
    """A record with the same index from another segment is refused, even one sealed with the same data key."""
    dk = os.urandom(32)
    a_head, a_start = envelope.new_head(header("journal", lsn=10), KEK, data_key=dk)
    b_head, _ = envelope.new_head(header("journal", lsn=20), KEK, data_key=dk)  # same key, other first lsn
    a, b = RecordSealer(a_head), RecordSealer(b_head)
    a_recs = [a.seal(p) for p in (b"one", b"two")]
    b_recs = [b.seal(p) for p in (b"one", b"xyz")]
    with pytest.raises(EnvelopeError):
        open_journal(a_start + a_recs[0] + b_recs[1])
    c_head, _ = envelope.new_head(header("journal", lsn=10), KEK)  # other data key
    c_rec = RecordSealer(c_head).seal(b"one")
    with pytest.raises(EnvelopeError):
        open_journal(a_start + c_rec + a_recs[1])


def test_record_sealer_counts_lsns() -> None:
    """RecordSealer numbers records from the header's lsn, and open_records checks them in that order."""
    head, start = envelope.new_head(header("journal", lsn=1000), KEK)
    sealer = RecordSealer(head)
    assert sealer.next_lsn == 1000
    blob = start + sealer.seal(b"a") + sealer.seal(b"b")
    assert (sealer.count, sealer.next_lsn) == (2, 1002)
    assert open_journal(blob).payloads == [b"a", b"b"]


# ---- sizes above the 2^31-1 one-shot AEAD limit ----


def _big_blocks(total: int, block: bytearray) -> Iterator[memoryview]:
    """`total` bytes as 1 MiB blocks, each stamped with its index so that a reordered block would be noticed."""
    left, i = total, 0
    while left:
        block[:8] = i.to_bytes(8, "big")
        n = min(left, len(block))
        yield memoryview(block)[:n]
        left -= n
        i += 1


def test_stream_above_2_gib(tmp_path: Any) -> None:
    """A 2 GiB + 1000 byte payload seals to a real file and streams back intact (past AESGCM's 2^31-1 one-shot limit)."""
    total = 2**31 + 1000
    block = bytearray(random.Random(1).randbytes(1 << 20))
    h = header(chunk=DEFAULT_CHUNK)
    head, start = envelope.new_head(h, KEK)
    path = tmp_path / "big.enc"
    with open(path, "wb") as f:
        f.write(start)
        assert envelope.seal_stream(head, _big_blocks(total, block), f.write) == total
    assert path.stat().st_size == head.size + total + (total // DEFAULT_CHUNK + 1) * TAG_LEN
    try:
        with open(path, "rb") as f:
            read = envelope.read_head(f.read(head.size), KEYS, "snapshot")
            f.seek(read.size)
            expected = _big_blocks(total, bytearray(block))
            got = 0
            for plain in envelope.open_stream(f, read):
                want = next(expected)
                assert plain == want  # memcmp: as strong as a hash and faster
                got += len(plain)
            assert next(expected, None) is None
        assert got == total
    finally:
        os.unlink(path)


def test_open_stream_reads_a_real_file(tmp_path: Any) -> None:
    """open_stream reads from an unbuffered file object too (short chunks at EOF, no seek beyond the head)."""
    payload = os.urandom(10_000)
    blob = sealed(payload=payload, chunk=1000)
    path = tmp_path / "s.enc"
    path.write_bytes(blob)
    with open(path, "rb", buffering=0) as f:
        head = envelope.read_head(f.read(4096), KEYS)
        f.seek(head.size)
        assert b"".join(bytes(c) for c in envelope.open_stream(f, head)) == payload


def test_wrapped_key_length() -> None:
    """The wrapped data key is 60 bytes (nonce, key, tag), as the spec's layout says."""
    assert WRAPPED_KEY_LEN == 60
    blob = sealed(payload=b"")
    _, end = envelope.parse_prefix(blob)
    assert len(blob) == end + WRAPPED_KEY_LEN + TAG_LEN
