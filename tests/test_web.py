"""The webhook over real HTTP on loopback (a Tornado server in this process, a real store on disk): Meta's
handshake, signatures, size and shape errors, durable acknowledgement, dedup, statuses, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import io
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web
import uvloop
from tornado.ioloop import IOLoop
from tornado.platform.asyncio import BaseAsyncIOLoop

from natalia_secure import web, whatsapp
from natalia_secure.assistant import Outgoing
from natalia_secure.catalog import load as load_catalog
from natalia_secure.intake import Intake, WebhookSecrets
from natalia_secure.masterkey import MasterKey
from natalia_secure.metrics import Metrics
from natalia_secure.natalia import OfflineNatalia
from natalia_secure.replies import Conversations
from natalia_secure.store import Store, StoreOptions
from natalia_secure.web import Deps, Health, http_date, make_app

from .conftest import configured_logs

CATALOG = load_catalog(None)
SECRET = b"test-app-secret"
TOKEN = "test-verify-token"
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@dataclass
class Recorder:
    """An outbox that keeps what it was asked to send."""

    sent: list[tuple[str, Outgoing, str | None]] = field(default_factory=list)

    async def send(self, to: str, part: Outgoing, reply_to: str | None = None) -> str:
        self.sent.append((to, part, reply_to))
        return "wamid.out"

    async def mark_read(self, message_id: str, typing: bool = False) -> None:
        return None


@dataclass
class Server:
    url: str
    store: Store
    intake: Intake
    conversations: Conversations
    outbox: Recorder
    metrics: Metrics
    client: tornado.httpclient.AsyncHTTPClient
    http: web.HTTPServer

    async def fetch(
        self, path: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tornado.httpclient.HTTPResponse:
        return await self.client.fetch(self.url + path, method=method, body=body, headers=headers, raise_error=False)

    async def post(
        self, body: bytes, signature: str | None = "sign", path: str = "/webhook"
    ) -> tornado.httpclient.HTTPResponse:
        headers = {"Content-Type": "application/json"}
        if signature == "sign":
            signature = whatsapp.sign(SECRET, body)
        if signature is not None:
            headers[whatsapp.SIGNATURE_HEADER] = signature
        return await self.fetch(path, "POST", body, headers)

    def metric(self, name: str, labels: str = "") -> float:
        value = self.metrics.registry.get_sample_value(name, dict(kv.split("=") for kv in labels.split(",")) if labels else None)
        return value or 0.0


def health_of(store: Store) -> Callable[[], Health]:
    def health() -> Health:
        if store.degraded:
            return Health(False, "degraded", f"store: {store.degraded}", {"sessions": len(store)})
        return Health(True, "ok", None, {"sessions": len(store)})

    return health


@contextlib.asynccontextmanager
async def serving(
    state_dir: str,
    master: MasterKey,
    *,
    intake_type: type[Intake] = Intake,
    body_timeout: float = 30.0,
    idle_timeout: float = 75.0,
    **options: Any,
) -> AsyncIterator[Server]:
    store = Store.open(state_dir, master, StoreOptions(chunk=4096, **options))
    metrics = Metrics()
    outbox = Recorder()
    conversations = Conversations(store, OfflineNatalia(CATALOG), outbox, metrics, CATALOG, concurrency=4)
    intake = intake_type(store, conversations, metrics, WebhookSecrets(SECRET, TOKEN))
    app = make_app(Deps(intake, metrics, health_of(store)), body_timeout)
    server = web.HTTPServer(app, max_body_size=4 * 1024 * 1024, idle_timeout=idle_timeout)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets(sockets)
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_body_size=16 * 1024 * 1024)
    try:
        url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        yield Server(url, store, intake, conversations, outbox, metrics, client, server)
    finally:
        client.close()
        server.stop()
        await server.close_all_connections()
        await conversations.close(timeout=5)
        await store.aclose()


def one(wamid: str, phone: str = "34600000001", text: str = "Hola", ts: int = 1_770_000_000) -> bytes:
    return whatsapp.text_webhook([(wamid, phone, text, ts)])


async def settle(srv: Server) -> None:
    """Until every accepted message is answered."""
    for _ in range(500):
        if not srv.conversations.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("replies did not settle")


def test_subscription_handshake_echoes_the_raw_challenge(state_dir: str, master: MasterKey) -> None:
    """GET /webhook with hub.mode=subscribe and our token answers 200 with exactly hub.challenge; anything else 403."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            ok = await srv.fetch(f"/webhook?hub.mode=subscribe&hub.verify_token={TOKEN}&hub.challenge=1158201444")
            assert (ok.code, ok.body) == (200, b"1158201444")
            for query in (
                "hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1",
                f"hub.mode=unsubscribe&hub.verify_token={TOKEN}&hub.challenge=1",
                "hub.challenge=1",
                "",
            ):
                refused = await srv.fetch("/webhook?" + query)
                assert refused.code == 403, query

    run(go())


def test_a_signed_message_is_durable_before_the_200(state_dir: str, master: MasterKey) -> None:
    """200 comes only after the message is in the journal and fsynced: a fresh read-only open (what a restart
    would load) already holds it when the answer arrives."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            r = await srv.post(one("wamid.A1", text="Quiero fotos de salado"))
            assert r.code == 200 and json.loads(r.body) == {"messages": 1, "duplicates": 0, "statuses": 0}
            on_disk = Store.open(state_dir, master, readonly=True)
            assert [m["content"] for m in on_disk.get("34600000001")["messages"]][:1] == ["Quiero fotos de salado"]
            assert on_disk.is_claimed("wamid.A1")
            assert srv.metric("natalia_webhooks_total", "outcome=ok") == 1
            assert srv.metric("natalia_ack_latency_seconds_count") == 1

    run(go())


@pytest.mark.parametrize(
    "signature", [None, "", "sha256=", "sha256=" + "0" * 64, "sha1=abc", "sha256=" + whatsapp.sign(b"other", b"x")[7:]]
)
def test_a_missing_or_wrong_signature_gets_401_and_records_nothing(
    state_dir: str, master: MasterKey, signature: str | None
) -> None:
    """No work and no record for an unsigned or wrongly signed POST."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            r = await srv.post(one("wamid.X"), signature=signature)
            assert r.code == 401
            assert len(srv.store) == 0 and not srv.store.is_claimed("wamid.X") and srv.store.lsn == 0
            assert srv.metric("natalia_signature_failures_total") == 1

    run(go())


def test_the_signature_covers_the_exact_bytes(state_dir: str, master: MasterKey) -> None:
    """Re-serialising the JSON (a space added) breaks the signature: the raw body is what is checked."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            body = one("wamid.B")
            r = await srv.post(body + b" ", signature=whatsapp.sign(SECRET, body))
            assert r.code == 401

    run(go())


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"object": "whatsapp_business_account", "entry": {}}', "entry is not an array"),
        (whatsapp.text_webhook([("wamid.C", "", "x", 1)]), "from"),
        (whatsapp.text_webhook([("wamid.C", "3460\n0", "x", 1)]), "sender"),
        (whatsapp.text_webhook([("w" * 513, "34600000001", "x", 1)]), "longer than 512"),
    ],
)
def test_a_malformed_body_gets_400_naming_the_problem_and_nothing_is_recorded(
    state_dir: str, master: MasterKey, body: bytes, fragment: str
) -> None:
    """A signed body of the wrong shape is refused whole, with a JSON error that says where."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            r = await srv.post(body)
            assert r.code == 400 and fragment in json.loads(r.body)["error"]
            assert srv.store.lsn == 0

    run(go())


def test_a_bad_message_later_in_the_batch_refuses_the_whole_batch(state_dir: str, master: MasterKey) -> None:
    """Checked before anything is appended: the good first message is not half-accepted."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            body = whatsapp.text_webhook([("wamid.ok", "34600000001", "hola", 1), ("wamid.bad", "34 60\t0", "x", 1)])
            assert (await srv.post(body)).code == 400
            assert srv.store.lsn == 0 and not srv.store.is_claimed("wamid.ok")

    run(go())


def test_bodies_over_3_mb_get_413(state_dir: str, master: MasterKey) -> None:
    """Meta's limit: by Content-Length at once, and for a chunked body as soon as it passes 3 MB; exactly 3 MB is
    read (and judged on its signature)."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            big = b"x" * (whatsapp.MAX_BODY + 1)
            assert (await srv.post(big)).code == 413
            exact = b" " * (whatsapp.MAX_BODY - 2) + b"{}"
            assert (await srv.post(exact)).code == 200  # a valid signed object of no known kind: ignored

            async def chunks(write: Callable[[bytes], Awaitable[None]]) -> None:
                for _ in range(4):
                    await write(b"y" * (1024 * 1024))

            r = await srv.client.fetch(
                srv.url + "/webhook",
                method="POST",
                body_producer=chunks,
                raise_error=False,
                headers={whatsapp.SIGNATURE_HEADER: "sha256=" + "0" * 64},
            )
            assert r.code in (413, 599)  # 413, or the connection closed while we were still sending
            assert srv.metric("natalia_webhooks_total", "outcome=too_large") >= 1
            assert srv.store.lsn == 0

    run(go())


def test_every_message_of_a_batch_is_kept_in_order(state_dir: str, master: MasterKey) -> None:
    """Three messages from two phones in one POST: all acknowledged, each session in arrival order."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            body = whatsapp.text_webhook(
                [
                    ("wamid.1", "34600000001", "uno", 1),
                    ("wamid.2", "34600000002", "dos", 1),
                    ("wamid.3", "34600000001", "tres", 1),
                ]
            )
            r = await srv.post(body)
            assert json.loads(r.body)["messages"] == 3
            await settle(srv)
            first = [m["content"] for m in srv.store.get("34600000001")["messages"] if m["role"] == "user"]
            assert first == ["uno", "tres"]
            assert srv.metric("natalia_messages_received_total", "kind=text") == 3

    run(go())


def test_a_redelivery_is_answered_200_without_a_second_reply(state_dir: str, master: MasterKey) -> None:
    """The wamid is claimed: Meta's retry of the same POST is acknowledged and does no work."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            body = one("wamid.D1")
            assert (await srv.post(body)).code == 200
            await settle(srv)
            r = await srv.post(body)
            assert r.code == 200 and json.loads(r.body) == {"messages": 0, "duplicates": 1, "statuses": 0}
            await settle(srv)
            assert len(srv.outbox.sent) == 1
            assert len(srv.store.get("34600000001")["messages"]) == 2  # the message and one reply
            assert srv.metric("natalia_dedup_hits_total") == 1

    run(go())


def test_a_redelivery_after_a_restart_gets_no_second_reply(state_dir: str, master: MasterKey) -> None:
    """Claims are durable: a new process (a new store opened from disk) still knows the message."""

    async def go() -> None:
        body = one("wamid.R1")
        async with serving(state_dir, master) as srv:
            assert (await srv.post(body)).code == 200
            await settle(srv)
        async with serving(state_dir, master) as srv:
            r = await srv.post(body)
            assert r.code == 200 and json.loads(r.body)["duplicates"] == 1
            await asyncio.sleep(0.05)
            assert srv.outbox.sent == [] and len(srv.store.get("34600000001")["messages"]) == 2

    run(go())


def test_concurrent_duplicates_are_answered_only_once_durable(state_dir: str, master: MasterKey) -> None:
    """The same POST sent 20 times at once: one message, one reply, twenty 200s."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            body = one("wamid.C20")
            answers = await asyncio.gather(*(srv.post(body) for _ in range(20)))
            assert [a.code for a in answers] == [200] * 20
            assert sum(json.loads(a.body)["messages"] for a in answers) == 1
            await settle(srv)
            assert len(srv.outbox.sent) == 1

    run(go())


def test_statuses_are_counted_and_never_create_sessions(state_dir: str, master: MasterKey) -> None:
    """A delivery status is 200, a metric, and nothing in the store."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            status = {"id": "wamid.S", "status": "delivered", "timestamp": "1770000000", "recipient_id": "34600000009"}
            change = {"field": "messages", "value": {"messaging_product": "whatsapp", "statuses": [status]}}
            body = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [change]}]}).encode()
            r = await srv.post(body)
            assert r.code == 200 and json.loads(r.body)["statuses"] == 1
            assert len(srv.store) == 0 and srv.store.lsn == 0
            assert srv.metric("natalia_statuses_total", "status=delivered") == 1

    run(go())


def test_a_status_of_our_part_is_acknowledged_only_once_durable(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status carrying our tag may be all a restart learns of a part WhatsApp took: it gets 200 only once the
    store has made durable what it appended (503 while it cannot, so Meta redelivers it); another sender's status
    needs nothing of the store."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            srv.store.add_message("34600000009", "user", "hola", srv.store.clock(), message_id="wamid.Q")  # not durable

            def failing(fd: int) -> None:
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(os, "fsync", failing)
            ours = whatsapp.status_webhook([("wamid.OUT1", "34600000009", "delivered", "natalia-secure:ab12.0")])
            theirs = whatsapp.status_webhook([("wamid.OUT2", "34600000009", "delivered", "campaign-7")])
            assert (await srv.post(theirs)).code == 200
            assert (await srv.post(ours)).code == 503

    run(go())


def test_a_sent_status_records_our_part_and_a_failed_one_does_not(state_dir: str, master: MasterKey) -> None:
    """A reply of 2 parts, none recorded as sent: a "failed" status of part 0 records nothing (WhatsApp did not
    deliver it: it must still be sent); a "delivered" one records it; a "read" one of part 1 finishes the reply."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            parts = [{"text": "uno"}, {"text": "dos"}]
            srv.store.add_message("34600000009", "user", "hola", srv.store.clock(), message_id="wamid.Q")
            meta = {"pending": {"parts": parts, "id": "ab12"}}
            srv.store.add_message("34600000009", "assistant", "uno", srv.store.clock(), meta=meta)

            def status(kind: str, index: int) -> bytes:
                return whatsapp.status_webhook([(f"wamid.O{index}", "34600000009", kind, f"natalia-secure:ab12.{index}")])

            assert (await srv.post(status("failed", 0))).code == 200
            assert srv.store.meta("34600000009") == meta
            assert (await srv.post(status("delivered", 0))).code == 200
            assert srv.store.meta("34600000009")["sent_parts"] == 1
            assert (await srv.post(status("read", 1))).code == 200
            assert srv.store.meta("34600000009") == {} and srv.store._journal.durable_lsn == srv.store.lsn  # 200 once durable

    run(go())


def test_payloads_of_other_kinds_are_acknowledged_and_ignored(state_dir: str, master: MasterKey) -> None:
    """Another object or field, correctly signed: 200 and nothing recorded."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            for obj in (
                {"object": "page", "entry": []},
                {"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "account_update", "value": {}}]}]},
            ):
                r = await srv.post(json.dumps(obj).encode())
                assert r.code == 200
            assert srv.metric("natalia_webhooks_total", "outcome=ignored") == 2 and srv.store.lsn == 0

    run(go())


def test_a_store_that_cannot_persist_answers_503_and_recovers(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync fails (EIO): 503 and degraded health, nothing acknowledged; after a recovery snapshot the retry of the
    same POST is 200 and the message is answered exactly once."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            real_fsync = os.fsync

            def failing(fd: int) -> None:
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(os, "fsync", failing)
            body = one("wamid.F1")
            r = await srv.post(body)
            assert r.code == 503
            health = await srv.fetch("/healthz")
            assert health.code == 503 and json.loads(health.body)["status"] == "degraded"
            assert (await srv.post(one("wamid.F2"))).code == 503  # refused at once while degraded
            monkeypatch.setattr(os, "fsync", real_fsync)
            await srv.store.snapshot_async(full=True)  # what maintenance retries every 10 s
            assert (await srv.fetch("/healthz")).code == 200
            r = await srv.post(body)
            assert r.code == 200 and json.loads(r.body)["duplicates"] == 1  # held in memory, now durable
            await settle(srv)
            assert len(srv.outbox.sent) == 1
            assert srv.metric("natalia_webhooks_total", "outcome=unavailable") == 2

    run(go())


def test_a_stopping_daemon_answers_503(state_dir: str, master: MasterKey) -> None:
    """After SIGTERM new webhooks are refused so Meta retries them against the next process."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            srv.intake.stopping = True
            assert (await srv.post(one("wamid.S1"))).code == 503
            assert srv.store.lsn == 0

    run(go())


def test_health_and_metrics_hold_no_personal_data(state_dir: str, master: MasterKey) -> None:
    """/healthz is JSON with counts; /metrics is Prometheus text; neither names a phone or a text."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            await srv.post(one("wamid.P1", phone="34611122233", text="mi dirección secreta"))
            await settle(srv)
            health = await srv.fetch("/healthz")
            assert health.code == 200 and json.loads(health.body) == {"status": "ok", "reason": None, "sessions": 1}
            metrics = await srv.fetch("/metrics")
            assert metrics.code == 200 and b"natalia_webhooks_total" in metrics.body
            for r in (health, metrics):
                assert b"34611122233" not in r.body and b"secreta" not in r.body and b"wamid" not in r.body

    run(go())


def test_unknown_paths_and_methods_get_json_errors(state_dir: str, master: MasterKey) -> None:
    """404 and 405 are JSON, never an HTML traceback page."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            r = await srv.fetch("/nope")
            assert r.code == 404 and json.loads(r.body) == {"error": "not found"}
            r = await srv.fetch("/webhook", method="PUT", body=b"{}")
            assert r.code == 405 and "error" in json.loads(r.body)
            # only POST /webhook itself is taken at its request line (web.App); near misses are routed as usual
            for path in ("/webhook/", "/webhooks", "/Webhook", "//webhook"):
                r = await srv.fetch(path, "POST", b"{}")
                assert r.code == 404 and json.loads(r.body) == {"error": "not found"}, path
            r = await srv.fetch("/healthz", "POST", b"{}")
            assert r.code == 405 and "error" in json.loads(r.body)
            assert len(srv.store) == 0

    run(go())


def test_a_signed_post_with_a_query_string_is_a_webhook(state_dir: str, master: MasterKey) -> None:
    async def go() -> None:
        async with serving(state_dir, master) as srv:
            r = await srv.post(one("wamid.Q1"), path="/webhook?from=meta")
            assert r.code == 200 and json.loads(r.body)["messages"] == 1
            assert [m["content"] for m in srv.store.get("34600000001")["messages"]][:1] == ["Hola"]

    run(go())


def test_a_webhook_without_one_valid_host_gets_400_and_records_nothing(state_dir: str, master: MasterKey) -> None:
    """RFC 9112 3.2, checked as tornado.web checks every other request: an HTTP/1.1 request with no Host header,
    two, or an invalid one is refused; HTTP/1.0 may omit it."""

    async def send(port: int, version: str, hosts: list[str], body: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST /webhook {version}\r\n" + "".join(f"Host: {h}\r\n" for h in hosts)
        head += f"{whatsapp.SIGNATURE_HEADER}: {whatsapp.sign(SECRET, body)}\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        status = await asyncio.wait_for(reader.readline(), timeout=5)
        writer.close()
        return status

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            for hosts in ([], ["127.0.0.1", "evil.example"], ["127.0.0.1 evil.example"], ["a,b"]):
                status = await send(port, "HTTP/1.1", hosts, one("wamid.H1"))
                assert status.startswith(b"HTTP/1.1 400"), hosts
            assert len(srv.store) == 0
            assert (await send(port, "HTTP/1.1", [f"127.0.0.1:{port}"], one("wamid.H2"))).startswith(b"HTTP/1.1 200")
            assert (await send(port, "HTTP/1.0", [], one("wamid.H3", "34600000002"))).startswith(b"HTTP/1.1 200")
            assert len(srv.store) == 2

    run(go())


def test_an_unsigned_post_is_refused_before_its_body_is_read(state_dir: str, master: MasterKey) -> None:
    """A client that announces 3 MB without a signature gets 401 at once, though it never sends the body."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), timeout=5)
            assert status.startswith(b"HTTP/1.1 401")
            writer.close()
            assert srv.metric("natalia_signature_failures_total") == 1

    run(go())


def test_a_webhook_body_that_does_not_arrive_in_time_closes_its_connection(state_dir: str, master: MasterKey) -> None:
    """A signed POST whose body trickles (a client holding a connection and a buffer open): its connection is closed
    once the body timeout passes, unanswered, nothing recorded; a whole webhook meanwhile is answered as ever."""

    async def go() -> None:
        async with serving(state_dir, master, body_timeout=0.5) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = one("wamid.SLOW")
            head = f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{whatsapp.SIGNATURE_HEADER}: "
            writer.write(head.encode() + whatsapp.sign(SECRET, body).encode() + b"\r\n\r\n" + body[:10])
            await writer.drain()
            started = time.monotonic()
            assert (await srv.post(one("wamid.FAST"))).code == 200
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed, no answer
            assert 0.5 <= time.monotonic() - started < 3
            assert srv.store.claim_lsn("wamid.SLOW") is None and srv.store.claim_lsn("wamid.FAST") is not None
            writer.close()

    run(go())


def test_an_idle_or_trickling_connection_is_closed_and_a_busy_one_is_not(state_dir: str, master: MasterKey) -> None:
    """The idle timeout (a swept deadline, not Tornado's timeout future per request): a keep-alive connection with
    no next request, and one trickling a request's headers, are closed once it passes; a connection whose requests
    keep coming stays open for longer than the timeout, every request answered."""

    async def go() -> None:
        async with serving(state_dir, master, idle_timeout=0.5) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            idle = await asyncio.open_connection("127.0.0.1", port)
            assert (await raw_post(idle[1], idle[0], one("wamid.I1")))[0] == "HTTP/1.1 200 OK"
            trickle = await asyncio.open_connection("127.0.0.1", port)
            trickle[1].write(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            busy = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            for n in range(8):  # 1.6 s of requests 0.2 s apart on one connection
                assert (await raw_post(busy[1], busy[0], one(f"wamid.B{n}")))[0] == "HTTP/1.1 200 OK"
                await asyncio.sleep(0.2)
            for reader, writer in (idle, trickle):
                assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed, nothing more said
                writer.close()
            assert 0.5 <= time.monotonic() - started < 4
            assert (await raw_post(busy[1], busy[0], one("wamid.B8")))[0] == "HTTP/1.1 200 OK"
            busy[1].close()

    run(go())


class SlowIntake(Intake):
    async def _accept(self, body: bytes, signature: str | None) -> Any:
        await asyncio.sleep(1.6)
        return await super()._accept(body, signature)


def test_a_request_still_being_answered_is_not_cut_by_the_idle_timeout(state_dir: str, master: MasterKey) -> None:
    """The idle timeout closes connections that wait (or trickle), never one whose request is being answered: a
    webhook answered 1.6 s after it arrived, with a 0.5 s idle timeout, gets its 200 on the same connection."""

    async def go() -> None:
        async with serving(state_dir, master, intake_type=SlowIntake, idle_timeout=0.5) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, _, body = await raw_post(writer, reader, one("wamid.SLOWANSWER"))
            assert status == "HTTP/1.1 200 OK" and json.loads(body)["messages"] == 1
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # then idle: closed
            writer.close()

    run(go())


def test_tornados_idle_timeout_is_refused_not_ignored() -> None:
    with pytest.raises(TypeError, match="idle_timeout"):
        web.HTTPServer(tornado.web.Application(), idle_connection_timeout=5)


async def raw_post(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, body: bytes) -> tuple[str, dict[str, str], bytes]:
    """One signed POST /webhook on an open connection: the status line, the headers (lower-case names), the body."""
    head = f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{whatsapp.SIGNATURE_HEADER}: "
    writer.write(head.encode() + whatsapp.sign(SECRET, body).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status = (await reader.readline()).decode().strip()
    headers = {}
    while (line := (await reader.readline()).decode().strip()) != "":
        name, value = line.split(":", 1)
        headers[name.lower()] = value.strip()
    return status, headers, await reader.readexactly(int(headers["content-length"]))


def test_webhook_answers_are_json_with_a_date_and_keep_the_connection(state_dir: str, master: MasterKey) -> None:
    """POST /webhook answers as Meta expects of an HTTP/1.1 server: JSON, Date (RFC 9110), no caching, and the
    connection kept open for the next POST (Meta reuses connections)."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for n in range(3):
                status, headers, body = await raw_post(writer, reader, one(f"wamid.K{n}"))
                assert status == "HTTP/1.1 200 OK" and json.loads(body) == {"messages": 1, "duplicates": 0, "statuses": 0}
                assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
                assert "connection" not in headers  # kept alive
                assert abs(email.utils.parsedate_to_datetime(headers["date"]).timestamp() - srv.store.clock() / 1000) < 5
            writer.close()
            assert srv.metric("natalia_webhooks_total", "outcome=ok") == 3

    run(go())


def server_streams(srv: Server) -> list[Any]:
    """The server's side of each open connection (Tornado's IOStream)."""
    return [conn.stream for conn in srv.http._connections]


def run_on(loop: str, coro: Awaitable[T]) -> T:
    """`run` on asyncio's own event loop or on uvloop's, the daemon's (daemon.serve)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def raw_posts(bodies: list[bytes]) -> bytes:
    """Signed POST /webhook requests, back to back, as one client would pipeline them."""
    out = b""
    for body in bodies:
        head = f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{whatsapp.SIGNATURE_HEADER}: "
        out += head.encode() + whatsapp.sign(SECRET, body).encode() + b"\r\n\r\n" + body
    return out


def user_texts(srv: Server, phone: str = "34600000001") -> list[str]:
    session = srv.store.get(phone)
    return [m["content"] for m in session["messages"] if m["role"] == "user"] if session else []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_webhooks_on_a_kept_connection_cost_one_read_no_registration_change_and_keep_nodelay(
    state_dir: str, master: MasterKey, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """web.ConnectionStream: webhooks one after another on a keep-alive connection never take its socket out of the
    event loop's read set (Tornado's IOStream does, and puts it back, for every request), read the socket only
    when it has bytes (Tornado's also meets an empty socket once per request), and TCP_NODELAY stays on (Tornado
    turns it off after each answer)."""
    empty_reads: list[Any] = []
    read_from_fd = tornado.iostream.IOStream.read_from_fd
    removed: list[int] = []
    update_handler = BaseAsyncIOLoop.update_handler

    def counting_read(stream: tornado.iostream.IOStream, buf: Any) -> int | None:
        n = read_from_fd(stream, buf)
        if n is None:
            empty_reads.append(stream)
        return n

    def counting_update(io_loop: BaseAsyncIOLoop, fd: Any, events: int) -> None:
        number, _ = io_loop.split_fd(fd)
        if number in io_loop.readers and not events & IOLoop.READ:
            removed.append(number)
        update_handler(io_loop, fd, events)

    monkeypatch.setattr(tornado.iostream.IOStream, "read_from_fd", counting_read)
    monkeypatch.setattr(BaseAsyncIOLoop, "update_handler", counting_update)

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for n in range(5):
                assert (await raw_post(writer, reader, one(f"wamid.R{n}")))[0] == "HTTP/1.1 200 OK"
                if n == 0:
                    del empty_reads[:]  # a new connection's first read may find nothing yet, as with Tornado's
                await asyncio.sleep(0.05)  # the server waits for the next request (an empty socket)
            assert removed == []
            (stream,) = server_streams(srv)
            assert empty_reads == []
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            writer.close()
            await settle(srv)

    run_on(loop, go())


class HeldIntake(Intake):
    """Answers nothing until `gate` is set; `entered` once the first webhook is being answered."""

    gate: asyncio.Event
    entered: asyncio.Event

    async def _accept(self, body: bytes, signature: str | None) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await super()._accept(body, signature)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pipelined_webhooks_are_answered_in_order_and_what_is_read_ahead_is_bounded(
    state_dir: str, master: MasterKey, loop: str
) -> None:
    """A client that sends requests ahead (HTTP/1.1 pipelining) while one is being answered gets every answer, in
    order; meanwhile the server reads ahead one socket read at a time until READ_AHEAD bytes wait, then stops
    listening (less than READ_AHEAD + one read held; Tornado's IOStream reads up to 64 KiB), and the rest waits
    in the kernel until the answers make room."""

    async def go() -> None:
        HeldIntake.gate, HeldIntake.entered = asyncio.Event(), asyncio.Event()
        async with serving(state_dir, master, intake_type=HeldIntake) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            texts = [f"pipelined {n:03d} " + "x" * 2000 for n in range(150)]  # ~330 KB in all
            writer.write(raw_posts([one(f"wamid.P{n:03d}", text=text) for n, text in enumerate(texts)]))
            await asyncio.wait_for(HeldIntake.entered.wait(), timeout=5)
            (stream,) = server_streams(srv)
            await until(lambda: not stream._state & IOLoop.READ)  # it has stopped reading ahead
            assert web.READ_AHEAD <= stream._read_buffer_size < web.READ_AHEAD + web.READ_CHUNK
            HeldIntake.gate.set()
            await writer.drain()
            for _ in texts:
                status = (await reader.readline()).decode().strip()
                assert status == "HTTP/1.1 200 OK"
                headers = {}
                while (line := (await reader.readline()).decode().strip()) != "":
                    name, value = line.split(":", 1)
                    headers[name.lower()] = value.strip()
                await reader.readexactly(int(headers["content-length"]))
            writer.close()
            assert user_texts(srv) == texts
            await settle(srv)

    run_on(loop, go())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pipelined_webhooks_then_a_half_close_lose_no_message(state_dir: str, master: MasterKey, loop: str) -> None:
    """A client that pipelines webhooks and shuts its side at once is seen to close while the first is answered,
    so the answers still to come are not written (Tornado's IOStream noticed only after them: README, CHANGELOG);
    every message is still handled and durable, and the redelivery that follows is answered as duplicates."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            bodies = [one(f"wamid.H{n}", text=f"half-close {n}") for n in range(3)]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw_posts(bodies))
            writer.write_eof()
            await asyncio.wait_for(reader.read(), timeout=5)  # whatever was answered, then the close
            writer.close()
            await until(lambda: len(user_texts(srv)) == 3)
            assert user_texts(srv) == [f"half-close {n}" for n in range(3)]
            for body in bodies:  # Meta redelivers what was not answered
                response = await srv.post(body)
                assert response.code == 200 and json.loads(response.body)["duplicates"] == 1
            assert user_texts(srv) == [f"half-close {n}" for n in range(3)]
            await settle(srv)

    run_on(loop, go())


def test_http_date_is_the_imf_fixdate_of_the_second() -> None:
    """RFC 9110 5.6.7's example, and a later second (the cached value follows the clock)."""
    assert http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(784111778) == "Sun, 06 Nov 1994 08:49:38 GMT"


@pytest.fixture
def log_out() -> Iterator[io.StringIO]:
    """The daemon's logging (JSON at info) into a buffer, undone afterwards."""
    with configured_logs("info") as out:
        yield out


def events(out: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [line for line in map(json.loads, out.getvalue().splitlines()) if line["event"] == name]


class BrokenIntake(Intake):
    async def _accept(self, body: bytes, signature: str | None) -> Any:
        raise RuntimeError("a bug in the intake")


def test_an_intake_bug_answers_500_json_and_is_logged(state_dir: str, master: MasterKey, log_out: io.StringIO) -> None:
    """An exception nobody expected still gets an answer (500, JSON: Meta retries) and an error line that names
    the request, not the body; the connection is not left hanging."""

    async def go() -> None:
        async with serving(state_dir, master, intake_type=BrokenIntake) as srv:
            r = await srv.post(one("wamid.B1", text="texto del cliente"))
            assert r.code == 500 and json.loads(r.body) == {"error": "internal server error"}
        (failed,) = events(log_out, "handler_failed")
        assert failed["level"] == "error" and failed["path"] == "/webhook" and failed["method"] == "POST"
        assert "RuntimeError: a bug in the intake" in failed["exception"]
        (access,) = events(log_out, "http_request")
        assert access["status"] == 500 and access["level"] == "error"
        assert "texto del cliente" not in log_out.getvalue()

    run(go())


def test_a_refused_post_is_logged_without_its_query(state_dir: str, master: MasterKey, log_out: io.StringIO) -> None:
    """The access line of a refused POST /webhook: warning, method, path without the query, status, duration."""

    async def go() -> None:
        async with serving(state_dir, master) as srv:
            r = await srv.fetch(f"/webhook?hub.verify_token={TOKEN}", "POST", b"{}", {"Content-Type": "application/json"})
            assert r.code == 401
        (access,) = events(log_out, "http_request")
        assert access["level"] == "warning" and access["path"] == "/webhook" and access["status"] == 401
        assert access["method"] == "POST" and access["duration_ms"] >= 0 and TOKEN not in log_out.getvalue()

    run(go())
