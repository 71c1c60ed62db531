"""The one configuration of the daemon and the admin commands: a TOML file, systemd credentials, the environment.

One table, SETTINGS, drives the loader, the README table (table_markdown) and the tests, so they cannot drift.
Precedence: environment > credential > TOML file > default; an empty value anywhere means unset. Secrets may come from
files in $CREDENTIALS_DIRECTORY (systemd.exec(5) `LoadCredential=`/`LoadCredentialEncrypted=`), so they need not sit
in the environment (readable in /proc/PID/environ by the same user) or in the TOML file. Mistakes are ConfigError:
unknown keys are refused (a typo must not silently leave a default in force), and no message ever shows a secret.
The master key credential (`master-key`) is not read here: masterkey.locate() owns it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import urlsplit

from . import atomicfile
from .errors import ConfigError

DEFAULT_PATH = "/etc/natalia-secure/natalia-secure.toml"
MAX_FILE = 1024 * 1024  # a configuration file is a few hundred bytes; refuse to slurp /dev/zero-sized mistakes
MAX_CREDENTIAL = 64 * 1024  # systemd caps a credential at 1 MiB (CREDENTIAL_SIZE_MAX); ours are tokens of < 1 KiB

Raw = str | int | float | bool
Parse = Callable[[Raw, str], object]


def _show(value: Raw) -> str:
    """A bad non-secret value, quoted and cut short, for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Raw, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    if "\x00" in value:
        raise ConfigError(f"{where} must not contain a NUL character")
    return value


def _secret(value: Raw, where: str) -> str:
    """A token or key: never echoed; control characters or surrounding spaces (a CRLF file) are refused, not kept."""
    text = _text(value, where)
    if text != text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ConfigError(f"{where} must not contain control characters or leading/trailing spaces (value not shown)")
    return text


def _int(lo: int, hi: int) -> Parse:
    def parse(value: Raw, where: str) -> int:
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,12}", value.strip()):
            value = int(value.strip())  # the same white space as the check above
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {_show(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{where} must be between {lo} and {hi}, not {value}")
        return value

    return parse


def _seconds(value: Raw, where: str) -> float:
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?", value.strip()):
        value = float(value.strip())  # str.strip() and float() disagree on what white space is (e.g. "\x1f")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number of seconds, not {_show(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where} must be a number of seconds > 0, not {value}")
    return float(value)


def _choice(*choices: str) -> Parse:
    def parse(value: Raw, where: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {_show(value)}")
        return value.lower()

    return parse


def _bool(value: Raw, where: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {_show(value)}")
    return value


def _listen(value: Raw, where: str) -> tuple[str, int]:
    """host:port or [IPv6]:port; port 0 is "any free port" (the tests use it)."""
    m = re.fullmatch(r"\[([^\[\]\s]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", _text(value, where))
    host, port = (m.group(1) or m.group(3), int(m.group(2) or m.group(4))) if m else ("", -1)
    if m and m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where} must be host:port or [IPv6]:port with port 0-65535, not {_show(value)}")
    return host, port


def _url(value: Raw, where: str) -> str:
    """An http(s) URL without query or fragment; trailing slashes dropped (callers append /v24.0/...).
    Not echoed when bad: a proxy URL may carry user:password."""
    text = _text(value, where)
    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not (parts.query or parts.fragment)
        ok = ok and (parts.port is None or parts.port >= 0)  # .port raises ValueError on a bad or out-of-range port
    except ValueError:
        ok = False
    if not ok or any(c.isspace() for c in text):
        raise ConfigError(f"{where} must be an http:// or https:// URL without query or fragment (value not shown)")
    return text.rstrip("/")


def _api_version(value: Raw, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"v\d{1,4}\.\d{1,4}", value):
        raise ConfigError(f"{where} must look like v24.0, not {_show(value)}")
    return value


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of Config
    env: str
    toml: str  # "section.key"
    default: object  # raw, parsed like any other value; None = unset
    parse: Parse
    secret: bool = False
    credential: str | None = None  # file name in $CREDENTIALS_DIRECTORY
    help: str = ""  # a noun phrase: "serve needs <help>"


def _keep(period: str, default: int) -> Setting:
    return Setting(f"keep_{period}", f"NATALIA_KEEP_{period.upper()}", f"backups.keep_{period}", default, _int(0, 100_000),
                   help=f"{period} backups kept")  # fmt: skip


# fmt: off
SETTINGS: tuple[Setting, ...] = (
    Setting("state_dir", "NATALIA_STATE_DIR", "natalia.state_dir", "/var/lib/natalia-secure", _text, help="the state directory"),
    Setting("listen", "NATALIA_LISTEN", "natalia.listen", "127.0.0.1:8080", _listen, help="the webhook server's host:port"),
    Setting("master_key_file", "NATALIA_MASTER_KEY_FILE", "natalia.master_key_file", None, _text,
            help="the master key file (unset: the credential master-key)"),
    Setting("app_secret", "WHATSAPP_APP_SECRET", "whatsapp.app_secret", None, _secret, True, "whatsapp-app-secret",
            "the WhatsApp app secret"),
    Setting("verify_token", "WHATSAPP_VERIFY_TOKEN", "whatsapp.verify_token", None, _secret, True, "whatsapp-verify-token",
            "the WhatsApp webhook verify token"),
    Setting("access_token", "WHATSAPP_ACCESS_TOKEN", "whatsapp.access_token", None, _secret, True, "whatsapp-access-token",
            "the WhatsApp access token"),
    Setting("phone_number_id", "WHATSAPP_PHONE_NUMBER_ID", "whatsapp.phone_number_id", None, _text,
            help="the WhatsApp phone number id"),
    Setting("graph_url", "WHATSAPP_GRAPH_URL", "whatsapp.graph_url", "https://graph.facebook.com", _url, help="the Graph URL"),
    Setting("api_version", "WHATSAPP_API_VERSION", "whatsapp.api_version", "v24.0", _api_version, help="the Graph API version"),
    Setting("anthropic_api_key", "ANTHROPIC_API_KEY", "anthropic.api_key", None, _secret, True, "anthropic-api-key",
            "the Anthropic API key"),
    Setting("anthropic_base_url", "ANTHROPIC_BASE_URL", "anthropic.base_url", None, _url,
            help="the Anthropic API URL (unset: the SDK's default)"),
    # a current model: the SDK lists claude-sonnet-4-5 as deprecated, end of life 2026-11-30 (anthropic/_data)
    Setting("model", "NATALIA_MODEL", "anthropic.model", "claude-sonnet-5-5", _text, help="the Claude model"),
    Setting("persona_file", "NATALIA_PERSONA", "anthropic.persona", None, _text,
            help="Natalia's system prompt file (unset: the built-in Spanish persona)"),
    Setting("history_budget", "NATALIA_HISTORY_BUDGET", "anthropic.history_budget", 60_000, _int(1_000, 2_000_000),
            help="characters of history sent to Claude (most recent messages kept whole)"),
    Setting("max_tokens", "NATALIA_MAX_TOKENS", "anthropic.max_tokens", 1024, _int(16, 64_000),
            help="the longest reply Claude may write, in tokens"),
    Setting("claude_timeout_s", "NATALIA_CLAUDE_TIMEOUT", "anthropic.timeout", 60.0, _seconds,
            help="seconds per Messages API request (the SDK retries twice)"),
    Setting("catalog_file", "NATALIA_CATALOG", "natalia.catalog", None, _text,
            help="the photo catalog file (unset: the built-in demo albums)"),
    Setting("fallback_message", "NATALIA_FALLBACK_MESSAGE", "natalia.fallback_message", None, _text,
            help="what Natalia says when Claude cannot answer (unset: a polite Spanish message)"),
    Setting("outbox", "NATALIA_OUTBOX", "natalia.outbox", "auto", _choice("auto", "whatsapp", "terminal", "log"),
            help="where replies go: auto = whatsapp with an access token and phone number id, else terminal on a "
                 "terminal, else log (length only)"),
    Setting("typing_indicator", "NATALIA_TYPING_INDICATOR", "whatsapp.typing_indicator", False, _bool,
            help="show \"typing...\" while Natalia prepares a reply"),
    Setting("snapshot_interval_s", "NATALIA_SNAPSHOT_INTERVAL", "store.snapshot_interval", 300.0, _seconds,
            help="seconds between snapshots"),
    Setting("backup_interval_s", "NATALIA_BACKUP_INTERVAL", "store.backup_interval", 3600.0, _seconds,
            help="seconds between backups"),
    Setting("inactive_days", "NATALIA_INACTIVE_DAYS", "store.inactive_days", 365, _int(0, 100_000),
            help="days without a message before a session is purged (0: never)"),
    Setting("durability", "NATALIA_DURABILITY", "store.durability", "always", _choice("always", "interval"),
            help="journal fsync policy: as soon as a change waits (always) or on a timer (interval)"),
    _keep("last", 10), _keep("hourly", 24), _keep("daily", 7), _keep("weekly", 4), _keep("monthly", 6),
    Setting("reply_concurrency", "NATALIA_REPLY_CONCURRENCY", "natalia.reply_concurrency", 32, _int(1, 1024),
            help="conversations replied to at once"),
    Setting("stop_timeout_s", "NATALIA_STOP_TIMEOUT", "natalia.stop_timeout", 15.0, _seconds,
            help="seconds SIGTERM waits for in-flight work"),
    Setting("resend_wait_s", "NATALIA_RESEND_WAIT", "natalia.resend_wait", 20.0, _seconds,
            help="after a crash, seconds a reply part maybe sent waits for WhatsApp's status before it is resent"),
    Setting("log_format", "NATALIA_LOG_FORMAT", "logging.format", "auto", _choice("auto", "json", "console"),
            help="log format"),
    Setting("log_level", "NATALIA_LOG_LEVEL", "logging.level", "info", _choice("debug", "info", "warning", "error"),
            help="the lowest level logged"),
)
# fmt: on
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    state_dir: str
    listen: tuple[str, int]
    master_key_file: str | None
    app_secret: str | None = field(repr=False)
    verify_token: str | None = field(repr=False)
    access_token: str | None = field(repr=False)
    phone_number_id: str | None
    graph_url: str
    api_version: str
    anthropic_api_key: str | None = field(repr=False)
    anthropic_base_url: str | None
    model: str
    persona_file: str | None
    history_budget: int
    max_tokens: int
    claude_timeout_s: float
    catalog_file: str | None
    fallback_message: str | None
    outbox: str
    typing_indicator: bool
    snapshot_interval_s: float
    backup_interval_s: float
    inactive_days: int
    durability: str
    keep_last: int
    keep_hourly: int
    keep_daily: int
    keep_weekly: int
    keep_monthly: int
    reply_concurrency: int
    stop_timeout_s: float
    resend_wait_s: float
    log_format: str
    log_level: str
    path: str | None  # the file read, if any
    sources: Mapping[str, str] = field(hash=False)  # name -> "default" | "file" | "credential" | "env"; never values

    def require(self, *names: str, purpose: str) -> None:
        """ConfigError listing every unset one of `names`, each with the three ways to set it."""
        where = self.path or DEFAULT_PATH
        missing = []
        for s in (BY_NAME[n] for n in names):
            if getattr(self, s.name) is None:
                ways = [s.env, f"{s.toml} in {where}"] + ([f"the credential {s.credential}"] if s.credential else [])
                missing.append(f"{s.help}: set {', '.join(ways[:-1])}{',' if len(ways) > 2 else ''} or {ways[-1]}")
        if missing:
            raise ConfigError(f"{purpose} needs " + "; and ".join(missing))


def _read(path: str, limit: int, what: str) -> tuple[bytes, os.stat_result] | None:
    """A regular file's content and mode (None if absent), read at most `limit` bytes; ConfigError otherwise."""

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")

    try:
        data, st = atomicfile.read_small(path, limit, check)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data, st


def _read_toml(path: str, required: bool) -> dict[str, Raw] | None:
    """The file as {"section.key": value}, or None when an implicit default file is absent."""
    found = _read(path, MAX_FILE, "configuration file")
    if found is None:
        if required:
            raise ConfigError(f"configuration file {path} does not exist")
        return None
    data, st = found
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:  # its message gives line and column, never the content
        raise ConfigError(f"configuration file {path}: {exc}") from None
    known = {s.toml for s in SETTINGS}
    flat: dict[str, Raw] = {}
    unknown = []
    for section, table in doc.items():
        if not isinstance(table, dict):
            unknown.append(section)
            continue
        for key, value in table.items():
            name = f"{section}.{key}"
            if name not in known:
                unknown.append(name)
            elif not isinstance(value, str | int | float | bool):
                raise ConfigError(f"{name} in {path} must be a string, number or boolean, not a {type(value).__name__}")
            else:
                flat[name] = value
    if unknown:
        raise ConfigError(f"configuration file {path}: unknown setting(s) {', '.join(unknown)} (see README.md)")
    holds = [s.toml for s in SETTINGS if s.secret and flat.get(s.toml) not in (None, "")]
    if holds and st.st_mode & 0o077:
        raise ConfigError(
            f"configuration file {path} holds secrets ({', '.join(holds)}) and is readable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it, or move the secrets to credentials"
        )
    return flat


def _read_credential(directory: str, name: str) -> str | None:
    """The credential's content less one trailing newline; None when absent or empty."""
    found = _read(os.path.join(directory, name), MAX_CREDENTIAL, f"the credential {name} at")
    if found is None:
        return None
    try:
        text = found[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"the credential {name} is not UTF-8 text (value not shown)") from None
    return (text[:-1] if text.endswith("\n") else text) or None


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the configuration: `path` (None: DEFAULT_PATH if present), credentials, then `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    flat = _read_toml(path, required=True) if path is not None else _read_toml(DEFAULT_PATH, required=False)
    used = path if path is not None else (DEFAULT_PATH if flat is not None else None)
    creds = env.get("CREDENTIALS_DIRECTORY") or None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        raw: object = s.default
        where, source = f"the default {s.name}", "default"
        if flat is not None and flat.get(s.toml) not in (None, ""):
            raw, where, source = flat[s.toml], f"{s.toml} in {used}", "file"
        if creds and s.credential and (text := _read_credential(creds, s.credential)) is not None:
            raw, where, source = text, f"the credential {s.credential}", "credential"
        if env.get(s.env):
            raw, where, source = env[s.env], s.env, "env"
        values[s.name] = None if raw is None else s.parse(cast(Raw, raw), where)  # defaults are written as Raw
        sources[s.name] = source
    return Config(**values, path=used, sources=MappingProxyType(sources))


def table_markdown() -> str:
    """The README table of every setting (env | TOML | credential | default | meaning), from SETTINGS."""
    rows = ["| Environment | TOML | Credential | Default | Meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = "unset" if s.default is None else f"`{s.default}`"
        credential = f"`{s.credential}`" if s.credential else ""
        rows.append(f"| `{s.env}` | `{s.toml}` | {credential} | {default} | {s.help} |")
    return "\n".join(rows) + "\n"
