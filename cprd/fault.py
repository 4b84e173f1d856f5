"""Test-only fault points. Never set CPRD_FAULT in production.

``CPRD_FAULT=<side>:<step>[:<n>[:<action>]]`` makes a daemon act when it reaches that step of a
handoff:

- side: ``source`` or ``target``;
- step: ``hello`` (after its hello), ``batch`` (after batch n), ``end`` (after End), ``ready``
  (after Ready), ``commit`` (after Commit), ``confirm`` (after Confirm);
- n: for ``batch``, a batch number, or ``first``, ``middle``, ``last``; empty or ``*`` for any;
- action: ``kill`` (default: SIGKILL itself), ``shutdown`` (shut the handoff socket down, a broken
  connection while both processes live), ``rlimit=N`` (lower its RLIMIT_NOFILE soft limit to N,
  to run out of fds mid-transfer).

A source that shuts down also drops what the target had already queued for it, as if the target's
sends had failed: otherwise whether, say, a Confirm raced ahead of the shutdown would decide the
outcome. A target does not: what the source queued was sent successfully as far as the source
knows (a Commit above all), so the target still reads it, as a live target would.
"""

from __future__ import annotations

import os
import resource
import signal
import socket

from . import scm

_SPEC = os.environ.get("CPRD_FAULT", "")


def armed(side: str, step: str, n: int | None = None, last: int | None = None) -> str | None:
    """The action if the fault point (side, step, n) is armed, else None."""
    if not _SPEC:
        return None
    parts = _SPEC.split(":")
    if parts[:2] != [side, step]:
        return None
    want = parts[2] if len(parts) > 2 else ""
    if want not in ("", "*") and n is not None:
        if want == "first":
            want = "0"
        elif want in ("last", "middle"):
            if last is None:
                return None
            want = str(last if want == "last" else last // 2)
        if int(want) != n:
            return None
    return parts[3] if len(parts) > 3 and parts[3] else "kill"


def point(side: str, step: str, n: int | None = None, sock=None, last: int | None = None) -> None:
    action = armed(side, step, n, last)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "shutdown" and sock is not None:
        sock.shutdown(socket.SHUT_RDWR)
        if side == "source":
            scm.drop_queued(sock.fileno())
    elif action.startswith("rlimit="):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(action[len("rlimit="):]), hard))
