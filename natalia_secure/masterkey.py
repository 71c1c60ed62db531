"""The master key (key-encryption key): its file format, where it is read from, and how it is created.

The master key never lives in the state directory: it is a file the operator keeps (0600, root or the service
user), or a systemd credential (`LoadCredential=`/`LoadCredentialEncrypted=`, read from $CREDENTIALS_DIRECTORY,
systemd.exec(5)). It seals only the small keyring, so rotating it rewraps one file (keys/README.md).

File format (one line, keys/README.md): ``natalia-master-key-v1:`` + standard base64 of 32 random bytes + newline.
The prefix makes a key recognisable and keeps an unrelated secret from being taken for one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field

from . import atomicfile
from .errors import KeyMaterialError, UsageError

PREFIX = b"natalia-master-key-v1:"
CREDENTIAL_NAME = "master-key"
KEY_LEN = 32
MAX_FILE = 256


@dataclass(frozen=True)
class MasterKey:
    key: bytes = field(repr=False)
    source: str  # where it came from, for error messages (never the key)

    @property
    def kid(self) -> str:
        """A stable, non-secret id: a keyed hash, so the id reveals nothing about the key."""
        return "m-" + hmac.new(self.key, b"natalia-secure master key id", hashlib.sha256).hexdigest()[:12]

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for one other purpose (e.g. log pseudonyms): HMAC-SHA256 as a PRF with a distinct label
        (NIST SP 800-108 style), so it reveals nothing about the master key or the keyring's keys."""
        return hmac.new(self.key, b"natalia-secure derive\0" + purpose.encode(), hashlib.sha256).digest()


def encode(key: bytes) -> bytes:
    if len(key) != KEY_LEN:
        raise ValueError("a master key is 32 bytes")
    return PREFIX + base64.b64encode(key) + b"\n"


def decode(data: bytes, source: str) -> MasterKey:
    line = data.strip()  # surrounding white space (a CRLF, a missing newline) is forgiven: editors add and drop it
    if not line.startswith(PREFIX):
        raise KeyMaterialError(f"{source} is not a natalia-secure master key (expected a line starting {PREFIX.decode()})")
    try:
        key = base64.b64decode(line[len(PREFIX) :], validate=True)
    except binascii.Error:
        raise KeyMaterialError(f"{source}: the master key is not valid base64") from None
    if len(key) != KEY_LEN:
        raise KeyMaterialError(f"{source}: the master key must be {KEY_LEN} bytes, found {len(key)}")
    return MasterKey(key, source)


def read_key_file(path: str) -> MasterKey:
    """Read a master key file, refusing one that is not a regular file or that group or others could read."""

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise KeyMaterialError(f"master key {path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise KeyMaterialError(f"master key {path} is owned by uid {st.st_uid}, not by this user or root")
        if st.st_mode & 0o077:
            raise KeyMaterialError(
                f"master key {path} is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 0600 {path}"
            )

    try:
        data, _ = atomicfile.read_small(path, MAX_FILE, check)
    except FileNotFoundError:
        raise KeyMaterialError(f"master key file {path} does not exist (create one with: natalia-secure keys init)") from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot read master key file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise KeyMaterialError(f"master key file {path} is too large to be a master key")
    return decode(data, path)


def locate(explicit: str | None, environ: dict[str, str] | os._Environ[str]) -> str:
    """Where the master key is: --master-key, else $NATALIA_MASTER_KEY_FILE, else the systemd credential."""
    if explicit:
        return explicit
    if environ.get("NATALIA_MASTER_KEY_FILE"):
        return environ["NATALIA_MASTER_KEY_FILE"]
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        return os.path.join(creds, CREDENTIAL_NAME)
    raise UsageError(
        "no master key given: use --master-key FILE, NATALIA_MASTER_KEY_FILE, or a systemd credential named master-key"
    )


def load(explicit: str | None, environ: dict[str, str] | os._Environ[str]) -> MasterKey:
    """locate() then read_key_file()."""
    return read_key_file(locate(explicit, environ))


def create_key_file(path: str, key: bytes | None = None) -> MasterKey:
    """Write a new master key file, 0600, atomically; an existing file is never overwritten."""
    key = os.urandom(KEY_LEN) if key is None else key
    try:
        atomicfile.write_atomic(path, [encode(key)], overwrite=False)
    except FileExistsError:
        raise KeyMaterialError(f"{path} already exists; a master key file is never overwritten") from None
    return MasterKey(key, path)
