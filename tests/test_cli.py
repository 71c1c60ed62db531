"""The command line, run in-process through main(argv, environ, out, err): outputs, files and exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading

import pytest

from natalia_secure import masterkey, sessions
from natalia_secure.cli import main
from natalia_secure.store import Store

from .conftest import DATA, tree_bytes

LEGACY = os.path.join(DATA, "legacy-sessions-example.json")


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def env(tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"NATALIA_STATE_DIR": str(tmp_path / "state"), "NATALIA_MASTER_KEY_FILE": str(tmp_path / "master.key")}


def run(env: dict[str, str], *argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), env, out, err)
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture
def imported(env: dict[str, str]) -> dict[str, str]:
    assert run(env, "keys", "init").code == 0
    result = run(env, "import-legacy", LEGACY)
    assert result.code == 0, result.err
    return env


def test_keys_init_creates_a_private_master_key_and_keyring(env: dict[str, str]) -> None:
    """`keys init` writes a 0600 master key file and a sealed keyring in a new 0700 state directory."""
    old = os.umask(0)
    try:
        result = run(env, "keys", "init")
    finally:
        os.umask(old)
    assert result.code == 0, result.err
    assert os.stat(env["NATALIA_MASTER_KEY_FILE"]).st_mode & 0o777 == 0o600
    assert os.stat(env["NATALIA_STATE_DIR"]).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(env["NATALIA_STATE_DIR"], "keyring.enc")).st_mode & 0o777 == 0o600
    assert "back it up" in result.out


def test_keys_init_twice_keeps_the_key_and_keyring(env: dict[str, str]) -> None:
    """A second `keys init` changes nothing and says the keyring opens with the existing key."""
    assert run(env, "keys", "init").code == 0
    with open(env["NATALIA_MASTER_KEY_FILE"], "rb") as f:
        key = f.read()
    before = tree_bytes(env["NATALIA_STATE_DIR"])
    result = run(env, "keys", "init")
    assert result.code == 0 and "already exists" in result.out
    with open(env["NATALIA_MASTER_KEY_FILE"], "rb") as f:
        assert f.read() == key
    assert tree_bytes(env["NATALIA_STATE_DIR"]) == before


def test_keys_init_refuses_a_keyring_sealed_by_another_master_key(env: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`keys init` with a different master key over an existing keyring fails with the key exit code."""
    assert run(env, "keys", "init").code == 0
    other = dict(env, NATALIA_MASTER_KEY_FILE=str(tmp_path / "other.key"))
    result = run(other, "keys", "init")
    assert result.code == 4 and "wrong master key" in result.err


def test_keys_init_needs_a_key_path_and_never_writes_into_credentials(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without --master-key or NATALIA_MASTER_KEY_FILE, init refuses (systemd credentials are read-only)."""
    env = {"NATALIA_STATE_DIR": str(tmp_path / "state"), "CREDENTIALS_DIRECTORY": str(tmp_path)}
    result = run(env, "keys", "init")
    assert result.code == 2 and "master key" in result.err
    assert not os.path.exists(tmp_path / "master-key")


def test_master_key_from_systemd_credentials_directory(imported: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """$CREDENTIALS_DIRECTORY/master-key is used when no key file is named."""
    creds = tmp_path / "creds"
    creds.mkdir()
    shutil.copy(imported["NATALIA_MASTER_KEY_FILE"], creds / "master-key")
    os.chmod(creds / "master-key", 0o400)
    env = {"NATALIA_STATE_DIR": imported["NATALIA_STATE_DIR"], "CREDENTIALS_DIRECTORY": str(creds)}
    assert run(env, "list").code == 0


def test_import_then_show_round_trips_the_legacy_file_exactly(imported: dict[str, str]) -> None:
    """Every session shown as JSON, put back in the legacy form, gives the original file byte for byte."""
    with open(LEGACY, "rb") as f:
        original = f.read()
    pairs = []
    for phone, _ in sessions.parse_legacy(original):
        result = run(imported, "show", phone, "--json")
        assert result.code == 0, result.err
        shown = json.loads(result.out)
        assert shown.pop("phone") == phone
        pairs.append((phone, shown))
    assert sessions.dump_legacy(pairs) == original


def test_nothing_readable_on_disk_after_import(imported: dict[str, str]) -> None:
    """No phone number and no message text appears in any byte under the state directory."""
    blob = b"".join(tree_bytes(imported["NATALIA_STATE_DIR"]).values())
    for phone, session in sessions.parse_legacy(open(LEGACY, "rb").read()):
        assert phone.encode() not in blob
        for m in session["messages"]:
            assert m["content"].encode() not in blob


def test_list_shows_every_session_newest_first(imported: dict[str, str]) -> None:
    """`list --json` gives phone, message count and the legacy time fields, newest activity first."""
    result = run(imported, "list", "--json")
    rows = json.loads(result.out)
    assert [r["phone"] for r in rows] == ["447700900123", "5215512345678", "34698189848"]
    assert rows[2] == {"phone": "34698189848", "messages": 6, "firstInteraction": 1770155790963, "lastActivity": 1770155836000}
    table = run(imported, "list").out
    assert "3 sessions, 9 messages" in table and "2026-02-03T21:56:30Z" in table


def test_show_human_form_and_plus_prefix(imported: dict[str, str]) -> None:
    """`show +PHONE` finds the session stored without '+', and prints one line per message."""
    result = run(imported, "show", "+34698189848")
    assert result.code == 0
    assert "6 messages" in result.out and "Quiero fotos de salado" in result.out
    assert len([ln for ln in result.out.splitlines() if "  user  " in ln or "  assistant  " in ln]) == 6


def test_show_writes_no_file(imported: dict[str, str]) -> None:
    """Decrypt-and-show leaves the state directory exactly as it was (stdout is the only output)."""
    before = tree_bytes(imported["NATALIA_STATE_DIR"])
    assert run(imported, "show", "34698189848", "--json").code == 0
    assert run(imported, "list").code == 0
    assert tree_bytes(imported["NATALIA_STATE_DIR"]) == before


def test_show_unknown_phone_is_not_found(imported: dict[str, str]) -> None:
    """An unknown phone gives exit 8 and a message that does not echo the number."""
    result = run(imported, "show", "999000111")
    assert result.code == 8 and "999000111" not in result.err


def test_import_twice_refuses_and_changes_nothing(imported: dict[str, str]) -> None:
    """Importing phones that already exist is refused with the input exit code; the store is unchanged."""
    before = tree_bytes(imported["NATALIA_STATE_DIR"])
    result = run(imported, "import-legacy", LEGACY)
    assert result.code == 9 and "nothing imported" in result.err
    assert tree_bytes(imported["NATALIA_STATE_DIR"]) == before


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "not valid JSON"),
        (b'{"a": 1}', "array"),
        (
            b'[["1", {"messages": [{"role": "bot", "content": "x", "timestamp": 1}], "lastActivity": 1, "firstInteraction": 1}]]',
            "role",
        ),
        (
            b'[["1", {"messages": [], "lastActivity": 1, "firstInteraction": 1}],'
            b' ["1", {"messages": [], "lastActivity": 1, "firstInteraction": 1}]]',
            "repeats",
        ),
    ],
)
def test_import_of_a_malformed_file_is_refused_and_writes_nothing(
    env: dict[str, str], tmp_path, content: bytes, needle: str
) -> None:  # type: ignore[no-untyped-def]
    """A malformed legacy file gives exit 9, a message naming the problem, and no new file in the store."""
    assert run(env, "keys", "init").code == 0
    before = tree_bytes(env["NATALIA_STATE_DIR"])
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    result = run(env, "import-legacy", str(bad))
    assert result.code == 9 and needle in result.err
    assert tree_bytes(env["NATALIA_STATE_DIR"]) == before


def test_import_of_a_missing_file(env: dict[str, str]) -> None:
    """A legacy file that cannot be read is a configuration error, not a traceback."""
    assert run(env, "keys", "init").code == 0
    result = run(env, "import-legacy", "/nonexistent/sessions.json")
    assert result.code == 3 and "cannot read" in result.err


def test_verify_passes_on_a_healthy_store(imported: dict[str, str]) -> None:
    """`verify` authenticates every file, exits 0 and reports the store opens."""
    result = run(imported, "verify")
    assert result.code == 0, result.out
    assert "0 failed" in result.out and "store opens: 3 sessions" in result.out
    report = json.loads(run(imported, "verify", "--json").out)
    assert report["ok"] and {f["kind"] for f in report["files"]} >= {"keyring", "snapshot"}


def test_verify_names_a_tampered_file_and_fails(imported: dict[str, str]) -> None:
    """One flipped byte in the snapshot: verify exits 5, names the file, and the file is left as it was."""
    path = os.path.join(imported["NATALIA_STATE_DIR"], "snapshot.g000001.enc")
    data = bytearray(open(path, "rb").read())
    data[-20] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    result = run(imported, "verify", "--json")
    assert result.code == 5
    report = json.loads(result.out)
    bad = [f for f in report["files"] if not f["ok"]]
    assert [f["file"] for f in bad] == ["snapshot.g000001.enc"] and not report["store"]["ok"]
    assert open(path, "rb").read() == bytes(data)
    listing = run(imported, "list")
    assert listing.code == 5 and "snapshot.g000001.enc" in listing.err and "natalia-secure verify" in listing.err


def test_wrong_master_key_is_a_key_error(imported: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Another master key cannot open the store: exit 4 naming both key ids."""
    other = str(tmp_path / "other.key")
    masterkey.create_key_file(other)
    result = run(dict(imported, NATALIA_MASTER_KEY_FILE=other), "list")
    assert result.code == 4 and "wrong master key" in result.err


def test_readable_master_key_is_refused(imported: dict[str, str]) -> None:
    """A master key file readable by others is refused with exit 4 and the chmod that fixes it."""
    os.chmod(imported["NATALIA_MASTER_KEY_FILE"], 0o644)
    result = run(imported, "list")
    assert result.code == 4 and "chmod 0600" in result.err


def test_open_state_directory_is_refused(imported: dict[str, str]) -> None:
    """A state directory open to others is refused with exit 3, not silently fixed."""
    os.chmod(imported["NATALIA_STATE_DIR"], 0o755)
    result = run(imported, "list")
    assert result.code == 3 and "chmod 0700" in result.err
    assert os.stat(imported["NATALIA_STATE_DIR"]).st_mode & 0o777 == 0o755


def test_no_master_key_at_all_is_a_usage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With no key named anywhere, the error says where a key may come from (exit 2)."""
    result = run({"NATALIA_STATE_DIR": str(tmp_path)}, "list")
    assert result.code == 2 and "NATALIA_MASTER_KEY_FILE" in result.err


def test_usage_errors_exit_2(env: dict[str, str]) -> None:
    """Unknown commands and missing arguments give exit 2 with argparse's message."""
    assert run(env, "frobnicate").code == 2
    assert run(env, "show").code == 2
    assert run(env, "list", "--wait", "-1").code == 2


def test_common_options_after_the_command(imported: dict[str, str]) -> None:
    """--state-dir and --master-key work after the command as well as before it."""
    args = ["--state-dir", imported["NATALIA_STATE_DIR"], "--master-key", imported["NATALIA_MASTER_KEY_FILE"]]
    assert run({}, "list", *args).code == 0
    assert run({}, *args, "list").code == 0


def test_writer_command_fails_fast_on_a_held_lock_and_waits_with_wait(imported: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """import-legacy while another writer holds the store: exit 6 at once; with --wait it proceeds once freed."""
    holder = Store.open(imported["NATALIA_STATE_DIR"], masterkey.read_key_file(imported["NATALIA_MASTER_KEY_FILE"]))
    other = tmp_path / "other.json"
    other.write_bytes(b'[["111222333", {"messages": [], "lastActivity": 5, "firstInteraction": 5}]]')
    try:
        result = run(imported, "import-legacy", str(other))
        assert result.code == 6 and "--wait" in result.err
        assert run(imported, "list").code == 0  # readers never wait for the lock
        timer = threading.Timer(0.3, holder.close)
        timer.start()
        result = run(imported, "import-legacy", str(other), "--wait", "10")
        timer.join()
        assert result.code == 0, result.err
    finally:
        holder.close()
    assert "111222333" in run(imported, "list").out


def test_recover_sets_a_tampered_snapshot_aside_and_the_store_opens_again(imported: dict[str, str]) -> None:
    """`recover` after a refused open: the bad file moves to quarantine/ (bytes kept), what was lost is named, the
    store opens and `verify` passes; a second run has nothing to do; with the lock held it is exit 6."""
    from natalia_secure.lock import StoreLock

    state = imported["NATALIA_STATE_DIR"]
    master = masterkey.read_key_file(imported["NATALIA_MASTER_KEY_FILE"])
    with Store.open(state, master) as store:
        store.backup()
        store.add_message("15550001111", "user", "hola", store.clock())
        store.flush()
        store.snapshot()
    newest = sorted(n for n in os.listdir(state) if n.startswith("snapshot."))[-1]
    with open(os.path.join(state, newest), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x00\x00")
    damaged = open(os.path.join(state, newest), "rb").read()
    assert run(imported, "list").code == 5
    lock = StoreLock.acquire(state)
    try:
        assert run(imported, "recover").code == 6
    finally:
        lock.release()
    result = run(imported, "recover")
    assert result.code == 0, result.err
    assert f"moved aside: {newest}" in result.out and "new base:" in result.out
    moved = os.listdir(os.path.join(state, "quarantine"))
    assert len(moved) == 1 and open(os.path.join(state, "quarantine", moved[0]), "rb").read() == damaged
    assert run(imported, "verify").code == 0
    assert len(run(imported, "list", "--json").out) > 0 and run(imported, "list").code == 0
    again = run(imported, "recover", "--json")
    assert again.code == 0 and json.loads(again.out)["nothing_to_recover"] is True


def test_list_into_a_closed_pipe_exits_quietly(imported: dict[str, str]) -> None:
    """`natalia-secure list | head -1`: the reader stops early; the command exits 0 without an error line."""
    import subprocess
    import sys

    script = f"{sys.executable} -m natalia_secure list | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"
    env = dict(os.environ, **imported)
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "0" and done.stderr == ""


def test_verify_with_the_wrong_master_key_is_a_key_error_and_flags_a_fake_socket(imported: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The wrong master key is exit 4 (not a tampered file); a regular file named like the control socket is
    reported as unexpected."""
    other = str(tmp_path / "other.key")
    masterkey.create_key_file(other)
    assert run(dict(imported, NATALIA_MASTER_KEY_FILE=other), "verify").code == 4
    with open(os.path.join(imported["NATALIA_STATE_DIR"], "control.sock"), "w") as f:
        f.write("plaintext")
    result = run(imported, "verify")
    assert result.code == 5 and "control.sock" in result.out and "unexpected" in result.out
