"""`natalia-secure serve` as systemd runs it: a real subprocess, a real notify socket (path and abstract forms), real
signals. READY only after the store is loaded, the watchdog cadence and its silence while the process is stopped or
the store degraded, STOPPING and exit 0 on SIGTERM, SIGKILL right after acknowledgements, redelivery after a restart,
reload on SIGHUP, refusal to start, and a scan of every log line for personal data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from natalia_secure import sessions, snapshot, whatsapp
from natalia_secure.masterkey import MasterKey
from natalia_secure.store import Store

from .daemon_process import SECRET, DaemonProcess
from .figures import Recorder
from .test_faults import namespaces_unavailable

PHONES = [f"3460{i:07d}" for i in range(1, 6)]



def start(daemons: list[DaemonProcess], tmp_path, state_dir: str, key: str, **kw) -> DaemonProcess:  # type: ignore[no-untyped-def]
    d = DaemonProcess(str(tmp_path), state_dir, key, **kw)
    daemons.append(d)
    return d


def body(wamid: str, phone: str, text: str) -> bytes:
    return whatsapp.text_webhook([(wamid, phone, text, 1_770_000_000)])


def test_ready_comes_only_after_the_store_is_loaded(
    tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """With 20,000 sessions to load, READY=1 follows the load and the listening socket, and at READY the daemon
    already serves every session."""
    with Store.open(state_dir, master) as store:
        store.import_sessions([(f"34{i:09d}", sessions.new_session(1_770_000_000_000 + i)) for i in range(20_000)])
    d = start(daemons, tmp_path, state_dir, master_key_file).wait_ready()
    ready_at = d.notify.wait_for("READY")
    loaded = d.event("sessions_loaded")
    assert loaded["sessions"] == 20_000
    assert loaded["_t"] <= ready_at and d.event("listening")["_t"] <= ready_at
    code, health = d.request("/healthz")
    assert code == 200 and b'"sessions":20000' in health
    status = [v for _, v in d.notify.fields("STATUS")]
    assert status and status[0].startswith("serving 127.0.0.1:") and "20000 sessions" in status[0]
    assert d.stop() == 0


def test_watchdog_pings_at_half_the_interval_and_stop_while_the_process_is_stopped(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """WATCHDOG_USEC=200 ms: a ping about every 100 ms; SIGSTOP for 0.8 s: not one ping; SIGCONT: pings resume."""
    d = start(daemons, tmp_path, state_dir, master_key_file, env={"WATCHDOG_USEC": "200000"}).wait_ready()
    time.sleep(1.0)
    t0 = time.monotonic()
    time.sleep(1.0)
    pings = [t for t, _ in d.notify.fields("WATCHDOG") if t0 <= t < t0 + 1.0]
    assert 6 <= len(pings) <= 14, pings
    d.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    time.sleep(0.8)
    resumed = time.monotonic()
    d.signal(signal.SIGCONT)
    time.sleep(0.5)
    during = [t for t, _ in d.notify.fields("WATCHDOG") if stopped + 0.05 < t < resumed]
    after = [t for t, _ in d.notify.fields("WATCHDOG") if t > resumed]
    assert during == [] and len(after) >= 2
    assert d.stop() == 0


def test_a_watchdog_meant_for_another_pid_is_not_answered(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """WATCHDOG_PID names another process: this one sends no WATCHDOG=1 (sd_watchdog_enabled(3))."""
    d = start(daemons, tmp_path, state_dir, master_key_file, env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}).wait_ready()
    time.sleep(0.5)
    assert d.notify.fields("WATCHDOG") == []
    assert d.stop() == 0


def test_sigterm_sends_stopping_takes_a_final_snapshot_and_exits_0(
    tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """Over an abstract notify socket: STOPPING=1, the final snapshot holds the messages, exit 0 well within 20 s."""
    d = start(daemons, tmp_path, state_dir, master_key_file, abstract=True).wait_ready()
    assert d.notify.address.startswith("@")
    for i, phone in enumerate(PHONES):
        assert d.post(body(f"wamid.T{i}", phone, f"hola {i}"))[0] == 200
    generation_before = snapshot.list_generations(state_dir)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert time.monotonic() - t0 < 20
    d.notify.wait_for("STOPPING")
    assert d.event("saving_before_shutdown") and d.event("stopped")["exit_code"] == 0
    assert snapshot.list_generations(state_dir) != generation_before
    store = Store.open(state_dir, master, readonly=True)
    assert sorted(store.phones()) == PHONES
    d.close()


def test_every_acknowledged_message_survives_sigkill_exactly_once(
    tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """200 messages from 8 concurrent senders, SIGKILL right after the last 200: after a restart every acknowledged
    message is in its session exactly once."""
    d = start(daemons, tmp_path, state_dir, master_key_file).wait_ready()
    acked: list[tuple[str, str]] = []
    lock = threading.Lock()

    def sender(k: int) -> None:
        for i in range(25):
            phone, text = PHONES[(k + i) % len(PHONES)], f"mensaje {k}-{i}"
            code, _ = d.post(body(f"wamid.K{k}-{i}", phone, text))
            if code == 200:
                with lock:
                    acked.append((phone, text))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d.kill()
    assert len(acked) == 200
    again = start(daemons, tmp_path, state_dir, master_key_file).wait_ready()
    assert again.stop() == 0
    store = Store.open(state_dir, master, readonly=True)
    for phone, text in acked:
        user = [m["content"] for m in store.get(phone)["messages"] if m["role"] == "user"]
        assert user.count(text) == 1, (phone, text)


def test_a_redelivery_after_a_restart_is_acknowledged_without_a_second_reply(
    tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """Meta retries a message after the daemon was killed: 200, a dedup hit, no reply sent, the session unchanged."""
    d = start(daemons, tmp_path, state_dir, master_key_file).wait_ready()
    message = body("wamid.RD1", PHONES[0], "Hola")
    assert d.post(message) == (200, {"messages": 1, "duplicates": 0, "statuses": 0})
    d.until(lambda: d.metric('natalia_replies_total{outcome="sent"}') == 1)
    d.kill()
    again = start(daemons, tmp_path, state_dir, master_key_file).wait_ready()
    assert again.post(message) == (200, {"messages": 0, "duplicates": 1, "statuses": 0})
    time.sleep(0.3)
    assert again.metric('natalia_replies_total{outcome="sent"}') == 0
    assert again.metric("natalia_dedup_hits_total") == 1
    assert again.stop() == 0
    roles = [m["role"] for m in Store.open(state_dir, master, readonly=True).get(PHONES[0])["messages"]]
    assert roles == ["user", "assistant"]


def test_sighup_reloads_the_secrets_from_credentials(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """The app secret comes from $CREDENTIALS_DIRECTORY; after it changes, SIGHUP: RELOADING=1 then READY=1, and
    only the new secret's signatures are accepted."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "whatsapp-app-secret").write_text("first-secret\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "WHATSAPP_APP_SECRET": ""}
    d = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
    assert d.post(body("wamid.H1", PHONES[0], "uno"), secret="first-secret")[0] == 200
    (creds / "whatsapp-app-secret").write_text("second-secret\n")
    reload_sent = time.monotonic()
    d.signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING", after=reload_sent)
    d.notify.wait_for("READY", after=d.notify.wait_for("RELOADING", after=reload_sent))
    assert d.event("reloaded")
    assert d.post(body("wamid.H2", PHONES[0], "dos"), secret="first-secret")[0] == 401
    assert d.post(body("wamid.H3", PHONES[0], "tres"), secret="second-secret")[0] == 200
    assert d.stop() == 0


def test_a_bad_reload_keeps_the_running_configuration(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """A config file broken before SIGHUP: the error is logged and shown in STATUS=, the daemon keeps serving."""
    conf = tmp_path / "natalia.toml"
    conf.write_text("[natalia]\nreply_concurrency = 8\n")
    d = start(daemons, tmp_path, state_dir, master_key_file, env={"NATALIA_CONFIG": str(conf)}).wait_ready()
    conf.write_text("[natalia\n")
    d.signal(signal.SIGHUP)
    assert "natalia.toml" in d.event("reload_failed")["error"]
    assert d.post(body("wamid.BR1", PHONES[0], "sigo"))[0] == 200
    assert d.stop() == 0


def test_a_store_that_refuses_to_open_ends_the_start_with_exit_5(
    tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """A tampered snapshot: no READY, one clear line naming the file and `verify`, exit code 5; the file untouched."""
    with Store.open(state_dir, master) as store:
        store.add_message(PHONES[0], "user", "hola", 1)
        store.flush()
        store.snapshot()
    name = snapshot.snapshot_name(snapshot.list_generations(state_dir)[-1])
    path = os.path.join(state_dir, name)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 1
    open(path, "wb").write(bytes(data))
    d = start(daemons, tmp_path, state_dir, master_key_file)
    assert d.wait() == 5
    assert d.notify.fields("READY") == []
    error = [line for line in d.lines if "error" in line]
    assert error and name in error[-1] and "verify" in error[-1]
    assert open(path, "rb").read() == bytes(data)
    d.close()


def test_serve_refuses_to_start_without_the_app_secret(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """No WHATSAPP_APP_SECRET anywhere: exit 3 and an error that says every way to set it."""
    d = start(daemons, tmp_path, state_dir, master_key_file, env={"WHATSAPP_APP_SECRET": ""})
    assert d.wait() == 3
    text = "\n".join(d.lines)
    assert "WHATSAPP_APP_SECRET" in text and "whatsapp-app-secret" in text
    d.close()


@pytest.mark.reliability
def test_no_log_line_holds_a_phone_number_or_message_text(
    tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons: list[DaemonProcess], figures: Recorder
) -> None:  # type: ignore[no-untyped-def]
    """A whole scenario (new sessions, replies, statuses, a bad signature, a bad body, a redelivery, a reload, a
    restart, a stop) and then every line either process wrote: no phone, no wamid, no message text."""
    texts = ["Hola", "Quiero fotos de salado", "¿Tienes más fotos?", "vivo en calle Mayor 5"]
    d = start(daemons, tmp_path, state_dir, master_key_file, env={"NATALIA_LOG_LEVEL": "debug"}).wait_ready()
    for i, text in enumerate(texts):
        assert d.post(body(f"wamid.LP{i}", PHONES[i % 2], text))[0] == 200
    d.post(body("wamid.LP0", PHONES[0], texts[0]))  # redelivery
    d.post(body("wamid.LPX", PHONES[2], "firma mala"), secret="wrong")
    d.request(
        "/webhook",
        b'{"object": "whatsapp_business_account", "entry": [{"changes": "no"}]}',
        {
            whatsapp.SIGNATURE_HEADER: whatsapp.sign(
                SECRET.encode(), b'{"object": "whatsapp_business_account", "entry": [{"changes": "no"}]}'
            )
        },
    )
    status = {"id": "wamid.LPS", "status": "read", "timestamp": "1770000000", "recipient_id": PHONES[3]}
    raw = b'{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":{"statuses":[%s]}}]}]}' % (
        __import__("json").dumps(status).encode()
    )
    assert d.post(raw)[0] == 200
    d.request(f"/webhook?hub.mode=subscribe&hub.verify_token={PHONES[4]}&hub.challenge=1")
    d.until(lambda: d.metric('natalia_replies_total{outcome="sent"}') == len(texts))
    d.signal(signal.SIGHUP)
    d.event("reloaded")
    d.kill()
    again = start(daemons, tmp_path, state_dir, master_key_file, env={"NATALIA_LOG_LEVEL": "debug"}).wait_ready()
    assert again.stop() == 0
    lines = d.lines + again.lines
    assert any('"phone"' in line for line in lines), "the scenario logged phones (pseudonymised)"
    for line in lines:
        for secret in [*PHONES, *texts, "firma mala", "wamid.", SECRET]:
            assert secret not in line, (secret, line)
    figures.record(
        "Log privacy",
        "every line of a whole daemon scenario at debug level (replies, statuses, bad signature and body, redelivery, "
        "reload, SIGKILL, restart, stop)",
        f"{len(lines)} lines: 0 phone numbers, 0 message texts, 0 message ids, 0 secrets",
        "0 phones, 0 texts",
        True,
    )


@pytest.mark.root
def test_a_full_disk_gives_503_degraded_health_no_watchdog_and_recovers(
    tmp_path, state_dir: str, master: MasterKey, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """The state directory on a 2 MiB tmpfs in a private mount namespace, filled up under the running daemon: the
    webhook answers 503, /healthz and STATUS= say degraded, WATCHDOG=1 stops; once space is freed the daemon recovers
    by itself (full snapshot), pings again, and the retried message is acknowledged and answered once."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    mount = tmp_path / "mnt"
    mount.mkdir(mode=0o700)
    script = (
        f'mount -t tmpfs -o size=2m,mode=0700 tmpfs {mount} && cp -a {state_dir}/. {mount}/ && chmod 0700 {mount} && exec "$@"'
    )
    d = start(
        daemons,
        tmp_path,
        str(mount),
        master_key_file,
        env={"WATCHDOG_USEC": "200000"},
        wrap=["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"],
    ).wait_ready()
    inside = f"/proc/{d.proc.pid}/root{mount}"
    assert d.post(body("wamid.DF0", PHONES[0], "antes"))[0] == 200
    filler = os.path.join(inside, "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    message = body("wamid.DF1", PHONES[0], "x" * 200_000)
    code = 200
    for i in range(50):  # the page cache may absorb a record or two before the disk says it is full
        code, _ = d.post(body(f"wamid.DF1-{i}", PHONES[0], "y" * 100_000))
        if code == 503:
            break
    assert code == 503
    health_code, health = d.request("/healthz")
    assert health_code == 503 and b"degraded" in health
    d.until(lambda: any(v.startswith("DEGRADED") for _, v in d.notify.fields("STATUS")), timeout=10)
    silent_from = time.monotonic() + 0.3
    time.sleep(1.0)
    assert [t for t, _ in d.notify.fields("WATCHDOG") if t > silent_from] == []
    assert d.post(message)[0] == 503
    os.unlink(filler)
    d.until(lambda: d.request("/healthz")[0] == 200, timeout=30)  # maintenance retries every 10 s
    recovered = time.monotonic()
    d.until(lambda: any(t > recovered for t, _ in d.notify.fields("WATCHDOG")), timeout=5)
    assert d.post(message)[0] == 200
    assert d.stop() == 0
    # the tmpfs vanished with the namespace: what we can check is that the daemon said it recovered
    assert any(e.get("event") == "store_recovered" for e in d.events)


def test_the_console_entry_point_is_installed() -> None:
    """`natalia-secure serve --help` works from the installed script (operators and the unit call it so)."""
    exe = shutil.which("natalia-secure") or os.path.join(os.path.dirname(sys.executable), "natalia-secure")
    out = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "--config" in out.stdout


def test_a_hung_disk_cannot_stretch_the_stop_past_its_timeout(
    state_dir: str, master_key_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync hangs (a dead disk): /healthz turns 503 once the journal write has stalled, and a stop with
    NATALIA_STOP_TIMEOUT=1 returns exit 7 about a second later instead of waiting for the disk."""
    import asyncio

    import tornado.httpclient

    from natalia_secure import config
    from natalia_secure import daemon as daemon_module

    release = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(daemon_module, "STALL_S", 0.3)
    env = {
        "NATALIA_STATE_DIR": state_dir,
        "NATALIA_MASTER_KEY_FILE": master_key_file,
        "NATALIA_LISTEN": "127.0.0.1:0",
        "NATALIA_STOP_TIMEOUT": "1",
        "WHATSAPP_APP_SECRET": SECRET,
        "WHATSAPP_VERIFY_TOKEN": "t",
    }
    d = daemon_module.Daemon(config.load(None, env), environ=env)

    async def scenario() -> tuple[int, int, float]:
        task = asyncio.ensure_future(d.run())
        while d.address is None:
            await asyncio.sleep(0.01)
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        url = f"http://127.0.0.1:{d.address[1]}"

        def hanging(fd: int) -> None:
            release.wait(30)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", hanging)
        message = body("wamid.HD1", PHONES[0], "hola")
        post = asyncio.ensure_future(
            client.fetch(
                url + "/webhook",
                method="POST",
                body=message,
                raise_error=False,
                headers={whatsapp.SIGNATURE_HEADER: whatsapp.sign(SECRET.encode(), message)},
            )
        )
        await asyncio.sleep(0.6)
        health = await client.fetch(url + "/healthz", raise_error=False)
        t0 = time.monotonic()
        d.stop_requested.set()
        code = await task
        elapsed = time.monotonic() - t0
        post.cancel()
        client.close()
        return health.code, code, elapsed

    try:
        health, code, elapsed = asyncio.run(scenario())
    finally:
        release.set()
        d.store.close()
    assert health == 503 and code == 7 and d.abandoned and elapsed < 3


def serve_with(monkeypatch: pytest.MonkeyPatch, state_dir: str, run: object) -> int:
    """daemon.serve (the `serve` command's event loop and exit) around a stand-in for Daemon.run."""
    from natalia_secure import config
    from natalia_secure import daemon as daemon_module

    monkeypatch.setattr(daemon_module.Daemon, "run", run)
    monkeypatch.setattr(daemon_module.logs, "configure", lambda **kw: None)  # the test session's logging stays
    env = {"NATALIA_STATE_DIR": state_dir, "WHATSAPP_APP_SECRET": SECRET, "WHATSAPP_VERIFY_TOKEN": "t"}
    return daemon_module.serve(config.load(None, env), None, env)


def test_serve_runs_the_daemon_on_uvloop(state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import uvloop

    loops: list[type] = []

    async def run(self: object) -> int:
        loops.append(type(asyncio.get_running_loop()))
        return 0

    assert serve_with(monkeypatch, state_dir, run) == 0
    assert loops == [uvloop.Loop]


def test_serve_exits_at_once_when_the_stop_left_a_thread_stuck(state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop that gave up on a hung disk (Daemon.abandoned) exits with its code before the event loop is closed:
    closing it waits for its executor's threads, and one of them may never come back."""
    import asyncio

    stuck = threading.Event()
    exits: list[tuple[int, float]] = []

    async def run(self: object) -> int:
        asyncio.get_running_loop().run_in_executor(None, stuck.wait, 10)  # a thread the loop's close would wait for
        self.abandoned = True  # type: ignore[attr-defined]
        return 7

    def exit_now(code: int) -> None:
        exits.append((code, time.monotonic() - t0))
        stuck.set()
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    t0 = time.monotonic()
    with pytest.raises(SystemExit):
        serve_with(monkeypatch, state_dir, run)
    assert len(exits) == 1 and exits[0][0] == 7 and exits[0][1] < 5


def test_a_reload_that_fails_late_changes_nothing(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """The new file lowers the log level but the app secret's credential is gone: the reload fails as a whole, the old
    secret still works and info lines are still written."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "whatsapp-app-secret").write_text(SECRET)
    conf = tmp_path / "natalia.toml"
    conf.write_text('[logging]\nlevel = "info"\n')
    env = {"CREDENTIALS_DIRECTORY": str(creds), "WHATSAPP_APP_SECRET": "", "NATALIA_CONFIG": str(conf)}
    d = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
    conf.write_text('[logging]\nlevel = "error"\n')
    (creds / "whatsapp-app-secret").unlink()
    d.signal(signal.SIGHUP)
    assert "app secret" in d.event("reload_failed")["error"]
    failed_at = time.monotonic()
    assert d.post(body("wamid.RL1", PHONES[0], "sigo"))[0] == 200
    d.until(lambda: any(e.get("event") == "session_new" and e["_t"] > failed_at for e in d.events))
    assert d.stop() == 0


def whatsapp_env(graph_url: str) -> dict[str, str]:
    return {
        "WHATSAPP_ACCESS_TOKEN": "test-access-token",
        "WHATSAPP_PHONE_NUMBER_ID": "100000000000001",
        "WHATSAPP_GRAPH_URL": graph_url,
    }


def test_sigkill_between_the_claim_and_the_reply_gives_exactly_one_reply(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """Claude (a fake Messages API on loopback, driven by the real SDK) is asked and holds its answer; the daemon is
    killed. After the restart the acknowledged message is answered once, through the fake Graph API; a redelivery
    of it changes nothing."""
    from .fake_claude import FakeClaude
    from .fake_graph import FakeGraph

    with FakeClaude() as claude, FakeGraph() as graph:
        env = {**whatsapp_env(graph.url), "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": claude.url}
        d = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
        claude.hold()
        message = body("wamid.SK1", PHONES[0], "Hola")
        assert d.post(message)[0] == 200
        assert claude.wait_requests(1, timeout=20)
        d.kill()
        claude.release()
        again = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
        again.until(lambda: len(graph.sent_texts(to=PHONES[0])) == 1)
        assert again.post(message)[1] == {"messages": 0, "duplicates": 1, "statuses": 0}
        time.sleep(0.5)
        assert graph.sent_texts(to=PHONES[0]) == ["echo: Hola"]
        assert again.stop() == 0


def test_sigkill_between_the_reply_intent_and_its_send_sends_it_once(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """The reply is decided and durable, WhatsApp answers 500 (the client backs off); the daemon is killed. At start
    the recorded reply is sent (not a new one) and only once: no status of it comes (WhatsApp never took it), so
    after NATALIA_RESEND_WAIT it is sent again, with the same tag."""
    from .fake_graph import FakeGraph

    with FakeGraph() as graph:
        graph.script((500, {"error": {"code": 1, "message": "x"}}), (500, {"error": {"code": 1, "message": "x"}}))
        env = {**whatsapp_env(graph.url), "NATALIA_RESEND_WAIT": "1"}
        d = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
        assert d.post(body("wamid.SK2", PHONES[1], "Hola"))[0] == 200
        graph.wait_for(2, timeout=20)  # the read receipt and the first attempt at the text, both refused
        d.kill()
        again = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
        again.until(lambda: len(graph.sent_texts(to=PHONES[1])) == 1)
        time.sleep(0.5)
        texts = graph.sent_texts(to=PHONES[1])
        assert len(texts) == 1 and texts[0].startswith("¡Hola! Soy Natalia")
        tags = [r.json.get("biz_opaque_callback_data") for r in graph.requests if not r.is_read]
        assert len(tags) == 2 and tags[0] == tags[1] and tags[0].startswith("natalia-secure:")
        assert again.event("reply_part_unsure")["outcome"] == "unconfirmed"
        assert again.metric('natalia_reply_parts_unsure_total{outcome="unconfirmed"}') == 1
        assert again.stop() == 0


def test_a_part_whatsapp_took_before_a_sigkill_is_confirmed_by_its_status_and_not_sent_again(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """WhatsApp takes the reply's text but its answer never reaches the daemon, killed meanwhile: the "sent" record
    is missing. The text's "sent" status (Meta's webhook, carrying the tag it was sent with) fails against the dead
    daemon and is redelivered to the restarted one, which records the part as sent and does not send it again.
    The photos after it are sent once."""
    from .fake_graph import FakeGraph

    with FakeGraph() as graph:
        env = {**whatsapp_env(graph.url), "NATALIA_RESEND_WAIT": "30"}
        d = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
        graph.statuses_to(d.url + "/webhook", SECRET)
        graph.hold(reads=False)
        assert d.post(body("wamid.SK3", PHONES[3], "Quiero fotos de salado"))[0] == 200
        graph.wait_for(2, timeout=20)  # the read receipt (answered) and the text (held)
        d.kill()
        graph.release()  # WhatsApp took them: the text's status goes to the dead daemon, and is retried
        again = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
        graph.statuses_to(again.url + "/webhook")
        again.until(lambda: len(graph.sent_images(to=PHONES[3])) == 3)
        assert again.event("reply_part_unsure")["outcome"] == "confirmed"
        time.sleep(0.5)
        assert len(graph.sent_texts(to=PHONES[3])) == 1
        assert again.metric('natalia_reply_parts_unsure_total{outcome="confirmed"}') == 1
        assert again.stop() == 0


def test_an_expired_whatsapp_token_shows_in_health_and_a_reload_with_a_new_one_sends_the_reply(
    tmp_path, state_dir: str, master_key_file: str, daemons: list[DaemonProcess]
) -> None:  # type: ignore[no-untyped-def]
    """WhatsApp answers 190: /healthz says the token is invalid (the reply is kept, not dropped); with a new token
    from the credentials and SIGHUP, the customer's next message delivers the kept reply and its own."""
    from .fake_graph import FakeGraph, graph_error

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "whatsapp-access-token").write_text("old-token")
    with FakeGraph() as graph:
        graph.script(graph_error(190), graph_error(190))  # the read receipt, then the reply
        env = {**whatsapp_env(graph.url), "WHATSAPP_ACCESS_TOKEN": "", "CREDENTIALS_DIRECTORY": str(creds)}
        d = start(daemons, tmp_path, state_dir, master_key_file, env=env).wait_ready()
        assert d.post(body("wamid.T190", PHONES[2], "Hola"))[0] == 200
        d.until(lambda: d.request("/healthz")[0] == 503)
        assert b"access token is invalid" in d.request("/healthz")[1]
        assert d.event("whatsapp_token_invalid")
        (creds / "whatsapp-access-token").write_text("new-token")
        d.signal(signal.SIGHUP)
        d.event("reloaded")
        assert d.post(body("wamid.T191", PHONES[2], "¿Hola?"))[0] == 200
        d.until(lambda: len(graph.sent_texts(to=PHONES[2])) == 2)
        assert graph.requests[-1].headers["Authorization"] == "Bearer new-token"
        assert d.request("/healthz")[0] == 200
        assert d.stop() == 0
