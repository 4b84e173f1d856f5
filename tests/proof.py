"""Evidence the kernel gives that a daemon holds the very open file descriptions it should.

kcmp(KCMP_FILE) compares two fds, in any two processes (ptrace-read permission: the tests run as
root), and answers whether they are the same open file description: it tells two eventfds apart,
which share one inode, as no fstat can. pidfd_getfd(2) takes a copy of an fd out of another
process. Together they let a test hold the source's fds before a handoff and ask the kernel, entry
by entry, whether the target serves the same ones: no use of cprd's own account of its table
(`ls` gives only each entry's fd number in the daemon).

These helpers raise when the kernel cannot answer: a proof is never downgraded silently. Tests
that need them declare ``@pytest.mark.requires("kcmp")``.
"""

from __future__ import annotations

import os

from cprd import proc
from cprd.client import Client


class NoProof(AssertionError):
    """The kernel could not give the evidence a test needs."""


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """True when fd1 of pid1 and fd2 of pid2 are the same open file description (cprd.proc's kcmp)."""
    r = proc.kcmp_file(pid1, fd1, pid2, fd2)
    if r < 0:
        raise NoProof(f"kcmp({pid1}, {fd1}, {pid2}, {fd2}) was refused (no ptrace permission, or a seccomp "
                      "profile)")
    return r == 0


def kcmp_works() -> bool:
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.dup(a)
    try:
        return kcmp_file(os.getpid(), a, os.getpid(), b)
    except NoProof:
        return False
    finally:
        os.close(a)
        os.close(b)


def take_fd(pid: int, fd: int) -> int:
    """A copy, in this process, of fd `fd` of process `pid` (the same open file description)."""
    pidfd = os.pidfd_open(pid)
    try:
        return proc.pidfd_getfd(pidfd, fd)
    except OSError as e:
        raise NoProof(f"pidfd_getfd({pid}, {fd}) failed: {e.strerror}") from None
    finally:
        os.close(pidfd)


class Copies:
    """Our own copy of every entry a daemon serves, taken out of the daemon with pidfd_getfd (no
    request through cprd but `ls`, for the fd numbers). Close with close() or a with block."""

    def __init__(self, control: str, pid: int, trust_uids: tuple[int, ...] = ()) -> None:
        with Client(control, trust_uids=trust_uids) as c:
            entries = c.ls()
        self.fds: dict[tuple[str, int], int] = {}
        try:
            for e in entries:
                self.fds[(e["name"], e["id"])] = take_fd(pid, e["fd"])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> Copies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.fds)

    def prove(self, control: str, pid: int, keys: set | None = None, trust_uids: tuple[int, ...] = ()) -> int:
        """Assert, by kcmp, that the daemon `pid` serving `control` holds exactly the same open file
        description as our copy for every key in `keys` (default: all of ours), and that it serves
        exactly those keys. Returns how many were proved."""
        want = set(self.fds) if keys is None else set(keys)
        with Client(control, trust_uids=trust_uids) as c:
            entries = c.ls()
        served = {(e["name"], e["id"]): e["fd"] for e in entries}
        assert set(served) >= want, f"keys missing: {sorted(want - set(served))[:10]}"
        me = os.getpid()
        wrong = [k for k in sorted(want) if not kcmp_file(pid, served[k], me, self.fds[k])]
        assert not wrong, f"{len(wrong)} entries are not the same open file description: {wrong[:10]}"
        return len(want)
