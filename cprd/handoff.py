"""The two sides of a handoff over trio: thin drivers of the sessions in protocol/session.py.

Theory of operation
-------------------
The rules of a handoff (what to send when, what each message must agree with, who owns the table
after which message, what a salvage keeps) are the sessions'. What is here is what they leave to
I/O: the SOCK_SEQPACKET socket and SCM_RIGHTS (scm.py), timeouts, the kernel's limits on fds in
flight, verifying what arrives (fstat, in C on a helper thread when the optional module is built),
learning a peer's fate, the clock of each phase, gc, and the test-only fault points.

``send_table`` runs in the source. Its table may change while it runs (pre-copy: the daemon
journals mutations, and freezes them for the last delta only). Until it has sent Commit, any
failure leaves the source owning everything: it only ever sent duplicates (SCM_RIGHTS copies) and
closes nothing. After Commit the target owns the table. If the connection breaks before Confirm,
the source learns the target's fate (``peer_fate``): dead (its pidfd, opened at connect with the
pid from SO_PEERCRED, turns readable) means it never served, so the source takes the table back;
serving (it answers a status request on the control socket) or merely alive means it owns it.

``accept_handoff`` + ``receive_table`` run in the target. Connections are served concurrently
until one sends a valid hello (a silent or garbage connection cannot block a real source). Every
fd that arrives is owned at once (OwnedFds), verified against the identity the source sent, and
moved into the session's table. When the connection breaks the target learns its source's fate
the same way and lets its session decide: give everything up, or keep it.

Speed: the receiving hot loop (build the entries, one fstat and one fcntl an fd) is in C when the
optional speedup is built (cprd/_speedups.c). Then the target verifies on a helper thread (the
Verifier) while the next batches arrive, and acknowledges a batch once it is verified. When the
main thread has nothing to read and must wait for verdicts, it verifies queued batches itself
instead of sleeping.

Flow control: the target acknowledges each batch and the source keeps at most `window` batches
unacknowledged. A non-root sender also keeps the fds in flight under half its RLIMIT_NOFILE,
since the kernel refuses more (ETOOMANYREFS).

What this module may know: sockets, fds, trio, the sessions and codec, the control client's
status probe (to learn whether a peer serves). Not the daemon.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import resource
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import fault, proc, scm
from .client import probe_status
from .errors import CapacityError, CprdError, HandoffError, ProtocolError, UsageError, VerifyError
from .fds import OwnedFds
from .kinds import KIND_BY_CODE, MUTABLE_FLAGS, Identity, verify
from .paths import connect_seqpacket, peer_cred, user_name
from .protocol import handoff as hp
from .protocol.session import Result, Salvage, Send, SourceSession, TargetSession, abort_for
from .speedups import C as _c
from .table import Entry, FdTable

__all__ = ["Result", "Salvage", "Received", "Incoming", "SourceHooks", "send_table", "accept_handoff",
           "receive_table", "confirm", "peer_fate", "fd_capacity", "raise_nofile", "table_limit", "speedups"]

log = logging.getLogger("cprd.handoff")

RESERVE_FDS = 64  # fds a target keeps free for its own sockets and clients
TIMEOUT = 30.0
HELLO_TIMEOUT = 10.0
MAX_MSG = hp.MAX_PAYLOAD + 16


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


open_fd_count = proc.fd_count


TARGET_OWN_FDS = 32  # fds a target has open besides the table when it answers a hello (about 12), with room


def table_limit(soft: int) -> int:
    """The most entries a table may hold so that a target with the same RLIMIT_NOFILE soft limit can
    take it over in a handoff (it keeps RESERVE_FDS free, has its own fds open, and receives the
    listening socket too)."""
    return max(0, soft - RESERVE_FDS - TARGET_OWN_FDS - 1)


def fd_capacity(reserve: int = RESERVE_FDS) -> tuple[int, int, int]:
    """(soft limit, open fds, free capacity) of this process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = open_fd_count()
    return soft, n, max(0, soft - n - reserve)


class _Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = (now - self.last) * 1e3
        self.last = now

    @property
    def total_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3


async def _recv(sock, decode: Callable[[bytes, int], hp.Event], timeout: float,
                what: str) -> tuple[hp.Event, OwnedFds]:
    """One message from the peer, decoded by its session (which raises on an Abort or a breach of
    the protocol, after we close the fds that came with it)."""
    with trio.move_on_after(timeout) as cs:
        data, fds = await scm.recv(sock, MAX_MSG, hp.SCM_MAX_FD, what)
    if cs.cancelled_caught:
        raise HandoffError(f"{what}: no answer from the peer within {timeout:.0f} s; is it hung?")
    try:
        ev = decode(data, len(fds))
    except BaseException:
        fds.close()
        raise
    return ev, fds


# -- a peer's fate -----------------------------------------------------------------------------
GONE = -1  # what _open_pidfd returns for a peer whose pid no longer exists: proof that it died


def _open_pidfd(pid: int) -> int | None:
    """A pidfd of the peer that connected (pid from SO_PEERCRED), opened as soon as possible; GONE if
    that pid no longer exists (the peer exited and was reaped: dead, whoever reaped it); None if the
    kernel will not say."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return GONE
    except OSError:
        return None


def _close_pidfd(pidfd: int | None) -> None:
    if pidfd is not None and pidfd >= 0:
        os.close(pidfd)


async def peer_fate(pidfd: int | None, peer_pid: int, control_path: str, timeout: float) -> str:
    """What became of the peer after the handoff connection broke: "dead", "serving" (it answers
    a status request on the control socket, so it owns the table) or "alive" (neither within
    timeout, or no pidfd to tell: only a proven death counts as one).

    Two proofs race. A SIGKILLed process resets its sockets while it closes its files, a moment
    *before* its pidfd says it exited, so we wait for the pidfd rather than peek at it."""
    fate = "alive"
    if pidfd == GONE:
        return "dead"

    async def died(scope: trio.CancelScope) -> None:
        nonlocal fate
        await trio.lowlevel.wait_readable(pidfd)
        fate = "dead"
        scope.cancel()

    async def serves(scope: trio.CancelScope) -> None:
        nonlocal fate
        while True:
            st = await probe_status(control_path, 1.0)
            if st is not None and st.get("pid") == peer_pid:
                fate = "serving"
                scope.cancel()
                return
            await trio.sleep(0.02)

    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as n:
            if pidfd is not None:  # without one (pidfd_open failed) only the status probe can answer
                n.start_soon(died, scope)
            if control_path:
                n.start_soon(serves, scope)
    return fate


# -- flow control --------------------------------------------------------------------------------
def _exempt_from_inflight_limit() -> bool:
    """CAP_SYS_RESOURCE or CAP_SYS_ADMIN lift the kernel's limit on fds in flight."""
    return bool(proc.capabilities() & (1 << 24 | 1 << 21))


def flow_limits(batch: int, window: int) -> tuple[int, int]:
    """(batch, window) that keep the fds in flight within what the kernel lets this process send.

    The kernel refuses a send with ETOOMANYREFS once a user without CAP_SYS_RESOURCE or
    CAP_SYS_ADMIN has more fds in flight than the sender's RLIMIT_NOFILE; stay within half of it
    (the rest is for the user's other senders)."""
    if _exempt_from_inflight_limit():
        return batch, window
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    inflight = max(1, soft // 2)
    batch = max(1, min(batch, inflight))
    return batch, max(1, min(window, inflight // batch))


async def _try_send(sock, m: hp.Handoff, ev: hp.Event | None) -> None:
    if ev is None:
        return
    try:
        await scm.send(sock, m.send(ev), (), "handoff abort")
    except (CprdError, OSError):
        pass


async def _drain(sock, timeout: float = 2.0) -> None:
    """Read and drop what the peer still sends (closing any fds) until it closes: closing a UNIX
    socket with unread data resets the peer, which would then never read our Abort."""
    with trio.move_on_after(timeout):
        try:
            while True:
                _, fds = await scm.recv(sock, MAX_MSG, hp.SCM_MAX_FD, "handoff drain")
                fds.close()
        except (CprdError, OSError):
            pass


# -- the source side ----------------------------------------------------------------------------
@dataclass(slots=True)
class SourceHooks:
    """What the daemon lends a live handoff.

    freeze(): from now on mutations wait (until the handoff ends); returns once in-flight ones are
    done. before_commit(): stop accepting on the listening socket (it is about to travel).
    results(since): the answers to mutations given since mark `since` (by request id, for
    exactly-once retries), and the mark to ask from next time."""

    freeze: Callable[[], Awaitable[None]] | None = None
    before_commit: Callable[[], Awaitable[None]] | None = None
    results: Callable[[int], tuple[list[tuple[str, object]], int]] | None = None


async def send_table(table: FdTable, to: str, *, listener_fd: int | None, control_path: str,
                     batch: int = hp.SCM_MAX_FD, window: int = 4, timeout: float = TIMEOUT,
                     hooks: SourceHooks | None = None, allowed_uids: set[int] | None = None) -> Result:
    """Hand every entry of table (and the listening control socket) to the target at `to`.

    The table may change while this runs (pre-copy): the snapshot is taken and the table's journal
    started in one step (no other task runs in between); the caller stops the journal afterwards.
    Raises a CprdError when the handoff did not take; then the caller still owns everything. On
    success the target owns the table; the caller must not serve it any more and should close its
    copies (exiting does that). With `allowed_uids`, a target running as any other uid is refused
    before anything is sent (SO_PEERCRED): it would receive every fd of the table."""
    if not 1 <= batch <= hp.SCM_MAX_FD:
        raise UsageError(f"batch size {batch} is outside 1..{hp.SCM_MAX_FD} (the kernel's SCM_MAX_FD)")
    if window < 1:
        raise UsageError(f"window {window} must be at least 1")
    clock = _Clock()
    try:
        sock = await connect_seqpacket(to, timeout)
    except OSError as e:
        raise HandoffError(f"cannot reach a target at {to}: {e.strerror or e}; start one with "
                           f"`cprd target --listen {to}`") from None
    with sock:
        target_pid, target_uid, _ = peer_cred(sock)
        if allowed_uids is not None and target_uid not in allowed_uids:
            msg = (f"the target at {to} (pid {target_pid}) runs as {user_name(target_uid)}, whom this source does not "
                   f"trust with its table (it hands it only to {', '.join(user_name(u) for u in sorted(allowed_uids))}"
                   "); run the target as the same user as the source, or as root. The source keeps every entry; "
                   "nothing was sent")
            await _try_send(sock, hp.Handoff("source"), hp.Abort(hp.AbortCode.GENERIC, msg))
            raise HandoffError(msg)
        pidfd = _open_pidfd(target_pid)
        try:
            session = SourceSession(table, pid=os.getpid(), control_path=control_path, listener_fd=listener_fd,
                                    batch=batch, window=window)
            return await _SourceDriver(sock, session, clock, target_pid, pidfd, timeout,
                                       hooks or SourceHooks()).run()
        except (HandoffError, CapacityError):
            raise
        except (CprdError, OSError) as e:
            raise HandoffError(f"handoff to {to} (target pid {target_pid}) failed: {e}; the source keeps"
                               " every entry") from None
        finally:
            _close_pidfd(pidfd)


class _SourceDriver:
    """Sockets, timeouts, the kernel's limits and fault points for one SourceSession."""

    def __init__(self, sock, session: SourceSession, clock: _Clock, target_pid: int, pidfd: int | None,
                 timeout: float, hooks: SourceHooks) -> None:
        self.sock, self.s, self.clock = sock, session, clock
        self.target_pid, self.pidfd, self.timeout, self.hooks = target_pid, pidfd, timeout, hooks

    async def _points(self, send: Send) -> None:
        for step, n, last in send.points:
            await fault.apoint("source", step, n, sock=self.sock, last=last)

    async def send(self, send: Send, what: str = "handoff") -> None:
        """Send one message (a batch when the window allows: acknowledgements are read meanwhile)."""
        if isinstance(send.event, hp.Batch):
            await self._batch(send)
        else:
            with trio.move_on_after(self.timeout) as cs:
                await scm.send(self.sock, self.s.m.send(send.event), send.fds, what)
            if cs.cancelled_caught:
                raise HandoffError(f"{what}: the target has not read for {self.timeout:.0f} s; is it hung?")
        await self._points(send)

    async def recv(self, what: str) -> hp.Event:
        ev, fds = await _recv(self.sock, self.s.receive, self.timeout, what)
        fds.close()  # the target attaches none
        return ev

    async def _batch(self, send: Send) -> None:
        while not self.s.can_send():
            self.s.on_ack(await self.recv("handoff transfer"))
        data = self.s.m.send(send.event)
        while True:  # on ETOOMANYREFS wait for the target to take some fds (an ack), then retry
            try:
                with trio.move_on_after(self.timeout) as cs:
                    await scm.send(self.sock, data, send.fds, "handoff batch")
                if cs.cancelled_caught:
                    raise HandoffError(f"handoff batch: the target has not read for {self.timeout:.0f} s")
                return
            except CapacityError:
                if self.s.unacked() <= 1:
                    raise
                self.s.on_ack(await self.recv("handoff transfer"))

    async def settle(self) -> None:
        while not self.s.settled():
            self.s.on_ack(await self.recv("handoff transfer"))

    async def run(self) -> Result:
        s, clock, hooks = self.s, self.clock, self.hooks
        try:
            await self.send(s.hello(), "handoff hello")
        except scm.Closed:
            # A target that refuses this source answers with an Abort and closes at once, maybe before
            # the hello arrived: its Abort waits in our queue. Say what it says (else: closed).
            await self.recv("handoff hello")
            raise
        try:
            s.on_target_hello(await self.recv("handoff hello"))
        except CapacityError as e:
            await _try_send(self.sock, s.m, abort_for(e))
            raise
        # Only now (a test may lower our limit at the hello) fix how many fds may be in flight.
        s.flow(*flow_limits(s.batch, s.window))
        for m in s.manifests():
            await self.send(m, "handoff manifest")
        clock.mark("hello")
        for b in s.snapshot():
            await self.send(b)
        clock.mark("snapshot")
        await self.settle()
        while (deltas := s.precopy()) is not None:
            for d in deltas:
                await self.send(d, "handoff delta")
            await self.settle()
        for r in s.before_freeze(hooks.results):
            await self.send(r, "handoff results")
        clock.mark("pre_copy")
        t_freeze = time.perf_counter()
        if hooks.freeze is not None:
            await hooks.freeze()
        await fault.apoint("source", "freeze", sock=self.sock)
        for m in s.after_freeze(hooks.results):
            await self.send(m, "handoff delta")
        await self.send(s.end(), "handoff end")
        for rid in s.dropped_results:
            log.warning("event=result_too_large rid=%r", rid)
        while (commit := s.on_ready(await self.recv("handoff verify"))) is None:
            pass
        clock.mark("final_delta")
        await fault.apoint("source", "ready", sock=self.sock)
        if hooks.before_commit is not None:
            await hooks.before_commit()
        await self.send(commit, "handoff commit")
        # From here on the target owns the table, unless it turns out to be dead.
        try:
            problem = s.on_confirm(await self.recv("handoff confirm"))
        except (CprdError, OSError) as e:
            problem = str(e)
        if problem:
            fate = await peer_fate(self.pidfd, self.target_pid, s.control_path, self.timeout)
            s.confirm_lost(problem, fate)
            log.warning("event=confirm_lost target_pid=%d target=%s problem=%r note=the-target-owns-the-table",
                        self.target_pid, fate, problem)
        freeze_ms = (time.perf_counter() - t_freeze) * 1e3
        clock.mark("commit")
        await fault.apoint("source", "confirm", sock=self.sock)
        res = Result(len(s.table), s.fds_sent(), clock.total_ms, self.target_pid, not problem, clock.phases,
                     freeze_ms, s.rounds, s.delta_ops)
        log.info("event=handoff_sent entries=%d fds=%d ms=%.2f freeze_ms=%.2f rounds=%d delta_ops=%d target_pid=%d "
                 "batch=%d window=%d %s", res.entries, res.fds, res.ms, freeze_ms, s.rounds, s.delta_ops,
                 self.target_pid, s.batch, s.m.window, " ".join(f"{k}_ms={v:.2f}" for k, v in clock.phases.items()))
        return res


# -- the target side ----------------------------------------------------------------------------
@dataclass(slots=True)
class Incoming:
    """A connection that has sent a valid SourceHello; nothing received yet but the hello."""

    sock: object
    machine: hp.Handoff
    hello: hp.SourceHello
    source_pid: int
    pidfd: int | None

    def close(self) -> None:
        self.sock.close()
        _close_pidfd(self.pidfd)
        self.pidfd = None


@dataclass(slots=True)
class Received:
    table: FdTable
    listener: OwnedFds  # the control socket that came with Commit (empty if the source died first)
    hello: hp.SourceHello
    machine: hp.Handoff
    source_pid: int
    committed: bool  # Commit arrived (so the source is waiting for our Confirm)
    salvage: Salvage | None
    phases: dict[str, float]
    results: list[tuple[str, object]] = field(default_factory=list)  # recent mutation answers by request id


async def accept_handoff(listener, allowed_uids: set[int], hello_timeout: float = HELLO_TIMEOUT) -> Incoming:
    """Accept connections on the handoff socket, each in its own task, until one sends a valid
    SourceHello; refuse the rest (Abort PROTOCOL for garbage, BUSY once one is chosen)."""
    chosen: Incoming | None = None

    async def one(conn, pid: int, uid: int, pidfd: int | None) -> None:
        nonlocal chosen
        keep = False
        try:
            if uid not in allowed_uids:
                log.warning("event=refused_peer pid=%d uid=%d", pid, uid)
                await _try_send(conn, hp.Handoff("target"), hp.Abort(
                    hp.AbortCode.GENERIC, f"uid {uid} may not hand off to this target: a target takes a table (and "
                    "the control socket that comes with it) only from a source of its own user or root; run both "
                    "as the same user"))
                scm.drop_queued(conn.fileno())  # a hello it sent first must not reset the connection
                return
            m = hp.Handoff("target")
            try:
                ev, fds = await _recv(conn, m.receive, hello_timeout, "handoff hello")
                fds.close()
            except CprdError as e:
                log.warning("event=not_a_handoff peer_pid=%d error=%r", pid, str(e))
                await _try_send(conn, hp.Handoff("target"), hp.Abort(hp.AbortCode.PROTOCOL, str(e)))
                return
            if not isinstance(ev, hp.SourceHello):
                return
            if chosen is not None:
                await _try_send(conn, m, hp.Abort(hp.AbortCode.BUSY, "this target already receives a handoff"))
                return
            chosen = Incoming(conn, m, ev, pid, pidfd)
            keep = True
            nursery.cancel_scope.cancel()
        finally:
            if not keep:
                conn.close()
                _close_pidfd(pidfd)

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            pid, uid, _ = peer_cred(conn)
            # The source's pidfd is opened at once: if it dies right after its hello and is reaped
            # before we would get to it, its pid (or another process's) could no longer tell.
            nursery.start_soon(one, conn, pid, uid, _open_pidfd(pid) if uid in allowed_uids else None)
    assert chosen is not None
    return chosen


async def receive_table(inc: Incoming, *, reserve: int = RESERVE_FDS, timeout: float = TIMEOUT) -> Received:
    """Receive a whole table from a chosen connection, up to and including Commit.

    Raises (having closed every fd received) when the handoff fails while the source lives. When
    the source dies, returns what arrived: the whole table after End, a salvage before."""
    clock = _Clock()
    sock, hello = inc.sock, inc.hello
    s = TargetSession(inc.machine, hello, inc.source_pid)
    table, m = s.table, s.m
    soft, open_fds, capacity = fd_capacity(reserve)
    try:
        first = s.start(pid=os.getpid(), fd_limit=soft, open_fds=open_fds, capacity=capacity, reserve=reserve)
    except CprdError as e:
        await _try_send(sock, m, abort_for(e))
        raise
    grow_fd_table(sock.fileno(), min(soft - 1, open_fds + hello.fds + reserve))
    listener = OwnedFds()

    async def tsend(send: Send) -> None:
        """Send to the source; if it is gone, keep reading what it queued before it went (a dead
        source's batches still sit in our receive queue) and let the end of the stream decide."""
        data = m.send(send.event)
        try:
            with trio.move_on_after(timeout):
                await scm.send(sock, data, (), "handoff")
        except (CprdError, OSError) as e:
            log.info("event=send_to_source_failed error=%r note=reading-what-is-queued", str(e))

    # Snapshot batches are verified on a helper thread (the C Verifier) while the next ones arrive;
    # a batch is acknowledged once it is verified, in order.
    verifier = _c.Verifier(FLAGS_MASK32) if _c is not None else None
    checking: dict[int, tuple[hp.Batch, list[int]]] = {}  # seq -> (batch, its fds) being verified
    readable = select.poll()
    readable.register(sock.fileno(), select.POLLIN)

    async def ack_verified(block: bool, send: bool = True) -> None:
        """Acknowledge the batches the verifier has finished (waiting for one if block)."""
        for seq, bad in verifier.completed(block):
            ev, bfds = checking.pop(seq)
            if bad >= 0:
                _verify_error(ev, bfds, bad)
            ack = s.batch_verified(ev)
            if send:
                await tsend(ack)

    async def settle(send: bool = True) -> None:
        while checking:
            await ack_verified(True, send)

    gc_was = gc.isenabled()
    gc.disable()  # tens of thousands of small objects arrive; collections mid-transfer only cost time
    try:
        try:
            await scm.send(sock, m.send(first.event), (), "handoff hello")
            fault.point("target", "hello", sock=sock)
            clock.mark("hello")
            while True:
                if checking:
                    await ack_verified(False)
                    if s.must_wait_for_verdicts(len(checking), bool(readable.poll(0))):
                        await ack_verified(True)
                        continue
                ev, fds = await _recv(sock, s.receive, timeout, "handoff transfer")
                if s.needs_settle(ev):
                    await settle()
                if isinstance(ev, hp.Batch):
                    with fds:
                        if ev.replace:
                            apply_delta(ev, fds, table)
                            await tsend(s.delta_applied(ev))
                            fault.point("target", "delta", s.deltas - 1, sock=sock)
                        else:
                            bfds = take_batch(ev, fds, table, verifier)
                            if bfds is not None:
                                checking[ev.seq] = (ev, bfds)
                            else:
                                await settle()  # acks go in order
                                await tsend(s.batch_absorbed(ev))
                    fault.point("target", "batch", ev.seq, sock=sock, last=s.last_batch())
                elif isinstance(ev, hp.Delete):
                    for key in s.on_delete(ev):
                        table.delete(*key)
                    fault.point("target", "delete", s.deletes - 1, sock=sock)
                    fault.point("target", "delta", s.deltas - 1, sock=sock)
                elif isinstance(ev, hp.Results):
                    s.on_results(ev)
                    fault.point("target", "results", s.results_seen - 1, sock=sock)
                elif isinstance(ev, hp.End):
                    ready = s.on_end(ev)
                    break
                # a Manifest needs nothing but the state machine's keeping (for a salvage)
            clock.mark("transfer")
            fault.point("target", "end", sock=sock)
            await tsend(ready)
            if verifier is not None:  # idle since End: join its helper while the source commits, not after
                verifier.close()
            await fault.apoint("target", "ready", sock=sock)
            ev, fds = await _recv(sock, s.receive, timeout, "handoff commit")
            try:
                s.on_commit(ev)
            except BaseException:
                fds.close()
                raise
            listener = fds
            clock.mark("commit")
            fault.point("target", "commit", sock=sock)
        except (scm.Closed, OSError, HandoffError) as e:
            if s.gives_up(e):
                raise
            # The connection broke: the source's fate decides (the session's rule).
            fate = await peer_fate(inc.pidfd, inc.source_pid, hello.control_path, timeout)
            s.on_broken(e, fate)
            await settle(send=False)  # keep only what is verified (a VerifyError fails the whole)
            salvage = s.kept()
            log.error("event=source_died source_pid=%d stage=%s entries_kept=%d%s", inc.source_pid,
                      "after-end" if s.ended else "mid-transfer", len(table),
                      f" lost={salvage.lost} lost_keys={salvage.lost_keys[:20]!r} unnamed={salvage.unnamed}"
                      if salvage else "")
            return Received(table, listener, hello, m, inc.source_pid, False, salvage, clock.phases, s.results)
    except BaseException as e:
        if verifier is not None:
            verifier.close()  # it reads fds of the table: stop it before they close
        table.close_all()
        listener.close()
        abort = abort_for(e)
        if abort is not None:
            await _try_send(sock, m, abort)
            await _drain(sock)
        raise
    finally:
        if verifier is not None:
            verifier.close()
        gc.freeze()  # what arrived lives as long as the table: keep it out of every later collection
        if gc_was:
            gc.enable()
    log.info("event=handoff_received entries=%d source_pid=%d %s", len(table), inc.source_pid,
             " ".join(f"{k}_ms={v:.2f}" for k, v in clock.phases.items()))
    return Received(table, listener, hello, m, inc.source_pid, True, None, clock.phases, s.results)


def grow_fd_table(fd: int, slots: int) -> None:
    """Make the kernel's fd table of this process hold `slots` fds now, in one step.

    Received fds grow it by doubling as they arrive, and in a process with more than one thread
    (the C verifier's helper) every doubling waits for an RCU grace period (milliseconds each).
    Taking a high fd number once, and closing it, sizes the table for the whole handoff."""
    try:
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(0, slots)))
    except OSError:
        pass  # only a matter of speed


async def confirm(sock, r: Received) -> None:
    """Tell the source we own the table and serve its control socket."""
    try:
        await scm.send(sock, r.machine.send(hp.Confirm(os.getpid())), (), "handoff confirm")
    except (CprdError, OSError) as e:
        log.warning("event=confirm_not_delivered error=%r note=the-target-owns-the-table-anyway", str(e))
    fault.point("target", "confirm", sock=sock)


# -- verification (the hot loop) -------------------------------------------------------------------
FLAGS_MASK32 = ~MUTABLE_FLAGS & 0xFFFFFFFF
NAMES: dict[str, str] = {}  # one str object for each distinct name the C path has seen (names repeat)


def speedups() -> bool:
    return _c is not None


def take_batch(ev: hp.Batch, fds: OwnedFds, table: FdTable, verifier=None) -> list[int] | None:
    """Move a snapshot batch's entries into the table, all or nothing, each fd verified against its
    record (one fstat and one fcntl an fd).

    The hot loop of a handoff. With the C speedup, one call builds the Identity and Entry objects
    and inserts them; when a `verifier` is given, it verifies them afterwards on its helper thread
    and this returns the batch's fds (now the table's) that it checks; the caller must wait for its
    verdict before it acknowledges the batch or closes anything. Otherwise (None returned) every
    fd was verified here. The Python path below is the reference, and also the one that names
    what is wrong (a duplicate key) or handles names that are not plain ASCII."""
    if _c is not None:
        r = _c.absorb(ev.raw, ev.count, fds.fds, table.bulk_dict(), FLAGS_MASK32, hp.KINDS, Identity, Entry, NAMES,
                      verifier is None)
        if r == -1:
            taken = fds.take()
            if verifier is None:
                return None
            verifier.submit(ev.raw, ev.count, taken, ev.seq)
            return taken
        if r >= 0:
            _verify_error(ev, fds.fds, r)
    fixed, names = ev.decoded()
    bad = py_verify(fixed, fds.fds)
    if bad >= 0:
        _verify_error(ev, fds.fds, bad)
    make_ident, make_entry, kinds = Identity._make, Entry._make, KIND_BY_CODE
    entries = [make_entry((name, id_, fd, make_ident((kinds[kind], mode, dev, ino, flags))))
               for (id_, kind, _nlen, mode, flags, dev, ino), name, fd in zip(fixed, names, fds.fds)]
    dup = table.absorb(entries)
    if dup is not None:
        raise ProtocolError(f"handoff batch {ev.seq}: duplicate key ({dup.name!r}, {dup.id})")
    fds.take()
    return None


def _verify_error(ev: hp.Batch, fds: list[int], i: int) -> None:
    r = ev.records()[i]
    raise VerifyError(f"entry ({r.name!r}, {r.id}) ({r.ident.kind.label}) does not match what the source "
                      f"sent: {verify(fds[i], r.ident)}")


def apply_delta(ev: hp.Batch, fds: OwnedFds, table: FdTable) -> None:
    """A pre-copy delta: verify like a snapshot batch, then each record replaces its key (in order)."""
    bad = _c.verify_batch(ev.raw, ev.count, fds.fds, FLAGS_MASK32) if _c else py_verify(ev.decoded()[0], fds.fds)
    if bad >= 0:
        _verify_error(ev, fds.fds, bad)
    for r, fd in zip(ev.records(), list(fds.fds)):
        table.save(r.name, r.id, fd, r.ident, replace=True)
        fds.fds.remove(fd)  # the table owns it now; what a failing save leaves is closed by the caller


def py_verify(fixed: list[tuple], fds: list[int]) -> int:
    """Index of the first fd that does not match its record (file type, inode, open flags), or -1."""
    fstat, getfl, F_GETFL, mask = os.fstat, fcntl.fcntl, fcntl.F_GETFL, ~MUTABLE_FLAGS
    for i, ((_id, _kind, _nlen, mode, flags, dev, ino), fd) in enumerate(zip(fixed, fds)):
        try:
            st = fstat(fd)
            if (st.st_mode ^ mode) & 0o170000 or st.st_ino != ino or st.st_dev != dev \
                    or (getfl(fd, F_GETFL) & mask) != flags:
                return i
        except OSError:
            return i
    return -1
