"""The shipped unit files (systemd/), checked without running them: `systemd-analyze verify` has nothing to say about
any of them, `systemd-analyze security --offline=true` scores each service at an exposure of at most 1.0 (both with
the host's systemd-analyze: 252 on Debian 12, the version the units are written for), the daemon's unit says what
issue 6 asks, its credentials are the names the package reads, and systemd/README.md names the same paths.
tests/test_systemd_service.py runs them under a real systemd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from natalia_secure import config, masterkey
from natalia_secure.errors import ConfigError, IntegrityError, KeyMaterialError, LockHeldError, StoreUnavailable, UsageError

from . import nspawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMD = os.path.join(ROOT, "systemd")
DAEMON, VERIFY, TIMER = "natalia-secure.service", "natalia-secure-verify.service", "natalia-secure-verify.timer"
EXPOSURE_MAX = 1.0  # issue 6
EXECUTABLES = ("/opt/natalia-secure/venv/bin/natalia-secure", "/usr/bin/kill")  # ExecStart=, ExecReload= (/bin is a link)
SYSTEM_UNITS = "/usr/lib/systemd/system"  # where the targets the units name (network-online.target, ...) are defined

Unit = dict[str, list[tuple[str, str]]]


def parse(text: str) -> Unit:
    """systemd.syntax(7), as far as our files use it: [Section], Key=value lines, # and ; comments."""
    unit: Unit = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert section is not None and "=" in line and not line.endswith("\\"), line
        key, _, value = line.partition("=")
        unit[section].append((key.strip(), value.strip()))
    return unit


def read(name: str) -> Unit:
    with open(os.path.join(SYSTEMD, name), encoding="utf-8") as f:
        return parse(f.read())


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value given to `key`, an empty assignment resetting the list (systemd.unit(5))."""
    found: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            found = [] if v == "" else [*found, v]
    return found


def one(unit: Unit, key: str, section: str = "Service") -> str:
    found = values(unit, section, key)
    assert len(found) == 1, (key, found)
    return found[0]


def credential_ids(unit: Unit) -> dict[str, str]:
    """LoadCredential(Encrypted)= ID -> where it is read from."""
    pairs = values(unit, "Service", "LoadCredentialEncrypted") + values(unit, "Service", "LoadCredential")
    return dict(pair.split(":", 1) for pair in pairs)


@pytest.fixture(scope="module")
def analyze() -> str:
    """systemd-analyze, installed (package systemd) when missing and we are root, as in the CI."""
    if shutil.which("systemd-analyze") is None:
        if os.geteuid() != 0:
            pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
        nspawn.ensure_tools({"systemd-analyze": "systemd"})
    path = shutil.which("systemd-analyze")
    assert path is not None
    return path


def verify(analyze: str, root: str, name: str, text: str) -> str:
    """`systemd-analyze verify` of `text` installed as /etc/systemd/system/NAME in a throwaway root that holds what the
    units need to exist (the targets they name, stub executables): its whole output, "" when it has nothing to say."""
    if not os.path.isdir(os.path.join(root, "usr/lib/systemd/system")):
        shutil.copytree(SYSTEM_UNITS, os.path.join(root, "usr/lib/systemd/system"), symlinks=True)
        os.symlink("usr/bin", os.path.join(root, "bin"))
        for path in EXECUTABLES:
            stub = os.path.join(root, path.lstrip("/"))
            os.makedirs(os.path.dirname(stub), exist_ok=True)
            with open(stub, "w", encoding="utf-8") as f:
                f.write("#!/bin/sh\nexit 0\n")
            os.chmod(stub, 0o755)
    os.makedirs(os.path.join(root, "etc/systemd/system"), exist_ok=True)
    with open(os.path.join(root, "etc/systemd/system", name), "w", encoding="utf-8") as f:
        f.write(text)
    proc = subprocess.run([analyze, "verify", f"--root={root}", name], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr + (f"(exit {proc.returncode})" if proc.returncode else "")).strip()


def exposure(analyze: str, path: str) -> tuple[float, int, str]:
    """The overall exposure figure, exit code and report of `systemd-analyze security --offline=true`, run with
    --threshold=10 (in tenths): the command's own verdict on "at most 1.0" is its exit code."""
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=10", "--no-pager", path], capture_output=True, text=True, check=False
    )
    report = proc.stdout + proc.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", report)
    assert found, report
    return float(found.group(1)), proc.returncode, report


@pytest.mark.parametrize("name", [DAEMON, VERIFY, TIMER])
def test_systemd_analyze_verify_has_nothing_to_say_about_the_unit(analyze: str, tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    """Not one warning: unknown keys, bad values, a missing executable or a dependency on a unit that does not exist
    would each print a line (and systemd would carry on, ignoring the line)."""
    with open(os.path.join(SYSTEMD, name), encoding="utf-8") as f:
        text = f.read()
    assert verify(analyze, str(tmp_path), name, text) == ""


@pytest.mark.parametrize(
    ("mistake", "said"),
    [
        ("WatchdogSecs=30", "Unknown key"),  # a typo: systemd ignores the line and runs without a watchdog
        ("MemoryDenyWriteExecute=maybe", "Failed to parse boolean"),
        ("ExecStartPre=/opt/natalia-secure/venv/bin/nothing-here", "is not executable"),
    ],
)
def test_the_verify_check_fails_on_a_warning(analyze: str, tmp_path, mistake: str, said: str) -> None:  # type: ignore[no-untyped-def]
    """The check above is not vacuous: one bad line added to the daemon's unit makes it report that line."""
    with open(os.path.join(SYSTEMD, DAEMON), encoding="utf-8") as f:
        text = f.read().replace("[Service]\n", f"[Service]\n{mistake}\n", 1)
    assert said in verify(analyze, str(tmp_path), DAEMON, text)


@pytest.mark.parametrize("name", [DAEMON, VERIFY])
def test_each_service_has_an_exposure_of_at_most_1_0(analyze: str, name: str) -> None:
    """`systemd-analyze security --offline=true`: 1.0 for the daemon (what is left: it needs the network and local
    sockets), less for the verify service (no network at all)."""
    figure, code, report = exposure(analyze, os.path.join(SYSTEMD, name))
    assert figure <= EXPOSURE_MAX and code == 0, report


def test_the_exposure_check_fails_on_an_unhardened_unit(analyze: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The check above is not vacuous: the same ExecStart without the sandbox scores far above 1.0."""
    bare = tmp_path / DAEMON
    bare.write_text("[Service]\nType=notify\nExecStart=/opt/natalia-secure/venv/bin/natalia-secure serve\n")
    figure, code, _ = exposure(analyze, str(bare))
    assert figure > 5.0 and code != 0


def test_the_daemon_unit_says_what_issue_6_asks() -> None:
    """Type=notify with NotifyAccess=main, WatchdogSec=30, Restart=on-failure, a TimeoutStopSec longer than the
    daemon's own stop timeout, ExecReload= sending SIGHUP, a dynamic user, a 0700 state directory, a configuration
    directory, UMask=0077, and the documented production ExecStart."""
    unit = read(DAEMON)
    assert one(unit, "Type") == "notify" and one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec") == "30" and one(unit, "Restart") == "on-failure"
    stop_timeout = config.BY_NAME["stop_timeout_s"].default
    assert isinstance(stop_timeout, float) and int(one(unit, "TimeoutStopSec")) >= stop_timeout + 5
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "DynamicUser") == "yes" and one(unit, "User") == "natalia-secure"
    assert one(unit, "StateDirectory") == "natalia-secure" and one(unit, "StateDirectoryMode") == "0700"
    assert one(unit, "ConfigurationDirectory") == "natalia-secure"
    assert one(unit, "UMask") == "0077"
    assert one(unit, "ExecStart") == "/opt/natalia-secure/venv/bin/natalia-secure serve"
    assert config.BY_NAME["state_dir"].default == "/var/lib/" + one(unit, "StateDirectory")
    assert config.DEFAULT_PATH.startswith("/etc/" + one(unit, "ConfigurationDirectory") + "/")
    assert one(unit, "LimitCORE") == "0"  # keys and conversations never in a core file
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_the_credentials_are_the_names_the_package_reads() -> None:
    """The daemon gets the master key and every secret setting that has a credential name (config.SETTINGS), each
    sealed (LoadCredentialEncrypted=) and looked up as natalia-secure.ID in the credential store; the verify service
    gets the master key alone."""
    secrets = {s.credential for s in config.SETTINGS if s.credential}
    assert secrets and all(s.secret for s in config.SETTINGS if s.credential)
    wanted = {masterkey.CREDENTIAL_NAME, *secrets}
    daemon = read(DAEMON)
    assert values(daemon, "Service", "LoadCredential") == []
    assert credential_ids(daemon) == {name: f"natalia-secure.{name}" for name in wanted}
    assert credential_ids(read(VERIFY)) == {masterkey.CREDENTIAL_NAME: f"natalia-secure.{masterkey.CREDENTIAL_NAME}"}


def test_restarts_are_prevented_exactly_for_the_errors_a_restart_cannot_cure() -> None:
    """RestartPreventExitStatus= holds the usage, configuration, key and integrity exit codes, and not the lock or
    disk ones (another writer may go away, a disk may get space back)."""
    codes = {int(code) for code in one(read(DAEMON), "RestartPreventExitStatus").split()}
    assert codes == {UsageError.exit_code, ConfigError.exit_code, KeyMaterialError.exit_code, IntegrityError.exit_code}
    assert LockHeldError.exit_code not in codes and StoreUnavailable.exit_code not in codes


def test_the_verify_service_runs_verify_as_the_daemons_user_with_everything_read_only() -> None:
    """A oneshot `natalia-secure verify`, as the daemon's (dynamic) user so the 0600 files open, on the same state
    and configuration directories and sandbox root, with the state directory read-only and no network."""
    daemon, unit = read(DAEMON), read(VERIFY)
    assert one(unit, "Type") == "oneshot"
    assert one(unit, "ExecStart") == one(daemon, "ExecStart").replace(" serve", " verify")
    for key in ("User", "DynamicUser", "StateDirectory", "StateDirectoryMode", "ConfigurationDirectory", "RootDirectory"):
        assert one(unit, key) == one(daemon, key), key
    read_only = " ".join(values(unit, "Service", "ReadOnlyPaths")).split()
    assert "+/var/lib/" + one(unit, "StateDirectory") in read_only
    assert one(unit, "PrivateNetwork") == "yes" and one(unit, "RestrictAddressFamilies") == "none"
    assert values(unit, "Install", "WantedBy") == []  # started by its timer only


def test_the_timer_starts_the_verify_service_daily_and_catches_up() -> None:
    """OnCalendar=daily, Persistent=true (a day missed while off runs at boot), enabled through timers.target; its
    name makes it start natalia-secure-verify.service."""
    timer = read(TIMER)
    assert values(timer, "Timer", "OnCalendar") == ["daily"] and values(timer, "Timer", "Persistent") == ["true"]
    assert values(timer, "Timer", "Unit") in ([], [VERIFY])
    assert TIMER.removesuffix(".timer") == VERIFY.removesuffix(".service")
    assert values(timer, "Install", "WantedBy") == ["timers.target"]


def test_the_install_guide_names_what_the_units_use() -> None:
    """systemd/README.md names every unit file, the ExecStart program, the root directory to create, and for each
    credential the file and the `systemd-creds encrypt --name=ID` that seals it."""
    with open(os.path.join(SYSTEMD, "README.md"), encoding="utf-8") as f:
        guide = f.read()
    daemon = read(DAEMON)
    for name in (DAEMON, VERIFY, TIMER):
        assert name in guide, name
    assert one(daemon, "ExecStart").split()[0] in guide
    assert one(daemon, "RootDirectory") in guide
    for name, file in credential_ids(daemon).items():
        assert f"--name={name}" in guide and f"/etc/credstore.encrypted/{file}" in guide, name
