"""A fake WhatsApp Graph API on loopback: records what it is sent and answers what a test scripts.

Tornado on 127.0.0.1 (a free port) in a background thread with its own event loop, so sync tests, asyncio tests
and daemons in subprocesses can all talk to it:

    with FakeGraph() as g:
        client = GraphClient(g.url, "v24.0", "PNID", "token", metrics)
        g.script(graph_error(131047), Reply(503, b"<html>busy</html>"))
        ...
        assert g.sent_texts() == ["hola"]

Every POST is recorded in `g.requests` (method, path, headers, parsed JSON body, arrival time). Scripted replies
are used in order, one per request; after them every message gets the real API's 200 answer with a new wamid
("wamid.OUT1", "wamid.OUT2", ...) and every read receipt `{"success": true}`. `hold()` makes requests wait, unanswered,
until `release()` (to kill a daemon while its send is in flight). `Reply.drop()` closes the connection instead of
answering. Error bodies follow Meta's shape: {"error": {"message", "type", "code", "error_subcode"?, "fbtrace_id"}}.

`statuses_to(url, app_secret)` makes it Meta's webhook side too: each message accepted with a
biz_opaque_callback_data gets signed "sent" and "delivered" statuses POSTed to `url` (several in one webhook when
they queue up), retried until answered 200 — also across a daemon's restart on another `url`. Meta retries too, with
a backoff it does not document, so its statuses can come later than these.

Run as a process (``python -m tests.fake_graph --record FILE [--app-secret S]``) for a test that must not share its
own CPU with it (tests/test_chaos.py): it prints ``{"port": N}``, appends every message it accepts to FILE as a JSON
line (`accepted_line`: recipient, type, text or image, context), reads ``{"statuses_to": URL}`` lines on its stdin,
and stops at the end of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.web

from natalia_secure import whatsapp

# Realistic refusals (Meta, "Cloud API > Error codes"): HTTP status and message for each code the client handles.
ERRORS: dict[int, tuple[int, str, str]] = {
    131047: (400, "Re-engagement message", "OAuthException"),
    131026: (400, "Message undeliverable", "OAuthException"),
    190: (401, "Error validating access token: Session has expired", "OAuthException"),
    130429: (400, "Rate limit hit", "OAuthException"),
    131056: (400, "(Business Account, Consumer Account) pair rate limit hit", "OAuthException"),
    100: (400, "Invalid parameter", "OAuthException"),
}


@dataclass(frozen=True)
class Reply:
    """One scripted answer: status, body (a dict/list is sent as JSON, bytes or str as is, None empty), headers."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering (the client sees a transport error)

    @classmethod
    def dropped(cls) -> Reply:
        return cls(status=0, drop=True)


def graph_error(
    code: int, status: int | None = None, *, subcode: int | None = None, headers: dict[str, str] | None = None
) -> Reply:
    """Meta's error answer for `code` (status from ERRORS, else 400)."""
    default_status, message, kind = ERRORS.get(code, (400, "An unknown error occurred", "OAuthException"))
    error: dict[str, Any] = {"message": message, "type": kind, "code": code, "fbtrace_id": "AbCdEfFakeTrace"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return Reply(status or default_status, {"error": error}, headers or {})


@dataclass
class Request:
    """One request as received; `status` is what it was answered (None while held or if dropped)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any  # the parsed body, None if it was not JSON
    raw: bytes
    time: float  # time.monotonic() at arrival
    status: int | None = None

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def is_read(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("status") == "read"


class _Handler(tornado.web.RequestHandler):
    def initialize(self, graph: FakeGraph) -> None:
        self.graph = graph

    async def post(self, path: str) -> None:
        await self.graph._answer(self)


class FakeGraph:
    """The fake server; a context manager (start on enter, stop on exit) or start()/close()."""

    def __init__(self, record: IO[bytes] | None = None) -> None:
        self.requests: list[Request] = []
        self.record = record  # each accepted message, a JSON line (accepted_line); then requests keeps none
        self._scripted: list[Reply] = []
        self._wamids = itertools.count(1)
        self._lock = threading.Condition()
        self._open = threading.Event()  # set: requests are answered; clear: they wait (hold)
        self._open.set()
        self._hold_reads = True
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.port = 0
        self._status_url: str | None = None
        self._app_secret = b""
        # statuses to deliver (wamid, recipient, "sent", tag), on the fake's loop
        self._statuses: asyncio.Queue[tuple[str, str, str, str | None]] | None = None
        self.statuses_delivered = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ----

    def start(self) -> FakeGraph:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(sockets),), name="fake-graph", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake Graph API did not start")
        return self

    def close(self) -> None:
        self._open.set()  # held requests finish
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeGraph:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _serve(self, sockets: list[socket.socket]) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = tornado.web.Application([(r"(/.*)", _Handler, {"graph": self})], log_function=lambda handler: None)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        self._statuses = asyncio.Queue()
        senders = [asyncio.create_task(self._send_statuses()) for _ in range(STATUS_SENDERS)]
        self._ready.set()
        await self._stop.wait()
        for task in senders:
            task.cancel()
        server.stop()
        await server.close_all_connections()

    # ---- what a test controls ----

    def script(self, *replies: Reply | tuple[Any, ...]) -> None:
        """Queue answers, used in order by the next requests: Reply objects or (status, body[, headers]) tuples."""
        with self._lock:
            self._scripted.extend(r if isinstance(r, Reply) else Reply(*r) for r in replies)

    def statuses_to(self, url: str | None, app_secret: str = "") -> None:
        """POST the statuses of each tagged message accepted from now on (and those still queued) to `url`."""
        self._app_secret = app_secret.encode() or self._app_secret
        self._status_url = url

    def hold(self, reads: bool = True) -> None:
        """From now on, requests (but read receipts if not `reads`) are recorded but not answered until release()."""
        self._hold_reads = reads
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Request]:
        """Block until at least `count` requests arrived (TimeoutError otherwise); returns them all."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"{len(self.requests)} request(s) arrived, {count} expected")
            return list(self.requests)

    # ---- what a test reads (answered 2xx only: what WhatsApp took) ----

    def sent(self, to: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the messages accepted, in order, optionally only those to `to`."""
        with self._lock:
            return [
                r.json
                for r in self.requests
                if r.accepted and not r.is_read and isinstance(r.json, dict) and (to is None or r.json.get("to") == to)
            ]

    def sent_texts(self, to: str | None = None) -> list[str]:
        return [m["text"]["body"] for m in self.sent(to) if m.get("type") == "text"]

    def sent_images(self, to: str | None = None) -> list[dict[str, Any]]:
        """The `image` objects accepted: {"link" | "id", "caption"?}."""
        return [m["image"] for m in self.sent(to) if m.get("type") == "image"]

    def reads(self) -> list[str]:
        """message_id of every read receipt accepted."""
        with self._lock:
            return [r.json["message_id"] for r in self.requests if r.accepted and r.is_read]

    # ---- the server side (runs on the fake's own loop) ----

    def _next_reply(self, request: Request) -> Reply:
        with self._lock:
            if self._scripted:
                return self._scripted.pop(0)
        if request.is_read:
            return Reply(200, {"success": True})
        to = request.json.get("to") if isinstance(request.json, dict) else None
        return Reply(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to}],
                "messages": [{"id": f"wamid.OUT{next(self._wamids)}"}],
            },
        )

    async def _send_statuses(self) -> None:
        """Deliver queued statuses as Meta does: a signed POST of up to STATUS_BATCH of them; anything but a 200 (or
        no answer) is retried."""
        assert self._statuses is not None
        client = tornado.httpclient.AsyncHTTPClient()
        while True:
            batch = [await self._statuses.get()]
            while len(batch) < STATUS_BATCH and not self._statuses.empty():
                batch.append(self._statuses.get_nowait())
            body = whatsapp.status_webhook(batch)
            while True:
                url = self._status_url
                headers = {whatsapp.SIGNATURE_HEADER: whatsapp.sign(self._app_secret, body), "Content-Type": "application/json"}
                with contextlib.suppress(Exception):  # refused, reset, timed out, non-200: the daemon is down or busy
                    answer = await client.fetch(url or "", method="POST", body=body, headers=headers, request_timeout=5)
                    if answer.code == 200:
                        self.statuses_delivered += len(batch)
                        break
                await asyncio.sleep(STATUS_RETRY_S)

    async def _answer(self, handler: _Handler) -> None:
        raw = handler.request.body
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        headers = dict(handler.request.headers)
        request = Request(handler.request.method or "POST", handler.request.path, headers, body, raw, time.monotonic())
        with self._lock:
            self.requests.append(request)
            self._lock.notify_all()
        # polled: hold/release come from other threads
        while not self._open.is_set() and (self._hold_reads or not request.is_read):
            await asyncio.sleep(0.005)
        reply = self._next_reply(request)
        if reply.drop:
            handler.request.connection.detach().close()  # type: ignore[union-attr]
            handler._finished = True  # nothing more to write: Tornado must not finish() a detached connection
            return
        handler.set_status(reply.status)
        for name, value in reply.headers.items():
            handler.set_header(name, value)
        if isinstance(reply.body, dict | list):
            handler.set_header("Content-Type", "application/json")
            handler.write(orjson.dumps(reply.body))
        elif reply.body is not None:
            handler.write(reply.body)
        with self._lock:
            request.status = reply.status
            body = request.json if isinstance(request.json, dict) else {}
            tag = body.get(whatsapp.CALLBACK_DATA)
            if request.accepted and isinstance(tag, str) and self._statuses is not None and self._status_url is not None:
                wamid = str((reply.body or {}).get("messages", [{}])[0].get("id")) if isinstance(reply.body, dict) else ""
                for status in ("sent", "delivered"):  # (and "read", later, when the customer opens it)
                    self._statuses.put_nowait((wamid, str(body.get("to")), status, tag))
            if self.record is not None:
                self.requests.remove(request)  # a long run: kept in the file only
                if request.accepted and not request.is_read:
                    self.record.write(orjson.dumps(accepted_line(request.json)) + b"\n")
                    self.record.flush()


STATUS_SENDERS = 4  # statuses POSTed at once (Meta's order between messages is not guaranteed either)
STATUS_RETRY_S = 0.05
STATUS_BATCH = 100  # Meta puts several statuses in one webhook too; one at a time could not keep up with a load test


def accepted_line(body: Any) -> dict[str, Any]:
    """What the record file keeps of an accepted message: who, what, and the message it answers."""
    body = body if isinstance(body, dict) else {}
    return {k: body.get(k) for k in ("to", "type", "text", "image", "context", whatsapp.CALLBACK_DATA)}


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A loopback URL nothing listens on (connections are refused): the Graph API unreachable."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake WhatsApp Graph API recording what it accepts.")
    parser.add_argument("--record", required=True, metavar="FILE", help="append each accepted message here")
    parser.add_argument("--app-secret", default="", help="sign statuses with it (given a statuses_to URL)")
    args = parser.parse_args()
    with open(args.record, "ab") as record, FakeGraph(record) as graph:
        print(json.dumps({"port": graph.port}), flush=True)
        for line in sys.stdin:  # until the test closes our stdin (or dies)
            command = json.loads(line)
            graph.statuses_to(command["statuses_to"], args.app_secret)


if __name__ == "__main__":
    main()
