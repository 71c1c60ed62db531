"""`natalia-secure`: the operator's command line. Entry point `main(argv=None) -> int`, tested in-process.

Configuration is read in main(), never at import time, so every mistake goes through the same error handling:
each NataliaError is one line on stderr and its documented exit code (README.md, "Exit codes").
Decrypted content goes to stdout only, never to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from . import __version__, config, daemon, keyring, masterkey, sessions
from .atomicfile import ensure_private_dir
from .clock import iso_utc, now_ms
from .errors import ConfigError, IntegrityError, NataliaError, NotFoundError, StoreUnavailable, UsageError
from .lock import StoreLock
from .store import Store, StoreOptions
from .verify import verify_state_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--config",
        default=default,
        metavar="FILE",
        help=f"TOML configuration file (env NATALIA_CONFIG, default {config.DEFAULT_PATH} when present)",
    )
    parser.add_argument(
        "--state-dir",
        default=default,
        metavar="DIR",
        help=f"state directory (env NATALIA_STATE_DIR, default {config.BY_NAME['state_dir'].default})",
    )
    parser.add_argument(
        "--master-key",
        default=default,
        metavar="FILE",
        help="master key file (env NATALIA_MASTER_KEY_FILE, or $CREDENTIALS_DIRECTORY/master-key)",
    )
    parser.add_argument(
        "--wait", type=float, default=default, metavar="SECONDS", help="wait this long for the store lock (default: fail at once)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="natalia-secure", description="Natalia's sealed conversation store and daemon.")
    parser.add_argument("--version", action="version", version=f"natalia-secure {__version__}")
    _common(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # Common options are accepted after the command too; SUPPRESS keeps a value given before it.
    common = _Parser(add_help=False)
    _common(common, argparse.SUPPRESS)

    keys = sub.add_parser("keys", help="master key and keyring", parents=[common])
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    keys_sub.add_parser("init", help="create the master key file (if absent) and the keyring", parents=[common])

    imp = sub.add_parser("import-legacy", help="import the legacy plaintext sessions.json", parents=[common])
    imp.add_argument("file", metavar="FILE")

    lst = sub.add_parser("list", help="every session: phone, messages, first and last activity", parents=[common])
    lst.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="decrypt and show one conversation", parents=[common])
    show.add_argument("phone", metavar="PHONE")
    show.add_argument("--json", action="store_true")

    ver = sub.add_parser("verify", help="authenticate every sealed file", parents=[common])
    ver.add_argument("--json", action="store_true")

    sub.add_parser("serve", help="run the daemon (the WhatsApp webhook; systemd Type=notify)", parents=[common])

    demo = sub.add_parser("demo", help="play the legacy scenario against a local daemon (offline, no credentials)")
    demo.add_argument(
        "--dir", default="natalia-demo", metavar="DIR", help="where the demo keeps its files (default ./natalia-demo)"
    )
    demo.add_argument("--keep-running", action="store_true", help="leave the daemon serving afterwards (Ctrl-C stops it)")
    demo.add_argument("--say", metavar="TEXT", help="send TEXT to a demo started with --keep-running in DIR")
    return parser


class Context:
    """What every command needs, resolved once from options and environment."""

    def __init__(self, args: argparse.Namespace, environ: os._Environ[str] | dict[str, str]) -> None:
        self.args = args
        self.environ = environ
        self.config_path = args.config or environ.get("NATALIA_CONFIG") or None
        self.cfg = config.load(self.config_path, environ)
        self.state_dir = args.state_dir or self.cfg.state_dir
        self.explicit_key = args.master_key or self.cfg.master_key_file
        wait = args.wait if args.wait is not None else 0.0
        if wait < 0:
            raise UsageError("--wait must be >= 0")
        self.options = StoreOptions(lock_wait=wait)

    def master(self) -> masterkey.MasterKey:
        return masterkey.read_key_file(self.key_path(masterkey.locate(self.explicit_key, self.environ)))

    def key_path(self, path: str) -> str:
        """The master key never lives in the state directory: every copy of the data would carry its key."""
        state = os.path.realpath(self.state_dir)
        if os.path.commonpath([os.path.realpath(path), state]) == state:
            raise ConfigError(f"the master key {path} is inside the state directory {self.state_dir}; keep it elsewhere")
        return path

    def open(self, readonly: bool) -> Store:
        return Store.open(self.state_dir, self.master(), self.options, readonly=readonly)


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_keys_init(ctx: Context, out: TextIO) -> int:
    path = ctx.key_path(
        masterkey.locate(ctx.explicit_key, {k: v for k, v in ctx.environ.items() if k != "CREDENTIALS_DIRECTORY"})
    )
    if os.path.lexists(path):
        master = masterkey.read_key_file(path)
        out.write(f"master key: {path} exists, using it (id {master.kid})\n")
    else:
        master = masterkey.create_key_file(path)
        out.write(f"master key: created {path} (id {master.kid}); back it up: without it no file can be read\n")
    ensure_private_dir(ctx.state_dir, create=True)
    lock = StoreLock.acquire(ctx.state_dir, ctx.options.lock_wait)
    try:
        ring_path = os.path.join(ctx.state_dir, keyring.FILENAME)
        if os.path.exists(ring_path):
            ring = keyring.load(ctx.state_dir, master)  # proves the key opens it
            out.write(f"keyring: {ring_path} already exists and opens with this master key (primary {ring.primary.id})\n")
            return 0
        now = now_ms()
        ring = keyring.save(ctx.state_dir, keyring.Keyring.new(iso_utc(now)), master, now)
        out.write(f"keyring: created {ring_path} (primary data key {ring.primary.id})\n")
    finally:
        lock.release()
    return 0


def cmd_import_legacy(ctx: Context, out: TextIO) -> int:
    try:
        with open(ctx.args.file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {ctx.args.file}: {exc.strerror}") from None
    pairs = sessions.parse_legacy(data)
    with ctx.open(readonly=False) as store:
        store.import_sessions(pairs)
        messages = sum(len(s["messages"]) for _, s in pairs)
        out.write(f"imported {len(pairs)} sessions ({messages} messages) into snapshot generation {store.generation}\n")
    return 0


def cmd_list(ctx: Context, out: TextIO) -> int:
    store = ctx.open(readonly=True)
    rows = [
        {"phone": p, "messages": len(s["messages"]), "firstInteraction": s["firstInteraction"], "lastActivity": s["lastActivity"]}
        for p, s in store.items()
    ]
    rows.sort(key=lambda r: (-r["lastActivity"], r["phone"]))
    if ctx.args.json:
        _print_json(rows, out)
        return 0
    out.write(f"{'PHONE':<20} {'MESSAGES':>8}  {'FIRST (UTC)':<20}  {'LAST (UTC)':<20}\n")
    for r in rows:
        out.write(
            f"{r['phone']:<20} {r['messages']:>8}  {iso_utc(r['firstInteraction']):<20}  {iso_utc(r['lastActivity']):<20}\n"
        )
    out.write(f"{len(rows)} sessions, {sum(r['messages'] for r in rows)} messages\n")
    return 0


def _find(store: Store, phone: str) -> tuple[str, sessions.Session]:
    for candidate in (phone, phone.lstrip("+")):
        if candidate in store:
            return candidate, store.get(candidate)
    raise NotFoundError("no session for that phone")


def cmd_show(ctx: Context, out: TextIO) -> int:
    phone, session = _find(ctx.open(readonly=True), ctx.args.phone)
    if ctx.args.json:
        _print_json({"phone": phone, **session}, out)
        return 0
    first, last = iso_utc(session["firstInteraction"]), iso_utc(session["lastActivity"])
    out.write(f"{phone}: {len(session['messages'])} messages, first {first}, last {last}\n")
    for m in session["messages"]:
        text = m["content"].replace("\n", "\n" + " " * 33)  # under the text column
        out.write(f"{iso_utc(m['timestamp'])}  {m['role']:<9}  {text}\n")
    return 0


def cmd_verify(ctx: Context, out: TextIO) -> int:
    report = verify_state_dir(ctx.state_dir, ctx.master())
    if ctx.args.json:
        _print_json(report.to_json(), out)
    else:
        for f in report.files:
            status = "ok  " if f.ok else "FAIL"
            detail = f.error if not f.ok else (f.note or "")
            generation = "-" if f.generation is None else f"g{f.generation:06d}"
            kind, kid, created = f.kind or "-", f.kid or "-", f.created or "-"
            out.write(f"{status} {kind:<8} {kid:<16} {generation:<8} {created:<20} {f.file}  {detail}\n")
        out.write(report.summary() + "\n")
    return 0 if report.ok else IntegrityError.exit_code


def cmd_serve(ctx: Context, out: TextIO) -> int:
    overrides: dict[str, Any] = {"state_dir": ctx.state_dir}
    ctx.key_path(masterkey.locate(ctx.explicit_key, ctx.environ))
    cfg = dataclasses.replace(ctx.cfg, **overrides)
    return daemon.serve(cfg, ctx.config_path, ctx.environ, master_key=ctx.args.master_key, overrides=overrides)


def cmd_demo(ctx: Context, out: TextIO) -> int:
    from . import demo  # the demo's own imports stay out of every other command

    if ctx.args.say is not None:
        return demo.run_say(ctx.args.dir, ctx.args.say, out)
    return demo.run_demo(ctx.args.dir, ctx.args.keep_running, out)


COMMANDS = {
    ("keys", "init"): cmd_keys_init,
    ("import-legacy", None): cmd_import_legacy,
    ("list", None): cmd_list,
    ("show", None): cmd_show,
    ("verify", None): cmd_verify,
    ("serve", None): cmd_serve,
    ("demo", None): cmd_demo,
}


def main(
    argv: Sequence[str] | None = None,
    environ: os._Environ[str] | dict[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    environ = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(argv)
        ctx = Context(args, environ)
        return COMMANDS[(args.command, getattr(args, "keys_command", None))](ctx, out)
    except NataliaError as exc:
        err.write(f"natalia-secure: error: {exc}\n")
        return exc.exit_code
    except OSError as exc:  # an I/O failure outside the store's own handling: one clear line, never a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        err.write(f"natalia-secure: error: {exc.strerror or exc}{where}\n")
        return StoreUnavailable.exit_code
    except KeyboardInterrupt:
        err.write("natalia-secure: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0  # `natalia-secure list | head`


def run() -> None:
    sys.exit(main())
