"""Natalia's side of a conversation, as the daemon schedules it: one reply at a time per phone, in arrival order;
different phones concurrently, at most `concurrency` at once.

A customer message is handed over (`submit`) as soon as it is in the journal; its reply waits until the message is
durable (a reply to a message a crash could still lose would answer something we do not have). While the store is
degraded the wait is retried, so a message accepted just before a fault is answered once the store recovers.

Replies go through two small interfaces so the inbound path is complete and testable on its own:
- `Assistant.reply(phone, session, inbound)` -> the text to answer, or None for no answer (Claude in claude.py later;
  `OfflineAssistant` here: deterministic, no network);
- `Outbox.send_text(phone, text, reply_to)` -> delivers it (the WhatsApp Cloud API later; `LogOutbox` here: logs
  that a reply was sent, never its text).
The reply is recorded in the session (role "assistant") and made durable before it is sent, so the history
Natalia sees next time, after a crash too, holds everything the customer was sent. A failure of either side is
logged without content, counted, and never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Protocol

import structlog

from . import sessions
from .errors import NataliaError, NotFoundError, StoreUnavailable
from .metrics import Metrics
from .store import Store
from .whatsapp import Inbound

log = structlog.get_logger("natalia_secure.replies")

DEGRADED_RETRY_S = 1.0  # how often a reply waiting on a degraded store looks again (maintenance retries every 10 s)


class Assistant(Protocol):
    async def reply(self, phone: str, session: sessions.Session, inbound: Inbound) -> str | None: ...


class Outbox(Protocol):
    async def send_text(self, phone: str, text: str, reply_to: str | None) -> None: ...


class OfflineAssistant:
    """A deterministic Natalia that needs no network: greets a new customer, then acknowledges each message."""

    async def reply(self, phone: str, session: sessions.Session, inbound: Inbound) -> str | None:
        users = sum(1 for m in session["messages"] if m["role"] == "user")
        if users <= 1:
            return "¡Hola! Soy Natalia 😊 ¿En qué te puedo ayudar hoy?"
        return "Gracias por tu mensaje. Lo he anotado y te respondo enseguida."


class LogOutbox:
    """Sends nothing: logs each reply (length only) and counts them. For running without WhatsApp credentials."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_text(self, phone: str, text: str, reply_to: str | None) -> None:
        self.sent += 1
        log.info("reply_sent", phone=phone, chars=len(text), outbox="log")


class Conversations:
    def __init__(
        self,
        store: Store,
        assistant: Assistant,
        outbox: Outbox,
        metrics: Metrics,
        concurrency: int = 32,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.assistant = assistant
        self.outbox = outbox
        self.metrics = metrics
        self.clock = clock or store.clock
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[str, deque[tuple[Inbound, int]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    @property
    def pending(self) -> int:
        """Messages accepted and not yet answered."""
        return sum(len(q) for q in self._queues.values())

    def submit(self, inbound: Inbound, lsn: int) -> None:
        """Answer `inbound` (whose record is `lsn`) after the phone's earlier messages, once it is durable."""
        queue = self._queues.setdefault(inbound.phone, deque())
        queue.append((inbound, lsn))
        if inbound.phone not in self._workers:
            self._workers[inbound.phone] = asyncio.create_task(self._work(inbound.phone))

    async def _work(self, phone: str) -> None:
        queue = self._queues[phone]
        try:
            while queue:
                inbound, lsn = queue[0]
                if not await self._durable(lsn):
                    return  # closing: left for the restart to find (claimed, no reply yet)
                async with self._slots:
                    await self._answer(phone, inbound)
                queue.popleft()
        finally:
            if not queue:
                del self._queues[phone]
            del self._workers[phone]

    async def _durable(self, lsn: int) -> bool:
        while True:
            try:
                await self.store.wait_durable(lsn)
                return True
            except StoreUnavailable:
                if self._closing:
                    return False
                await asyncio.sleep(DEGRADED_RETRY_S)

    async def _answer(self, phone: str, inbound: Inbound) -> None:
        try:
            session = self.store.get(phone)
        except NotFoundError:  # forgotten (purged) between acceptance and reply: nothing to answer
            return
        try:
            text = await self.assistant.reply(phone, session, inbound)
            if not text:
                self.metrics.replies.labels("none").inc()
                return
            # durable before it is sent: what the customer reads is always in the history a restart loads
            await self.store.wait_durable(self.store.add_message(phone, "assistant", text, self.clock()))
            await self.outbox.send_text(phone, text, inbound.id)
        except asyncio.CancelledError:
            raise
        except (NataliaError, OSError) as exc:
            self.metrics.replies.labels("failed").inc()
            log.error("reply_failed", phone=phone, error_type=type(exc).__name__, error=str(exc))
            return
        except Exception as exc:  # an assistant or outbox bug must not end this phone's conversation
            self.metrics.replies.labels("failed").inc()
            log.exception("reply_failed", phone=phone, error_type=type(exc).__name__)
            return
        self.metrics.replies.labels("sent").inc()

    async def close(self, timeout: float) -> int:
        """Let replies in progress finish for up to `timeout` seconds, then cancel the rest; returns how many
        accepted messages were left unanswered (they are durable and claimed: the restart sees them)."""
        self._closing = True
        workers = list(self._workers.values())
        if workers:
            _, late = await asyncio.wait(workers, timeout=timeout)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = self.pending
        self._queues.clear()
        return left
