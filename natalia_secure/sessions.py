"""Conversations in the legacy system's shape, and its plaintext `sessions.json`. Pure: dicts and bytes only.

A session is the legacy object, field names kept so operators' scripts keep working (../shared/seed/):
``{"messages": [{"role": "user"|"assistant", "content": str, "timestamp": ms}, ...], "lastActivity": ms,
"firstInteraction": ms}``. Fields we do not know are kept as they are, so an import round-trips exactly.
The legacy file is a JSON array of ``[phone, session]`` pairs written by ``JSON.stringify(pairs, null, 2)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import orjson

from .errors import InputError

MAX_MESSAGES = 250  # the legacy limit; the oldest leave first
DEFAULT_INACTIVE_DAYS = 365  # the legacy "timeout 1 año"
ROLES = ("user", "assistant")
MAX_PHONE_LEN = 128

Session = dict[str, Any]
# The daemon's own state in a session (photos sent per album, a reply not yet confirmed sent): one extra field,
# absent when empty, so imported sessions and the legacy shape round-trip untouched.
META = "natalia"


def new_session(timestamp: int) -> Session:
    return {"messages": [], "lastActivity": timestamp, "firstInteraction": timestamp}


def append_message(
    session: Session, role: str, content: str, timestamp: int, max_messages: int = MAX_MESSAGES, before_last: int = 0
) -> None:
    """Add one message, dropping the oldest beyond `max_messages`; activity never moves backwards. `before_last`
    puts it that many messages before the end (a reply goes after the messages it answered, before newer ones)."""
    messages = session["messages"]
    message = {"role": role, "content": content, "timestamp": timestamp}
    if before_last > 0:
        messages.insert(max(0, len(messages) - before_last), message)
    else:
        messages.append(message)
    if len(messages) > max_messages:
        extra = len(messages) - max_messages
        del messages[:extra]
        # counted, so the history sent to Claude can keep block boundaries fixed (claude.build_messages)
        state = session.setdefault(META, {})
        state["dropped"] = state.get("dropped", 0) + extra
    session["lastActivity"] = max(session.get("lastActivity", timestamp), timestamp)
    session.setdefault("firstInteraction", timestamp)


def check_meta(meta: object) -> dict[str, Any]:
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise InputError("session state must be an object with string keys")
    return meta


def update_meta(session: Session, meta: dict[str, Any]) -> None:
    """Set each key of `meta` in the session's state; a None value removes the key."""
    state = session.setdefault(META, {})
    for key, value in meta.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    if not state:
        del session[META]


def is_inactive(session: Session, now_ms: int, max_idle_ms: int) -> bool:
    return bool(now_ms - session["lastActivity"] > max_idle_ms)


def encode(session: Session) -> bytes:
    """Compact JSON: the form a session takes in memory when cold and inside sealed snapshots."""
    return orjson.dumps(session)


def decode(data: bytes | memoryview) -> Session:
    session: Session = orjson.loads(data)
    return session


def _is_int(value: object) -> bool:
    return type(value) is int and value >= 0


def check_phone(phone: object, where: str = "phone") -> str:
    if not isinstance(phone, str) or not phone or len(phone) > MAX_PHONE_LEN or not phone.isprintable():
        raise InputError(f"{where} must be a non-empty printable string of at most {MAX_PHONE_LEN} characters")
    return phone


def check_session(session: object, where: str = "session") -> Session:
    """Validate the legacy shape, naming the first thing wrong (by position: never quoting personal data)."""
    if not isinstance(session, dict):
        raise InputError(f"{where} must be an object")
    messages = session.get("messages")
    if not isinstance(messages, list):
        raise InputError(f"{where}.messages must be an array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"{where}.messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise InputError(f"{where}.messages[{i}].role must be 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise InputError(f"{where}.messages[{i}].content must be a string")
        if not _is_int(m.get("timestamp")):
            raise InputError(f"{where}.messages[{i}].timestamp must be a non-negative integer (ms)")
    for name in ("lastActivity", "firstInteraction"):
        if not _is_int(session.get(name)):
            raise InputError(f"{where}.{name} must be a non-negative integer (ms)")
    return session


def parse_legacy(data: bytes) -> list[tuple[str, Session]]:
    """Parse and validate a legacy sessions.json; the first problem is reported, nothing is half-read."""
    try:
        pairs = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc}") from None
    if not isinstance(pairs, list):
        raise InputError("expected a JSON array of [phone, session] pairs")
    seen: set[str] = set()
    out = []
    for i, pair in enumerate(pairs):
        where = f"entry {i}"
        if not isinstance(pair, list) or len(pair) != 2:
            raise InputError(f"{where} must be a [phone, session] pair")
        phone = check_phone(pair[0], f"{where} phone")
        if phone in seen:
            raise InputError(f"{where} repeats a phone already given earlier in the file")
        seen.add(phone)
        out.append((phone, check_session(pair[1], f"{where} session")))
    return out


def dump_legacy(pairs: Iterable[tuple[str, Session]]) -> bytes:
    """The legacy file's exact bytes, as the legacy bot's ``JSON.stringify(pairs, null, 2)`` writes them."""
    return _js_stringify([[p, s] for p, s in pairs], "").encode()


def _js_stringify(value: Any, indent: str) -> str:
    """ECMA-262 JSON.stringify with a 2-space gap. Python's json.dumps(indent=2) agrees except on floats
    (1e-07 vs 1e-7), and unknown legacy fields may hold floats."""
    inner = indent + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{inner}{json.dumps(k, ensure_ascii=False)}: {_js_stringify(v, inner)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + ",\n".join(inner + _js_stringify(v, inner) for v in value) + "\n" + indent + "]"
    if isinstance(value, float):
        return _js_number(value)
    return json.dumps(value, ensure_ascii=False)  # str (same escapes as JSON.stringify), int, bool, None


def _js_number(x: float) -> str:
    """Number.prototype.toString (ECMA-262 Number::toString): the shortest digits, as Python's repr finds them,
    laid out by JavaScript's rules (plain notation for exponents -6..20, else d.ddde+N)."""
    if x == 0:
        return "0"  # also -0, as JavaScript prints it
    sign, digits_t, exp = Decimal(repr(x)).normalize().as_tuple()
    assert isinstance(exp, int)
    digits = "".join(map(str, digits_t))
    k, n = len(digits), exp + len(digits)  # x = 0.digits * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
        text = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return ("-" if sign else "") + text
