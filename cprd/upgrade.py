"""Exec-style in-place upgrade (QEMU's cpr-exec for cprd itself): the old program's side, and the
state it leaves the new one.

Theory of operation
-------------------
The daemon forks a stand-in that serves on (daemon/standin.py); this process, the daemon's pid,
never returns to the event loop after the fork. Here it:

1. writes the state of the table as it was at the fork (``UpgradeState``, docs/protocol.md 6.2)
   into a memfd: every entry with its fd number and identity, the listening socket, the answers
   to recent mutations, the configuration, the deadlines, the stand-in's journal, and the argv
   to run the *previous* program again;
2. forks the **guardian** (guardian.py), which holds a copy of every fd and of the journal, and
   sends the stand-in a pidfd of it (so that the stand-in can fence it);
3. makes sure it leads a process group of its own (the daemon does before the fork), so that the
   new program and anything it forks before it confirms can be killed together;
4. clears close-on-exec on exactly the fds that must cross (the table, the listener, the state,
   the journal, the guardian's link, the requester's connection) only now, and execs the new
   program with the daemon's own arguments plus ``--restore-fd N``, with SIGHUP, SIGTERM and
   SIGINT still blocked (the daemon blocked them before the fork): a reload that arrives now waits
   until the new program's handlers are in place, instead of killing it.

A new program that is a wrapper (a shell script) and forks before it execs cprd hands copies of
the fds to its children. They cannot keep the table alive: whoever fences the new program kills
its process group and whatever still holds the state memfd (made for this upgrade only), and the
new program, once it serves, kills what the wrapper left (``kill_strays``). A rollback runs this
interpreter's cprd module again, never a program an earlier upgrade named.

If the exec fails (a missing file, a bad interpreter) the previous program is exec'd instead and
takes over from the stand-in as the new one would have (``rollback``).

What this module may know: fds, the state's format (protocol/upgrade.py), fork and exec. It
imports no trio (the restore path must start fast).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from . import proc
from .errors import UpgradeError
from .statefd import exec_with, rewrite_state, write_state
from .protocol import upgrade as pu
from .protocol.upgrade import UpgradeState

log = logging.getLogger("cprd.upgrade")

STATE_VERSION = pu.STATE_VERSION
DEFAULT_PROGRAM = [sys.executable, "-m", "cprd"]


def kill_strays(keep: set[int | None], state_fd: int, group: int | None) -> list[tuple[int, int | None]]:
    """Kill what a new program forked before it became cprd (see the module docstring): our own
    children other than those in `keep` (the guardian, the stand-in), the members of our process
    group if the upgrade had it to itself (`group`), and any other process that holds the state
    memfd of this upgrade (made for it, inherited only through the exec: a process that escaped both
    by setsid and a double fork still holds it). Returns each one's (pid, pidfd) for the caller to
    reap (never waits here: a stray may be frozen)."""
    me = os.getpid()
    st = os.fstat(state_fd)
    ident = (st.st_dev, st.st_ino)
    strays = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me or int(name) in keep:
            continue
        fields = proc.stat_of(name)
        if fields is None:
            continue
        _, ppid, pgrp = fields
        if ppid == me or (group is not None and pgrp == group) or proc.holds(name, ident):
            pidfd = proc.pidfd_open(int(name))
            if pidfd is not None:
                proc.kill(pidfd)
                strays.append((int(name), pidfd))
    return strays


# -- the old program's side ---------------------------------------------------------------------
@dataclass(slots=True)
class Prepared:
    state: UpgradeState
    state_fd: int
    guardian_pid: int | None = None

    def guard(self, link_p: int, link_g: int, words: int, copy: int, standin_pidfd: int | None,
              to_standin: int) -> None:
        """Fork the guardian (once the stand-in is forked: the guardian must know it), send the
        stand-in a pidfd of it on the journal (`to_standin`, the new program's end), and write the
        state again with it. Without a guardian (it could not be forked) the upgrade goes on: the
        stand-in keeps the table if the new program fails."""
        from . import guardian, scm

        st = self.state
        keep = {e.fd for e in st.entries} | {st.listener_fd} | ({st.requester_fd} if st.requester_fd is not None
                                                                 else set())
        try:
            gpid = guardian.spawn(st, self.state_fd, link_g, words, copy, standin_pidfd, keep)
        except OSError as e:
            log.warning("event=guardian_not_started error=%r", str(e))
            gpid = None
        if gpid is not None:
            gfd = proc.pidfd_open(gpid)
            if gfd is not None:
                try:
                    scm.send_nowait(to_standin, pu.Msg.GUARDIAN_PIDFD.value, [gfd])
                except OSError as e:  # the stand-in is gone: nothing to tell
                    log.info("event=guardian_pidfd_not_sent error=%r", str(e))
                os.close(gfd)
        st.guardian_fd = link_p if gpid is not None else None
        st.guardian_pid = gpid
        st.crossing = st.computed_crossing()
        self.guardian_pid = gpid
        rewrite_state(self.state_fd, st)

    def exec(self) -> None:
        exec_with(self.state.argv_new, self.state.crossing_fds(self.state_fd), self.state_fd)


def prepare(state: UpgradeState, program: str | None, own_args: list[str]) -> Prepared:
    """Write the state: everything but the guardian (Prepared.guard) and the exec. `program` (checked
    by the caller, a real path) or, when None, this interpreter with -m cprd is the new program; a
    rollback runs this interpreter with -m cprd again, never a program an earlier upgrade named (a
    wrapper would run again, unchecked, with every fd)."""
    state.argv_new = new_argv(program, own_args)
    state.previous = [*DEFAULT_PROGRAM, *own_args]
    state.env = dict(os.environ)
    state.cprd_state = STATE_VERSION
    state.rolled_back = None
    return Prepared(state, write_state(state))


def new_argv(program: str | None, own_args: list[str]) -> list[str]:
    """The command line of the new program; UpgradeError if the program is missing."""
    new = DEFAULT_PROGRAM if program is None else [os.path.abspath(program)]
    if program is not None and not os.path.exists(new[0]):
        raise UpgradeError(f"cannot run {program}: no such file; the running daemon goes on serving")
    return [*new, *own_args]


def now_ms() -> float:
    return time.monotonic() * 1e3
