"""The admin commands that change the store, one implementation for both routes (guarantee 6: one writer):

    daemon running   the command line sends {"command", "args"} over the control socket (control.py) and the daemon
                     runs the operation on its own store, between webhooks: nothing is lost, and every file the
                     daemon creates after a rotation is sealed with the new primary key (records appended before the
                     rotation's snapshot go to the segment begun under the old key, which that snapshot supersedes)
    daemon stopped   the command line takes the store lock, opens the store and runs the same operation itself

Each operation is `async (store, args, progress) -> result`: async because the daemon's snapshots and backups
are (sealed in a worker thread while the loop serves), the command line runs it with asyncio.run. `args` and the
result are JSON (they cross the socket); `progress(line)` tells the operator what is happening.

Every step of a key rotation leaves each file openable with the keyring on disk: the new keyring (new primary, old
keys still enabled) is saved before anything is sealed under it; files are then replaced one by one, atomically;
old keys are retired last, and only once no file names them. A crash anywhere: run the command again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from . import backups, masterkey, sessions
from .clock import iso_utc
from .errors import NotFoundError, StoreUnavailable, UsageError
from .inventory import Trace, find_person, keys_table, own_data, wamid_names
from .store import Store
from .verify import QUARANTINE, key_usage

Progress = Callable[[str], None]
Operation = Callable[[Store, dict[str, Any], Progress], Coroutine[Any, Any, dict[str, Any]]]

DAY_MS = 86_400_000


def _arg(args: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    value = args.get(name, default)
    if value is ... or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"argument {name!r} must be {kind.__name__}")
    return value


async def backup_now(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    path = await store.backup_async()
    return {"backup": path.rsplit("/", 1)[-1], "generation": store.generation, "sessions": len(store)}


async def prune_backups(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    retention = _arg(args, "retention", dict)
    policy = backups.Retention(**{k: _arg(retention, k, int) for k in ("last", "hourly", "daily", "weekly", "monthly")})
    dry_run = _arg(args, "dry_run", bool, False)
    result = await asyncio.get_running_loop().run_in_executor(None, store.prune_backups, policy, dry_run)
    return {"dry_run": dry_run, "keep": result.keep, "remove": [info.name for info in result.remove]}


async def rotate_keys(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """A new primary data key, everything on disk re-sealed under it, and (retire_old) the old keys retired."""
    retire_old = _arg(args, "retire_old", bool, False)
    ring = store.save_keyring(store.keyring.rotated(iso_utc(store.clock())))
    progress(f"keyring saved: new primary data key {ring.primary.id}")
    # A full snapshot under the new key: it replaces every older snapshot, and the journal starts a new segment
    # under the new key (the segments it covers are removed once it is durable).
    generation = await store.snapshot_async(full=True)
    progress(f"snapshot g{generation:06d} sealed under {ring.primary.id} (it replaces the older snapshots and journal segments)")
    resealed, failed = await store.reseal_backups_async()
    progress(f"{len(resealed)} backups re-sealed under {ring.primary.id}")
    result: dict[str, Any] = {"primary": ring.primary.id, "snapshot_generation": generation, "backups_resealed": resealed}
    if failed:
        result["backups_not_resealed"] = failed
    if retire_old:
        result.update(_retire_unused(store, progress))
    result["keys"] = keys_table(store.keyring, key_usage(store.state_dir), store.clock())
    return result


def _retire_unused(store: Store, progress: Progress) -> dict[str, Any]:
    usage = key_usage(store.state_dir)
    candidates = [k for k in store.keyring.keys if k.status == "enabled"]
    retire = {k.id for k in candidates if not usage.get(k.id)}
    if "?" in usage:  # a file whose header does not parse might name any key: retire nothing on a guess
        retire = set()
    if retire:
        store.save_keyring(store.keyring.with_status(retire, "retired"))
        progress(f"retired {', '.join(sorted(retire))}")
    still = {k.id: sorted(usage.get(k.id, [])) + sorted(usage.get("?", [])) for k in candidates if k.id not in retire}
    return {"retired": sorted(retire), "still_in_use": still}


async def retire_key(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    kid = _arg(args, "kid", str)
    key = store.keyring.get(kid)  # NotFoundError names it
    if key.status == "primary":
        raise UsageError(f"{kid} is the primary key; run `natalia-secure keys rotate` first")
    if key.status == "retired":
        return {"retired": [], "already_retired": kid}
    usage = key_usage(store.state_dir)
    using = sorted(usage.get(kid, []) + usage.get("?", []))
    if using:
        shown = ", ".join(using[:5]) + (f" and {len(using) - 5} more" if len(using) > 5 else "")
        raise UsageError(f"{kid} still seals {len(using)} files ({shown}); run `natalia-secure keys rotate` first")
    store.save_keyring(store.keyring.with_status({kid}, "retired"))
    return {"retired": [kid]}


async def rotate_master(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Re-wrap the keyring under a new master key (the only file the master key seals)."""
    try:
        key = bytes.fromhex(_arg(args, "key", str))
    except ValueError:
        raise UsageError("argument 'key' must be hex") from None
    if len(key) != masterkey.KEY_LEN:  # what a key file can hold: anything else would lock every command out
        raise UsageError(f"a master key is {masterkey.KEY_LEN} bytes, not {len(key)}")
    new = masterkey.MasterKey(key, _arg(args, "source", str, "the new master key"))
    old = store.master.kid
    if new.kid == old:
        return {"master_key": new.kid, "changed": False}
    ring = store.save_keyring(store.keyring, master=new)
    progress(f"keyring (generation {ring.generation}) sealed under master key {new.kid}")
    return {"master_key": new.kid, "previous_master_key": old, "changed": True}


async def forget(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Erase one person from the live store, the journal and every backup, then prove it by decrypting every file.
    Idempotent: after a crash, run it again (it also finds them in backups alone)."""
    phone = sessions.check_phone(_arg(args, "phone", str)).removeprefix("+")
    before = [t for t in await _find(store, phone) if t.where not in ("mention", "unreadable")]
    if phone not in store and not before:
        raise NotFoundError(
            "no data for that phone in the store or its backups (never there, or forgotten already); nothing changed"
        )
    messages = len(store.view(phone)["messages"]) if phone in store else 0
    lsn = store.purge(phone)
    if lsn is not None:
        await store.wait_durable(lsn)
        progress(f"session removed ({messages} messages)")
    claims = store.forget_claims(partial(_names, phone))
    # A new base without them replaces every snapshot, and the journal segments that held their records go with it.
    generation = await store.snapshot_async(full=True)
    progress(f"snapshot g{generation:06d} written without them (it replaces the older snapshots and journal segments)")
    resealed, failed = await store.reseal_backups_async(forget=phone, forget_claim=partial(_names, phone))
    progress(f"{len(resealed)} backups rewritten without them")
    if failed:
        raise StoreUnavailable(
            f"{len(failed)} backups do not open and may still hold them: {', '.join(sorted(failed))}; "
            "run `natalia-secure verify`, remove or restore those files, then run forget again"
        )
    after = await _find(store, phone)
    _proven_gone(phone in store, own_data(after))
    mentions = [t.to_json() for t in after]
    return {
        "phone": phone,
        "messages_removed": messages,
        "claims_removed": claims,
        "snapshot_generation": generation,
        "backups_rewritten": resealed,
        "verified": "every sealed file decrypted: none holds their session, records or message ids",
        "mentions_in_other_sessions": mentions,
    }


def _proven_gone(present: bool, left: list[Trace]) -> None:
    """forget's last word: StoreUnavailable (exit 7) naming each file that may still hold the person."""
    held = sorted({t.file for t in left if not t.file.startswith(QUARANTINE + "/")})
    kept = sorted({t.file for t in left if t.file.startswith(QUARANTINE + "/") and t.where != "unreadable"})
    unreadable = sorted({t.file for t in left if t.where == "unreadable"})
    problems = []
    if held:
        problems.append(f"still found in {', '.join(held)}" + (" (they wrote again meanwhile)" if present else ""))
    if kept:
        problems.append(f"{', '.join(kept)} (moved aside by recover, kept as evidence) holds them")
    if unreadable:
        problems.append(f"{', '.join(unreadable)} (moved aside by recover) does not open, so it cannot be shown not to hold them")
    if problems:
        advice = "run forget again" if held else "everything else is done: delete it once investigated"
        raise StoreUnavailable(f"{'; '.join(problems)}; {advice}")


async def _find(store: Store, phone: str) -> list[Trace]:
    # decrypting every file takes seconds on a large store: not on the daemon's loop
    return await asyncio.get_running_loop().run_in_executor(None, find_person, store.state_dir, store.keyring.usable(), phone)


def _names(phone: str, message_id: str) -> bool:
    return wamid_names(message_id, phone)


async def purge_inactive(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    days = _arg(args, "days", int)
    if days < 1:
        raise UsageError("--inactive-days must be at least 1")
    dry_run = _arg(args, "dry_run", bool, False)
    if dry_run:
        idle = await store.inactive_async(days * DAY_MS)  # examined in slices: the daemon's loop keeps serving
        rows = [{"phone": p, "last_activity": iso_utc(last)} for p, last in sorted(idle.items())]
        return {"dry_run": True, "inactive_days": days, "sessions": rows}
    gone = await store.purge_inactive_async(days * DAY_MS)
    if gone:
        await store.wait_durable(store.lsn)
        progress(f"{len(gone)} sessions removed")
    return {"dry_run": False, "inactive_days": days, "sessions": [{"phone": p} for p in sorted(gone)]}


async def import_legacy(store: Store, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    data = _arg(args, "data", str).encode()
    # parsing a large file holds the loop for seconds in the daemon: a worker thread (the lock route runs it the same)
    pairs = await asyncio.get_running_loop().run_in_executor(None, sessions.parse_legacy, data)
    await store.import_sessions_async(pairs)
    messages = sum(len(s["messages"]) for _, s in pairs)
    return {"sessions": len(pairs), "messages": messages, "snapshot_generation": store.generation}


OPERATIONS: dict[str, Operation] = {
    "backup": backup_now,
    "prune": prune_backups,
    "keys.rotate": rotate_keys,
    "keys.retire": retire_key,
    "keys.rotate-master": rotate_master,
    "forget": forget,
    "purge": purge_inactive,
    "import-legacy": import_legacy,
}
