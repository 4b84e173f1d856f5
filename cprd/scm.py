"""The one place that moves fds over a socket (SCM_RIGHTS), for trio and for blocking sockets.

Rules it keeps:
- receive with recvmsg(..., MSG_CMSG_CLOEXEC) and an ancillary buffer sized for the fds the
  protocol allows in one message (at most 253, SCM_MAX_FD);
- MSG_CTRUNC means the kernel dropped fds we will never see (buffer too small, or we hit
  RLIMIT_NOFILE): the message fails, and the fds that did arrive are closed;
- MSG_TRUNC (a message longer than the buffer) fails the same way;
- every fd that arrives is wrapped in OwnedFds at once, so an error closes it;
- a message with more fds than SCM_MAX_FD is refused before sendmsg (the kernel says EINVAL);
- a peer that closed while our messages sat unread in its queue makes the kernel report
  ECONNRESET once, *before* the messages that peer had queued for us: those are still read (a
  source that dies mid-handoff leaves batches a target must not lose), and only the end of the
  queue is the end of the connection.
"""

from __future__ import annotations

import array
import errno
import socket
from typing import Any

from . import limits
from .errors import CapacityError, Closed, ProtocolError
from .fds import OwnedFds

SCM_MAX_FD = limits.SCM_MAX_FD
_INT = array.array("i").itemsize


def ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"{len(fds)} fds in one message; the kernel allows {SCM_MAX_FD}")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def anc_space(max_fds: int) -> int:
    return socket.CMSG_SPACE(max(1, max_fds) * _INT)


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> OwnedFds:
    """The fds a recvmsg received (SCM_RIGHTS), owned at once."""
    fds = OwnedFds()
    for level, type_, blob in ancdata:
        if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(blob[: len(blob) - len(blob) % _INT])
            fds.fds.extend(arr)
    return fds


def unpack(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, what: str) -> tuple[bytes, OwnedFds]:
    """Turn one recvmsg result into (data, owned fds), failing on truncation."""
    fds = fds_of(ancdata)
    if flags & socket.MSG_CTRUNC:
        fds.close()
        raise CapacityError(
            f"{what}: the kernel truncated the fds of a message (MSG_CTRUNC): more fds than allowed in one"
            " message, or this process is at its fd limit (RLIMIT_NOFILE); the fds it dropped are gone"
            " from this side only"
        )
    if flags & socket.MSG_TRUNC:
        fds.close()
        raise ProtocolError(f"{what}: message larger than the protocol allows (MSG_TRUNC)")
    if not data and not fds:
        raise Closed(f"{what}: the peer closed the connection")
    return data, fds


def _send_error(e: OSError, what: str) -> Exception:
    if e.errno == errno.ETOOMANYREFS:
        return CapacityError(f"{what}: too many fds in flight for this user (ETOOMANYREFS); "
                             "use a smaller window or raise RLIMIT_NOFILE")
    if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
        return Closed(f"{what}: the peer closed the connection ({e.strerror})")
    return e


async def send(sock: Any, data: bytes, fds: list[int] = (), what: str = "send") -> None:  # type: ignore[assignment]
    """Send one message with fds on a trio socket (SOCK_SEQPACKET: all or nothing)."""
    try:
        n = await sock.sendmsg([data], ancillary(list(fds)))
    except OSError as e:
        raise _send_error(e, what) from None
    if n != len(data):  # cannot happen on SOCK_SEQPACKET; a stream socket would need a loop
        raise ProtocolError(f"{what}: partial send of {n} of {len(data)} bytes")


async def recv(sock: Any, max_bytes: int, max_fds: int, what: str = "recv") -> tuple[bytes, OwnedFds]:
    """Receive one message on a trio socket: (data, owned fds). Closed on EOF."""
    for reset in (False, True):
        try:
            # room for SCM_MAX_FD whatever the protocol allows: the kernel closes (in this thread: a
            # close that may block) whatever does not fit; what arrives is the caller's to refuse
            data, anc, flags, _ = await sock.recvmsg(max_bytes + 1, anc_space(SCM_MAX_FD), socket.MSG_CMSG_CLOEXEC)
            return unpack(data, anc, flags, what)
        except (ConnectionResetError, BrokenPipeError) as e:
            if reset or isinstance(e, BrokenPipeError):
                raise Closed(f"{what}: the connection broke ({e.strerror})") from None
            # reported once, ahead of what the peer queued before it closed: read on
    raise AssertionError("unreachable")


def drop_queued(fd: int) -> None:
    """Read and drop every message already queued on a socket, never waiting. The fds a message
    carried are received and closed like any fd a client gave (fds.close_later: the close of one
    may block), never left for the kernel to close in this thread. Closing a UNIX socket with
    unread messages resets the peer's connection; dropping them first lets a peer that spoke
    first still read our last word."""
    sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
    try:
        reset_seen = False
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(1 << 16, anc_space(SCM_MAX_FD),
                                               socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except ConnectionResetError:  # reported once, ahead of what the peer had queued: drop that too
                if reset_seen:
                    return
                reset_seen = True
                continue
            except OSError:  # nothing (more) queued: EAGAIN
                return
            fds_of(anc).close()
            if not data and not anc:
                return
    finally:
        sock.detach()


def send_nowait(sock: socket.socket | int, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    """One message with fds on a blocking or non-blocking socket (or a raw fd), never waiting:
    BlockingIOError when its queue is full, OSError when the peer is gone."""
    if isinstance(sock, int):
        s = socket.socket(fileno=sock)
        try:
            s.sendmsg([data], ancillary(list(fds)), socket.MSG_DONTWAIT)
        finally:
            s.detach()
        return
    sock.sendmsg([data], ancillary(list(fds)), socket.MSG_DONTWAIT)


def recv_nowait(sock: socket.socket, max_bytes: int, *,
                creds: bool = False) -> tuple[bytes, OwnedFds, int, bytes | None]:
    """One message queued on a socket, never waiting: (data, its fds (owned), msg flags, the
    SCM_CREDENTIALS blob if asked for and sent). BlockingIOError when nothing is queued; b"" and no
    fds at the end. Room for SCM_MAX_FD fds is always made, so that the kernel never drops (and
    closes here) fds a peer sent beyond what the protocol allows: they arrive and are the caller's
    to refuse. The one-time ECONNRESET of a peer that closed with our messages unread is skipped
    (what it queued before it closed is still read, as in recv)."""
    space = anc_space(SCM_MAX_FD) + (socket.CMSG_SPACE(12) if creds else 0)
    for reset in (False, True):
        try:
            data, anc, flags, _ = sock.recvmsg(max_bytes, space, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            break
        except ConnectionResetError:
            if reset:
                return b"", OwnedFds(), 0, None
    blob = None
    if creds:
        for level, type_, b in anc:
            if level == socket.SOL_SOCKET and type_ == socket.SCM_CREDENTIALS:
                blob = b
    return data, fds_of(anc), flags, blob


def send_sync(sock: socket.socket, data: bytes, fds: list[int] = (), what: str = "send") -> None:  # type: ignore[assignment]
    try:
        n = sock.sendmsg([data], ancillary(list(fds)))
    except OSError as e:
        raise _send_error(e, what) from None
    if n != len(data):
        raise ProtocolError(f"{what}: partial send of {n} of {len(data)} bytes")


def recv_sync(sock: socket.socket, max_bytes: int, max_fds: int, what: str = "recv") -> tuple[bytes, OwnedFds]:
    for reset in (False, True):
        try:
            data, anc, flags, _ = sock.recvmsg(max_bytes + 1, anc_space(SCM_MAX_FD), socket.MSG_CMSG_CLOEXEC)
            return unpack(data, anc, flags, what)
        except (ConnectionResetError, BrokenPipeError) as e:
            if reset or isinstance(e, BrokenPipeError):
                raise Closed(f"{what}: the connection broke ({e.strerror})") from None
            # reported once, ahead of what the peer queued before it closed: read on
    raise AssertionError("unreachable")
