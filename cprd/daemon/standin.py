"""The stand-in of an in-place upgrade: a fork of the old program that serves while the new one
starts. A thin driver of the stand-in's session (protocol/upgrade.py): it turns what it sees into
events and carries the session's actions out.

Theory of operation
-------------------
Starting a new program takes a few hundred milliseconds (an interpreter, trio, cprd), too long for
clients to wait. So the old program forks first (``Daemon.upgrade``): the child, the *stand-in*,
inherits the table, the listening socket, every client connection and the event loop, and goes on
serving as if nothing happened, while the parent (the daemon's pid) writes the state of the table
as it was at the fork and execs the new program with copies of every fd (upgrade.py). The parent
never returns to the event loop after the fork: from then on the stand-in is the daemon.

What the stand-in changes meanwhile reaches the new program and the guardian as the journal
(``Stream``): every save and delete of the table, with the fd of each save attached, and the
answer to each mutation, sent before the client gets that answer. The sockets' queues hold them,
fds included, even if the stand-in dies.

What it sees becomes an event of its session: T or K on the journal (K checked against the new
program's pidfd: rule 4), the new program's pidfd (its end), the end of the guardian's copy (the
guardian left), a journal that cannot be sent (``Stream``), and the deadline of its current wait.
What the session answers it does: freeze, send Done, release (B) and exit; or fence the new
program, keep the table, tell the guardian (O), and once the guardian is gone (or fenced) serve
alone and answer the client that asked for the upgrade (rolled back).

What this module may know: trio, sockets, the table, the session and the journal's format.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import trio

from .. import fault, proc, scm, sdnotify
from ..fds import OwnedFds
from ..protocol import upgrade as pu
from ..protocol.upgrade import Act, Deadlines, Ev, Fence, JournalTo, Msg, Role, Send, Session, St
from ..table import Op, Saved
from .lifecycle import Phase

log = logging.getLogger("cprd.standin")

READERS = (Role.NEW, Role.GUARDIAN)


class Stream:
    """Collects the table's changes and the answers to mutations; ``flush`` sends them as journal
    messages to its readers. Installed as the table's ``stream`` in the stand-in only.

    All or nothing: a change that cannot be journaled to every reader (a full queue, an fd that
    cannot be copied) breaks the stream, and ``on_break`` runs at once, before the client that made
    the change hears of it (the stand-in then fences the others: rule 1)."""

    def __init__(self, socks: dict[Role, socket.socket], on_break: Callable[[str, Role | None], None],
                 on_guardian_gone: Callable[[], None] = lambda: None) -> None:
        self.socks = socks
        for sock in socks.values():
            _roomy(sock)
        self.readers: frozenset[Role] = frozenset(socks)
        self.on_break, self.on_guardian_gone = on_break, on_guardian_gone
        self.ops: list[list] = []
        self.fds = OwnedFds()  # copies of the fds of the "S" ops not sent yet
        self.answers: list[list] = []
        self.sent = 0  # J messages sent to the new program: Done tells it how many
        self.broken: str | None = None

    def op(self, op: Op) -> None:
        if self.broken or not self.readers:
            return
        if isinstance(op, Saved):
            e = op.entry
            try:  # a copy: the entry may be deleted, and its fd closed, before the flush
                self.fds.fds.append(fcntl.fcntl(e.fd, fcntl.F_DUPFD_CLOEXEC, 3))
            except OSError as err:
                self._break(f"cannot copy fd {e.fd} of ({e.name!r}, {e.id}): {err}")
                return
            self.ops.append(pu.save_op(e.name, e.id, e.ident))
        else:
            self.ops.append(pu.remove_op(*op.key))

    def answer(self, rid: str, reply: dict[str, Any]) -> None:
        if rid and not self.broken and self.readers:
            self.answers.append([rid, reply])

    def flush(self) -> None:
        """Send what was collected, at most SCM_MAX_FD fds a message, answers with the last."""
        while (self.ops or self.answers) and not self.broken and self.readers:
            n_fds, cut = 0, 0
            for cut, op in enumerate(self.ops, 1):
                n_fds += op[0] == "S"
                if n_fds == scm.SCM_MAX_FD:
                    break
            else:
                cut = len(self.ops)
            ops, self.ops = self.ops[:cut], self.ops[cut:]
            fds, self.fds.fds = self.fds.fds[:n_fds], self.fds.fds[n_fds:]
            answers = [] if self.ops else self.answers
            if not self.ops:
                self.answers = []
            msg = pu.encode_journal(ops, answers)
            gone: Role | None = None  # a reader whose end is closed (it died)
            try:
                for role in READERS:
                    if role not in self.readers:
                        continue
                    if role is Role.NEW and "drop" in fault.point("standin", "journal", self.sent):
                        continue  # (a test's fault: the new program's journal gets a hole)
                    try:
                        scm.send_nowait(self.socks[role], msg, fds)
                    except BlockingIOError:
                        raise OSError(f"the {role.value}'s queue is full after {self.sent} messages (it has not read "
                                      "them yet; a non-root daemon's queue holds a few hundred)") from None
                    except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as err:
                        if role is Role.GUARDIAN:  # its end closed: it left or died, and can never restore
                            self.on_guardian_gone()  # (the session drops it from the readers)
                            continue
                        gone = role
                        raise OSError(f"cannot send to the {role.value}: {err.strerror or err}") from None
                    except OSError as err:
                        raise OSError(f"cannot send to the {role.value}: {err.strerror or err}") from None
            except OSError as err:
                self._break(f"the journal could not be sent: {err}", gone)
            else:
                if Role.NEW in self.readers:
                    self.sent += 1
                    fault.point("standin", "journaled", self.sent - 1)  # (a test's: queued, not yet answered)
            finally:
                OwnedFds(fds).close()

    def stop(self) -> None:
        """Journal nothing more (the stand-in serves alone)."""
        self.readers = frozenset()
        self.ops, self.answers = [], []
        self.fds.close()

    def _break(self, why: str, gone: Role | None = None) -> None:
        log.error("event=standin_journal_broken reason=%r note=the-stand-in-fences-the-others-and-keeps-the-table", why)
        self.broken = why
        self.ops, self.answers = [], []
        self.fds.close()
        self.on_break(why, gone)


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

    def __init__(self, daemon: Any, journal: socket.socket, copy: socket.socket, words: int, new_pidfd: int,
                 parent_pid: int, deadlines: Deadlines, notify_socket: str | None, program: list[str],
                 group: int | None = None) -> None:
        self.d, self.journal, self.copy, self.words = daemon, journal, copy, words
        self.new_pidfd, self.parent = new_pidfd, parent_pid
        self.deadlines, self.notify_socket, self.program = deadlines, notify_socket, program
        self.group = group  # the new program's process group, to kill with it (None: others share it)
        self.session = Session.standin()
        self.stream = Stream({Role.NEW: journal, Role.GUARDIAN: copy}, on_break=self._broken,
                             on_guardian_gone=self._guardian_gone)
        self.guardian_pidfd: int | None = None  # sent by the old program once it forked the guardian
        self.guardian_word = os.fstat(words).st_ino  # who holds the other end of this pipe is the guardian
        self._queue: list[Ev | Msg] = []
        self._wake = trio.Event()
        self._epoch = 0  # counts transitions: the actions of an older one are not carried on
        self._new_ended = trio.Event()
        self.reason = ""

    def start(self) -> None:
        """Right after the fork, before any other task runs: every change from now on is journaled."""
        st = self.d.st
        st.table.stream = self.stream.op
        st.stream = self.stream
        self.d.life.to(Phase.STANDING_IN)
        self.d.life.committing = True  # the listening socket is the new program's too: never unlink its path
        log.info("event=standin pid=%d for=%d entries=%d", os.getpid(), self.parent, len(st.table))
        log.info("event=shared pid=%d why=standing-in", os.getpid())

    # -- what it sees ----------------------------------------------------------------------------
    def _see(self, item: Ev | Msg) -> None:
        self._queue.append(item)
        self._wake.set()

    async def _read_journal(self) -> None:
        """T and K from the new program; the guardian's pidfd from the old program."""
        while True:
            await trio.lowlevel.wait_readable(self.journal.fileno())
            try:
                data, fds, _, _ = scm.recv_nowait(self.journal, 64)
            except BlockingIOError:
                continue
            with fds:
                if data[:1] == Msg.GUARDIAN_PIDFD and len(fds) == 1 and self.guardian_pidfd is None:
                    self.guardian_pidfd = fds.take()[0]
                elif data[:1] in (Msg.TAKE_OVER, Msg.TAKEN):
                    self._see(Msg(data[:1]))
                elif not data:
                    return  # every holder of the other end closed it; the pidfd tells the new program's end
                else:
                    log.warning("event=standin_unexpected message=%r", data[:16])

    async def _watch_new(self) -> None:
        await trio.lowlevel.wait_readable(self.new_pidfd)
        self._new_ended.set()
        self._see(Ev.NEW_GONE)

    async def _watch_guardian(self) -> None:
        """The guardian never writes to its copy: its end becomes readable when it closes (it left
        or died, and the old program closed its own copy at the exec)."""
        await trio.lowlevel.wait_readable(self.copy.fileno())
        self._see(Ev.GUARDIAN_GONE)

    def _guardian_gone(self) -> None:
        """A send to the guardian found its end closed, inside a mutation: it can never restore; the
        session says what follows (the journal goes to the new program alone, or, keeping the table,
        the stand-in serves alone)."""
        before = self.session.state
        self._transition(self.session.on(Ev.GUARDIAN_GONE), now_only=True, moved=self.session.state is not before)

    def _broken(self, why: str, gone: Role | None = None) -> None:
        """The journal broke, inside a mutation, before its answer: the session decides at once (it
        fences the others, synchronously: the kill is what matters), the rest follows in serve()."""
        if self.session.state is St.SERVING and (gone is Role.NEW or proc.ended(self.new_pidfd)):
            # it broke because the new program died (its end closed): say so
            self.reason = self._keep_reason(St.SERVING, Ev.NEW_GONE)
        elif self.session.state is St.SERVING:  # (while it keeps the table, only the guardian's queue can break)
            self.reason = (f"{why}; the stand-in killed the new program and keeps serving the table in pid "
                           f"{os.getpid()}; upgrade again when fewer changes are in flight")
        self._transition(self.session.on(Ev.BROKEN), now_only=True)

    # -- the session's decisions --------------------------------------------------------------------
    def _decide(self, item: Ev | Msg) -> tuple:
        before = self.session.state
        if item is Msg.TAKEN:
            actions = self.session.on_msg(Msg.TAKEN, not proc.ended(self.new_pidfd))
        elif isinstance(item, Msg):
            actions = self.session.on_msg(item)
        else:
            actions = self.session.on(item)
        # (KEEPING, or straight on to OWNER when the guardian had gone already: nobody to wait for)
        if self.session.state in (St.KEEPING, St.OWNER) and before not in (St.KEEPING, St.OWNER):
            self.reason = self._keep_reason(before, item)
        return actions

    def _keep_reason(self, before: St, item: Ev | Msg) -> str:
        prog = self.program[0] if self.program else "the new program"
        if item is Ev.TIMEOUT and before is St.SERVING:
            return (f"the new program ({prog}) did not ask to take over within {self.deadlines.start_s:g} s; the "
                    f"stand-in killed its process group and keeps serving the table in pid {os.getpid()}")
        if item is Ev.TIMEOUT:
            return (f"the new program ({prog}) did not answer within {self.deadlines.answer_s:g} s; the stand-in "
                    f"killed its process group and keeps serving the table in pid {os.getpid()}")
        return (f"the new program ({prog}) died before it took over; the stand-in (pid {os.getpid()}) keeps serving "
                "the table")

    def _transition(self, actions: tuple, now_only: bool = False, moved: bool = True) -> list:
        """Carry out what must happen at once (sends, kills, where the journal goes); return the
        rest, which awaits, for serve() to carry out. `moved`: the session changed state, so that
        what an older transition left to do no longer holds (a journal that broke meanwhile)."""
        if moved:
            self._epoch += 1
        later = []
        for a in actions:
            if isinstance(a, Fence):
                self._kill(a.peer)
                later.append(a)  # wait for its end
            elif isinstance(a, JournalTo):
                self.stream.readers = a.readers
                if not a.readers:
                    self._serve_alone()
            elif now_only:
                later.append(a)
            else:
                later.append(a)
        if now_only:
            if later or moved:
                self._queue.append(("later", later, self._epoch))  # type: ignore[arg-type]
                self._wake.set()
            return []
        return later

    def _kill(self, peer: Role) -> None:
        if peer is Role.NEW:
            proc.kill(self.new_pidfd, group=self.group)
            log.warning("event=standin_fenced peer=new-program pid=%d", self.parent)
        elif self.guardian_pidfd is not None:
            proc.kill(self.guardian_pidfd)
            log.warning("event=standin_fenced peer=guardian")
        else:  # the old program died before it told us: the guardian is whoever holds our pipe's other end
            killed = proc.kill_holders((os.fstat(self.words).st_dev, self.guardian_word), {os.getpid()})
            log.warning("event=standin_fenced peer=guardian pids=%s", killed)

    async def _wait_ended(self, peer: Role) -> None:
        with trio.move_on_after(self.deadlines.fence_s):
            if peer is Role.NEW:
                await self._new_ended.wait()
            elif self.guardian_pidfd is not None:
                await trio.lowlevel.wait_readable(self.guardian_pidfd)

    async def _carry_out(self, actions: list, epoch: int) -> None:
        d, life = self.d, self.d.life
        for a in actions:
            if epoch != self._epoch:
                return  # a later transition (a journal that broke meanwhile) decided otherwise
            if isinstance(a, Fence):
                await self._wait_ended(a.peer)
            elif isinstance(a, Send):
                await self._send(a)
            elif a is Act.FREEZE:
                fault.point("standin", "takeover")
                life.freeze()
            elif a is Act.STOP_ACCEPTING:
                await d.endpoint.stop_accepting()
            elif a is Act.FLUSH:
                d.st.flush()
            elif a is Act.FREEZE_ALL:
                # From now on the new program may serve: old connections must not read the table here.
                life.freeze(everything=True)
                await fault.apoint("standin", "done")
            elif a is Act.THAW:
                life.thaw()
                if not d.endpoint.accepting:
                    d.endpoint.start_accepting()
                if self.notify_socket is not None:
                    os.environ["NOTIFY_SOCKET"] = self.notify_socket
                sdnotify.mainpid(os.getpid())
                sdnotify.ready(d.status_line())
            elif a is Act.LEAVE:
                self._leave()

    async def _send(self, a: Send) -> None:
        if a.to is Role.GUARDIAN:
            try:
                os.write(self.words, a.msg)
            except OSError:
                pass  # no guardian any more (it left, or never started)
            return
        data = pu.encode_done(self.stream.sent) if a.msg is Msg.DONE else a.msg.value
        with trio.move_on_after(self.deadlines.answer_s):  # a full queue: the new program reads on since it asked
            while True:
                try:
                    scm.send_nowait(self.journal, data)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.journal.fileno())
                except OSError as e:
                    log.warning("event=standin_send_failed msg=%r error=%r", a.msg, str(e))
                    return
        log.warning("event=standin_send_failed msg=%r error='no room within %g s'", a.msg, self.deadlines.answer_s)

    def _leave(self) -> None:
        """Released: answer nothing more; waiting requests hang up (their clients retry at the new
        program), and the process exits."""
        d = self.d
        log.info("event=standin_released to=%d journal_messages=%d", self.parent, self.stream.sent)
        d.st.table.stream = d.st.stream = None
        d.life.to(Phase.HANDED_OFF)
        d.endpoint.closing = True
        d.life.thaw()
        d.nursery_start(self._exit_soon)

    def _serve_alone(self) -> None:
        st = self.d.st
        st.table.stream = st.stream = None
        self.stream.stop()

    # -- the loop -------------------------------------------------------------------------------
    async def serve(self) -> dict[str, Any] | None:
        """Stand in until the table is handed over (None: this process exits and the new program
        answers) or kept (the answer, rolled back, for the client that asked)."""
        fault.point("standin", "forked", sock=[self.stream.socks[r] for r in READERS if r in self.stream.socks])
        deadline = trio.current_time() + self.deadlines.start_s
        async with trio.open_nursery() as n:
            n.start_soon(self._read_journal)
            n.start_soon(self._watch_new)
            n.start_soon(self._watch_guardian)
            while not self.session.done:
                if not self._queue:
                    self._wake = trio.Event()
                    with trio.move_on_at(deadline):
                        await self._wake.wait()
                    if not self._queue:
                        self._queue.append(Ev.TIMEOUT)
                item = self._queue.pop(0)
                before = self.session.state
                if isinstance(item, tuple):  # what a decision made inside a mutation left to await
                    _, later, epoch = item
                    moved = True
                else:
                    actions = self._decide(item)
                    moved = self.session.state is not before
                    later = self._transition(actions, moved=moved)
                    epoch = self._epoch
                await self._carry_out(later, epoch)
                waits = self.session.waits
                if waits is not None and moved:
                    # a new wait starts now (after the actions: a fence may have taken fence_s)
                    deadline = trio.current_time() + getattr(self.deadlines, waits)
            n.cancel_scope.cancel()
        if self.session.state is St.RELEASED:
            return None
        return self._kept()

    def _kept(self) -> dict[str, Any]:
        """Serving alone: close what the upgrade made, answer the client that asked."""
        d, st = self.d, self.d.st
        self._serve_alone()
        for sock in (self.journal, self.copy):
            sock.close()
        for fd in (self.words, self.new_pidfd, self.guardian_pidfd):
            if fd is not None:
                os.close(fd)
        if d.life.phase is Phase.STANDING_IN:
            d.life.to(Phase.SERVING)
        d.life.committing = False
        if d.life.frozen:
            d.life.thaw()
        if not d.endpoint.accepting:
            d.endpoint.start_accepting()
        if getattr(d, "standby", None) is not None:  # retired for the upgrade: we are the daemon again
            d.standby.resume()
        reason = self.reason
        log.error("event=upgrade_rolled_back pid=%d reason=%r entries=%d", os.getpid(), reason, len(st.table))
        log.info("event=sole_owner pid=%d role=stand-in", os.getpid())
        return {"pid": os.getpid(), "entries": len(st.table), "ms": 0.0, "rolled_back": True, "reason": reason,
                "program": self.program, "previous_pid": self.parent}

    async def _exit_soon(self) -> None:
        """Exit once the waiting requests have hung up, at once: no interpreter teardown of a large
        table (tens of ms of CPU that the new program, on the same cores, needs now)."""
        proc.lowest_priority()
        await trio.sleep(0.05)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(0)
