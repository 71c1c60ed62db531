"""`natalia-secure demo`: the README's first command. The legacy system's own test scenario (../shared/seed/), played
against the real daemon through real signed webhooks, on a local state directory:

    "Hola" -> a greeting; "Quiero fotos de salado" -> photos; "¿Tienes más fotos?" -> the next photos;
    SIGTERM (final snapshot) and a new start: the 6 messages are back; the sealed files hold neither the phone
    number nor any text; `show` decrypts the conversation; Natalia keeps the context after the restart.

Offline by default: the rule-based Natalia unless ANTHROPIC_API_KEY is set, replies printed here unless
WHATSAPP_ACCESS_TOKEN and WHATSAPP_PHONE_NUMBER_ID are set. The master key is generated (0600) beside the state
directory, never inside it. `--keep-running` leaves the daemon serving; `--say TEXT` talks to it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

from . import atomicfile, keyring, masterkey, whatsapp
from .clock import iso_utc, now_ms
from .errors import ConfigError, NataliaError, StoreUnavailable
from .store import Store

PHONE = "34600000000"  # a made-up number (the demo holds no personal data)
SCENARIO = ["Hola", "Quiero fotos de salado", "¿Tienes más fotos?"]
AFTER_RESTART = "¿Tienes más fotos?"
WAIT_S = 90.0  # Claude may take a while; the offline Natalia answers in milliseconds


@dataclass
class Paths:
    root: str

    @property
    def state(self) -> str:
        return os.path.join(self.root, "state")

    @property
    def key(self) -> str:
        return os.path.join(self.root, "master.key")

    @property
    def info(self) -> str:
        return os.path.join(self.root, "demo.json")  # port and webhook secret of the running demo daemon (0600)

    @property
    def log(self) -> str:
        return os.path.join(self.root, "daemon.log")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "demo.toml")  # empty: the daemon's embedded defaults


class DemoDaemon:
    """`natalia-secure serve` in a subprocess: its JSON log to daemon.log, its printed replies to our terminal."""

    def __init__(self, paths: Paths, app_secret: str, out: TextIO) -> None:
        self.paths, self.app_secret, self.out = paths, app_secret, out
        # The embedded defaults: none of the operator's NATALIA_* settings or /etc file (WHATSAPP_* and ANTHROPIC_*
        # are kept on purpose: they switch the demo to the real services).
        env = {k: v for k, v in os.environ.items() if not k.startswith("NATALIA_")}
        env.update(
            NATALIA_CONFIG=paths.config,
            NATALIA_STATE_DIR=paths.state,
            NATALIA_MASTER_KEY_FILE=paths.key,
            NATALIA_LISTEN="127.0.0.1:0",
            NATALIA_LOG_FORMAT="json",
            NATALIA_LOG_LEVEL="info",  # the demo reads the `listening` line
            WHATSAPP_APP_SECRET=app_secret,
            WHATSAPP_VERIFY_TOKEN=secrets.token_hex(16),
            PYTHONUNBUFFERED="1",
        )
        if not (env.get("WHATSAPP_ACCESS_TOKEN") and env.get("WHATSAPP_PHONE_NUMBER_ID")):
            env["NATALIA_OUTBOX"] = "terminal"
        env.pop("NOTIFY_SOCKET", None)
        self.log_offset = os.path.getsize(paths.log) if os.path.exists(paths.log) else 0
        with open(paths.log, "ab") as log:
            os.fchmod(log.fileno(), 0o600)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "natalia_secure", "serve"],
                env=env,
                stdout=log,
                stderr=sys.stderr,
                stdin=subprocess.DEVNULL,
            )
        self.port = 0

    def events(self) -> list[dict[str, Any]]:
        with open(self.paths.log, "rb") as f:
            f.seek(self.log_offset)
            found = []
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    found.append(event)
            return found

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise StoreUnavailable(f"the daemon exited with code {self.proc.returncode}; see {self.paths.log}")
            events = self.events()
            listening = next((e for e in events if e.get("event") == "listening"), None)
            if listening:
                self.port = int(listening["port"])
                return next(e for e in events if e.get("event") == "sessions_loaded")
            time.sleep(0.05)
        raise StoreUnavailable(f"the daemon did not start within {timeout:.0f} s; see {self.paths.log}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def replies_done(self) -> float:
        """Replies finished, sent or failed (from the daemon's own /metrics)."""
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as r:  # noqa: S310  (loopback, our daemon)
            text = r.read().decode()
        done = ('natalia_replies_total{outcome="sent"}', 'natalia_replies_total{outcome="failed"}')
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(done))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def say(port: int, app_secret: str, text: str, phone: str = PHONE) -> dict[str, Any]:
    """Send one signed webhook, as Meta would; returns the daemon's answer."""
    wamid = "wamid.demo." + secrets.token_hex(12)
    body = whatsapp.text_webhook([(wamid, phone, text, int(time.time()))])
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/webhook",
        data=body,
        headers={whatsapp.SIGNATURE_HEADER: whatsapp.sign(app_secret.encode(), body), "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310
            answer: dict[str, Any] = json.loads(r.read())
            return answer
    except urllib.error.HTTPError as exc:
        raise StoreUnavailable(f"the daemon answered {exc.code}: {exc.read().decode(errors='replace')}") from None


def _prepare(paths: Paths, out: TextIO) -> str:
    """Key, state directory and config; returns the made-up phone number this run uses."""
    os.makedirs(paths.root, mode=0o700, exist_ok=True)
    if os.path.exists(paths.info):
        raise ConfigError(f"a demo is already running in {paths.root} (stop it with Ctrl-C, or use --dir)")
    if not os.path.exists(paths.config):
        atomicfile.write_atomic(paths.config, [b"# natalia-secure demo: the daemon's embedded defaults\n"])
    if not os.path.exists(paths.key):
        masterkey.create_key_file(paths.key)
        out.write(f"  master key  {paths.key} (generated, 0600; outside the state directory)\n")
    master = masterkey.read_key_file(paths.key)
    atomicfile.ensure_private_dir(paths.state, create=True)
    if not os.path.exists(os.path.join(paths.state, keyring.FILENAME)):
        now = now_ms()
        keyring.save(paths.state, keyring.Keyring.new(iso_utc(now)), master, now)
    out.write(f"  state       {paths.state} (0700: every file in it sealed with AES-256-GCM, 0600)\n")
    known = set(Store.open(paths.state, master, readonly=True).phones())
    phone = next(p for p in (f"346000000{n:02d}" for n in range(100)) if p not in known)
    if known:
        out.write(f"  reusing     {paths.root}: its {len(known)} earlier conversation(s) stay; this one is {phone}\n")
    return phone


def _converse(daemon: DemoDaemon, texts: list[str], out: TextIO, phone: str) -> None:
    for text in texts:
        before = daemon.replies_done()
        out.write(f"  Cliente {phone} → Natalia: {text}\n")
        out.flush()
        answer = say(daemon.port, daemon.app_secret, text, phone)
        if answer.get("messages") != 1:
            raise StoreUnavailable(f"the daemon did not take the message: {answer}")
        end = time.monotonic() + WAIT_S
        while daemon.replies_done() <= before:
            if time.monotonic() > end:
                raise StoreUnavailable(f"no reply within {WAIT_S:.0f} s; see {daemon.paths.log}")
            time.sleep(0.05)
        time.sleep(0.05)  # let the printed reply reach the terminal before the next line


def _sealed_check(paths: Paths, needles: list[str], out: TextIO) -> None:
    files, total, hits = 0, 0, 0
    for root, _, names in os.walk(paths.state):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue  # the running daemon's control socket: not a file that holds data
            with open(path, "rb") as f:
                data = f.read()
            files, total = files + 1, total + len(data)
            hits += sum(data.count(n.encode()) for n in needles)
    with open(paths.log, "rb") as f:
        log = f.read()
    log_hits = sum(log.count(n.encode()) for n in needles)
    out.write(
        f"  {files} sealed files, {total:,} bytes: the phone number and the {len(needles) - 1} texts appear {hits} times;\n"
        f"  the daemon's log ({len(log.splitlines())} lines): {log_hits} times (phones are pseudonymised, texts never logged)\n"
    )
    if hits or log_hits:
        raise NataliaError("readable personal data found at rest: this must never happen; please report it")


def run_demo(root: str, keep_running: bool, out: TextIO) -> int:
    from . import cli  # the same commands an operator runs

    paths = Paths(os.path.abspath(root))
    out.write("natalia-secure demo: the legacy scenario on a sealed store\n")
    phone = _prepare(paths, out)
    app_secret = secrets.token_hex(32)
    claude = (
        "Claude (ANTHROPIC_API_KEY)"
        if os.environ.get("ANTHROPIC_API_KEY")
        else "the offline Natalia (set ANTHROPIC_API_KEY for Claude)"
    )
    whatsapp_on = os.environ.get("WHATSAPP_ACCESS_TOKEN") and os.environ.get("WHATSAPP_PHONE_NUMBER_ID")
    outbound = "WhatsApp Cloud API" if whatsapp_on else "printed here (no WhatsApp credentials)"
    out.write(f"  assistant   {claude}\n  outbound    {outbound}\n\n")

    out.write("1. The daemon starts: the store is loaded, then it listens.\n")
    daemon = DemoDaemon(paths, app_secret, out)
    wrote_info = False
    # a closed terminal (SIGHUP) or a SIGTERM must not leave the daemon running: end through `finally`
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        loaded = daemon.wait_ready()
        out.write(f"  serving on 127.0.0.1:{daemon.port} ({loaded['sessions']} sessions loaded)\n\n")
        out.write("2. The customer writes (real webhooks, signed with X-Hub-Signature-256):\n")
        _converse(daemon, SCENARIO, out, phone)

        out.write("\n3. Restart: SIGTERM (final snapshot), then a new start.\n")
        code = daemon.stop()
        out.write(f"  stopped with exit code {code}\n")
        daemon = DemoDaemon(paths, app_secret, out)
        loaded = daemon.wait_ready()
        out.write(f"  started again: {loaded['sessions']} session(s) loaded from the sealed files\n")
        cli.main(["list", "--state-dir", paths.state, "--master-key", paths.key], out=out)

        out.write("\n4. What is on disk is sealed:\n")
        _sealed_check(paths, [phone, *SCENARIO], out)

        out.write(f"\n5. Decrypted to the screen only: natalia-secure show {phone}\n")
        cli.main(["show", phone, "--state-dir", paths.state, "--master-key", paths.key], out=out)

        out.write("\n6. She keeps the context after the restart:\n")
        _converse(daemon, [AFTER_RESTART], out, phone)

        if keep_running:
            _write_info(paths, daemon.port, app_secret, phone)
            wrote_info = True
            out.write(
                f"\nServing on http://127.0.0.1:{daemon.port}/webhook. Talk to Natalia from another terminal:\n"
                f"  natalia-secure demo --dir {paths.root} --say 'Hola, ¿qué tienes de dulce?'\n"
                f"Health: curl http://127.0.0.1:{daemon.port}/healthz   Metrics: curl http://127.0.0.1:{daemon.port}/metrics\n"
                "Ctrl-C stops it.\n"
            )
            out.flush()
            try:
                daemon.proc.wait()
            except KeyboardInterrupt:
                pass
        code = daemon.stop()
        out.write(f"\nDone (daemon exit code {code}). Everything is in {paths.root}; delete it when you like.\n")
        return 0 if code == 0 else code
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
        if wrote_info and os.path.exists(paths.info):
            os.unlink(paths.info)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _write_info(paths: Paths, port: int, app_secret: str, phone: str) -> None:
    data = json.dumps({"port": port, "app_secret": app_secret, "phone": phone}).encode()
    atomicfile.write_atomic(paths.info, [data])


def run_say(root: str, text: str, out: TextIO) -> int:
    paths = Paths(os.path.abspath(root))
    try:
        with open(paths.info, "rb") as f:
            info = json.loads(f.read())
    except OSError:
        raise ConfigError(f"no running demo in {paths.root} (start one with: natalia-secure demo --keep-running)") from None
    answer = say(int(info["port"]), str(info["app_secret"]), text, str(info.get("phone", PHONE)))
    out.write(f"sent ({answer}); Natalia answers in the demo's terminal\n")
    return 0
