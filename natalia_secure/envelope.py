"""Sealed file format v1: the bytes every file under the state directory is made of.

Pure: bytes and file-like objects in, bytes out; no paths, environment, clock or logging (like pyca's fernet.py).
Randomness (data key, wrap nonce) and the creation time can be passed in so fixed vectors pin the format.
SECURITY.md specifies the format for a second implementation; tests/golden/ holds v1 files that must open forever.

    file    = MAGIC || u16be(len(header)) || header || wrapped_key || body
    header  = compact JSON object, sorted keys (the exact bytes are authenticated; "prefix" = everything so far)
    wrapped = wrap_nonce(12) || AES-256-GCM(kek[kid], wrap_nonce, data_key(32), aad=prefix)   (60 bytes)
    body    = stream chunks (snapshot, backup, keyring) or journal records (journal)

Stream chunks follow age's STREAM: chunk i = AES-256-GCM(data_key, nonce = u88be(i) || last_flag, plaintext,
aad=prefix), every chunk `chunk` bytes of plaintext except the last (0..chunk bytes, empty only when the whole
payload is). The counter stops reordering and swapping, the last flag stops truncation at a chunk boundary, and
the reader refuses bytes after the last chunk. Chunks keep every AEAD call far below cryptography's 2^31-1 byte
one-shot limit, so payloads of any size work, and `encrypt_into` with reused buffers releases the GIL
(measured ~20 GB/s here against ~2.3 GB/s for one-shot calls on fresh 64 MB buffers, DESIGN.md).

Journal records: u32be(len(ct)) || u32be(crc32(u32be(len(ct)))) || ct, ct = AES-256-GCM(data_key,
nonce = u96be(index), payload, aad = prefix || u64be(lsn)), lsn = header.lsn + index. Records are appended, so
a record whose bytes end early is a torn tail (never acknowledged) rather than tampering. The CRC guards the one
field read before authentication: without it a flipped length could pass a complete record off as torn and have
it silently dropped. `open_records` tells torn from tampered.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import EnvelopeError

MAGIC = b"natalia-secure\n"
FORMAT = "natalia-secure"
VERSION = 1
ALGORITHM = "AES-256-GCM"
KINDS = ("snapshot", "journal", "backup", "keyring")
STREAM_KINDS = ("snapshot", "backup", "keyring")

KEY_LEN = 32
TAG_LEN = 16
NONCE_LEN = 12
WRAPPED_KEY_LEN = NONCE_LEN + KEY_LEN + TAG_LEN
MAX_HEADER_LEN = 4096
DEFAULT_CHUNK = 1 << 20  # 1 MiB: large enough that per-chunk overhead vanishes, small enough to stream.
MIN_CHUNK = 64  # tiny chunks are legal (tests use them to reach every chunk boundary cheaply)
MAX_CHUNK = 16 << 20
MAX_RECORD = 16 << 20  # a journal record is one change; anything larger is corruption, not a torn write
RECORD_HEAD = struct.Struct(">II")  # ciphertext length, crc32 of the length's 4 bytes

_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z", re.ASCII)  # ASCII digits only: headers stay ASCII
_KID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z", re.ASCII)
MAX_COUNTER = (1 << 63) - 1  # generation and lsn bound (lsn goes into the aad as u64)
_HEADER_KEYS = {"format", "version", "alg", "kid", "kind", "generation", "created", "chunk", "lsn"}


@dataclass(frozen=True)
class Header:
    """What a sealed file says about itself; every field is authenticated (it is part of every AEAD's aad)."""

    kind: str
    kid: str
    generation: int
    created: str
    chunk: int | None = None  # stream kinds: plaintext bytes per chunk
    lsn: int | None = None  # journal: sequence number of the segment's first record

    def __post_init__(self) -> None:
        _check_header(self)

    def to_json(self) -> bytes:
        obj: dict[str, object] = {
            "format": FORMAT,
            "version": VERSION,
            "alg": ALGORITHM,
            "kid": self.kid,
            "kind": self.kind,
            "generation": self.generation,
            "created": self.created,
        }
        if self.chunk is not None:
            obj["chunk"] = self.chunk
        if self.lsn is not None:
            obj["lsn"] = self.lsn
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()

    def prefix(self) -> bytes:
        body = self.to_json()
        return MAGIC + struct.pack(">H", len(body)) + body


def _check_header(h: Header) -> None:
    def bad(what: str) -> EnvelopeError:
        return EnvelopeError(f"invalid header: {what}")

    if h.kind not in KINDS:
        raise bad(f"unknown kind {h.kind!r}")
    if not isinstance(h.kid, str) or not _KID.match(h.kid):
        raise bad("malformed key id")
    if type(h.generation) is not int or not 0 <= h.generation <= MAX_COUNTER:
        raise bad("generation must be an integer in [0, 2^63-1]")
    if not isinstance(h.created, str) or not _CREATED.match(h.created):
        raise bad("created must be YYYY-MM-DDTHH:MM:SSZ")
    if h.kind in STREAM_KINDS:
        if type(h.chunk) is not int or not MIN_CHUNK <= h.chunk <= MAX_CHUNK or h.lsn is not None:
            raise bad(f"a {h.kind} needs a chunk size in [{MIN_CHUNK}, {MAX_CHUNK}] and no lsn")
    elif type(h.lsn) is not int or not 1 <= h.lsn <= MAX_COUNTER or h.chunk is not None:
        raise bad("a journal needs a first lsn in [1, 2^63-1] and no chunk size")


def parse_prefix(data: bytes) -> tuple[Header, int]:
    """Parse MAGIC, length and header from the start of `data`; return the header and the prefix length.

    The header is not yet authenticated here: callers go on to unwrap the data key with the prefix as aad.
    """
    if bytes(data[: len(MAGIC)]) != MAGIC[: len(data)]:
        raise EnvelopeError("not a natalia-secure sealed file (bad magic)")
    if len(data) < len(MAGIC) + 2:
        raise EnvelopeError("truncated before the header")
    (n,) = struct.unpack_from(">H", data, len(MAGIC))
    end = len(MAGIC) + 2 + n
    if not 0 < n <= MAX_HEADER_LEN:
        raise EnvelopeError("impossible header length")
    if len(data) < end:
        raise EnvelopeError("truncated inside the header")
    try:
        obj = json.loads(data[len(MAGIC) + 2 : end])
    except (ValueError, RecursionError):  # parsed before authentication: any garbage, even deeply nested, is refused
        raise EnvelopeError("header is not JSON") from None
    if not isinstance(obj, dict):
        raise EnvelopeError("header is not a JSON object")
    if obj.get("format") != FORMAT:
        raise EnvelopeError("unknown format name")
    if obj.get("version") != VERSION:
        raise EnvelopeError(f"unsupported format version {obj.get('version')!r} (this program reads {VERSION})")
    if obj.get("alg") != ALGORITHM:
        raise EnvelopeError(f"unsupported algorithm {obj.get('alg')!r}")
    unknown = set(obj) - _HEADER_KEYS
    if unknown:
        raise EnvelopeError(f"unknown header fields {sorted(unknown)}")
    try:
        header = Header(
            kind=obj["kind"],
            kid=obj["kid"],
            generation=obj["generation"],
            created=obj["created"],
            chunk=obj.get("chunk"),
            lsn=obj.get("lsn"),
        )
    except KeyError as exc:
        raise EnvelopeError(f"header lacks {exc.args[0]!r}") from exc
    if header.prefix() != bytes(data[:end]):  # one canonical encoding: no second way to say the same header
        raise EnvelopeError("header is not in canonical form")
    return header, end


def wrap_key(kek: bytes, prefix: bytes, data_key: bytes, nonce: bytes | None = None) -> bytes:
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    if len(nonce) != NONCE_LEN or len(data_key) != KEY_LEN:
        raise ValueError("wrap nonce must be 12 bytes and data key 32 bytes")
    return nonce + AESGCM(kek).encrypt(nonce, data_key, prefix)


def unwrap_key(kek: bytes, prefix: bytes, wrapped: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(wrapped[:NONCE_LEN], wrapped[NONCE_LEN:], prefix)
    except InvalidTag:
        raise EnvelopeError("wrapped data key fails authentication (wrong key or altered header)") from None


def _stream_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _record_nonce(index: int) -> bytes:
    return index.to_bytes(NONCE_LEN, "big")


@dataclass
class Head:
    """An authenticated header with its data key: what is needed to read (or append to) the body."""

    header: Header
    prefix: bytes
    data_key: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.prefix) + WRAPPED_KEY_LEN


def new_head(header: Header, kek: bytes, *, data_key: bytes | None = None, wrap_nonce: bytes | None = None) -> tuple[Head, bytes]:
    """A fresh data key for a new file: returns the Head and the bytes that start the file."""
    data_key = os.urandom(KEY_LEN) if data_key is None else data_key
    prefix = header.prefix()
    return Head(header, prefix, data_key), prefix + wrap_key(kek, prefix, data_key, wrap_nonce)


def read_head(data: bytes, keys: Mapping[str, bytes], kind: str | None = None) -> Head:
    """Authenticate the start of a file: `data` must hold at least the prefix and wrapped key."""
    header, end = parse_prefix(data)
    if len(data) < end + WRAPPED_KEY_LEN:
        raise EnvelopeError("truncated inside the wrapped key")
    if kind is not None and header.kind != kind:
        raise EnvelopeError(f"expected a {kind} file, found a {header.kind} file")
    kek = keys.get(header.kid)
    if kek is None:
        raise EnvelopeError(f"sealed with unknown key id {header.kid!r}")
    prefix = bytes(data[:end])
    return Head(header, prefix, unwrap_key(kek, prefix, bytes(data[end : end + WRAPPED_KEY_LEN])))


# ---- stream bodies (snapshot, backup, keyring) ----


def seal_stream(head: Head, pieces: Iterable[bytes | bytearray | memoryview], write: Callable[[memoryview], object]) -> int:
    """Encrypt the concatenation of `pieces` chunk by chunk, passing each sealed chunk to `write`.

    Buffers are reused: `write` must consume its argument before returning. Returns the plaintext length.
    """
    chunk = head.header.chunk
    assert chunk is not None
    aead = AESGCM(head.data_key)
    plain = bytearray(chunk)
    out = bytearray(chunk + TAG_LEN)
    view, out_view = memoryview(plain), memoryview(out)
    fill = counter = total = 0
    for piece in pieces:
        src = memoryview(piece).cast("B")
        pos = 0
        while pos < len(src):
            if fill == chunk:  # a full chunk is sealed only once more data proves it is not the last
                aead.encrypt_into(_stream_nonce(counter, False), view, head.prefix, out_view)
                write(out_view)
                counter += 1
                fill = 0
            take = min(chunk - fill, len(src) - pos)
            view[fill : fill + take] = src[pos : pos + take]
            fill += take
            pos += take
        total += len(src)
    aead.encrypt_into(_stream_nonce(counter, True), view[:fill], head.prefix, out_view[: fill + TAG_LEN])
    write(out_view[: fill + TAG_LEN])
    return total


def open_stream(f: BinaryIO, head: Head) -> Iterator[memoryview]:
    """Yield the plaintext chunks of a stream body read from `f` (positioned just after the head).

    Each yielded view is reused by the next chunk: copy what you keep. Raises EnvelopeError on any tampering,
    truncation or trailing data; nothing is yielded from a chunk that does not authenticate.
    """
    chunk = head.header.chunk
    assert chunk is not None
    aead = AESGCM(head.data_key)
    size = chunk + TAG_LEN
    plain = bytearray(chunk)
    view = memoryview(plain)
    counter = 0
    block = f.read(size)
    while True:
        nxt = f.read(size) if len(block) == size else b""
        last = not nxt
        if len(block) < TAG_LEN or (last and len(block) == TAG_LEN and counter > 0):
            raise EnvelopeError("truncated stream (a chunk is missing or cut)")
        n = len(block) - TAG_LEN
        try:
            aead.decrypt_into(_stream_nonce(counter, last), block, head.prefix, view[:n])
        except InvalidTag:
            where = "last chunk" if last else f"chunk {counter}"
            raise EnvelopeError(f"{where} fails authentication (tampered, truncated, reordered or extended)") from None
        yield view[:n]
        if last:
            return
        counter += 1
        block = nxt


def seal(header: Header, kek: bytes, payload: bytes, *, data_key: bytes | None = None, wrap_nonce: bytes | None = None) -> bytes:
    """One-shot seal of a stream kind (small files: keyring, tests)."""
    head, start = new_head(header, kek, data_key=data_key, wrap_nonce=wrap_nonce)
    out = io.BytesIO()
    out.write(start)
    seal_stream(head, [payload], out.write)
    return out.getvalue()


def open_sealed(blob: bytes, keys: Mapping[str, bytes], kind: str | None = None) -> tuple[Header, bytes]:
    """One-shot open of a stream kind; returns the authenticated header and the payload."""
    head = read_head(blob, keys, kind)
    if head.header.kind not in STREAM_KINDS:
        raise EnvelopeError(f"a {head.header.kind} file has no stream body")
    f = io.BytesIO(blob)
    f.seek(head.size)
    return head.header, b"".join(bytes(c) for c in open_stream(f, head))


# ---- journal records ----


class RecordSealer:
    """Seals the records of one journal segment: record i carries lsn = header.lsn + i."""

    def __init__(self, head: Head) -> None:
        assert head.header.kind == "journal" and head.header.lsn is not None
        self._aead = AESGCM(head.data_key)
        self._prefix = head.prefix
        self.first_lsn = head.header.lsn
        self.count = 0

    @property
    def next_lsn(self) -> int:
        return self.first_lsn + self.count

    def seal(self, payload: bytes) -> bytes:
        if len(payload) > MAX_RECORD:
            raise ValueError(f"a journal record holds at most {MAX_RECORD} bytes")
        lsn = self.next_lsn
        ct = self._aead.encrypt(_record_nonce(self.count), payload, self._prefix + lsn.to_bytes(8, "big"))
        self.count += 1
        return record_head(len(ct)) + ct


def record_head(n: int) -> bytes:
    length = n.to_bytes(4, "big")
    return length + zlib.crc32(length).to_bytes(4, "big")


@dataclass
class Records:
    """What a journal body holds: authenticated payloads, where they end, and whether a torn tail followed."""

    payloads: list[bytes]
    end: int  # file offset just past the last complete record
    torn: bool


def open_records(data: bytes, head: Head) -> Records:
    """Authenticate every record of a journal segment (`data` is the whole file).

    A tail shorter than a record head, or shorter than the length its (CRC-checked) head gives, or all zero bytes
    (a file extended but never written before power loss), is torn: never acknowledged, so it is reported and
    dropped. A head whose CRC fails, an impossible length, or a complete record that fails authentication is
    tampering or corruption: EnvelopeError.
    """
    if head.header.lsn is None:
        raise EnvelopeError(f"a {head.header.kind} file has no journal records")
    aead = AESGCM(head.data_key)
    mv = memoryview(data)
    pos, index = head.size, 0
    payloads: list[bytes] = []
    while pos < len(data):
        rest = mv[pos:]
        if len(rest) < RECORD_HEAD.size or not any(rest):
            return Records(payloads, pos, torn=True)
        n, crc = RECORD_HEAD.unpack_from(rest)
        if zlib.crc32(rest[:4]) != crc:
            raise EnvelopeError(f"record {index} at offset {pos} has a corrupt length")
        if not TAG_LEN <= n <= MAX_RECORD + TAG_LEN:
            raise EnvelopeError(f"record {index} at offset {pos} has an impossible length")
        if len(rest) < RECORD_HEAD.size + n:
            return Records(payloads, pos, torn=True)
        lsn = head.header.lsn + index
        body = rest[RECORD_HEAD.size : RECORD_HEAD.size + n]
        try:
            payloads.append(aead.decrypt(_record_nonce(index), body, head.prefix + lsn.to_bytes(8, "big")))
        except InvalidTag:
            raise EnvelopeError(f"record {index} (lsn {lsn}) at offset {pos} fails authentication") from None
        pos += RECORD_HEAD.size + n
        index += 1
    return Records(payloads, pos, torn=False)
