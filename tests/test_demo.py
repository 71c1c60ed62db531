"""`natalia-secure demo`, the README's first command, run as a user would: the legacy scenario end to end against
the real daemon (signed webhooks, SIGTERM, restart), with its checks that nothing readable is at rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("NATALIA_", "WHATSAPP_", "ANTHROPIC_", "NOTIFY_"))}


def demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "natalia_secure", "demo", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def say(root: str, text: str) -> subprocess.CompletedProcess[str]:
    """`natalia-secure demo --dir ROOT --say TEXT`, as a second terminal would run it."""
    return subprocess.run(
        [sys.executable, "-m", "natalia_secure", "demo", "--dir", root, "--say", text],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_demo_plays_the_legacy_scenario_and_recovers_six_messages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Exit 0; the greeting, photos 1-6, the 6 messages after the restart, 0 readable occurrences on disk and in
    the log, the decrypted conversation, and the context kept after the restart."""
    proc = demo("--dir", str(tmp_path / "d"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Natalia → 34600000000: ¡Hola! Soy Natalia" in out
    assert "Salado 6: hojaldres de jamón y queso" in out
    assert "34600000000                 6" in out  # list after the restart: 6 messages
    assert "the phone number and the 3 texts appear 0 times" in out and "0 times (phones are pseudonymised" in out
    assert "34600000000: 6 messages" in out and "[fotos enviadas: Salado 4-6]" in out
    assert "Ya te he enviado todas las fotos de Salado" in out
    assert oct(os.stat(tmp_path / "d" / "master.key").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "d" / "state").st_mode & 0o777) == "0o700"


def test_keep_running_serves_until_ctrl_c_and_say_talks_to_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--keep-running prints how to talk to it; --say sends a signed message that Natalia answers; Ctrl-C stops it."""
    root = str(tmp_path / "d")
    proc = demo("--dir", root, "--keep-running")
    assert proc.stdout is not None
    lines: list[str] = []
    end = time.monotonic() + 120
    while time.monotonic() < end:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("Ctrl-C stops it") or not line:
            break
    assert any("--say" in line for line in lines), "".join(lines)
    said = say(root, "Quiero fotos de dulce")
    assert said.returncode == 0, said.stderr
    while time.monotonic() < end:
        line = proc.stdout.readline()
        lines.append(line)
        if "Dulce 3" in line or not line:
            break
    assert any("Dulce 1: tarta de queso" in line for line in lines)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "daemon exit code 0" in out
    assert not os.path.exists(os.path.join(root, "demo.json"))
    missing = say(root, "hola")
    assert missing.returncode == 3 and "no running demo" in missing.stderr
