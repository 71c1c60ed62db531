"""Read-only views (inventory.py): where a phone appears once every file is decrypted, WhatsApp ids that carry a
number, stats from the files, and one person's export."""

from __future__ import annotations

import base64
import os

import pytest

from natalia_secure import inventory
from natalia_secure.errors import IntegrityError
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store
from natalia_secure.verify import sealed_files

ALICE, BOB = "15550001111", "15550002222"


def meta_wamid(phone: str) -> str:
    # the shape of Meta's ids: "wamid." + base64(0x1c 0x18 len(phone) phone ... random)
    return "wamid." + base64.b64encode(b"\x1c\x18" + bytes([len(phone)]) + phone.encode() + b"\x15\x02\x00\x12\x18 3EB0").decode()


def test_wamid_names_finds_the_number_inside_metas_base64_ids() -> None:
    """An id encoding the sender's number names that sender and no other; an opaque id names nobody; an id with the
    number in clear text names it."""
    assert inventory.wamid_names(meta_wamid(ALICE), ALICE)
    assert not inventory.wamid_names(meta_wamid(ALICE), BOB)
    assert not inventory.wamid_names("wamid.!!not-base64!!", ALICE)
    assert not inventory.wamid_names("wamid.", ALICE)
    assert inventory.wamid_names(f"test-{ALICE}-1", ALICE)


def test_find_person_tells_their_data_from_mentions_in_every_kind_of_file(store: Store) -> None:
    """Sessions and claims in snapshots and backups, records in the journal, tombstones in deltas, and the number in
    someone else's text (a mention) are each reported where they are."""
    store.add_message(ALICE, "user", "hola", store.clock(), message_id=meta_wamid(ALICE))
    store.add_message(BOB, "user", f"el número de mi amiga es {ALICE}", store.clock())
    store.flush()
    store.snapshot(full=True)
    store.backup()
    store.add_message(ALICE, "assistant", "¡hola!", store.clock())
    store.flush()
    keys = store.keyring.usable()
    found = {(t.file.split(".")[0], t.where) for t in inventory.find_person(store.state_dir, keys, ALICE)}
    assert found == {
        ("snapshot", "session"),
        ("snapshot", "claim"),
        ("snapshot", "mention"),
        ("backups/sessions", "session"),
        ("backups/sessions", "claim"),
        ("backups/sessions", "mention"),
        ("journal", "record"),
    }
    store.purge(ALICE)
    store.flush()
    store.snapshot()  # a delta: it carries Alice's tombstone
    wheres = {t.where for t in inventory.find_person(store.state_dir, store.keyring.usable(), ALICE) if "snapshot" in t.file}
    assert "tombstone" in wheres
    assert inventory.find_person(store.state_dir, keys, "15559999999") == []


def test_find_person_refuses_to_vouch_for_a_file_it_cannot_open(store: Store) -> None:
    """A tampered file raises IntegrityError: a proof that skipped a file would prove nothing."""
    store.add_message(ALICE, "user", "hola", store.clock())
    store.flush()
    store.snapshot(full=True)
    snap = next(f for f in sealed_files(store.state_dir)[0] if f.kind == "snapshot")
    with open(snap.path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\xff\xff")
    with pytest.raises(IntegrityError):
        inventory.find_person(store.state_dir, store.keyring.usable(), ALICE)


def test_stats_and_export_read_the_files(state_dir: str, master: MasterKey) -> None:
    """stats counts sessions, messages, files, backups and keys; export gives one person's session and the backups
    holding a copy."""
    with Store.open(state_dir, master) as store:
        store.add_message(ALICE, "user", "hola", store.clock())
        store.add_message(BOB, "user", "buenas", store.clock())
        store.flush()
        store.snapshot(full=True)
        store.backup()
        store.add_message(ALICE, "assistant", "¡hola!", store.clock())
        store.flush()
    ro = Store.open(state_dir, master, readonly=True)
    st = inventory.stats(ro, ro.clock())
    assert (st["sessions"], st["messages"], st["backups"]["count"], st["journal"]["records_since_snapshot"]) == (2, 3, 1, 1)
    assert st["store_bytes"] > 0 and st["last_snapshot"]["age_s"] is not None
    assert [(k["status"], len(k["files"])) for k in st["keys"]] == [("primary", 3)]  # snapshot, segment, backup
    exported = inventory.export(ro, ALICE, ro.clock())
    assert exported["messages"] == 2 and [m["content"] for m in exported["session"]["messages"]] == ["hola", "¡hola!"]
    assert len(exported["backups_holding_a_copy"]) == 1


def test_wamid_names_compares_the_whole_number_field() -> None:
    """A number one digit short (a typo) never matches the longer number inside an id: forget must not drop another
    person's claims; in an id of another shape the number must stand alone."""
    assert not inventory.wamid_names(meta_wamid("34698189848"), "4698189848")
    assert not inventory.wamid_names(meta_wamid("34698189848"), "3469818984")
    assert not inventory.wamid_names("test-34698189848-1", "4698189848")


def test_find_person_reads_what_recover_moved_aside(store: Store) -> None:
    """A file in quarantine/ that still opens is searched; one that does not is reported "unreadable"."""
    store.add_message(ALICE, "user", "hola", store.clock())
    store.flush()
    store.snapshot(full=True)
    quarantine = os.path.join(store.state_dir, "quarantine")
    os.mkdir(quarantine, 0o700)
    snap = next(f for f in sealed_files(store.state_dir)[0] if f.kind == "snapshot")
    with open(snap.path, "rb") as f:
        data = f.read()
    good = os.path.join(quarantine, f"{os.path.basename(snap.path)}.20261125T101530Z")
    with open(good, "wb") as f:
        f.write(data)
    with open(os.path.join(quarantine, "snapshot.g000099.enc.20261125T101530Z"), "wb") as f:
        f.write(data[:-3] + b"xyz")
    found = {(t.file, t.where) for t in inventory.find_person(store.state_dir, store.keyring.usable(), ALICE)}
    assert (os.path.relpath(good, store.state_dir), "session") in found
    assert ("quarantine/snapshot.g000099.enc.20261125T101530Z", "unreadable") in found
