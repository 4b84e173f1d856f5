"""Speaking systemd's service protocols without libsystemd: sd_notify(3) and sd_listen_fds(3).

Theory of operation
-------------------
Both protocols are plain conventions over the environment and one datagram, so this module needs
only the standard library (no trio: a daemon calls it from its event loop, a test from anywhere).

* **Notify** (sd_notify(3)): the service manager sets ``$NOTIFY_SOCKET`` to an ``AF_UNIX``
  ``SOCK_DGRAM`` address, a filesystem path or, when it starts with ``@``, a name in the abstract
  namespace. A notification is one datagram of newline-separated ``NAME=value`` assignments
  (``READY=1``, ``STATUS=...``, ``RELOADING=1``, ``STOPPING=1``, ``MAINPID=...``). The manager learns
  the sender's pid from the kernel (``SO_PASSCRED``) and applies the unit's ``NotifyAccess=``. Without
  ``$NOTIFY_SOCKET`` nobody listens, and every call here is a cheap no-op that returns False.
  Notification is best effort: a manager that is gone or not reading costs a debug log line, never
  an exception, and never blocks the caller for more than ``SEND_TIMEOUT`` seconds.

* **Socket activation** (sd_listen_fds(3), systemd.socket(5)): the manager passes ``$LISTEN_FDS``
  open fds starting at fd 3 (``SD_LISTEN_FDS_START``), ``$LISTEN_PID`` (the pid they are meant for:
  a child that inherited the environment must ignore them) and optionally ``$LISTEN_FDNAMES``
  (colon-separated, from ``FileDescriptorName=``). The fds arrive without close-on-exec; we set it,
  and by default remove the three variables so that no child process inherits them.

What this module may know: the environment, fd numbers, and socket options. It knows nothing of
tables, handoffs or the control protocol; ``control_listener_from_env`` only answers "did systemd
hand us a listening control socket?".
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping

from . import limits
from .errors import UsageError

log = logging.getLogger("cprd.sdnotify")

SD_LISTEN_FDS_START = 3
SEND_TIMEOUT = 2.0  # seconds a notification may wait for room in the manager's queue
CONTROL_FDNAME = "control"
DEFAULT_FDNAME = "unknown"  # the name sd_listen_fds_with_names(3) gives fds without LISTEN_FDNAMES

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


# -- sd_notify -------------------------------------------------------------------------------
def _address(value: str) -> str | None:
    """The sockaddr_un path for a $NOTIFY_SOCKET value, or None if we cannot speak to it."""
    if value.startswith("@"):
        addr = "\0" + value[1:]
    elif value.startswith("/"):
        addr = value
    else:  # e.g. "vsock:CID:PORT" (newer systemd), or a relative path, which sd_notify refuses too
        return None
    if len(addr.encode()) > limits.UNIX_PATH_MAX or len(value) < 2:
        return None
    return addr


def notify(*fields: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send one notification datagram made of fields ("NAME=value" each) to $NOTIFY_SOCKET.

    True when the datagram was sent; False when $NOTIFY_SOCKET is unset (not run by a service
    manager that listens) or the socket cannot be reached (logged at debug). A malformed field is
    a programming error: UsageError."""
    if not fields:
        raise UsageError("sd_notify needs at least one NAME=value field, e.g. READY=1")
    for f in fields:
        name, eq, _ = f.partition("=")
        if not eq or not name or "\n" in f or "\0" in f:
            raise UsageError(f"sd_notify field {f!r} must be one line of the form NAME=value")
    target = env.get("NOTIFY_SOCKET")
    if not target:
        return False
    addr = _address(target)
    if addr is None:
        log.debug("event=notify_skipped notify_socket=%r reason=unsupported_address", target)
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SEND_TIMEOUT)
            s.sendto(message, socket.MSG_NOSIGNAL, addr)
    except OSError as e:  # missing or closed socket, not permitted, queue full past the timeout
        log.debug("event=notify_failed notify_socket=%r error=%r fields=%r", target,
                  str(e) or type(e).__name__, fields)
        return False
    log.debug("event=notified notify_socket=%r fields=%r", target, fields)
    return True


def _one_line(text: str) -> str:
    return " ".join(str(text).replace("\0", " ").splitlines())


def _with_status(fields: list[str], text: str | None) -> list[str]:
    if text is not None:
        fields.append(f"STATUS={_one_line(text)}")
    return fields


def ready(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """READY=1 (start-up or reload finished), with an optional STATUS= line."""
    return notify(*_with_status(["READY=1"], status), env=env)


def reloading(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC in microseconds, as Type=notify-reload
    requires to match the reload with its request); send ready() when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(*_with_status(["RELOADING=1", f"MONOTONIC_USEC={usec}"], status), env=env)


def status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """STATUS=text: a one-line state shown by `systemctl status` (newlines become spaces)."""
    return notify(f"STATUS={_one_line(text)}", env=env)


def mainpid(pid: int, *, env: Mapping[str, str] = os.environ) -> bool:
    """MAINPID=pid: tell the manager which process is now the service's main process. Accepted
    from a process other than the current main one only with NotifyAccess=all."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise UsageError(f"MAINPID must be a positive pid, not {pid!r}")
    return notify(f"MAINPID={pid}", env=env)


def stopping(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """STOPPING=1: the service is shutting down."""
    return notify(*_with_status(["STOPPING=1"], status), env=env)


# -- sd_listen_fds ---------------------------------------------------------------------------
def listen_fds(env: MutableMapping[str, str] = os.environ, unset: bool = True) -> list[tuple[int, str]]:
    """The fds passed by socket activation, as [(fd, name)], fds from 3 up; [] when none were
    passed to this process (no LISTEN_PID, or LISTEN_PID names another process).

    Sets close-on-exec on every passed fd. With unset (the default), removes LISTEN_PID,
    LISTEN_FDS and LISTEN_FDNAMES from env whatever the outcome, as sd_listen_fds(1) does, so that
    children never mistake them for theirs. Malformed values raise UsageError."""
    try:
        return _parse_listen_fds(env)
    finally:
        if unset:
            for var in _LISTEN_VARS:
                env.pop(var, None)


def _parse_listen_fds(env: Mapping[str, str]) -> list[tuple[int, str]]:
    pid_s = env.get("LISTEN_PID")
    if pid_s is None:
        return []
    try:
        pid = int(pid_s)
        if pid <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"LISTEN_PID={pid_s!r} is not a pid; socket activation sets it to the pid the fds "
                         "are meant for") from None
    if pid != os.getpid():
        log.debug("event=listen_fds_ignored listen_pid=%d pid=%d", pid, os.getpid())
        return []
    n_s = env.get("LISTEN_FDS")
    if n_s is None:
        return []
    try:
        n = int(n_s)
        if n < 0 or n > 1 << 20:
            raise ValueError
    except ValueError:
        raise UsageError(f"LISTEN_FDS={n_s!r} is not a count of fds; socket activation sets it to the number "
                         f"of fds passed from fd {SD_LISTEN_FDS_START} up") from None
    names_s = env.get("LISTEN_FDNAMES")
    if names_s is None:
        names = [DEFAULT_FDNAME] * n
    else:
        names = names_s.split(":") if n else []
        if len(names) != n:
            raise UsageError(f"LISTEN_FDNAMES={names_s!r} names {len(names)} fds but LISTEN_FDS={n}; they "
                             "must agree (one colon-separated name per fd)")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as e:
            raise UsageError(f"LISTEN_FDS={n} but fd {fd} is not open ({e.strerror}); the process that "
                             "started cprd passed a wrong count") from None
    return list(zip(fds, names))


# -- the control socket from socket activation -------------------------------------------------
_FAMILIES = {socket.AF_UNIX: "AF_UNIX", socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6"}
_TYPES = {socket.SOCK_STREAM: "SOCK_STREAM", socket.SOCK_DGRAM: "SOCK_DGRAM",
          socket.SOCK_SEQPACKET: "SOCK_SEQPACKET", socket.SOCK_RAW: "SOCK_RAW"}


def _inspect(fd: int) -> tuple[bool, str]:
    """(is a listening AF_UNIX SOCK_SEQPACKET socket, what the fd is in words)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        return False, f"not open ({e.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        mode = st.st_mode
        what = ("a pipe or FIFO" if stat.S_ISFIFO(mode) else "a regular file" if stat.S_ISREG(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a directory" if stat.S_ISDIR(mode)
                else f"not a socket (mode {mode:o})")
        return False, what
    s = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
    try:
        family = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        type_ = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError as e:
        return False, f"a socket that cannot be inspected ({e.strerror})"
    finally:
        s.detach()
    ok = family == socket.AF_UNIX and type_ == socket.SOCK_SEQPACKET and listening
    what = (f"a {'listening' if listening else 'non-listening'} {_FAMILIES.get(family, f'family {family}')} "
            f"{_TYPES.get(type_, f'type {type_}')} socket")
    if family == socket.AF_UNIX and type_ == socket.SOCK_SEQPACKET and not listening:
        what += " (a connection: the .socket unit has Accept=yes)"
    return ok, what


def control_listener_from_env(path: str, env: MutableMapping[str, str] = os.environ) -> socket.socket | None:
    """The listening control socket systemd passed by socket activation, or None when no fds were
    passed to this process.

    Picks the fd named "control" (FileDescriptorName=control) or, when exactly one fd was passed,
    that one; it must be a listening AF_UNIX SOCK_SEQPACKET socket. Returned as a blocking
    socket.socket that owns the fd. The bound path is not checked against `path` (a .socket unit
    may listen elsewhere than cprd's default); `path` only appears in messages. Any other passed
    fds are left open (close-on-exec). When fds were passed but none fits: UsageError saying what
    was found and how to fix the unit."""
    fds = listen_fds(env)
    if not fds:
        return None
    named = [(fd, name) for fd, name in fds if name == CONTROL_FDNAME]
    candidates = named or (fds if len(fds) == 1 else [])
    found = []
    chosen = None
    for fd, name in fds:
        ok, what = _inspect(fd)
        found.append(f"fd {fd} named {name!r}: {what}")
        if ok and chosen is None and (fd, name) in candidates:
            chosen = fd
    if chosen is None:
        if not candidates:
            why = (f"{len(fds)} fds were passed and none is named {CONTROL_FDNAME!r}; add "
                   f"FileDescriptorName={CONTROL_FDNAME} to the .socket unit of cprd's control socket")
        else:
            why = ("none is a listening AF_UNIX SOCK_SEQPACKET socket; the .socket unit must say "
                   f"ListenSequentialPacket={path} (not ListenStream= or ListenDatagram=), Accept=no and "
                   f"FileDescriptorName={CONTROL_FDNAME}")
        raise UsageError(f"socket activation passed LISTEN_FDS={len(fds)} ({'; '.join(found)}) but {why}; or "
                         "start cprd without socket activation and let it bind the control socket itself")
    for fd, name in fds:
        if fd != chosen:
            log.warning("event=listen_fd_ignored fd=%d name=%r", fd, name)
    sock = socket.socket(fileno=chosen)
    sock.setblocking(True)
    try:
        bound = sock.getsockname()
    except OSError:
        bound = ""
    if isinstance(bound, bytes):  # abstract or unnamed
        bound = bound.decode(errors="replace")
    log.info("event=control_socket_from_systemd fd=%d bound=%s control=%s", chosen, bound or "?", path)
    return sock
