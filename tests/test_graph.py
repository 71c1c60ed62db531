"""The WhatsApp sending client against a fake Graph API on loopback: bodies, retries, error kinds, logs, metrics."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from natalia_secure import logs
from natalia_secure.assistant import Outgoing
from natalia_secure.catalog import Image
from natalia_secure.errors import SendError
from natalia_secure.graph import GraphClient, classify, code_label, message_body, retry_after
from natalia_secure.metrics import Metrics

from .conftest import configured_logs
from .fake_graph import FakeGraph, Reply, closed_port, graph_error

PNID = "100000000000001"  # a made-up phone number id
TOKEN = "test-access-token-not-real"
PHONE = "15550001234"  # a 555 fiction number
TEXT = "hola, quiero fotos de salado"
WAMID = "wamid.HBgLMTU1NTAwMDEyMzQVAgASGBQzQUZBNDc4OTBDRDlEMTI0RkQ2RgA="
KEY = bytes(range(32))  # a fixed test pseudonym key, never a real one


class Sleeps:
    """A `sleep` that records the delays it is asked for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as g:
        yield g


def run(url: str, use: Callable[[GraphClient], Awaitable[Any]], **options: Any) -> tuple[Any, GraphClient, Sleeps]:
    """Make a client on `url` with recorded sleeps, run `use(client)` in a fresh event loop, close the client."""
    sleeps = Sleeps()
    client = GraphClient(url, "v24.0", PNID, TOKEN, Metrics(), sleep=sleeps, rng=random.Random(7), **options)

    async def main() -> Any:
        try:
            return await use(client)
        finally:
            await client.aclose()

    return asyncio.run(main()), client, sleeps


def failure_of(url: str, use: Callable[[GraphClient], Awaitable[Any]], **options: Any) -> tuple[SendError, GraphClient, Sleeps]:
    """run() a call that must raise SendError; returns the error, the client and the recorded sleeps."""
    sleeps = Sleeps()
    client = GraphClient(url, "v24.0", PNID, TOKEN, Metrics(), sleep=sleeps, rng=random.Random(7), **options)

    async def main() -> SendError:
        try:
            await use(client)
        except SendError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("no SendError was raised")

    return asyncio.run(main()), client, sleeps


def send_text(client: GraphClient) -> Awaitable[str]:
    return client.send(PHONE, Outgoing(text=TEXT))


def counted(client: GraphClient, metric: str, **labels: str) -> float:
    value = client.metrics.registry.get_sample_value(metric, labels)
    return value or 0.0


def expected_jitter(count: int, seed: int = 7, base: float = 1.0, cap: float = 30.0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0, min(cap, base * 2**attempt)) for attempt in range(count)]


# ---- what goes on the wire ----


def test_a_text_is_posted_to_the_messages_path_with_the_bearer_token(graph: FakeGraph) -> None:
    """A text is POSTed to /v24.0/<phone number id>/messages with the bearer token and Meta's exact JSON; the wamid returns."""
    wamid, _, sleeps = run(graph.url, send_text)
    (request,) = graph.requests
    assert request.method == "POST" and request.path == f"/v24.0/{PNID}/messages"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": PHONE,
        "type": "text",
        "text": {"preview_url": False, "body": TEXT},
    }
    assert wamid == "wamid.OUT1" and sleeps.delays == []
    assert graph.sent_texts() == [TEXT] and graph.sent_texts(to="15550009999") == []


def test_a_tag_goes_as_biz_opaque_callback_data() -> None:
    """What WhatsApp echoes in the message's statuses (replies.py settles unsure parts with it)."""
    body = message_body(PHONE, Outgoing(text=TEXT), "wamid.IN", tag="natalia-secure:ab.0")
    assert body["biz_opaque_callback_data"] == "natalia-secure:ab.0" and body["context"] == {"message_id": "wamid.IN"}
    assert "biz_opaque_callback_data" not in message_body(PHONE, Outgoing(text=TEXT))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image(link="https://example.com/salado-1.jpg"), {"link": "https://example.com/salado-1.jpg"}),
        (Image(media_id="1234567890"), {"id": "1234567890"}),
        (Image(link="https://example.com/s.jpg", caption="Salado"), {"link": "https://example.com/s.jpg", "caption": "Salado"}),
        (Image(media_id="42", caption="Dulce"), {"id": "42", "caption": "Dulce"}),
    ],
)
def test_an_image_is_sent_by_link_or_media_id_with_its_caption(graph: FakeGraph, image: Image, expected: dict[str, str]) -> None:
    """An image goes as type image with link or id, and its caption only when it has one."""
    run(graph.url, lambda c: c.send(PHONE, Outgoing(image=image)))
    (request,) = graph.requests
    envelope = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": PHONE, "type": "image"}
    assert request.json == {**envelope, "image": expected}
    assert graph.sent_images() == [expected]


def test_reply_to_adds_the_context_of_the_quoted_message(graph: FakeGraph) -> None:
    """reply_to becomes context.message_id; the next part, sent without it, carries no context."""

    async def two(client: GraphClient) -> list[str]:
        first = await client.send(PHONE, Outgoing(text=TEXT), reply_to=WAMID)
        second = await client.send(PHONE, Outgoing(image=Image(media_id="42")))
        return [first, second]

    wamids, _, _ = run(graph.url, two)
    assert wamids == ["wamid.OUT1", "wamid.OUT2"]
    assert graph.requests[0].json["context"] == {"message_id": WAMID}
    assert "context" not in graph.requests[1].json


def test_an_empty_message_is_refused_without_a_request(graph: FakeGraph) -> None:
    """Neither text nor image: SendError "rejected", and nothing reaches WhatsApp."""
    with pytest.raises(SendError) as info:
        run(graph.url, lambda c: c.send(PHONE, Outgoing(text="")))
    assert info.value.kind == "rejected" and graph.requests == []


def test_set_token_changes_the_authorization_header(graph: FakeGraph) -> None:
    """After set_token (SIGHUP), the next request carries the new bearer token."""

    async def reload(client: GraphClient) -> None:
        await send_text(client)
        client.set_token("another-test-token")
        await send_text(client)

    run(graph.url, reload)
    assert [r.headers["Authorization"] for r in graph.requests] == [f"Bearer {TOKEN}", "Bearer another-test-token"]


def test_a_trailing_slash_in_the_graph_url_is_ignored(graph: FakeGraph) -> None:
    """graph_url "http://host:port/" gives the same path, without a double slash."""
    run(graph.url + "/", send_text)
    assert graph.requests[0].path == f"/v24.0/{PNID}/messages"


# ---- retries ----


@pytest.mark.parametrize(
    ("first", "label"),
    [
        (Reply(500, {"error": {"message": "Something went wrong", "type": "OAuthException", "code": 131000}}), "5xx"),
        (Reply(503, b"<html>Service Unavailable</html>"), "5xx"),
        (graph_error(130429), "130429"),
    ],
)
def test_retryable_failures_are_retried_with_full_jitter_then_succeed(graph: FakeGraph, first: Reply, label: str) -> None:
    """Two 500s, 503s (even without JSON) or 130429s, then success: three identical requests, two jittered delays."""
    graph.script(first, first)
    wamid, client, sleeps = run(graph.url, send_text)
    assert wamid == "wamid.OUT1" and len(graph.requests) == 3
    assert graph.requests[0].raw == graph.requests[1].raw == graph.requests[2].raw
    assert sleeps.delays == expected_jitter(2)
    assert all(0 <= d <= 2**i for i, d in enumerate(sleeps.delays))
    assert counted(client, "natalia_whatsapp_errors_total", code=label) == 2
    assert counted(client, "natalia_whatsapp_sends_total", kind="text", outcome="ok") == 1


def test_the_pair_rate_limit_waits_at_least_six_seconds(graph: FakeGraph) -> None:
    """131056 (one message per 6 s per customer) is retried after >= 6 s each time, however small the jitter."""
    graph.script(graph_error(131056), graph_error(131056))
    wamid, _, sleeps = run(graph.url, send_text)
    assert wamid == "wamid.OUT1" and len(sleeps.delays) == 2
    assert all(d >= 6.0 for d in sleeps.delays)


def test_retry_after_is_honoured_within_max_delay(graph: FakeGraph) -> None:
    """A Retry-After of 12 s is waited; one of 3600 s is cut to max_delay."""
    graph.script(Reply(503, None, {"Retry-After": "12"}), Reply(503, None, {"Retry-After": "3600"}))
    _, _, sleeps = run(graph.url, send_text)
    assert sleeps.delays == [12.0, 30.0]


def test_the_backoff_grows_and_is_capped(graph: FakeGraph) -> None:
    """Each delay is drawn from [0, min(max_delay, base * 2**attempt)]: with a cap of 3 s, never above it."""
    graph.script(*[Reply(500)] * 6)
    _, _, sleeps = failure_of(graph.url, send_text, attempts=6, base_delay=1.0, max_delay=3.0)
    assert sleeps.delays == expected_jitter(5, cap=3.0)
    assert max(sleeps.delays) <= 3.0


@pytest.mark.parametrize(
    ("reply", "kind", "code", "status"),
    [
        (Reply(500), "server", None, 500),
        (graph_error(130429), "rate", 130429, 400),
        (graph_error(131056), "rate", 131056, 400),
        (Reply(429, {"error": {"message": "Too many calls", "type": "OAuthException", "code": 80007}}), "rate", 80007, 429),
    ],
)
def test_exhausted_retries_raise_the_kind(graph: FakeGraph, reply: Reply, kind: str, code: int | None, status: int) -> None:
    """After `attempts` failures the SendError says what it was; its text names no phone, text or token."""
    graph.script(*[reply] * 3)
    err, client, sleeps = failure_of(graph.url, send_text, attempts=3)
    assert (err.kind, err.code, err.status) == (kind, code, status)
    assert len(graph.requests) == 3 and len(sleeps.delays) == 2
    assert "3 attempt" in str(err) and "\n" not in str(err)
    assert not {PHONE, TEXT, TOKEN} & set(str(err).split())
    assert counted(client, "natalia_whatsapp_sends_total", kind="text", outcome=kind) == 1


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [(131047, "window_closed", "code 131047 (window closed)"), (131026, "undeliverable", "code 131026 (undeliverable)")],
)
def test_final_refusals_are_not_retried(graph: FakeGraph, code: int, kind: str, words: str) -> None:
    """131047 (window closed) and 131026 (undeliverable): one request, then SendError with that kind."""
    graph.script(graph_error(code))
    err, client, sleeps = failure_of(graph.url, send_text)
    assert (err.kind, err.code, err.status) == (kind, code, 400)
    assert str(err) == f"WhatsApp refused the message: {words}"
    assert len(graph.requests) == 1 and sleeps.delays == []
    assert not client.token_invalid
    assert counted(client, "natalia_whatsapp_errors_total", code=str(code)) == 1


def test_another_4xx_is_rejected_without_retry(graph: FakeGraph) -> None:
    """An unlisted code (100, invalid parameter) is "rejected" after one request, counted under "other"."""
    graph.script(graph_error(100, subcode=2494010))
    err, client, sleeps = failure_of(graph.url, send_text)
    assert (err.kind, err.code, err.status) == ("rejected", 100, 400)
    assert len(graph.requests) == 1 and sleeps.delays == []
    assert counted(client, "natalia_whatsapp_errors_total", code="other") == 1


def test_an_invalid_token_is_not_retried_marks_the_client_and_says_what_to_do(graph: FakeGraph) -> None:
    """190: one request, kind "token", token_invalid set, and an error line telling the operator to reload a new token."""
    graph.script(graph_error(190))
    with capture_logs() as lines:
        err, client, sleeps = failure_of(graph.url, send_text)
    assert (err.kind, err.code, err.status) == ("token", 190, 401)
    assert len(graph.requests) == 1 and sleeps.delays == []
    assert client.token_invalid
    (line,) = [x for x in lines if x["event"] == "whatsapp_token_invalid"]
    assert line["log_level"] == "error"
    assert "WHATSAPP_ACCESS_TOKEN" in line["hint"] and "invalid or expired" in line["hint"]


def test_a_success_after_an_invalid_token_clears_it(graph: FakeGraph) -> None:
    """A 190 sets token_invalid; a new token clears it at once (health is clean after the reload); a success keeps
    it clear."""
    graph.script(graph_error(190))

    async def recover(client: GraphClient) -> list[bool]:
        states = []
        with pytest.raises(SendError):
            await send_text(client)
        states.append(client.token_invalid)
        client.set_token("a-new-test-token")
        states.append(client.token_invalid)
        await send_text(client)
        states.append(client.token_invalid)
        return states

    states, _, _ = run(graph.url, recover)
    assert states == [True, False, False]


def test_an_unreachable_api_is_retried_then_a_transport_error() -> None:
    """Connection refused on every attempt: retried with backoff, then kind "transport" without code or status."""
    with closed_port() as url:
        err, client, sleeps = failure_of(url, send_text, attempts=3)
    assert (err.kind, err.code, err.status) == ("transport", None, None)
    assert "ConnectError" in str(err) and "3 attempt" in str(err)
    assert len(sleeps.delays) == 2
    assert counted(client, "natalia_whatsapp_errors_total", code="transport") == 3


def test_a_timeout_and_a_dropped_connection_are_transport_errors_that_are_retried(graph: FakeGraph) -> None:
    """A connection closed without an answer, then a held request timing out: both retried, then kind "transport"."""
    graph.script(Reply.dropped())
    graph.hold()
    try:
        err, _, sleeps = failure_of(graph.url, send_text, attempts=2, timeout=0.3)
    finally:
        graph.release()
    assert err.kind == "transport" and "Timeout" in str(err)
    assert len(graph.wait_for(2)) == 2 and len(sleeps.delays) == 1
    assert graph.sent_texts() == []


def test_a_dropped_connection_then_success_sends_once(graph: FakeGraph) -> None:
    """The fake's dropped connection is a transport error the client retries; the next answer is the one kept."""
    graph.script(Reply.dropped())
    wamid, _, sleeps = run(graph.url, send_text)
    assert wamid == "wamid.OUT1" and len(graph.requests) == 2 and len(sleeps.delays) == 1
    assert graph.requests[0].status is None and graph.requests[1].status == 200


# ---- read receipts ----


@pytest.mark.parametrize(
    ("typing", "extra"),
    [(False, {}), (True, {"typing_indicator": {"type": "text"}})],
)
def test_mark_read_sends_the_read_status_with_or_without_typing(graph: FakeGraph, typing: bool, extra: dict[str, Any]) -> None:
    """mark_read posts status read for the message id, plus the typing indicator when asked."""
    run(graph.url, lambda c: c.mark_read(WAMID, typing=typing))
    (request,) = graph.requests
    assert request.path == f"/v24.0/{PNID}/messages"
    assert request.json == {"messaging_product": "whatsapp", "status": "read", "message_id": WAMID, **extra}
    assert graph.reads() == [WAMID] and graph.sent() == []


def test_mark_read_failures_are_counted_never_raised_nor_retried(graph: FakeGraph) -> None:
    """A 500 on a read receipt: no exception, one request, no sleep, counted as a failed read."""
    graph.script(Reply(500))
    result, client, sleeps = run(graph.url, lambda c: c.mark_read(WAMID))
    assert result is None and len(graph.requests) == 1 and sleeps.delays == []
    assert counted(client, "natalia_whatsapp_sends_total", kind="read", outcome="server") == 1
    assert graph.reads() == []


def test_mark_read_on_an_unreachable_api_returns_quietly() -> None:
    """Connection refused on a read receipt: mark_read returns; the failure is a log line and a count."""
    with closed_port() as url, capture_logs() as lines:
        result, client, _ = run(url, lambda c: c.mark_read(WAMID, typing=True))
    assert result is None
    assert counted(client, "natalia_whatsapp_sends_total", kind="read", outcome="transport") == 1
    assert [x["event"] for x in lines] == ["whatsapp_request_failed"]


def test_a_190_on_a_read_receipt_also_marks_the_token_invalid(graph: FakeGraph) -> None:
    """The token is the same for reads and sends: a 190 on either degrades health."""
    graph.script(graph_error(190))
    _, client, _ = run(graph.url, lambda c: c.mark_read(WAMID))
    assert client.token_invalid


# ---- logs ----


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The daemon's real log chain at debug, with a pseudonym key, into a buffer; restored after."""
    with configured_logs("debug", pseudonym_key=KEY) as out:
        yield out


def test_failure_lines_carry_code_status_kind_and_attempt(graph: FakeGraph) -> None:
    """Each failed attempt is one warning with code, status, kind, attempt; the phone only under `phone`."""
    graph.script(graph_error(131056), graph_error(131047))
    with capture_logs() as lines:
        failure_of(graph.url, send_text)
    failed = [x for x in lines if x["event"] == "whatsapp_request_failed"]
    assert [(x["code"], x["status"], x["kind"], x["attempt"], x["retrying"]) for x in failed] == [
        (131056, 400, "rate", 1, True),
        (131047, 400, "window_closed", 2, False),
    ]
    for line in failed:
        assert line["phone"] == PHONE  # the key logs.py pseudonymises
        assert line["fbtrace_id"] == "AbCdEfFakeTrace"
        others = {k: v for k, v in line.items() if k != "phone"}
        assert not {PHONE, TEXT, TOKEN} & {str(v) for v in others.values()}


def test_no_log_line_holds_the_phone_the_text_the_wamid_or_the_token(graph: FakeGraph, json_log: io.StringIO) -> None:
    """Through the real log chain: retries, a final refusal, a bad token and a failed read leave no personal data."""
    graph.script(Reply(503), graph_error(131047), graph_error(190), Reply(500))

    async def many(client: GraphClient) -> None:
        for _ in range(2):
            with pytest.raises(SendError):
                await client.send(PHONE, Outgoing(text=TEXT), reply_to=WAMID)
        await client.mark_read(WAMID, typing=True)
        await client.send(PHONE, Outgoing(image=Image(link="https://example.com/a.jpg", caption=TEXT)))

    run(graph.url, many)
    out = json_log.getvalue()
    assert "whatsapp_request_failed" in out and "whatsapp_token_invalid" in out and "whatsapp_token_ok" in out
    for secret in (PHONE, TEXT, WAMID, TOKEN):
        assert secret not in out
    assert logs.pseudonym(KEY, PHONE) in out and logs.pseudonym(KEY, WAMID) in out


# ---- pure parts ----


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (400, {"error": {"code": 131047}}, ("window_closed", 131047)),
        (400, {"error": {"code": "131026"}}, ("undeliverable", 131026)),
        (401, {"error": {"code": 190, "error_subcode": 463}}, ("token", 190)),
        (400, {"error": {"code": 130429}}, ("rate", 130429)),
        (429, None, ("rate", None)),
        (502, None, ("server", None)),
        (500, {"error": {"code": 131000}}, ("server", 131000)),
        (400, {"error": {"code": 100}}, ("rejected", 100)),
        (404, b"not json", ("rejected", None)),
        (400, {"error": "malformed"}, ("rejected", None)),
        (400, {"error": {"code": True}}, ("rejected", None)),
    ],
)
def test_classify_reads_the_code_first_then_the_status(status: int, payload: object, expected: tuple[str, int | None]) -> None:
    """A known Graph code decides the kind whatever the status; without one, 429 is rate, 5xx server, else rejected."""
    assert classify(status, payload) == expected


def test_code_labels_are_a_fixed_set() -> None:
    """Listed codes keep their number; the rest become 5xx, transport or other (metric labels never grow)."""
    assert code_label("rate", 131056, 400) == "131056"
    assert code_label("server", 131000, 500) == "5xx"
    assert code_label("transport", None, None) == "transport"
    assert code_label("rejected", 100, 400) == "other"
    assert code_label("rate", 80007, 429) == "80007"  # a rate limit is listed (retried)
    assert code_label("rate", 12345, 429) == "other"


@pytest.mark.parametrize(
    ("status", "code", "kind"), [(400, 4, "rate"), (400, 80007, "rate"), (400, 131000, "server"), (400, 133004, "server")]
)
def test_limits_and_temporary_failures_sent_with_a_4xx_are_retried_not_dropped(status: int, code: int, kind: str) -> None:
    """Meta sends some rate limits and temporary failures with HTTP 400: they must not drop the reply."""
    assert classify(status, {"error": {"code": code}}) == (kind, code)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After as delay-seconds or an HTTP-date (RFC 9110); absent or unreadable gives None, past dates 0."""
    now = 1_770_000_000.0  # 2026-02-02T02:40:00Z
    assert retry_after("7", now) == 7.0
    assert retry_after(" 1.5 ", now) == 1.5
    assert retry_after("Mon, 02 Feb 2026 02:40:10 GMT", now) == pytest.approx(10.0)
    assert retry_after("Mon, 02 Feb 2026 02:39:00 GMT", now) == 0.0
    assert retry_after(None, now) is None and retry_after("soon", now) is None and retry_after("", now) is None
