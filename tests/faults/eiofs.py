"""A pass-through FUSE filesystem that answers EIO to every write on demand: I/O errors under the running daemon
(tests/test_faults_daemon.py).

    python tests/faults/eiofs.py BACKING MOUNTPOINT STATS_FILE

dm-flakey on a loop device is the usual way to make a disk fail writes, but this VM's kernel has no device-mapper
(/proc/misc has no device-mapper entry, and there are no modules to load), while /dev/fuse is there. So this script
speaks the kernel's FUSE protocol on /dev/fuse itself (the structures of <linux/fuse.h>, protocol 7.31; fuse(4)):
no libfuse and no PyPI package, only the standard library and mount(2) through ctypes. The daemon's os.write and
os.fsync then fail in the kernel exactly as on a failing disk, through the same system calls it makes in production.

It mounts MOUNTPOINT in the caller's mount namespace (start it with `nsenter -m` or inside `unshare -m`: the mount
never reaches the host), prints "mounted", and serves requests one at a time until the mount goes away or its
standard input closes (the test died: nothing is left behind).

Control, in band: a lookup of ".eiofs-fail" at the root switches to failing, ".eiofs-pass" back to passing; both
answer ENOENT. Requests are served in order, one at a time, so once that stat(2) returns every later request sees
the new mode and no earlier one is still being written. While failing, every request that would change the disk
(write, fsync, create, mknod, mkdir, unlink, rmdir, rename, link, setattr, fallocate, fsyncdir) answers EIO and
changes nothing: the model is dm-flakey's error_writes. Reads, lookups and opens pass. At each switch the counts
of what was failed are written to STATS_FILE as JSON.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import stat
import struct
import sys
import threading
import time

# <linux/fuse.h>
MAJOR, MINOR = 7, 31
LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
FSYNC, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE = 20, 25, 26, 27, 28, 29, 30, 34, 35
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, RENAME2 = 36, 38, 42, 43, 45
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}
WRITES = {
    WRITE: "write",
    FSYNC: "fsync",
    CREATE: "create",
    MKNOD: "mknod",
    MKDIR: "mkdir",
    UNLINK: "unlink",
    RMDIR: "rmdir",
    RENAME: "rename",
    RENAME2: "rename",
    LINK: "link",
    SETATTR: "setattr",
    FALLOCATE: "fallocate",
    FSYNCDIR: "fsyncdir",
}
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1, 2, 4, 8, 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 128, 256
FUSE_GETATTR_FH = 1
FUSE_BIG_WRITES = 1 << 5
MAX_WRITE = 128 * 1024
RENAME_NOREPLACE = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error (-errno), unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime, *nsec, mode nlink uid gid rdev blksize flags
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, their nsec
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_background, congestion_threshold, max_write, time_gran, max_pages
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags, dummy, fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid, pad, fh, size, lock_owner, atime, mtime, ctime, *nsec, mode, ...
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")  # mode, umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
OPEN_IN = struct.Struct("<II")  # flags, open_flags
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
IO_IN = struct.Struct("<QQIIQII")  # read_in and write_in: fh, offset, size, flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")
FH_IN = struct.Struct("<Q")  # the fh that leads release_in, fsync_in, flush_in
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree, bsize namelen frsize padding, spare
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type

MS_NOSUID, MS_NODEV = 2, 4
FAIL_NAME, PASS_NAME = b".eiofs-fail", b".eiofs-pass"


class Reply(Exception):
    """An errno answer to the request being served."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


def attr(st: os.stat_result) -> bytes:
    return ATTR.pack(
        st.st_ino,
        st.st_size,
        st.st_blocks,
        int(st.st_atime),
        int(st.st_mtime),
        int(st.st_ctime),
        st.st_atime_ns % 10**9,
        st.st_mtime_ns % 10**9,
        st.st_ctime_ns % 10**9,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_blksize,
        0,
    )


def names(data: bytes, count: int) -> list[str]:
    """The NUL-terminated names that end a request."""
    return [os.fsdecode(n) for n in data.split(b"\0")[:count]]


class EioFs:
    def __init__(self, backing: str, stats_file: str) -> None:
        self.backing = os.path.abspath(backing)
        self.stats_file = stats_file
        self.failing = False
        self.failed: dict[str, int] = {}
        self.switches = 0
        self.paths: dict[int, str] = {1: ""}  # nodeid -> path relative to the backing directory
        self.nodes: dict[str, int] = {"": 1}
        self.next_node = 2
        self.files: dict[int, int] = {}  # fh -> backing descriptor
        self.dirs: dict[int, list[tuple[int, int, bytes]]] = {}  # fh -> (ino, type, name) listed at opendir
        self.next_fh = 1

    # ---- nodes and paths ----

    def full(self, rel: str) -> str:
        return os.path.join(self.backing, rel) if rel else self.backing

    def path(self, nodeid: int) -> str:
        rel = self.paths.get(nodeid)
        if rel is None:
            raise Reply(errno.ESTALE)
        return rel

    def child(self, nodeid: int, name: str) -> str:
        parent = self.path(nodeid)
        return f"{parent}/{name}" if parent else name

    def node(self, rel: str) -> int:
        if rel not in self.nodes:
            self.nodes[rel], self.paths[self.next_node] = self.next_node, rel
            self.next_node += 1
        return self.nodes[rel]

    def forget_path(self, rel: str) -> None:
        """`rel` no longer names what it named (unlinked, or replaced by a rename): its node keeps no path."""
        node = self.nodes.pop(rel, None)
        if node is not None:
            self.paths.pop(node, None)

    def moved(self, old: str, new: str) -> None:
        self.forget_path(new)
        for rel in [r for r in self.nodes if r == old or r.startswith(old + "/")]:
            node = self.nodes.pop(rel)
            self.nodes[new + rel[len(old) :]] = node
            self.paths[node] = new + rel[len(old) :]

    def entry(self, rel: str) -> bytes:
        st = os.lstat(self.full(rel))
        return ENTRY_OUT.pack(self.node(rel), 0, 0, 0, 0, 0) + attr(st)  # no caching: every access is asked again

    def new_fh(self) -> int:
        self.next_fh += 1
        return self.next_fh

    def save_stats(self) -> None:
        with open(self.stats_file + ".tmp", "w") as f:
            json.dump({"failing": self.failing, "failed": self.failed, "switches": self.switches}, f)
        os.replace(self.stats_file + ".tmp", self.stats_file)

    # ---- requests ----

    def serve(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        if self.failing and opcode in WRITES:
            self.failed[WRITES[opcode]] = self.failed.get(WRITES[opcode], 0) + 1
            raise Reply(errno.EIO)
        if opcode == INIT:
            _, _, readahead, _ = INIT_IN.unpack_from(body)
            return INIT_OUT.pack(MAJOR, MINOR, readahead, FUSE_BIG_WRITES, 16, 12, MAX_WRITE, 1, 0, 0, 0)
        if opcode == LOOKUP:
            name = body.split(b"\0")[0]
            if nodeid == 1 and name in (FAIL_NAME, PASS_NAME):
                self.failing = name == FAIL_NAME
                self.switches += 1
                self.save_stats()
                raise Reply(errno.ENOENT)
            return self.entry(self.child(nodeid, os.fsdecode(name)))
        if opcode == GETATTR:
            flags, _, fh = GETATTR_IN.unpack_from(body)
            st = (
                os.fstat(self.files[fh])
                if flags & FUSE_GETATTR_FH and fh in self.files
                else os.lstat(self.full(self.path(nodeid)))
            )
            return ATTR_OUT.pack(0, 0, 0) + attr(st)
        if opcode == SETATTR:
            return self.setattr(nodeid, body)
        if opcode in (OPEN, OPENDIR):
            return self.open(opcode, nodeid, body)
        if opcode == READ:
            fh, offset, size, *_ = IO_IN.unpack_from(body)
            return os.pread(self.files[fh], size, offset)
        if opcode == WRITE:
            fh, offset, size, *_ = IO_IN.unpack_from(body)
            written = os.pwrite(self.files[fh], body[IO_IN.size : IO_IN.size + size], offset)
            return WRITE_OUT.pack(written, 0)
        if opcode in (RELEASE, RELEASEDIR):
            (fh,) = FH_IN.unpack_from(body)
            if fh in self.files:
                os.close(self.files.pop(fh))
            self.dirs.pop(fh, None)
            return b""
        if opcode == FSYNC:
            (fh,) = FH_IN.unpack_from(body)
            os.fsync(self.files[fh])
            return b""
        if opcode == FSYNCDIR:
            fd = os.open(self.full(self.path(nodeid)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return b""
        if opcode in (FLUSH, ACCESS):
            return b""
        if opcode == READDIR:
            return self.readdir(body)
        if opcode == CREATE:
            flags, mode, _, _ = CREATE_IN.unpack_from(body)
            rel = self.child(nodeid, names(body[CREATE_IN.size :], 1)[0])
            keep = os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC
            fd = os.open(self.full(rel), (flags & keep) | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o7777)
            fh = self.new_fh()
            self.files[fh] = fd
            return self.entry(rel) + OPEN_OUT.pack(fh, 0, 0)
        if opcode == MKNOD:
            mode, rdev, _, _ = MKNOD_IN.unpack_from(body)
            rel = self.child(nodeid, names(body[MKNOD_IN.size :], 1)[0])
            os.mknod(self.full(rel), mode, rdev)
            return self.entry(rel)
        if opcode == MKDIR:
            mode, _ = MKDIR_IN.unpack_from(body)
            rel = self.child(nodeid, names(body[MKDIR_IN.size :], 1)[0])
            os.mkdir(self.full(rel), mode & 0o7777)
            return self.entry(rel)
        if opcode in (UNLINK, RMDIR):
            rel = self.child(nodeid, names(body, 1)[0])
            (os.unlink if opcode == UNLINK else os.rmdir)(self.full(rel))
            self.forget_path(rel)
            return b""
        if opcode in (RENAME, RENAME2):
            layout = RENAME_IN if opcode == RENAME else RENAME2_IN
            newdir, *rest = layout.unpack_from(body)
            flags = rest[0] if rest else 0
            old_name, new_name = names(body[layout.size :], 2)
            old, new = self.child(nodeid, old_name), self.child(newdir, new_name)
            if flags & ~RENAME_NOREPLACE:
                raise Reply(errno.EINVAL)
            if flags & RENAME_NOREPLACE and os.path.lexists(self.full(new)):  # one request at a time: no race
                raise Reply(errno.EEXIST)
            os.rename(self.full(old), self.full(new))
            self.moved(old, new)
            return b""
        if opcode == LINK:
            (old_node,) = LINK_IN.unpack_from(body)
            rel = self.child(nodeid, names(body[LINK_IN.size :], 1)[0])
            os.link(self.full(self.path(old_node)), self.full(rel))
            return self.entry(rel)
        if opcode == STATFS:
            sv = os.statvfs(self.backing)
            return KSTATFS.pack(
                sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_bsize, sv.f_namemax, sv.f_frsize, 0
            )
        if opcode == FALLOCATE:
            fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body)
            if mode:
                raise Reply(errno.EOPNOTSUPP)
            os.posix_fallocate(self.files[fh], offset, length)
            return b""
        if opcode == DESTROY:
            return b""
        raise Reply(errno.ENOSYS)  # xattrs, locks (the kernel then keeps flock/fcntl locks itself), symlinks...

    def setattr(self, nodeid: int, body: bytes) -> bytes:
        valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid, _ = SETATTR_IN.unpack_from(body)
        fd = self.files.get(fh) if valid & FATTR_FH else None
        target: int | str = fd if fd is not None else self.full(self.path(nodeid))
        if valid & FATTR_MODE:
            os.chmod(target, stat.S_IMODE(mode))
        if valid & (FATTR_UID | FATTR_GID):
            os.chown(target, uid if valid & FATTR_UID else -1, gid if valid & FATTR_GID else -1)
        if valid & FATTR_SIZE:
            os.truncate(target, size)
        if valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW):
            st, now = os.stat(target), time.time_ns()
            a = now if valid & FATTR_ATIME_NOW else atime * 10**9 + atimensec if valid & FATTR_ATIME else st.st_atime_ns
            m = now if valid & FATTR_MTIME_NOW else mtime * 10**9 + mtimensec if valid & FATTR_MTIME else st.st_mtime_ns
            os.utime(target, ns=(a, m))
        st = os.fstat(fd) if fd is not None else os.lstat(self.full(self.path(nodeid)))
        return ATTR_OUT.pack(0, 0, 0) + attr(st)

    def open(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        flags, _ = OPEN_IN.unpack_from(body)
        full = self.full(self.path(nodeid))
        fh = self.new_fh()
        if opcode == OPENDIR:
            listing = [(os.lstat(full).st_ino, stat.S_IFDIR >> 12, b"."), (1, stat.S_IFDIR >> 12, b"..")]
            with os.scandir(full) as it:
                for e in it:
                    listing.append((e.inode(), stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) >> 12, os.fsencode(e.name)))
            self.dirs[fh] = listing
        else:
            # O_APPEND is the kernel's business (it sends the offset); O_CREAT/O_EXCL/O_TRUNC never reach open
            self.files[fh] = os.open(full, (flags & os.O_ACCMODE) | os.O_NOFOLLOW | os.O_CLOEXEC)
        return OPEN_OUT.pack(fh, 0, 0)

    def readdir(self, body: bytes) -> bytes:
        fh, offset, size, *_ = IO_IN.unpack_from(body)
        out = b""
        for index, (ino, kind, name) in enumerate(self.dirs.get(fh, [])[offset:], start=offset + 1):
            entry = DIRENT.pack(ino, index, len(name), kind) + name
            entry += b"\0" * (-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return out


def mount(fd: int, mountpoint: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other".encode()
    if libc.mount(b"eiofs", os.fsencode(mountpoint), b"fuse.eiofs", MS_NOSUID | MS_NODEV, options) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount(2) of a FUSE filesystem on {mountpoint}: {os.strerror(code)}")


def run(backing: str, mountpoint: str, stats_file: str) -> int:
    fs = EioFs(backing, stats_file)
    fs.save_stats()
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        mount(fd, mountpoint)
    except OSError as exc:
        print(f"cannot mount: {exc}", flush=True)  # the test skips, saying why
        return 2
    print("mounted", flush=True)

    def orphaned() -> None:
        sys.stdin.buffer.read()
        os._exit(0)  # our parent (the test) is gone: closing /dev/fuse aborts the connection

    threading.Thread(target=orphaned, daemon=True).start()
    while True:
        try:
            request = os.read(fd, MAX_WRITE + 64 * 1024)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: the request was interrupted
                continue
            if exc.errno == errno.ENODEV:  # unmounted
                return 0
            raise
        length, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
        body = request[IN_HEADER.size : length]
        try:
            payload, error = fs.serve(opcode, nodeid, body), 0
        except Reply as exc:
            payload, error = b"", -exc.code
        except OSError as exc:
            payload, error = b"", -(exc.errno or errno.EIO)
        except KeyError:  # an fh we never gave (or already released)
            payload, error = b"", -errno.EBADF
        if opcode in NO_REPLY:
            continue
        try:
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: interrupted meanwhile, nobody waits for this answer
                raise
        if opcode == DESTROY:
            return 0


def main(argv: list[str]) -> int:
    backing, mountpoint, stats_file = argv
    return run(backing, mountpoint, stats_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
