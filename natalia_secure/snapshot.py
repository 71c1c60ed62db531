"""Snapshot and backup files: the payload's framing (pure) and the sealed files that hold it.

Payload = frames, each u32be(length) || body:
    frame 0   meta JSON   {"lsn", "segment", "base", "parent", "sessions", "tombstones"}
    frame 1   claims JSON {message id: claimed at (ms)}: a base's are all, a delta's those added since its parent
    then      b"S" || u16be(len(phone)) || phone || session JSON     one per session
    then      b"D" || phone                                         one per session removed (deltas only)

A base (base = parent = null) holds every session; a delta holds only what changed since its parent, so a snapshot
after 1% of sessions changed writes ~1% of the bytes (full rewrites were measured at ~0.4 GB/s here, DESIGN's
targets need far less). Backups are bases of kind "backup". Session bodies are stored exactly as held in memory
(compact JSON), so writing is concatenation plus streamed encryption and reading is slicing: nothing is parsed.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import orjson

from . import atomicfile, envelope
from .errors import EnvelopeError, IntegrityError

FRAME = struct.Struct(">I")
PHONE_LEN = struct.Struct(">H")
NAME = re.compile(r"snapshot\.g(\d{6,})\.enc\Z")
T = TypeVar("T")
META_KEYS = {"lsn", "segment", "base", "parent", "sessions", "tombstones"}


def snapshot_name(generation: int) -> str:
    return f"snapshot.g{generation:06d}.enc"


def payload_pieces(
    meta: dict[str, Any], claims: dict[str, int], sessions: Iterable[tuple[str, bytes]], tombstones: Iterable[str]
) -> Iterator[bytes]:
    """The payload as a sequence of byte strings (session bodies are passed through, never copied here)."""
    for obj in (meta, claims):
        body = orjson.dumps(obj)
        yield FRAME.pack(len(body)) + body
    for phone, session in sessions:
        p = phone.encode()
        yield FRAME.pack(1 + PHONE_LEN.size + len(p) + len(session)) + b"S" + PHONE_LEN.pack(len(p)) + p
        yield session
    for phone in tombstones:
        p = phone.encode()
        yield FRAME.pack(1 + len(p)) + b"D" + p


def iter_frames(chunks: Iterable[memoryview | bytes]) -> Iterator[bytes]:
    """Cut a stream of plaintext chunks into frame bodies; the stream must end exactly at a frame boundary."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        pos = 0
        while len(buf) - pos >= FRAME.size:
            (n,) = FRAME.unpack_from(buf, pos)
            if len(buf) - pos - FRAME.size < n:
                break
            yield bytes(buf[pos + FRAME.size : pos + FRAME.size + n])
            pos += FRAME.size + n
        del buf[:pos]
    if buf:
        raise IntegrityError("snapshot payload ends inside a frame")


@dataclass
class SnapshotData:
    meta: dict[str, Any]
    claims: dict[str, int]
    sessions: dict[str, bytes] = field(repr=False)
    tombstones: list[str]


def _json_frame(frames: Iterator[bytes], what: str) -> Any:
    try:
        return orjson.loads(next(frames))
    except (StopIteration, orjson.JSONDecodeError):
        raise IntegrityError(f"snapshot payload lacks a valid {what} frame") from None


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def parse_meta(frames: Iterator[bytes]) -> dict[str, Any]:
    """The meta frame, strictly checked: authenticated, yet a writer bug or a future version must be an
    IntegrityError here, never a TypeError deep inside the store (the keyring's payload is held to the same rule)."""
    meta = _json_frame(frames, "meta")
    if not isinstance(meta, dict) or set(meta) != META_KEYS:
        raise IntegrityError("snapshot meta frame is malformed")
    counts = all(_count(meta[k]) for k in ("lsn", "sessions", "tombstones"))
    links = all(meta[k] is None or _count(meta[k]) for k in ("segment", "base", "parent"))
    if not (counts and links):
        raise IntegrityError("snapshot meta frame holds a value of the wrong type")
    return meta


def parse_payload(frames: Iterator[bytes]) -> SnapshotData:
    meta = parse_meta(frames)
    claims = _json_frame(frames, "claims")
    if not isinstance(claims, dict) or not all(_count(t) for t in claims.values()):
        raise IntegrityError("snapshot claims frame is malformed")
    sessions: dict[str, bytes] = {}
    tombstones: list[str] = []
    try:
        for body in frames:
            kind = body[:1]
            if kind == b"S":
                (n,) = PHONE_LEN.unpack_from(body, 1)
                start = 1 + PHONE_LEN.size
                if start + n > len(body):
                    raise IntegrityError("snapshot payload holds a session frame shorter than its phone")
                sessions[body[start : start + n].decode()] = body[start + n :]
            elif kind == b"D":
                tombstones.append(body[1:].decode())
            else:
                raise IntegrityError("snapshot payload holds a frame of unknown type")
    except (struct.error, UnicodeDecodeError):
        raise IntegrityError("snapshot payload holds a malformed session or tombstone frame") from None
    if len(sessions) != meta["sessions"] or len(tombstones) != meta["tombstones"]:
        raise IntegrityError("snapshot payload does not hold the sessions its meta frame counts")
    return SnapshotData(meta, claims, sessions, tombstones)


def write_file(path: str, header: envelope.Header, key: bytes, pieces: Iterable[bytes], *, replace: bool = False) -> int:
    """Seal `pieces` into a new file at `path`, atomically and durably; returns the file's size. A backup never
    replaces a file unless `replace` says so (re-sealing one under a new key, or without a forgotten person)."""
    head, start = envelope.new_head(header, key)
    size = 0

    def produce(write: Any) -> None:
        nonlocal size
        write(start)
        size += len(start)

        def counted(data: memoryview) -> None:
            nonlocal size
            write(data)
            size += len(data)

        envelope.seal_stream(head, pieces, counted)

    atomicfile.write_atomic(path, produce, overwrite=replace or header.kind != "backup")
    return size


def _open_head(f: BinaryIO, path: str, keys: dict[str, bytes], kind: str) -> envelope.Head:
    start = f.read(len(envelope.MAGIC) + 2 + envelope.MAX_HEADER_LEN + envelope.WRAPPED_KEY_LEN)
    try:
        head = envelope.read_head(start, keys, kind)
    except EnvelopeError as exc:
        raise IntegrityError(f"{path}: {exc}") from None
    f.seek(head.size)
    return head


def _read(path: str, keys: dict[str, bytes], kind: str, parse: Callable[[Iterator[bytes]], T]) -> tuple[envelope.Header, T]:
    with atomicfile.open_regular(path) as f:
        head = _open_head(f, path, keys, kind)
        try:
            return head.header, parse(iter_frames(envelope.open_stream(f, head)))
        except IntegrityError as exc:  # EnvelopeError included: every failure names the file
            raise IntegrityError(f"{path}: {exc}") from None


def read_meta(path: str, keys: dict[str, bytes], kind: str = "snapshot") -> tuple[envelope.Header, dict[str, Any]]:
    """Authenticate the head and read only the meta frame (the chunks it spans are authenticated)."""
    return _read(path, keys, kind, parse_meta)


def read_file(path: str, keys: dict[str, bytes], kind: str = "snapshot") -> tuple[envelope.Header, SnapshotData]:
    """Authenticate a whole snapshot or backup and return what it holds; IntegrityError names the file."""
    return _read(path, keys, kind, parse_payload)


def list_generations(state_dir: str) -> list[int]:
    return sorted(int(m.group(1)) for name in os.listdir(state_dir) if (m := NAME.match(name)))
