"""Logging: structlog for our modules and stdlib `logging` (Tornado's) through one chain that keeps personal data out.

Guarantee 4 (DESIGN.md): phone numbers appear only pseudonymised, message text never. Two processors, plain
functions tested on dicts (STYLE.md point 7), enforce it on every line, ours and Tornado's:
- `pseudonymise(key)`: the values of the keys in PSEUDONYMISED (phone, wa_id, wamid, ...) become
  `pseudonym(key, value)`, "p-" + 16 hex of HMAC-SHA256, stable per installation so one customer's lines can
  still be followed; without a key (before the master key is loaded) they become "[redacted]".
- `drop_personal`: the values of the keys in DROPPED (text, body, name, prompt, ...) become "[redacted]". The key
  is kept, not removed: a line showing `text="[redacted]"` tells the reader a caller tried to log a message body
  (a bug to fix) and that nothing was lost by accident, where a silently missing key tells nothing.
Both act on the top-level keys only: values are never searched, nested dicts are not walked.

That is enough because of three conventions, kept by every module:
- the event is a constant snake_case name (`log.info("webhook", phone=phone, messages=3)`); data goes in keys,
  never formatted into the event (no f-strings, no %-arguments carrying a phone or a text);
- a value that is, contains or is derived from a phone, a wamid (it base64-encodes the sender's number) or a
  message goes under a key of PSEUDONYMISED or DROPPED, never inside a dict, a list of dicts or a free text;
- exception messages never quote personal data (errors.py convention), so `format_exc_info` may render them:
  a traceback prints code and messages, not local variables (the console renderer is pinned to
  `plain_traceback` for that reason: rich's formatter shows locals).

Output: JSON lines when stdout is not a terminal (systemd's journald, pipes), a readable console otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
from typing import Any, TextIO

import structlog
import tornado.web
from structlog.typing import EventDict, Processor, WrappedLogger

from .errors import ConfigError, KeyMaterialError

REDACTED = "[redacted]"

PSEUDONYMISED: frozenset[str] = frozenset(
    {
        # a customer's number, under every name it takes (Meta's payload names, ours, the Graph API's)
        "phone",
        "wa_id",
        "from",
        "from_",
        "to",
        "sender",
        "recipient",
        "recipient_id",
        "customer",
        "session",
        "session_id",
        # message ids: a wamid is base64 of a structure that holds the sender's number, so never raw
        "message_id",
        "wamid",
        "id_of_message",
        "reply_to",
        "context_id",
    }
)

DROPPED: frozenset[str] = frozenset(
    {
        # what a customer wrote or sent, and who they say they are
        "text",
        "content",
        "body",
        "caption",
        "message_text",
        "filename",
        "location",
        "address",
        "email",
        "name",
        "profile",
        "profile_name",
        "contacts",
        # what the assistant was asked and answered: quotes the conversation
        "prompt",
        "reply",
        "reply_text",
        "completion",
        "history",
        "transcript",
        # a raw webhook or API body holds all of the above
        "payload",
        "raw",
    }
)

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")
MIN_KEY_BYTES = 16


def pseudonym(key: bytes, value: str) -> str:
    """'p-' + the first 16 hex digits of HMAC-SHA256(key, value): the same value gives the same pseudonym per key."""
    # Keyed, not a plain hash: a country's mobile numbers are ~10^8-10^10 values (ITU-T E.164), which an unkeyed
    # SHA-256 lets anyone reverse by enumeration in minutes. 64 bits keep collisions unlikely below ~10^9 numbers.
    return "p-" + hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


class _Pseudonymise:
    """The processor `pseudonymise` returns; `key` can change later (set_pseudonym_key) without reconfiguring."""

    def __init__(self, key: bytes | None) -> None:
        self.key = _checked(key)

    def _one(self, value: object) -> object:
        if value is None:
            return None
        if self.key is None:
            return REDACTED
        return pseudonym(self.key, str(value))

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        for name in PSEUDONYMISED.intersection(event_dict):
            value = event_dict[name]
            if isinstance(value, list | tuple | set | frozenset):  # e.g. recipients of one broadcast
                event_dict[name] = [self._one(v) for v in value]
            else:
                event_dict[name] = self._one(value)
        return event_dict


def _checked(key: bytes | None) -> bytes | None:
    if key is not None and len(key) < MIN_KEY_BYTES:
        # the key is the only thing that keeps pseudonyms from being reversed by enumeration (see pseudonym)
        raise KeyMaterialError(f"the log pseudonym key has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def pseudonymise(key: bytes | None) -> Processor:
    """A processor replacing the values of PSEUDONYMISED keys by their pseudonym, or by "[redacted]" without a key."""
    return _Pseudonymise(key)


def drop_personal(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Replace the values of DROPPED keys by "[redacted]" (the key stays, to show that something was withheld)."""
    for name in DROPPED.intersection(event_dict):
        event_dict[name] = REDACTED
    return event_dict


# The one pseudonymiser configure() installs: set_pseudonym_key changes its key in place, because structlog and
# the stdlib formatter both hold a reference to it, and the key is known only after the master key is loaded.
_pseudonymiser = _Pseudonymise(None)
_handler: logging.Handler | None = None


def set_pseudonym_key(key: bytes | None) -> None:
    """Give the configured chain the installation's pseudonym key (None: phone values become "[redacted]" again)."""
    _pseudonymiser.key = _checked(key)


def _shared_chain() -> list[Processor]:
    """The processors every line goes through, structlog's or a stdlib record (Tornado), before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _pseudonymiser,  # after merge_contextvars: bound context is scrubbed too
        drop_personal,
        structlog.processors.format_exc_info,
    ]


class BoundLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib logger, whose debug() returns at once while debug is off."""

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        # Without this check a debug line that is then dropped (filter_by_level) costs ~5.5 us: the event dict is
        # built and the chain entered. The hot path has debug lines (webhook, reply_part_logged: bench/webhook.py).
        # isEnabledFor is the check filter_by_level makes, on the live stdlib level (a reload may change it).
        if not self._logger.isEnabledFor(logging.DEBUG):
            return None
        return super().debug(event, *args, **kw)


def configure(
    *, fmt: str = "auto", level: str = "info", stream: TextIO | None = None, pseudonym_key: bytes | None = None
) -> None:
    """Route structlog and stdlib logging (root logger, so Tornado's too) through the privacy chain to `stream`.

    fmt "auto" is JSON unless `stream` (default: sys.stdout at call time) is a terminal. Calling it again replaces
    the previous configuration, pseudonym key included; the handler it added before is removed, never stacked.
    """
    if level not in LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"log_format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = stream if stream is not None else sys.stdout
    tty = out.isatty()
    renderer: Processor
    if fmt == "console" or (fmt == "auto" and tty):
        renderer = structlog.dev.ConsoleRenderer(
            colors=tty, timestamp_key="ts", exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    set_pseudonym_key(pseudonym_key)
    shared = _shared_chain()

    global _handler
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],  # `extra=` keys are scrubbed like ours
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.addHandler(handler)
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = handler
    root.setLevel(level.upper())
    # tornado.general says "Malformed HTTP message from <client address>" at INFO: a client IP is personal data,
    # and its warnings and errors are what an operator needs from it.
    logging.getLogger("tornado.general").setLevel(max(logging.WARNING, root.level))
    # the HTTP client under the anthropic SDK and graph.py logs each request's URL at INFO: noise, and the Graph URL
    # names our phone number id
    for name in ("httpx", "httpx2", "httpcore", "anthropic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=BoundLogger,
        context_class=dict,
        # Cached (structlog docs, "Performance"): assembling a logger per call cost ~10 us, 2-3 times per webhook
        # (bench/webhook.py). A cached logger keeps the chain it was first used with, which is safe because every
        # configure() builds the same chain: the pseudonymiser is one object whose key set_pseudonym_key changes,
        # the level is checked on the stdlib logger, and the renderer sits in the root handler, replaced here.
        # (Loggers used before the first configure() are not cached: structlog's default does not cache.)
        cache_logger_on_first_use=True,
    )


_access = structlog.get_logger("tornado.access")
_access_logger = logging.getLogger("tornado.access")  # for a cheap level check


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's `log_function`: the access line (log_access) of a RequestHandler's request."""
    request = handler.request
    log_access(request.method or "", request.path, handler.get_status(), request.request_time())


def log_access(method: str, path: str, status: int, seconds: float) -> None:
    """One "http_request" line with method, path (no query), status and duration_ms: debug for 2xx/3xx, warning
    for 4xx, error for 5xx."""
    # Tornado's own access line logs the full URI: the GET /webhook query carries hub.verify_token, a secret.
    # The client address is left out as well: an IP address is personal data (GDPR recital 30).
    if status < 400 and not _access_logger.isEnabledFor(logging.DEBUG):
        return  # the common case, cheaply: a 2xx line is debug
    fields: dict[str, Any] = {"method": method, "path": path, "status": status, "duration_ms": round(seconds * 1000, 2)}
    if status < 400:  # debug: one line per webhook cost ~25% of the daemon's CPU (bench/webhook.py); metrics count them
        _access.debug("http_request", **fields)
    elif status < 500:
        _access.warning("http_request", **fields)
    else:
        _access.error("http_request", **fields)
