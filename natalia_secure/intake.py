"""The inbound path of a webhook POST, without HTTP: verify, parse, claim, make durable, then answer.

Guarantee 1: 200 only once every message of the POST is sealed and fsynced. Each new message is appended to its
session together with its dedup claim (the wamid) in one journal record, so a message and its claim are durable
together or not at all; a redelivery (Meta retries for up to 7 days) finds the claim and waits only until the first
delivery is durable: it is answered 200 and does no work, also after a restart (claims are in snapshots and the
journal). What the store cannot make durable (disk full, I/O error, degraded) gets 503 and Meta retries.

Every message of a POST is checked before any is appended, so a POST is refused whole (400) or taken whole; a
POST cut short by a store failure leaves only claimed, not-yet-durable records, which its retry waits for.
The arrival time (our clock), not Meta's timestamp, stamps the message: as the legacy system did (Date.now()),
and so a session's activity never depends on a sender's clock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from . import sessions, whatsapp
from .errors import InputError, PayloadError, StoreUnavailable
from .metrics import Metrics
from .replies import Conversations, parse_tag
from .store import Store

log = structlog.get_logger("natalia_secure.intake")
# the per-webhook debug line is skipped on a level check: through structlog's logger proxy, even a debug line that
# is then dropped costs ~1 us (bench/README.md)
_debug_logger = logging.getLogger("natalia_secure.intake")

MAX_MESSAGE_ID = 512  # what the store accepts as a claim; Meta's wamids are ~60 characters
CONFIRMING = ("sent", "delivered", "read")  # statuses that say WhatsApp has the message ("failed" does not)


@dataclass(frozen=True)
class WebhookSecrets:
    """Replaced whole on reload (SIGHUP)."""

    app_secret: bytes
    verify_token: str

    def __repr__(self) -> str:
        return "WebhookSecrets(<hidden>)"


class Answer(NamedTuple):  # a named tuple: one per webhook (whatsapp.Inbound says why)
    status: int
    outcome: str  # a metrics label (metrics.WEBHOOK_OUTCOMES)
    body: dict[str, Any]


class Intake:
    def __init__(self, store: Store, conversations: Conversations, metrics: Metrics, secrets: WebhookSecrets) -> None:
        self.store = store
        self.conversations = conversations
        self.metrics = metrics
        self.secrets = secrets
        self.stopping = False
        self.inflight = 0
        self.received = 0  # new messages since start (STATUS=)

    def challenge(self, args: dict[str, str]) -> str | None:
        return whatsapp.subscription_challenge(args, self.secrets.verify_token)

    def refuse_unsigned(self) -> tuple[int, dict[str, Any]]:
        """A POST whose signature header is missing or malformed, refused before its body is read."""
        self.metrics.signature_failures.inc()
        self.metrics.webhook("bad_signature")
        log.warning("webhook_rejected", reason="bad signature", header_present=False)
        return 401, {"error": f"missing or wrong {whatsapp.SIGNATURE_HEADER}"}

    async def accept(self, body: bytes, signature: str | None) -> Answer:
        started = time.perf_counter()
        self.inflight += 1
        try:
            answer = await self._accept(body, signature)
        finally:
            self.inflight -= 1
        self.metrics.webhook(answer.outcome)
        if answer.status == 200:
            self.metrics.ack_latency.observe(time.perf_counter() - started)
        return answer

    async def _accept(self, body: bytes, signature: str | None) -> Answer:
        if self.stopping:
            return Answer(503, "stopping", {"error": "shutting down; retry later"})
        if not whatsapp.signature_ok(self.secrets.app_secret, body, signature):
            self.metrics.signature_failures.inc()
            log.warning("webhook_rejected", reason="bad signature", header_present=signature is not None)
            return Answer(401, "bad_signature", {"error": f"missing or wrong {whatsapp.SIGNATURE_HEADER}"})
        try:
            hook = whatsapp.parse_webhook(body)
            for i, m in enumerate(hook.messages):
                sessions.check_phone(m.phone, f"message {i}: the sender")
                if len(m.id) > MAX_MESSAGE_ID:
                    raise PayloadError(f"message {i}: the id is longer than {MAX_MESSAGE_ID} characters")
        except InputError as exc:
            log.warning("webhook_rejected", reason=str(exc))
            return Answer(400, "bad_request", {"error": str(exc)})
        ours = False  # a status of a part we sent: acknowledged only once what it says is durable
        try:
            for status in hook.statuses:
                self.metrics.status(status.status)
                if status.callback and status.status in CONFIRMING and parse_tag(status.callback) is not None:
                    ours = True
                    self.conversations.confirm(status.recipient, status.callback)
            if ours:
                # the part's "sent" record (appended by confirm, or by the reply itself a moment ago): a status
                # acknowledged is never redelivered, so a restart could not learn it again
                await self.store.wait_durable(self.store.lsn)
        except StoreUnavailable as exc:
            log.error("webhook_unavailable", reason=str(exc), degraded=self.store.degraded)
            return Answer(503, "unavailable", {"error": "the store cannot persist messages right now; retry later"})
        if not hook.messages:
            outcome = "ignored" if hook.ignored and not hook.statuses else "ok"
            return Answer(200, outcome, {"messages": 0, "duplicates": 0, "statuses": len(hook.statuses)})
        newest = 0
        duplicates = 0
        try:
            for m in hook.messages:
                claimed = self.store.claim_lsn(m.id)
                if claimed is not None:  # a redelivery: answered once the first delivery is durable, nothing else
                    duplicates += 1
                    self.metrics.dedup_hits.inc()
                    newest = max(newest, claimed)
                    continue
                if m.phone not in self.store:
                    log.info("session_new", phone=m.phone)
                lsn = self.store.add_message(m.phone, "user", m.text, self.store.clock(), message_id=m.id)
                newest = max(newest, lsn)
                self.received += 1
                self.metrics.message(m.kind)
                self.conversations.submit(m.phone, m.id, lsn)
            await self.store.wait_durable(newest)
        except StoreUnavailable as exc:
            log.error("webhook_unavailable", reason=str(exc), degraded=self.store.degraded)
            return Answer(503, "unavailable", {"error": "the store cannot persist messages right now; retry later"})
        new = len(hook.messages) - duplicates
        if _debug_logger.isEnabledFor(logging.DEBUG):
            log.debug("webhook", messages=new, duplicates=duplicates, statuses=len(hook.statuses))
        return Answer(200, "ok", {"messages": new, "duplicates": duplicates, "statuses": len(hook.statuses)})
