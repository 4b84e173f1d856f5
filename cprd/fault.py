"""Test-only fault points. Never set CPRD_FAULT in production.

``CPRD_FAULT=<side>:<step>[:<n>[:<action>]][,...]`` makes a daemon act when it reaches that step of
a handoff (several specs, comma-separated, act in the order given when they name the same point):

- side: ``source`` or ``target``; or ``restore:raise``, which makes the new program of an in-place
  upgrade fail while it restores (to test the rollback); ``standin`` (an upgrade's stand-in:
  ``forked``, ``takeover`` once asked to stop, ``done`` after it sent Done, ``journal`` before journal
  message n, ``journaled`` once message n is queued for every reader but before the client that made
  the change hears its answer) and ``upgrade`` (the new program taking over from it: ``restored``,
  ``asked``, ``taken``, ``released``); ``fdstore:read`` (a store's reader,
  before it waits for a datagram: with ``sleep=S`` it leaves datagrams queued for S seconds, so that a
  request that must handle them first, ``cprd run``'s, meets them there);
- step: ``hello`` (after its hello), ``batch`` (after snapshot batch n; on the target, after any
  batch with sequence number n), ``delta`` (after pre-copy delta message n: a batch of replaced
  entries or a Delete, counted from 0 by each side), ``delete`` (after the n-th Delete message),
  ``results`` (after the n-th Results message), ``freeze`` (source: once mutations are frozen),
  ``end`` (after End), ``ready`` (after Ready), ``commit`` (after Commit), ``confirm`` (after
  Confirm) (STEPS);
- n: a number, or ``first``, ``middle``, ``last`` (for ``batch``: of the snapshot batches);
  empty or ``*`` for any;
- action: ``kill`` (default: SIGKILL itself), ``stop`` (SIGSTOP itself: alive, answering nothing,
  until a SIGCONT or a fence), ``shutdown`` (shut the handoff socket down, a broken
  connection while both processes live), ``rlimit=N`` (lower its RLIMIT_NOFILE soft limit to N,
  to run out of fds mid-transfer), ``sleep=S`` (stop for S seconds: for ``freeze``, mutations
  wait that long, so that clients meet the freeze and the handoff), ``sndbuf=N`` (``standin:forked``
  only: shrink the send buffers of the stand-in's journal to N bytes, so that the kernel refuses the
  journal after a few changes, as it does a non-root daemon's after a few hundred), ``last-sndbuf=N``
  (the same, only for the last socket the point is given: the stand-in's copy for the guardian, so
  that its queue is the one that fills), ``drop`` (``standin:journal`` only: that journal message
  goes to the guardian's copy but not to the new program, which then sees a hole).

Every fault that fires logs ``event=fault_fired`` first, so a test can tell that its fault
happened. A spec that names an unknown side, step or action is refused when the daemon starts
(``check``), never ignored.

A source that shuts down also drops what the target had already queued for it, as if the target's
sends had failed: otherwise whether, say, a Confirm raced ahead of the shutdown would decide the
outcome. A target does not: what the source queued was sent successfully as far as the source
knows (a Commit above all), so the target still reads it, as a live target would.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import time

from . import scm
from .errors import UsageError

log = logging.getLogger("cprd.fault")

STEPS = {  # the fault points of each side
    "source": ("hello", "batch", "delta", "delete", "results", "freeze", "end", "ready", "commit", "confirm"),
    "target": ("hello", "batch", "delta", "delete", "results", "end", "ready", "commit", "confirm"),
    "restore": ("raise",),  # restore:raise: the new program of an upgrade fails while it restores
    # an upgrade's stand-in (daemon/standin.py): right after the fork, once asked to stop (T), after Done
    # and each journal message it sends (n: how many it sent before: `drop` leaves it out of the new program's),
    # and once journal message n is queued for every reader, before the client hears the answer it carries
    "standin": ("forked", "takeover", "done", "journal", "journaled"),
    # the new program of an upgrade: state restored (before T), after asking (T), after Taken (K),
    # once the stand-in released the table (B, before C to the guardian)
    "upgrade": ("restored", "asked", "taken", "released"),
    "fdstore": ("read",),  # a store's reader task, before it waits for the next datagram
}
_SPEC = os.environ.get("CPRD_FAULT", "")


def _parse(spec: str) -> tuple[str, str, str, str]:
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 4:
        raise UsageError(f"CPRD_FAULT={spec!r}: expected SIDE:STEP[:N[:ACTION]]")
    side, step = parts[0], parts[1]
    n = parts[2] if len(parts) > 2 else ""
    action = parts[3] if len(parts) > 3 and parts[3] else "kill"
    if side not in STEPS:
        raise UsageError(f"CPRD_FAULT={spec!r}: unknown side {side!r}; one of {', '.join(STEPS)}")
    steps = STEPS[side]
    if step not in steps:
        raise UsageError(f"CPRD_FAULT={spec!r}: unknown step {step!r} for {side}; one of {', '.join(steps)}")
    if n not in ("", "*", "first", "middle", "last") and not n.isdigit():
        raise UsageError(f"CPRD_FAULT={spec!r}: N must be a number, first, middle, last, * or empty")
    name, _, value = action.partition("=")
    try:
        ok = (action in ("kill", "shutdown", "stop") or (action == "drop" and (side, step) == ("standin", "journal"))
              or (name == "rlimit" and int(value) > 0)
              or (name == "sleep" and 0 <= float(value) <= 3600)
              or (name in ("sndbuf", "last-sndbuf") and int(value) > 0 and (side, step) == ("standin", "forked")))
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"CPRD_FAULT={spec!r}: unknown action {action!r}; one of kill, stop, shutdown, rlimit=N, "
                         "sleep=S, sndbuf=N or last-sndbuf=N (standin:forked only)")
    return side, step, n, action


def _specs() -> list[tuple[str, str, str, str]]:
    return [_parse(one) for one in _SPEC.split(",")] if _SPEC else []


def check() -> None:
    """UsageError if CPRD_FAULT is set to something this module does not know."""
    _specs()


def armed(side: str, step: str, n: int | None = None, last: int | None = None) -> list[str]:
    """The actions armed at fault point (side, step, n), in order; [] when none is."""
    out = []
    for want_side, want_step, want, action in _specs():
        if (want_side, want_step) != (side, step):
            continue
        if want not in ("", "*") and n is not None:
            if want == "first":
                want = "0"
            elif want in ("last", "middle"):
                if last is None:
                    continue
                want = str(last if want == "last" else last // 2)
            if int(want) != n:
                continue
        out.append(action)
    return out


def point(side: str, step: str, n: int | None = None, sock=None, last: int | None = None) -> list[str]:
    """Carry out the actions armed here; the list of them (a caller carries out `drop` itself)."""
    actions = armed(side, step, n, last)
    for action in actions:
        _act(side, step, n, action, sock)
    return actions


def _act(side: str, step: str, n: int | None, action: str, sock) -> None:
    log.warning("event=fault_fired side=%s step=%s n=%s action=%s", side, step, n, action)
    for h in logging.getLogger().handlers:  # the line must be out before a SIGKILL
        h.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)  # as a debugger or an operator's kill -STOP would
    elif action == "shutdown" and sock is not None:
        sock.shutdown(socket.SHUT_RDWR)
        if side == "source":
            scm.drop_queued(sock.fileno())
    elif action.startswith("rlimit="):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(action[len("rlimit="):]), hard))
    elif action.startswith("sleep="):
        time.sleep(float(action[len("sleep="):]))  # blocks the whole daemon, as a stalled process would
    elif action.startswith(("sndbuf=", "last-sndbuf=")) and sock is not None:
        for s in sock if action.startswith("sndbuf=") else sock[-1:]:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(action.split("=", 1)[1]))


async def apoint(side: str, step: str, n: int | None = None, sock=None, last: int | None = None) -> None:
    """point() for a trio task: ``sleep`` waits without blocking the other tasks (the daemon goes on
    serving while, say, mutations wait in the freeze or change the table during pre-copy)."""
    for action in armed(side, step, n, last):
        if action.startswith("sleep="):
            import trio

            log.warning("event=fault_fired side=%s step=%s n=%s action=%s", side, step, n, action)
            await trio.sleep(float(action[len("sleep="):]))
        else:
            _act(side, step, n, action, sock)
