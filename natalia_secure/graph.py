"""The WhatsApp Cloud API sending client: text and image messages, read receipts, retries, error kinds.

`POST {graph_url}/{api_version}/{phone_number_id}/messages` with `Authorization: Bearer <token>` (Meta, "Cloud API
> Messages" reference). A refusal arrives as `{"error": {"message", "type", "code", "error_subcode"?, "error_data"?,
"fbtrace_id"}}`, usually with HTTP 400 (401 for a bad token); a 5xx may carry no JSON at all. The code decides:
- 130429 (throughput), 131056 (pair rate: one message per 6 s per business/customer pair, bursts allowed) and 5xx
  are worth another try: full-jitter exponential backoff (AWS Architecture Blog, "Exponential Backoff And
  Jitter", 2015), at least 6 s after a 131056, never less than a `Retry-After` (RFC 9110 §10.2.3) asks for;
- 131047 (24-hour window closed), 131026 (undeliverable), 190 (token invalid or expired) and every other 4xx will
  not change by retrying: one request, then a `SendError` whose `kind` tells replies.py to drop or keep the reply.
A 190 also sets `token_invalid`, which the daemon's health reports as degraded until a new token is set or a request succeeds.

Logs carry codes, statuses and kinds, the customer only as `phone=` (pseudonymised by logs.py), never a message
text, never the token, never Graph's free-text error message (its `error_data.details` may quote what was sent).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson
import structlog

from . import whatsapp
from .assistant import Outgoing
from .errors import SendError
from .metrics import Metrics

__all__ = ["GraphClient", "SendError", "classify", "code_label", "message_body", "read_body", "retry_after"]

log = structlog.get_logger("natalia_secure.graph")

PAIR_RATE_S = 6.0  # Meta, "Pair rate limits": one message every 6 s to the same customer (error 131056)
REAUTH_HINT = "the WhatsApp access token is invalid or expired: set a new WHATSAPP_ACCESS_TOKEN and reload"

# What each code means for us (Meta, "Cloud API > Error codes").
FINAL: dict[int, str] = {131047: "window_closed", 131026: "undeliverable", 190: "token"}
# 4 and 80007 are the Graph API's app- and account-level rate limits; 131000 ("something went wrong"), 131016
# (service unavailable) and 133004 (server temporarily unavailable) pass with time, though they come with a 4xx
RATE_CODES = frozenset((130429, 131056, 4, 80007))
TRANSIENT_CODES = frozenset((131000, 131016, 133004))
RETRYABLE = frozenset(("rate", "server", "transport"))
DESCRIPTIONS: dict[int, str] = {
    131047: "window closed",
    131026: "undeliverable",
    190: "access token invalid or expired",
    130429: "throughput limit",
    131056: "pair rate limit",
}
# whatsapp_errors{code}: a fixed set, so a code Meta invents tomorrow cannot grow the registry (metrics.py)
LABELLED_CODES = frozenset((*FINAL, *RATE_CODES))


def message_body(to: str, part: Outgoing, reply_to: str | None = None, tag: str | None = None) -> dict[str, Any]:
    """The JSON of one message: a text (link previews off) or an image (link or media id, optional caption);
    `tag` comes back in the message's statuses (replies.py: how a restart learns a part was sent)."""
    body: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to}
    if part.image is not None:
        image: dict[str, str] = {}
        if part.image.link is not None:
            image["link"] = part.image.link
        elif part.image.media_id is not None:
            image["id"] = part.image.media_id
        else:
            raise SendError("an image without a link or a media id was not sent", kind="rejected")
        if part.image.caption:
            image["caption"] = part.image.caption
        body.update(type="image", image=image)
    elif part.text:
        # preview_url false: a link Natalia writes is not fetched by WhatsApp to build a card (Meta, "Text messages")
        body.update(type="text", text={"preview_url": False, "body": part.text})
    else:
        raise SendError("an empty message was not sent", kind="rejected")
    if reply_to is not None:
        body["context"] = {"message_id": reply_to}
    if tag is not None:
        body[whatsapp.CALLBACK_DATA] = tag
    return body


def read_body(message_id: str, typing: bool = False) -> dict[str, Any]:
    """The JSON that marks an inbound message read, optionally showing "typing..." (Meta, "Typing indicators")."""
    body: dict[str, Any] = {"messaging_product": "whatsapp", "status": "read", "message_id": message_id}
    if typing:
        body["typing_indicator"] = {"type": "text"}
    return body


def _error(payload: object) -> dict[str, Any]:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload["error"]  # type: ignore[no-any-return]
    return {}


def _code(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def classify(status: int, payload: object) -> tuple[str, int | None]:
    """(kind, Graph code) of a refused request, from its HTTP status and parsed body (None if not JSON)."""
    code = _code(_error(payload).get("code"))
    if code in FINAL:
        return FINAL[code], code
    if code in RATE_CODES or status == 429:  # 429: RFC 6585's Too Many Requests, whatever the body says
        return "rate", code
    if status >= 500 or code in TRANSIENT_CODES:
        return "server", code
    return "rejected", code


def code_label(kind: str, code: int | None, status: int | None) -> str:
    """The whatsapp_errors label: a listed code, "5xx", "transport" or "other"."""
    if code in LABELLED_CODES:
        return str(code)
    if kind == "transport":
        return "transport"
    if status is not None and status >= 500:
        return "5xx"
    return "other"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: delay-seconds or an HTTP-date (RFC 9110 §10.2.3); None if absent
    or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is read as such
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class _Failure:
    kind: str
    code: int | None = None
    status: int | None = None
    wait: float | None = None  # from Retry-After
    subcode: int | None = None
    fbtrace_id: str | None = None  # quoted to Meta support to find the request; names no one
    error: str | None = None  # a transport exception's class name (its text may quote the URL)

    def exception(self, attempts: int) -> SendError:
        if self.kind == "transport":
            message = f"WhatsApp could not be reached ({self.error}) after {attempts} attempt(s)"
        elif self.code is not None:
            what = DESCRIPTIONS.get(self.code, f"HTTP {self.status}")
            message = f"WhatsApp refused the message: code {self.code} ({what})"
        else:
            message = f"WhatsApp refused the message: HTTP {self.status}"
        if self.kind in RETRYABLE and self.kind != "transport":
            message += f" after {attempts} attempt(s)"
        return SendError(message, code=self.code, status=self.status, kind=self.kind)


class GraphClient:
    """Sends through one phone number; one connection pool, shared by every customer's replies."""

    echoes_tags = True  # a message's tag comes back in its statuses (the webhook)

    def __init__(
        self,
        graph_url: str,
        api_version: str,
        phone_number_id: str,
        access_token: str,
        metrics: Metrics,
        *,
        timeout: float = 20.0,
        attempts: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.url = f"{graph_url.rstrip('/')}/{api_version}/{phone_number_id}/messages"
        self.metrics = metrics
        self.attempts = max(1, attempts)
        self.base_delay, self.max_delay = base_delay, max_delay
        self.token_invalid = False
        self._token = access_token
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter spreads retries, guards no secret
        # No redirects: a 3xx from the Graph API is unexpected, and following it would carry the bearer token on.
        self._client = httpx2.AsyncClient(timeout=timeout, follow_redirects=False)

    def set_token(self, access_token: str) -> None:
        """Use a new access token from the next request on (SIGHUP). Health is clean again until it fails too."""
        if access_token != self._token:
            self.token_invalid = False
        self._token = access_token

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, to: str, part: Outgoing, reply_to: str | None = None, tag: str | None = None) -> str:
        """Send one message; returns its wamid. Raises SendError (see `kind`) once retries are spent or pointless."""
        kind = "image" if part.image is not None else "text"
        try:
            answer = await self._post(message_body(to, part, reply_to, tag), part=kind, attempts=self.attempts, phone=to)
        except SendError as exc:
            self.metrics.whatsapp_sends.labels(kind, exc.kind).inc()
            raise
        self.metrics.whatsapp_sends.labels(kind, "ok").inc()
        messages = answer.get("messages") if isinstance(answer, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[0], dict) and isinstance(messages[0].get("id"), str):
            return messages[0]["id"]  # type: ignore[no-any-return]
        log.warning("whatsapp_answer_without_id", phone=to)  # accepted (2xx), so not an error to retry
        return ""

    async def mark_read(self, message_id: str, typing: bool = False) -> None:
        """Mark an inbound message read (blue ticks), with "typing..." if asked. Never raises: failures are logged
        and counted. One attempt only: the reply waits for this call, and a receipt is not worth delaying it."""
        try:
            await self._post(read_body(message_id, typing), part="read", attempts=1, message_id=message_id)
        except SendError as exc:
            self.metrics.whatsapp_sends.labels("read", exc.kind).inc()
            return
        self.metrics.whatsapp_sends.labels("read", "ok").inc()

    def delay(self, attempt: int, failure: _Failure) -> float:
        """How long to wait after failed attempt number `attempt` (0-based) before the next one."""
        delay = self._rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # full jitter
        if failure.code == 131056:
            delay = max(delay, PAIR_RATE_S)
        if failure.wait is not None:
            delay = max(delay, min(self.max_delay, failure.wait))
        return delay

    async def _post(self, body: dict[str, Any], *, part: str, attempts: int, **who: str) -> object:
        """POST `body` up to `attempts` times; the parsed 2xx answer, or SendError. `who`: phone= or message_id=,
        for the log lines only (both are pseudonymised there)."""
        for attempt in range(attempts):
            failure = await self._once(body)
            if not isinstance(failure, _Failure):
                if self.token_invalid:
                    self.token_invalid = False
                    log.info("whatsapp_token_ok")
                return failure
            self.metrics.whatsapp_errors.labels(code_label(failure.kind, failure.code, failure.status)).inc()
            retrying = failure.kind in RETRYABLE and attempt + 1 < attempts
            log.warning(
                "whatsapp_request_failed",
                part=part,
                kind=failure.kind,
                code=failure.code,
                subcode=failure.subcode,
                status=failure.status,
                error=failure.error,
                fbtrace_id=failure.fbtrace_id,
                attempt=attempt + 1,
                attempts=attempts,
                retrying=retrying,
                **who,
            )
            if failure.kind == "token":
                self.token_invalid = True
                log.error("whatsapp_token_invalid", hint=REAUTH_HINT, code=failure.code, status=failure.status)
            if not retrying:
                raise failure.exception(attempt + 1)
            await self._sleep(self.delay(attempt, failure))
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def _once(self, body: dict[str, Any]) -> object:
        """One request: the parsed answer of a 2xx, else a _Failure."""
        try:
            response = await self._client.post(
                self.url,
                content=orjson.dumps(body),
                headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
            )
        except httpx2.RequestError as exc:  # connect, timeout, reset, protocol: nothing usable came back
            # A read timeout may follow a message Meta did take: the retry can then send it twice. The Graph API
            # has no idempotency key; a rare duplicate is judged better than a reply never sent.
            return _Failure("transport", error=type(exc).__name__)
        try:
            payload: object = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:  # a 5xx from a proxy or load balancer is often HTML
            payload = None
        status = response.status_code
        if 200 <= status < 300:
            return payload if payload is not None else {}
        kind, code = classify(status, payload)
        error = _error(payload)
        fbtrace = error.get("fbtrace_id")
        return _Failure(
            kind,
            code=code,
            status=status,
            wait=retry_after(response.headers.get("Retry-After")),
            subcode=_code(error.get("error_subcode")),
            fbtrace_id=fbtrace if isinstance(fbtrace, str) else None,
        )

