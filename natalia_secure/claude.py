"""Natalia through Claude: the Messages API (official `anthropic` SDK, async client) with a photo tool and prompt caching.

`ClaudeAssistant.reply(session, photos)` sends the persona, the photo catalog and the session's history within a
character budget, lets Claude call `send_photos(album, count)` (the shared photo path, assistant.PhotoTool) for a few
rounds, and returns the text of every round. What is cached, in the API's prefix order tools -> system -> messages
(Anthropic docs, "Prompt caching"): a breakpoint on the system prompt, and one on the last history message, so the
next turn of the conversation reads the whole history from the cache and pays only for what is new. `build_messages`
is pure and keeps that prefix stable: the history's start moves in steps of `block` messages, not every turn.

Failures (after the SDK's own retries and per-request timeout) give a polite fallback text; the log line names the
error type and HTTP status, never the conversation (guarantee 4, logs.py).
"""

from __future__ import annotations

import logging
import os
import stat
from importlib import resources
from typing import Any, cast

import anthropic
import structlog
from anthropic.types import Message, ToolUseBlock, Usage

from . import sessions
from .assistant import PhotoTool
from .catalog import MAX_IMAGES_PER_REPLY, Catalog
from .errors import ConfigError
from .metrics import Metrics

log = structlog.get_logger("natalia_secure.claude")

DEFAULT_PERSONA = "persona_es.md"  # shipped inside the package (pyproject package-data *.md)
# no promise of a follow-up: nothing retries a message once this answer is recorded
FALLBACK_TEXT = "Perdona, ahora mismo no puedo responderte. ¿Me escribes de nuevo en unos minutos?"
MAX_PERSONA = 256 * 1024  # a persona is a page of text; refuse to send a mistaken multi-megabyte file with every request
TOOL_NAME = "send_photos"
DEFAULT_COUNT = 3  # what PhotoTool.send_photos and the offline Natalia send when no count is given
EPHEMERAL: dict[str, str] = {"type": "ephemeral"}  # the 5-minute cache (Anthropic docs, "Prompt caching")
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")


def load_persona(path: str | None) -> str:
    """The system prompt at `path` (UTF-8 text), or the built-in Spanish persona when `path` is None."""
    if path is None:
        return resources.files(__package__).joinpath(DEFAULT_PERSONA).read_text("utf-8").strip()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang the start
    except OSError as exc:
        raise ConfigError(f"cannot read the persona file {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"the persona file {path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_PERSONA + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the persona file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PERSONA:
        raise ConfigError(f"the persona file {path} is larger than {MAX_PERSONA} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"the persona file {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"the persona file {path} is empty")
    return text


def _start(messages: list[dict[str, Any]], budget_chars: int, block: int, offset: int = 0) -> int:
    """Where the history sent begins (see build_messages)."""
    n = len(messages)
    suffix = [0] * (n + 1)  # suffix[i]: characters of messages[i:]
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + len(messages[i]["content"])
    newest = n  # start of the newest user turn: the last run of user messages
    for i in range(n - 1, -1, -1):
        if messages[i]["role"] == "user":
            newest = i
        elif newest < n:
            break
    # block boundaries counted from the conversation's first message ever (`offset` were dropped at the 250 cap), so
    # a session at the cap, which loses its oldest message every turn, keeps the same prefix for `block` turns
    start = next((s for s in range((-offset) % block, n, block) if suffix[s] <= budget_chars), None)
    if start is None:  # even the last partial block is over budget: keep what fits, message by message
        start = next((i for i in range(n + 1) if suffix[i] <= budget_chars), n)
    return min(start, newest)


def build_messages(
    messages: list[dict[str, Any]], budget_chars: int, block: int = 20, offset: int = 0
) -> list[dict[str, Any]]:
    """Session messages -> Messages API messages, within `budget_chars`, the last one marked as a cache breakpoint.

    Kept: the most recent messages whole, from the smallest multiple of `block` whose messages fit the budget (the
    newest user turn always, even alone over budget). Then: empty messages left out, consecutive same-role messages
    merged into one turn ("\\n"), leading assistant turns dropped (a conversation starts with the user).
    """
    if block < 1:
        raise ValueError("block must be at least 1")
    turns: list[dict[str, Any]] = []
    for m in messages[_start(messages, budget_chars, block, offset) :]:
        text = m["content"]
        if not text.strip():
            continue  # the API refuses empty text blocks
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1]["content"][0]["text"] += "\n" + text
        elif turns or m["role"] == "user":
            turns.append({"role": m["role"], "content": [{"type": "text", "text": text}]})
    if turns:
        # The multi-turn pattern (Anthropic docs, "Prompt caching"): a breakpoint at the end of the history makes all of
        # it the cached prefix of the next request, which repeats it and adds the reply and the next user turn.
        turns[-1]["content"][-1]["cache_control"] = dict(EPHEMERAL)
    return turns


def system_prompt(persona: str, catalog: Catalog) -> str:
    """The persona, then what Claude needs to send photos: the album ids and how the tool behaves."""
    albums = catalog.describe()
    if not albums:
        return persona + "\n\n## Fotos\nAhora mismo no hay fotos para enviar: si te las piden, dilo con amabilidad."
    return (
        f"{persona}\n\n"
        "## Catálogo de fotos\n"
        f"Para enviar fotos llama a la herramienta {TOOL_NAME}(album, count) con uno de estos álbumes:\n"
        f"{albums}\n"
        "Envía, en orden, las siguientes fotos del álbum que este cliente aún no ha recibido, y te dice cuáles "
        "fueron y cuántas quedan. En el historial verás líneas como [fotos enviadas: Salado 1-3]: las añade el "
        "sistema, no las escribas tú. Si la herramienta dice que no quedan más, díselo al cliente."
    )


def photo_tool(catalog: Catalog) -> dict[str, Any]:
    return {
        "name": TOOL_NAME,
        "description": (
            "Envía al cliente por WhatsApp las siguientes fotos de un álbum que aún no ha recibido. Úsala cuando "
            "pida fotos; si pide más, llámala otra vez con el mismo álbum. Devuelve qué fotos se enviaron."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "album": {"type": "string", "enum": list(catalog.albums), "description": "El id del álbum."},
                "count": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_IMAGES_PER_REPLY,
                    "description": f"Cuántas fotos enviar (por defecto {DEFAULT_COUNT}).",
                },
            },
            "required": ["album"],
        },
    }


def _tool_result(tool_use_id: str, text: str, error: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id, "content": text}
    if error:
        result["is_error"] = True
    return result


def run_tool(block: ToolUseBlock, catalog: Catalog, photos: PhotoTool) -> dict[str, Any]:
    """One tool_use block -> its tool_result block; input the schema does not allow is an is_error result."""
    if block.name != TOOL_NAME:
        return _tool_result(block.id, f"No existe la herramienta {block.name!r}; usa {TOOL_NAME}.", error=True)
    album, count = block.input.get("album"), block.input.get("count", DEFAULT_COUNT)
    if not isinstance(album, str) or catalog.get(album) is None:
        known = ", ".join(catalog.albums) or "ninguno"
        return _tool_result(block.id, f"No existe el álbum {album!r}. Álbumes disponibles: {known}.", error=True)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_IMAGES_PER_REPLY:
        return _tool_result(block.id, f"count debe ser un entero entre 1 y {MAX_IMAGES_PER_REPLY}.", error=True)
    return _tool_result(block.id, photos.send_photos(album, count))


def _assistant_turn(response: Message) -> dict[str, Any]:
    """The response as the assistant turn that precedes its tool results (text and tool_use blocks; no empty text)."""
    content: list[dict[str, Any]] = []
    for block in response.content:
        if block.type == "text" and block.text.strip():
            content.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            content.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
    return {"role": "assistant", "content": content}


class ClaudeAssistant:
    """The Assistant (assistant.py) that answers through Claude; one client, shared by every conversation."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str,
        persona: str,
        catalog: Catalog,
        metrics: Metrics,
        base_url: str | None = None,
        max_tokens: int = 1024,
        timeout: float = 60.0,
        max_retries: int = 2,
        budget_chars: int = 60_000,
        fallback: str = FALLBACK_TEXT,
        max_tool_rounds: int = 3,
    ) -> None:
        self.model = model
        self.catalog = catalog
        self.metrics = metrics
        self.max_tokens = max_tokens
        self.budget_chars = budget_chars
        self.fallback = fallback
        self.max_tool_rounds = max_tool_rounds
        # The SDK logs every request's options, i.e. the whole conversation, at DEBUG (_base_client._build_request),
        # and ANTHROPIC_LOG=debug turns that on: never below INFO here, whatever NATALIA_LOG_LEVEL says (guarantee 4).
        sdk_log = logging.getLogger("anthropic")
        if sdk_log.getEffectiveLevel() < logging.INFO:
            sdk_log.setLevel(logging.INFO)
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            # No OpenTelemetry spans: ANTHROPIC_OPEN_TELEMETRY_TRACES_CONTENT_MODE=content would put the conversation
            # in them (anthropic/_tracing.py), and the daemon exports no traces.
            open_telemetry=False,
        )
        self.system = [{"type": "text", "text": system_prompt(persona, catalog), "cache_control": dict(EPHEMERAL)}]
        self.tools = [photo_tool(catalog)] if catalog.albums else []  # an enum must not be empty (JSON Schema)
        for outcome in ("ok", "fallback"):  # present at 0 from the start, as metrics.py does for its own series
            metrics.claude_requests.labels(outcome)
        for kind in TOKEN_TYPES:
            metrics.claude_tokens.labels(kind)

    async def reply(self, session: sessions.Session, photos: PhotoTool) -> str:
        """Claude's answer to the session's newest user turn; "" when there is none; the fallback text on failure."""
        dropped = session.get(sessions.META, {}).get("dropped", 0)  # messages gone at the 250 cap (sessions.py)
        messages = build_messages(session["messages"], self.budget_chars, offset=dropped)
        if not messages or messages[-1]["role"] != "user":
            return ""  # nothing to answer: the history ends with Natalia's own message
        texts: list[str] = []
        rounds = 0
        try:
            response = await self._create(messages)
            while True:
                texts += [b.text.strip() for b in response.content if b.type == "text" and b.text.strip()]
                calls = [b for b in response.content if b.type == "tool_use"]
                if response.stop_reason != "tool_use" or not calls or rounds >= self.max_tool_rounds:
                    break
                results = [run_tool(b, self.catalog, photos) for b in calls]
                messages = [*messages, _assistant_turn(response), {"role": "user", "content": results}]
                rounds += 1
                response = await self._create(messages)
        except anthropic.APIError as exc:  # APIStatusError, APIConnectionError and its APITimeoutError
            # Photos a tool call already queued stay in `photos` and are sent with the fallback text: the customer
            # asked for them, and the session records them, so "más fotos" later continues after them.
            self.metrics.claude_requests.labels("fallback").inc()
            log.error("claude_failed", error_type=type(exc).__name__, status=getattr(exc, "status_code", None), rounds=rounds)
            return self.fallback
        text = "\n".join(texts)
        if not text and not photos.images:
            # e.g. stop_reason "refusal" or "max_tokens" before any text: silence would leave the customer waiting
            log.warning("claude_empty_reply", stop_reason=response.stop_reason, rounds=rounds)
            return self.fallback
        return text

    async def _create(self, messages: list[dict[str, Any]]) -> Message:
        response = await self.client.messages.create(
            model=self.model,
            max_tokens=self.max_tokens,
            system=cast(Any, self.system),
            tools=cast(Any, self.tools) if self.tools else anthropic.omit,
            messages=cast(Any, messages),
        )
        self.metrics.claude_requests.labels("ok").inc()
        self._count(response.usage)
        return response

    def _count(self, usage: Usage) -> None:
        counts = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens or 0,
            usage.cache_creation_input_tokens or 0,
        )
        for kind, count in zip(TOKEN_TYPES, counts, strict=True):
            if count > 0:
                self.metrics.claude_tokens.labels(kind).inc(count)

    async def aclose(self) -> None:
        await self.client.close()
