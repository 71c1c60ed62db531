"""Atomic, durable files (natalia_secure/atomicfile.py): modes, failure midway, no overwrite, stale temps, private dirs."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natalia_secure import atomicfile
from natalia_secure.errors import ConfigError, IntegrityError

from .conftest import deadline


class Boom(Exception):
    pass


def umask0(fn: Callable[[], Any]) -> Any:
    old = os.umask(0)
    try:
        return fn()
    finally:
        os.umask(old)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)


def test_write_atomic_pieces(tmp_path: Path) -> None:
    """write_atomic writes the concatenation of its pieces (bytes, bytearray, memoryview) and leaves no temp."""
    path = tmp_path / "f"
    atomicfile.write_atomic(str(path), [b"ab", bytearray(b"cd"), memoryview(b"ef"), b""])
    assert path.read_bytes() == b"abcdef"
    assert os.listdir(tmp_path) == ["f"]


def test_write_atomic_producer(tmp_path: Path) -> None:
    """A producer given the write function (the streamed-sealing path) writes every byte it passes."""
    path = tmp_path / "f"

    def produce(write: Callable[[memoryview], None]) -> None:
        buf = bytearray(4)
        for i in range(3):  # the same buffer reused, as seal_stream does
            buf[:] = bytes([i]) * 4
            write(memoryview(buf))

    atomicfile.write_atomic(str(path), produce)
    assert path.read_bytes() == b"\x00" * 4 + b"\x01" * 4 + b"\x02" * 4


def test_write_atomic_replaces(tmp_path: Path) -> None:
    """By default an existing file is replaced whole by the new content."""
    path = tmp_path / "f"
    path.write_bytes(b"old" * 1000)
    atomicfile.write_atomic(str(path), [b"new"])
    assert path.read_bytes() == b"new"


def test_write_atomic_mode_0600_under_umask_0(tmp_path: Path) -> None:
    """Files are 0600 even under umask 0, and replacing a 0644 file leaves a 0600 one."""
    umask0(lambda: atomicfile.write_atomic(str(tmp_path / "new"), [b"x"]))
    assert mode(tmp_path / "new") == 0o600
    old = tmp_path / "old"
    old.write_bytes(b"x")
    os.chmod(old, 0o644)
    umask0(lambda: atomicfile.write_atomic(str(old), [b"y"]))
    assert mode(old) == 0o600


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_all loops until every byte is written when os.write accepts only a few bytes at a time."""
    real_write = os.write
    calls = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(memoryview(data)[:3]))

    monkeypatch.setattr(os, "write", short_write)
    payload = bytes(range(256)) * 4
    atomicfile.write_atomic(str(tmp_path / "f"), [payload[:500], payload[500:]])
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == payload
    assert len(calls) > 300


def _generator_failing_midway() -> Iterator[bytes]:
    yield b"partial new content " * 1000
    raise Boom


def _producer_failing_midway(write: Callable[[memoryview], None]) -> None:
    write(memoryview(b"partial new content " * 1000))
    raise Boom


@pytest.mark.parametrize("pieces", [_generator_failing_midway, _producer_failing_midway])
def test_failure_midway_keeps_old_file(tmp_path: Path, pieces: Any) -> None:
    """When the producer raises midway the error goes up, the old file is unchanged and no temp is left."""
    path = tmp_path / "f"
    path.write_bytes(b"old content")
    arg = pieces() if pieces is _generator_failing_midway else pieces
    with pytest.raises(Boom):
        atomicfile.write_atomic(str(path), arg)
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f"]


def test_failure_midway_without_old_file(tmp_path: Path) -> None:
    """A failed first write leaves no file at all, not a partial one."""
    with pytest.raises(Boom):
        atomicfile.write_atomic(str(tmp_path / "f"), _producer_failing_midway)
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_midway_cleans_up(tmp_path: Path) -> None:
    """Even a BaseException (Ctrl-C) midway unlinks the temp and keeps the old file."""
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def produce(write: Callable[[memoryview], None]) -> None:
        write(memoryview(b"new"))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomicfile.write_atomic(str(path), produce)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_overwrite_false_creates(tmp_path: Path) -> None:
    """overwrite=False creates a missing file with the content, 0600, and no temp left."""
    umask0(lambda: atomicfile.write_atomic(str(tmp_path / "f"), [b"x"], overwrite=False))
    assert (tmp_path / "f").read_bytes() == b"x"
    assert mode(tmp_path / "f") == 0o600
    assert os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("kind", ["file", "empty", "dangling-symlink", "directory"])
def test_overwrite_false_never_replaces(tmp_path: Path, kind: str) -> None:
    """overwrite=False never replaces whatever already has the name (a file, an empty file, a dangling symlink, a dir)."""
    path = tmp_path / "f"
    if kind == "file":
        path.write_bytes(b"precious")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dangling-symlink":
        os.symlink(tmp_path / "nowhere", path)
    else:
        path.mkdir()
    with pytest.raises(FileExistsError):
        atomicfile.write_atomic(str(path), [b"new"], overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["f"]
    if kind == "file":
        assert path.read_bytes() == b"precious"
    elif kind == "empty":
        assert path.read_bytes() == b""
    elif kind == "dangling-symlink":
        assert os.readlink(path) == str(tmp_path / "nowhere")


def test_temp_names_and_modes(tmp_path: Path) -> None:
    """create_temp makes `.NAME.HEX.tmp` beside the target, 0600 whatever the umask, and never reuses a name."""
    temps = []
    for _ in range(20):
        path, fd = umask0(lambda: atomicfile.create_temp(str(tmp_path), "sessions.enc"))
        os.close(fd)
        temps.append(path)
        assert os.path.dirname(path) == str(tmp_path)
        assert re.fullmatch(r"\.sessions\.enc\.[0-9a-f]{12}\.tmp", os.path.basename(path))
        assert mode(path) == 0o600
    assert len(set(temps)) == 20


def test_remove_stale_temps(tmp_path: Path) -> None:
    """remove_stale_temps removes the temps a crash left (.NAME.HEX.tmp files) and nothing else."""
    stale = [atomicfile.create_temp(str(tmp_path), name) for name in ("keyring.enc", "snapshot.g000001.enc")]
    for _, fd in stale:
        os.close(fd)
    keep_files = ["keyring.enc", "snapshot.g000001.enc", "lock", "notes.tmp", ".hidden", "x.0123456789ab.tmp"]
    for name in keep_files:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / ".dir.0123456789ab.tmp").mkdir()  # a directory with a temp's name
    os.symlink(tmp_path / "keyring.enc", tmp_path / ".link.0123456789ab.tmp")  # a symlink with a temp's name
    removed = atomicfile.remove_stale_temps(str(tmp_path))
    assert sorted(removed) == sorted(os.path.basename(p) for p, _ in stale)
    assert sorted(os.listdir(tmp_path)) == sorted([*keep_files, ".dir.0123456789ab.tmp", ".link.0123456789ab.tmp"])
    assert (tmp_path / "keyring.enc").read_bytes() == b"keep"
    assert atomicfile.remove_stale_temps(str(tmp_path)) == []


def test_remove_stale_temps_spares_other_dotfiles(tmp_path: Path) -> None:
    """Dotfiles ending in .tmp that this module cannot have made (no 12-hex-digit part) are left alone."""
    names = [".tmp", ".notes.tmp", ".keyring.enc.not-hex-at-all.tmp", ".x.0123456789AB.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"someone else's")
    atomicfile.remove_stale_temps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(names)


def test_fsync_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing fsync of the file (EIO) propagates, leaves the old file as it was and no temp."""
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError) as info:
        atomicfile.write_atomic(str(path), [b"new"])
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_fsync_failure_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After one failed fsync write_atomic gives up: it never calls fsync again and trusts it (fsyncgate)."""
    calls = []

    def eio(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        atomicfile.write_atomic(str(tmp_path / "f"), [b"new"], overwrite=False)
    monkeypatch.undo()
    assert len(calls) == 1
    assert os.listdir(tmp_path) == []


def test_directory_fsync_failure_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing fsync of the directory after the rename propagates (the caller must not acknowledge) and leaves no temp."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    real_fsync = os.fsync
    calls = []

    def fail_second(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the first is the file, the second the directory
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_second)
    with pytest.raises(OSError):
        atomicfile.write_atomic(str(path), [b"new"])
    monkeypatch.undo()
    assert len(calls) == 2
    # The rename already happened: the name holds one whole version, never a mix, and no temp is left.
    assert path.read_bytes() in (b"old", b"new")
    assert os.listdir(tmp_path) == ["f"]


def test_fsync_dir_accepts_path_and_fd(tmp_path: Path) -> None:
    """fsync_dir works on a path and on an open directory descriptor, and refuses a non-directory path."""
    atomicfile.fsync_dir(str(tmp_path))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        atomicfile.fsync_dir(fd)
    finally:
        os.close(fd)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        atomicfile.fsync_dir(str(tmp_path / "f"))


def test_ensure_private_dir_creates_0700_under_umask_0(tmp_path: Path) -> None:
    """A missing state directory is created 0700 even under umask 0, and then passes its own check."""
    path = tmp_path / "state"
    umask0(lambda: atomicfile.ensure_private_dir(str(path)))
    assert mode(path) == 0o700
    atomicfile.ensure_private_dir(str(path), create=False)


def test_ensure_private_dir_missing_without_create(tmp_path: Path) -> None:
    """With create=False a missing directory is a ConfigError, and nothing is created."""
    with pytest.raises(ConfigError, match="does not exist"):
        atomicfile.ensure_private_dir(str(tmp_path / "state"), create=False)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("bad_mode", [0o750, 0o705, 0o701, 0o710, 0o777])
def test_ensure_private_dir_refuses_open_dirs(tmp_path: Path, bad_mode: int) -> None:
    """A directory group or others can enter is refused (not fixed), and its mode is left as it was."""
    path = tmp_path / "state"
    path.mkdir()
    os.chmod(path, bad_mode)
    with pytest.raises(ConfigError, match=f"mode {bad_mode:04o}.*chmod 0700"):
        atomicfile.ensure_private_dir(str(path))
    assert mode(path) == bad_mode


def test_ensure_private_dir_refuses_non_directories(tmp_path: Path) -> None:
    """A regular file, or a symlink to one, where the directory should be is refused."""
    f = tmp_path / "file"
    f.write_bytes(b"")
    os.chmod(f, 0o600)
    link = tmp_path / "link"
    os.symlink(f, link)
    for path in (f, link):
        with pytest.raises(ConfigError, match="not a directory"):
            atomicfile.ensure_private_dir(str(path))


def test_ensure_private_dir_follows_a_symlink_and_checks_its_target(tmp_path: Path) -> None:
    """systemd's DynamicUser= makes /var/lib/NAME a symlink into /var/lib/private/: a link to a good 0700 directory
    is accepted, a link to an open one is refused like the directory itself."""
    real = tmp_path / "private-state"
    real.mkdir(mode=0o700)
    os.chmod(real, 0o700)
    link = tmp_path / "state"
    os.symlink(real, link)
    atomicfile.ensure_private_dir(str(link), create=False)
    os.chmod(real, 0o755)
    with pytest.raises(ConfigError, match="open to group or others"):
        atomicfile.ensure_private_dir(str(link), create=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_root_may_administer_a_service_users_dir(tmp_path: Path) -> None:
    """Root accepts a 0700 state directory owned by the service user (admin commands run as root)."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, 12345, 12345)
    atomicfile.ensure_private_dir(str(path), create=False)


def _as_user(uid: int, fn: Callable[[], str]) -> str:
    """Run fn in a forked child that has dropped root for `uid` (no exec: the venv's interpreter lives under /root)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = fn()
        except BaseException as exc:
            out = f"child error: {exc!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="running a check as another uid needs root")
def test_non_root_refuses_a_dir_owned_by_another_user() -> None:
    """Run as an ordinary user (uid 23456), a 0700 directory owned by another user is refused; its own and root's pass."""
    base = tempfile.mkdtemp(prefix="natalia-owner-", dir="/tmp")  # not under pytest's root-only tmp_path
    try:
        os.chmod(base, 0o711)  # the other user may traverse, not list
        dirs = []
        for name, uid in (("other", 12345), ("own", 23456), ("root", 0)):
            dirs.append(os.path.join(base, name))
            os.mkdir(dirs[-1], 0o700)
            os.chown(dirs[-1], uid, uid)

        def check() -> str:
            lines = []
            for path in dirs:
                try:
                    atomicfile.ensure_private_dir(path, create=False)
                    lines.append("ok")
                except ConfigError as exc:
                    lines.append(f"refused: {exc}")
            return "\n".join(lines)

        lines = _as_user(23456, check).splitlines()
        assert len(lines) == 3, lines
        assert lines[0].startswith("refused") and "owned by uid 12345" in lines[0]
        assert lines[1:] == ["ok", "ok"]
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_files_keep_the_directory_owner(tmp_path: Path) -> None:
    """Run as root in a directory owned by the service user, write_atomic gives the file that user's uid and gid."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 23456)
    atomicfile.write_atomic(str(d / "f"), [b"x"])
    st = os.stat(d / "f")
    assert (st.st_uid, st.st_gid) == (12345, 23456)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_ensure_subdir(tmp_path: Path) -> None:
    """ensure_subdir creates a 0700 subdirectory under umask 0 and accepts it the second time."""
    parent = tmp_path / "state"
    parent.mkdir(mode=0o700)
    os.chmod(parent, 0o700)
    path = umask0(lambda: atomicfile.ensure_subdir(str(parent), "backups"))
    assert path == str(parent / "backups")
    assert mode(path) == 0o700
    assert atomicfile.ensure_subdir(str(parent), "backups") == path


def test_open_regular_reads_a_regular_file(tmp_path: Path) -> None:
    """open_regular opens a regular file for reading (buffered, binary)."""
    (tmp_path / "f").write_bytes(b"content")
    with atomicfile.open_regular(str(tmp_path / "f")) as f:
        assert f.read() == b"content"


def test_open_regular_refuses_symlinks(tmp_path: Path) -> None:
    """open_regular never follows a symlink, even to a regular file (IntegrityError naming the path)."""
    (tmp_path / "real").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(IntegrityError, match="symbolic link"):
        atomicfile.open_regular(str(tmp_path / "link"))


def test_open_regular_refuses_fifos_and_dirs_without_blocking(tmp_path: Path) -> None:
    """A FIFO (no writer: it must not block) or a directory is refused as not a regular file."""
    os.mkfifo(tmp_path / "fifo", 0o600)
    (tmp_path / "dir").mkdir()
    for name in ("fifo", "dir"):
        with deadline(10), pytest.raises(IntegrityError, match="not a regular file"):
            atomicfile.open_regular(str(tmp_path / name))


def test_open_regular_missing_file(tmp_path: Path) -> None:
    """A missing file is FileNotFoundError, for the caller to turn into its own message."""
    with pytest.raises(FileNotFoundError):
        atomicfile.open_regular(str(tmp_path / "absent"))


def test_read_small_checks_the_opened_file_and_reads_at_most_one_byte_past_the_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The check sees the descriptor's stat before any read; a FIFO does not block; a large file is cut at limit + 1
    so the caller can say "too large"; a missing file is FileNotFoundError."""
    import stat as stat_module

    from .conftest import deadline

    big = tmp_path / "big"
    big.write_bytes(b"x" * 100)
    seen: list[int] = []
    data, st = atomicfile.read_small(str(big), 10, lambda s: seen.append(s.st_size))
    assert data == b"x" * 11 and seen == [100] and st.st_size == 100

    def regular_only(s: os.stat_result) -> None:
        if not stat_module.S_ISREG(s.st_mode):
            raise ValueError("not a regular file")

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(ValueError, match="not a regular file"):
        atomicfile.read_small(str(fifo), 10, regular_only)
    with pytest.raises(FileNotFoundError):
        atomicfile.read_small(str(tmp_path / "absent"), 10, regular_only)


def test_a_temp_the_file_system_would_not_remove_is_removed_once_it_can(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The fsync fails (EIO) and so does the unlink of the temp: the temp is listed in LEFT_BEHIND, and
    remove_left_behind() removes it once unlink works again (the store calls it when it recovers)."""
    real_unlink = os.unlink

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    def failing_unlink(path: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.setattr(os, "unlink", failing_unlink)
    with pytest.raises(OSError):
        atomicfile.write_atomic(str(tmp_path / "f"), [b"data"])
    (temp,) = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert str(tmp_path / temp) in atomicfile.LEFT_BEHIND
    assert atomicfile.remove_left_behind() == []  # still refused
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert atomicfile.remove_left_behind() == [str(tmp_path / temp)]
    assert os.listdir(tmp_path) == [] and str(tmp_path / temp) not in atomicfile.LEFT_BEHIND
