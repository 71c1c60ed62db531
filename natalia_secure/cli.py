"""`natalia-secure`: the operator's command line. Entry point `main(argv=None) -> int`, tested in-process.

Configuration is read in main(), never at import time, so every mistake goes through the same error handling:
each NataliaError is one line on stderr and its documented exit code (README.md, "Exit codes").
Decrypted content goes to stdout only, never to a file.

Read commands (list, show, stats, verify, export, keys list, backup --list) read the durable state (files) with or
without the daemon and write nothing. Commands that change the store go through the daemon's control socket when
it runs, else take the store lock and do the same operation here (admin.py): one writer, whichever route.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from . import __version__, admin, config, control, inventory, keyring, masterkey, sessions
from .atomicfile import ensure_private_dir
from .clock import iso_utc, now_ms
from .errors import (
    ConfigError,
    InputError,
    IntegrityError,
    KeyMaterialError,
    LockHeldError,
    NataliaError,
    NotFoundError,
    StoreUnavailable,
    UsageError,
)
from .lock import StoreLock
from .store import Store, StoreOptions, file_identity
from .verify import key_usage, verify_state_dir


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
    keys_list = keys_sub.add_parser("list", help="data keys: id, status, created, the files each seals", parents=[common])
    keys_list.add_argument("--json", action="store_true")
    rotate = keys_sub.add_parser("rotate", help="new primary data key; re-seal everything on disk under it", parents=[common])
    rotate.add_argument("--retire-old", action="store_true", help="then retire the old keys no file uses any more")
    rotate.add_argument("--json", action="store_true")
    retire = keys_sub.add_parser("retire", help="retire a data key no file uses any more", parents=[common])
    retire.add_argument("kid", metavar="KID")
    rotate_master = keys_sub.add_parser("rotate-master", help="re-wrap the keyring under a new master key", parents=[common])
    rotate_master.add_argument("--new-master-key", required=True, metavar="FILE", help="the new master key file (0600)")

    imp = sub.add_parser("import-legacy", help="import the legacy plaintext sessions.json", parents=[common])
    imp.add_argument("file", metavar="FILE")

    lst = sub.add_parser("list", help="every session: phone, messages, first and last activity", parents=[common])
    lst.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="decrypt and show one conversation", parents=[common])
    show.add_argument("phone", metavar="PHONE")
    show.add_argument("--json", action="store_true")

    ver = sub.add_parser("verify", help="authenticate every sealed file", parents=[common])
    ver.add_argument("--json", action="store_true")

    stats = sub.add_parser("stats", help="sessions, messages, store size and health, keys", parents=[common])
    stats.add_argument("--json", action="store_true")

    backup = sub.add_parser("backup", help="take a sealed backup now (or list them, or apply the retention)", parents=[common])
    what = backup.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the backups")
    what.add_argument("--prune", action="store_true", help="apply the retention policy (configuration: backups.keep_*)")
    backup.add_argument("--dry-run", action="store_true", help="with --prune: say what would be removed, remove nothing")
    backup.add_argument("--json", action="store_true")

    recover = sub.add_parser("recover", help="after a refused start: set bad files aside, restore, replay", parents=[common])
    recover.add_argument("--from-backup", metavar="NAME", help="restore this backup (default: the newest good state)")
    recover.add_argument("--json", action="store_true")

    export = sub.add_parser("export", help="one person's data as JSON on stdout (an access request)", parents=[common])
    export.add_argument("phone", metavar="PHONE")

    forget = sub.add_parser("forget", help="erase one person: live store, journal and every backup", parents=[common])
    forget.add_argument("phone", metavar="PHONE")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    forget.add_argument("--json", action="store_true")

    purge = sub.add_parser("purge", help="remove sessions inactive for more than N days", parents=[common])
    purge.add_argument("--inactive-days", type=int, required=True, metavar="N")
    purge.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    purge.add_argument("--json", action="store_true")

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

    def __init__(self, args: argparse.Namespace, environ: os._Environ[str] | dict[str, str], err: TextIO) -> None:
        self.args = args
        self.environ = environ
        self.err = err
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

    def progress(self, line: str) -> None:
        self.err.write(f"natalia-secure: {line}\n")
        self.err.flush()

    def change(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run an admin operation: through the daemon when it runs (its control socket), else here with the lock."""
        size = len(orjson.dumps(args))
        if size <= control.MAX_REQUEST - 1024:
            result = control.call(self.state_dir, command, args, on_progress=self.progress)
            if result is not None:
                return result
        try:
            store = self.open(readonly=False)
        except LockHeldError:
            if size > control.MAX_REQUEST - 1024:
                raise LockHeldError(
                    f"this request is {size >> 20} MiB, more than a running daemon takes through its control socket "
                    f"({control.MAX_REQUEST >> 20} MiB): stop the daemon and run the command again"
                ) from None
            raise
        with store:
            return asyncio.run(admin.OPERATIONS[command](store, args, self.progress))


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
    ring_path = os.path.join(ctx.state_dir, keyring.FILENAME)
    if os.path.exists(ring_path):  # a reader's check, no lock: the daemon may be running on it
        ring = keyring.load(ctx.state_dir, master)  # proves the key opens it
        out.write(f"keyring: {ring_path} already exists and opens with this master key (primary {ring.primary.id})\n")
        return 0
    lock = StoreLock.acquire(ctx.state_dir, ctx.options.lock_wait)
    try:
        if os.path.exists(ring_path):  # created by another `keys init` meanwhile
            ring = keyring.load(ctx.state_dir, master)
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
    sessions.parse_legacy(data)  # the first problem is reported here, before the daemon or the lock is involved
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise InputError(f"{ctx.args.file} is not UTF-8 (byte {exc.start})") from None
    r = ctx.change("import-legacy", {"data": text})
    generation = r["snapshot_generation"]
    out.write(f"imported {r['sessions']} sessions ({r['messages']} messages) into snapshot generation {generation}\n")
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
    master = ctx.master()
    if os.path.exists(os.path.join(ctx.state_dir, keyring.FILENAME)):
        _keyring_sealed_by(ctx.state_dir, master, strict=True)  # the wrong master key is exit 4, not a tampered file
    report = verify_state_dir(ctx.state_dir, master)
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


def _size(n: int) -> str:
    """1.7K, as the legacy stats printed sizes (`du -h`)."""
    value = float(n)
    for unit in ("", "K", "M"):
        if value < 1024:
            return f"{n}" if not unit else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def cmd_stats(ctx: Context, out: TextIO) -> int:
    st = inventory.stats(ctx.open(readonly=True), now_ms())
    if ctx.args.json:
        _print_json(st, out)
        return 0
    snap, jr, bk = st["last_snapshot"], st["journal"], st["backups"]
    newest_backup = f", newest {bk['newest']} ({_age(bk['newest_age_s'])} ago)" if bk["newest"] else ""
    lines = [
        ("Total sessions", f"{st['sessions']}"),
        ("Total messages", f"{st['messages']}"),
        ("State directory", st["state_dir"]),
        ("Size", _size(st["store_bytes"])),
        ("Generation", f"{st['generation']} (base {st['base_generation']}, {st['deltas']} deltas after it)"),
        ("Last snapshot", f"{snap['created']} ({_age(snap['age_s'])} ago)" if snap else "none yet"),
        ("Journal", f"{jr['segments']} segments, {_size(jr['bytes'])}, {jr['records_since_snapshot']} records after it"),
        ("Backups", f"{bk['count']}, {_size(bk['bytes'])}" + newest_backup),
        ("Message ids kept", f"{st['claims']} (redeliveries refused for 7 days)"),
    ]
    for label, value in lines:
        out.write(f"{label + ':':<18} {value}\n")
    _keys_rows(st["keys"], out)
    return 0


def _keys_rows(rows: list[dict[str, Any]], out: TextIO) -> None:
    out.write(f"{'KEY':<16} {'STATUS':<8} {'CREATED':<20} {'AGE':>8}  FILES\n")
    for k in rows:
        out.write(f"{k['id']:<16} {k['status']:<8} {k['created']:<20} {k['age_days']:>7}d  {len(k['files'])}\n")


def cmd_keys_list(ctx: Context, out: TextIO) -> int:
    ring = keyring.load(ctx.state_dir, ctx.master())
    rows = inventory.keys_table(ring, key_usage(ctx.state_dir), now_ms())
    if ctx.args.json:
        _print_json(rows, out)
        return 0
    _keys_rows(rows, out)
    for k in rows:
        if k["files"]:
            out.write(f"{k['id']}: {', '.join(k['files'])}\n")
    return 0


def cmd_keys_rotate(ctx: Context, out: TextIO) -> int:
    r = ctx.change("keys.rotate", {"retire_old": ctx.args.retire_old})
    if ctx.args.json:
        _print_json(r, out)
    else:
        out.write(f"primary data key: {r['primary']}; snapshot generation {r['snapshot_generation']}; "
                  f"{len(r['backups_resealed'])} backups re-sealed\n")
        if r.get("retired"):
            out.write(f"retired: {', '.join(r['retired'])}\n")
        for kid, files in r.get("still_in_use", {}).items():
            out.write(f"not retired: {kid} still seals {', '.join(files)}\n")
        for name, why in r.get("backups_not_resealed", {}).items():
            out.write(f"not re-sealed (does not open): {name}: {why}\n")
        _keys_rows(r["keys"], out)
    incomplete = r.get("backups_not_resealed") or (ctx.args.retire_old and r.get("still_in_use"))
    return IntegrityError.exit_code if incomplete else 0


def cmd_keys_retire(ctx: Context, out: TextIO) -> int:
    r = ctx.change("keys.retire", {"kid": ctx.args.kid})
    out.write(f"{ctx.args.kid} was already retired\n" if r.get("already_retired") else f"retired {ctx.args.kid}\n")
    return 0


def cmd_keys_rotate_master(ctx: Context, out: TextIO) -> int:
    new_path = ctx.key_path(ctx.args.new_master_key)
    new = masterkey.read_key_file(new_path)
    current = ctx.master()
    if _keyring_sealed_by(ctx.state_dir, new) and not _keyring_sealed_by(ctx.state_dir, current):
        # a rerun after the keyring was re-wrapped (and before the configuration named the new key): nothing to do
        out.write(f"the keyring is already sealed by master key {new.kid}; point the configuration at {new_path}\n")
        return 0
    r = ctx.change("keys.rotate-master", {"key": new.key.hex(), "source": new_path})
    if not r["changed"]:
        out.write(f"the keyring is already sealed by master key {r['master_key']}\n")
        return 0
    out.write(
        f"keyring re-wrapped: master key {r['previous_master_key']} -> {r['master_key']}.\n"
        f"Now make {new_path} the configured master key (NATALIA_MASTER_KEY_FILE or the systemd credential),\n"
        "keep the old key until every copy of keyring.enc you keep elsewhere is replaced, and restart or reload the daemon.\n"
    )
    return 0


def _keyring_sealed_by(state_dir: str, master: masterkey.MasterKey, strict: bool = False) -> bool:
    """Whether `master` opens the keyring (a damaged keyring is verify's to report); strict: KeyMaterialError if not."""
    try:
        keyring.load(state_dir, master)
        return True
    except KeyMaterialError:
        if strict:
            raise
        return False
    except IntegrityError:
        return True


def cmd_backup(ctx: Context, out: TextIO) -> int:
    if ctx.args.dry_run and not ctx.args.prune:
        raise UsageError("--dry-run goes with --prune")
    if ctx.args.list:
        rows = inventory.backups_table(ctx.state_dir)
        if ctx.args.json:
            _print_json(rows, out)
            return 0
        out.write(f"{'BACKUP':<40} {'TIME (UTC)':<20} {'GEN':>6} {'SIZE':>8}  KEY\n")
        for b in rows:
            out.write(f"{b['name']:<40} {b['time']:<20} {b['generation']:>6} {_size(b['bytes']):>8}  {b['kid'] or '?'}\n")
        out.write(f"{len(rows)} backups\n")
        return 0
    if ctx.args.prune:
        cfg = ctx.cfg
        retention = {"last": cfg.keep_last, "hourly": cfg.keep_hourly, "daily": cfg.keep_daily,
                     "weekly": cfg.keep_weekly, "monthly": cfg.keep_monthly}  # fmt: skip
        r = ctx.change("prune", {"retention": retention, "dry_run": ctx.args.dry_run})
        if ctx.args.json:
            _print_json(r, out)
            return 0
        verb = "would remove" if r["dry_run"] else "removed"
        for name in r["remove"]:
            out.write(f"{verb} {name}\n")
        for name, rules in sorted(r["keep"].items()):
            out.write(f"keep   {name}  ({', '.join(rules)})\n")
        out.write(f"{len(r['keep'])} kept, {len(r['remove'])} {verb}\n")
        return 0
    r = ctx.change("backup", {})
    if ctx.args.json:
        _print_json(r, out)
    else:
        out.write(f"backup {r['backup']} ({r['sessions']} sessions, generation {r['generation']})\n")
    return 0


def cmd_recover(ctx: Context, out: TextIO) -> int:
    from . import recover  # only this command needs it

    report = recover.recover(ctx.state_dir, ctx.master(), ctx.args.from_backup, lock_wait=ctx.options.lock_wait)
    if ctx.args.json:
        _print_json(report.to_json(), out)
    else:
        for line in report.lines():
            out.write(line + "\n")
    return 0


def cmd_export(ctx: Context, out: TextIO) -> int:
    ring_path = os.path.join(ctx.state_dir, keyring.FILENAME)
    for attempt in range(3):
        before = file_identity(ring_path)
        store = ctx.open(readonly=True)
        phone, _ = _find(store, ctx.args.phone)
        try:
            exported = inventory.export(store, phone, now_ms())
            break
        except IntegrityError:  # a rotation by the daemon sealed files under a key newer than the keyring we read
            if attempt == 2 or file_identity(ring_path) == before:
                raise
    _print_json(exported, out)
    return 0


def cmd_forget(ctx: Context, out: TextIO) -> int:
    phone = ctx.args.phone.removeprefix("+")
    if not ctx.args.yes:
        if not sys.stdin.isatty():
            raise UsageError("forget erases a person's data everywhere, backups included: add --yes to confirm")
        ctx.err.write(f"Erase every trace of {phone} from the store, its journal and every backup? Type the number again: ")
        ctx.err.flush()
        if sys.stdin.readline().strip().removeprefix("+") != phone:
            raise UsageError("not confirmed; nothing changed")
    r = ctx.change("forget", {"phone": phone})
    if ctx.args.json:
        _print_json(r, out)
        return 0
    out.write(
        f"forgot {r['phone']}: {r['messages_removed']} messages, {r['claims_removed']} message ids; "
        f"snapshot generation {r['snapshot_generation']}; {len(r['backups_rewritten'])} backups rewritten\n"
        f"verified: {r['verified']}\n"
    )
    for m in r["mentions_in_other_sessions"]:
        out.write(f"note: the number also appears in {m['count']} other people's messages in {m['file']} (not theirs to erase)\n")
    return 0


def cmd_purge(ctx: Context, out: TextIO) -> int:
    r = ctx.change("purge", {"days": ctx.args.inactive_days, "dry_run": ctx.args.dry_run})
    if ctx.args.json:
        _print_json(r, out)
        return 0
    for row in r["sessions"]:
        last = f"  last activity {row['last_activity']}" if "last_activity" in row else ""
        out.write(f"{'would remove' if r['dry_run'] else 'removed'} {row['phone']}{last}\n")
    verb = "would be removed" if r["dry_run"] else "removed"
    out.write(f"{len(r['sessions'])} sessions inactive for more than {r['inactive_days']} days {verb}\n")
    return 0


def cmd_serve(ctx: Context, out: TextIO) -> int:
    from . import daemon  # Tornado and the reply path: not for the admin commands (~70 ms of every start)

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
    ("keys", "list"): cmd_keys_list,
    ("keys", "rotate"): cmd_keys_rotate,
    ("keys", "retire"): cmd_keys_retire,
    ("keys", "rotate-master"): cmd_keys_rotate_master,
    ("stats", None): cmd_stats,
    ("backup", None): cmd_backup,
    ("recover", None): cmd_recover,
    ("export", None): cmd_export,
    ("forget", None): cmd_forget,
    ("purge", None): cmd_purge,
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
        ctx = Context(args, environ, err)
        return COMMANDS[(args.command, getattr(args, "keys_command", None))](ctx, out)
    except NataliaError as exc:
        err.write(f"natalia-secure: error: {exc}\n")
        return exc.exit_code
    except BrokenPipeError:  # `natalia-secure list | head`: the reader has what it wanted (an OSError: first)
        if out is sys.stdout:  # and the interpreter's own flush at exit must not complain either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # an I/O failure outside the store's own handling: one clear line, never a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        err.write(f"natalia-secure: error: {exc.strerror or exc}{where}\n")
        return StoreUnavailable.exit_code
    except KeyboardInterrupt:
        err.write("natalia-secure: interrupted\n")
        return 130


def run() -> None:
    sys.exit(main())
