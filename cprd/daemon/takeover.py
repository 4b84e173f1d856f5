"""The new program's side of an in-place upgrade: a thin driver of its session (protocol/upgrade.py).

Theory of operation
-------------------
The new program has restored the table as it was at the fork (main.py). Here it applies the
stand-in's journal (every change made since, fds attached), asks the stand-in to stop (T), applies
the rest up to Done (checking its count), tells the stand-in it has taken over (K), waits for it to
release the table (B), tells the guardian (C) and waits for its acknowledgement (c). Only then does
it answer clients. A peer that does not answer within answer_s (stopped, frozen, swapped out), or
whose end closes, is fenced (SIGKILL through a pidfd: both are children of this pid) and waited for
at most fence_s: from the kill on it can answer nobody. A journal with a hole (a message that does
not apply, a Done whose count differs) makes it exit without taking over (``UpgradeError``): the
stand-in, seeing it gone, keeps the table.

Restored by the guardian (state mode "restore"), the program applies the guardian's copy of the
journal and serves: the stand-in and the new program are fenced, so that copy is complete.

What this module may know: trio, sockets, pidfds, the table, the session and the journal's format.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import fault, proc, scm
from ..errors import UpgradeError
from ..fds import close_later
from ..kinds import verify
from ..protocol import upgrade as pu
from ..protocol.upgrade import Act, Ev, Fence, Msg, Role, Send, Session, St, UpgradeState

log = logging.getLogger("cprd.upgrade")


@dataclass(slots=True)
class TakeOver:
    answers: list = field(default_factory=list)  # the stand-in's answers to mutations (for retries)
    messages: int = 0  # journal messages applied
    handed_over: bool = False  # Done came (else the stand-in died or was fenced)
    t_asked: float | None = None  # when we asked (trio time)
    fenced: list[str] = field(default_factory=list)  # the peers we had to kill
    phases_ms: dict[str, float] = field(default_factory=dict)  # from asking (T) to each step
    children: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, pidfd) to reap once serving


class Journal:
    """The reading end of a journal (the new program's, a restore's, a standby's): applies what it
    reads to the table."""

    def __init__(self, fd: int, table: Any, out: TakeOver, strict: bool) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.table, self.out, self.strict = table, out, strict
        self.ended = False

    def read(self) -> list[Ev]:
        """Apply every message queued; the events they make (DONE, DONE_HOLE, RELEASED, STANDIN_GONE)."""
        events: list[Ev] = []
        while not self.ended:
            try:
                data, fds, flags, _ = scm.recv_nowait(self.sock, pu.JOURNAL_MAX)
            except BlockingIOError:
                break
            with fds:
                if not data and not fds:
                    self.ended = True
                    events.append(Ev.STANDIN_GONE)
                elif data[:1] == Msg.JOURNAL and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    if not self.apply(data, fds):
                        events.append(Ev.DONE_HOLE)
                elif data[:1] == Msg.DONE:
                    try:
                        n = pu.decode_done(data)
                    except UpgradeError as e:
                        log.error("event=journal_message_failed error=%r", str(e))
                        n = -1
                    self.out.handed_over = True
                    if n != self.out.messages:
                        log.error("event=journal_hole sent=%d arrived=%d", n, self.out.messages)
                        events.append(Ev.DONE_HOLE)
                    else:
                        events.append(Ev.DONE)
                elif data[:1] == Msg.RELEASED:
                    events.append(Ev.RELEASED)
                else:
                    log.error("event=journal_message_failed kind=%r flags=%#x", data[:1], flags)
                    events.append(Ev.DONE_HOLE)
        return events

    def apply(self, data: bytes, fds: Any) -> bool:
        """One J message, applied to the table (which takes the fds of its saves). False if it does
        not apply (malformed, an fd that does not verify): strict, nothing of it is applied; else
        what applies is kept and the rest logged."""
        try:
            msg = pu.decode_journal(data, len(fds))
            bad = [f"({name!r}, {id_}): {why}" for (name, id_, ident), fd in zip(msg.saves, fds.fds)
                   if (why := verify(fd, ident)) is not None]
            if bad and self.strict:
                raise UpgradeError(f"journal entries do not verify: {'; '.join(bad[:3])}")
        except UpgradeError as e:
            log.error("event=journal_message_failed error=%r strict=%s", str(e), self.strict)
            if self.strict:
                return False
            return True  # the last resort: nothing better exists; keep going
        got = iter(fds.take())
        saves = iter(msg.saves)
        for kind, name, id_ in msg.ops:
            if kind == "S":
                _, _, ident = next(saves)
                fd = next(got)
                if verify(fd, ident) is None:
                    self.table.save(name, id_, fd, ident, replace=True)
                else:
                    close_later(fd)
            elif self.table.find(name, id_) is not None:
                self.table.delete(name, id_)
        self.out.answers.extend(msg.answers)
        self.out.messages += 1
        return True

    def send(self, msg: Msg) -> None:
        try:
            scm.send_nowait(self.sock, msg.value)
        except OSError:
            pass  # the stand-in is gone: its end will say so

    def close(self) -> None:
        self.sock.close()


async def take_over(table: Any, state: UpgradeState, strict: bool = True) -> TakeOver:
    """Take the table over from the stand-in (see the module docstring); UpgradeError if its journal
    has a hole (we must not take over)."""
    out = TakeOver()
    standin = state.standin
    if standin is None or standin.journal_fd is None:
        # cprd 0.1.0's state (version 1): no stand-in (it froze and stopped accepting); its guardian
        # waits for C on a pipe, and leaves when it reads it
        if state.guardian_fd is not None:
            try:
                os.write(state.guardian_fd, Msg.CONFIRM)
            except OSError:
                pass
            os.close(state.guardian_fd)
        gpid = state.guardian_pid
        out.children = [(gpid, proc.pidfd_open(gpid) if proc.is_child(gpid) else None)]
        return out
    journal = Journal(standin.journal_fd, table, out, strict)
    try:
        if state.mode == "restore":  # the guardian's copy: the others are fenced, so it is complete
            journal.strict = False
            journal.read()
            log.info("event=restored_from_the_guardians_copy messages=%d", out.messages)
            log.info("event=sole_owner pid=%d role=restored", os.getpid())
            return out
        return await _Driver(journal, state, out).run()
    finally:
        journal.close()


class _Driver:
    def __init__(self, journal: Journal, state: UpgradeState, out: TakeOver) -> None:
        self.journal, self.state, self.out = journal, state, out
        self.d = state.deadlines
        self.standin_pid = state.standin.pid if state.standin else None
        self.guardian_pid = state.guardian_pid
        # both are children of this pid (forked by the old program): their pids are ours until reaped
        self.standin_pidfd = proc.pidfd_open(self.standin_pid) if proc.is_child(self.standin_pid) else None
        self.guardian_pidfd = proc.pidfd_open(self.guardian_pid) if proc.is_child(self.guardian_pid) else None
        self.link = None
        if state.guardian_fd is not None:
            self.link = socket.socket(fileno=state.guardian_fd)
            self.link.setblocking(False)
        self.s: Session | None = None
        self.queue: list[Ev] = []

    async def run(self) -> TakeOver:
        out = self.out
        try:
            self.queue += self.journal.read()  # what it sent while we started
            fault.point("upgrade", "restored")
            self.s, actions = Session.new_program()
            out.t_asked = trio.current_time()
            deadline = trio.current_time() + self.d.answer_s
            await self.carry_out(actions)
            fault.point("upgrade", "asked")
            while self.s.state not in (St.OWNER, St.FAILED):
                while not self.queue:  # (journal messages that only change the table make no event)
                    self.queue += await self.wait_for_something(deadline)
                ev = self.queue.pop(0)
                before = self.s.state
                actions = self.s.on(ev)
                if self.s.state is not before:
                    out.phases_ms[self.s.state.value] = round((trio.current_time() - out.t_asked) * 1e3, 3)
                if ev is Ev.RELEASED:
                    fault.point("upgrade", "released")
                await self.carry_out(actions)
                if self.s.waits is not None and self.s.state is not before:
                    # a new wait starts now (after the actions: a fence may have taken fence_s)
                    deadline = trio.current_time() + getattr(self.d, self.s.waits)
                if Send(Role.STANDIN, Msg.TAKEN) in actions:
                    fault.point("upgrade", "taken")
                if actions and self.s.state is St.WAIT_ACK and self.link is None:
                    self.queue.insert(0, Ev.GUARDIAN_GONE)  # there is no guardian (it could not be forked)
            if self.s.state is St.FAILED:
                raise UpgradeError(f"the stand-in's journal has a hole after {out.messages} messages")
            log.info("event=sole_owner pid=%d role=new", os.getpid())  # released and acknowledged: ours alone
            out.children = [(self.standin_pid, self.standin_pidfd), (self.guardian_pid, self.guardian_pidfd)]
            self.standin_pidfd = self.guardian_pidfd = None
            return out
        finally:
            for fd in (self.standin_pidfd, self.guardian_pidfd):
                if fd is not None:
                    os.close(fd)
            if self.link is not None:
                self.link.close()

    async def wait_for_something(self, deadline: float) -> list[Ev]:
        """The events of whatever happens first: the journal, the guardian's link or pid, the deadline."""
        got: list[Ev] = []
        fds = [self.journal.sock.fileno()] if not self.journal.ended else []
        if self.link is not None:
            fds.append(self.link.fileno())
        if self.guardian_pidfd is not None and not proc.ended(self.guardian_pidfd):
            fds.append(self.guardian_pidfd)
        with trio.move_on_at(deadline):
            await first_readable(fds)
        if not self.journal.ended:
            got += self.journal.read()
        if self.link is not None:
            try:
                word = self.link.recv(16)
            except BlockingIOError:
                word = None
            except OSError:
                word = b""
            if word == Msg.CONFIRMED:
                got.append(Ev.CONFIRMED)
            elif word == b"":
                self.link.close()
                self.link = None
                got.append(Ev.GUARDIAN_GONE)
        if self.guardian_pidfd is not None and proc.ended(self.guardian_pidfd) and Ev.GUARDIAN_GONE not in got:
            got.append(Ev.GUARDIAN_GONE)
        if not got and trio.current_time() >= deadline:
            got.append(Ev.TIMEOUT)
        return got

    async def carry_out(self, actions: tuple) -> None:
        for a in actions:
            if isinstance(a, Send) and a.to is Role.STANDIN:
                self.journal.send(a.msg)
            elif isinstance(a, Send):  # C to the guardian
                # Once the guardian reads it with us alive it leaves: from then on, ours alone
                log.info("event=confirming pid=%d note=the-guardian-leaves-on-this", os.getpid())
                if self.link is not None:
                    try:
                        scm.send_nowait(self.link, a.msg.value)
                    except OSError:
                        pass
            elif isinstance(a, Fence):
                await self.fence(a.peer)
            elif a is Act.DRAIN:  # the stand-in is fenced: what is queued is all it will ever send
                strict, self.journal.strict = self.journal.strict, False
                self.journal.read()
                self.journal.strict = strict

    async def fence(self, peer: Role) -> None:
        pid, pidfd = ((self.standin_pid, self.standin_pidfd) if peer is Role.STANDIN
                      else (self.guardian_pid, self.guardian_pidfd))
        if pidfd is not None and proc.ended(pidfd):
            return
        log.warning("event=fenced peer=%s pid=%s note=it-did-not-answer-within-%gs", peer.value, pid,
                    self.d.answer_s)
        self.out.fenced.append(peer.value)
        proc.kill(pidfd, pid)
        if pidfd is not None:
            with trio.move_on_after(self.d.fence_s):
                await trio.lowlevel.wait_readable(pidfd)


async def first_readable(fds: list[int]) -> None:
    """Return once any of fds is readable (or at once, with none)."""
    if not fds:
        await trio.sleep_forever()
    async with trio.open_nursery() as n:
        for fd in fds:
            async def one(fd: int = fd) -> None:
                await trio.lowlevel.wait_readable(fd)
                n.cancel_scope.cancel()
            n.start_soon(one)


async def reap(pid: int | None, pidfd: int | None, timeout: float, fence_s: float,
               later: trio.Nursery | None = None) -> None:
    """Collect a child that is on its way out (the stand-in after B, the guardian after c). One that
    has not ended within timeout (stopped: it holds a copy of every fd) is killed; one that has not
    ended fence_s after that (frozen: it ends when thawed) is collected later, in `later`."""
    if not pid:
        return
    if pidfd is not None:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(pidfd)
        if not proc.ended(pidfd):
            log.warning("event=fenced pid=%d note=it-did-not-exit-within-%gs-of-the-take-over", pid, timeout)
            proc.kill(pidfd, pid)
            with trio.move_on_after(fence_s):
                await trio.lowlevel.wait_readable(pidfd)
        if not proc.ended(pidfd) and later is not None:
            later.start_soon(_collect, pid, pidfd)
            return
        os.close(pidfd)
    proc.reap(pid)


async def _collect(pid: int, pidfd: int) -> None:
    """A killed child that has not ended yet (a cgroup freezer holds it): collect it once it ends."""
    try:
        with trio.move_on_after(3600):
            await trio.lowlevel.wait_readable(pidfd)
        proc.reap(pid)
    finally:
        os.close(pidfd)
