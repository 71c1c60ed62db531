"""Configuration: the TOML file, systemd credentials and the environment, with one table (SETTINGS) driving all three."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natalia_secure import config
from natalia_secure.errors import ConfigError

SECRET = "not-a-real-value-f00d"


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Point DEFAULT_PATH at a file that does not exist, so a real /etc file on the test machine cannot leak in."""
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))


def write(path: pathlib.Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def credentials(tmp_path: pathlib.Path, files: dict[str, str] | None = None) -> str:
    """A $CREDENTIALS_DIRECTORY holding `files` (name -> content), 0400 as systemd lays it out."""
    d = tmp_path / "creds"
    d.mkdir(exist_ok=True)
    for name, content in (files or {}).items():
        write(d / name, content, 0o400)
    return str(d)


def refused(match: str, path: str | None = None, environ: dict[str, str] | None = None) -> str:
    """load() raises a ConfigError matching `match`; returns its message (to check what it does not show)."""
    with pytest.raises(ConfigError, match=match) as info:
        config.load(path, environ or {})
    assert info.value.exit_code == 3
    return str(info.value)


# ---- the table ----


def test_config_has_one_field_per_setting_and_secrets_are_hidden_from_repr() -> None:
    """Config's fields are exactly SETTINGS plus path and sources, and exactly the secret ones are repr=False."""
    fields = {f.name: f for f in dataclasses.fields(config.Config)}
    assert list(fields) == [s.name for s in config.SETTINGS] + ["path", "sources"]
    for s in config.SETTINGS:
        assert fields[s.name].repr is not s.secret, s.name
        assert (s.credential is not None) is s.secret, s.name
    assert len({s.env for s in config.SETTINGS}) == len({s.toml for s in config.SETTINGS}) == len(config.SETTINGS)


def test_table_markdown_lists_every_setting() -> None:
    """Every setting's env name, TOML key, credential and default appear on a row of its own."""
    rows = config.table_markdown().splitlines()
    assert len(rows) == 2 + len(config.SETTINGS)
    for s, row in zip(config.SETTINGS, rows[2:], strict=True):
        assert f"`{s.env}`" in row and f"`{s.toml}`" in row and s.help in row
        assert (f"`{s.credential}`" in row) if s.credential else row.count("|  |") == 1
        assert ("unset" in row) if s.default is None else f"`{s.default}`" in row


# ---- sources and precedence ----


def test_defaults_with_nothing_set() -> None:
    """With no file, no credentials and no environment, every setting has its documented default."""
    c = config.load(None, {})
    assert c.path is None
    assert c.state_dir == "/var/lib/natalia-secure"
    assert c.listen == ("127.0.0.1", 8080)
    assert (c.graph_url, c.api_version, c.model) == ("https://graph.facebook.com", "v24.0", "claude-sonnet-5-5")
    assert c.app_secret is c.verify_token is c.access_token is c.anthropic_api_key is c.master_key_file is None
    assert (c.snapshot_interval_s, c.backup_interval_s, c.stop_timeout_s) == (300.0, 3600.0, 15.0)
    assert (c.inactive_days, c.reply_concurrency, c.durability) == (365, 32, "always")
    assert (c.keep_last, c.keep_hourly, c.keep_daily, c.keep_weekly, c.keep_monthly) == (10, 24, 7, 4, 6)
    assert (c.log_format, c.log_level) == ("auto", "info")
    assert set(c.sources.values()) == {"default"} and set(c.sources) == {s.name for s in config.SETTINGS}


def test_a_toml_file_sets_values_of_every_type(tmp_path: pathlib.Path) -> None:
    """TOML strings, integers and floats are taken natively; the file read is reported."""
    path = write(
        tmp_path / "c.toml",
        '[natalia]\nlisten = "[::1]:0"\nreply_concurrency = 4\nstop_timeout = 2\n'
        '[store]\nsnapshot_interval = 0.5\ninactive_days = 0\ndurability = "interval"\n'
        '[whatsapp]\ngraph_url = "http://127.0.0.1:9/"\napi_version = "v23.1"\n'
        '[backups]\nkeep_last = 0\n[logging]\nlevel = "DEBUG"\n',
        0o644,
    )
    c = config.load(path, {})
    assert c.path == path
    assert c.listen == ("::1", 0) and c.reply_concurrency == 4 and c.stop_timeout_s == 2.0
    assert (c.snapshot_interval_s, c.inactive_days, c.durability) == (0.5, 0, "interval")
    assert (c.graph_url, c.api_version, c.keep_last, c.log_level) == ("http://127.0.0.1:9", "v23.1", 0, "debug")
    assert c.sources["listen"] == c.sources["keep_last"] == "file" and c.sources["model"] == "default"


def test_the_default_path_is_read_when_present(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load(None) reads DEFAULT_PATH when it exists and reports it as the path."""
    path = write(tmp_path / "default.toml", '[anthropic]\nmodel = "claude-test"\n')
    monkeypatch.setattr(config, "DEFAULT_PATH", path)
    c = config.load(None, {})
    assert (c.path, c.model, c.sources["model"]) == (path, "claude-test", "file")


def test_environment_overrides_the_file_and_empty_means_unset(tmp_path: pathlib.Path) -> None:
    """An environment value wins over the file; an empty one is ignored, as is an empty TOML string."""
    path = write(tmp_path / "c.toml", '[natalia]\nlisten = "0.0.0.0:80"\nstate_dir = "/srv/a"\n[anthropic]\nmodel = ""\n')
    c = config.load(path, {"NATALIA_LISTEN": "localhost:8081", "NATALIA_STATE_DIR": "", "NATALIA_INACTIVE_DAYS": "30"})
    assert (c.listen, c.state_dir, c.inactive_days, c.model) == (("localhost", 8081), "/srv/a", 30, "claude-sonnet-5-5")
    assert (c.sources["listen"], c.sources["state_dir"], c.sources["inactive_days"], c.sources["model"]) == (
        "env",
        "file",
        "env",
        "default",
    )


def test_credentials_override_the_file_and_the_environment_overrides_credentials(tmp_path: pathlib.Path) -> None:
    """Precedence is env > credential > file > default, secret by secret; one trailing newline is stripped."""
    path = write(tmp_path / "c.toml", '[whatsapp]\napp_secret = "from-file"\nverify_token = "file-token"\naccess_token = "a"\n')
    creds = credentials(
        tmp_path, {"whatsapp-app-secret": "from-cred\n", "whatsapp-access-token": "cred-access", "anthropic-api-key": "k"}
    )
    env = {"CREDENTIALS_DIRECTORY": creds, "WHATSAPP_ACCESS_TOKEN": "env-access"}
    c = config.load(path, env)
    assert (c.app_secret, c.verify_token, c.access_token, c.anthropic_api_key) == ("from-cred", "file-token", "env-access", "k")
    assert [c.sources[n] for n in ("app_secret", "verify_token", "access_token", "anthropic_api_key")] == [
        "credential",
        "file",
        "env",
        "credential",
    ]


def test_credentials_are_read_only_inside_systemd_and_empty_or_missing_ones_are_unset(tmp_path: pathlib.Path) -> None:
    """Without CREDENTIALS_DIRECTORY nothing is read; an empty or absent credential file leaves the setting unset."""
    creds = credentials(tmp_path, {"whatsapp-app-secret": "s", "whatsapp-verify-token": "\n"})
    assert config.load(None, {}).app_secret is None
    c = config.load(None, {"CREDENTIALS_DIRECTORY": creds})
    assert (c.app_secret, c.verify_token, c.access_token) == ("s", None, None)
    assert [c.sources[n] for n in ("app_secret", "verify_token", "access_token")] == ["credential", "default", "default"]


def test_the_master_key_credential_is_not_read_here(tmp_path: pathlib.Path) -> None:
    """The master-key credential belongs to masterkey.locate(): config leaves master_key_file unset."""
    creds = credentials(tmp_path, {"master-key": "natalia-master-key-v1:AAAA\n"})
    assert config.load(None, {"CREDENTIALS_DIRECTORY": creds}).master_key_file is None


def test_an_unreadable_or_oversized_credential_is_refused(tmp_path: pathlib.Path) -> None:
    """A credential that is not a regular file, is larger than 64 KiB or is not UTF-8 is a ConfigError, never unset."""
    creds = credentials(tmp_path)
    os.mkdir(os.path.join(creds, "whatsapp-app-secret"))
    refused("credential whatsapp-app-secret .* not a regular file", environ={"CREDENTIALS_DIRECTORY": creds})
    os.rmdir(os.path.join(creds, "whatsapp-app-secret"))
    write(pathlib.Path(creds) / "whatsapp-app-secret", "x" * (64 * 1024 + 1))
    refused("larger than 65536 bytes", environ={"CREDENTIALS_DIRECTORY": creds})
    write(pathlib.Path(creds) / "whatsapp-app-secret", "x" * (64 * 1024))
    assert config.load(None, {"CREDENTIALS_DIRECTORY": creds}).app_secret == "x" * (64 * 1024)
    (pathlib.Path(creds) / "whatsapp-app-secret").write_bytes(b"\xff" + SECRET.encode())
    assert SECRET not in refused("not UTF-8", environ={"CREDENTIALS_DIRECTORY": creds})


def test_a_secret_with_a_carriage_return_is_refused_without_showing_it(tmp_path: pathlib.Path) -> None:
    """A credential saved with CRLF would never match Meta's signature: refused, naming the credential, not the value."""
    creds = credentials(tmp_path, {"anthropic-api-key": SECRET + "\r\n"})
    message = refused("credential anthropic-api-key must not contain control", environ={"CREDENTIALS_DIRECTORY": creds})
    assert SECRET not in message
    assert SECRET not in refused("WHATSAPP_VERIFY_TOKEN", environ={"WHATSAPP_VERIFY_TOKEN": f" {SECRET}"})


# ---- parse errors ----


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("NATALIA_LISTEN", "8080"),
        ("NATALIA_LISTEN", "localhost"),
        ("NATALIA_LISTEN", "::1:8080"),
        ("NATALIA_LISTEN", "[::1]"),
        ("NATALIA_LISTEN", "[nothost]:80"),
        ("NATALIA_LISTEN", "host:65536"),
        ("NATALIA_LISTEN", ":8080"),
        ("NATALIA_LISTEN", "host:-1"),
        ("NATALIA_SNAPSHOT_INTERVAL", "0"),
        ("NATALIA_BACKUP_INTERVAL", "-5"),
        ("NATALIA_STOP_TIMEOUT", "soon"),
        ("NATALIA_STOP_TIMEOUT", "inf"),
        ("NATALIA_STOP_TIMEOUT", "nan"),
        ("NATALIA_INACTIVE_DAYS", "-1"),
        ("NATALIA_INACTIVE_DAYS", "1.5"),
        ("NATALIA_KEEP_DAILY", "seven"),
        ("NATALIA_REPLY_CONCURRENCY", "0"),
        ("NATALIA_REPLY_CONCURRENCY", "1025"),
        ("NATALIA_DURABILITY", "sometimes"),
        ("NATALIA_LOG_FORMAT", "xml"),
        ("NATALIA_LOG_LEVEL", "verbose"),
        ("WHATSAPP_GRAPH_URL", "ftp://graph.facebook.com"),
        ("WHATSAPP_GRAPH_URL", "graph.facebook.com"),
        ("WHATSAPP_GRAPH_URL", "https://graph.facebook.com/?x=1"),
        ("WHATSAPP_GRAPH_URL", "https://host:99999"),
        ("ANTHROPIC_BASE_URL", "https://"),
        ("WHATSAPP_API_VERSION", "24.0"),
        ("WHATSAPP_API_VERSION", "v24"),
    ],
)
def test_a_bad_environment_value_is_refused_naming_the_variable(env: str, value: str) -> None:
    """Every parser refuses bad input with a ConfigError (exit 3) that names the environment variable."""
    refused(env, environ={env: value})


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ('[natalia]\nlisten = 8080\n', "natalia.listen in .* must be a string"),
        ('[natalia]\nreply_concurrency = "many"\n', "natalia.reply_concurrency in .* must be an integer"),
        ("[natalia]\nreply_concurrency = true\n", "natalia.reply_concurrency in .* must be an integer"),
        ("[store]\ninactive_days = 1.5\n", "store.inactive_days in .* must be an integer"),
        ("[store]\nbackup_interval = false\n", "store.backup_interval in .* must be a number of seconds"),
        ("[store]\ndurability = 1\n", "store.durability in .* must be one of always, interval"),
        ("[backups]\nkeep_weekly = [1, 2]\n", "backups.keep_weekly in .* must be a string, number or boolean, not a list"),
        ("[logging]\nlevel = 2024-01-01\n", "logging.level in .* not a date"),
    ],
)
def test_a_wrong_toml_type_is_refused_naming_section_and_key(tmp_path: pathlib.Path, toml: str, match: str) -> None:
    """A TOML value of the wrong type is a ConfigError naming section.key and the file."""
    refused(match, write(tmp_path / "c.toml", toml))


@pytest.mark.parametrize("name", [s.name for s in config.SETTINGS if s.secret])
def test_a_bad_secret_is_refused_without_echoing_it(tmp_path: pathlib.Path, name: str) -> None:
    """A malformed secret (wrong TOML type, control character) is refused naming where it came from, never its value."""
    s = config.BY_NAME[name]
    section, key = s.toml.split(".")
    assert SECRET not in refused(s.env, environ={s.env: f"{SECRET}\x07"})
    assert "12345678" not in refused(s.toml, write(tmp_path / "c.toml", f"[{section}]\n{key} = 12345678\n"))
    assert SECRET not in refused(s.toml, write(tmp_path / "c.toml", f'[{section}]\n{key} = "{SECRET}\\t"\n'))


def test_a_url_is_never_echoed() -> None:
    """A bad URL may carry user:password (a proxy): the message names the variable, not the value."""
    assert "hunter2" not in refused("ANTHROPIC_BASE_URL", environ={"ANTHROPIC_BASE_URL": "https://u:hunter2@proxy:99999/"})


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(config.SETTINGS), st.text(max_size=40))
def test_any_text_either_parses_or_is_a_config_error(setting: config.Setting, text: str) -> None:
    """No input makes a parser raise anything but ConfigError, and a secret's error never contains the value."""
    try:
        setting.parse(text, setting.env)
    except ConfigError as exc:
        assert setting.env in str(exc)
        if setting.secret and len(text) > 3:
            assert text not in str(exc)


@given(st.sampled_from(["127.0.0.1", "localhost", "example.org", "[::1]", "[fe80::1%eth0]"]), st.integers(0, 65535))
def test_listen_parses_host_and_port(host: str, port: int) -> None:
    """host:port and [IPv6]:port give (host without brackets, port) for every port 0-65535."""
    assert config.BY_NAME["listen"].parse(f"{host}:{port}", "NATALIA_LISTEN") == (host.strip("[]"), port)


# ---- the file ----


def test_unknown_sections_and_keys_are_refused_all_named(tmp_path: pathlib.Path) -> None:
    """A typo must not silently leave the default in force: every unknown section and key is named."""
    path = write(tmp_path / "c.toml", '[natalia]\nlisen = "x"\n[whatsap]\napp_secret = "y"\n[store]\ndurability = "always"\n')
    message = refused("unknown setting", path)
    assert "natalia.lisen" in message and "whatsap.app_secret" in message and "store.durability" not in message
    refused("unknown setting.* model", write(tmp_path / "c.toml", 'model = "claude"\n'))


def test_a_syntax_error_is_refused_with_the_file_and_position(tmp_path: pathlib.Path) -> None:
    """tomllib's message (line and column) is passed on with the file name, never the file's content."""
    path = write(tmp_path / "c.toml", f'[whatsapp]\napp_secret = "{SECRET}\n')
    message = refused(r"c\.toml: .*line 2", path)
    assert SECRET not in message


def test_a_file_with_secrets_must_be_private(tmp_path: pathlib.Path) -> None:
    """A 0644 file holding a secret is refused; the same file 0600 is accepted; a 0644 file without secrets is fine."""
    path = write(tmp_path / "c.toml", f'[anthropic]\napi_key = "{SECRET}"\nmodel = "m"\n', 0o644)
    message = refused("holds secrets .*anthropic.api_key.* readable by others .*0644.*chmod 600", path)
    assert SECRET not in message
    os.chmod(path, 0o640)
    refused("readable by others", path)
    os.chmod(path, 0o600)
    assert config.load(path, {}).anthropic_api_key == SECRET
    assert config.load(write(tmp_path / "public.toml", '[anthropic]\nmodel = "m"\n', 0o644), {}).model == "m"


def test_an_explicit_missing_or_unreadable_file_is_refused(tmp_path: pathlib.Path) -> None:
    """--config naming a missing file, a directory or a non-UTF-8 file is a ConfigError, never the defaults."""
    refused("does not exist", str(tmp_path / "nope.toml"))
    refused("not a regular file", str(tmp_path))
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[anthropic]\nmodel = "caf\xe9"\n')
    refused("not UTF-8", str(path))


def test_a_fifo_is_refused_without_blocking(tmp_path: pathlib.Path) -> None:
    """A FIFO named as the file (no writer) is refused at once rather than hanging the daemon at start."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    refused("not a regular file", fifo)


# ---- Config ----


def test_require_lists_every_missing_setting_with_all_ways_to_set_it(tmp_path: pathlib.Path) -> None:
    """require() names each missing setting with its variable, its TOML key in the file, and its credential."""
    c = config.load(None, {"WHATSAPP_VERIFY_TOKEN": "v"})
    with pytest.raises(ConfigError) as info:
        c.require("app_secret", "verify_token", "access_token", "phone_number_id", purpose="serve")
    message = str(info.value)
    assert message.startswith(
        f"serve needs the WhatsApp app secret: set WHATSAPP_APP_SECRET, whatsapp.app_secret in {config.DEFAULT_PATH}, "
        "or the credential whatsapp-app-secret; and "
    )
    assert "WHATSAPP_ACCESS_TOKEN" in message and "whatsapp-access-token" in message
    assert "WHATSAPP_PHONE_NUMBER_ID or whatsapp.phone_number_id" in message
    assert "VERIFY" not in message
    c.require("verify_token", "graph_url", purpose="serve")
    path = write(tmp_path / "c.toml", "")
    with pytest.raises(ConfigError, match=f"whatsapp.app_secret in {path}"):
        config.load(path, {}).require("app_secret", purpose="serve")


def test_repr_never_shows_a_secret(tmp_path: pathlib.Path) -> None:
    """Secrets from every source stay out of repr() and str(); the sources say where they came from, not what."""
    creds = credentials(tmp_path, {"whatsapp-app-secret": SECRET + "-cred"})
    path = write(tmp_path / "c.toml", f'[whatsapp]\nverify_token = "{SECRET}-file"\n')
    c = config.load(path, {"CREDENTIALS_DIRECTORY": creds, "WHATSAPP_ACCESS_TOKEN": SECRET + "-env", "ANTHROPIC_API_KEY": SECRET})
    assert c.app_secret == SECRET + "-cred" and c.verify_token == SECRET + "-file" and c.access_token == SECRET + "-env"
    assert SECRET not in repr(c) and SECRET not in str(c) and SECRET not in repr(dict(c.sources))
    assert "state_dir='/var/lib/natalia-secure'" in repr(c)


def test_readme_documents_every_setting_as_the_code_reads_it() -> None:
    """README.md carries the table rendered from SETTINGS, so the documented names and defaults cannot drift."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as f:
        assert config.table_markdown() in f.read()


def test_the_default_model_is_not_one_the_sdk_calls_deprecated() -> None:
    """The installed anthropic SDK lists models nearing end of life; the default must not be one of them."""
    sdk = pytest.importorskip("anthropic._data.deprecated_models")  # the SDK's own list (it warns on use); private
    assert config.BY_NAME["model"].default not in sdk.DEPRECATED_MODELS


@pytest.mark.parametrize("name", ["inactive_days", "snapshot_interval_s"])
def test_numbers_with_any_white_space_python_strips_are_read(name: str) -> None:
    """str.strip() drops "\\x1f" but int() and float() do not: the value must still parse (hypothesis found it)."""
    assert config.BY_NAME[name].parse("5\x1f", "x") == 5
