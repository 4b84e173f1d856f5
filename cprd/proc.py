"""What cprd asks the kernel about processes and their fds: /proc, pidfds, kcmp, fencing.

One home for each of: a process's state, parent and group (/proc/PID/stat); who holds an inode
(/proc/PID/fd); how many fds this process has open; pidfds (open, signal, poll); kcmp(KCMP_FILE)
and pidfd_getfd; a process's name; and fencing: SIGKILL a process given up on, and wait (bounded)
for it to end. A pidfd pins the process it names, so a signal sent through one never reaches
another process that reused the pid: every kill here goes through one, or to a child of ours,
whose pid cannot be reused before we reap it.

What this module may know: the kernel's interfaces. No trio (the guardian and a new program use it
before trio is imported), no sockets, no tables.
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import signal
import time

_KCMP = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "ppc64le": 354, "s390x": 343, "i686": 349}
_KCMP_FILE = 0
_PIDFD_GETFD = 438  # the same number on every architecture (Linux 5.6)
_PR_SET_NAME = 15
# What a service manager sends to reload or stop a daemon: blocked across an upgrade's exec until the
# new program's handlers are in place (the mask survives execve, handlers do not)
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


# -- /proc ------------------------------------------------------------------------------------------
def stat_of(pid: int | str) -> tuple[str, int, int] | None:
    """(state letter, parent pid, process group) of a process, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot): with its pid, it names one process for
    good (a pid reused later has another start)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Whether process `pid` runs (a zombie does not). Only a pidfd or a child's pid names one
    process for good; this is for what a pid cannot mislead (our own children, tests)."""
    if not pid:
        return False
    st = stat_of(pid)
    return st is not None and st[0] not in ("Z", "X")


def is_child(pid: int | None) -> bool:
    """Whether `pid` is a child of this process (not yet reaped: its pid cannot be reused)."""
    st = stat_of(pid) if pid else None
    return st is not None and st[1] == os.getpid()


def fd_path(fd: int, pid: int | str = "self") -> str:
    """What /proc says fd `fd` of `pid` is (a path, "anon_inode:[eventfd]", "socket:[N]"...), or ""."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def fdinfo(fd: int, pid: int | str = "self") -> dict[str, str]:
    """The fields of /proc/PID/fdinfo/FD (pos, flags, eventfd-count, eventfd-id...)."""
    out = {}
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def capabilities() -> int:
    """This process's effective capabilities (a bit mask: 1 << CAP_*), 0 if /proc will not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def sysctl_int(name: str) -> int | None:
    """An integer sysctl (e.g. net.core.somaxconn), or None if it cannot be read."""
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def fd_count() -> int:
    """How many fds this process has open (listing /proc/self/fd: about 1 ms a thousand fds)."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the fd listdir itself opened


def close_all_but(keep: set[int]) -> None:
    """Close every fd of this process above 2 that is not in `keep` (a fork that must hold only
    what it was made for). The listing's own fd is left alone (another thread may open one under
    that number as soon as it is freed)."""
    d = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = os.listdir(d)
    finally:
        os.close(d)
    for name in names:
        fd = int(name)
        if fd > 2 and fd != d and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def group_members(pgid: int) -> set[int]:
    """The processes whose process group is `pgid` (a scan of /proc)."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat_of(name)
            if st is not None and st[2] == pgid:
                out.add(int(name))
    return out


def holds(pid: int | str, ident: tuple[int, int]) -> bool:
    """Whether process `pid` has an fd open on the inode `ident` (st_dev, st_ino)."""
    return holds_any(pid, {ident})


def holds_any(pid: int | str, idents: set[tuple[int, int]]) -> bool:
    """Whether process `pid` has an fd open on one of the inodes `idents` (st_dev, st_ino)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for n in names:
        try:
            st = os.stat(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in idents:
            return True
    return False


def holders(ident: tuple[int, int], exclude: set[int]) -> list[int]:
    """Every process but `exclude` that holds the inode `ident` (a scan of /proc: slow, for a fault
    path only)."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) not in exclude and holds(n, ident)]


def kill_holders(ident: tuple[int, int], exclude: set[int]) -> list[int]:
    """SIGKILL every process but `exclude` that holds the inode `ident`, each through a pidfd
    opened before it is checked again (so that a pid reused meanwhile is never hit). Returns their
    pids."""
    killed = []
    for pid in holders(ident, exclude):
        pidfd = pidfd_open(pid)
        if pidfd is None:
            continue
        try:
            if holds(pid, ident):
                signal_pidfd(pidfd, signal.SIGKILL)
                killed.append(pid)
        finally:
            os.close(pidfd)
    return killed


# -- pidfds ---------------------------------------------------------------------------------------
def pidfd_open(pid: int | None) -> int | None:
    """A pidfd of `pid` (close-on-exec), or None if there is no such process (or none may be had)."""
    if not pid:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def signal_pidfd(pidfd: int | None, sig: int) -> bool:
    if pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False


def ended(pidfd: int | None) -> bool:
    """Whether the process of `pidfd` has ended (now: no wait). None: nothing to wait for."""
    if pidfd is None:
        return True
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def wait_ended(pidfd: int | None, timeout: float) -> bool:
    """Wait at most `timeout` seconds for the process of `pidfd` to end; whether it did."""
    if pidfd is None:
        return True
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return bool(p.poll(max(0.0, left) * 1000))
        except InterruptedError:
            if left <= 0:
                return False


def kill(pidfd: int | None, pid: int | None = None, group: int | None = None) -> None:
    """SIGKILL a process through its pidfd (else through `pid`, which must be a child of ours),
    and its process group `group` if given. From this instant it runs no instruction of its own:
    a stopped process dies at once, a frozen one when it is thawed (before it runs again)."""
    if not signal_pidfd(pidfd, signal.SIGKILL) and pid and is_child(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if group:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass


def lowest_priority() -> None:
    """Run only when nothing else wants the CPU (SCHED_IDLE, else nice 19): for a process about to
    exit whose teardown (thousands of fds, a large copy-on-write memory) would otherwise take CPU
    from the daemon that serves."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except OSError:
            pass


def start_thread(thread) -> None:
    """Start a threading.Thread with every signal blocked (it keeps the mask it is born with). A
    signal sent to the process then reaches the main thread only, whose mask an upgrade holds across
    its exec (docs/protocol.md 6.7): otherwise the kernel may hand a reload to a helper thread, whose
    Python handler would queue it in a loop that never runs again."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def reap(pid: int | None) -> bool:
    """Collect a child that has ended (no wait); whether it was collected (or is not ours)."""
    if not pid:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return bool(done)


# -- kcmp, pidfd_getfd, names -------------------------------------------------------------------------
def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> int:
    """kcmp(KCMP_FILE): 0 the same open file description, 1 the first orders before, 2 after, 3
    different and unordered; -1 where the kernel will not tell (refused, unknown architecture)."""
    nr = _KCMP.get(platform.machine())
    if nr is None:
        return -1
    r = _c().syscall(nr, pid1, pid2, _KCMP_FILE, fd1, fd2)
    return r if r >= 0 else -1


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy, in this process (close-on-exec), of fd `fd` of the process of `pidfd`. OSError if the
    kernel refuses (ptrace permission) or there is no such fd."""
    r = _c().syscall(_PIDFD_GETFD, pidfd, fd, 0)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"pidfd_getfd of fd {fd}: {os.strerror(e)}")
    return r


def set_name(name: str) -> None:
    """The name ps and top show for this process (15 bytes at most), for an operator to tell a
    stand-in or a guardian from the daemon."""
    _c().prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
