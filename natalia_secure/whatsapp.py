"""The WhatsApp Cloud API webhook, as plain functions: signature check, subscription handshake, payload parsing.

Pure: bytes and mappings in, values out; the Tornado handlers (web.py) only wire these to HTTP. Meta's contract:
- GET: `hub.mode=subscribe` with our `hub.verify_token` is answered with the raw `hub.challenge`; anything else 403.
- POST: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app secret, raw body)>`, compared in constant time; the body
  is at most 3 MB; `{"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages",
  "value": {"metadata", "contacts", "messages", "statuses"}}]}]}`. Every entry, change and message is kept, in order.
A payload of a kind we do not handle (another `object`, another `field`) is valid and ignored (200); a payload of
the right kind with the wrong shape is a PayloadError (400), never a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from .errors import PayloadError

SIGNATURE_HEADER = "X-Hub-Signature-256"
MAX_BODY = 3 * 1024 * 1024  # Meta's own limit for a webhook body
OBJECT = "whatsapp_business_account"
# A string of ours sent with a message and echoed back, untouched, in each of its statuses (Meta, "Messages" and
# the statuses webhook: biz_opaque_callback_data, up to 512 characters).
CALLBACK_DATA = "biz_opaque_callback_data"


def signature_ok(app_secret: bytes, body: bytes, header: str | None) -> bool:
    """True only for `sha256=<hex>` equal to HMAC-SHA256(app_secret, body), compared in constant time."""
    if not header or not header.isascii() or not header.startswith("sha256="):
        return False  # Tornado hands headers over as latin-1: compare_digest refuses non-ASCII str (TypeError)
    expected = hmac.new(app_secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header[len("sha256=") :].strip().lower())


# \s*, not .strip(): signature_ok strips the value too; ASCII-only classes (re.ASCII), as the header must be
_WELL_FORMED = re.compile(r"sha256=\s*[0-9a-fA-F]{64}\s*", re.ASCII)


def signature_well_formed(header: str | None) -> bool:
    """`sha256=` and 64 hex digits: worth reading a body for (the value itself is checked by signature_ok)."""
    # one regular expression: a generator over the 64 digits cost ~3.8 us per webhook, this ~0.2 us
    return header is not None and _WELL_FORMED.fullmatch(header) is not None


def sign(app_secret: bytes, body: bytes) -> str:
    """The X-Hub-Signature-256 value Meta sends for `body` (the demo, tests and benchmarks sign their webhooks)."""
    return "sha256=" + hmac.new(app_secret, body, hashlib.sha256).hexdigest()


def text_webhook(messages: list[tuple[str, str, str, int]], phone_number_id: str = "100000000000001") -> bytes:
    """A webhook body as Meta shapes it, carrying text messages given as (wamid, sender wa_id, text, unix seconds)."""
    return _webhook(
        phone_number_id,
        contacts=[{"profile": {"name": "Cliente"}, "wa_id": sender} for _, sender, _, _ in messages],
        messages=[
            {"from": sender, "id": wamid, "timestamp": str(ts), "type": "text", "text": {"body": text}}
            for wamid, sender, text, ts in messages
        ],
    )


def status_webhook(statuses: list[tuple[str, str, str, str | None]], phone_number_id: str = "100000000000001") -> bytes:
    """A webhook body as Meta shapes it, carrying statuses of messages we sent, given as (wamid, recipient wa_id,
    status, the biz_opaque_callback_data it was sent with or None)."""
    entries = []
    for wamid, recipient, status, callback in statuses:
        entry = {"id": wamid, "status": status, "timestamp": "1770000000", "recipient_id": recipient}
        if callback is not None:
            entry[CALLBACK_DATA] = callback
        entries.append(entry)
    return _webhook(phone_number_id, statuses=entries)


def _webhook(phone_number_id: str, **lists: list[dict[str, Any]]) -> bytes:
    """One entry with one "messages" change whose value holds `lists` (contacts, messages, statuses)."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": phone_number_id},
        **lists,
    }
    change = {"field": "messages", "value": value}
    return orjson.dumps({"object": OBJECT, "entry": [{"id": "100000000000000", "changes": [change]}]})


def subscription_challenge(args: Mapping[str, str], verify_token: str) -> str | None:
    """The challenge to echo for a valid subscription request, else None (the caller answers 403)."""
    if args.get("hub.mode") != "subscribe":
        return None
    token = args.get("hub.verify_token")
    if token is None or not hmac.compare_digest(token.encode(), verify_token.encode()):
        return None
    return args.get("hub.challenge")


class Inbound(NamedTuple):
    """One message a customer sent: what the store keeps of it, and what the reply needs. (Named tuples, not frozen
    dataclasses, for what every webhook makes: half the cost to build, ~0.6 us each.)"""

    id: str  # the wamid: the dedup key
    phone: str  # the sender's WhatsApp id (wa_id), the session key
    timestamp_ms: int
    kind: str  # text, image, audio, ... as Meta names it
    text: str  # the text, or a readable placeholder for what is not text
    name: str | None = None  # contacts[].profile.name, when Meta sends it
    phone_number_id: str | None = None  # which of our numbers received it


class Status(NamedTuple):
    """A delivery status of a message we sent (sent, delivered, read, failed): counted, never a session."""

    id: str
    status: str
    recipient: str
    timestamp_ms: int
    callback: str = ""  # biz_opaque_callback_data: the tag we sent the message with (replies.part_tag), echoed


@dataclass
class Webhook:
    messages: list[Inbound] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    ignored: int = 0  # changes of kinds we do not handle


def parse_webhook(body: bytes) -> Webhook:
    """Parse a signed webhook body; PayloadError names the first thing wrong (by position, never by content)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise PayloadError("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise PayloadError("the body is not a JSON object")
    result = Webhook()
    if payload.get("object") != OBJECT:
        result.ignored += 1
        return result
    for i, entry in enumerate(_list(payload, "entry", "")):
        where = f"entry[{i}]"
        if not isinstance(entry, dict):
            raise PayloadError(f"{where} is not an object")
        for j, change in enumerate(_list(entry, "changes", where)):
            at = f"{where}.changes[{j}]"
            if not isinstance(change, dict):
                raise PayloadError(f"{at} is not an object")
            if change.get("field") != "messages":
                result.ignored += 1
                continue
            value = change.get("value")
            if not isinstance(value, dict):
                raise PayloadError(f"{at}.value is not an object")
            _parse_value(value, f"{at}.value", result)
    return result


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise PayloadError(f"{where + '.' if where else ''}{key} is not an array")
    return value


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{where}.{key} must be a non-empty string")
    return value


def _timestamp_ms(obj: dict[str, Any], where: str) -> int:
    """Meta sends Unix seconds as a string."""
    value = obj.get("timestamp")
    if isinstance(value, str) and value.isdigit() and len(value) <= 12:
        return int(value) * 1000
    if type(value) is int and 0 <= value < 10**12:
        return value * 1000
    raise PayloadError(f"{where}.timestamp must be Unix seconds")


def _parse_value(value: dict[str, Any], where: str, result: Webhook) -> None:
    metadata = value.get("metadata")
    number_id = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
    names: dict[str, str] = {}
    for k, contact in enumerate(_list(value, "contacts", where)):
        if not isinstance(contact, dict):
            raise PayloadError(f"{where}.contacts[{k}] is not an object")
        profile = contact.get("profile")
        if isinstance(contact.get("wa_id"), str) and isinstance(profile, dict) and isinstance(profile.get("name"), str):
            names[contact["wa_id"]] = profile["name"]
    for k, message in enumerate(_list(value, "messages", where)):
        at = f"{where}.messages[{k}]"
        if not isinstance(message, dict):
            raise PayloadError(f"{at} is not an object")
        # `from` is the sender's phone (wa_id); a user who adopted a WhatsApp username may come with only a
        # business-scoped user id (`from_user_id`, Meta 2026): it keys the session the same way.
        sender = _str(message, "from" if "from" in message or "from_user_id" not in message else "from_user_id", at)
        kind = message.get("type", "unknown")
        if not isinstance(kind, str):
            raise PayloadError(f"{at}.type must be a string")
        result.messages.append(
            Inbound(
                id=_str(message, "id", at),
                phone=sender,
                timestamp_ms=_timestamp_ms(message, at),
                kind=kind,
                text=readable_text(message, at),
                name=names.get(sender),
                phone_number_id=number_id if isinstance(number_id, str) else None,
            )
        )
    # Statuses are only counted: one we cannot read is counted as "other", never a 400 that would make Meta
    # retry (and finally drop) the customer messages of the same POST.
    for status in _list(value, "statuses", where):
        result.statuses.append(_status(status))


def _status(status: object) -> Status:
    if not isinstance(status, dict):
        return Status("", "other", "", 0)
    fields = [v if isinstance(v := status.get(k), str) else "" for k in ("id", "status", "recipient_id", CALLBACK_DATA)]
    try:
        ts = _timestamp_ms(status, "status")
    except PayloadError:
        ts = 0
    return Status(fields[0], fields[1] or "other", fields[2], ts, fields[3])


def _part(message: dict[str, Any], kind: str) -> dict[str, Any]:
    part = message.get(kind)
    return part if isinstance(part, dict) else {}


def _text_of(part: dict[str, Any], *keys: str) -> str:
    return " — ".join(str(part[k]) for k in keys if isinstance(part.get(k), str | int | float) and str(part[k]))


def readable_text(message: dict[str, Any], where: str = "message") -> str:
    """What a message says, as text a person (and Claude) can read: the text itself, or a bracketed placeholder
    that keeps captions, file names, places and button titles."""
    kind = message.get("type")
    part = _part(message, kind) if isinstance(kind, str) else {}
    if kind == "text":
        body = part.get("body")
        if not isinstance(body, str):
            raise PayloadError(f"{where}.text.body must be a string")
        return body
    if kind in ("image", "video", "document", "audio", "sticker"):
        label = "voice message" if kind == "audio" and part.get("voice") else kind
        detail = _text_of(part, "filename", "caption")
        return f"[{label}: {detail}]" if detail else f"[{label}]"
    if kind == "location":
        place = _text_of(part, "name", "address")
        coords = f"{part.get('latitude')}, {part.get('longitude')}" if "latitude" in part and "longitude" in part else ""
        return "[location: " + " ".join(x for x in (place, f"({coords})" if coords else "") if x) + "]"
    if kind == "interactive":
        reply = part.get("button_reply") or part.get("list_reply") or part.get("nfm_reply")
        if isinstance(reply, dict):
            return f"[button: {_text_of(reply, 'title', 'description') or _text_of(reply, 'id')}]"
        return "[interactive reply]"
    if kind == "button":
        return f"[button: {_text_of(part, 'text', 'payload')}]"
    if kind == "reaction":
        return f"[reaction: {_text_of(part, 'emoji')}]" if part.get("emoji") else "[reaction removed]"
    if kind == "contacts":
        shared = message.get("contacts")
        return f"[contacts shared: {len(shared) if isinstance(shared, list) else 0}]"
    return f"[{kind if isinstance(kind, str) and kind else 'unknown'} message]"
