"""Test-only fault points.

Set ``CPRD_FAULT=<side>:<step>[:<n>]`` in a daemon's environment to make it SIGKILL itself when
it reaches that step of a handoff (``n`` selects the batch for ``batch``). ``side`` is
``source`` or ``target``. This exists for the fault-matrix tests; never set it in production.
Steps: hello, batch, end, ready, commit, confirm. ``<side>:<step>:<n>:shutdown`` shuts the
handoff socket down instead of dying (a broken connection while both processes live).
"""

from __future__ import annotations

import os
import signal
import socket

_SPEC = os.environ.get("CPRD_FAULT", "")


def armed(side: str, step: str, n: int | None = None) -> str | None:
    """The action ('kill' or 'shutdown') if the fault point (side, step, n) is armed."""
    if not _SPEC:
        return None
    parts = _SPEC.split(":")
    if parts[:2] != [side, step]:
        return None
    if len(parts) > 2 and parts[2] not in ("", "*") and n is not None and int(parts[2]) != n:
        return None
    return parts[3] if len(parts) > 3 else "kill"


def point(side: str, step: str, n: int | None = None, sock: socket.socket | None = None) -> None:
    action = armed(side, step, n)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "shutdown" and sock is not None:
        sock.shutdown(socket.SHUT_RDWR)
