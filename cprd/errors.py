"""The one exception hierarchy of cprd.

Every message says what happened and what the user can do about it. Each class has a short stable
``code`` that travels in control-protocol error replies, so a client can re-raise the same class.
"""

from __future__ import annotations


class CprdError(Exception):
    """Base of every error cprd raises on purpose."""

    code = "error"
    reported = False  # True on an error a daemon reported in its reply (a client never retries one)


class BadKey(CprdError):
    """A (name, id) key that breaks the naming rules."""

    code = "bad-key"


class KeyExists(CprdError):
    """save() of a key that is already in the table (without replace)."""

    code = "exists"


class KeyMissing(CprdError):
    """find/delete of a key that is not in the table."""

    code = "missing"


class BadFd(CprdError):
    """An fd that cannot be stored: closed, or of a kind cprd refuses (epoll)."""

    code = "bad-fd"


class ProtocolError(CprdError):
    """Bytes on a socket that do not follow the handoff or control protocol."""

    code = "protocol"


class Closed(ProtocolError):
    """The peer closed the connection (EOF) or it broke."""

    code = "closed"


class CapacityError(CprdError):
    """Not enough room for fds (RLIMIT_NOFILE) in the process that would receive them."""

    code = "capacity"


class HandoffError(CprdError):
    """A handoff that did not complete; the source keeps every entry."""

    code = "handoff"


class VerifyError(HandoffError):
    """An fd that arrived does not match the identity the source sent for it."""

    code = "verify"


class Busy(CprdError):
    """The daemon cannot do this now (for example a handoff is running); retry."""

    code = "busy"


class ControlError(CprdError):
    """The control socket cannot be reached or set up."""

    code = "control"


class Denied(CprdError):
    """The peer's uid may not use this daemon."""

    code = "denied"


class UpgradeError(CprdError):
    """An in-place upgrade that did not take; the daemon goes on serving with its program."""

    code = "upgrade"


class UsageError(CprdError):
    """A malformed request or command line."""

    code = "usage"


class UntrustedPeer(CprdError):
    """The process at the other end of a socket runs as a user we do not trust with fds."""

    code = "untrusted"


class UnsafePath(UsageError):
    """A path that another user could control (a directory it owns or may write to)."""

    code = "unsafe-path"


_BY_CODE = {cls.code: cls for cls in (
    CprdError, BadKey, KeyExists, KeyMissing, BadFd, ProtocolError, CapacityError, HandoffError,
    VerifyError, Busy, ControlError, UsageError, Denied, UpgradeError, UnsafePath,
    UntrustedPeer,
)}
_BY_CODE["closed"] = ProtocolError  # a daemon never sends it; a reply that does is a protocol error


def reported_error(code: str, message: str) -> CprdError:
    """The error a daemon reported in a reply, as its class, marked as reported."""
    e = error_from_code(code, message)
    e.reported = True
    return e


def error_from_code(code: str, message: str) -> CprdError:
    """Rebuild the exception a daemon reported in a control reply."""
    return _BY_CODE.get(code, CprdError)(message)
