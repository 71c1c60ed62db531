"""The master key (natalia_secure/masterkey.py): file format, refusals, where it is found, and creation."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natalia_secure import masterkey
from natalia_secure.errors import KeyMaterialError, UsageError
from natalia_secure.masterkey import MasterKey

from .conftest import deadline


def write(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_encode_decode_round_trip(key: bytes) -> None:
    """Any 32-byte key encodes to one prefixed base64 line and decodes back to itself."""
    line = masterkey.encode(key)
    assert line == b"natalia-master-key-v1:" + base64.b64encode(key) + b"\n"
    assert masterkey.decode(line, "test").key == key


def test_file_round_trip(tmp_path: Path) -> None:
    """create_key_file writes the documented one-line format, 0600, and read_key_file reads the same key back."""
    path = str(tmp_path / "master.key")
    created = masterkey.create_key_file(path)
    with open(path, "rb") as f:
        assert f.read() == masterkey.encode(created.key)
    assert os.stat(path).st_mode & 0o777 == 0o600
    read = masterkey.read_key_file(path)
    assert read.key == created.key
    assert read.source == path


def test_key_given_to_create_is_written(tmp_path: Path) -> None:
    """create_key_file with an explicit key writes exactly that key (the rewrap path)."""
    key = bytes(range(32))
    masterkey.create_key_file(str(tmp_path / "k"), key)
    assert masterkey.read_key_file(str(tmp_path / "k")).key == key


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_accepted(tmp_path: Path, mode: int) -> None:
    """A key file only its owner can access is accepted, whatever the owner's own bits."""
    key = os.urandom(32)
    assert masterkey.read_key_file(write(tmp_path / "k", masterkey.encode(key), mode)).key == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o610, 0o601, 0o660, 0o666])
def test_group_or_other_access_refused(tmp_path: Path, mode: int) -> None:
    """A key file group or others could read (or touch at all) is refused, and the message says how to fix it."""
    path = write(tmp_path / "k", masterkey.encode(os.urandom(32)), mode)
    with pytest.raises(KeyMaterialError, match=re.escape(f"mode {mode:04o}") + ".*chmod 0600"):
        masterkey.read_key_file(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_key_owned_by_another_user_refused(tmp_path: Path) -> None:
    """A 0600 key file owned by another user (neither us nor root) is refused, naming the uid."""
    path = write(tmp_path / "k", masterkey.encode(os.urandom(32)))
    os.chown(path, 12345, 12345)
    with pytest.raises(KeyMaterialError, match="owned by uid 12345"):
        masterkey.read_key_file(path)


def test_directory_refused(tmp_path: Path) -> None:
    """A directory where the key file should be is refused as not a regular file."""
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyMaterialError, match="not a regular file"):
        masterkey.read_key_file(str(d))


def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO is refused as not a regular file, without hanging on a FIFO that has no writer."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo, 0o600)
    with deadline(10), pytest.raises(KeyMaterialError, match="not a regular file"):
        masterkey.read_key_file(fifo)


def test_missing_file_refused(tmp_path: Path) -> None:
    """A missing key file is a KeyMaterialError that names the file and the command that creates one."""
    path = str(tmp_path / "absent.key")
    with pytest.raises(KeyMaterialError, match=re.escape(path) + ".*keys init"):
        masterkey.read_key_file(path)


SECRET_LOOKING = b"hunter2-not-a-key-but-secret"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a natalia-secure master key"),
        (b"natalia-master-key-v2:" + base64.b64encode(bytes(32)) + b"\n", "not a natalia-secure master key"),
        (base64.b64encode(bytes(32)) + b"\n", "not a natalia-secure master key"),
        (b"-----BEGIN PRIVATE KEY-----\n" + SECRET_LOOKING + b"\n", "not a natalia-secure master key"),
        (b"natalia-master-key-v1:" + SECRET_LOOKING + b"!!\n", "not valid base64"),
        (b"natalia-master-key-v1:" + base64.b64encode(bytes(32))[:-1] + b"\n", "not valid base64"),
        (b"natalia-master-key-v1:" + base64.b64encode(bytes(31)) + b"\n", "must be 32 bytes, found 31"),
        (b"natalia-master-key-v1:" + base64.b64encode(bytes(33)) + b"\n", "must be 32 bytes, found 33"),
        (b"natalia-master-key-v1:\n", "must be 32 bytes, found 0"),
        (masterkey.encode(bytes(32)) + b"\n" * 300, "too large"),
        (masterkey.encode(bytes(32)) * 10, "too large"),
    ],
)
def test_malformed_key_file_refused(tmp_path: Path, data: bytes, message: str) -> None:
    """Bad prefix, bad base64, wrong length and oversized files are refused without quoting the file's content."""
    path = write(tmp_path / "k", data)
    with pytest.raises(KeyMaterialError, match=message) as info:
        masterkey.read_key_file(path)
    assert SECRET_LOOKING.decode() not in str(info.value)


def test_surrounding_whitespace_tolerated(tmp_path: Path) -> None:
    """A key line without its newline, or with CRLF or trailing spaces (an editor's doing), still reads."""
    key = os.urandom(32)
    line = masterkey.encode(key).rstrip(b"\n")
    for data in (line, line + b"\r\n", b"  " + line + b"  \n\n"):
        assert masterkey.read_key_file(write(tmp_path / "k", data)).key == key


def test_encode_refuses_wrong_length() -> None:
    """encode() refuses anything but 32 bytes: a short key is never written."""
    with pytest.raises(ValueError, match="32 bytes"):
        masterkey.encode(bytes(31))


def test_locate_order() -> None:
    """--master-key beats NATALIA_MASTER_KEY_FILE, which beats $CREDENTIALS_DIRECTORY/master-key."""
    env = {"NATALIA_MASTER_KEY_FILE": "/env/key", "CREDENTIALS_DIRECTORY": "/run/credentials/natalia.service"}
    assert masterkey.locate("/explicit/key", env) == "/explicit/key"
    assert masterkey.locate(None, env) == "/env/key"
    assert masterkey.locate(None, {"CREDENTIALS_DIRECTORY": env["CREDENTIALS_DIRECTORY"]}) == (
        "/run/credentials/natalia.service/master-key"
    )
    assert masterkey.locate(None, {"NATALIA_MASTER_KEY_FILE": "", "CREDENTIALS_DIRECTORY": "/c"}) == "/c/master-key"


def test_locate_nothing_given() -> None:
    """With no flag, no variable and no credential directory, locate is a UsageError naming all three ways."""
    for env in ({}, {"NATALIA_MASTER_KEY_FILE": "", "CREDENTIALS_DIRECTORY": ""}, {"HOME": "/root"}):
        with pytest.raises(UsageError, match=r"--master-key.*NATALIA_MASTER_KEY_FILE.*credential"):
            masterkey.locate(None, env)
    with pytest.raises(UsageError):
        masterkey.locate("", {})


def test_load_reads_the_located_file(tmp_path: Path) -> None:
    """load() reads the key from the systemd credential directory when nothing else is given."""
    creds = tmp_path / "creds"
    creds.mkdir()
    key = os.urandom(32)
    write(creds / "master-key", masterkey.encode(key), 0o400)
    assert masterkey.load(None, {"CREDENTIALS_DIRECTORY": str(creds)}).key == key


def test_create_makes_0600_under_umask_0(tmp_path: Path) -> None:
    """create_key_file makes a 0600 file even when the umask would allow everyone everything."""
    old = os.umask(0)
    try:
        path = str(tmp_path / "k")
        masterkey.create_key_file(path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    masterkey.read_key_file(path)


def test_create_never_overwrites(tmp_path: Path) -> None:
    """create_key_file refuses an existing file, leaves its content as it was, and leaves no temp behind."""
    path = tmp_path / "k"
    first = masterkey.create_key_file(str(path))
    before = path.read_bytes()
    with pytest.raises(KeyMaterialError, match="never overwritten"):
        masterkey.create_key_file(str(path))
    assert path.read_bytes() == before
    assert masterkey.read_key_file(str(path)).key == first.key
    assert os.listdir(tmp_path) == ["k"]


def test_create_never_overwrites_other_files(tmp_path: Path) -> None:
    """create_key_file refuses to replace an unrelated existing file, even an empty one."""
    path = tmp_path / "notes"
    path.write_bytes(b"")
    with pytest.raises(KeyMaterialError):
        masterkey.create_key_file(str(path))
    assert path.read_bytes() == b""


def test_kid_is_stable_and_distinct() -> None:
    """The key id depends only on the key: the same key gives the same id, different keys different ids."""
    key = os.urandom(32)
    assert MasterKey(key, "a").kid == MasterKey(bytes(key), "b").kid
    assert re.fullmatch(r"m-[0-9a-f]{12}", MasterKey(key, "a").kid)
    kids = {MasterKey(os.urandom(32), "x").kid for _ in range(200)}
    assert len(kids) == 200
    assert MasterKey(bytes(range(32)), "test").kid == "m-adcfb069e617"  # pinned: sealed keyrings carry it


def test_kid_does_not_contain_the_key() -> None:
    """Neither the key id nor repr() shows key material."""
    key = bytes(range(32))
    mk = MasterKey(key, "/etc/natalia/master.key")
    assert key.hex()[:12] not in mk.kid
    assert key.hex() not in repr(mk)
    assert base64.b64encode(key).decode() not in repr(mk)
