"""Logs keep personal data out: the privacy processors on dicts, then the configured chain for structlog and Tornado."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import tornado.testing
import tornado.web
from structlog.testing import capture_logs

from natalia_secure import logs
from natalia_secure.errors import ConfigError, KeyMaterialError

KEY = bytes(range(32))  # a fixed test key, never a real one
OTHER_KEY = bytes(range(1, 33))
PHONE = "15550001234"  # a 555 fiction number
WAMID = "wamid.HBgLMTU1NTAwMDEyMzQVAgASGBQzQUZBNDc4OTBDRDlEMTI0RkQ2RgA="
TEXT = "hola, quiero cambiar mi pedido"
PSEUDONYM = re.compile(r"p-[0-9a-f]{16}")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave structlog, the root logger and the pseudonym key as they were, so other test files are not affected."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logs.set_pseudonym_key(None)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(stream)]


# ---- the processors, on dicts ----


def test_pseudonym_is_keyed_stable_and_short() -> None:
    """The same value gives the same pseudonym under one key, another under another key, and never contains it."""
    p = logs.pseudonym(KEY, PHONE)
    assert PSEUDONYM.fullmatch(p)
    assert logs.pseudonym(KEY, PHONE) == p
    assert logs.pseudonym(OTHER_KEY, PHONE) != p
    assert logs.pseudonym(KEY, "15550001235") != p
    assert PHONE not in p


def test_pseudonymise_replaces_every_phone_and_wamid_key() -> None:
    """Every key of PSEUDONYMISED gets the value's pseudonym; other keys and None values are left as they are."""
    event = {name: PHONE for name in logs.PSEUDONYMISED} | {"event": "webhook", "messages": 3, "wamid": WAMID}
    event["to"] = None
    out = logs.pseudonymise(KEY)(None, "info", dict(event))
    assert out["phone"] == out["wa_id"] == out["recipient"] == out["from"] == logs.pseudonym(KEY, PHONE)
    assert out["wamid"] == logs.pseudonym(KEY, WAMID)
    assert out["to"] is None
    assert out["event"] == "webhook" and out["messages"] == 3
    assert PHONE not in repr(out) and WAMID not in repr(out)


def test_pseudonymise_is_stable_per_key_and_differs_across_keys() -> None:
    """Two lines about one customer carry the same pseudonym (they can be followed); another installation's differs."""
    first = logs.pseudonymise(KEY)(None, "info", {"phone": PHONE})
    second = logs.pseudonymise(KEY)(None, "info", {"wa_id": PHONE})
    other = logs.pseudonymise(OTHER_KEY)(None, "info", {"phone": PHONE})
    assert first["phone"] == second["wa_id"]
    assert other["phone"] != first["phone"]


def test_pseudonymise_handles_lists_and_non_strings() -> None:
    """A list of numbers is pseudonymised element by element; a number given as int gets the pseudonym of its text."""
    out = logs.pseudonymise(KEY)(None, "info", {"recipient": [PHONE, "15550009999"], "phone": int(PHONE)})
    assert out["recipient"] == [logs.pseudonym(KEY, PHONE), logs.pseudonym(KEY, "15550009999")]
    assert out["phone"] == logs.pseudonym(KEY, PHONE)


def test_without_a_key_phones_are_redacted() -> None:
    """Before the master key is loaded there is no pseudonym key: the values become "[redacted]", never raw."""
    out = logs.pseudonymise(None)(None, "info", {"phone": PHONE, "message_id": WAMID})
    assert out == {"phone": "[redacted]", "message_id": "[redacted]"}


def test_a_short_pseudonym_key_is_refused() -> None:
    """A key short enough to guess would let anyone reverse pseudonyms by enumerating numbers: KeyMaterialError."""
    with pytest.raises(KeyMaterialError, match="pseudonym key"):
        logs.pseudonymise(b"short")
    with pytest.raises(KeyMaterialError):
        logs.set_pseudonym_key(b"")


def test_drop_personal_redacts_text_and_names_and_keeps_the_rest() -> None:
    """text, content, body, caption, name, prompt, reply... become "[redacted]"; counts and outcomes stay."""
    event: dict[str, Any] = {name: TEXT for name in logs.DROPPED}
    event |= {"event": "reply_sent", "chars": 30, "messages": 2, "outcome": "ok"}
    out = logs.drop_personal(None, "info", event)
    for name in ("text", "content", "body", "caption", "name", "profile_name", "message_text", "prompt", "reply", "history"):
        assert out[name] == "[redacted]", name
    assert out["chars"] == 30 and out["messages"] == 2 and out["outcome"] == "ok"
    assert TEXT not in repr(out)


def test_processors_act_on_top_level_keys_only() -> None:
    """Nested values are not walked (the convention: personal data only under top-level keys); this pins the limit."""
    out = logs.drop_personal(None, "info", logs.pseudonymise(KEY)(None, "info", {"detail": {"phone": PHONE, "text": TEXT}}))
    assert out == {"detail": {"phone": PHONE, "text": TEXT}}


def test_processors_in_a_structlog_chain() -> None:
    """Run by structlog (capture_logs), bound and call-time values are scrubbed before anything sees them."""
    with capture_logs(processors=[logs.pseudonymise(KEY), logs.drop_personal]) as captured:
        structlog.get_logger("natalia_secure.web").bind(phone=PHONE).info("webhook", text=TEXT, messages=1)
    assert captured == [
        {"event": "webhook", "phone": logs.pseudonym(KEY, PHONE), "text": "[redacted]", "messages": 1, "log_level": "info"}
    ]


# ---- configure ----


def test_json_lines_from_structlog_and_tornado_loggers() -> None:
    """A structlog line and a stdlib tornado.access line are each one JSON object with ts, level, event, scrubbed."""
    out = io.StringIO()
    logs.configure(fmt="json", stream=out, pseudonym_key=KEY)
    structlog.get_logger("natalia_secure.web").info("webhook", outcome="ok", phone=PHONE, message_id=WAMID, text=TEXT)
    logging.getLogger("tornado.access").warning("slow request", extra={"phone": PHONE, "body": TEXT})
    mine, tornados = json_lines(out)
    assert mine["event"] == "webhook" and mine["level"] == "info" and mine["logger"] == "natalia_secure.web"
    assert mine["phone"] == logs.pseudonym(KEY, PHONE) and mine["message_id"] == logs.pseudonym(KEY, WAMID)
    assert mine["text"] == "[redacted]"
    assert tornados["event"] == "slow request" and tornados["level"] == "warning" and tornados["logger"] == "tornado.access"
    assert tornados["phone"] == mine["phone"] and tornados["body"] == "[redacted]"
    for line in (mine, tornados):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["ts"])
    assert PHONE not in out.getvalue() and TEXT not in out.getvalue() and WAMID not in out.getvalue()


def test_bound_context_and_exceptions_go_through_the_chain() -> None:
    """contextvars are scrubbed like call-time keys; an exception is rendered into the line as text."""
    out = io.StringIO()
    logs.configure(fmt="json", stream=out, pseudonym_key=KEY)
    structlog.contextvars.bind_contextvars(wa_id=PHONE)
    try:
        raise ValueError("malformed entry")
    except ValueError:
        structlog.get_logger("natalia_secure.intake").exception("webhook_failed")
    (line,) = json_lines(out)
    assert line["wa_id"] == logs.pseudonym(KEY, PHONE) and line["level"] == "error"
    assert "ValueError: malformed entry" in line["exception"]


def test_level_filters_both_sources() -> None:
    """At "warning", info lines from structlog and from Tornado are dropped and warnings kept."""
    out = io.StringIO()
    logs.configure(fmt="json", level="warning", stream=out)
    structlog.get_logger("natalia_secure.web").info("webhook")
    logging.getLogger("tornado.general").info("chatter")
    structlog.get_logger("natalia_secure.web").warning("webhook_rejected")
    logging.getLogger("tornado.general").warning("malformed request")
    assert [line["event"] for line in json_lines(out)] == ["webhook_rejected", "malformed request"]


def test_debug_lines_follow_the_level_a_reload_sets() -> None:
    """A logger cached at "info" drops debug lines, shows them once configure() sets "debug" (SIGHUP), and drops
    them again after: debug() checks the live level, never one remembered from the first use."""
    out = io.StringIO()
    log = structlog.get_logger("natalia_secure.intake")
    logs.configure(fmt="json", level="info", stream=out)
    log.debug("hidden", n=1)
    logs.configure(fmt="json", level="debug", stream=out)
    log.debug("shown", n=2, phone=PHONE)
    logs.configure(fmt="json", level="info", stream=out)
    log.debug("hidden again", n=3)
    log.info("info", n=4)
    lines = json_lines(out)
    assert [line["event"] for line in lines] == ["shown", "info"]
    assert lines[0]["level"] == "debug" and lines[0]["phone"] == "[redacted]"  # the privacy chain still applies


def test_log_access_levels_and_fields() -> None:
    """log_access (POST /webhook's access line, outside tornado.web): 2xx dropped at "info", 4xx warning, 5xx
    error, the duration in milliseconds."""
    out = io.StringIO()
    logs.configure(fmt="json", level="info", stream=out)
    logs.log_access("POST", "/webhook", 200, 0.001)
    logs.log_access("POST", "/webhook", 401, 0.0012345)
    logs.log_access("POST", "/webhook", 503, 0.5)
    lines = json_lines(out)
    assert [(line["status"], line["level"]) for line in lines] == [(401, "warning"), (503, "error")]
    assert lines[0]["duration_ms"] == 1.23 and lines[0]["method"] == "POST" and lines[0]["path"] == "/webhook"


def test_unknown_level_or_format_is_a_config_error_naming_the_setting() -> None:
    """A level or format outside the documented choices is refused before anything changes."""
    with pytest.raises(ConfigError, match="log_level"):
        logs.configure(level="verbose", stream=io.StringIO())
    with pytest.raises(ConfigError, match="log_format"):
        logs.configure(fmt="xml", stream=io.StringIO())


def test_configure_twice_replaces_and_never_stacks() -> None:
    """A second configure (SIGHUP) gives one line per event, on the new stream only, with the new key."""
    first, second = io.StringIO(), io.StringIO()
    log = structlog.get_logger("natalia_secure.daemon")  # module-level loggers are made once, before configure
    logs.configure(fmt="json", stream=first, pseudonym_key=KEY)
    log.info("before", phone=PHONE)
    logs.configure(fmt="json", stream=second, pseudonym_key=OTHER_KEY)
    log.info("after", phone=PHONE)
    logging.getLogger("tornado.application").error("after too")
    assert [line["event"] for line in json_lines(first)] == ["before"]
    assert [line["event"] for line in json_lines(second)] == ["after", "after too"]
    assert json_lines(second)[0]["phone"] == logs.pseudonym(OTHER_KEY, PHONE)


def test_a_logger_used_before_configure_follows_it(capsys: pytest.CaptureFixture[str]) -> None:
    """A module-level logger first used under structlog's defaults is not stuck with them once configure() runs."""
    log = structlog.get_logger("natalia_secure.cli")
    log.info("early")  # structlog's default chain: console on stdout, no privacy processors
    out = io.StringIO()
    logs.configure(fmt="json", stream=out, pseudonym_key=KEY)
    log.info("later", phone=PHONE)
    assert [line["event"] for line in json_lines(out)] == ["later"]
    assert PHONE not in capsys.readouterr().out


def test_set_pseudonym_key_applies_to_the_running_configuration() -> None:
    """Lines before the master key is loaded are redacted; after set_pseudonym_key they carry the pseudonym."""
    out = io.StringIO()
    logs.configure(fmt="json", stream=out)
    log = structlog.get_logger("natalia_secure.daemon")
    log.info("starting", phone=PHONE)
    logs.set_pseudonym_key(KEY)
    log.info("started", phone=PHONE)
    assert [line["phone"] for line in json_lines(out)] == ["[redacted]", logs.pseudonym(KEY, PHONE)]


def test_console_format_is_readable_and_still_scrubbed() -> None:
    """fmt="console" gives one human line per event (not JSON, no colours off a terminal), phones pseudonymised."""
    out = io.StringIO()
    logs.configure(fmt="console", stream=out, pseudonym_key=KEY)
    structlog.get_logger("natalia_secure.web").info("webhook", phone=PHONE, text=TEXT, messages=3)
    (line,) = lines(out)
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert "webhook" in line and "messages=3" in line and "\x1b[" not in line
    assert f"phone={logs.pseudonym(KEY, PHONE)}" in line and "text=[redacted]" in line
    assert PHONE not in line and TEXT not in line


def test_auto_format_is_json_off_a_terminal() -> None:
    """fmt="auto" on a stream that is not a terminal (journald, a pipe) writes JSON lines."""
    out = io.StringIO()
    logs.configure(stream=out)
    structlog.get_logger("natalia_secure.web").info("listening", port=8080)
    assert json_lines(out)[0]["port"] == 8080


# ---- log_request, with a real Tornado server on loopback ----


class Echo(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish("ok")


class Broken(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_status(503)
        self.finish("down")


class LogRequestTest(tornado.testing.AsyncHTTPTestCase):
    """log_request as the Application's log_function, over real HTTP."""

    def setUp(self) -> None:
        self.out = io.StringIO()
        root = logging.getLogger()
        self.saved = list(root.handlers), root.level
        logs.configure(fmt="json", level="debug", stream=self.out, pseudonym_key=KEY)  # 2xx lines are debug
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in root.handlers[:]:
            if handler not in self.saved[0]:
                root.removeHandler(handler)
        root.setLevel(self.saved[1])
        logs.set_pseudonym_key(None)

    def get_app(self) -> tornado.web.Application:
        return tornado.web.Application([("/webhook", Echo), ("/broken", Broken)], log_function=logs.log_request)

    def requests(self) -> list[dict[str, Any]]:
        return [line for line in json_lines(self.out) if line["event"] == "http_request"]

    def test_the_query_and_its_verify_token_never_reach_the_log(self) -> None:
        """GET /webhook?hub.verify_token=... is logged as path /webhook, status, duration; the secret is nowhere."""
        secret = "verify-token-for-tests-only"
        response = self.fetch(f"/webhook?hub.mode=subscribe&hub.verify_token={secret}&hub.challenge=42")
        assert response.code == 200
        (line,) = self.requests()
        assert line["method"] == "GET" and line["path"] == "/webhook" and line["status"] == 200
        assert line["level"] == "debug" and line["logger"] == "tornado.access"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert secret not in self.out.getvalue() and "hub." not in self.out.getvalue()

    def test_the_level_follows_the_status(self) -> None:
        """2xx is debug (one line per webhook cost a quarter of the daemon's CPU), 4xx warning, 5xx error."""
        self.fetch("/webhook")
        self.fetch("/nowhere")
        self.fetch("/broken")
        assert [(line["status"], line["level"]) for line in self.requests()] == [(200, "debug"), (404, "warning"), (503, "error")]
