"""The stand-in of an in-place upgrade: a fork of the old program that serves while the new one starts.

Theory of operation
-------------------
Starting a new program takes a few hundred milliseconds (an interpreter, trio, cprd), too long for
clients to wait. So the old program forks first (``Daemon.upgrade``): the child, the *stand-in*,
inherits the table, the listening socket, every client connection and the event loop, and goes on
serving as if nothing happened, while the parent (the daemon's pid) writes the state of the table
as it was at the fork and execs the new program with copies of every fd (upgrade.py). The parent
never returns to the event loop after the fork: from then on the stand-in is the daemon.

What the stand-in changes meanwhile reaches the new program through a SOCK_SEQPACKET pair (the
journal: upgrade.py): every save and delete of the table, with the fd of each save attached, and
the answer to each mutation, sent (``Stream.flush``) before the client gets that answer. The
socket's queue holds them, fds included, even if the stand-in dies; so the new program has the
state at the fork plus every change acknowledged since.

Once the new program has restored the state, it asks the stand-in to stop (T). The stand-in
freezes mutations (they wait), stops accepting (connections wait in the backlog), sends the last
changes and Done (D). The new program applies them, sends Taken (K) and starts accepting; the
stand-in lets its waiting mutations go unanswered (their clients retry and reach the new program)
and exits. Only these few milliseconds are unserved, whatever the size of the table.

Failures (each leaves exactly one owner and loses nothing acknowledged):

- the stand-in dies: its journal is in the socket; the new program applies it and takes over;
- the new program dies, or has not taken over by the deadline (the stand-in then kills its
  process group): the stand-in keeps the table and serves on, in its own pid, and answers the
  client that asked for the upgrade (rolled back). It tells the guardian so on a pipe ("O"), and
  the guardian leaves without restoring; had it handed the table over already ("K"), the
  guardian restores, since the new program that held it is gone;
- both die: the guardian restores the state at the fork plus the journal, of which it receives
  its own copy (the new program consumes what it reads) (upgrade.py);
- a change cannot be journaled (a full queue: sends never block): the stand-in stops the new
  program before it answers that change and keeps the table (``Stream``); a journal that arrives
  with a hole (Done counts the messages) is never taken over from.

Once it has sent Done, the stand-in answers nothing more, reads included: the new program may
serve already.

What this module may know: trio, sockets, the table, the journal's format (upgrade.py).
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import trio

from .. import fault, sdnotify
from .. import upgrade as up
from ..fds import OwnedFds
from ..table import Op, Saved
from .lifecycle import Phase

log = logging.getLogger("cprd.standin")

SCM_MAX_FD = 253
HOLDERS_TIMEOUT = 10.0  # how long the stand-in waits for a new program it killed to be gone


class Stream:
    """Collects the table's changes and the answers to mutations; ``flush`` sends them as journal
    messages. Installed as the table's ``stream`` in the stand-in only.

    All or nothing: a change that cannot be journaled to both readers (a full queue, an fd that
    cannot be copied) breaks the stream, and ``on_break`` runs at once, before the client that
    made the change hears of it: the stand-in then keeps the table (it stops the new program), so
    no reader ever holds a journal with a hole in it that it could take over from."""

    def __init__(self, socks: list[socket.socket], on_break: Callable[[str], None]) -> None:
        self.socks = list(socks)  # to the new program, to the guardian
        for sock in self.socks:
            _roomy(sock)
        self.on_break = on_break
        self.ops: list[list] = []
        self.fds = OwnedFds()  # copies of the fds of the "S" ops not sent yet
        self.answers: list[list] = []
        self.sent = 0  # messages sent (to each reader): Done tells the new program how many
        self.broken: str | None = None

    def op(self, op: Op) -> None:
        if self.broken:
            return
        if isinstance(op, Saved):
            e = op.entry
            try:  # a copy: the entry may be deleted, and its fd closed, before the flush
                self.fds.fds.append(fcntl.fcntl(e.fd, fcntl.F_DUPFD_CLOEXEC, 3))
            except OSError as err:
                self._break(f"cannot copy fd {e.fd} of ({e.name!r}, {e.id}): {err}")
                return
            i = e.ident
            self.ops.append(["S", e.name, e.id, int(i.kind), i.mode, i.dev, i.ino, i.flags])
        else:
            self.ops.append(["R", *op.key])

    def answer(self, rid: str, reply: dict[str, Any]) -> None:
        if rid and not self.broken:
            self.answers.append([rid, reply])

    def flush(self) -> None:
        """Send what was collected, at most SCM_MAX_FD fds a message, answers with the last."""
        while (self.ops or self.answers) and not self.broken:
            n_fds, cut = 0, 0
            for cut, op in enumerate(self.ops, 1):
                n_fds += op[0] == "S"
                if n_fds == SCM_MAX_FD:
                    break
            else:
                cut = len(self.ops)
            ops, self.ops = self.ops[:cut], self.ops[cut:]
            fds, self.fds.fds = self.fds.fds[:n_fds], self.fds.fds[n_fds:]
            answers = [] if self.ops else self.answers
            if not self.ops:
                self.answers = []
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            msg = up.encode_journal(ops, answers)
            try:
                for reader, sock in zip(("the new program", "the guardian"), self.socks):
                    try:
                        sock.sendmsg([msg], anc)
                    except BlockingIOError:
                        raise OSError(f"{reader}'s queue is full after {self.sent} messages (it has not read "
                                      "them yet; a non-root daemon's queue holds a few hundred)") from None
                    except OSError as err:
                        raise OSError(f"cannot send to {reader}: {err.strerror or err}") from None
            except OSError as err:
                self._break(f"the journal could not be sent: {err}")
            else:
                self.sent += 1
            finally:
                for fd in fds:
                    os.close(fd)

    def _break(self, why: str) -> None:
        log.error("event=standin_journal_broken reason=%r note=the-stand-in-keeps-the-table", why)
        self.broken = why
        self.ops, self.answers = [], []
        self.fds.close()
        self.on_break(why)


def _roomy(sock: socket.socket) -> None:
    """A send buffer as large as allowed: the journal waits in it while the new program starts
    (root: 16 MiB, some 13,000 messages; others: net.core.wmem_max, a few hundred). Never blocking:
    a full queue breaks the stream rather than stalling every client."""
    sock.setblocking(False)
    for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
            return
        except OSError:
            continue


class StandIn:
    """The stand-in's side of an upgrade, run by the task of the request that asked for it."""

    def __init__(self, daemon: Any, jsock: socket.socket, gsock: socket.socket, to_guardian: int, parent_watch: int,
                 parent_pid: int, timeout: float, notify_socket: str | None, program: list[str]) -> None:
        self.d, self.sock, self.gsock, self.watch, self.parent = daemon, jsock, gsock, parent_watch, parent_pid
        self.to_guardian = to_guardian  # a pipe: TAKEN or STANDIN_OWNS, once (upgrade._standin_keeps_it)
        self.timeout, self.notify_socket, self.program = timeout, notify_socket, program
        self.stream = Stream([jsock, gsock], on_break=self._journal_broken)

    def start(self) -> None:
        """Right after the fork, before any other task runs: every change from now on is journaled."""
        st = self.d.st
        st.table.stream = self.stream.op
        st.stream = self.stream
        self.d.life.to(Phase.STANDING_IN)
        self.d.life.committing = True  # the listening socket is the new program's too: never unlink its path
        log.info("event=standin pid=%d for=%d entries=%d", os.getpid(), self.parent, len(st.table))

    async def serve(self) -> dict[str, Any] | None:
        """Stand in until the new program has taken over (None: this process is done and exits) or
        is gone (the answer, rolled back, for the client that asked)."""
        d, life = self.d, self.d.life
        fault.point("standin", "forked", sock=self.stream.socks)
        why = await self._wait_for(up.TAKE_OVER)
        if why is None:
            log.info("event=standin_asked_to_stop entries=%d", len(d.st.table))
            fault.point("standin", "takeover")
            life.freeze()
            await d.endpoint.stop_accepting()
            d.st.flush()
            why = "journal" if self.stream.broken else None
        if why is None:
            await self._send_done()
            # From now on the new program may serve: old connections must not read the table here.
            life.freeze(everything=True)
            await fault.apoint("standin", "done")
            why = await self._wait_for(up.TAKEN)
            if why is None:
                self._tell_guardian(up.TAKEN)  # were the new program to die now, the guardian restores
                log.info("event=standin_taken_over by=%d journal_messages=%d", self.parent, self.stream.sent)
                d.st.table.stream = d.st.stream = None
                life.to(Phase.HANDED_OFF)
                d.endpoint.closing = True
                life.thaw()  # waiting mutations hang up: their clients retry and reach the new program
                d.nursery_start(self._exit_soon)
                return None
        if life.frozen:
            life.thaw()
            d.endpoint.start_accepting()
        return await self._keep(why)

    async def _send_done(self) -> None:
        """Done, with how many messages came before (the new program checks it got them all). The
        new program reads on since it asked, so a full queue has room again soon; if it does not
        within the deadline, or the new program is gone, waiting for Taken tells which."""
        done = up.DONE + str(self.stream.sent).encode()
        with trio.move_on_after(self.timeout):
            while True:
                try:
                    self.sock.send(done)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock.fileno())
                except OSError as e:
                    log.warning("event=standin_done_failed error=%r", str(e))
                    return
        log.warning("event=standin_done_failed error='no room within %g s'", self.timeout)

    async def _wait_for(self, word: bytes) -> str | None:
        """None once `word` arrives; else why not: the new program died, or hung (then it is killed
        with its process group)."""
        with trio.move_on_after(self.timeout):
            while True:
                which = await _first_readable([self.sock.fileno(), self.watch])
                if which == self.watch:
                    return "died"
                try:
                    got = self.sock.recv(16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    got = b""
                if got == word:
                    return None
                if got == b"":  # nobody holds the other end any more: the new program is gone
                    return "died"
                log.warning("event=standin_unexpected message=%r", got[:16])
        return "hung"

    def _stop_new_program(self) -> None:
        """SIGKILL the new program (through its pidfd: it may have left its process group) and its
        process group (what it forked before it confirmed)."""
        try:
            signal.pidfd_send_signal(self.watch, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.killpg(self.parent, signal.SIGKILL)
        except OSError:
            pass

    def _journal_broken(self, why: str) -> None:
        """The journal has a hole: no one may take over from it. At once, before the client whose
        change could not be journaled hears of it: stop the new program and tell the guardian that
        we keep the table (it reads that once the new program is gone, and leaves)."""
        self._stop_new_program()
        self._tell_guardian(up.STANDIN_OWNS)

    async def _keep(self, why: str) -> dict[str, Any]:
        """The new program is gone, or must go: keep the table, in this pid."""
        d, st = self.d, self.d.st
        self._tell_guardian(up.STANDIN_OWNS)  # the guardian leaves: nobody restores an older table beside us
        self._stop_new_program()  # dead already, or silent, or hung, or its journal broke: serve alone
        with trio.move_on_after(HOLDERS_TIMEOUT):
            await trio.lowlevel.wait_readable(self.watch)
        st.table.stream = st.stream = None
        self.stream.fds.close()
        self.sock.close()
        self.gsock.close()
        os.close(self.watch)
        d.life.to(Phase.SERVING)
        d.life.committing = False
        if self.notify_socket is not None:
            os.environ["NOTIFY_SOCKET"] = self.notify_socket
        sdnotify.mainpid(os.getpid())
        sdnotify.ready(d.status_line())
        prog = self.program[0] if self.program else "the new program"
        if self.stream.broken:
            reason = (f"{self.stream.broken}; the stand-in stopped the new program ({prog}) and keeps serving the "
                      f"table in pid {os.getpid()}; upgrade again when fewer changes are in flight")
        elif why == "died":
            reason = (f"the new program ({prog}) died before it confirmed; the stand-in (pid {os.getpid()}) keeps "
                      "serving the table")
        else:
            reason = (f"the new program ({prog}) did not confirm within {self.timeout:g} s; the stand-in killed its "
                      f"process group and keeps serving the table in pid {os.getpid()}")
        log.error("event=upgrade_rolled_back pid=%d reason=%r entries=%d", os.getpid(), reason, len(st.table))
        return {"pid": os.getpid(), "entries": len(st.table), "ms": 0.0, "rolled_back": True, "reason": reason,
                "program": self.program, "previous_pid": self.parent}


    async def _exit_soon(self) -> None:
        """Exit once the waiting requests have hung up, at once: no interpreter teardown of a large
        table (tens of ms of CPU that the new program, on the same cores, needs now)."""
        up.lowest_priority()
        await trio.sleep(0.05)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(0)

    def _tell_guardian(self, word: bytes) -> None:
        if self.to_guardian < 0:
            return
        try:
            os.write(self.to_guardian, word)
        except OSError:
            pass  # no guardian (it left once the new program confirmed, or never started)
        os.close(self.to_guardian)
        self.to_guardian = -1


async def _first_readable(fds: list[int]) -> int:
    """The first of fds to become readable."""
    winner: list[int] = []
    async with trio.open_nursery() as n:
        for fd in fds:
            async def one(fd: int = fd) -> None:
                await trio.lowlevel.wait_readable(fd)
                if not winner:
                    winner.append(fd)
                n.cancel_scope.cancel()
            n.start_soon(one)
    return winner[0]


# -- the new program's side ------------------------------------------------------------------------
async def take_over(table: Any, journal_fd: int, standin_pid: int | None, timeout: float,
                    strict: bool = True) -> dict[str, Any]:
    """Apply the stand-in's journal to `table` (restored from the state at the fork), ask it to stop,
    apply the rest, and tell it we have taken over. Returns the answers it gave ("answers"), whether
    it handed over ("handed_over": False if it died) and when we asked (``t_asked``, trio time).

    A journal with a hole (a message that does not apply, a count in Done that differs from what
    arrived) raises UpgradeError before we tell the stand-in anything: we must not take over, and
    the stand-in, seeing us gone, keeps the table. Unless not `strict` (a rollback restoring from
    the guardian's copy, the last resort): then what applies is kept and the rest logged."""
    raw = socket.socket(fileno=journal_fd)
    raw.setblocking(False)
    out: dict[str, Any] = {"answers": [], "messages": 0, "handed_over": False, "strict": strict}
    try:
        _drain(raw, table, out)  # what it sent while we started
        fault.point("upgrade", "restored")
        out["t_asked"] = trio.current_time()
        try:
            raw.send(up.TAKE_OVER)
        except OSError:
            pass  # it is gone: its journal is complete
        fault.point("upgrade", "asked")
        end: bytes | None = None
        with trio.move_on_after(timeout) as cs:
            while True:
                await trio.lowlevel.wait_readable(raw.fileno())
                end = _drain(raw, table, out)
                if end is not None:
                    break
        if cs.cancelled_caught:  # it does not answer (stopped?): what it acknowledged is in the journal
            log.warning("event=standin_silent pid=%s seconds=%g note=killed;taking-over-from-its-journal",
                        standin_pid, timeout)
            _kill_child(standin_pid)
            with trio.move_on_after(10):
                while _drain(raw, table, out) is None:
                    await trio.lowlevel.wait_readable(raw.fileno())
        elif end == up.DONE:
            out["handed_over"] = True
            try:
                raw.send(up.TAKEN)
            except OSError:
                pass
        else:  # the journal ended without Done: the stand-in is gone; make sure (it is our child)
            await _gone(standin_pid)
        fault.point("upgrade", "taken")
    finally:
        raw.close()
    return out


def _kill_child(pid: int | None) -> bool:
    """SIGKILL `pid` if it is our child (the stand-in is the new program's: forked by the old program
    in this pid; a pid of ours cannot be reused before we reap it). A rollback that restores from the
    guardian's copy runs in another pid and kills nothing: the stand-in there is gone or going."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) != os.getpid():
                return False
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        return False
    return True


async def _gone(pid: int | None) -> None:
    """Make sure the stand-in is dead before we serve: it cannot serve beside us. Bounded: a
    SIGKILLed process ends."""
    if _kill_child(pid):
        with trio.move_on_after(HOLDERS_TIMEOUT):
            while up.alive(pid):
                await trio.sleep(0.002)


def _drain(raw: socket.socket, table: Any, out: dict[str, Any]) -> bytes | None:
    """Apply every journal message queued; DONE when it came, b"" at the end of the journal (the
    stand-in is gone), None when nothing more is queued for now."""
    while True:
        try:
            data, anc, flags, _ = raw.recvmsg(up.JOURNAL_MAX, socket.CMSG_SPACE(SCM_MAX_FD * 4),
                                              socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            return b""
        fds = OwnedFds()
        for level, type_, blob in anc:
            if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(blob[: len(blob) - len(blob) % 4])
                fds.fds.extend(got)
        with fds:
            if not data:
                return b""
            try:
                if data[:1] == up.DONE:
                    if data[1:] != str(out["messages"]).encode():
                        raise up.UpgradeError(f"the stand-in sent {data[1:].decode(errors='replace')!r} journal "
                                              f"messages and {out['messages']} arrived whole")
                    return up.DONE
                if data[:1] != up.JOURNAL or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise up.UpgradeError(f"a journal message of kind {data[:1]!r} arrived with flags {flags:#x}")
                out["answers"].extend(up.apply_journal(table, data, fds.fds))
                out["messages"] += 1
            except up.UpgradeError as e:
                log.error("event=journal_message_failed error=%r strict=%s", str(e), out["strict"])
                if out["strict"]:
                    raise
                if data[:1] == up.DONE:
                    return up.DONE
