"""What an fd is: classify it, fingerprint its identity, verify it, and make real ones.

Theory of operation
-------------------
``classify(fd)`` is done once, when an fd enters a table (``ctl put``, ``--populate``): fstat
plus, for anonymous inodes and regular files, a readlink of /proc/self/fd/N to tell an eventfd
from a timerfd and a memfd from a file. It refuses epoll fds: their interest list names the
sender's fd numbers, which mean nothing in another process.

``Identity`` is the fingerprint that travels with an fd in a handoff: kind, st_mode, st_dev,
st_ino and the open flags that cannot change after open. ``verify(fd, ident)`` re-reads it with
one fstat and one fcntl (about 1.5 us an fd) and names any difference. (st_dev, st_ino) prove
the inode for files, memfds, pipes and sockets; for anonymous inodes (eventfd, timerfd, ...)
every fd shares one inode, so only type and flags are checked there. Proving the same *open file
description* needs more (kcmp, or per kind: shared offset, eventfd-id, memfd bytes); that is
``same_open_file``, used by the demo and the tests.

The ``make_*`` functions and ``populate`` create real fds of every kind for demos, tests and
benchmarks, including "vfio-like" device bundles modelled on QEMU vfio's device and irq fds.

No sockets are served here, no trio, no protocol.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import socket
import stat
import struct
from enum import IntEnum
from typing import NamedTuple

from .errors import BadFd, UsageError


class Kind(IntEnum):
    FILE = 1
    DIR = 2
    MEMFD = 3
    EVENTFD = 4
    PIPE = 5
    SOCKET = 6
    CHARDEV = 7
    BLOCKDEV = 8
    TIMERFD = 9
    SIGNALFD = 10
    PIDFD = 11
    INOTIFY = 12
    ANON = 13  # another anonymous-inode fd
    EPOLL = 14  # never stored

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Kind:
        try:
            return cls[label.upper()]
        except KeyError:
            raise UsageError(f"unknown fd kind {label!r}; known: {', '.join(k.label for k in cls)}") from None


# Open flags that F_SETFL may change while an fd is shared; everything else is fixed at open.
MUTABLE_FLAGS = os.O_NONBLOCK | os.O_APPEND | getattr(os, "O_ASYNC", 0o20000) | getattr(os, "O_DIRECT", 0) \
    | getattr(os, "O_NOATIME", 0)
_ANON_KINDS = {
    "[eventfd]": Kind.EVENTFD, "[timerfd]": Kind.TIMERFD, "[signalfd]": Kind.SIGNALFD,
    "[pidfd]": Kind.PIDFD, "inotify": Kind.INOTIFY, "[eventpoll]": Kind.EPOLL,
}


class Identity(NamedTuple):
    """The fingerprint of an fd (a tuple, so that 19,000 of them are cheap to build)."""

    kind: Kind
    mode: int
    dev: int
    ino: int
    flags: int

    def describe(self) -> dict:
        return {
            "kind": self.kind.label, "mode": self.mode, "dev": self.dev, "ino": self.ino,
            "flags": self.flags,
        }


KIND_BY_CODE: dict[int, Kind] = {int(k): k for k in Kind}


def _fstat(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as e:
        if e.errno == errno.EBADF:
            raise BadFd(f"fd {fd} is not open; pass an fd this process has open") from None
        raise BadFd(f"cannot fstat fd {fd}: {e.strerror}") from None


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def kind_of(fd: int, st: os.stat_result | None = None) -> Kind:
    st = st or _fstat(fd)
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        # A memfd links to "/memfd:NAME (deleted)"; a file really named so would still have a link count.
        return Kind.MEMFD if st.st_nlink == 0 and _link(fd).startswith("/memfd:") else Kind.FILE
    if fmt == stat.S_IFSOCK:
        return Kind.SOCKET
    if fmt == stat.S_IFIFO:
        return Kind.PIPE
    if fmt == stat.S_IFDIR:
        return Kind.DIR
    if fmt == stat.S_IFCHR:
        return Kind.CHARDEV
    if fmt == stat.S_IFBLK:
        return Kind.BLOCKDEV
    link = _link(fd)
    if link.startswith("anon_inode:"):
        return _ANON_KINDS.get(link[len("anon_inode:"):], Kind.ANON)
    return Kind.ANON


def identity_of(fd: int, kind: Kind) -> Identity:
    st = _fstat(fd)
    return Identity(kind, st.st_mode, st.st_dev, st.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & ~MUTABLE_FLAGS)


def classify(fd: int) -> Identity:
    """The identity of an fd that is about to enter a table. BadFd for closed or epoll fds."""
    st = _fstat(fd)
    kind = kind_of(fd, st)
    if kind is Kind.EPOLL:
        raise BadFd(
            f"fd {fd} is an epoll fd and cannot be stored: its interest list names this process's fd"
            " numbers, which mean nothing in another process; store the fds it watches instead and"
            " rebuild the epoll set where it is used"
        )
    return Identity(kind, st.st_mode, st.st_dev, st.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & ~MUTABLE_FLAGS)


def verify(fd: int, ident: Identity) -> str | None:
    """None when fd still matches ident; else a sentence naming the difference."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL) & ~MUTABLE_FLAGS
    except OSError as e:
        return f"fd {fd} cannot be read: {e.strerror}"
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(ident.mode):
        return f"file type {stat.S_IFMT(st.st_mode):o} != expected {stat.S_IFMT(ident.mode):o}"
    if st.st_dev != ident.dev or st.st_ino != ident.ino:
        return f"inode {st.st_dev}:{st.st_ino} != expected {ident.dev}:{ident.ino}"
    if flags != ident.flags:
        return f"open flags {flags:o} != expected {ident.flags:o}"
    return None


# -- proving "same open file description" ------------------------------------------------
_KCMP_NR = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "ppc64le": 354, "s390x": 343, "i686": 349}
_KCMP_FILE = 0
_libc = None


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool | None:
    """True/False if kcmp(KCMP_FILE) answers, None if it is unavailable or not permitted."""
    global _libc
    nr = _KCMP_NR.get(platform.machine())
    if nr is None:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    r = _libc.syscall(nr, pid1, pid2, _KCMP_FILE, fd1, fd2)
    if r < 0:
        return None
    return r == 0


def fdinfo(fd: int, pid: int | str = "self") -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def same_open_file(a: int, b: int, kind: Kind) -> tuple[bool, str]:
    """Prove that fds a and b (both in this process) are the same open file description.

    Returns (verdict, method). Uses kcmp(KCMP_FILE) where the kernel permits it, and the per-kind
    evidence as well: shared offset (files), eventfd-id, memfd bytes, socket/pipe inode and flags.
    """
    verdicts: list[tuple[bool, str]] = []
    k = kcmp_file(os.getpid(), a, os.getpid(), b)
    if k is not None:
        verdicts.append((k, "kcmp"))
    sa, sb = os.fstat(a), os.fstat(b)
    if kind in (Kind.FILE, Kind.MEMFD):
        pos = os.lseek(a, 0, os.SEEK_CUR)
        probe = pos + 7
        os.lseek(a, probe, os.SEEK_SET)
        moved = os.lseek(b, 0, os.SEEK_CUR) == probe
        os.lseek(a, pos, os.SEEK_SET)
        verdicts.append((moved and sa.st_ino == sb.st_ino, "shared offset"))
        if kind is Kind.MEMFD:
            verdicts.append((os.pread(a, 64, 0) == os.pread(b, 64, 0), "memfd bytes"))
    elif kind is Kind.EVENTFD:
        ia, ib = fdinfo(a), fdinfo(b)
        if "eventfd-id" in ia:
            verdicts.append((ia["eventfd-id"] == ib["eventfd-id"], "eventfd-id"))
        verdicts.append((ia.get("eventfd-count") == ib.get("eventfd-count"), "eventfd counter"))
    elif kind in (Kind.SOCKET, Kind.PIPE):
        same = (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and \
            fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)
        verdicts.append((same, "socket inode" if kind is Kind.SOCKET else "pipe inode+flags"))
    else:
        verdicts.append(((sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino), "inode"))
    ok = all(v for v, _ in verdicts)
    return ok, "+".join(m for _, m in verdicts)


# -- making real fds ---------------------------------------------------------------------
DEVICE_REGION_ID = 0
DEVICE_CMD_ID = 1
DEVICE_CMD_PEER_ID = 2
DEVICE_IRQ_BASE = 16
DEVICE_IRQS = 2
DEVICE_REGION_SIZE = 64 * 1024
DEVICE_REGION_MAGIC = b"CPRD-VFIO-REGION"
REGION_HEADER = struct.Struct("<16sII")  # magic, device number, region size

POPULATE_KEYS = ("files", "eventfds", "memfds", "pipes", "sockets", "devices")
FDS_PER = {"files": 1, "eventfds": 1, "memfds": 1, "pipes": 2, "sockets": 2, "devices": 3 + DEVICE_IRQS}


def file_content(i: int) -> bytes:
    return (f"cprd file {i}\n".encode() * 8)[:96]


def file_offset(i: int) -> int:
    return i % 89 + 1


def memfd_content(i: int) -> bytes:
    return struct.pack("<Q", i) + bytes((i + j) % 251 for j in range(248))


def _closing_on_error(fd: int, fill) -> int:
    try:
        fill(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_file(directory: str | int, i: int) -> int:
    """A regular file file-NNNNN in directory (a path, or an open directory fd), never through a
    symlink."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    if isinstance(directory, int):
        fd = os.open(f"file-{i:05d}", flags, 0o600, dir_fd=directory)
    else:
        fd = os.open(os.path.join(directory, f"file-{i:05d}"), flags, 0o600)
    return _closing_on_error(fd, lambda fd: (os.write(fd, file_content(i)),
                                             os.lseek(fd, file_offset(i), os.SEEK_SET)))


def make_eventfd(i: int) -> int:
    return os.eventfd(i + 1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def make_memfd(i: int) -> int:
    fd = os.memfd_create(f"cprd-mem-{i}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    return _closing_on_error(fd, lambda fd: os.write(fd, memfd_content(i)))


def make_region(n: int) -> int:
    fd = os.memfd_create(f"cprd-vfio-region-{n}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    return _closing_on_error(fd, lambda fd: (
        os.ftruncate(fd, DEVICE_REGION_SIZE),
        os.pwrite(fd, REGION_HEADER.pack(DEVICE_REGION_MAGIC, n, DEVICE_REGION_SIZE), 0)))


def device_name(n: int) -> str:
    return f"vfio/{n:04d}"


def make_device(n: int) -> list[tuple[str, int, int]]:
    """A vfio-like device: one name, distinct ids: a memfd region (mmap-able, known header), a
    SOCK_SEQPACKET command channel (both ends) and DEVICE_IRQS irq eventfds."""
    name = device_name(n)
    out = [(name, DEVICE_REGION_ID, make_region(n))]
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out.append((name, DEVICE_CMD_ID, a.detach()))
        out.append((name, DEVICE_CMD_PEER_ID, b.detach()))
        for k in range(DEVICE_IRQS):
            out.append((name, DEVICE_IRQ_BASE + k, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)))
    except BaseException:  # a half-made device (EMFILE, say) must not leak its first fds
        for _, _, fd in out:
            os.close(fd)
        raise
    return out


def parse_spec(spec: str) -> dict[str, int]:
    """Parse 'files=500,eventfds=300,...' into counts. UsageError names what is wrong."""
    out = dict.fromkeys(POPULATE_KEYS, 0)
    if not spec.strip():
        return out
    seen: set[str] = set()
    for part in spec.split(","):
        key, eq, val = part.strip().partition("=")
        if key not in out or not eq:
            raise UsageError(
                f"bad populate item {part!r}: expected KIND=COUNT with KIND one of {', '.join(POPULATE_KEYS)}"
                " (example: files=500,eventfds=300,devices=10)"
            )
        if key in seen:
            raise UsageError(f"populate names {key} twice ({spec!r}); give each kind once")
        seen.add(key)
        try:
            n = int(val)
        except ValueError:
            raise UsageError(f"bad count {val!r} for {key}: expected a whole number") from None
        if n < 0:
            raise UsageError(f"count for {key} must not be negative, got {n}")
        out[key] = n
    return out


def spec_fds(counts: dict[str, int]) -> int:
    return sum(FDS_PER[k] * n for k, n in counts.items())


def mixed_spec(total: int) -> dict[str, int]:
    """A mix of every kind with about `total` fds (files 40%, eventfds 25%, the rest spread)."""
    devices = max(1, total // 40)
    pipes = sockets = max(1, total // 20)
    memfds = max(1, total // 20)
    eventfds = max(1, total // 4)
    used = devices * FDS_PER["devices"] + 2 * pipes + 2 * sockets + memfds + eventfds
    return {"files": max(0, total - used), "eventfds": eventfds, "memfds": memfds, "pipes": pipes,
            "sockets": sockets, "devices": devices}


def populate(counts: dict[str, int], directory: str | int) -> list[tuple[str, int, int]]:
    """Create real fds; return (name, id, fd) triples. Regular files go into directory: a path
    (created 0700 if missing), or an open directory fd that the caller has checked. On error,
    closes what it made and re-raises."""
    made: list[tuple[str, int, int]] = []
    try:
        if counts.get("files") and not isinstance(directory, int):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        for i in range(counts.get("files", 0)):
            made.append(("file", i, make_file(directory, i)))
        for i in range(counts.get("eventfds", 0)):
            made.append(("eventfd", i, make_eventfd(i)))
        for i in range(counts.get("memfds", 0)):
            made.append(("memfd", i, make_memfd(i)))
        for i in range(counts.get("pipes", 0)):
            r, w = os.pipe2(os.O_CLOEXEC)
            made += [("pipe", 2 * i, r), ("pipe", 2 * i + 1, w)]
            os.write(w, f"pipe {i}\n".encode())
        for i in range(counts.get("sockets", 0)):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            made += [("socket", 2 * i, a.detach()), ("socket", 2 * i + 1, b.detach())]
        for n in range(counts.get("devices", 0)):
            made += make_device(n)
    except BaseException:
        for _, _, fd in made:
            os.close(fd)
        raise
    return made


def check_populated(name: str, id: int, fd: int) -> str | None:
    """For an fd made by populate(): None if it still holds the state populate gave it (content,
    offset, counter, header), else what differs. Reads without disturbing offsets or counters."""
    if name == "file":
        want = file_content(id)
        if os.pread(fd, len(want) + 1, 0) != want:
            return "file content differs"
        if os.lseek(fd, 0, os.SEEK_CUR) != file_offset(id):
            return f"file offset {os.lseek(fd, 0, os.SEEK_CUR)} != {file_offset(id)}"
    elif name == "eventfd":
        count = int(fdinfo(fd).get("eventfd-count", "-1"), 16)
        if count != id + 1:
            return f"eventfd counter {count} != {id + 1}"
    elif name == "memfd":
        want = memfd_content(id)
        if os.pread(fd, len(want), 0) != want:
            return "memfd bytes differ"
    elif name.startswith("vfio/") and id == DEVICE_REGION_ID:
        magic, n, size = REGION_HEADER.unpack(os.pread(fd, REGION_HEADER.size, 0))
        if magic != DEVICE_REGION_MAGIC or device_name(n) != name or size != DEVICE_REGION_SIZE:
            return f"device region header differs: {magic!r} {n} {size}"
    return None


def spec_string(counts: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in counts.items() if v)
