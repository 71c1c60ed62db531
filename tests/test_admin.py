"""The admin commands that change the store (admin.py), each run through the command line twice: with the daemon
stopped (the command takes the store lock) and with it running (through its control socket, control.py).
What the issue asks of each, on real files: a rotation leaves every file under the new key and retires the old ones,
forget leaves no trace of the person in any decrypted file, backups included; errors change nothing on disk."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from natalia_secure import inventory, keyring, masterkey, whatsapp
from natalia_secure.cli import main
from natalia_secure.lock import StoreLock
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store
from natalia_secure.verify import key_usage, read_header, sealed_files

from .conftest import DATA, tree_bytes
from .daemon_process import DaemonProcess

LEGACY = os.path.join(DATA, "legacy-sessions-example.json")
ALICE, BOB = "15550001111", "15550002222"


def wamid(phone: str, n: int) -> str:
    """An id shaped like Meta's: "wamid." + base64 of a record that holds the sender's number."""
    import base64

    return "wamid." + base64.b64encode(b"\x1c\x18\x0b" + phone.encode() + b"\x15\x02\x00\x12" + n.to_bytes(8, "big")).decode()


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


class Site:
    """A state directory with sessions, a journal and backups, and the way commands reach it."""

    def __init__(self, tmp_path: Any, state_dir: str, key_file: str, running: bool) -> None:
        self.tmp_path, self.state_dir, self.key_file, self.running = tmp_path, state_dir, key_file, running
        self.env = {"NATALIA_STATE_DIR": state_dir, "NATALIA_MASTER_KEY_FILE": key_file}
        self.daemon: DaemonProcess | None = None

    def run(self, *argv: str) -> Run:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), self.env, out, err)
        return Run(code, out.getvalue(), err.getvalue())

    def start(self) -> None:
        self.daemon = DaemonProcess(str(self.tmp_path), self.state_dir, self.key_file).wait_ready()

    def say(self, phone: str, n: int, text: str) -> None:
        """A customer message: through the daemon when it runs, else straight into the store."""
        if self.daemon is not None:
            daemon = self.daemon
            status, _ = daemon.post(whatsapp.text_webhook([(wamid(phone, n), phone, text, 1_770_000_000)]))
            assert status == 200
            daemon.until(lambda: daemon.metric("natalia_replies_pending") == 0)  # counts settle: the reply is in
            return
        master = masterkey.read_key_file(self.key_file)
        with Store.open(self.state_dir, master) as store:
            store.add_message(phone, "user", text, store.clock(), message_id=wamid(phone, n))
            store.flush()

    def through_daemon(self, command: str) -> bool:
        """Whether the running daemon logged `command` as done. Its log line comes before its answer on the control
        socket, but a thread of ours reads the log: a moment is allowed for it (it was once read after the check)."""
        if self.daemon is None:
            return False
        end = time.monotonic() + 5
        while time.monotonic() < end:
            if any(e.get("event") == "admin_command" and e.get("command") == command for e in list(self.daemon.events)):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        if self.daemon is not None:
            assert self.daemon.stop() == 0
            self.daemon = None


@pytest.fixture(params=["stopped", "running"])
def site(
    request: pytest.FixtureRequest, tmp_path: Any, state_dir: str, master_key_file: str, master: MasterKey
) -> Iterator[Site]:
    """Three legacy sessions, two customers with journaled messages after a backup, and (running) the daemon."""
    s = Site(tmp_path, state_dir, master_key_file, request.param == "running")
    assert s.run("import-legacy", LEGACY).code == 0
    s.say(ALICE, 1, "hola, mi número es el de siempre")
    assert s.run("backup").code == 0
    if s.running:
        s.start()
    s.say(ALICE, 2, "quiero fotos de salado")
    s.say(BOB, 3, f"mi amiga tiene el {ALICE}")  # a mention of Alice in Bob's words: not Alice's data
    try:
        yield s
    finally:
        if s.daemon is not None:
            s.daemon.close()


def sessions_in(site: Site) -> dict[str, int]:
    master = masterkey.read_key_file(site.key_file)
    store = Store.open(site.state_dir, master, readonly=True)
    return {p: len(s["messages"]) for p, s in store.items()}


def all_files_under(site: Site, kid: str) -> None:
    files, unexpected = sealed_files(site.state_dir)
    assert not unexpected
    assert {f.rel: read_header(f.path).kid for f in files} == {f.rel: kid for f in files}


def test_keys_rotate_retire_old_reseals_everything_and_retires_the_old_key(site: Site) -> None:
    """After `keys rotate --retire-old` every snapshot, segment and backup names the new primary key, the old key is
    retired, and every session is intact."""
    before = sessions_in(site)
    master = masterkey.read_key_file(site.key_file)
    old = keyring.load(site.state_dir, master).primary.id
    result = site.run("keys", "rotate", "--retire-old", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["primary"] != old and report["retired"] == [old] and report["backups_resealed"]
    ring = keyring.load(site.state_dir, master)
    assert ring.primary.id == report["primary"] and ring.get(old).status == "retired"
    site.say(BOB, 4, "sigues ahí?")  # after the rotation, still taking messages (the daemon seals with the new key)
    all_files_under(site, ring.primary.id)
    after = sessions_in(site)
    assert {p: n for p, n in after.items() if p != BOB} == {p: n for p, n in before.items() if p != BOB}
    assert after[BOB] == before[BOB] + (2 if site.running else 1)  # the message, and the daemon's reply to it
    assert site.through_daemon("keys.rotate") == site.running


def test_keys_retire_refuses_a_key_in_use_the_primary_and_an_unknown_id(site: Site) -> None:
    """`keys retire` names the files still sealed by the key (exit 2), refuses the primary (2) and an unknown id
    (8), changing nothing; after a rotation without --retire-old it retires the old key."""
    master = masterkey.read_key_file(site.key_file)
    old = keyring.load(site.state_dir, master).primary.id
    before = tree_bytes(site.state_dir) if not site.running else None
    primary = site.run("keys", "retire", old)
    assert primary.code == 2 and "primary" in primary.err
    unknown = site.run("keys", "retire", "d-000000000000")
    assert unknown.code == 8
    if before is not None:
        assert tree_bytes(site.state_dir) == before
    assert site.run("keys", "rotate").code == 0
    assert site.run("keys", "retire", old).code == 0
    assert keyring.load(site.state_dir, master).get(old).status == "retired"
    again = site.run("keys", "retire", old)
    assert again.code == 0 and "already retired" in again.out


def test_keys_retire_refuses_while_a_backup_still_uses_the_key(tmp_path: Any, state_dir: str, master: MasterKey) -> None:
    """A backup the rotation could not re-seal (it does not open) keeps its key in use: retire refuses, naming it."""
    with Store.open(state_dir, master) as store:
        store.add_message(ALICE, "user", "hola", store.clock())
        store.flush()
        path = store.backup()
    old = keyring.load(state_dir, master).primary.id
    with open(path, "r+b") as f:  # damage the payload, not the header: the header still names the old key
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    env = {"NATALIA_STATE_DIR": state_dir, "NATALIA_MASTER_KEY_FILE": master.source}
    out, err = io.StringIO(), io.StringIO()
    assert main(["keys", "rotate", "--retire-old"], env, out, err) == 5
    assert "does not open" in out.getvalue() and old in out.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert main(["keys", "retire", old], env, out, err) == 2
    assert os.path.basename(path) in err.getvalue()
    assert keyring.load(state_dir, master).get(old).status == "enabled"


def test_keys_rotate_master_rewraps_the_keyring_and_a_rerun_is_harmless(site: Site, tmp_path: Any) -> None:
    """`keys rotate-master` re-seals keyring.enc under the new master key (data keys unchanged), the old master key
    no longer opens it, and running it again says there is nothing to do."""
    old_master = masterkey.read_key_file(site.key_file)
    data_keys = keyring.load(site.state_dir, old_master).keys
    new_file = str(tmp_path / "new.key")
    new_master = masterkey.create_key_file(new_file)
    result = site.run("keys", "rotate-master", "--new-master-key", new_file)
    assert result.code == 0, result.err
    assert keyring.load(site.state_dir, new_master).keys == data_keys
    with pytest.raises(Exception, match="wrong master key"):
        keyring.load(site.state_dir, old_master)
    again = site.run("keys", "rotate-master", "--new-master-key", new_file)
    assert again.code == 0 and "already sealed" in again.out
    site.close()  # the daemon (if any) stops cleanly; the store opens with the new key only
    assert Store.open(site.state_dir, new_master, readonly=True).get(ALICE)


def test_forget_erases_the_person_from_every_file_backups_included(site: Site) -> None:
    """After `forget` no decrypted file holds the person's session, records or message ids (their number inside
    someone else's message is reported, not erased); every other session is intact."""
    master = masterkey.read_key_file(site.key_file)
    before = sessions_in(site)
    traces = inventory.find_person(site.state_dir, keyring.load(site.state_dir, master).usable(), ALICE)
    assert {t.where for t in traces} >= {"session", "claim"} and any(t.file.startswith("backups/") for t in traces)
    result = site.run("forget", ALICE, "--yes", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["messages_removed"] == before[ALICE] and report["claims_removed"] >= 1 and report["backups_rewritten"]
    assert [m["where"] for m in report["mentions_in_other_sessions"]] == ["mention"]
    after = inventory.find_person(site.state_dir, keyring.load(site.state_dir, master).usable(), ALICE)
    assert inventory.own_data(after) == []
    assert sessions_in(site) == {p: n for p, n in before.items() if p != ALICE}
    assert site.through_daemon("forget") == site.running


def test_forget_of_an_unknown_phone_or_without_confirmation_changes_nothing(site: Site) -> None:
    """An unknown phone: exit 8. No --yes and no terminal to ask on: exit 2. Nothing changed on disk either way."""
    if site.running:
        site.close()  # a running daemon writes (snapshots, backups) on its own: compare bytes with it stopped
    before = tree_bytes(site.state_dir)
    unknown = site.run("forget", "15559999999", "--yes")
    assert unknown.code == 8 and "nothing changed" in unknown.err
    unconfirmed = site.run("forget", ALICE)
    assert unconfirmed.code == 2 and "--yes" in unconfirmed.err
    assert tree_bytes(site.state_dir) == before


def test_purge_lists_then_removes_inactive_sessions(site: Site) -> None:
    """`purge --inactive-days N --dry-run` lists the legacy sessions (months old) and removes nothing; without
    --dry-run they are gone and the recent ones stay."""
    before = sessions_in(site)
    dry = site.run("purge", "--inactive-days", "30", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    old = {row["phone"] for row in dry.json()["sessions"]}
    assert old and ALICE not in old and BOB not in old
    assert sessions_in(site) == before
    done = site.run("purge", "--inactive-days", "30", "--json")
    assert done.code == 0 and {row["phone"] for row in done.json()["sessions"]} == old
    assert sessions_in(site) == {p: n for p, n in before.items() if p not in old}
    assert site.through_daemon("purge") == site.running
    assert site.run("purge", "--inactive-days", "0").code == 2


def test_backup_now_list_and_prune(site: Site) -> None:
    """`backup` adds a sealed backup, `backup --list` shows each with its key, `--prune --dry-run` removes nothing."""
    first = {row["name"] for row in site.run("backup", "--list", "--json").json()}
    import time

    time.sleep(1.1)  # backups are named by the second
    made = site.run("backup", "--json")
    assert made.code == 0, made.err
    rows = site.run("backup", "--list", "--json").json()
    assert {row["name"] for row in rows} == first | {made.json()["backup"]}
    assert all(row["kid"] and row["bytes"] > 0 for row in rows)
    dry = site.run("backup", "--prune", "--dry-run", "--json")
    assert dry.code == 0 and dry.json()["remove"] == [] and len(site.run("backup", "--list", "--json").json()) == len(rows)
    assert site.run("backup", "--dry-run").code == 2
    assert site.through_daemon("backup") == site.running


def test_read_commands_work_with_the_daemon_running_or_stopped(site: Site) -> None:
    """stats, keys list, export, list, show, verify and keys init read the durable state (writing nothing) whether
    or not the daemon runs."""
    assert site.run("keys", "init").code == 0
    listed = site.run("list", "--json")
    assert listed.code == 0 and {r["phone"] for r in listed.json()} == set(sessions_in(site))
    shown = site.run("show", ALICE, "--json")
    assert shown.code == 0 and len(shown.json()["messages"]) == sessions_in(site)[ALICE]
    verified = site.run("verify")
    assert verified.code == 0, verified.out
    stats = site.run("stats", "--json")
    assert stats.code == 0, stats.err
    st = stats.json()
    assert st["sessions"] == len(sessions_in(site)) and st["messages"] >= 11 and st["backups"]["count"] >= 1
    assert [k["status"] for k in st["keys"]] == ["primary"] and st["keys"][0]["files"]
    human = site.run("stats")
    assert "Total sessions:" in human.out and "Total messages:" in human.out and "Size:" in human.out
    keys = site.run("keys", "list", "--json")
    assert keys.code == 0 and keys.json()[0]["files"] == st["keys"][0]["files"]
    exported = site.run("export", "+" + ALICE)
    assert exported.code == 0, exported.err
    data = exported.json()
    assert data["phone"] == ALICE and data["messages"] == len(data["session"]["messages"]) == sessions_in(site)[ALICE]
    assert data["backups_holding_a_copy"]
    assert site.run("export", "15559999999").code == 8


def test_import_legacy_goes_through_a_running_daemon(site: Site, tmp_path: Any) -> None:
    """With the daemon running, import-legacy is done by the daemon; a phone already present refuses the whole file (9)."""
    legacy = tmp_path / "more.json"
    legacy.write_text(json.dumps([["15550003333", {"messages": [{"role": "user", "content": "hola", "timestamp": 1}],
                                                   "lastActivity": 1, "firstInteraction": 1}]]))  # fmt: skip
    result = site.run("import-legacy", str(legacy))
    assert result.code == 0, result.err
    assert "15550003333" in sessions_in(site)
    assert site.through_daemon("import-legacy") == site.running
    again = site.run("import-legacy", LEGACY)
    assert again.code == 9


def test_wrong_master_key_tamper_and_held_lock_are_refused_with_nothing_changed(
    tmp_path: Any, state_dir: str, master: MasterKey
) -> None:
    """Daemon stopped: a wrong or missing master key (4), a tampered snapshot (5) and a held lock (6) refuse every mutating
    command with its documented code, and the state directory is byte for byte as before."""
    with Store.open(state_dir, master) as store:
        store.add_message(ALICE, "user", "hola", store.clock())
        store.flush()
        store.snapshot()
        store.backup()
    env = {"NATALIA_STATE_DIR": state_dir, "NATALIA_MASTER_KEY_FILE": master.source}
    commands = [["keys", "rotate"], ["forget", ALICE, "--yes"], ["purge", "--inactive-days", "1"], ["backup"]]

    def refused(code: int, environ: dict[str, str]) -> None:
        before = tree_bytes(state_dir)
        for argv in commands:
            out, err = io.StringIO(), io.StringIO()
            assert main(argv, environ, out, err) == code, (argv, err.getvalue())
            assert err.getvalue().count("\n") == 1
        assert tree_bytes(state_dir) == before

    other = masterkey.create_key_file(str(tmp_path / "other.key"))
    refused(4, dict(env, NATALIA_MASTER_KEY_FILE=other.source))
    refused(4, dict(env, NATALIA_MASTER_KEY_FILE=str(tmp_path / "missing.key")))
    lock = StoreLock.acquire(state_dir)
    try:
        refused(6, env)
    finally:
        lock.release()
    snap = next(f for f in sealed_files(state_dir)[0] if f.kind == "snapshot")
    with open(snap.path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x00\x00\x00")
    refused(5, env)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_files_keep_the_state_directory_owner_when_root_rotates(tmp_path: Any, state_dir: str, master: MasterKey) -> None:
    """Root rotating keys on a state directory the service user owns leaves every file owned by that user."""
    with Store.open(state_dir, master) as store:
        store.add_message(ALICE, "user", "hola", store.clock())
        store.flush()
        store.backup()
    for root, dirs, files in os.walk(state_dir):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), 65534, 65534)
    os.chown(state_dir, 65534, 65534)
    env = {"NATALIA_STATE_DIR": state_dir, "NATALIA_MASTER_KEY_FILE": master.source}
    assert main(["keys", "rotate", "--retire-old"], env, io.StringIO(), io.StringIO()) == 0
    owners = {(os.lstat(os.path.join(r, n)).st_uid, n) for r, ds, fs in os.walk(state_dir) for n in [*ds, *fs]}
    assert {uid for uid, _ in owners} == {65534}, owners
    assert key_usage(state_dir).keys() == {keyring.load(state_dir, master).primary.id}


def test_forget_and_retire_respect_what_recover_moved_aside(tmp_path: Any, state_dir: str, master: MasterKey) -> None:
    """A good file recover moved to quarantine/ still holds the person: forget fails (7) naming it instead of saying
    "verified"; the key sealing it stays in use, so retiring that key is refused."""
    with Store.open(state_dir, master) as store:
        store.add_message(ALICE, "user", "hola", store.clock(), message_id=wamid(ALICE, 1))
        store.add_message(BOB, "user", "buenas", store.clock())
        store.flush()
        store.snapshot(full=True)
    snap = next(f for f in sealed_files(state_dir)[0] if f.kind == "snapshot")
    os.mkdir(os.path.join(state_dir, "quarantine"), 0o700)
    kept = os.path.join("quarantine", os.path.basename(snap.path) + ".20261125T101530Z")
    with open(snap.path, "rb") as src, open(os.path.join(state_dir, kept), "wb") as dst:
        dst.write(src.read())
    env = {"NATALIA_STATE_DIR": state_dir, "NATALIA_MASTER_KEY_FILE": master.source}
    old = keyring.load(state_dir, master).primary.id
    out, err = io.StringIO(), io.StringIO()
    assert main(["forget", ALICE, "--yes"], env, out, err) == 7
    assert kept in err.getvalue() and "evidence" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert main(["keys", "rotate", "--retire-old"], env, out, err) == 5
    assert keyring.load(state_dir, master).get(old).status == "enabled" and kept in out.getvalue()
    os.unlink(os.path.join(state_dir, kept))  # the operator, once it is investigated
    assert inventory.own_data(inventory.find_person(state_dir, keyring.load(state_dir, master).usable(), ALICE)) == []
    assert main(["forget", ALICE, "--yes"], env, io.StringIO(), io.StringIO()) == 8  # nothing left to forget


def test_forget_of_a_number_one_digit_short_touches_nobody(tmp_path: Any, state_dir: str, master: MasterKey) -> None:
    """A typo (a digit missing) finds no data: exit 8, and the other person's message ids stay claimed."""
    with Store.open(state_dir, master) as store:
        store.add_message("34698189848", "user", "hola", store.clock(), message_id=wamid("34698189848", 1))
        store.flush()
    env = {"NATALIA_STATE_DIR": state_dir, "NATALIA_MASTER_KEY_FILE": master.source}
    before = tree_bytes(state_dir)
    assert main(["forget", "4698189848", "--yes"], env, io.StringIO(), io.StringIO()) == 8
    assert tree_bytes(state_dir) == before


def test_malformed_control_requests_are_usage_errors(site: Site) -> None:
    """Through the socket (root or the service user only), a master key of the wrong length and a prune without a
    retention policy are refused as usage errors (2), changing nothing."""
    from natalia_secure import control

    if not site.running:
        pytest.skip("the control socket needs the daemon")
    before = keyring.load(site.state_dir, masterkey.read_key_file(site.key_file))
    with pytest.raises(control.RemoteError) as short:
        control.call(site.state_dir, "keys.rotate-master", {"key": "00" * 16})
    assert short.value.exit_code == 2 and "32 bytes" in str(short.value)
    with pytest.raises(control.RemoteError) as prune:
        control.call(site.state_dir, "prune", {"dry_run": True})
    assert prune.value.exit_code == 2
    assert keyring.load(site.state_dir, masterkey.read_key_file(site.key_file)) == before


def test_a_request_too_large_for_the_socket_asks_to_stop_the_daemon(
    site: Site, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """import-legacy of a file larger than the control socket takes: with the daemon running, exit 6 saying to stop
    it; with it stopped, the import is done here."""
    from natalia_secure import control

    monkeypatch.setattr(control, "MAX_REQUEST", 2048)
    legacy = tmp_path / "big.json"
    legacy.write_text(json.dumps([["15550003333", {"messages": [{"role": "user", "content": "x" * 3000, "timestamp": 1}],
                                                   "lastActivity": 1, "firstInteraction": 1}]]))  # fmt: skip
    result = site.run("import-legacy", str(legacy))
    if site.running:
        assert result.code == 6 and "stop the daemon" in result.err
    else:
        assert result.code == 0, result.err
