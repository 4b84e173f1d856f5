"""What an fd is: classify it, fingerprint its identity, verify it.

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
description* needs more (kcmp): that is ``cprd.tools.proof``, for the demo and the tests.

What this module may know: an fd's metadata (fstat, fcntl F_GETFL, its /proc/self/fd link). No
sockets, no trio, no protocol; it makes no fds (``cprd.populate`` does).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from enum import IntEnum
from typing import NamedTuple

from . import proc
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

    def to_json(self) -> list[int]:
        """[kind code, mode, dev, ino, flags]: how an identity travels in JSON (an upgrade's state
        and journal); ``from_json`` is its inverse. The handoff protocol has its binary record."""
        return [int(self.kind), self.mode, self.dev, self.ino, self.flags]

    @classmethod
    def from_json(cls, v: object) -> Identity:
        """ValueError unless v is what to_json makes (callers say which record it was)."""
        try:
            kind, mode, dev, ino, flags = v  # type: ignore[misc]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (kind, mode, dev, ino, flags)):
                raise TypeError
            return cls(KIND_BY_CODE[kind], mode, dev, ino, flags)
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"not an fd identity: {v!r:.120}") from None


KIND_BY_CODE: dict[int, Kind] = {int(k): k for k in Kind}


def _fstat(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as e:
        if e.errno == errno.EBADF:
            raise BadFd(f"fd {fd} is not open; pass an fd this process has open") from None
        raise BadFd(f"cannot fstat fd {fd}: {e.strerror}") from None


def _link(fd: int) -> str:
    return proc.fd_path(fd)


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
