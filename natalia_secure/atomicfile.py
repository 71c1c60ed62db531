"""Atomic, durable file replacement and the state directory's rules. Knows no cryptography (borg's SaveFile).

A file appears whole or not at all: the bytes go to `.NAME.RANDOM.tmp` in the same directory (O_EXCL|O_NOFOLLOW,
0600 by fchmod so the umask cannot widen it), are fsynced, renamed over the target, and the directory is fsynced;
only then does the caller acknowledge, prune or truncate anything. On any failure the temp is unlinked and the old
file stays. A failed fsync is never retried and trusted (PostgreSQL's 2018 "fsyncgate": the kernel may already have
dropped the dirty pages and cleared the error), so the error goes up and the caller marks itself degraded.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from typing import BinaryIO

from .errors import ConfigError, IntegrityError

FILE_MODE = 0o600
DIR_MODE = 0o700
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp\Z")  # what create_temp makes: secrets.token_hex(6)
LEFT_BEHIND: set[str] = set()  # temps of failed writes the file system would not let us remove (remove_left_behind)
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(dirfd_or_path: int | str) -> None:
    """fsync a directory so that a rename or unlink inside it survives power loss (rename(2), fsync(2))."""
    if isinstance(dirfd_or_path, int):
        os.fsync(dirfd_or_path)
        return
    fd = os.open(dirfd_or_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until everything is written: a regular file may accept fewer bytes (signal, ENOSPC midway)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _owner_of(path: str) -> tuple[int, int] | None:
    """Files keep the directory owner's uid/gid whoever writes them (root running an admin command, say)."""
    st = os.stat(path)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        return st.st_uid, st.st_gid
    return None


def create_temp(directory: str, name: str) -> tuple[str, int]:
    """Open a fresh, exclusive 0600 temp file beside `name`; returns its path and descriptor."""
    for _ in range(16):
        path = os.path.join(directory, f".{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(path, _OPEN_FLAGS, FILE_MODE)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, FILE_MODE)
            owner = _owner_of(directory)
            if owner:
                os.fchown(fd, *owner)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return path, fd
    raise FileExistsError(errno.EEXIST, "could not create a unique temp file", directory)


def write_atomic(
    path: str,
    pieces: Iterable[bytes | bytearray | memoryview] | Callable[[Callable[[memoryview], None]], object],
    *,
    overwrite: bool = True,
) -> None:
    """Durably replace (or, with overwrite=False, create) `path` with the given bytes.

    `pieces` is an iterable of byte chunks, or a producer called with a `write` function (for streamed sealing).
    With overwrite=False an existing target is never touched: the temp is hard-linked into place (link(2) fails
    with EEXIST) instead of renamed over it.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temp, fd = create_temp(directory, name)
    try:
        try:
            if callable(pieces):
                pieces(lambda data: write_all(fd, data))
            else:
                for piece in pieces:
                    write_all(fd, piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.rename(temp, path)
        else:
            os.link(temp, path)
            os.unlink(temp)
        fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        except OSError:  # the file system refuses even this (EIO, EROFS, EACCES): removed once it takes writes again
            LEFT_BEHIND.add(temp)
        raise


def remove_left_behind() -> list[str]:
    """Remove the temps this process's failed writes could not remove at the time (`LEFT_BEHIND`); those it still
    cannot stay listed. Returns the paths removed. (A crash's temps are removed at the next open instead.)"""
    removed = []
    for path in sorted(LEFT_BEHIND):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        LEFT_BEHIND.discard(path)
        removed.append(path)
    return removed


def open_regular(path: str) -> BinaryIO:
    """Open a file under the state directory for reading: never through a symlink, never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(f"{path} is a symbolic link; the store never follows one") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=1 << 20)


def read_small(path: str, limit: int, check: Callable[[os.stat_result], None]) -> tuple[bytes, os.stat_result]:
    """A small file an operator gives us (a key, a configuration, a credential): opened without blocking (a FIFO
    must not hang a start), `check` run on the open descriptor's stat (no window between the check and the read;
    it refuses what is not a regular file, a foreign owner, an open mode), then at most `limit` + 1 bytes read, so
    the caller tells "too large" by the length. OSError (FileNotFoundError if absent) as the system raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        check(st)
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks), st


def remove_stale_temps(directory: str) -> list[str]:
    """Remove temps a crash left behind (only names this module makes: `.NAME.HEX.tmp`)."""
    removed = []
    for entry in os.scandir(directory):
        if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    if removed:
        fsync_dir(directory)
    return removed


def ensure_private_dir(path: str, *, create: bool = True) -> None:
    """Make sure `path` is a directory only its owner can enter, owned by us or root; create it 0700 if asked.

    Refused (ConfigError) rather than fixed: a directory someone opened up, or that belongs to another user, is a
    sign of a mistake or an attack that an operator should look at. A symlink is followed and its target checked:
    systemd's DynamicUser= makes /var/lib/NAME a link into the root-only /var/lib/private/.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"state directory {path} does not exist") from None
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):  # parents made here would be as open as the umask allows: the operator's call
            raise ConfigError(f"cannot create {path}: its parent directory {parent} does not exist") from None
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; chmod is not
        fsync_dir(parent)
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory")
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 0700 {path}")
    # Root may administer a directory the service user owns (files it writes are chowned to that owner).
    if os.geteuid() != 0 and st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()}) or root")


def ensure_subdir(parent: str, name: str) -> str:
    """A 0700 subdirectory with the parent's owner (e.g. backups/)."""
    path = os.path.join(parent, name)
    if not os.path.isdir(path):
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)
        owner = _owner_of(parent)
        if owner:
            os.chown(path, *owner)
        fsync_dir(parent)
    ensure_private_dir(path, create=False)
    return path
