"""HTTP: thin Tornado handlers over the intake (intake.py), health and metrics. `make_app(deps)`, no globals.

    GET  /webhook   Meta's subscription handshake: 200 + the raw hub.challenge, or 403
    POST /webhook   signed payload: 200 once durable; 401 signature, 400 shape, 413 over 3 MB, 503 cannot persist
    GET  /healthz   200 {"status": "ok"} / 503 {"status": "degraded" | "stopping", "reason": ...}; no personal data
    GET  /metrics   Prometheus text format

POST /webhook is served by `WebhookPost`, an `HTTPMessageDelegate` (tornado.httputil), not a RequestHandler: it is the
one hot path (every customer message), and tornado.web's machinery around a handler (handler object, its task and
the extra loop turns of a streamed body, header bookkeeping) cost ~51 us of serve's 319 us (bench/README.md, 2026-11-26).
`App` hands it over once its request line and headers are in, before tornado.web's routing would build an
HTTPServerRequest (`check_host` keeps that object's Host checks).
It sees the body as it streams in, so a body over Meta's 3 MB limit is refused with 413 as soon as its
Content-Length (or, chunked, its running size) says so, without buffering it (Tornado's own limit would answer
400), and a POST without a well-formed signature is refused (401) before its body is read. Every error is JSON,
never a traceback.

Timeouts, so a client cannot hold connections and buffers open: a webhook's body must arrive within `body_timeout`
(30 s; Meta sends one in one go), and a connection still reading `idle_timeout` (75 s) after its last request
started (idle, or trickling the next one) is closed. Tornado has both (body_timeout, idle_connection_timeout), but
wraps each request's body read, and its header read, in a timeout future: ~45 us and ~25 us of a webhook's ~260 us
of CPU at saturation (bench/README.md). Here they are deadlines (deadlines.py) that one sweep a second looks at;
Tornado's body_timeout stays for the bodies of other requests (POST /webhook turns it off for itself).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

import orjson
import structlog
import tornado.httpserver
import tornado.iostream
import tornado.web
from tornado import http1connection, httputil
from tornado.ioloop import IOLoop

from . import logs, whatsapp
from .deadlines import Deadlines
from .intake import Intake
from .metrics import Metrics

log = structlog.get_logger("natalia_secure.web")
BODY_TIMEOUT_S = 30.0  # a webhook body not read whole by then: the connection is closed
IDLE_TIMEOUT_S = 75.0  # a connection still reading (idle, or trickling a request) this long after its last request began
READ_CHUNK = 16 * 1024  # bytes per socket read (HTTPServer)
READ_AHEAD = READ_CHUNK  # unread bytes below which a connection keeps listening for reads (ConnectionStream)
_PHRASES = {s.value: s.phrase for s in HTTPStatus}  # HTTPStatus(code) is an enum lookup in Python: ~0.4 us a webhook


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
        self.finish(orjson.dumps({"error": _PHRASES[status_code].lower() if status_code in _PHRASES else "error"}))


class WebhookHandler(JSONHandler):
    """GET /webhook, Meta's subscription handshake (POST goes to WebhookPost)."""

    def initialize(self, deps: Deps) -> None:
        self.intake = deps.intake

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


@functools.lru_cache(maxsize=1)
def http_date(second: int) -> str:
    """The Date header's value for a Unix time: formatting costs ~5 us (email.utils), and a second holds thousands
    of answers, so it is made once a second."""
    return email.utils.formatdate(second, usegmt=True)


class WebhookPost(httputil.HTTPMessageDelegate):
    """One POST /webhook: headers, body chunks, then the intake's answer, written once (module docstring: why not
    a RequestHandler). Tornado stops passing body chunks once an answer is written early, and closes the
    connection after it (the rest of the body is never read)."""

    def __init__(self, deps: Deps, connection: httputil.HTTPConnection, bodies: Deadlines, body_timeout: float) -> None:
        self.intake = deps.intake
        self.connection = connection
        self.bodies = bodies
        self.body_timeout = body_timeout
        self.started = time.perf_counter()
        self.signature: str | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.status = 0  # the answer's, once written
        self.task: asyncio.Task[None] | None = None  # the intake's work, referenced until done (asyncio docs)

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> None:
        self.signature = headers.get(whatsapp.SIGNATURE_HEADER)
        if not whatsapp.signature_well_formed(self.signature):
            # refused before the body is read: an unsigned client cannot make us buffer 3 MB
            self._answer(*self.intake.refuse_unsigned())
            return
        length = headers.get("Content-Length")
        # isascii: str.isdigit() also takes "²", which int() refuses (found by tests/test_fuzz.py)
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > whatsapp.MAX_BODY):
            self._too_large()
            return
        if isinstance(self.connection, http1connection.HTTP1Connection):
            self.connection.set_body_timeout(None)  # type: ignore[arg-type]  # no timeout future per body read
        self.bodies.set(self, self.body_timeout, self._too_slow)

    def data_received(self, chunk: bytes) -> None:
        if self.status:
            return
        self.size += len(chunk)
        if self.size > whatsapp.MAX_BODY:
            self.chunks.clear()
            self._too_large()
            return
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.bodies.clear(self)
        if not self.status:
            self.task = asyncio.ensure_future(self._accept())

    def on_connection_close(self) -> None:
        self.bodies.clear(self)

    def _too_slow(self) -> None:
        log.warning("webhook_rejected", reason=f"body not received within {self.body_timeout:g} s")
        self.connection.close()  # type: ignore[attr-defined]  # HTTP1Connection: its stream

    async def _accept(self) -> None:
        try:
            answer = await self.intake.accept(b"".join(self.chunks), self.signature)
        except Exception:  # a bug must still answer (JSON 500, Meta retries) and be logged, as RequestHandler does
            log.exception("handler_failed", method="POST", path="/webhook")
            self._answer(500, {"error": "internal server error"})
            return
        self._answer(answer.status, answer.body)

    def _too_large(self) -> None:
        self.intake.metrics.webhook("too_large")
        self._answer(413, {"error": f"body larger than {whatsapp.MAX_BODY} bytes"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        data = orjson.dumps(body)
        headers = httputil.HTTPHeaders(
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(data)),
                "Cache-Control": "no-store",
                "Date": http_date(int(time.time())),  # RFC 9110 6.6.1: an origin server with a clock sends it
            }
        )
        # Answered before the whole body was read (401, 413), Tornado adds "Connection: close" and closes after it.
        start = httputil.ResponseStartLine("HTTP/1.1", status, _PHRASES[status])
        self.connection.write_headers(start, headers, data)
        self.connection.finish()
        logs.log_access("POST", "/webhook", status, time.perf_counter() - self.started)


class _ReadInterest:
    """ConnectionStream's `_state` (Tornado's name for the events a stream listens for): a descriptor with `__set__`
    and no `__get__`, so every assignment comes here and every read is a plain look in the instance's dict (Tornado
    reads it ~20 times per request; a property would be a Python call each time)."""

    def __set__(self, stream: ConnectionStream, state: int | None) -> None:
        kept = stream.__dict__.get("_state")
        if state is not None and kept is not None and kept & IOLoop.READ and stream._read_buffer_size < READ_AHEAD:
            state |= IOLoop.READ
        stream.__dict__["_state"] = state


class ConnectionStream(tornado.iostream.IOStream):
    """Tornado's IOStream for the daemon's HTTP connections: a webhook on a kept connection costs it 2 system calls,
    its recv and its send, where Tornado's IOStream makes 12 (strace under load; bench/README.md, 2026-11-26,
    afternoon):

    - It keeps listening for reads while less than READ_AHEAD bytes wait unread in its buffer. Tornado stops as
      soon as a read leaves bytes there (a webhook's body arrives with its headers and waits for the coroutine that
      takes it) and starts again once they are taken, to notice a client closing while the answer is awaited: with
      uvloop, a poll handle closed and opened again, 6 epoll_ctl and an ioctl per webhook. While an answer is
      awaited, bytes a client sends ahead (pipelining) are read while fewer than READ_AHEAD wait, one socket read
      at a time: less than READ_AHEAD + one read (32 KiB) is held (Tornado's IOStream, through the size limit it
      leaves set, reads up to 64 KiB ahead). One difference: a client that pipelines requests and then shuts its
      side (half-close) is seen to close at once, so the answers still to come are not written (the requests are
      handled: their messages are durable, and Meta's redelivery is answered as a duplicate). Tornado notices it
      only once the buffered requests are answered; for a single request, both close before the answer.
    - The socket is read only when it has bytes. A read that the buffer cannot satisfy waits for the event loop
      when the socket is listened to already (Tornado tries the socket first: after each answer an empty one, as
      the client has not sent its next request yet; the loop's polling is level-triggered, so whatever the socket
      holds is reported at its next turn), and a finished read's size limit goes with it. Each read of an empty
      socket is a system call and an exception in Python.
    - TCP_NODELAY stays on. Tornado turns it on for a response's last write and off after it (two setsockopt per
      request) so that Nagle's algorithm coalesces a response written in pieces; ours are written in one piece.
    """

    if TYPE_CHECKING:
        _state: int | None  # what reads of it give (the instance's dict): mypy does not follow a set-only descriptor
    else:
        _state = _ReadInterest()

    def _read_from_buffer(self, pos: int) -> None:
        # Tornado forgets a finished read's target but keeps its size limit (a header read's 64 KiB): bytes arriving
        # before the next read starts (the next request, here before the last answer's coroutine has resumed) would
        # be read up to that limit, always one read too many (an empty socket), and more when a client sends ahead.
        self._read_max_bytes = None
        super()._read_from_buffer(pos)

    def _try_inline_read(self) -> None:
        state = self._state
        if state is None or not state & IOLoop.READ:
            super()._try_inline_read()
            return
        pos = self._find_read_pos()
        if pos is not None:
            self._read_from_buffer(pos)
        else:
            self._check_closed()  # a closed stream fails the read now, as Tornado's does

    def set_nodelay(self, value: bool) -> None:
        pass  # on since the connection was accepted (HTTPServer.handle_stream)

    @classmethod
    def adopt(cls, stream: tornado.iostream.IOStream) -> None:
        """Make a stream Tornado's TCPServer has just made (and not yet used) one of ours, with TCP_NODELAY on."""
        if type(stream) is tornado.iostream.IOStream:  # a TLS stream (SSLIOStream) stays as it is
            stream.__class__ = cls
            tornado.iostream.IOStream.set_nodelay(stream, True)


class HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer with its idle connection timeout as a deadline per connection (`Deadlines`; the module
    docstring says why), renewed as each request starts: a connection still reading (waiting for its next request,
    or receiving one) when `idle_timeout` has passed is closed; one answering a request is looked at again later.
    Each connection's stream is a ConnectionStream (a TLS one would stay Tornado's: the daemon serves plain HTTP)."""

    def initialize(self, *args: Any, idle_timeout: float = IDLE_TIMEOUT_S, **kwargs: Any) -> None:
        if "idle_connection_timeout" in kwargs:  # Tornado's, which this class replaces: never silently ignored
            raise TypeError("web.HTTPServer takes idle_timeout, not idle_connection_timeout")
        # Each socket read fills a new zeroed buffer of chunk_size: Tornado's default, 64 KiB, costs ~0.7 us and the
        # whole L1 cache twice per webhook (~1-3 KB); bodies are passed on in chunks of it.
        kwargs.setdefault("chunk_size", READ_CHUNK)
        super().initialize(*args, **kwargs)
        self.conn_params.header_timeout = None  # no timeout future around each header read: the deadline instead
        self.idle_timeout = idle_timeout
        self.deadlines = Deadlines()

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        ConnectionStream.adopt(stream)
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # called as the connection starts waiting for a request: the deadline is renewed once per request
        self.deadlines.set(server_conn, self.idle_timeout, functools.partial(self._idle, server_conn))
        return super().start_request(server_conn, request_conn)

    def _idle(self, server_conn: object) -> None:
        stream = cast(http1connection.HTTP1ServerConnection, server_conn).stream
        if stream.reading():  # waiting for a request (or trickling one): closed, as Tornado's timeout did
            stream.close()
        else:  # a request being answered (its body read whole) is never cut: look again later
            self.deadlines.set(server_conn, self.idle_timeout, functools.partial(self._idle, server_conn))

    def on_close(self, server_conn: object) -> None:
        self.deadlines.clear(server_conn)
        super().on_close(server_conn)


class App(tornado.web.Application):
    """tornado.web's Application, except that POST /webhook is told by its request line and goes to WebhookPost
    without tornado.web's routing (an HTTPServerRequest, then each rule's regular expression: 4% of serve's
    instructions per webhook, bench/README.md); every other request is routed by the Application's rules as usual.
    Served through an HTTPServer (start_request), not called as a function."""

    def __init__(self, deps: Deps, body_timeout: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deps = deps
        self.body_timeout = body_timeout
        self.bodies = Deadlines()  # every webhook body's, one sweep for all

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return RequestLine(self, server_conn, request_conn)

    def webhook(self, request_conn: httputil.HTTPConnection) -> WebhookPost:
        return WebhookPost(self.deps, request_conn, self.bodies, self.body_timeout)

    def route(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        """The Application's own delegate for a request (tornado.routing), for everything but POST /webhook."""
        return super().start_request(server_conn, request_conn)


# A Host header's value (RFC 3986 host [":" port], as tornado.web checks it) without the comma: two Host headers are
# read as one joined by a comma, and RFC 9112 3.2 asks 400 for both (tornado.web refuses commas for that reason)
_HOST = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+;=:\[\]]|%[0-9A-Fa-f]{2})*")


def check_host(version: str, headers: httputil.HTTPHeaders) -> None:
    """What tornado.web's HTTPServerRequest checks of every other request (RFC 9112 3.2): an HTTP/1.1 request with
    no Host header, two, or an invalid one is refused; Tornado answers HTTPInputError with 400 and closes."""
    host = headers.get("Host")
    if host is None:
        if version != "HTTP/1.0":  # HTTP/1.0 may omit it
            raise httputil.HTTPInputError("Missing Host header")
    elif not _HOST.fullmatch(host):
        raise httputil.HTTPInputError("Invalid or repeated Host header")


class RequestLine(httputil.HTTPMessageDelegate):
    """One request, handed on once its request line and headers are in: POST /webhook (whatever its query) to a
    WebhookPost, once its Host header passes the checks tornado.web's routing would have made; anything else to the
    Application's routing."""

    def __init__(self, app: App, server_conn: object, request_conn: httputil.HTTPConnection) -> None:
        self.app = app
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.delegate: httputil.HTTPMessageDelegate | None = None

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        if start_line.method == "POST" and start_line.path.partition("?")[0] == "/webhook":
            check_host(start_line.version, headers)
            self.delegate = self.app.webhook(self.request_conn)
        else:
            self.delegate = self.app.route(self.server_conn, self.request_conn)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        assert self.delegate is not None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        assert self.delegate is not None
        self.delegate.finish()

    def on_connection_close(self) -> None:
        if self.delegate is not None:
            self.delegate.on_connection_close()


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


def make_app(deps: Deps, body_timeout: float = BODY_TIMEOUT_S) -> App:
    routes: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
        ("/webhook", WebhookHandler, {"deps": deps}),  # GET; POST goes to WebhookPost (App)
        ("/healthz", HealthHandler, {"deps": deps}),
        ("/metrics", MetricsHandler, {"deps": deps}),
    ]
    return App(
        deps,
        body_timeout,
        routes,
        log_function=logs.log_request,  # the path without its query: it carries hub.verify_token
        default_handler_class=NotFound,
        compress_response=False,
    )


class NotFound(JSONHandler):
    def prepare(self) -> Awaitable[None] | None:
        self.answer(404, {"error": "not found"})
        return None
