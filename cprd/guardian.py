"""The guardian of an in-place upgrade: a thin driver of its session (protocol/upgrade.py).

Theory of operation
-------------------
The old program forks the guardian just before it execs the new program. The guardian keeps a
copy of every fd of the table as it was at the fork, of the state memfd and of the requester's
connection, its copy of the stand-in's journal and the stand-in's word to it (a pipe), its end of
the link to the new program, a pidfd of the daemon's pid and one of the stand-in. It closes every
other fd, leaves the daemon's process group, and runs its session: it waits for the new program's
confirmation (C: it answers c and leaves), or the new program's end or the deadline (guard_s),
which make it fence the new program (its pidfd, its process group, and whatever still holds the
upgrade's state) and wait for the stand-in's word: O (the stand-in keeps the table: it leaves),
K or the end of the pipe (the stand-in handed the table to the new program, or died: it restores),
or nothing within answer_s (it fences the stand-in and restores).

To restore, it rewrites the state (mode "restore": the stand-in and the new program are fenced,
its copy of the journal is complete) and execs the previous program in its own pid, with SIGHUP,
SIGTERM and SIGINT blocked until that program's handlers are in place.

What this module may know: fds, pidfds, fork and exec, the upgrade's session and state. No trio,
no logging handlers (a fork of a process whose logging lock another thread may hold).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time

from . import proc, statefd
from .protocol import upgrade as pu
from .protocol.upgrade import Act, Ev, Fence, Msg, Role, Send, Session

RELOAD_SIGNALS = proc.RELOAD_SIGNALS


class Guardian:
    """The guardian's channels and the state it restores from."""

    def __init__(self, state: pu.UpgradeState, state_fd: int, link: int, words: int, copy: int, new_pidfd: int,
                 standin_pidfd: int | None, daemon_pid: int) -> None:
        self.state, self.state_fd = state, state_fd
        self.link = socket.socket(fileno=link)
        self.link.setblocking(False)
        self.words, self.copy = words, copy
        self.new_pidfd, self.standin_pidfd, self.daemon_pid = new_pidfd, standin_pidfd, daemon_pid
        self.d = state.deadlines
        self.s = Session.guardian()
        self.why = ""

    def run(self) -> int:
        """The session until it leaves (0) or restores (the exec; 1 if that fails)."""
        poller = select.poll()
        for fd in (self.link.fileno(), self.words, self.new_pidfd):
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + self.d.guard_s
        told_new_gone = False
        while not self.s.done:
            left = deadline - time.monotonic()
            try:
                ready = {fd for fd, _ in poller.poll(max(0.0, left) * 1000)}
            except InterruptedError:
                continue
            actions: tuple = ()
            state_before = self.s.state
            if self.words in ready:  # the stand-in's word first: it may settle everything
                word = _read1(self.words)
                if word == b"":
                    poller.unregister(self.words)
                    actions = self.s.on(Ev.STANDIN_GONE)
                elif word in (Msg.STANDIN_OWNS, Msg.TAKEN):
                    actions = self.s.on_msg(Msg(word), not proc.ended(self.standin_pidfd))
            elif self.link.fileno() in ready:
                try:
                    got = self.link.recv(16)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    got = b""
                if got[:1] == Msg.CONFIRM:
                    actions = self.s.on_msg(Msg.CONFIRM, not proc.ended(self.new_pidfd))
                else:  # the new program closed it (it is gone: its pidfd will say so)
                    poller.unregister(self.link.fileno())
            elif self.new_pidfd in ready and not told_new_gone:
                told_new_gone = True
                poller.unregister(self.new_pidfd)
                self.why = "the new program died before it took over; the guardian"
                actions = self.s.on(Ev.NEW_GONE)
            elif not ready and left <= 0:
                if self.s.state is pu.St.WATCH:
                    self.why = (f"the new program did not take over within {self.d.guard_s:g} s; the guardian killed "
                                "its process group and")
                actions = self.s.on(Ev.TIMEOUT)
            for a in actions:
                if isinstance(a, Send):  # c to the new program
                    try:
                        self.link.send(a.msg)
                    except OSError:
                        pass
                elif isinstance(a, Fence):
                    self._fence(a.peer)
                elif a is Act.LEAVE:
                    return 0
                elif a is Act.RESTORE:
                    return self._restore()
            if self.s.state is not state_before and self.s.waits:
                # a new wait starts now (after the actions: a fence may have taken fence_s)
                deadline = time.monotonic() + getattr(self.d, self.s.waits)
        return 0

    def _fence(self, peer: Role) -> None:
        if peer is Role.NEW:
            # through its pidfd (it may have left its group), its group (what it forked), and
            # whatever else still holds the upgrade's state (what escaped the group)
            proc.kill(self.new_pidfd, group=self.state.group)
            proc.wait_ended(self.new_pidfd, self.d.fence_s)
            st = os.fstat(self.state_fd)
            proc.kill_holders((st.st_dev, st.st_ino), {os.getpid(), self.state.standin.pid if self.state.standin
                                                      else 0})
        elif peer is Role.STANDIN:
            proc.kill(self.standin_pidfd)
            proc.wait_ended(self.standin_pidfd, self.d.fence_s)

    def _restore(self) -> int:
        """Run the previous program, in this pid, with the state at the fork and our copy of the
        journal (complete: the stand-in is fenced)."""
        st = self.state
        st.mode = "restore"
        st.guardian_fd = st.guardian_pid = None
        if st.standin is not None:
            st.standin = pu.Standin(st.standin.pid, self.copy)
        st.crossing = None  # computed from the fields: the entries, the listener, the requester, our copy
        reason = self.why or "the stand-in and the new program are gone; the guardian"
        for fd in (self.words, self.new_pidfd, self.standin_pidfd, self.link.detach()):
            if fd is not None:
                os.close(fd)
        signal.pthread_sigmask(signal.SIG_BLOCK, RELOAD_SIGNALS)  # until its handlers are in place
        try:
            statefd.rollback(self.state_fd, st, f"{reason} restored the previous program in pid {os.getpid()}")
        except OSError as e:
            print(f"cprd guardian: cannot run the previous program: {e}", file=sys.stderr)
        return 1


def _read1(fd: int) -> bytes | None:
    try:
        return os.read(fd, 1)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def spawn(state: pu.UpgradeState, state_fd: int, link: int, words: int, copy: int, standin_pidfd: int | None,
          keep: set[int]) -> int:
    """Fork the guardian (the old program, just before the exec); returns its pid. `keep`: the fds it
    holds besides its own channels (the table's, the listener, the requester's connection)."""
    daemon_pid = os.getpid()
    new_pidfd = os.pidfd_open(daemon_pid)  # the guardian's view of the daemon's pid (its parent)
    keep = set(keep) | {state_fd, link, words, copy, new_pidfd} | ({standin_pidfd} if standin_pidfd else set())
    try:
        pid = os.fork()
    except BaseException:
        os.close(new_pidfd)
        raise
    if pid == 0:  # the guardian: no trio, no logging; only fds, pidfds and exec
        code = 1
        try:
            os.setpgid(0, 0)  # out of the daemon's group, which it may kill
            if state.nice is not None:
                # The old program lowered its priority for the new program's start (daemon/core.py
                # _yield_cpu) just before forking us. Should the guardian restore, nobody serves until
                # the previous program runs: at nice +10 beside busy processes that outage outlasted a
                # client's retry budget. The guardian and what it restores take the daemon's back
                # (before our name shows: a test finds us by it).
                try:
                    os.setpriority(os.PRIO_PROCESS, 0, int(state.nice))
                except (OSError, ValueError):
                    pass
            proc.set_name("cprd-guardian")
            for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, RELOAD_SIGNALS)  # the old program blocked them
            # Closing a client's fd may block (a socket that lingers): never let it delay the watch.
            proc.start_thread(threading.Thread(target=proc.close_all_but, args=(keep,), daemon=True))
            code = Guardian(state, state_fd, link, words, copy, new_pidfd, standin_pidfd, daemon_pid).run()
        except BaseException as e:  # noqa: BLE001 - report, then exit: never return into the caller
            print(f"cprd guardian: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(new_pidfd)
    try:
        os.setpgid(pid, pid)  # the same from this side, so that it holds before either one runs on
    except OSError:
        pass
    return pid
