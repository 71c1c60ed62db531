"""Natalia through Claude (claude.py): the real `anthropic` SDK against a fake Messages API on loopback
(fake_claude.py), and build_messages as a pure function: history, budget, merging and cache breakpoints."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from natalia_secure import catalog, claude
from natalia_secure.assistant import PhotoTool
from natalia_secure.errors import ConfigError
from natalia_secure.metrics import Metrics
from natalia_secure.sessions import Session

from .fake_claude import FakeClaude, error, text, tool_use, usage

CATALOG = catalog.load(None)
KEY = "test-key-not-real"
MODEL = "claude-test-model"
PERSONA = "Eres Natalia, persona de prueba."
SECRET = "mi pedido secreto 7341"  # a customer's words: must never reach a log line


def session(*turns: tuple[str, str]) -> Session:
    messages = [{"role": role, "content": content, "timestamp": 1_000 + i} for i, (role, content) in enumerate(turns)]
    return {"messages": messages, "lastActivity": 1_000 + len(turns), "firstInteraction": 1_000}


def ask(
    url: str, sess: Session, photos: PhotoTool | None = None, metrics: Metrics | None = None, **options: Any
) -> tuple[str, PhotoTool, Metrics]:
    """One reply through a fresh ClaudeAssistant (no SDK retries unless asked), closed afterwards."""
    photos = photos if photos is not None else PhotoTool(CATALOG)
    metrics = metrics if metrics is not None else Metrics()
    options.setdefault("max_retries", 0)

    async def run() -> str:
        assistant = claude.ClaudeAssistant(
            api_key=KEY, model=MODEL, persona=PERSONA, catalog=CATALOG, metrics=metrics, base_url=url, **options
        )
        try:
            return await assistant.reply(sess, photos)
        finally:
            await assistant.aclose()

    return asyncio.run(run()), photos, metrics


def requests_total(metrics: Metrics, outcome: str) -> float | None:
    return metrics.registry.get_sample_value("natalia_claude_requests_total", {"outcome": outcome})


def tokens(metrics: Metrics, kind: str) -> float | None:
    return metrics.registry.get_sample_value("natalia_claude_tokens_total", {"type": kind})


def last_tool_result(fake: FakeClaude, index: int = -1) -> dict[str, Any]:
    """The single tool_result block of the last turn of request `index`."""
    (result,) = fake.requests[index].json["messages"][-1]["content"]
    assert result["type"] == "tool_result"
    return dict(result)


@pytest.fixture
def fake() -> Iterator[FakeClaude]:
    with FakeClaude() as f:
        yield f


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


# ---- replies through the SDK ----


def test_a_plain_text_reply_is_returned(fake: FakeClaude) -> None:
    """A text answer comes back stripped, after one request, counted as an ok call."""
    fake.script(text("  ¡Hola! Soy Natalia 😊  "))
    reply, photos, metrics = ask(fake.url, session(("user", "Hola")))
    assert reply == "¡Hola! Soy Natalia 😊"
    assert photos.images == [] and len(fake.requests) == 1
    assert requests_total(metrics, "ok") == 1 and requests_total(metrics, "fallback") == 0


def test_the_request_carries_model_system_tools_and_the_api_key(fake: FakeClaude) -> None:
    """Model, max_tokens, the key, the persona + catalog system prompt as a cache breakpoint, and the photo tool with
    the catalog's album ids as its enum."""
    ask(fake.url, session(("user", "Hola")), max_tokens=321)
    req = fake.requests[0]
    assert req.path == "/v1/messages"
    assert req.headers.get("authorization") == f"Bearer {KEY}" or req.headers.get("x-api-key") == KEY
    body = req.json
    assert body["model"] == MODEL and body["max_tokens"] == 321
    (system,) = body["system"]
    assert system["cache_control"] == {"type": "ephemeral"}
    assert system["text"].startswith(PERSONA + "\n\n")
    assert CATALOG.describe() in system["text"] and "send_photos" in system["text"]
    (tool,) = body["tools"]
    assert tool["name"] == "send_photos"
    schema = tool["input_schema"]
    assert schema["properties"]["album"]["enum"] == ["salado", "dulce"]
    assert (schema["properties"]["count"]["minimum"], schema["properties"]["count"]["maximum"]) == (1, 10)
    assert schema["required"] == ["album"]


def test_the_history_is_merged_starts_with_the_user_and_ends_with_a_cache_breakpoint(fake: FakeClaude) -> None:
    """A leading assistant message is dropped, same-role neighbours become one turn, and only the last block of the
    last turn carries cache_control (the system prompt carries the other)."""
    sess = session(("assistant", "¡Bienvenida!"), ("user", "Hola"), ("user", "¿Hay dulces?"),
                   ("assistant", "Sí"), ("assistant", "Tarta y brownie"), ("user", "Genial"))  # fmt: skip
    ask(fake.url, sess)
    messages = fake.requests[0].json["messages"]
    assert [(m["role"], [b["text"] for b in m["content"]]) for m in messages] == [
        ("user", ["Hola\n¿Hay dulces?"]),
        ("assistant", ["Sí\nTarta y brownie"]),
        ("user", ["Genial"]),
    ]
    marked = [(i, j) for i, m in enumerate(messages) for j, b in enumerate(m["content"]) if "cache_control" in b]
    assert marked == [(2, 0)]
    assert messages[2]["content"][0]["cache_control"] == {"type": "ephemeral"}


def test_photos_through_the_tool_then_more_then_none_left(fake: FakeClaude) -> None:
    """send_photos(salado, 3) queues images 1-3 and tells Claude so in a tool_result; the next reply, from the
    session's progress, continues at 4; once all 6 went out the tool says none are left and nothing is queued."""
    fake.script(tool_use("send_photos", {"album": "salado", "count": 3}, reply="¡Claro!"), text("Aquí tienes 📸"))
    reply, photos, _ = ask(fake.url, session(("user", "Quiero fotos de salado")))
    assert reply == "¡Claro!\nAquí tienes 📸"
    assert [(album, index) for album, index, _ in photos.images] == [("salado", 0), ("salado", 1), ("salado", 2)]
    assert photos.sent == {"salado": 3}
    tool_id = fake.requests[1].json["messages"][-2]["content"][-1]["id"]
    result = last_tool_result(fake)
    assert result["tool_use_id"] == tool_id and "is_error" not in result
    assert "1-3 de 6" in result["content"] and "quedan 3" in result["content"]
    assistant_turn = fake.requests[1].json["messages"][-2]
    assert assistant_turn["role"] == "assistant"
    assert [b["type"] for b in assistant_turn["content"]] == ["text", "tool_use"]

    fake.script(tool_use("send_photos", {"album": "salado", "count": 3}), text("Más fotos"))
    more = PhotoTool(CATALOG, dict(photos.sent), last_album="salado")
    reply, more, _ = ask(fake.url, session(("user", "¿Tienes más fotos?")), photos=more)
    assert reply == "Más fotos"
    assert [index for _, index, _ in more.images] == [3, 4, 5]
    assert "4-6 de 6" in last_tool_result(fake)["content"]

    fake.script(tool_use("send_photos", {"album": "salado", "count": 3}), text("Ya no me quedan más de salado."))
    done = PhotoTool(CATALOG, dict(more.sent), last_album="salado")
    reply, done, _ = ask(fake.url, session(("user", "¿Más?")), photos=done)
    assert reply == "Ya no me quedan más de salado."
    assert done.images == [] and "no quedan más" in last_tool_result(fake)["content"]


@pytest.mark.parametrize(
    ("name", "tool_input", "says"),
    [
        ("send_photos", {"album": "bebidas", "count": 2}, "No existe el álbum 'bebidas'"),
        ("send_photos", {"album": ["salado"]}, "No existe el álbum"),
        ("send_photos", {"album": "dulce", "count": 0}, "count debe ser un entero"),
        ("send_photos", {"album": "dulce", "count": "3"}, "count debe ser un entero"),
        ("send_photos", {"album": "dulce", "count": True}, "count debe ser un entero"),
        ("send_videos", {"album": "dulce"}, "No existe la herramienta"),
    ],
)
def test_bad_tool_input_is_an_error_result_and_sends_nothing(
    fake: FakeClaude, name: str, tool_input: dict[str, Any], says: str
) -> None:
    """An unknown album, a count outside 1..10 or of another type, or an unknown tool: is_error, nothing queued."""
    fake.script(tool_use(name, tool_input), text("Perdona, ese álbum no existe."))
    reply, photos, _ = ask(fake.url, session(("user", "fotos")))
    result = last_tool_result(fake)
    assert result["is_error"] is True and says in result["content"]
    assert photos.images == [] and photos.sent == {}
    assert reply == "Perdona, ese álbum no existe."


def test_a_missing_count_sends_three(fake: FakeClaude) -> None:
    """count is optional in the schema; without it the tool sends 3, like the offline Natalia."""
    fake.script(tool_use("send_photos", {"album": "dulce"}), text("Mira"))
    _, photos, _ = ask(fake.url, session(("user", "dulces")))
    assert [index for _, index, _ in photos.images] == [0, 1, 2]


def test_tool_rounds_are_bounded(fake: FakeClaude) -> None:
    """A model that keeps calling tools gets max_tool_rounds rounds: max_tool_rounds + 1 requests, then its text."""
    fake.script(*(tool_use("send_photos", {"album": "dulce", "count": 1}, reply=f"r{i}") for i in range(5)))
    reply, photos, _ = ask(fake.url, session(("user", "dulces")), max_tool_rounds=2)
    assert len(fake.requests) == 3
    assert reply == "r0\nr1\nr2"
    assert [index for _, index, _ in photos.images] == [0, 1]  # the third call is never run: its result is unseen


def test_token_usage_of_every_call_is_counted(fake: FakeClaude) -> None:
    """input, output, cache_read and cache_write tokens are summed over the tool round's two calls."""
    fake.script(
        tool_use("send_photos", {"album": "dulce", "count": 1}, use=usage(100, 20, cache_read=1500, cache_write=300)),
        text("Listo", use=usage(7, 3, cache_read=1800, cache_write=40)),
    )
    _, _, metrics = ask(fake.url, session(("user", "dulces")))
    assert requests_total(metrics, "ok") == 2
    assert (tokens(metrics, "input"), tokens(metrics, "output")) == (107, 23)
    assert (tokens(metrics, "cache_read"), tokens(metrics, "cache_write")) == (3300, 340)


def test_a_500_is_retried_by_the_sdk(fake: FakeClaude) -> None:
    """With max_retries=1 an internal server error is retried once, and the second answer is the reply."""
    fake.script(error(500, "api_error", "Internal server error"), text("Hola de nuevo"))
    reply, _, metrics = ask(fake.url, session(("user", "Hola")), max_retries=1)
    assert reply == "Hola de nuevo"
    assert len(fake.requests) == 2 and fake.requests[0].json == fake.requests[1].json
    assert requests_total(metrics, "ok") == 1 and requests_total(metrics, "fallback") == 0


def _no_secret_logged(captured: list[MutableMapping[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    lines = [repr(entry) for entry in captured] + [record.getMessage() for record in caplog.records]
    assert lines, "nothing was logged at all"
    assert not any(SECRET in line or PERSONA in line for line in lines)


def test_a_400_gives_the_fallback_and_logs_no_content(fake: FakeClaude, caplog: pytest.LogCaptureFixture) -> None:
    """A refused request (not retried) returns the fallback, counts outcome fallback, and logs the error type and
    status only: not the customer's text, not the prompt, not even with every logger at DEBUG (the SDK's own
    DEBUG lines quote the whole request)."""
    logging.getLogger("anthropic").setLevel(logging.NOTSET)  # as a fresh process has it; the assistant pins it
    caplog.set_level(logging.DEBUG)
    fake.script(error(400, "invalid_request_error", "prompt is too long"))
    with capture_logs() as captured:
        reply, photos, metrics = ask(fake.url, session(("user", SECRET)), fallback="Un momento, por favor.")
    assert reply == "Un momento, por favor." and photos.images == []
    assert len(fake.requests) == 1
    assert requests_total(metrics, "fallback") == 1 and requests_total(metrics, "ok") == 0
    (failed,) = [e for e in captured if e["event"] == "claude_failed"]
    assert failed["log_level"] == "error"
    assert (failed["error_type"], failed["status"]) == ("BadRequestError", 400)
    _no_secret_logged(captured, caplog)


def test_a_refused_connection_gives_the_fallback(refused_port: int, caplog: pytest.LogCaptureFixture) -> None:
    """No server: APIConnectionError after the SDK's retries (none here), the default polite Spanish fallback."""
    caplog.set_level(logging.DEBUG)
    with capture_logs() as captured:
        reply, _, metrics = ask(f"http://127.0.0.1:{refused_port}", session(("user", SECRET)))
    assert reply == claude.FALLBACK_TEXT
    assert requests_total(metrics, "fallback") == 1
    (failed,) = [e for e in captured if e["event"] == "claude_failed"]
    assert (failed["error_type"], failed["status"]) == ("APIConnectionError", None)
    _no_secret_logged(captured, caplog)


def test_a_hung_request_times_out_into_the_fallback(fake: FakeClaude) -> None:
    """A request the server never answers ends at the SDK's timeout with the fallback (APITimeoutError)."""
    fake.hold()
    with capture_logs() as captured:
        reply, _, _ = ask(fake.url, session(("user", "Hola")), timeout=0.3)
    assert reply == claude.FALLBACK_TEXT and len(fake.requests) == 1
    assert [e["error_type"] for e in captured if e["event"] == "claude_failed"] == ["APITimeoutError"]


def test_photos_queued_before_a_failure_stay_queued(fake: FakeClaude) -> None:
    """A failure after a tool round returns the fallback, and the photos already queued are still to be sent."""
    fake.script(tool_use("send_photos", {"album": "salado", "count": 2}), error(400, "invalid_request_error", "no"))
    reply, photos, metrics = ask(fake.url, session(("user", "fotos de salado")))
    assert reply == claude.FALLBACK_TEXT
    assert [index for _, index, _ in photos.images] == [0, 1] and photos.sent == {"salado": 2}
    assert requests_total(metrics, "ok") == 1 and requests_total(metrics, "fallback") == 1


def test_an_empty_answer_gives_the_fallback(fake: FakeClaude) -> None:
    """No text and no photos (e.g. a refusal) would leave the customer without an answer: the fallback instead."""
    fake.script(text(" ", stop_reason="refusal"))
    with capture_logs() as captured:
        reply, _, _ = ask(fake.url, session(("user", "Hola")))
    assert reply == claude.FALLBACK_TEXT
    assert [e["stop_reason"] for e in captured if e["event"] == "claude_empty_reply"] == ["refusal"]


def test_nothing_to_answer_makes_no_request(fake: FakeClaude) -> None:
    """A history without a user turn at its end (empty, or ending with Natalia's message) is answered with "" and
    costs no API call."""
    assert ask(fake.url, session())[0] == ""
    assert ask(fake.url, session(("user", "Hola"), ("assistant", "¡Hola!")))[0] == ""
    assert fake.requests == []


def test_the_fake_refuses_what_the_api_refuses(fake: FakeClaude) -> None:
    """The fake is strict like the service: an unanswered tool_use is a 400 that consumes no scripted reply."""

    async def run() -> None:
        import anthropic

        client = anthropic.AsyncAnthropic(api_key=KEY, base_url=fake.url, max_retries=0)
        turns: list[Any] = [
            {"role": "user", "content": "fotos"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_x", "name": "send_photos", "input": {}}]},
            {"role": "user", "content": "¿y?"},
        ]
        try:
            with pytest.raises(anthropic.BadRequestError):
                await client.messages.create(model=MODEL, max_tokens=10, messages=turns)
        finally:
            await client.close()

    fake.script(text("scripted"))
    asyncio.run(run())
    assert fake.pending() == 1


# ---- the persona ----


def test_the_built_in_persona_is_natalia_in_spanish() -> None:
    """Without a file the packaged persona_es.md is used: Natalia, the photo tool, no invented prices."""
    persona = claude.load_persona(None)
    assert persona.startswith("Eres Natalia") and "send_photos" in persona and "precios" in persona


def test_a_persona_file_is_read_as_utf8(tmp_path: Any) -> None:
    """A persona file's text, surrounding blank lines stripped."""
    path = tmp_path / "persona.md"
    path.write_text("\nEres Laura, de la panadería.\n\n", encoding="utf-8")
    assert claude.load_persona(str(path)) == "Eres Laura, de la panadería."


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot read"), (b"  \n", "is empty"), (b"\xff\xfe", "not UTF-8"), (b"x" * (claude.MAX_PERSONA + 1), "larger")],
)
def test_a_bad_persona_file_is_a_config_error(tmp_path: Any, content: bytes | None, says: str) -> None:
    """Missing, empty, not UTF-8 or too large: ConfigError naming the file."""
    path = tmp_path / "persona.md"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=says) as raised:
        claude.load_persona(str(path))
    assert str(path) in str(raised.value)


def test_a_persona_that_is_not_a_file_is_refused(tmp_path: Any) -> None:
    """A directory (or a FIFO, which would block) is not read."""
    with pytest.raises(ConfigError, match="not a regular file"):
        claude.load_persona(str(tmp_path))


# ---- build_messages (pure) ----


def msgs(*turns: tuple[str, str]) -> list[dict[str, Any]]:
    return list(session(*turns)["messages"])


def texts(turns: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(t["role"], "|".join(b["text"] for b in t["content"])) for t in turns]


def test_same_role_neighbours_merge_and_leading_assistants_drop() -> None:
    """Roles kept, consecutive same-role contents joined with a newline, the first turn a user turn."""
    out = claude.build_messages(msgs(("assistant", "a0"), ("assistant", "a1"), ("user", "u0"), ("user", "u1"),
                                     ("assistant", "a2"), ("user", "u2")), 10_000)  # fmt: skip
    assert texts(out) == [("user", "u0\nu1"), ("assistant", "a2"), ("user", "u2")]


def test_blank_messages_are_left_out() -> None:
    """Empty or blank contents are skipped (the API refuses empty text blocks); their neighbours may then merge."""
    out = claude.build_messages(msgs(("user", "u0"), ("assistant", " \n"), ("user", "u1"), ("assistant", "")), 10_000)
    assert texts(out) == [("user", "u0\nu1")]


def test_only_the_last_block_is_a_cache_breakpoint_and_the_input_is_not_changed() -> None:
    """cache_control sits on the last content block of the last turn only; the session's messages are untouched."""
    source = msgs(("user", "u0"), ("assistant", "a0"), ("user", "u1"))
    before = [dict(m) for m in source]
    out = claude.build_messages(source, 10_000)
    assert [[("cache_control" in b) for b in t["content"]] for t in out] == [[False], [False], [True]]
    assert out[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert source == before
    assert claude.build_messages([], 10_000) == []


def conversation(n: int, size: int = 10) -> list[dict[str, Any]]:
    """n alternating messages (user first), each `size` characters, content starting with its index."""
    return msgs(*((("user", "assistant")[i % 2], f"{i:03d}".ljust(size, ".")) for i in range(n)))


def first_index(out: list[dict[str, Any]]) -> int:
    return int(out[0]["content"][0]["text"][:3])


def test_the_start_moves_only_in_steps_of_block_as_the_conversation_grows() -> None:
    """Growing a turn (2 messages) at a time over a tight budget, the start is always a multiple of `block`, never
    moves back, and stays put for several turns in a row: the cached prefix keeps hitting."""
    starts = []
    for n in range(41, 161, 2):
        out = claude.build_messages(conversation(n), budget_chars=450, block=20)
        start = first_index(out)
        kept = sum(len(m["content"]) for m in conversation(n)[start:])
        assert start % 20 == 0 and kept <= 450
        assert kept + 20 * 10 > 450  # the smallest multiple that fits: one block earlier would not
        starts.append(start)
    assert starts == sorted(starts)
    runs = [len(list(group)) for _, group in itertools.groupby(starts)]
    assert min(runs[1:-1]) >= 9  # 20 messages = 10 turns per block once the budget binds


def test_the_newest_user_turn_is_kept_even_alone_over_budget() -> None:
    """When even the newest user turn is over budget, it is sent alone, whole."""
    out = claude.build_messages(msgs(("user", "u0"), ("assistant", "a0"), ("user", "x" * 500), ("user", "y" * 500)), 100)
    assert texts(out) == [("user", "x" * 500 + "\n" + "y" * 500)]


def test_when_the_last_block_is_over_budget_what_fits_is_kept() -> None:
    """If no multiple of `block` fits, the most recent messages that fit are kept (at least the newest user turn)."""
    out = claude.build_messages(conversation(25, size=10), budget_chars=35, block=20)
    assert [first_index(out)] == [22] and len(out) == 3


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=80),
    budget=st.integers(0, 1_500),
    block=st.integers(1, 25),
)
def test_budget_properties(lengths: list[int], budget: int, block: int) -> None:
    """For alternating conversations ending with a user message: the newest message is always sent; what is sent is
    a contiguous suffix starting with a user turn; it fits the budget unless it is the newest message alone; and when
    some multiple of `block` fits, the start is the smallest such (or the user message after it)."""
    if len(lengths) % 2 == 0:
        lengths = lengths[:-1] or [1]
    source = msgs(*((("user", "assistant")[i % 2], f"{i:03d}".ljust(max(3, n), ".")) for i, n in enumerate(lengths)))
    out = claude.build_messages(source, budget, block)
    n = len(source)
    start = first_index(out)
    assert out[0]["role"] == "user" and out[-1]["content"][0]["text"].startswith(f"{n - 1:03d}")
    assert [first_index([t]) for t in out] == list(range(start, n))
    kept = sum(len(m["content"]) for m in source[start:])
    assert kept <= budget or start == n - 1
    fits = [s for s in range(0, n, block) if sum(len(m["content"]) for m in source[s:]) <= budget]
    if fits:
        assert start in (fits[0], fits[0] + 1)


def test_a_session_at_the_message_cap_keeps_its_cached_prefix_for_a_block_of_turns() -> None:
    """At 250 messages the oldest leaves with every new one; counting what was dropped (sessions.py) keeps the
    start of the history on the same message for `block` turns, so the prompt cache keeps hitting."""
    from natalia_secure import sessions as sessions_module

    session = sessions_module.new_session(0)
    firsts = []
    for i in range(300):
        sessions_module.append_message(session, "user" if i % 2 == 0 else "assistant", f"m{i}", i, max_messages=250)
        if i >= 250 and i % 2 == 0:  # a user turn to answer
            dropped = session["natalia"]["dropped"]
            sent = claude.build_messages(session["messages"], 1_000_000, block=20, offset=dropped)
            firsts.append(sent[0]["content"][0]["text"].split("\n")[0])
    assert session["natalia"]["dropped"] == 50
    changes = sum(1 for a, b in itertools.pairwise(firsts) if a != b)
    assert changes <= 3, firsts  # 25 turns, the start moved at most once per 20 dropped messages
