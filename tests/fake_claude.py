"""A fake Anthropic Messages API on loopback, for the real `anthropic` SDK: `POST /v1/messages` only.

Tornado on 127.0.0.1 in a thread of its own (its own event loop), so sync tests, `asyncio.run` tests and daemon
subprocesses can all talk to it:

    with FakeClaude() as fake:
        fake.script(tool_use("send_photos", {"album": "salado", "count": 3}), text("Aquí tienes"))
        ... AsyncAnthropic(api_key="test-key", base_url=fake.url) ...
        fake.requests[0].json["messages"]

Every request is recorded (headers, parsed JSON). Scripted replies are consumed in order; with none left the fake
answers a text echoing the last user text. A request the real API would refuse (no API key, no messages, an empty
text block, a tool_use left without its tool_result, more than 4 cache breakpoints...) gets the API's 400/401 error
and consumes no scripted reply, so a test cannot pass on a request the real service would reject. Bodies have the
real shape (id, type, role, model, content, stop_reason, stop_sequence, usage with the cache fields) so the SDK
parses them. `hold()` makes requests wait (after being recorded) until `release()`: for crash and timeout tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

MAX_CACHE_BREAKPOINTS = 4  # the API's limit on blocks with cache_control (Anthropic docs, "Prompt caching")
_ids = itertools.count(1)


@dataclass(frozen=True)
class Reply:
    """One scripted answer: HTTP status, JSON body, extra headers (e.g. retry-after-ms)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One request as received: headers (lowercase names) and the parsed JSON body."""

    path: str
    headers: dict[str, str]
    json: dict[str, Any]

    def user_texts(self) -> list[str]:
        """The text blocks (or string contents) of the user turns, in order."""
        out: list[str] = []
        for m in self.json.get("messages", []):
            if m.get("role") == "user":
                content = m.get("content")
                if isinstance(content, str):
                    out.append(content)
                else:
                    out += [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        return out


def api_key(headers: dict[str, str]) -> str | None:
    """The key a request carries: `x-api-key`, or `Authorization: Bearer` (what SDK 2.x sends for api_key=)."""
    bearer = headers.get("authorization", "")
    return headers.get("x-api-key") or (bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else None) or None


def usage(input_tokens: int = 10, output_tokens: int = 5, cache_read: int = 0, cache_write: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
    }


def message(content: list[dict[str, Any]], stop_reason: str = "end_turn", use: dict[str, Any] | None = None) -> Reply:
    """A 200 Message; `id` and `model` are filled in when served (the model echoes the request's)."""
    body = {
        "type": "message",
        "role": "assistant",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": use or usage(),
    }
    return Reply(200, body)


def text(reply: str, use: dict[str, Any] | None = None, stop_reason: str = "end_turn") -> Reply:
    return message([{"type": "text", "text": reply}], stop_reason, use)


def tool_use(name: str, tool_input: dict[str, Any], reply: str | None = None, use: dict[str, Any] | None = None) -> Reply:
    """Claude calling a tool (optionally after some text), stop_reason "tool_use"; the id is "toolu_fake_N"."""
    content: list[dict[str, Any]] = [{"type": "text", "text": reply}] if reply else []
    content.append({"type": "tool_use", "id": f"toolu_fake_{next(_ids):04d}", "name": name, "input": tool_input})
    return message(content, "tool_use", use)


def error(status: int, kind: str = "api_error", msg: str = "fake error", headers: dict[str, str] | None = None) -> Reply:
    """An error as the API sends it: {"type": "error", "error": {"type", "message"}, "request_id"}."""
    body = {"type": "error", "error": {"type": kind, "message": msg}, "request_id": f"req_fake_{next(_ids):04d}"}
    return Reply(status, body, headers or {})


def problem(headers: dict[str, str], body: object) -> Reply | None:
    """The error the real API would answer for this request, or None when it would accept it."""
    if not api_key(headers):
        return error(401, "authentication_error", "an API key is required (x-api-key or Authorization: Bearer)")
    if not isinstance(body, dict):
        return error(400, "invalid_request_error", "body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return error(400, "invalid_request_error", "model: Field required")
    if isinstance(body.get("max_tokens"), bool) or not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return error(400, "invalid_request_error", "max_tokens: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error(400, "invalid_request_error", "messages: at least one message is required")
    blocks: list[Any] = [*body.get("tools", []), *(body["system"] if isinstance(body.get("system"), list) else [])]
    pending: set[str] = set()  # tool_use ids of the previous assistant turn, each needing a tool_result
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            return error(400, "invalid_request_error", f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i == 0 and m["role"] != "user":
            return error(400, "invalid_request_error", "messages: first message must use the \"user\" role")
        content = m.get("content")
        content = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(content, list) or not content:
            return error(400, "invalid_request_error", f"messages.{i}: content must be non-empty")
        blocks += content
        if any(b.get("type") == "text" and not str(b.get("text", "")).strip() for b in content):
            return error(400, "invalid_request_error", f"messages.{i}: text content blocks must contain non-whitespace text")
        results = {b.get("tool_use_id") for b in content if b.get("type") == "tool_result"}
        if pending - results or results - pending:
            return error(400, "invalid_request_error", f"messages.{i}: each tool_use needs a tool_result in the next message")
        pending = {b.get("id") for b in content if b.get("type") == "tool_use"} if m["role"] == "assistant" else set()
    if sum(1 for b in blocks if isinstance(b, dict) and b.get("cache_control")) > MAX_CACHE_BREAKPOINTS:
        return error(400, "invalid_request_error", "A maximum of 4 blocks with cache_control may be provided")
    return None


def echo(request: Request) -> Reply:
    """The default answer: "echo: " and the newest user text."""
    texts = request.user_texts()
    return text("echo: " + (texts[-1] if texts else ""))


class _Messages(tornado.web.RequestHandler):
    def initialize(self, fake: FakeClaude) -> None:
        self.fake = fake

    def check_xsrf_cookie(self) -> None:  # an API, not a form
        pass

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body)
        except ValueError:
            body = None
        request = Request(self.request.path, {k.lower(): v for k, v in self.request.headers.items()}, body)
        self.fake._record(request)
        while self.fake._held.is_set():
            await asyncio.sleep(0.005)
        reply = problem(request.headers, body) or self.fake._next(request)
        out = dict(reply.body)
        if reply.status == 200:
            out.setdefault("id", f"msg_fake_{next(_ids):04d}")
            out.setdefault("model", body["model"])
        self.set_status(reply.status)
        self.set_header("Content-Type", "application/json")
        self.set_header("request-id", f"req_fake_{next(_ids):04d}")
        for name, value in reply.headers.items():
            self.set_header(name, value)
        self.finish(json.dumps(out))


class FakeClaude:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._script: list[Reply] = []
        self._lock = threading.Condition()
        self._held = threading.Event()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *replies: Reply) -> None:
        """Queue replies, answered in order to the next requests the API would accept."""
        with self._lock:
            self._script.extend(replies)

    def pending(self) -> int:
        """Scripted replies not served yet."""
        with self._lock:
            return len(self._script)

    def hold(self) -> None:
        """From now on, requests are recorded and then wait, unanswered, until release()."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def wait_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least `count` requests were received; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)
            self._lock.notify_all()

    def _next(self, request: Request) -> Reply:
        with self._lock:
            if self._script:
                return self._script.pop(0)
        return echo(request)

    def __enter__(self) -> FakeClaude:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(sockets,), name="fake-claude", daemon=True)
        self._thread.start()
        self._ready.wait(5)
        return self

    def _serve(self, sockets: list[socket.socket]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = tornado.web.Application([(r"/v1/messages", _Messages, {"fake": self})], log_function=lambda handler: None)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.stop()
            loop.run_until_complete(server.close_all_connections())
            loop.close()

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
