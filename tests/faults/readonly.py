"""A read-only filesystem under the store, on a tmpfs in a private mount namespace (tests/test_faults.py runs it).

    unshare -m --propagation private python tests/faults/readonly.py remount|bind MOUNTPOINT MASTER_KEY_FILE LEGACY_JSON

"remount": the tmpfs itself is remounted read-only (``mount -o remount,ro``) once the writer has closed; a writer
(refused at open, or at its first flush) and a mutating command must fail clearly, nothing may be reported durable,
reads must work, nothing may change.

"bind": the store is open and running when its directory turns read-only. The kernel refuses to remount the
tmpfs read-only while the store holds a file open for writing (EBUSY, recorded), so a read-only bind mount is laid
over the state directory instead: every new file the store makes (a segment, a snapshot) then fails with EROFS
as on a filesystem the kernel made read-only after an error. Prints one JSON object of observations.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from scenario import (
    T0,
    attempt,
    contents,
    describe,
    digests,
    emit,
    mount,
    new_store_dir,
    temps,
    texts,
    tmpfs,
    umount,
    wait_durable,
)

from natalia_secure.cli import main as cli_main
from natalia_secure.store import Store, StoreOptions
from natalia_secure.verify import verify_state_dir

OPTIONS = StoreOptions(chunk=4096)


def build(state: str, master: Any) -> Store:
    store = Store.open(state, master, OPTIONS)
    for i in range(10):
        store.add_message(f"+3460000{i % 3:04d}", "user", f"durable {i}", T0 + i)
    store.flush()
    store.snapshot()
    store.add_message("+34600000001", "assistant", "durable in the journal", T0 + 50)
    store.flush()
    return store


def remount(mountpoint: str, key_file: str, legacy: str) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    tmpfs(mountpoint)
    state, master = new_store_dir(os.path.join(mountpoint, "state"), key_file)
    store = build(state, master)
    expected = contents(store)
    store.close()
    before = digests(state)
    obs["remount_ro"] = mount("-o", "remount,ro", mountpoint)
    try:  # refused at open, or at the first write: either way clearly, and nothing reported durable
        writer = Store.open(state, master, OPTIONS)
    except Exception as exc:
        obs["writing_open"], obs["first_flush"], obs["first_wait"] = describe(exc), None, None
    else:
        obs["writing_open"] = None
        lsn = writer.add_message("+34600000002", "user", "never durable", T0 + 60)
        obs["first_flush"] = attempt(writer.flush)
        obs["first_wait"] = wait_durable(writer, lsn)
        writer.close()
    with Store.open(state, master, OPTIONS, readonly=True) as reader:
        obs["readonly_equals"] = contents(reader) == expected
    obs["verify_ok"] = verify_state_dir(state, master).ok
    out, err = io.StringIO(), io.StringIO()
    obs["cli_import_exit"] = cli_main(["import-legacy", legacy, "--state-dir", state, "--master-key", key_file], {}, out, err)
    obs["cli_import_stderr"] = err.getvalue()
    obs["intact"] = digests(state) == before
    return obs


def bind(mountpoint: str, key_file: str, legacy: str) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    tmpfs(mountpoint)
    state, master = new_store_dir(os.path.join(mountpoint, "state"), key_file)
    store = build(state, master)
    store.snapshot()  # the next record starts a new segment file: a new file, which a read-only directory refuses
    durable = texts(store)
    before = digests(state)
    obs["remount_ro_while_open"] = mount("-o", "remount,ro", mountpoint)
    obs["bind_ro"] = mount("--bind", "-o", "ro", state, state)
    lsn = store.add_message("+34600000002", "user", "never durable", T0 + 60)
    obs["flush"] = attempt(store.flush)
    obs["degraded"] = store.degraded
    obs["wait_failed_lsn"] = wait_durable(store, lsn)
    obs["add_while_degraded"] = attempt(store.add_message, "+34600000002", "user", "refused?", T0 + 61)
    obs["snapshot_while_ro"] = attempt(store.snapshot, full=True)
    obs["wait_failed_lsn_after_failed_snapshot"] = wait_durable(store, lsn)
    obs["intact"] = digests(state) == before
    obs["temps"] = temps(state)
    with Store.open(state, master, OPTIONS, readonly=True) as reader:
        seen = texts(reader)
    obs["readonly_sees_exactly_the_durable"] = seen == durable
    obs["umount_bind"] = umount(state)
    obs["recovery_snapshot"] = attempt(store.snapshot, full=True)
    obs["degraded_after_recovery"] = store.degraded
    memory = contents(store)
    store.close()
    with Store.open(state, master, OPTIONS) as again:
        obs["reopened_equals_memory"] = contents(again) == memory
        obs["failed_record_durable_after_recovery"] = "never durable" in texts(again)
    obs["verify_ok"] = verify_state_dir(state, master).ok
    return obs


if __name__ == "__main__":
    scenario, mountpoint, key_file, legacy = sys.argv[1:5]
    emit({"remount": remount, "bind": bind}[scenario](mountpoint, key_file, legacy))
