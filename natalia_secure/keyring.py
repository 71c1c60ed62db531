"""The keyring: data keys that seal the store's files, itself sealed by the master key (KMS/Vault's two levels).

Each key has an id, a status and a creation time. The primary key wraps the data key of every new file; enabled
keys still open older files; retired keys open nothing (`keys retire` refuses while a file still uses one). Because
only this small file depends on the master key, rotating the master key rewraps one file.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field, replace

import orjson

from . import atomicfile, envelope
from .clock import iso_utc
from .errors import EnvelopeError, IntegrityError, KeyMaterialError, NotFoundError
from .masterkey import MasterKey

FILENAME = "keyring.enc"
STATUSES = ("primary", "enabled", "retired")


@dataclass(frozen=True)
class DataKey:
    id: str
    status: str
    created: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Keyring:
    keys: tuple[DataKey, ...]
    generation: int = 0

    @classmethod
    def new(cls, created: str) -> Keyring:
        return cls((new_data_key(created, "primary"),), 0)

    @property
    def primary(self) -> DataKey:
        return next(k for k in self.keys if k.status == "primary")

    def usable(self) -> dict[str, bytes]:
        """The keys that may open files: primary and enabled (not retired)."""
        return {k.id: k.key for k in self.keys if k.status != "retired"}

    def get(self, kid: str) -> DataKey:
        for k in self.keys:
            if k.id == kid:
                return k
        raise NotFoundError(f"no data key {kid!r} in the keyring")

    def rotated(self, created: str) -> Keyring:
        """A new primary key; the old primary stays enabled so existing files still open."""
        old = tuple(replace(k, status="enabled") if k.status == "primary" else k for k in self.keys)
        return Keyring((*old, new_data_key(created, "primary")), self.generation)

    def with_status(self, kids: set[str], status: str) -> Keyring:
        """The same keys with those in `kids` set to `status` (retiring keys no file uses any more)."""
        if status not in STATUSES or status == "primary":
            raise ValueError(f"cannot set a key to {status!r} this way")
        return Keyring(tuple(replace(k, status=status) if k.id in kids else k for k in self.keys), self.generation)

    def to_payload(self) -> bytes:
        return orjson.dumps(
            {"keys": [{"id": k.id, "status": k.status, "created": k.created, "key": k.key.hex()} for k in self.keys]}
        )

    @classmethod
    def from_payload(cls, payload: bytes, generation: int) -> Keyring:
        """Parse and strictly validate (authenticated, yet a bug or a future version must not slip through)."""
        try:
            obj = orjson.loads(payload)
            entries = obj["keys"]
            keys = tuple(_parse_key(k) for k in entries)
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"keyring payload is malformed: {exc}") from None
        if sum(k.status == "primary" for k in keys) != 1:
            raise IntegrityError("keyring payload is malformed: it needs exactly one primary key")
        if len({k.id for k in keys}) != len(keys):
            raise IntegrityError("keyring payload is malformed: a key id appears twice")
        return cls(keys, generation)


_KEY_ID = re.compile(r"d-[0-9a-f]{12}\Z", re.ASCII)
_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z", re.ASCII)
_HEX_KEY = re.compile(r"[0-9a-f]{64}\Z", re.ASCII)


def _parse_key(entry: object) -> DataKey:
    if not isinstance(entry, dict) or set(entry) != {"id", "status", "created", "key"}:
        raise ValueError("a key entry needs exactly id, status, created, key")
    kid, status, created, key = entry["id"], entry["status"], entry["created"], entry["key"]
    if not (isinstance(kid, str) and _KEY_ID.match(kid)):
        raise ValueError("malformed key id")
    if status not in STATUSES:
        raise ValueError("unknown key status")
    if not (isinstance(created, str) and _CREATED.match(created)):
        raise ValueError("malformed creation time")
    if not (isinstance(key, str) and _HEX_KEY.match(key)):
        raise ValueError("a key is 64 lowercase hex digits")
    return DataKey(kid, status, created, bytes.fromhex(key))


def new_data_key(created: str, status: str) -> DataKey:
    return DataKey("d-" + secrets.token_hex(6), status, created, os.urandom(envelope.KEY_LEN))


def seal_keyring(ring: Keyring, master: MasterKey, created: str) -> bytes:
    header = envelope.Header(kind="keyring", kid=master.kid, generation=ring.generation, created=created, chunk=4096)
    return envelope.seal(header, master.key, ring.to_payload())


def open_keyring(blob: bytes, master: MasterKey, source: str) -> Keyring:
    try:
        header, _ = envelope.parse_prefix(blob)
    except EnvelopeError as exc:
        raise IntegrityError(f"{source}: {exc}") from None
    if header.kid != master.kid:
        raise KeyMaterialError(
            f"{source} is sealed by master key {header.kid}, but {master.source} is master key {master.kid}: "
            "wrong master key (or the keyring's header was altered)"
        )
    try:
        header, payload = envelope.open_sealed(blob, {master.kid: master.key}, kind="keyring")
    except EnvelopeError as exc:
        raise IntegrityError(f"{source}: {exc}") from None
    return Keyring.from_payload(payload, header.generation)


def load(state_dir: str, master: MasterKey) -> Keyring:
    path = os.path.join(state_dir, FILENAME)
    try:
        with atomicfile.open_regular(path) as f:
            blob = f.read()
    except FileNotFoundError:
        raise KeyMaterialError(f"no keyring in {state_dir} (create one with: natalia-secure keys init)") from None
    return open_keyring(blob, master, path)


def save(state_dir: str, ring: Keyring, master: MasterKey, now_ms: int) -> Keyring:
    """Durably replace the keyring, one generation up; returns the keyring as saved."""
    ring = replace(ring, generation=ring.generation + 1)
    atomicfile.write_atomic(os.path.join(state_dir, FILENAME), [seal_keyring(ring, master, iso_utc(now_ms))])
    return ring
