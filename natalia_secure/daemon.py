"""`natalia-secure serve`: the daemon's lifecycle around the store, the webhook and systemd.

Start (the order is the guarantee): open the store (snapshot chain + journal replay; a store that refuses to open
ends the process with its documented exit code, before anything listens), listen, then READY=1. Systemd therefore
shows "activating" until every acknowledged message is back in memory.

Running: the webhook (web.py / intake.py), replies one at a time per phone (replies.py), periodic snapshots,
backups and retention (maintenance.py), STATUS= every few seconds, WATCHDOG=1 from the event loop only while the
store is healthy (systemd.py): a hung loop or a store that stays degraded gets the process restarted by systemd.

SIGTERM / SIGINT: STOPPING=1; new webhooks get 503 (Meta retries); the POSTs in flight finish acknowledging;
replies in progress get a few seconds; a final snapshot ("saving before shutdown", as the legacy bot logged); exit 0
(7 if that snapshot could not be written: every acknowledged message is durable in the journal even then).
Everything is bounded by `stop_timeout_s` (15 s by default, inside systemd's 20 s TimeoutStopSec).
SIGHUP: RELOADING=1, re-read the configuration file, credentials and keyring (and the master key), READY=1; a bad
configuration is logged and the old one kept. Settings that shape the process (listen, state_dir, durability,
reply_concurrency) need a restart, and the log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TextIO

import structlog
import tornado.httpserver
import tornado.netutil
import uvloop

from . import admin, backups, catalog, config, logs, masterkey, web
from .assistant import Assistant
from .control import ControlServer, Handler
from .errors import ConfigError, NataliaError
from .intake import Intake, WebhookSecrets
from .maintenance import Maintenance, MaintenancePolicy
from .metrics import Metrics
from .natalia import OfflineNatalia
from .replies import Conversations, LogOutbox, Outbox, TerminalOutbox
from .store import Store, StoreOptions
from .systemd import Notifier, Watchdog
from .web import Deps, Health, make_app
from .whatsapp import MAX_BODY

log = structlog.get_logger("natalia_secure.daemon")

STATUS_EVERY_S = 5.0
STALL_S = 5.0  # a journal write running longer than this (fsync ~0.2 ms, DESIGN.md) means a hung disk: unhealthy
PSEUDONYM_PURPOSE = "log pseudonyms"
# Settings read once at start; a reload that changes them says a restart is needed.
RESTART_ONLY = (
    "state_dir",
    "listen",
    "durability",
    "reply_concurrency",
    "resend_wait_s",
    # the assistant and the outbox are built at start (the WhatsApp access token alone is applied on reload)
    "anthropic_api_key",
    "anthropic_base_url",
    "model",
    "persona_file",
    "history_budget",
    "max_tokens",
    "claude_timeout_s",
    "catalog_file",
    "fallback_message",
    "outbox",
    "typing_indicator",
    "phone_number_id",
    "graph_url",
    "api_version",
)


def master_key_path(cfg: config.Config, explicit: str | None, environ: Mapping[str, str]) -> str:
    """--master-key, else NATALIA_MASTER_KEY_FILE / natalia.master_key_file, else the systemd credential."""
    return masterkey.locate(explicit or cfg.master_key_file, dict(environ))


def tune_gc() -> None:
    """The cyclic garbage collector, tuned for a server that allocates many short-lived, acyclic objects (parsed
    webhooks, session dicts; reference counting frees them): everything loaded at start is moved out of its sight
    (gc.freeze), and a collection waits for 50,000 new container objects instead of 700. Measured with
    bench/webhook.py: with the default thresholds serve ran at 0.40x of the bare handler (p99 52 ms), with these at
    0.45x-0.53x (p99 34-37 ms) in two full runs. Cycles (tracebacks, futures) are still collected, in larger
    batches; a larger first threshold (100,000) measured no better."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def webhook_secrets(cfg: config.Config) -> WebhookSecrets:
    cfg.require("app_secret", "verify_token", purpose="serve")
    assert cfg.app_secret is not None and cfg.verify_token is not None
    return WebhookSecrets(cfg.app_secret.encode(), cfg.verify_token)


def make_assistant(cfg: config.Config, photos: catalog.Catalog, metrics: Metrics) -> Assistant:
    """Claude when an Anthropic API key is set, else the offline Natalia (natalia.py)."""
    if not cfg.anthropic_api_key:
        return OfflineNatalia(photos)
    from . import claude  # imported only when used: the SDK costs ~0.5 s of start time

    return claude.ClaudeAssistant(
        api_key=cfg.anthropic_api_key,
        model=cfg.model,
        persona=claude.load_persona(cfg.persona_file),
        catalog=photos,
        metrics=metrics,
        base_url=cfg.anthropic_base_url,
        max_tokens=cfg.max_tokens,
        timeout=cfg.claude_timeout_s,
        budget_chars=cfg.history_budget,
        fallback=cfg.fallback_message or claude.FALLBACK_TEXT,
    )


def outbox_kind(cfg: config.Config, terminal: bool) -> str:
    if cfg.outbox != "auto":
        return cfg.outbox
    if cfg.access_token and cfg.phone_number_id:
        return "whatsapp"
    if cfg.access_token or cfg.phone_number_id:  # half set: surely a mistake, not a wish to only log replies
        cfg.require("access_token", "phone_number_id", purpose="sending through WhatsApp")
    # printing conversations is for a person at a terminal, never into the journal (guarantee 4)
    return "terminal" if terminal else "log"


def make_outbox(cfg: config.Config, metrics: Metrics, terminal: bool) -> Outbox:
    kind = outbox_kind(cfg, terminal)
    if kind == "whatsapp":
        cfg.require("access_token", "phone_number_id", purpose="sending through WhatsApp")
        assert cfg.access_token is not None and cfg.phone_number_id is not None
        from .graph import GraphClient

        return GraphClient(cfg.graph_url, cfg.api_version, cfg.phone_number_id, cfg.access_token, metrics)
    return TerminalOutbox() if kind == "terminal" else LogOutbox()


def maintenance_policy(cfg: config.Config) -> MaintenancePolicy:
    return MaintenancePolicy(
        snapshot_every_s=cfg.snapshot_interval_s,
        backup_every_s=cfg.backup_interval_s,
        retention=backups.Retention(cfg.keep_last, cfg.keep_hourly, cfg.keep_daily, cfg.keep_weekly, cfg.keep_monthly),
        inactive_days=cfg.inactive_days or None,
    )


class Daemon:
    def __init__(
        self,
        cfg: config.Config,
        *,
        config_path: str | None = None,
        master_key: str | None = None,
        environ: Mapping[str, str] | None = None,
        stream: TextIO | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        webhook_secrets(cfg)  # refuse to start without them, before anything is opened
        self.cfg = cfg
        self.catalog = catalog.load(cfg.catalog_file)
        self.outbox_kind = outbox_kind(cfg, sys.stderr.isatty())
        if self.outbox_kind == "whatsapp":
            cfg.require("access_token", "phone_number_id", purpose="sending through WhatsApp")
        self.config_path = config_path
        self.explicit_key = master_key
        self.environ = environ if environ is not None else {}
        self.overrides = dict(overrides or {})  # command-line options, which a reload must not undo
        self.stream = stream or sys.stdout
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.stop_requested = asyncio.Event()
        self.stopping = False
        self.reload_error: str | None = None
        self.address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget work, referenced until done (asyncio docs)
        self.abandoned = False  # the stop ran out of time with the disk still busy: exit without waiting for it

    # ---- start ----

    def _open_store(self) -> Store:
        master = masterkey.read_key_file(master_key_path(self.cfg, self.explicit_key, self.environ))
        store = Store.open(self.cfg.state_dir, master, StoreOptions(durability=self.cfg.durability))
        logs.set_pseudonym_key(master.derive(PSEUDONYM_PURPOSE))
        return store

    def _listen(self, app: tornado.web.Application) -> web.HTTPServer:
        host, port = self.cfg.listen
        try:
            sockets = tornado.netutil.bind_sockets(port, host, family=socket.AF_UNSPEC)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        # Chunked bodies are cut at 4 MB by Tornado; our handler answers 413 from 3 MB on (web.py).
        # Timeouts so a client cannot hold connections and buffers open: Meta sends a webhook in one go (web.py:
        # a connection's idle timeout and a webhook body's are swept deadlines, other bodies keep Tornado's).
        server = web.HTTPServer(
            app, max_body_size=MAX_BODY + 1024 * 1024, xheaders=False, body_timeout=30, idle_timeout=web.IDLE_TIMEOUT_S
        )
        server.add_sockets(sockets)
        bound = sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        return server

    async def run(self) -> int:
        started = time.monotonic()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before READY would kill us (SIGHUP's default action)
        store = self._open_store()
        tune_gc()
        try:
            return await self._serve(store, started)
        finally:
            if not self.abandoned:
                store.close()  # idempotent after aclose(); on an error path it releases the lock

    async def _serve(self, store: Store, started: float) -> int:
        self.store = store
        stats = store.stats()
        log.info(
            "sessions_loaded",  # the legacy "sessions loaded" line, with counts
            sessions=stats["sessions"],
            generation=stats["generation"],
            lsn=stats["lsn"],
            claims=stats["claims"],
            dropped_torn_tails=stats["dropped_torn_tails"],
            seconds=round(time.monotonic() - started, 3),
        )
        metrics = self.metrics
        store.observe_journal_write = metrics.journal_write.observe
        self.assistant = make_assistant(self.cfg, self.catalog, metrics)
        self.outbox = make_outbox(self.cfg, metrics, sys.stderr.isatty())
        self.conversations = Conversations(
            store,
            self.assistant,
            self.outbox,
            metrics,
            self.catalog,
            self.cfg.reply_concurrency,
            typing=self.cfg.typing_indicator,
            resend_wait=self.cfg.resend_wait_s,
        )
        self.intake = Intake(store, self.conversations, metrics, webhook_secrets(self.cfg))
        self.maintenance = Maintenance(store, maintenance_policy(self.cfg), observe=metrics.observe)
        store.on_degraded = self._degraded
        self.maintenance.on_recovered = self._notify_status  # STATUS= says serving again at once, not 5 s later
        metrics.gauge("natalia_sessions", "Sessions in the store", lambda: len(store))
        metrics.gauge("natalia_store_degraded", "1 while the store refuses changes", lambda: 1.0 if store.degraded else 0.0)
        metrics.gauge("natalia_snapshot_age_seconds", "Since the last snapshot (or start)", self._snapshot_age)
        metrics.gauge("natalia_replies_pending", "Accepted messages not yet answered", lambda: self.conversations.pending)

        server = self._listen(make_app(Deps(self.intake, metrics, self.health)))
        self.control = ControlServer(store.state_dir, {name: self._admin(name, op) for name, op in admin.OPERATIONS.items()})
        await self.control.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        assert self.address is not None
        log.info("listening", host=self.address[0], port=self.address[1])

        maintenance_stop = asyncio.Event()
        maintenance = asyncio.create_task(self.maintenance.run(maintenance_stop))
        self._tell("READY=1", f"STATUS={self.status_line()}")
        watchdog = Watchdog(self.notifier, self.store_healthy)
        metrics.gauge("natalia_watchdog_pings", "WATCHDOG=1 sent to systemd since start", lambda: watchdog.pings)
        watchdog.start()
        status = asyncio.create_task(self._status_loop())
        log.info(
            "natalia_ready",
            assistant="claude" if self.cfg.anthropic_api_key else "offline",
            model=self.cfg.model if self.cfg.anthropic_api_key else None,
            outbox=self.outbox_kind,
            albums=len(self.catalog.albums),
        )
        resume = asyncio.create_task(self.conversations.resume())  # unanswered messages from before the start
        try:
            await self.stop_requested.wait()
            resume.cancel()
            return await self._shutdown(server, maintenance, maintenance_stop)
        finally:
            status.cancel()
            for client in (self.outbox, self.assistant):
                closer = getattr(client, "aclose", None)
                if closer is not None:
                    with contextlib.suppress(Exception):  # closing HTTP clients at exit: nothing left to save
                        await closer()
            watchdog.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    # ---- running ----

    def _admin(self, name: str, operation: admin.Operation) -> Handler:
        """An admin command from the control socket, run on our own store (logged by name: its arguments may be a
        phone number)."""

        async def handler(args: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
            started = time.monotonic()
            try:
                result = await operation(self.store, args, progress)
            except BaseException as exc:
                log.warning("admin_command_failed", command=name, error_type=type(exc).__name__)
                raise
            log.info("admin_command", command=name, seconds=round(time.monotonic() - started, 3))
            self._notify_status()
            return result

        return handler

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _degraded(self, reason: str) -> None:
        log.error("store_degraded", reason=reason)
        self.maintenance.wake()  # the first recovery attempt now, then every retry_s
        self._notify_status()

    def _notify_status(self) -> None:
        self._tell(f"STATUS={self.status_line()}")

    def _tell(self, *assignments: str) -> None:
        """sd_notify, never fatal: without its socket the daemon still serves (systemd's timeouts are the judge)."""
        try:
            # one line each: a newline would end the assignment early (and is refused by the notifier)
            self.notifier.notify(*(" ".join(a.splitlines()) for a in assignments))
        except OSError as exc:
            log.error("notify_failed", error=str(exc), sent=[a.split("=", 1)[0] for a in assignments])

    def _snapshot_age(self) -> float:
        last = self.store.last_snapshot_ms or self.maintenance.status()["last_snapshot_ms"]
        return max(0.0, (self.store.clock() - last) / 1000)

    def health(self) -> Health:
        store = self.store
        details = {"sessions": len(store), "generation": store.generation, "snapshot_age_s": round(self._snapshot_age(), 1)}
        if self.stopping:
            return Health(False, "stopping", "shutting down", details)
        problem = self.store_problem()
        if problem:
            return Health(False, "degraded", f"store: {problem}", details)
        if getattr(self.outbox, "token_invalid", False):
            return Health(
                False, "degraded", "whatsapp: the access token is invalid or expired (set a new one and reload)", details
            )
        return Health(True, "ok", None, details)

    def store_problem(self) -> str | None:
        if self.store.degraded:
            return self.store.degraded
        stalled = self.store.stalled_s()
        if stalled > STALL_S:
            return f"a journal write has not finished for {stalled:.0f} s (is the disk hung?)"
        return None

    def store_healthy(self) -> bool:
        """The watchdog's condition (checked on the event loop, so a hung loop sends nothing either)."""
        return self.store_problem() is None

    def status_line(self) -> str:
        """What `systemctl status` shows (STATUS=): one line, no personal data."""
        store = self.store
        if self.stopping:
            return "stopping: finishing acknowledgements and the final snapshot"
        problem = self.store_problem()
        if problem:
            return f"DEGRADED, answering 503 and retrying: {problem}"
        age = int(self._snapshot_age())
        host, port = self.address or ("?", 0)
        text = (
            f"serving {host}:{port}: {len(store)} sessions, {self.intake.received} messages received since start, "
            f"snapshot g{store.generation:06d} {age} s ago"
        )
        return f"{text}; last reload failed: {self.reload_error}" if self.reload_error else text

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            self._notify_status()

    async def reload(self) -> None:
        if self.stopping:
            return  # RELOADING/READY after STOPPING would tell systemd we are back
        # sd_notify(3): RELOADING=1 goes with MONOTONIC_USEC= (Type=notify-reload waits for it)
        self._tell("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            # Everything that can fail first; then the switch, so a failed reload changes nothing.
            new = dataclasses.replace(config.load(self.config_path, self.environ), **self.overrides)
            master = masterkey.read_key_file(master_key_path(new, self.explicit_key, self.environ))
            secrets, policy = webhook_secrets(new), maintenance_policy(new)
            self.store.reload_keyring(master)  # loads, then switches
            logs.configure(
                fmt=new.log_format, level=new.log_level, stream=self.stream, pseudonym_key=master.derive(PSEUDONYM_PURPOSE)
            )
            self.intake.secrets, self.maintenance.policy = secrets, policy
            set_token = getattr(self.outbox, "set_token", None)  # the WhatsApp client (graph.py)
            if set_token is not None and new.access_token:
                set_token(new.access_token)
                self._spawn(self.conversations.resume())  # replies kept while the token was refused
            ignored = [name for name in RESTART_ONLY if getattr(new, name) != getattr(self.cfg, name)]
            self.cfg = dataclasses.replace(new, **{name: getattr(self.cfg, name) for name in RESTART_ONLY})
            self.reload_error = None
            log.info("reloaded", keyring_primary=self.store.keyring.primary.id, restart_needed_for=ignored or None)
        except (NataliaError, OSError) as exc:
            self.reload_error = str(exc)
            log.error("reload_failed", error=str(exc))
        self._tell("READY=1", f"STATUS={self.status_line()}")

    # ---- stop ----

    async def _shutdown(
        self, server: tornado.httpserver.HTTPServer, maintenance: asyncio.Task[None], maintenance_stop: asyncio.Event
    ) -> int:
        deadline = time.monotonic() + self.cfg.stop_timeout_s
        self.stopping = True
        self.intake.stopping = True
        self._tell("STOPPING=1", f"STATUS={self.status_line()}")
        log.info("stopping", inflight=self.intake.inflight, replies_pending=self.conversations.pending)
        server.stop()  # no new connections; requests on open ones get 503 from the intake
        # an admin command in progress finishes (each of its steps is atomic, so a cut-off one is rerun later)
        await self.control.close(timeout=max(0.1, min(10.0, deadline - time.monotonic() - 5)))
        while self.intake.inflight and time.monotonic() < deadline - 2:
            await asyncio.sleep(0.01)
        left = await self.conversations.close(timeout=max(0.0, min(5.0, deadline - time.monotonic() - 2)))
        if left:
            log.warning("replies_left_unanswered", count=left)  # durable and claimed: answered by resume (issue 4)
        maintenance_stop.set()
        code = 0
        try:
            # Each step waits on the disk; together they get what is left of stop_timeout_s. Running out means the
            # disk hangs: every acknowledged message is already fsynced, so exit (7) rather than be SIGKILLed.
            await asyncio.wait_for(maintenance, max(0.1, deadline - time.monotonic()))
            log.info("saving_before_shutdown", sessions=len(self.store))
            try:
                generation = await asyncio.wait_for(
                    self.store.snapshot_async(full=bool(self.store.degraded)), max(0.1, deadline - time.monotonic())
                )
                log.info("snapshot", generation=generation, sessions=len(self.store), final=True)
            except (NataliaError, OSError) as exc:
                code = 7
                log.error("final_snapshot_failed", error=str(exc), degraded=self.store.degraded)
            await asyncio.wait_for(self.store.aclose(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            code, self.abandoned = 7, True
            log.error("stop_timed_out", stop_timeout_s=self.cfg.stop_timeout_s)
        await server.close_all_connections()
        log.info("stopped", exit_code=code, seconds_left=round(deadline - time.monotonic(), 2))
        return code


def serve(
    cfg: config.Config,
    config_path: str | None,
    environ: Mapping[str, str],
    *,
    master_key: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> int:
    """The `serve` command: logs, then the daemon on a fresh event loop: uvloop's (libuv), whose callbacks and
    readiness handling are C where asyncio's are Python: 9% fewer instructions per webhook (bench/README.md)."""
    daemon = Daemon(cfg, config_path=config_path, master_key=master_key, environ=environ, overrides=overrides)
    logs.configure(fmt=cfg.log_format, level=cfg.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(daemon.run())
        if daemon.abandoned:  # a thread is stuck in the kernel on a hung disk: closing the loop (it waits for its
            sys.stdout.flush()  # executor's threads) or the interpreter's exit (it joins them) would wait forever
            os._exit(code)
    return code
