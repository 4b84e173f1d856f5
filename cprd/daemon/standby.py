"""The standby (`cprd source --standby`, `cprd target --standby`): a second process that holds a
copy of every fd of the table, kept current, and takes over when the daemon dies.

Theory of operation
-------------------
Between upgrades every fd lives in one process: its death (SIGKILL, the OOM killer, a crash) would
lose them all. A copy of an open file description in a second process costs a reference, and that
process's own fd limit.

* **Start.** Once the daemon serves, it forks. The fork is the snapshot: the child writes the state
  of the table as it is at that instant (an in-place upgrade's format, statefd.py) and execs cprd
  on it in standby mode, so that its interpreter and event loop start now, not when the daemon
  dies; it says U on the journal once it holds the table. From the fork on, the daemon sends every
  change of its table to the standby (the upgrade's journal, ``standin.Stream``: each save with its
  fd attached, each delete, and the answer to each mutation) *before* the client hears the answer.
  A message in the standby's socket queue is the standby's even if the daemon dies the next
  instant: no client ever hears "done" for a change the standby could lose.
* **Kept current** (``stand_by``, in the exec'd program). It applies the journal as it comes (a
  delete closes its copy on a closer thread, so that a close that blocks never holds up its watch)
  and keeps the answers (a retried request is answered once, with its first answer).
* **Take-over.** The standby watches the daemon's pidfd, readable the instant the daemon is gone,
  whatever killed it. It applies what is left in its queue (all of it: the daemon can send no
  more) and serves the same listening control socket in its own pid (clients wait in its backlog
  meanwhile), tells a service manager its pid (``MAINPID=``, daemon/main.py) and forks a standby of
  its own: the daemon's death to serving is a few milliseconds.
* **Judged by answers.** The standby probes the daemon (P on the journal, answered p on its pipe by
  the daemon's event loop); none for 3 x answer_timeout: the daemon is killed, and its end is the
  take-over. The daemon judges the standby by its queue (``_judge``).
* **Retired, never orphaned.** A deliberate end of the daemon (SIGTERM, a handoff that moved the
  table, an in-place upgrade about to start) first tells the standby to exit (R on its pipe): it
  never takes over a table that is somewhere else now. During a handoff or an upgrade there is no
  standby (the source keeps the table until the target confirms; the guardian protects an upgrade);
  the daemon that serves afterwards starts one.
* **The standby dies or cannot keep up** (its queue is full: it is stopped or frozen): the daemon
  kills it, and forks a new one (a new snapshot) once the old one is gone, after a short backoff;
  meanwhile mutations are answered without a standby, as without --standby.

What this module may know: trio, fork and exec, pidfds, the table, the journal's format, the
upgrade's state. The fork uses no trio and no logging until its exec (a fork of a process whose
logging lock another thread may hold).
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import termios
import time
from typing import Any

import trio

from .. import proc
from ..protocol.upgrade import Deadlines, Role
from .standin import Stream
from .takeover import Journal, TakeOver, first_readable

log = logging.getLogger("cprd.standby")

RETIRE = b"R"  # on its pipe: exit, take nothing over
UP = b"U"  # from it on the journal: its program runs and holds the table
PING, PONG = b"P", b"p"  # its probe of the daemon (on the journal), and the daemon's answer (on its pipe)
JUDGE_EVERY_S = 0.1
PROBE_EVERY_S, PROBE_MIN_S = 1.0, 3.0  # the standby's status requests to the daemon
BACKOFF_S = (0.05, 5.0)


class Standby:
    """The daemon's side: fork, journal, watch, replace, retire."""

    def __init__(self, daemon: Any) -> None:
        self.d = daemon
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.sock: socket.socket | None = None  # our end of its journal
        self.words: int | None = None  # our end of its pipe (R)
        self.stream: Stream | None = None
        self.wanted = trio.Event()  # set while a standby should run (not during a handoff or an upgrade)
        self.wanted.set()
        self.started = 0  # standbys forked so far
        self.since: float | None = None  # when the current one was forked (time.time())
        self.last_end = ""  # how the last one ended
        self.up = False  # its program said U
        self.retiring: float | None = None  # when it was told R

    # -- the fork ---------------------------------------------------------------------------
    def start(self) -> None:
        """Fork a standby and journal every change to it from now on. Nothing awaits in here: the
        table at the fork is the one the standby holds."""
        st = self.d.st
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        rr = rw = -1
        try:
            rr, rw = os.pipe2(os.O_CLOEXEC)
            parent = os.getpid()
            t_fork = time.perf_counter()
            pid = os.fork()
        except BaseException:
            for s in pair:
                s.close()
            for fd in (rr, rw):
                if fd >= 0:
                    os.close(fd)
            raise
        if pid == 0:
            code = 1
            try:
                pair[0].close()
                os.close(rw)
                code = _standby(st, pair[1], rr, parent)
            except BaseException as e:  # noqa: BLE001 - report, then exit: never return into the event loop
                os.write(2, f"cprd standby: {type(e).__name__}: {e}\n".encode(errors="replace"))
            finally:
                os._exit(code)
        pair[1].close()
        os.close(rr)
        try:
            os.setpgid(pid, pid)  # out of the daemon's group from this side too (a group kill)
        except OSError:
            pass
        os.set_blocking(rw, False)
        self.pid, self.sock, self.words = pid, pair[0], rw
        self.pidfd = proc.pidfd_open(pid)
        self.stream = Stream({Role.GUARDIAN: self.sock}, on_break=self._broken, on_guardian_gone=self._gone)
        st.table.stream, st.stream = self.stream.op, self.stream
        self.started += 1
        self.since = time.time()
        # the fork is the one step here that grows with the table (page tables, the fd table): clients wait for it
        log.info("event=standby_started pid=%d entries=%d fork_ms=%.1f", pid, len(st.table),
                 (time.perf_counter() - t_fork) * 1e3)

    def _unjournal(self) -> None:
        st = self.d.st
        if self.stream is not None and st.stream is self.stream:
            st.table.stream, st.stream = None, None
        if self.stream is not None:
            self.stream.stop()
        self.stream = None

    def _broken(self, why: str, gone: Role | None) -> None:
        """Its queue is full (it does not read: stopped, frozen) or an fd could not be copied: it can
        no longer be current. Killed; the watch forks a new one once it is gone."""
        log.error("event=standby_fenced pid=%s reason=%r note=a-new-standby-follows", self.pid, why)
        self.last_end = f"fenced: {why}"
        self._unjournal()
        proc.kill(self.pidfd, self.pid)

    def _gone(self) -> None:
        self.last_end = self.last_end or "its end of the journal closed"
        self._unjournal()

    # -- its life ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Keep a standby while one is wanted: fork it, wait for its end, fork the next."""
        backoff = BACKOFF_S[0]
        while True:
            await self.wanted.wait()
            try:
                self.start()
            except OSError as e:
                log.error("event=standby_not_started error=%r retry_s=%.2f", str(e), backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            t0 = trio.current_time()
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._hear_up)
                    n.start_soon(self._judge)
                    if self.pidfd is not None:
                        await trio.lowlevel.wait_readable(self.pidfd)
                    else:  # (no pidfd: it may be gone already) its end, looked for without reaping it
                        while os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                            await trio.sleep(JUDGE_EVERY_S)
                    n.cancel_scope.cancel()
            finally:
                ended = self._reap()
            if ended:
                log.warning("event=standby_ended pid=%s how=%r", ended[0], ended[1])
            if trio.current_time() - t0 > 60:
                backoff = BACKOFF_S[0]
            if self.wanted.is_set():
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])

    async def _hear_up(self) -> None:
        """U on the journal: its program runs and holds the table (status: up). P: its probe, answered
        p on its pipe by this event loop (a daemon whose loop is stuck or stopped answers nothing)."""
        sock, words = self.sock, self.words
        while sock is not None:
            await trio.lowlevel.wait_readable(sock)
            try:
                word = sock.recv(16)
            except BlockingIOError:
                continue
            except OSError:
                return
            if word == UP:
                self.up = True
                log.info("event=standby_up pid=%s ms=%.0f", self.pid, (time.time() - (self.since or 0)) * 1e3)
            elif word == PING and words is not None:
                try:
                    os.write(words, PONG)
                except OSError:  # (full: it reads none of them; its queue judges it)
                    pass
            elif not word:
                return

    async def _judge(self) -> None:
        """Judged by answers: what we send it must leave its queue. Bytes that wait there and do not
        go down for answer_timeout once it is up (upgrade_timeout while its program starts) mean it
        does not read (stopped, frozen): fenced, and a new one follows."""
        cfg = self.d.st.config
        last, progress = 0, trio.current_time()
        started = progress
        while self.sock is not None:
            await trio.sleep(JUDGE_EVERY_S)
            q = self.queued()
            now = trio.current_time()
            if q is None:
                return
            if self.retiring is not None:  # told R: it exits within answer_timeout, or is killed
                if now - self.retiring > cfg.answer_timeout:
                    log.error("event=standby_fenced pid=%s reason='retired, it did not exit within %g s'", self.pid,
                              cfg.answer_timeout)
                    proc.kill(self.pidfd, self.pid)
                    return
                continue
            if not self.up and now - started > cfg.upgrade_timeout:
                self._broken(f"its program did not start within {cfg.upgrade_timeout:g} s", None)
                return
            if q == 0 or q < last:
                progress = now
            last = q
            limit = cfg.answer_timeout if self.up else cfg.upgrade_timeout
            if now - progress > limit:
                self._broken(f"it read none of the {q} bytes queued for it in {limit:g} s", None)
                return

    def queued(self) -> int | None:
        """Bytes sent to it that it has not read yet."""
        if self.sock is None:
            return None
        try:
            return int.from_bytes(fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4), "little")
        except OSError:
            return None

    def _reap(self) -> tuple[int, str] | None:
        pid = self.pid
        if pid is None:
            return None
        self._unjournal()
        how = self.last_end or "exited"
        try:
            _, status = os.waitpid(pid, os.WNOHANG)
            if status and os.WIFSIGNALED(status):
                how = f"{how} (killed by {signal.Signals(os.WTERMSIG(status)).name})"
            elif status and os.WIFEXITED(status):
                how = f"{how} (exit status {os.WEXITSTATUS(status)})"
        except (ChildProcessError, ValueError):
            pass
        for fd in (self.pidfd, self.words):
            if fd is not None:
                os.close(fd)
        if self.sock is not None:
            self.sock.close()
        self.pid = self.pidfd = self.words = self.sock = None
        self.since, self.last_end, self.up, self.retiring = None, "", False, None
        return pid, how

    def retire(self, why: str) -> None:
        """No standby from now on until `resume` (a handoff, an upgrade, a stop): the current one is
        told to exit, and takes nothing over."""
        self.wanted = trio.Event()
        if self.pid is None:
            return
        self.last_end = f"retired: {why}"
        self.retiring = trio.current_time()
        self._unjournal()
        try:
            os.write(self.words, RETIRE)
        except OSError:
            proc.kill(self.pidfd, self.pid)
        log.info("event=standby_retired pid=%d why=%s", self.pid, why)

    def resume(self) -> None:
        self.wanted.set()

    def describe(self) -> dict[str, Any]:
        """For status: its pid, since when, how many were forked, what its queue holds (bytes the
        daemon sent it that it has not read yet; every answered change is in it or applied)."""
        state = ("retiring" if self.retiring is not None else "up" if self.up else "starting") if self.pid else (
            "replacing" if self.wanted.is_set() else "off")
        return {"pid": self.pid, "since": self.since, "started": self.started, "queued_bytes": self.queued(),
                "synchronous": True, "state": state}


# -- the fork, until its exec (no trio, no logging) ------------------------------------------------
def _standby(st: Any, sock: socket.socket, words: int, daemon_pid: int) -> int:
    """Write the state of the table as it is at the fork and exec cprd on it as a standby: a program
    of its own (its own interpreter and event loop, started now, not when the daemon dies)."""
    from .. import statefd, upgrade
    from ..protocol.upgrade import Standin

    os.setpgid(0, 0)  # out of the daemon's group, which a fence or a stop may kill
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):  # (kept across the exec, until it serves)
        signal.signal(sig, signal.SIG_IGN)
    d = Deadlines(start_s=st.config.upgrade_timeout, answer_s=st.config.answer_timeout)
    state = st.upgrade_state(upgrade.now_ms(), None, d)
    state.mode = "standby"
    state.pid = daemon_pid  # the daemon it stands by for: its parent
    state.standin = Standin(daemon_pid, sock.fileno())  # the journal
    state.guardian_fd = words  # R: retired
    prep = upgrade.prepare(state, None, list(st.config.own_args))
    try:
        statefd.exec_with(prep.state.argv_new, prep.state.crossing_fds(prep.state_fd), prep.state_fd)
    except OSError as e:  # (os.write: sys.stderr's lock may be held by a thread of the daemon at the fork)
        os.write(2, f"cprd standby: cannot run cprd: {e}\n".encode(errors="replace"))
    return 1


# -- the standby: the exec'd program, until the daemon dies ------------------------------------------
class _Words:
    """What the daemon writes on our pipe: R (retired), p (its answers to our probes). Read to the
    end each time (an R may wait behind many p); after the daemon's death all it wrote is there."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.heard = trio.current_time()  # the daemon's last answer
        self.retired = self.closed = False
        if fd is not None:
            os.set_blocking(fd, False)

    def drain(self) -> None:
        while self.fd is not None and not self.closed:
            try:
                got = os.read(self.fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                got = b""
            if not got:
                self.closed = True
            self.retired |= RETIRE in got
            if PONG in got:
                self.heard = trio.current_time()


def _watch_daemon(pid: int) -> int | None:
    """A pidfd of the daemon; None if it is gone already (our parent no longer: it died before we
    looked, and the pid may be another's). Any other failure raises: with no way to watch the
    daemon, a standby must never take anything over."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if os.getppid() != pid:
        os.close(pidfd)
        return None
    return pidfd


async def stand_by(table: Any, state: Any) -> TakeOver | None:
    """Apply the daemon's journal as it comes until the daemon dies (the take-over: what to serve
    with) or retires us (None). Nothing else happens here: the caller serves. Whatever the way out,
    a take-over happens only once the daemon is gone and nothing it wrote says retired."""
    from .replies import ReplyCache

    with open("/proc/self/comm") as f:
        name = f.read().strip()
    proc.set_name("cprd-standby")
    out = TakeOver()
    answers = ReplyCache()
    answers.take_from(state.results)
    journal = Journal(state.standin.journal_fd, table, out, strict=False)
    words = _Words(state.guardian_fd)
    pidfd = None
    try:
        try:
            pidfd = _watch_daemon(state.pid)
        except OSError as e:
            log.error("event=standby_cannot_watch pid=%d error=%r note=it-exits;-the-daemon-forks-another", state.pid,
                      str(e))
            return None
        log.info("event=standing_by pid=%d for=%d entries=%d", os.getpid(), state.pid, len(table))
        try:
            journal.sock.send(UP)
        except OSError:
            pass
        if pidfd is not None:
            async with trio.open_nursery() as n:
                n.start_soon(_probe, state, pidfd, journal.sock, words, n.cancel_scope)
                while not words.retired:
                    fds = [pidfd] + ([journal.sock.fileno()] if not journal.ended else [])
                    await first_readable(fds + ([words.fd] if words.fd is not None and not words.closed else []))
                    words.drain()
                    if not journal.ended:
                        journal.read()
                        answers.take_from(out.answers)
                        out.answers.clear()
                    if _readable(pidfd):
                        break
                n.cancel_scope.cancel()
        words.drain()  # all the daemon ever wrote: a deliberate end said R first
        if words.retired:
            log.info("event=standby_retired pid=%d", os.getpid())
            return None
        out.t_asked = trio.current_time()
        proc.set_name(name)  # the daemon's name again: a standby no more
        journal.read()  # the rest: all the daemon ever sent
        answers.take_from(out.answers)
        out.answers = answers.items()
        log.warning("event=daemon_died pid=%d note=its-standby-takes-over-in-pid-%d journal_messages=%d entries=%d",
                    state.pid, os.getpid(), out.messages, len(table))
        return out
    finally:
        journal.close()
        for fd in (pidfd, words.fd):
            if fd is not None:
                os.close(fd)


async def _probe(state: Any, pidfd: int, sock: socket.socket, words: _Words, scope: trio.CancelScope) -> None:
    """The daemon alive is not enough: it must answer. P on the journal every PROBE_EVERY_S, which the
    daemon's event loop answers p on our pipe; none for 3 x answer_timeout (at least PROBE_MIN_S): it
    is stopped or frozen, and its clients wait. It is killed (SIGKILL through its pidfd, which a
    stopped or frozen process cannot ignore); its end, seen by the caller, is the take-over: never
    two serving. (Not a request on the control socket: its path may be gone while the daemon serves
    on the socket it holds.) Silence is counted only while we ran: a tick that comes late (we were
    stopped, or busy) starts it again."""
    limit = max(PROBE_MIN_S, 3 * float(state.config.get("answer_timeout", 1.0)))
    last = trio.current_time()
    while True:
        await trio.sleep(PROBE_EVERY_S)
        now = trio.current_time()
        if now - last > 2 * PROBE_EVERY_S:
            words.heard = now
        last = now
        try:
            sock.send(PING)
        except OSError:
            pass  # (its end is closed: it is gone, and its pidfd says so)
        words.drain()
        if words.retired:
            scope.cancel()  # (the caller sees it)
            return
        if now - words.heard >= limit:
            log.error("event=daemon_silent pid=%d seconds=%.1f note=killed;-its-standby-takes-over", state.pid,
                      now - words.heard)
            proc.kill(pidfd, state.pid)
            return


def _readable(fd: int) -> bool:
    p = select.poll()  # (select() cannot take an fd above 1023)
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))
