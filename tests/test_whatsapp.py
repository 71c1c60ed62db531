"""Webhook signature, subscription handshake and payload parsing, as plain functions on bytes and dicts."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natalia_secure import whatsapp
from natalia_secure.errors import PayloadError

SECRET = b"test-app-secret"


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def payload(*values: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"field": field, "value": v} for v in values]}],
    }


def value(
    messages: list[dict[str, Any]] = (), statuses: list[dict[str, Any]] = (), contacts: list[dict[str, Any]] = ()
) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": "PNID"},
        "contacts": list(contacts),
        "messages": list(messages),
        "statuses": list(statuses),
    }


def text(mid: str, sender: str, body: str, ts: str = "1770155790") -> dict[str, Any]:
    return {"from": sender, "id": mid, "timestamp": ts, "type": "text", "text": {"body": body}}


def parse(obj: Any) -> whatsapp.Webhook:
    return whatsapp.parse_webhook(json.dumps(obj).encode())


# ---- signature ----


def test_a_correct_signature_is_accepted() -> None:
    """sha256=<hex HMAC-SHA256(secret, raw body)> verifies (hex case and surrounding space do not matter)."""
    body = b'{"object":"whatsapp_business_account"}'
    assert whatsapp.signature_ok(SECRET, body, sign(body))
    assert whatsapp.signature_ok(SECRET, body, sign(body).upper().replace("SHA256=", "sha256=") + " ")


@pytest.mark.parametrize("header", [None, "", "sha256=", "sha1=abc", "sha256=zz", "sha256=" + "0" * 64, "abc"])
def test_missing_or_malformed_signatures_are_refused(header: str | None) -> None:
    """No header, another scheme, non-hex or a wrong digest: refused."""
    assert not whatsapp.signature_ok(SECRET, b"{}", header)


@pytest.mark.parametrize(
    "header, ok",
    [
        ("sha256=" + "0123456789abcdef" * 4, True),
        ("sha256=" + "ABCDEF0123456789" * 4, True),
        (" sha256=" + "a" * 64, False),  # Tornado strips the value; anything else before the scheme is wrong
        ("sha256= " + "a" * 64 + " ", True),  # signature_ok strips the digest as well
        ("sha256=" + "a" * 63, False),
        ("sha256=" + "a" * 65, False),
        ("sha256=" + "g" * 64, False),
        ("sha256=" + "a" * 63 + "\u0661", False),  # an Arabic-Indic digit: a digit to Unicode, not hex
        ("sha256=" + "a" * 63 + "\n", False),
        ("sha1=" + "a" * 64, False),
        ("SHA256=" + "a" * 64, False),
        ("", False),
        (None, False),
    ],
)
def test_a_signature_header_is_worth_reading_a_body_for_only_when_well_formed(header: str | None, ok: bool) -> None:
    """`sha256=` and exactly 64 ASCII hex digits (what a POST must show before its body is read); the value
    itself is signature_ok's to judge."""
    assert whatsapp.signature_well_formed(header) is ok


def test_signature_covers_the_raw_bytes_and_the_secret() -> None:
    """The same JSON re-serialised, or signed with another secret, does not verify."""
    body = b'{"a": 1}'
    assert not whatsapp.signature_ok(SECRET, b'{"a":1}', sign(body))
    assert not whatsapp.signature_ok(SECRET, body, sign(body, b"other-secret"))


# ---- subscription ----


def test_subscription_with_the_right_token_returns_the_raw_challenge() -> None:
    """hub.mode=subscribe with our verify token gives back hub.challenge exactly."""
    args = {"hub.mode": "subscribe", "hub.verify_token": "tok", "hub.challenge": "1158201444"}
    assert whatsapp.subscription_challenge(args, "tok") == "1158201444"


@pytest.mark.parametrize(
    "args",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": "tok", "hub.challenge": "1"},
        {"hub.verify_token": "tok", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": "tok"},
    ],
)
def test_other_subscription_requests_are_refused(args: dict[str, str]) -> None:
    """A wrong token, another mode, or a missing parameter gives None (403)."""
    assert whatsapp.subscription_challenge(args, "tok") is None


# ---- parsing ----


def test_a_text_message_with_its_contact_name() -> None:
    """A text message gives its wamid, sender, time in ms, text, profile name and receiving number."""
    contacts = [{"profile": {"name": "Ana"}, "wa_id": "34698189848"}]
    hook = parse(payload(value([text("wamid.A", "34698189848", "Hola")], contacts=contacts)))
    assert hook.messages == [whatsapp.Inbound("wamid.A", "34698189848", 1770155790000, "text", "Hola", "Ana", "PNID")]
    assert hook.statuses == [] and hook.ignored == 0


def test_every_entry_change_and_message_is_kept_in_order() -> None:
    """A batch of 2 entries x 2 changes x 2 messages yields all 8, in the order sent."""
    entries = []
    n = 0
    for e in range(2):
        changes = []
        for _ in range(2):
            msgs = []
            for _ in range(2):
                msgs.append(text(f"wamid.{n}", f"3460000000{n % 3}", f"m{n}"))
                n += 1
            changes.append({"field": "messages", "value": value(msgs)})
        entries.append({"id": f"W{e}", "changes": changes})
    hook = parse({"object": "whatsapp_business_account", "entry": entries})
    assert [m.id for m in hook.messages] == [f"wamid.{i}" for i in range(8)]
    assert [m.text for m in hook.messages] == [f"m{i}" for i in range(8)]


def test_statuses_are_parsed_and_never_become_messages() -> None:
    """Delivery statuses are reported separately, with their time in ms."""
    status = {"id": "wamid.OUT", "status": "delivered", "timestamp": "1770155800", "recipient_id": "34698189848"}
    hook = parse(payload(value(statuses=[status])))
    assert hook.messages == []
    assert hook.statuses == [whatsapp.Status("wamid.OUT", "delivered", "34698189848", 1770155800000)]


def test_a_status_brings_back_the_callback_data_its_message_was_sent_with() -> None:
    """biz_opaque_callback_data (the tag replies.py sends each part with) comes back in the status; "" if absent."""
    body = whatsapp.status_webhook([("wamid.OUT", "34698189848", "sent", "natalia-secure:ab.0"), ("wamid.O2", "1", "read", None)])
    first, second = whatsapp.parse_webhook(body).statuses
    assert (first.status, first.recipient, first.callback) == ("sent", "34698189848", "natalia-secure:ab.0")
    assert (second.status, second.callback) == ("read", "")


@pytest.mark.parametrize(
    "obj",
    [
        {"object": "page", "entry": [{"changes": [{"field": "feed", "value": {}}]}]},
        payload({"anything": 1}, field="account_update"),
        {"object": "whatsapp_business_account", "entry": []},
    ],
)
def test_payloads_of_other_kinds_are_ignored(obj: dict[str, Any]) -> None:
    """Another object, another field, or nothing at all: valid, no message, nothing raised."""
    hook = parse(obj)
    assert hook.messages == [] and hook.statuses == []


@pytest.mark.parametrize(
    "body, where",
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"object": "whatsapp_business_account", "entry": {}}).encode(), "entry is not an array"),
        (json.dumps(payload(value([{"id": "w", "timestamp": "1", "type": "text", "text": {"body": "x"}}]))).encode(), "from"),
        (json.dumps(payload(value([{"from": "1", "timestamp": "1", "type": "text", "text": {"body": "x"}}]))).encode(), ".id"),
        (
            json.dumps(payload(value([{"from": "1", "id": "w", "timestamp": "soon", "type": "text", "text": {}}]))).encode(),
            "timestamp",
        ),
        (
            json.dumps(payload(value([{"from": "1", "id": "w", "timestamp": "1", "type": "text", "text": {}}]))).encode(),
            "text.body",
        ),
        (json.dumps(payload("x")).encode(), "value is not an object"),  # type: ignore[arg-type]
    ],
)
def test_malformed_payloads_name_the_position(body: bytes, where: str) -> None:
    """A body of the right kind with the wrong shape is a PayloadError naming where, never echoing content."""
    with pytest.raises(PayloadError, match=where.replace(".", r"\.").replace("[", r"\[")):
        whatsapp.parse_webhook(body)


@pytest.mark.parametrize(
    "message, expected",
    [
        ({"type": "image", "image": {"id": "M", "caption": "mi tarta"}}, "[image: mi tarta]"),
        ({"type": "image", "image": {"id": "M"}}, "[image]"),
        ({"type": "audio", "audio": {"id": "M", "voice": True}}, "[voice message]"),
        ({"type": "document", "document": {"filename": "menu.pdf", "caption": "precios"}}, "[document: menu.pdf — precios]"),
        ({"type": "video", "video": {"caption": "así"}}, "[video: así]"),
        ({"type": "sticker", "sticker": {"id": "S"}}, "[sticker]"),
        (
            {"type": "location", "location": {"latitude": 40.4, "longitude": -3.7, "name": "Tienda", "address": "Gran Vía 1"}},
            "[location: Tienda — Gran Vía 1 (40.4, -3.7)]",
        ),
        (
            {"type": "interactive", "interactive": {"type": "button_reply", "button_reply": {"id": "b1", "title": "Sí"}}},
            "[button: Sí]",
        ),
        (
            {"type": "interactive", "interactive": {"type": "list_reply", "list_reply": {"id": "l", "title": "Salado"}}},
            "[button: Salado]",
        ),
        ({"type": "button", "button": {"text": "Ver fotos", "payload": "FOTOS"}}, "[button: Ver fotos — FOTOS]"),
        ({"type": "reaction", "reaction": {"message_id": "w", "emoji": "👍"}}, "[reaction: 👍]"),
        ({"type": "contacts", "contacts": [{"name": {}}, {"name": {}}]}, "[contacts shared: 2]"),
        ({"type": "unsupported"}, "[unsupported message]"),
        ({}, "[unknown message]"),
    ],
)
def test_messages_that_are_not_text_become_readable_placeholders(message: dict[str, Any], expected: str) -> None:
    """Images, audio, documents, places, buttons, reactions... read as bracketed text that keeps captions and titles."""
    assert whatsapp.readable_text(message) == expected
    full = {"from": "34600000001", "id": "wamid.X", "timestamp": "1770155790", **message}
    assert parse(payload(value([full]))).messages[0].text == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
KEYS = "object entry changes field value messages statuses contacts from id timestamp type text body profile wa_id"
keys = st.sampled_from([*KEYS.split(), "recipient_id", "status", "metadata"])
shaped = st.recursive(
    st.sampled_from(["whatsapp_business_account", "messages", "text", "image", "1770155790", 5, None, "x"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, shaped.map(lambda v: {"object": whatsapp.OBJECT, "entry": v}), st.binary(max_size=64)))
def test_any_body_parses_or_raises_only_payload_error(data: Any) -> None:
    """Random JSON, webhook-shaped garbage and random bytes: a Webhook or a PayloadError, nothing else."""
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    try:
        hook = whatsapp.parse_webhook(body)
    except PayloadError:
        return
    for m in hook.messages:
        assert isinstance(m.text, str) and m.timestamp_ms >= 0


def test_the_webhook_builders_produce_what_the_parser_and_signature_check_accept() -> None:
    """text_webhook + sign (used by the demo, the daemon tests and the benchmark) make a body Meta could have sent."""
    body = whatsapp.text_webhook(
        [("wamid.1", "34600000001", "Hola", 1770155790), ("wamid.2", "34600000002", "¿Qué tal?", 1770155791)]
    )
    assert whatsapp.signature_ok(SECRET, body, whatsapp.sign(SECRET, body))
    assert not whatsapp.signature_ok(b"other", body, whatsapp.sign(SECRET, body))
    hook = whatsapp.parse_webhook(body)
    assert [(m.id, m.phone, m.text, m.timestamp_ms, m.name) for m in hook.messages] == [
        ("wamid.1", "34600000001", "Hola", 1770155790000, "Cliente"),
        ("wamid.2", "34600000002", "¿Qué tal?", 1770155791000, "Cliente"),
    ]


def test_an_unreadable_status_is_counted_as_other_and_never_refuses_the_post() -> None:
    """Statuses are only counted: a malformed one must not turn the customer messages beside it into a 400."""
    hook = parse(payload(value(messages=[text("wamid.1", "34600000001", "hola")], statuses=[{"id": 3}, "x", {"status": "read"}])))
    assert [m.id for m in hook.messages] == ["wamid.1"]
    assert [s.status for s in hook.statuses] == ["other", "other", "read"]


def test_a_sender_known_only_by_a_business_scoped_user_id_keys_its_session() -> None:
    """A message without `from` but with `from_user_id` (WhatsApp usernames) is kept, keyed by that id."""
    message = {
        "from_user_id": "US.1234567890",
        "id": "wamid.U",
        "timestamp": "1770155790",
        "type": "text",
        "text": {"body": "hola"},
    }
    assert parse(payload(value(messages=[message]))).messages[0].phone == "US.1234567890"


@pytest.mark.parametrize("header", ["sha256=\xe9", "sha256=" + "\u00ff" * 64, "\xe9"])
def test_a_non_ascii_signature_header_is_refused_not_a_crash(header: str) -> None:
    """Tornado decodes headers as latin-1; hmac.compare_digest would raise TypeError on them."""
    assert not whatsapp.signature_ok(SECRET, b"{}", header)
