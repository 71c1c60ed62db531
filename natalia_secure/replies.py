"""Natalia's side of a conversation, as the daemon schedules it: one reply at a time per phone, in arrival order;
different phones concurrently, at most `concurrency` at once.

A customer message is handed over (`submit`) as soon as it is in the journal; the reply waits until the message is
durable (never answer what a crash could still lose) — retrying while the store is degraded. Messages that arrive
while a reply is being made are answered together by the next one: a reply answers every user message after the
newest assistant message (assistant.pending_user_text).

The reply state is in the journal, so a crash never loses a reply and repeats at most one message
(README, "Replies after a crash"):
    claimed   the user message and its wamid, one record (intake.py)
    intent    the assistant message (its readable record), the photo progress and the parts to send, one record,
              made durable before anything is sent: `meta.pending = {parts, reply_to, id, run}`
    sent      after each part WhatsApp accepted, `meta.sent_parts` moves on; after the last, `pending` is removed
At start (`resume`), every session within the 24-hour window whose reply is pending is finished, and every one
whose newest message is from the customer is answered — once.

A crash between a part's send and its "sent" record leaves the part unsure: WhatsApp may have it. Each part is sent
with a tag (`part_tag`: the reply's random id and the part's index, nothing personal) that WhatsApp echoes in the
message's statuses (biz_opaque_callback_data). A status of a part not recorded as sent records it (`confirm`,
before the status is acknowledged). Each part is sent only once the record of the one before is durable, so a crash
leaves at most one part unsure: the next one of a pending reply recorded by an earlier process ("run"). Before
finishing such a reply, its conversation waits up to `resend_wait` seconds, holding no slot, for that part's status
(Meta redelivers the ones the crash left unacknowledged), and sends it again only if none came.

WhatsApp accepts free-form messages only within 24 hours of the customer's last message: outside it a pending
reply is dropped (counted). A send refused for good (window closed, undeliverable, rejected) drops the reply; one
that failed for now (token, rate limit, server, network: after graph.py's retries) stays pending and is retried at
the customer's next message or the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TextIO

import structlog

from . import sessions
from .assistant import Assistant, Outgoing, PhotoTool, pending_user_text, record_text
from .catalog import Catalog
from .deadlines import Deadlines
from .errors import NataliaError, NotFoundError, SendError, StoreUnavailable
from .metrics import Metrics
from .store import Store

log = structlog.get_logger("natalia_secure.replies")
_debug_logger = logging.getLogger("natalia_secure.replies")  # a cheap level check for the per-part line (intake.py)

DEGRADED_RETRY_S = 1.0  # how often a reply waiting on a degraded store looks again (maintenance retries every 10 s)
WINDOW_MS = 24 * 3600 * 1000  # WhatsApp's customer service window
TURN_TIMEOUT_S = 300.0  # a whole turn (Claude's tool rounds, WhatsApp's retries): beyond it, give the slot back
DROP_KINDS = ("window_closed", "undeliverable", "rejected")  # graph.SendError kinds that no retry will fix
RESEND_WAIT_S = 20.0  # after a start, how long an unsure part waits for WhatsApp's status before it is sent again
TAG_PREFIX = "natalia-secure:"


def part_tag(reply_id: str, index: int) -> str:
    """What part `index` of a reply is sent with, and its statuses echo."""
    return f"{TAG_PREFIX}{reply_id}.{index}"


def parse_tag(tag: str) -> tuple[str, int] | None:
    """(reply id, part index) of one of our tags; None for anything else (another sender's, or none)."""
    if not tag.startswith(TAG_PREFIX):
        return None
    reply_id, _, index = tag[len(TAG_PREFIX) :].rpartition(".")
    if not reply_id or not index.isascii() or not index.isdigit() or len(index) > 6:
        return None
    return reply_id, int(index)


class Outbox(Protocol):
    """Where parts go. One whose messages' statuses echo the tag they were sent with (WhatsApp) also has
    `echoes_tags = True`, and takes `tag=`."""

    async def send(self, to: str, part: Outgoing, reply_to: str | None = None, tag: str | None = None) -> str: ...

    async def mark_read(self, message_id: str, typing: bool = False) -> None: ...


class LogOutbox:
    """Sends nothing: logs that a part went out (its kind and length, never its content). No WhatsApp credentials
    and no terminal: a daemon that would otherwise print conversations into the journal."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, to: str, part: Outgoing, reply_to: str | None = None, tag: str | None = None) -> str:
        self.sent += 1
        if _debug_logger.isEnabledFor(logging.DEBUG):
            log.debug("reply_part_logged", phone=to, kind="image" if part.image else "text", chars=len(part.text or ""))
        return f"logged.{self.sent}"

    async def mark_read(self, message_id: str, typing: bool = False) -> None:
        return None


class TerminalOutbox:
    """Prints what would be sent, for a person at a terminal (the demo; `NATALIA_OUTBOX=terminal`)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.sent = 0

    async def send(self, to: str, part: Outgoing, reply_to: str | None = None, tag: str | None = None) -> str:
        self.sent += 1
        if part.image is not None:
            where = part.image.link or f"media {part.image.media_id}"
            line = f"📷 {part.image.caption or ''} <{where}>".replace("  ", " ")
        else:
            line = (part.text or "").replace("\n", "\n" + " " * 24)
        self.stream.write(f"  Natalia → {to}: {line}\n")
        self.stream.flush()
        return f"terminal.{self.sent}"

    async def mark_read(self, message_id: str, typing: bool = False) -> None:
        return None


def _newer_than(messages: list[dict[str, Any]], last_seen: dict[str, Any]) -> int | None:
    """How many messages follow `last_seen` (searched from the end): those added since it was read; None if it is
    gone (the session was forgotten, or 250 newer messages pushed it out)."""
    for k, message in enumerate(reversed(messages)):
        if message == last_seen:
            return k
    return None


class Conversations:
    def __init__(
        self,
        store: Store,
        assistant: Assistant,
        outbox: Outbox,
        metrics: Metrics,
        catalog: Catalog,
        concurrency: int = 32,
        *,
        typing: bool = False,
        clock: Callable[[], int] | None = None,
        resend_wait: float = RESEND_WAIT_S,
    ) -> None:
        self.store = store
        self.assistant = assistant
        self.outbox = outbox
        self.metrics = metrics
        self.catalog = catalog
        self.typing = typing
        self.clock = clock or store.clock
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[str, deque[tuple[str | None, int]]] = {}  # phone -> (wamid or None for a resume, lsn)
        self._workers: dict[str, asyncio.Task[None]] = {}
        # phone -> (reply id, parts WhatsApp took) whose "sent" record the store could not take (degraded): never
        # sent twice meanwhile
        self._sent_upto: dict[str, tuple[str | None, int]] = {}
        self._closing = False
        self._tags = bool(getattr(outbox, "echoes_tags", False))
        self.resend_wait = resend_wait
        self._run = secrets.token_hex(4)  # this process's, in the replies it records: others' are an earlier run's
        self._settled: set[str] = set()  # ids of an earlier run's replies whose unsure part is settled
        self._unsure: dict[str, asyncio.Event] = {}  # phone -> set when a status settles its unsure part
        self._turn_deadlines = Deadlines()
        self._late: set[str] = set()  # phones whose turn the deadline cancelled

    @property
    def pending(self) -> int:
        """Messages accepted and not yet answered."""
        return sum(len(q) for q in self._queues.values())

    def submit(self, phone: str, message_id: str | None, lsn: int) -> None:
        """Answer the phone's messages up to record `lsn` (after its earlier ones), once it is durable."""
        if self._closing:
            return  # stopping: the message is durable and claimed, and the next start answers it
        self._queues.setdefault(phone, deque()).append((message_id, lsn))
        if phone not in self._workers:
            self._workers[phone] = asyncio.create_task(self._work(phone))

    async def _work(self, phone: str) -> None:
        queue = self._queues[phone]
        try:
            while queue:
                batch = list(queue)  # everything queued so far is answered by one reply
                if not await self._durable(max(lsn for _, lsn in batch)):
                    return  # closing: left for the restart to find (claimed, not answered)
                inherited = self._inherited(phone)
                if inherited is not None and not await self._settle(phone, inherited):
                    return  # closing: the next start settles it
                async with self._slots:
                    # An outage upstream must not hold a slot for ever: a turn past TURN_TIMEOUT_S is cancelled (a
                    # swept deadline, not asyncio.timeout: deadlines.py) and counts as failed; the next turn retries.
                    task = asyncio.current_task()
                    assert task is not None
                    self._turn_deadlines.set(phone, TURN_TIMEOUT_S, functools.partial(self._too_long, phone, task))
                    try:
                        done = await self._turn(phone, next((m for m, _ in reversed(batch) if m), None))
                    except asyncio.CancelledError:
                        if phone not in self._late:  # not ours: the daemon is stopping
                            raise
                        self._late.discard(phone)
                        if task.uncancel():  # ours, and the daemon is stopping too
                            raise
                        self.metrics.reply("failed")
                        log.error("reply_failed", phone=phone, error_type="TimeoutError", timeout_s=TURN_TIMEOUT_S)
                        done = True
                    finally:
                        self._turn_deadlines.clear(phone)
                        if phone in self._late:  # our cancel was swallowed inside the turn: take it back, as
                            self._late.discard(phone)  # asyncio.timeout does, or the next one would look foreign
                            task.uncancel()
                if not done:  # the store could not record the reply: try again once it has recovered
                    if self._closing:
                        return
                    await asyncio.sleep(DEGRADED_RETRY_S)
                    continue
                for _ in batch:
                    queue.popleft()
        finally:
            if not queue:
                self._queues.pop(phone, None)
            self._workers.pop(phone, None)

    def _too_long(self, phone: str, task: asyncio.Task[None]) -> None:
        self._late.add(phone)
        task.cancel()

    def _inherited(self, phone: str) -> str | None:
        """The id of the phone's pending reply if an earlier run recorded it and its unsure part is not settled."""
        if not self._tags or phone not in self.store:
            return None
        pending = self.store.view(phone).get(sessions.META, {}).get("pending")
        if not pending or not pending.get("id") or pending.get("run") == self._run or pending["id"] in self._settled:
            return None
        return str(pending["id"])

    async def _settle(self, phone: str, reply_id: str) -> bool:
        """Wait, holding no slot, until a status says the unsure part reached WhatsApp (`confirm` recorded it) or
        `resend_wait` passes (it is sent again) — a wait that starts again if it ends while the store refuses
        records (statuses get 503 then, and Meta redelivers them). False if the daemon is stopping meanwhile."""
        event = self._unsure.setdefault(phone, asyncio.Event())
        outcome = "confirmed"
        try:
            while not event.is_set():
                try:
                    async with asyncio.timeout(self.resend_wait):
                        await event.wait()
                except TimeoutError:
                    if self._closing:
                        return False
                    if not self.store.degraded:
                        outcome = "unconfirmed"
                        break
        finally:
            self._unsure.pop(phone, None)
        self._settled.add(reply_id)
        self.metrics.unsure_parts.labels(outcome).inc()
        log.info("reply_part_unsure", phone=phone, outcome=outcome)
        return True

    def confirm(self, phone: str, tag: str) -> bool:
        """A status (sent, delivered, read) of a message we sent with `tag`: if its part is not recorded as sent
        yet, record it (and those before it: parts go one after the other, each once the one before was taken), in
        whatever order statuses come. True if a record was appended. (The intake answers the status only once
        everything appended is durable, this record or the reply's own.)"""
        parsed = parse_tag(tag)
        if parsed is None or phone not in self.store:
            return False
        reply_id, index = parsed
        state = self.store.view(phone).get(sessions.META, {})
        pending = state.get("pending") or {}
        if pending.get("id") != reply_id or int(state.get("sent_parts") or 0) > index or index >= len(pending["parts"]):
            return False  # another reply's, or recorded already
        last = index + 1 == len(pending["parts"])
        self.store.set_meta(phone, {"pending": None, "sent_parts": None} if last else {"sent_parts": index + 1})
        if pending.get("run") != self._run:  # an earlier run's: this was its one unsure part (module docstring)
            self._settled.add(reply_id)
            if phone in self._unsure:
                self._unsure[phone].set()
        return True

    async def _durable(self, lsn: int) -> bool:
        while True:
            try:
                await self.store.wait_durable(lsn)
                return True
            except StoreUnavailable:
                if self._closing:
                    return False
                await asyncio.sleep(DEGRADED_RETRY_S)

    async def _turn(self, phone: str, reply_to: str | None) -> bool:
        """Finish a pending reply, then answer what is new (if anything). False: the store is degraded, nothing was
        sent that is not recorded, and the turn is to be tried again."""
        try:
            if self.store.degraded:
                return False  # nothing can be recorded: do not ask the assistant (a billed call) until it recovers
            try:
                if self.store.view(phone).get(sessions.META, {}).get("pending"):
                    await self._deliver(phone)
                    if self.store.view(phone).get(sessions.META, {}).get("pending"):
                        return True  # still not sent: it goes first, at the next message or start; no new reply
                view = self.store.view(phone)
            except NotFoundError:  # forgotten (purged) between acceptance and reply: nothing to answer
                return True
            # a consistent snapshot without a JSON copy: messages are never changed in place, only appended or dropped
            session = {**view, "messages": list(view["messages"])}
            if not pending_user_text(session):
                return True  # answered already (a resume of what was answered meanwhile)
            if reply_to is not None:
                await self.outbox.mark_read(reply_to, self.typing)
            if not self._in_window(session):
                self.metrics.window_closed.inc()
                log.info("reply_skipped", phone=phone, reason="24-hour window closed")
                return True
            await self._reply(phone, session, reply_to)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:
            log.warning("reply_waiting_for_store", phone=phone, error=str(exc))
            return False
        except (NataliaError, OSError) as exc:
            self.metrics.reply("failed")
            log.error("reply_failed", phone=phone, error_type=type(exc).__name__, error=str(exc))
        except Exception as exc:  # an assistant or outbox bug must not end this phone's conversation
            self.metrics.reply("failed")
            log.exception("reply_failed", phone=phone, error_type=type(exc).__name__)
        return True

    def _in_window(self, session: sessions.Session) -> bool:
        # the newest user message, searched from the end (sessions hold up to 250 messages; this runs per reply)
        last_user = next((m["timestamp"] for m in reversed(session["messages"]) if m["role"] == "user"), 0)
        return bool(self.clock() - last_user <= WINDOW_MS)

    async def _reply(self, phone: str, session: sessions.Session, reply_to: str | None) -> None:
        state = session.get(sessions.META, {})
        photos = PhotoTool(self.catalog, dict(state.get("photos", {})), last_album=state.get("last_album"))
        text = (await self.assistant.reply(session, photos)).strip()
        parts = ([Outgoing(text=text)] if text else []) + photos.outgoing()
        if not parts:
            self.metrics.reply("none")
            return
        meta: dict[str, Any] = {
            "photos": photos.sent or None,
            "last_album": photos.last_album,
            "pending": {
                "parts": [p.to_json() for p in parts],
                "reply_to": reply_to,
                # its parts' tags (part_tag): unique per phone is enough, and no secret (a status is believed only
                # with our app secret's signature); random's generator, seeded from os.urandom at import, costs no
                # system call per reply as secrets.token_hex does
                "id": f"{random.getrandbits(48):012x}",
                "run": self._run,
            },
            "sent_parts": None,
        }
        # Messages that arrived while the reply was being made were not read by the assistant: the reply goes
        # before them in the history, so they stay unanswered (assistant.pending_user_text) for the next turn.
        try:
            current = self.store.view(phone)
        except NotFoundError:
            current = None
        newer = None if current is None else _newer_than(current["messages"], session["messages"][-1])
        if current is None or newer is None or current["firstInteraction"] != session["firstInteraction"]:
            # forgotten while the reply was made (and maybe begun again): this reply answers a conversation gone
            self.metrics.reply("none")
            log.info("reply_discarded", phone=phone, reason="the session was forgotten meanwhile")
            return
        # the intent: durable before anything is sent, so a crash resends rather than forgets
        text_record = record_text(text, photos)
        lsn = self.store.add_message(phone, "assistant", text_record, self.clock(), meta=meta, before_last=newer)
        await self.store.wait_durable(lsn)
        await self._deliver(phone, recorded=lsn, made=parts)

    async def _deliver(self, phone: str, recorded: int | None = None, made: list[Outgoing] | None = None) -> None:
        """Send the pending reply's parts not yet sent; `recorded`: the lsn of its intent, if known (and durable);
        `made`: its parts, if just made (else read back from the record)."""
        session = self.store.view(phone)
        state = session.get(sessions.META, {})
        pending, done = state.get("pending"), int(state.get("sent_parts", 0))
        if not pending:
            return
        # A reply recorded before a fault is sent only once it is durable; its record's lsn is not kept, so that
        # means everything appended so far (one more group commit). _reply has just waited for its own.
        await self.store.wait_durable(self.store.lsn if recorded is None else recorded)
        if not self._in_window(session):
            self.metrics.window_closed.inc()
            self._sent_upto.pop(phone, None)
            self.store.set_meta(phone, {"pending": None, "sent_parts": None})
            log.info("reply_dropped", phone=phone, reason="24-hour window closed")
            return
        parts = made if made is not None else [Outgoing.from_json(p) for p in pending["parts"]]
        reply_id: str | None = pending.get("id")  # replies recorded before tags had none
        taken = self._sent_upto.get(phone)
        first = max(done, taken[1] if taken is not None and taken[0] == reply_id else 0)
        if first >= len(parts):  # WhatsApp took every part, the store could not record the last: record it now
            await self.store.wait_durable(self.store.set_meta(phone, {"pending": None, "sent_parts": None}) or 0)
        for i in range(first, len(parts)):
            reply_to = pending.get("reply_to") if i == 0 else None
            try:
                if reply_id is None or not self._tags:
                    await self.outbox.send(phone, parts[i], reply_to)
                else:
                    await self.outbox.send(phone, parts[i], reply_to, tag=part_tag(reply_id, i))
            except SendError as exc:
                self.metrics.reply("failed")
                if exc.kind in DROP_KINDS:
                    self._sent_upto.pop(phone, None)
                    self.store.set_meta(phone, {"pending": None, "sent_parts": None})
                    if exc.kind == "window_closed":
                        self.metrics.window_closed.inc()
                    log.warning("reply_dropped", phone=phone, reason=exc.kind, code=exc.code)
                else:  # for now: kept, retried at the customer's next message or the next start
                    log.warning("reply_deferred", phone=phone, reason=exc.kind, code=exc.code, parts_left=len(parts) - i)
                return
            last = i + 1 == len(parts)
            self._sent_upto[phone] = (reply_id, i + 1)  # until the record below is taken (it raises while degraded)
            sent = self.store.set_meta(phone, {"pending": None, "sent_parts": None} if last else {"sent_parts": i + 1})
            if sent is not None:  # durable before the next part goes: a crash leaves at most one part unsure
                await self.store.wait_durable(sent)
        self._sent_upto.pop(phone, None)
        self.metrics.reply("sent")

    # ---- start and stop ----

    async def resume(self, slice_ms: float = 5.0) -> int:
        """After a start: finish pending replies and answer unanswered messages inside the 24-hour window.
        Sessions are read in slices between which the loop serves webhooks; returns how many were queued."""
        horizon = self.clock() - WINDOW_MS
        queued = 0
        t0 = time.perf_counter()
        for phone in self.store.phones():
            if time.perf_counter() - t0 > slice_ms / 1000:
                await asyncio.sleep(0)
                t0 = time.perf_counter()
            if phone in self._queues or phone not in self.store:
                continue  # a new message got there first: its turn answers everything
            session = self.store.get(phone)  # a copy: a view would keep every session decoded (4x memory)
            if session["lastActivity"] < horizon:
                continue
            if session.get(sessions.META, {}).get("pending") or pending_user_text(session):
                self.submit(phone, None, 0)
                self.metrics.resumed.inc()
                queued += 1
        if queued:
            log.info("replies_resumed", sessions=queued)
        return queued

    async def close(self, timeout: float) -> int:
        """Let replies in progress finish for up to `timeout` seconds, then cancel the rest; returns how many
        accepted messages were left unanswered (they are durable and claimed: the restart answers them)."""
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
