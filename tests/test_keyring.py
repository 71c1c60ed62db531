"""The keyring (natalia_secure/keyring.py): key statuses, rotation, sealing by the master key, and saving."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from natalia_secure import envelope, keyring
from natalia_secure.errors import IntegrityError, KeyMaterialError, NotFoundError
from natalia_secure.keyring import DataKey, Keyring
from natalia_secure.masterkey import MasterKey

from .conftest import deadline

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-06-01T00:00:00Z"
T2 = "2026-11-25T10:15:30Z"
NOW_MS = 1_764_065_730_000  # 2025-11-25T10:15:30Z


def mk(seed: int = 0) -> MasterKey:
    return MasterKey(bytes((seed + i) % 256 for i in range(32)), f"test-key-{seed}")


def test_new_keyring() -> None:
    """A new keyring holds one primary 32-byte key with its creation time, at generation 0."""
    ring = Keyring.new(T0)
    assert ring.generation == 0
    assert len(ring.keys) == 1
    assert ring.primary.status == "primary"
    assert ring.primary.created == T0
    assert len(ring.primary.key) == 32
    assert re.fullmatch(r"d-[0-9a-f]{12}", ring.primary.id)
    assert ring.usable() == {ring.primary.id: ring.primary.key}


def test_new_keyrings_have_different_keys() -> None:
    """Two new keyrings share neither key ids nor key bytes."""
    a, b = Keyring.new(T0).primary, Keyring.new(T0).primary
    assert a.id != b.id
    assert a.key != b.key


def test_rotation_keeps_the_old_primary_enabled() -> None:
    """After rotation a new key is primary and the old primary is enabled, so files it sealed still open."""
    ring = Keyring.new(T0)
    old = ring.primary
    rotated = ring.rotated(T1)
    assert rotated.generation == ring.generation  # only save() moves the generation
    assert rotated.primary.id != old.id
    assert rotated.primary.created == T1
    assert rotated.get(old.id) == replace(old, status="enabled")
    assert rotated.usable() == {old.id: old.key, rotated.primary.id: rotated.primary.key}
    assert [k.status for k in rotated.keys] == ["enabled", "primary"]
    assert ring.primary == old  # the keyring is immutable: rotation returns a new one


def test_retired_keys_are_not_usable() -> None:
    """A retired key stays in the keyring but opens nothing; primary and enabled keys do."""
    ring = Keyring.new(T0).rotated(T1).rotated(T2)
    first = ring.keys[0]
    ring = replace(ring, keys=(replace(first, status="retired"), *ring.keys[1:]))
    usable = ring.usable()
    assert first.id not in usable
    assert set(usable) == {ring.keys[1].id, ring.primary.id}
    assert ring.get(first.id).status == "retired"
    blob = envelope.seal(
        envelope.Header(kind="snapshot", kid=first.id, generation=0, created=T0, chunk=64), first.key, b"old data"
    )
    with pytest.raises(envelope.EnvelopeError, match="unknown key id"):
        envelope.open_sealed(blob, usable)


def test_rotating_twice_leaves_one_primary() -> None:
    """However often it is rotated, a keyring has exactly one primary and keeps every earlier key enabled."""
    ring = Keyring.new(T0)
    for _ in range(5):
        ring = ring.rotated(T1)
    assert [k.status for k in ring.keys] == ["enabled"] * 5 + ["primary"]
    assert len({k.id for k in ring.keys}) == 6


def test_get_unknown_key() -> None:
    """Asking for a key id the keyring does not hold is a NotFoundError naming it."""
    with pytest.raises(NotFoundError, match="d-nothere"):
        Keyring.new(T0).get("d-nothere")


def test_payload_round_trip() -> None:
    """to_payload/from_payload keep every key's id, status, creation time and bytes, in order."""
    ring = Keyring.new(T0).rotated(T1).rotated(T2)
    ring = replace(ring, keys=(replace(ring.keys[0], status="retired"), *ring.keys[1:]))
    assert Keyring.from_payload(ring.to_payload(), 7) == replace(ring, generation=7)


def _entry(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "d-0123456789ab", "status": "primary", "created": T0, "key": "00" * 32}
    return {**base, **fields}


def _entries(*entries: object) -> bytes:
    return orjson.dumps({"keys": list(entries)})


def test_entry_helper_is_valid() -> None:
    """The base entry used by the malformed cases is itself valid, so each case fails for its one change."""
    ring = Keyring.from_payload(_entries(_entry(), _entry(id="d-000000000000", status="retired")), 3)
    assert ring.primary.key == bytes(32)
    assert ring.generation == 3


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b'{"keys": 3}',
        b'{"nokeys": []}',
        b'{"keys": []}',  # no primary
        b'{"keys": [{"id": "a", "status": "primary", "created": "x"}]}',  # no key
        b'{"keys": [{"id": "a", "status": "primary", "created": "x", "key": "zz"}]}',  # not hex
        b'{"keys": [{"id": "a", "status": "primary", "created": "x", "key": 5}]}',
        b'{"keys": [{"id": "a", "status": "primary", "created": "x", "key": "' + b"00" * 31 + b'"}]}',
        b'{"keys": [{"id": "a", "status": "boss", "created": "x", "key": "' + b"00" * 32 + b'"}]}',
        b'{"keys": [{"id": "a", "status": "primary", "created": "x", "key": "'
        + b"00" * 32
        + b'"}, {"id": "b", "status": "primary", "created": "x", "key": "'
        + b"11" * 32
        + b'"}]}',  # two primaries
        b'{"keys": [{"id": "a", "status": "enabled", "created": "x", "key": "' + b"00" * 32 + b'"}]}',  # none
        _entries(_entry()).replace(b'"d-0123456789ab"', b'"d-0123456789AB"'),  # id: lowercase hex only
        _entries(_entry(id="k-0123456789ab")),
        _entries(_entry(id="d-0123456789a")),
        _entries(_entry(id=5)),
        _entries(_entry(created="2026-11-25 10:15:30")),
        _entries(_entry(created=None)),
        _entries(_entry(key="AB" * 32)),  # the payload writes lowercase hex: anything else is not ours
        _entries(_entry(key="00" * 33)),
        _entries(_entry(key=" " + "00" * 32)),
        _entries({**_entry(), "note": "x"}),  # unknown field
        _entries({k: v for k, v in _entry().items() if k != "created"}),
        _entries("d-0123456789ab"),
        _entries(_entry(), _entry(status="enabled")),  # a key id twice
    ],
)
def test_malformed_payload_is_integrity_error(payload: bytes) -> None:
    """A keyring payload of the wrong shape (no or two primaries, bad status, short or non-hex key) is an IntegrityError."""
    with pytest.raises(IntegrityError, match="keyring payload is malformed"):
        Keyring.from_payload(payload, 1)


def test_seal_open_round_trip() -> None:
    """A keyring sealed by a master key opens with it to the same keys and generation."""
    master = mk()
    ring = replace(Keyring.new(T0).rotated(T1), generation=4)
    blob = keyring.seal_keyring(ring, master, T2)
    header, _ = envelope.parse_prefix(blob)
    assert (header.kind, header.kid, header.generation, header.created) == ("keyring", master.kid, 4, T2)
    assert keyring.open_keyring(blob, master, "ring") == ring


def test_keyring_bytes_hide_the_keys() -> None:
    """No data key appears in the sealed keyring, neither raw nor as the hex the payload holds."""
    ring = Keyring.new(T0).rotated(T1)
    blob = keyring.seal_keyring(ring, mk(), T2)
    for k in ring.keys:
        assert k.key not in blob
        assert k.key.hex().encode() not in blob


def test_wrong_master_key_names_both_ids() -> None:
    """Opening with the wrong master key is a KeyMaterialError naming the key id the file wants and the one given."""
    right, wrong = mk(0), mk(1)
    blob = keyring.seal_keyring(Keyring.new(T0), right, T0)
    with pytest.raises(KeyMaterialError) as info:
        keyring.open_keyring(blob, wrong, "/state/keyring.enc")
    message = str(info.value)
    assert right.kid in message
    assert wrong.kid in message
    assert "/state/keyring.enc" in message
    assert "test-key-1" in message  # where the wrong key came from


def test_tampered_body_is_integrity_error() -> None:
    """Every flipped byte after the header makes the keyring an IntegrityError, never a silently changed keyring."""
    master = mk()
    blob = keyring.seal_keyring(Keyring.new(T0).rotated(T1), master, T2)
    _, end = envelope.parse_prefix(blob)
    for i in range(end, len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError, match="ring"):
            keyring.open_keyring(bytes(bad), master, "ring")


def test_tampered_header_is_refused() -> None:
    """Every flipped byte in the prefix is refused: IntegrityError, or KeyMaterialError when the flip lands in the key id."""
    master = mk()
    blob = keyring.seal_keyring(Keyring.new(T0), master, T2)
    _, end = envelope.parse_prefix(blob)
    kid_at = blob.index(master.kid.encode())
    for i in range(end):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        expected: type[Exception] = IntegrityError
        if kid_at <= i < kid_at + len(master.kid) and re.fullmatch(rb"[A-Za-z0-9._-]+", bad[kid_at : kid_at + len(master.kid)]):
            # A well-formed but different key id cannot be told from a keyring sealed by another master key.
            expected = KeyMaterialError
        with pytest.raises(expected):
            keyring.open_keyring(bytes(bad), master, "ring")


def test_truncated_or_other_files_are_integrity_errors() -> None:
    """A truncated keyring, an empty file or another sealed kind is an IntegrityError, not a crash."""
    master = mk()
    blob = keyring.seal_keyring(Keyring.new(T0), master, T2)
    for bad in (b"", blob[:20], blob[:-1], blob + b"\x00"):
        with pytest.raises(IntegrityError):
            keyring.open_keyring(bad, master, "ring")
    backup = envelope.seal(envelope.Header(kind="backup", kid=master.kid, generation=0, created=T0, chunk=64), master.key, b"{}")
    with pytest.raises(IntegrityError, match="expected a keyring"):
        keyring.open_keyring(backup, master, "ring")


def test_authentic_but_malformed_payload_is_integrity_error() -> None:
    """A keyring that authenticates but holds a malformed payload is still refused as an IntegrityError."""
    master = mk()
    payload = orjson.dumps({"keys": []})
    blob = envelope.seal(
        envelope.Header(kind="keyring", kid=master.kid, generation=1, created=T0, chunk=4096), master.key, payload
    )
    with pytest.raises(IntegrityError):
        keyring.open_keyring(blob, master, "ring")


def test_save_bumps_generation_and_writes_0600(tmp_path: Path) -> None:
    """save() writes generation+1 in a 0600 file (even under umask 0) and load() reads the same keyring back."""
    master = mk()
    ring = Keyring.new(T0)
    old = os.umask(0)
    try:
        saved = keyring.save(str(tmp_path), ring, master, NOW_MS)
    finally:
        os.umask(old)
    path = tmp_path / keyring.FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert saved.generation == 1
    assert keyring.load(str(tmp_path), master) == saved
    header, _ = envelope.parse_prefix(path.read_bytes())
    assert header.generation == 1
    assert header.created == "2025-11-25T10:15:30Z"
    again = keyring.save(str(tmp_path), saved.rotated(T1), master, NOW_MS)
    assert again.generation == 2
    assert keyring.load(str(tmp_path), master) == again
    assert sorted(os.listdir(tmp_path)) == [keyring.FILENAME]  # no temp left


def test_load_refuses_a_symlinked_keyring(tmp_path: Path) -> None:
    """A keyring.enc that is a symlink, even to a valid keyring, is refused as an IntegrityError (never followed)."""
    master = mk()
    real = tmp_path / "elsewhere"
    real.mkdir()
    keyring.save(str(real), Keyring.new(T0), master, NOW_MS)
    state = tmp_path / "state"
    state.mkdir()
    os.symlink(real / keyring.FILENAME, state / keyring.FILENAME)
    with pytest.raises(IntegrityError, match="symbolic link"):
        keyring.load(str(state), master)


def test_load_refuses_a_fifo(tmp_path: Path) -> None:
    """A FIFO named keyring.enc is refused without blocking."""
    os.mkfifo(tmp_path / keyring.FILENAME, 0o600)
    with deadline(10), pytest.raises(IntegrityError, match="not a regular file"):
        keyring.load(str(tmp_path), mk())


def test_load_missing_keyring(tmp_path: Path) -> None:
    """Loading from a directory with no keyring is a KeyMaterialError pointing at `keys init`."""
    with pytest.raises(KeyMaterialError, match="keys init"):
        keyring.load(str(tmp_path), mk())


def test_load_with_wrong_master_key(tmp_path: Path) -> None:
    """A saved keyring loaded with another master key is refused with the path in the message."""
    keyring.save(str(tmp_path), Keyring.new(T0), mk(0), NOW_MS)
    with pytest.raises(KeyMaterialError, match=re.escape(str(tmp_path / keyring.FILENAME))):
        keyring.load(str(tmp_path), mk(1))


def test_conftest_state_dir_holds_a_keyring(state_dir: str, master: MasterKey) -> None:
    """The shared fixture's state directory holds a keyring the fixture's master key opens (generation 1)."""
    ring = keyring.load(state_dir, master)
    assert ring.generation == 1
    assert isinstance(ring.primary, DataKey)
