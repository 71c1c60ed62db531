"""The shipped unit files under a real systemd 252 (issue 6), each test in a fresh Debian 12 container
(tests/nspawn.py) set up the way systemd/README.md tells an operator: `keys init` before the first start, the
master key and the webhook secrets sealed with `systemd-creds encrypt`, the settings in
/etc/natalia-secure/natalia-secure.toml, then `systemctl start`. What is shown: "activating" until the store is
loaded; `reload`; the watchdog killing a stopped daemon and systemd restarting it with every acknowledged message;
`stop` with a final snapshot and Result=success; the sandbox (no privileges, seccomp, nothing writable but the state
directory); an admin command from root reaching the daemon through its control socket; the daily verify service.

The package in the container: the repository and this venv's site-packages are bound read-only where a venv's
would be (/opt/natalia-secure/venv/src and .../deps), and LAUNCHER stands where pip puts the console script, so the
units run exactly as shipped (ExecStart=/opt/natalia-secure/venv/bin/natalia-secure serve). The one change is a
drop-in with WatchdogSec=4 (TEST_DROPIN), so that the watchdog test takes seconds instead of a minute.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from natalia_secure import whatsapp

from . import nspawn

pytestmark = pytest.mark.root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = "natalia-secure.service"
VERIFY = "natalia-secure-verify.service"
UNIT_FILES = (UNIT, VERIFY, "natalia-secure-verify.timer")
VENV = "/opt/natalia-secure/venv"
CLI = f"{VENV}/bin/natalia-secure"
STATE = "/var/lib/private/natalia-secure"  # where StateDirectory= puts it with DynamicUser=; /var/lib/natalia-secure links here
CREDSTORE = "/etc/credstore.encrypted"
SECRET = "systemd-test-app-secret"  # fake secrets, made for these tests
TOKEN = "systemd-test-verify-token"
LAUNCHER = f"""#!/usr/bin/python3
# What pip would generate, minus the venv: the repository and the test venv's packages, bound read-only.
import sys
sys.path[:0] = ["{VENV}/src", "{VENV}/deps"]
from natalia_secure.cli import run
run()
"""
TEST_DROPIN = """[Service]
# tests only: the watchdog test stops the daemon and waits for systemd to notice; 4 s instead of 30 (pings every 2 s)
WatchdogSec=4
"""
# Tries to create a file in every directory and to open every regular file for writing (writing nothing), and
# prints what succeeded: what the process running it can write. /proc and /sys are kernel interfaces, not storage.
PROBE = """#!/usr/bin/python3
import json, os, stat, sys
writable, dirs, files = [], 0, 0
for root, subdirs, names in os.walk("/"):
    subdirs[:] = [d for d in subdirs if os.path.join(root, d) not in ("/proc", "/sys")]
    dirs += 1
    probe = os.path.join(root, ".natalia-write-probe-%d" % os.getpid())
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except OSError:
        pass
    else:
        os.unlink(probe)
        writable.append(root)
    for name in names:
        path = os.path.join(root, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            files += 1
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK))
        except OSError:
            continue
        writable.append(path)
json.dump({"uid": os.getuid(), "dirs": dirs, "files": files, "writable": writable}, sys.stdout)
"""
# The operator's way to run a read command as root (systemd/README.md): the master key credential decrypted by
# systemd for one transient command, the state directory by its real path.
ADMIN = [
    "systemd-run", "--quiet", "--pipe", "--wait", "--collect",
    "--property=LoadCredentialEncrypted=master-key:natalia-secure.master-key", CLI, f"--state-dir={STATE}",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _epoch(text: str) -> float:
    """Seconds since the epoch from systemctl's `--timestamp=us+utc` form or the daemon's ISO 8601 "ts"."""
    if text.endswith(" UTC"):
        return datetime.strptime(text, "%a %Y-%m-%d %H:%M:%S.%f UTC").replace(tzinfo=UTC).timestamp()
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until check() returns something true, and return it."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class Service:
    """natalia-secure installed in a booted container, and the ways the tests look at it."""

    def __init__(self, box: nspawn.Container) -> None:
        self.box = box
        self.port = _free_port()

    def install(self) -> None:
        """systemd/README.md's installation, in order (the venv stood in for by the bind mounts and LAUNCHER)."""
        box = self.box
        box.write(f"{VENV}/bin/natalia-secure", LAUNCHER, 0o755)
        box.write(f"{VENV}/bin/natalia-write-probe", PROBE, 0o755)
        for name in UNIT_FILES:
            with open(os.path.join(REPO, "systemd", name), encoding="utf-8") as f:
                box.write(f"/etc/systemd/system/{name}", f.read())
        box.write(f"/etc/systemd/system/{UNIT}.d/test.conf", TEST_DROPIN)
        box.write("/etc/natalia-secure/natalia-secure.toml", f'[natalia]\nlisten = "127.0.0.1:{self.port}"\n')
        box.sh(f"""
            install -d -m 0755 /opt/natalia-secure/root
            umask 077
            {CLI} keys init --master-key /root/natalia-master.key --state-dir /var/lib/natalia-secure
            install -d -m 0700 {CREDSTORE}
            store={CREDSTORE}/natalia-secure
            systemd-creds encrypt --name=master-key /root/natalia-master.key "$store.master-key"
            printf %s '{SECRET}' | systemd-creds encrypt --name=whatsapp-app-secret - "$store.whatsapp-app-secret"
            printf %s '{TOKEN}' | systemd-creds encrypt --name=whatsapp-verify-token - "$store.whatsapp-verify-token"
            rm /root/natalia-master.key
            systemctl daemon-reload
        """)  # fmt: skip

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.box.run(["systemctl", *args], check=check).stdout

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        out = self.systemctl("show", unit, "--timestamp=us+utc", *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def journal(self, unit: str = UNIT) -> list[dict[str, Any]]:
        """Every journal entry of `unit` (systemd's own lines about it and the daemon's), oldest first."""
        out = self.box.run(["journalctl", "--unit", unit, "--output=json", "--no-pager"]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines (named `name`), each with the PID that wrote it as "_pid"."""
        found = []
        for entry in self.journal():
            message = entry.get("MESSAGE")
            if isinstance(message, str) and message.startswith("{"):
                event = json.loads(message)
                if name is None or event.get("event") == name:
                    found.append({**event, "_pid": int(entry["_PID"])})
        return found

    def messages(self, unit: str = UNIT) -> list[str]:
        """The plain-text lines (systemd's, and `verify`'s report)."""
        lines = [e.get("MESSAGE") for e in self.journal(unit)]
        return [line for line in lines if isinstance(line, str) and not line.startswith("{")]

    def post(self, messages: list[tuple[str, str, str]]) -> tuple[int, dict[str, Any]]:
        """A signed webhook carrying (wamid, phone, text) messages, to the service on loopback."""
        body = whatsapp.text_webhook([(wamid, phone, text, int(time.time())) for wamid, phone, text in messages])
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/webhook",
            data=body,
            headers={whatsapp.SIGNATURE_HEADER: whatsapp.sign(SECRET.encode(), body), "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as r:  # noqa: S310  (loopback, our own URL)
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def backup(self) -> dict[str, Any]:
        """`natalia-secure backup` as root (through the control socket). Backups are named by the second: first let
        the second of the daemon's own start-up backup pass, else the command is refused ("try again")."""
        started = _until(lambda: [e for e in self.events("backup") if e["_pid"] == self.main_pid()], 10, "the start backup")
        time.sleep(max(0.0, int(_epoch(started[0]["ts"])) + 1.05 - time.time()))
        result: dict[str, Any] = json.loads(self.box.run([CLI, "backup", "--json"]).stdout)
        return result

    def conversation(self, phone: str) -> list[str]:
        """The texts of one person's stored messages, read by `show --json` the operator's way (ADMIN)."""
        session = json.loads(self.box.run([*ADMIN, "show", phone, "--json"]).stdout)
        return [m["content"] for m in session["messages"]]

    def status(self, pid: int) -> dict[str, str]:
        """/proc/PID/status of a process in the container."""
        out = self.box.run(["cat", f"/proc/{pid}/status"]).stdout
        return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}

    def state_files(self) -> dict[str, os.stat_result]:
        """Everything under the state directory (relative name -> lstat), seen from the host."""
        top = self.box.path(STATE)
        found = {".": os.lstat(top)}
        for root, dirs, names in os.walk(top):
            for name in dirs + names:
                path = os.path.join(root, name)
                found[os.path.relpath(path, top)] = os.lstat(path)
        return found


@pytest.fixture(scope="session")
def rootfs() -> str:
    """The cached Debian 12 tree (built on first use, ~1 minute)."""
    reason = nspawn.unavailable()
    if reason:
        pytest.skip(reason)
    if sys.version_info[:2] != (3, 11):  # the container's python3 loads this venv's compiled packages
        pytest.skip(f"needs the test venv on CPython 3.11, like Debian 12's python3 (this is {sys.version.split()[0]})")
    return nspawn.rootfs()


@pytest.fixture
def service(rootfs: str) -> Iterator[Service]:
    """A booted container with natalia-secure installed (not started); powered off and cleaned up afterwards."""
    binds = {REPO: f"{VENV}/src", sysconfig.get_paths()["purelib"]: f"{VENV}/deps"}
    with nspawn.Container(rootfs, binds) as box:
        box.start()
        svc = Service(box)
        svc.install()
        yield svc


def test_start_is_activating_until_the_store_is_loaded_then_active_and_serving(service: Service) -> None:
    """Held before READY=1 (SIGSTOP as soon as it has a PID), the unit is "activating" and nothing listens; released,
    it loads the store (logged after the release, before systemd's ActiveEnterTimestamp) and goes "active"; at that
    moment a redelivery of the message acknowledged by the previous run is already known."""
    service.systemctl("start", UNIT)
    assert service.post([("wamid.SD1", "15550100001", "Hola")]) == (200, {"messages": 1, "duplicates": 0, "statuses": 0})
    service.systemctl("stop", UNIT)

    # From its PID to READY=1 the daemon takes ~0.2 s here (imports, store, listen); the loop below stops it within
    # a few ms of systemd forking it. Should a slow machine let it reach READY first, that start proves nothing:
    # stop and try again.
    for _ in range(3):
        held = service.box.sh(f"""
            systemctl start --no-block {UNIT}
            while :; do pid=$(systemctl show --property=MainPID --value {UNIT}); [ "$pid" -gt 0 ] && break; done
            kill -STOP "$pid"
            echo "$pid"
        """)  # fmt: skip
        pid = int(held.stdout)
        if service.show("ActiveState")["ActiveState"] == "activating":
            break
        service.box.run(["kill", "-CONT", str(pid)])
        service.systemctl("stop", UNIT)
    for _ in range(5):  # a second held: still activating, still not listening
        assert service.show("ActiveState", "SubState") == {"ActiveState": "activating", "SubState": "start"}
        assert not service.listening()
        time.sleep(0.2)
    released = float(service.box.sh(f'date +%s.%N; kill -CONT "{pid}"').stdout)
    service.systemctl("start", UNIT)  # joins the pending start job: returns once the unit is active

    shown = service.show("ActiveState", "MainPID", "ActiveEnterTimestamp")
    assert shown["ActiveState"] == "active" and int(shown["MainPID"]) == pid
    active = _epoch(shown["ActiveEnterTimestamp"])
    loaded = _until(lambda: [e for e in service.events("sessions_loaded") if e["_pid"] == pid], 10, "sessions_loaded")[0]
    assert released < _epoch(loaded["ts"]) < active, (released, loaded["ts"], active)
    assert loaded["sessions"] == 1
    assert service.post([("wamid.SD1", "15550100001", "Hola")]) == (200, {"messages": 0, "duplicates": 1, "statuses": 0})
    assert service.post([("wamid.SD2", "15550100002", "Buenas")]) == (200, {"messages": 1, "duplicates": 0, "statuses": 0})


def test_reload_applies_the_configuration_in_the_same_process_and_keeps_serving_when_it_is_bad(service: Service) -> None:
    """`systemctl reload` (SIGHUP, RELOADING=1 ... READY=1): the same PID logs `reloaded` and applies the new log
    level (a webhook logs its debug line only after it); a configuration that does not parse is refused
    (`reload_failed`, shown in the unit's status), and the daemon keeps serving with the old one."""
    service.systemctl("start", UNIT)
    pid = service.main_pid()
    assert service.post([("wamid.RL1", "15550100003", "Hola")])[0] == 200
    settings = f'[natalia]\nlisten = "127.0.0.1:{service.port}"\n[logging]\nlevel = "debug"\n'
    service.box.write("/etc/natalia-secure/natalia-secure.toml", settings)
    service.systemctl("reload", UNIT)
    assert service.show("MainPID", "NRestarts", "ReloadResult", "ActiveState") == {
        "MainPID": str(pid), "NRestarts": "0", "ReloadResult": "success", "ActiveState": "active"
    }  # fmt: skip
    assert [e for e in service.events("reloaded") if e["_pid"] == pid]
    assert service.events("webhook") == []  # info level: the first webhook logged no debug line
    assert service.post([("wamid.RL2", "15550100003", "¿Me oyes?")])[0] == 200
    _until(lambda: [e for e in service.events("webhook") if e["_pid"] == pid and e["messages"] == 1], 10, "a debug line")

    service.box.write("/etc/natalia-secure/natalia-secure.toml", "[natalia]\nlisten = 'unclosed\n")
    service.systemctl("reload", UNIT)
    failed = _until(lambda: [e for e in service.events("reload_failed") if e["_pid"] == pid], 10, "reload_failed")[0]
    assert "natalia-secure.toml" in failed["error"]
    assert "last reload failed" in _until(lambda: service.show("StatusText")["StatusText"], 10, "a status")
    assert service.main_pid() == pid
    assert service.post([("wamid.RL3", "15550100003", "¿Sigues ahí?")])[0] == 200


def test_the_watchdog_kills_a_stopped_daemon_and_systemd_restarts_it_with_every_acknowledged_message(service: Service) -> None:
    """SIGSTOP stops the WATCHDOG=1 pings: after WatchdogSec systemd kills the process (Result watchdog), restarts
    it (Restart=on-failure), and the new process holds every message that was answered 200 before the stop."""
    service.systemctl("start", UNIT)
    sent = [(f"wamid.WD{i}", f"1555010010{i}", f"mensaje {i}") for i in range(3)]
    for message in sent:
        assert service.post([message]) == (200, {"messages": 1, "duplicates": 0, "statuses": 0})
    first = service.main_pid()
    service.box.run(["kill", "-STOP", str(first)])

    def restarted() -> bool:
        shown = service.show("MainPID", "NRestarts", "ActiveState")
        return shown["NRestarts"] == "1" and shown["ActiveState"] == "active" and shown["MainPID"] not in ("0", str(first))

    _until(restarted, 30, "a restart after the watchdog timeout")
    lines = service.messages()
    assert any("Watchdog timeout" in line for line in lines), lines[-10:]
    assert any("Failed with result 'watchdog'" in line for line in lines), lines[-10:]
    second = service.main_pid()
    loaded = _until(lambda: [e for e in service.events("sessions_loaded") if e["_pid"] == second], 10, "sessions_loaded")[0]
    assert loaded["sessions"] == 3
    for wamid, phone, text in sent:
        assert text in service.conversation(phone)
        assert service.post([(wamid, phone, text)])[1]["duplicates"] == 1  # and it is not taken as new


def test_stop_is_sigterm_a_final_snapshot_and_result_success(service: Service) -> None:
    """`systemctl stop` sends SIGTERM; the daemon logs `stopping`, `saving_before_shutdown`, a final snapshot and
    `stopped` with exit code 0, and systemd records Result=success, status 0; the snapshot holds the message."""
    service.systemctl("start", UNIT)
    assert service.post([("wamid.ST1", "15550100004", "Adiós")])[0] == 200
    pid = service.main_pid()
    service.systemctl("stop", UNIT)
    shown = service.show("Result", "ExecMainStatus", "ActiveState", "KillSignal")
    assert shown == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive", "KillSignal": "15"}
    names = [e["event"] for e in service.events() if e["_pid"] == pid]
    tail = names[names.index("stopping") :]
    steps = ["saving_before_shutdown", "snapshot", "stopped"]
    assert [n for n in tail if n in steps] == steps
    final = [e for e in service.events("snapshot") if e["_pid"] == pid][-1]
    assert final["final"] is True and final["sessions"] == 1
    assert [e for e in service.events("stopped") if e["_pid"] == pid][-1]["exit_code"] == 0
    assert "Adiós" in service.conversation("15550100004")  # read from the files, the daemon stopped


def test_the_running_daemon_has_no_privileges_and_can_write_only_its_state_directory(service: Service) -> None:
    """/proc/PID/status of the running daemon: a uid of its own, NoNewPrivs, a seccomp filter, no capability at
    all; every state file is 0600 (directories 0700) and owned by that uid; and a probe run as that uid in the
    daemon's own mount namespace can create or open for writing nothing outside the state directory."""
    service.systemctl("start", UNIT)
    assert service.post([("wamid.SB1", "15550100005", "Hola")])[0] == 200
    service.backup()  # root, through the control socket: a backup file too
    pid = service.main_pid()
    status = service.status(pid)
    uid = int(status["Uid"].split()[0])
    assert uid != 0 and status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split()[0] != "0"
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # SECCOMP_MODE_FILTER
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])

    files = service.state_files()
    assert {"keyring.enc", "backups", "control.sock"} <= set(files)
    assert any(name.startswith("journal.") for name in files) and any(name.startswith("backups/sessions.") for name in files)
    for name, st in files.items():
        assert st.st_uid == uid and st.st_gid == uid, name
        assert stat.S_IMODE(st.st_mode) == (0o700 if stat.S_ISDIR(st.st_mode) else 0o600), (name, oct(st.st_mode))

    # nsenter(1): the daemon's mount, user and IPC namespaces, its uid and gid (not its seccomp filter: that only
    # forbids more, so whatever the probe cannot write, the daemon cannot either)
    inside = ["nsenter", "-t", str(pid), "-m", "-U", "-i", "-S", str(uid), "-G", str(uid)]
    probe = service.box.run([*inside, f"{VENV}/bin/natalia-write-probe"])
    found = json.loads(probe.stdout)
    assert found["uid"] == uid and found["dirs"] > 500 and found["files"] > 5000  # it did look everywhere
    outside = [p for p in found["writable"] if not (p + "/").startswith("/var/lib/natalia-secure/")]
    assert outside == []
    assert "/var/lib/natalia-secure" in found["writable"]  # the probe can see a writable place when there is one


def test_an_admin_command_from_root_goes_through_the_control_socket_and_files_keep_the_service_owner(service: Service) -> None:
    """Root in the container (uid 0, the daemon a DynamicUser) runs `keys rotate --retire-old` and `backup` on the
    default state directory: the daemon runs them (its `admin_command` log lines), answers, keeps serving, and
    every file stays owned by its uid."""
    service.systemctl("start", UNIT)
    assert service.post([("wamid.AD1", "15550100006", "Hola")])[0] == 200
    pid = service.main_pid()
    uid = int(service.status(pid)["Uid"].split()[0])
    rotated = json.loads(service.box.run([CLI, "keys", "rotate", "--retire-old", "--json"]).stdout)
    assert rotated["retired"] and rotated["primary"] not in rotated["retired"]
    assert service.backup()["sessions"] == 1
    commands = [e["command"] for e in service.events("admin_command") if e["_pid"] == pid]
    assert commands == ["keys.rotate", "backup"]
    assert service.post([("wamid.AD2", "15550100006", "Otra vez")])[0] == 200
    assert service.main_pid() == pid
    for name, st in service.state_files().items():
        assert (st.st_uid, st.st_gid) == (uid, uid), name
    assert service.conversation("15550100006")[0] == "Hola"


def test_the_verify_service_passes_fails_on_a_tampered_file_and_writes_nothing(service: Service) -> None:
    """natalia-secure-verify.service (the timer's) authenticates every file beside the running daemon; after one
    byte of a backup is flipped it fails with exit 5 naming the file; its timer is enabled and scheduled; and its
    sandbox lets it write nothing at all, its state directory included."""
    service.systemctl("start", UNIT)
    assert service.post([("wamid.VF1", "15550100007", "Hola")])[0] == 200
    service.backup()
    service.systemctl("start", VERIFY)
    assert service.show("Result", "ExecMainStatus", unit=VERIFY) == {"Result": "success", "ExecMainStatus": "0"}
    assert any(re.search(r"\b0 failed\b", line) for line in service.messages(VERIFY))

    backup = sorted(name for name in service.state_files() if name.startswith("backups/sessions."))[-1]
    path = service.box.path(f"{STATE}/{backup}")
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x01]))
    service.systemctl("start", VERIFY, check=False)
    assert service.show("Result", "ExecMainStatus", unit=VERIFY) == {"Result": "exit-code", "ExecMainStatus": "5"}
    assert any("FAIL" in line and backup in line for line in service.messages(VERIFY))
    assert service.show("ActiveState")["ActiveState"] == "active"  # the daemon is not disturbed

    service.systemctl("enable", "--now", "natalia-secure-verify.timer")
    timer = service.show("ActiveState", "NextElapseUSecRealtime", unit="natalia-secure-verify.timer")
    assert timer["ActiveState"] == "active" and timer["NextElapseUSecRealtime"]

    probe = f"[Service]\nExecStart=\nExecStart={VENV}/bin/natalia-write-probe\n"  # the same sandbox, the probe in it
    service.box.write(f"/etc/systemd/system/{VERIFY}.d/probe.conf", probe)
    service.systemctl("daemon-reload")
    service.systemctl("reset-failed", VERIFY)
    service.systemctl("start", VERIFY)
    output = [e["MESSAGE"] for e in service.journal(VERIFY) if str(e.get("MESSAGE")).startswith('{"uid"')]
    found = json.loads(output[-1])
    assert found["dirs"] > 50 and found["files"] > 5000 and found["writable"] == []


def test_without_the_master_key_credential_the_start_fails_with_exit_4_and_is_not_retried(service: Service) -> None:
    """A missing credential file is skipped by systemd (the unit names it by ID in the credential store) and the
    daemon refuses to start with exit 4 (key error); RestartPreventExitStatus= keeps systemd from looping on it."""
    service.box.run(["rm", f"{CREDSTORE}/natalia-secure.master-key"])
    assert service.box.run(["systemctl", "start", UNIT], check=False).returncode != 0
    time.sleep(3)  # longer than RestartSec=2
    assert service.show("Result", "ExecMainStatus", "NRestarts", "ActiveState") == {
        "Result": "exit-code", "ExecMainStatus": "4", "NRestarts": "0", "ActiveState": "failed"
    }  # fmt: skip
    assert not service.listening()
