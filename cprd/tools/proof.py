"""Proving that two fds are the same open file description, and that a populated fd still holds
what populate gave it: for `cprd demo` and the tests.

kcmp(KCMP_FILE) answers for any two fds of two processes (with ptrace-read permission); per kind,
a shared offset (files, memfds), the eventfd-id and counter, memfd bytes, the socket or pipe inode
and flags add evidence. What this module may know: fds, /proc, the kcmp syscall.
"""

from __future__ import annotations

import fcntl
import os

from .. import proc
from ..kinds import Kind
from ..populate import (DEVICE_REGION_ID, DEVICE_REGION_MAGIC, DEVICE_REGION_SIZE, REGION_HEADER, device_name,
                        file_content, file_offset, memfd_content)

def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool | None:
    """True/False if kcmp(KCMP_FILE) answers, None if it is unavailable or not permitted."""
    r = proc.kcmp_file(pid1, fd1, pid2, fd2)
    return None if r < 0 else r == 0


fdinfo = proc.fdinfo


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
