"""HTTP: thin Tornado handlers over the intake (intake.py), health and metrics. `make_app(deps)`, no globals.

    GET  /webhook   Meta's subscription handshake: 200 + the raw hub.challenge, or 403
    POST /webhook   signed payload: 200 once durable; 401 signature, 400 shape, 413 over 3 MB, 503 cannot persist
    GET  /healthz   200 {"status": "ok"} / 503 {"status": "degraded" | "stopping", "reason": ...}; no personal data
    GET  /metrics   Prometheus text format

The webhook body is streamed (`stream_request_body`) so a body over Meta's 3 MB limit is refused with 413 as soon
as its Content-Length (or, chunked, its running size) says so, without buffering it; Tornado's own limit would
answer 400. Every error is JSON from `write_error`, never a traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
import structlog
import tornado.web

from . import logs, whatsapp
from .intake import Intake
from .metrics import Metrics

log = structlog.get_logger("natalia_secure.web")
_KNOWN = {s.value for s in HTTPStatus}


@dataclass
class Health:
    ok: bool
    status: str  # "ok" | "degraded" | "stopping"
    reason: str | None
    details: dict[str, Any]


@dataclass
class Deps:
    intake: Intake
    metrics: Metrics
    health: Callable[[], Health]


class JSONHandler(tornado.web.RequestHandler):
    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Tornado's own line carries the full URI (GET /webhook's query holds hub.verify_token) and the request repr
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("handler_failed", method=self.request.method, path=self.request.path, exc_info=(typ, value, tb))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"error": HTTPStatus(status_code).phrase.lower() if status_code in _KNOWN else "error"}))


@tornado.web.stream_request_body
class WebhookHandler(JSONHandler):
    def initialize(self, deps: Deps) -> None:
        self.intake = deps.intake
        self.chunks: list[bytes] = []
        self.size = 0
        self.refused = False

    def get(self) -> None:
        args = {
            k: v for k in ("hub.mode", "hub.verify_token", "hub.challenge") if (v := self.get_query_argument(k, None)) is not None
        }
        challenge = self.intake.challenge(args)
        if challenge is None:
            self.answer(403, {"error": "subscription refused"})
            return
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(challenge)

    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        if not whatsapp.signature_well_formed(self.request.headers.get(whatsapp.SIGNATURE_HEADER)):
            # refused before the body is read: an unsigned client cannot make us buffer 3 MB
            self.refused = True
            self.answer(*self.intake.refuse_unsigned())
            return
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > whatsapp.MAX_BODY):
            self._too_large()

    def data_received(self, chunk: bytes) -> None:
        if self.refused:
            return
        self.size += len(chunk)
        if self.size > whatsapp.MAX_BODY:
            self.chunks.clear()
            self._too_large()
            return
        self.chunks.append(chunk)

    def _too_large(self) -> None:
        self.refused = True
        self.intake.metrics.webhooks.labels("too_large").inc()
        self.set_header("Connection", "close")  # the rest of the body is not read: this connection cannot be reused
        self.answer(413, {"error": f"body larger than {whatsapp.MAX_BODY} bytes"})

    async def post(self) -> None:
        if self.refused:
            return
        answer = await self.intake.accept(b"".join(self.chunks), self.request.headers.get(whatsapp.SIGNATURE_HEADER))
        self.answer(answer.status, answer.body)


class HealthHandler(JSONHandler):
    def initialize(self, deps: Deps) -> None:
        self.health = deps.health

    def get(self) -> None:
        h = self.health()
        self.answer(200 if h.ok else 503, {"status": h.status, "reason": h.reason, **h.details})


class MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, deps: Deps) -> None:
        self.metrics = deps.metrics

    def get(self) -> None:
        data, content_type = self.metrics.render()
        self.set_header("Content-Type", content_type)
        self.finish(data)


def make_app(deps: Deps, log_function: Callable[[tornado.web.RequestHandler], None] | None = None) -> tornado.web.Application:
    routes: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
        ("/webhook", WebhookHandler, {"deps": deps}),
        ("/healthz", HealthHandler, {"deps": deps}),
        ("/metrics", MetricsHandler, {"deps": deps}),
    ]
    return tornado.web.Application(
        routes,
        log_function=log_function or logs.log_request,  # the path without its query: it carries hub.verify_token
        default_handler_class=NotFound,
        compress_response=False,
    )


class NotFound(JSONHandler):
    def prepare(self) -> Awaitable[None] | None:
        self.answer(404, {"error": "not found"})
        return None
