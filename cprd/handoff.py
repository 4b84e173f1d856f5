"""Drive the handoff protocol (protocol/handoff.py) over SOCK_SEQPACKET with trio and scm.py.

Theory of operation
-------------------
``send_table`` runs in the source. Its table is frozen while it runs (the daemon refuses
mutations). Until it has sent Commit, any failure leaves the source owning everything: it only
ever sent duplicates (SCM_RIGHTS copies) and closes nothing. After Commit the target owns the
table. If the connection breaks before Confirm, the source learns the target's fate
(``peer_fate``): dead (its pidfd, opened at connect with the pid from SO_PEERCRED, turns
readable) means it never served, so the source takes the table back; serving (it answers a
status request on the control socket) or merely alive means it owns the table.

``accept_handoff`` + ``receive_table`` run in the target. Connections are served concurrently
until one sends a valid hello (a silent or garbage connection cannot block a real source). Every
fd that arrives is owned at once (OwnedFds), verified against the identity the source sent, and
moved into a fresh FdTable. When the connection breaks the target asks the same question about
its source: if the source lives, the target closes everything it received and fails (a target
never serves a partial table while its source lives); if the source died, the fds that reached
the target exist nowhere else, so it keeps them: the whole table after End, a *salvaged* part
before End, naming the keys lost with the source (from the Manifest).

Speed: the receiving hot loop (build the entries, one fstat and one fcntl an fd) is in C when the
optional speedup is built (cprd/_speedups.c). Then the target verifies on a helper thread (the
Verifier) while the next batches arrive, and acknowledges a batch once it is verified. When the
main thread has nothing to read and must wait for verdicts, it verifies queued batches itself
instead of sleeping.

Flow control: the target acknowledges each batch and the source keeps at most `window` batches
unacknowledged. A non-root sender also keeps the fds in flight under half its RLIMIT_NOFILE,
since the kernel refuses more (ETOOMANYREFS).
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import resource
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import fault, scm
from .errors import CapacityError, CprdError, HandoffError, ProtocolError, UsageError, VerifyError
from .fds import OwnedFds
from .kinds import KIND_BY_CODE, MUTABLE_FLAGS, Identity, verify
from .paths import connect_seqpacket, peer_cred, user_name
from .protocol import handoff as hp
from .table import Entry, FdTable

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


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # minus the fd listdir itself opened


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


@dataclass(slots=True)
class Result:
    entries: int
    fds: int
    ms: float
    target_pid: int
    confirmed: bool
    phases: dict[str, float] = field(default_factory=dict)
    freeze_ms: float = 0.0  # mutations waited this long: from the freeze to the target's confirmation
    rounds: int = 0  # pre-copy rounds after the snapshot
    delta_ops: int = 0  # mutations sent as deltas (pre-copy rounds and the frozen last one)

    def describe(self) -> dict:
        return {"entries": self.entries, "fds": self.fds, "ms": round(self.ms, 3), "target_pid": self.target_pid,
                "confirmed": self.confirmed, "freeze_ms": round(self.freeze_ms, 3), "rounds": self.rounds,
                "delta_ops": self.delta_ops, "phases_ms": {k: round(v, 3) for k, v in self.phases.items()}}


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


async def _recv_event(sock, m: hp.Handoff, timeout: float, what: str) -> tuple[hp.Event, OwnedFds]:
    with trio.move_on_after(timeout) as cs:
        data, fds = await scm.recv(sock, MAX_MSG, hp.SCM_MAX_FD, what)
    if cs.cancelled_caught:
        raise HandoffError(f"{what}: no answer from the peer within {timeout:.0f} s; is it hung?")
    try:
        ev = m.receive(data, len(fds))
    except BaseException:
        fds.close()
        raise
    return ev, fds


def _abort_error(ev: hp.Abort, who: str) -> CprdError:
    cls = {hp.AbortCode.CAPACITY: CapacityError, hp.AbortCode.VERIFY: VerifyError,
           hp.AbortCode.PROTOCOL: ProtocolError}.get(ev.code, HandoffError)
    return cls(f"the {who} aborted the handoff: {ev.message}")



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
            with trio.move_on_after(1):
                if await _status_pid(control_path) == peer_pid:
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


async def _status_pid(control_path: str) -> int | None:
    """The pid of whoever answers a status request on the control socket (None if nobody does)."""
    from .protocol import control as cp

    try:
        sock = await connect_seqpacket(control_path, 1.0)
    except OSError:
        return None
    with sock:
        try:
            await scm.send(sock, cp.encode_request("status"), (), "status")
            reader = cp.ReplyReader()
            while True:
                data, fds = await scm.recv(sock, cp.MAX_FRAME, 1, "status")
                fds.close()
                reply = reader.feed(data)
                if reply is not None:
                    return int(reply["result"]["pid"]) if reply.get("ok") else None
        except (CprdError, OSError, KeyError, TypeError, ValueError):
            return None


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


def _exempt_from_inflight_limit() -> bool:
    """CAP_SYS_RESOURCE or CAP_SYS_ADMIN lift the kernel's limit on fds in flight."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << 24 | 1 << 21))
    except OSError:
        pass
    return False


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


FREEZE_OPS = 4  # freeze once at most this many ops are left to send (each costs the freeze ~0.05 ms)
MAX_ROUNDS = 8  # pre-copy rounds before freezing anyway (churn faster than the copy)


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
    pidfd = None
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
            return await _Sender(sock, table, clock, target_pid, pidfd, listener_fd, control_path, batch, window,
                                 timeout, hooks or SourceHooks()).run()
        except (HandoffError, CapacityError):
            raise
        except (CprdError, OSError) as e:
            raise HandoffError(f"handoff to {to} (target pid {target_pid}) failed: {e}; the source keeps"
                               " every entry") from None
        finally:
            if pidfd is not None and pidfd >= 0:
                os.close(pidfd)


def _results_chunks(results: list[tuple[str, object]], limit: int = hp.MAX_PAYLOAD - 1024) -> list[list]:
    """Split answers into Results messages that each fit the payload limit (an answer too large to
    travel alone is left out: its client, if it retries, has the mutation applied a second time
    only if it was a put that replaced; keys, names and ids are at most a few hundred bytes)."""
    chunks: list[list] = [[]]
    size = 2
    for rid, answer in results:
        n = len(json.dumps([rid, answer], separators=(",", ":")).encode()) + 1
        if n > limit:
            log.warning("event=result_too_large rid=%r bytes=%d", rid, n)
            continue
        if size + n > limit:
            chunks.append([])
            size = 2
        chunks[-1].append((rid, answer))
        size += n
    return [c for c in chunks if c]


class _Sender:
    """One source-side handoff: snapshot, pre-copy rounds, freeze, last delta, commit."""

    def __init__(self, sock, table: FdTable, clock: _Clock, target_pid: int, pidfd: int | None,
                 listener_fd: int | None, control_path: str, batch: int, window: int, timeout: float,
                 hooks: SourceHooks) -> None:
        self.sock, self.table, self.clock = sock, table, clock
        self.target_pid, self.pidfd, self.listener_fd = target_pid, pidfd, listener_fd
        self.control_path, self.batch, self.timeout, self.hooks = control_path, batch, timeout, hooks
        self.m = hp.Handoff("source", window)
        self.window = window
        self.seq = 0
        self.rounds = 0
        self.delta_ops = 0
        self.deltas = self.deletes = self.results_sent = 0  # messages of each kind so far (fault points)

    async def _send(self, ev: hp.Event, fds: list[int] = (), what: str = "handoff") -> None:  # type: ignore[assignment]
        with trio.move_on_after(self.timeout) as cs:
            await scm.send(self.sock, self.m.send(ev), fds, what)
        if cs.cancelled_caught:
            raise HandoffError(f"{what}: the target has not read for {self.timeout:.0f} s; is it hung?")

    async def _recv(self, what: str) -> hp.Event:
        ev, _ = await _recv_event(self.sock, self.m, self.timeout, what)
        if isinstance(ev, hp.Abort):
            raise _abort_error(ev, "target")
        return ev

    async def _batch(self, entries: list[Entry], replace: bool) -> None:
        while not self.m.can_send_batch():
            await self._recv("handoff transfer")
        ev = hp.Batch.of(self.seq, entries, replace)  # an Entry has a Record's name, id and ident
        data, fds = self.m.send(ev), [e.fd for e in entries]
        while True:  # on ETOOMANYREFS wait for the target to take some fds (an ack), then retry
            try:
                with trio.move_on_after(self.timeout) as cs:
                    await scm.send(self.sock, data, fds, "handoff batch")
                if cs.cancelled_caught:
                    raise HandoffError(f"handoff batch: the target has not read for {self.timeout:.0f} s")
                break
            except CapacityError:
                if self.m.unacked <= 1:
                    raise
                await self._recv("handoff transfer")
        self.seq += 1

    async def _ops(self, ops: list[tuple[str, object]]) -> None:
        """Send journal ops in order: runs of saves as REPLACE batches, runs of deletes as Delete."""
        self.delta_ops += len(ops)
        i = 0
        while i < len(ops):
            kind = ops[i][0]
            j = i
            limit = self.batch if kind == "save" else hp.MANIFEST_CHUNK
            while j < len(ops) and ops[j][0] == kind and j - i < limit:
                j += 1
            run = [op[1] for op in ops[i:j]]
            if kind == "save":
                await self._batch(run, replace=True)  # type: ignore[arg-type]
            else:
                await self._send(hp.Delete.of(run), (), "handoff delete")  # type: ignore[arg-type]
                fault.point("source", "delete", self.deletes, sock=self.sock)
                self.deletes += 1
            fault.point("source", "delta", self.deltas, sock=self.sock)
            self.deltas += 1
            i = j

    async def _settle(self) -> None:
        """Wait for the acks of every batch sent."""
        while self.m.unacked:
            await self._recv("handoff transfer")

    async def _results(self, since: int) -> int:
        """Send the daemon's answers to mutations given since `since`; return where the next send
        starts."""
        if self.hooks.results is None:
            return since
        results, nxt = self.hooks.results(since)
        for chunk in _results_chunks(results):
            await self._send(hp.Results(tuple(chunk)), (), "handoff results")
            fault.point("source", "results", self.results_sent, sock=self.sock)
            self.results_sent += 1
        return nxt

    async def run(self) -> Result:
        m, table, clock = self.m, self.table, self.clock
        entries = list(table)  # the snapshot, and from this very instant the journal of what changes
        table.start_journal()
        n = len(entries)
        await self._send(hp.SourceHello(os.getpid(), n, n, self.batch, self.control_path), (), "handoff hello")
        fault.point("source", "hello", sock=self.sock)
        ev = await self._recv("handoff hello")
        assert isinstance(ev, hp.TargetHello)
        need = n + (1 if self.listener_fd is not None else 0)
        if ev.capacity < need:
            msg = (f"target pid {ev.pid} has room for {ev.capacity} more fds (RLIMIT_NOFILE {ev.fd_limit}, "
                   f"{ev.open_fds} open) but the table needs {need}; raise the target's limit (ulimit -n or "
                   "LimitNOFILE=)")
            await _try_send(self.sock, m, hp.Abort(hp.AbortCode.CAPACITY, msg))
            raise CapacityError(msg)
        # Only now (a test may lower our limit at the hello) fix how many fds may be in flight.
        self.batch, m.window = flow_limits(self.batch, self.window)
        # The keys first (cheap: ~0.1 us a key), so that a target whose source dies mid-transfer can
        # name what was lost.
        for i in range(0, n, hp.MANIFEST_CHUNK):
            await self._send(hp.Manifest.of(entries[i:i + hp.MANIFEST_CHUNK]), (), "handoff manifest")
        clock.mark("hello")
        last = (n - 1) // self.batch if n else -1
        for i in range(0, n, self.batch):
            await self._batch(entries[i:i + self.batch], replace=False)
            await fault.apoint("source", "batch", self.seq - 1, sock=self.sock, last=last)
        clock.mark("snapshot")
        # Pre-copy: while the table changed during the last round, send what changed, as long as
        # that shrinks; then freeze and send the rest.
        # Every round waits until the target has verified all it was sent, so that the freeze covers
        # only the last delta, never a backlog of snapshot batches.
        await self._settle()
        ops = table.take_journal() if table.journal is not None else []
        while len(ops) > FREEZE_OPS and self.rounds < MAX_ROUNDS:
            await self._ops(ops)
            await self._settle()
            self.rounds += 1
            ops = table.take_journal()
        results_seq = await self._results(0)  # answers so far, before the freeze
        clock.mark("pre_copy")
        t_freeze = time.perf_counter()
        if self.hooks.freeze is not None:
            await self.hooks.freeze()
        await fault.apoint("source", "freeze", sock=self.sock)
        if table.journal is not None:
            ops += table.take_journal()
        await self._ops(ops)
        await self._results(results_seq)  # and the few given since
        await self._send(hp.End(len(table), m.fds, m.digest), (), "handoff end")
        fault.point("source", "end", sock=self.sock)
        while not isinstance(await self._recv("handoff verify"), hp.Ready):
            pass
        clock.mark("final_delta")
        await fault.apoint("source", "ready", sock=self.sock)
        if self.hooks.before_commit is not None:
            await self.hooks.before_commit()
        await self._send(hp.Commit(self.listener_fd is not None),
                         [self.listener_fd] if self.listener_fd is not None else [], "handoff commit")
        # From here on the target owns the table, unless it turns out to be dead.
        fault.point("source", "commit", sock=self.sock)
        confirmed = False
        try:
            ev, _ = await _recv_event(self.sock, m, self.timeout, "handoff confirm")
            confirmed = isinstance(ev, hp.Confirm)
            problem = "" if confirmed else f"it sent {type(ev).__name__} instead of Confirm"
        except (CprdError, OSError) as e:
            problem = str(e)
        if not confirmed:
            fate = await peer_fate(self.pidfd, self.target_pid, self.control_path, self.timeout)
            if fate == "dead":
                raise HandoffError(f"the target (pid {self.target_pid}) died after the commit and before it "
                                   f"confirmed ({problem}); the source keeps every entry")
            log.warning("event=confirm_lost target_pid=%d target=%s problem=%r note=the-target-owns-the-table",
                        self.target_pid, fate, problem)
        freeze_ms = (time.perf_counter() - t_freeze) * 1e3
        clock.mark("commit")
        fault.point("source", "confirm", sock=self.sock)
        res = Result(len(table), m.fds + (1 if self.listener_fd is not None else 0), clock.total_ms,
                     self.target_pid, confirmed, clock.phases, freeze_ms, self.rounds, self.delta_ops)
        log.info("event=handoff_sent entries=%d fds=%d ms=%.2f freeze_ms=%.2f rounds=%d delta_ops=%d target_pid=%d "
                 "batch=%d window=%d %s", res.entries, res.fds, res.ms, freeze_ms, self.rounds, self.delta_ops,
                 self.target_pid, self.batch, m.window, " ".join(f"{k}_ms={v:.2f}" for k, v in clock.phases.items()))
        return res


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


async def _try_send(sock, m: hp.Handoff, ev: hp.Event) -> None:
    try:
        await scm.send(sock, m.send(ev), (), "handoff abort")
    except (CprdError, OSError):
        pass


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
        if self.pidfd is not None and self.pidfd >= 0:
            os.close(self.pidfd)
        self.pidfd = None


@dataclass(slots=True)
class Salvage:
    """What a target kept after its source died before End."""

    source_pid: int
    announced: int  # entries in the source's snapshot
    received: int  # of those, how many arrived (or were deleted by the source meanwhile)
    lost_keys: list[tuple[str, int]]
    unnamed: int  # lost entries whose keys the source died before naming
    kept: int = 0  # entries the target serves (snapshot and changes made during the copy)

    @property
    def lost(self) -> int:
        return len(self.lost_keys) + self.unnamed

    def describe(self) -> dict:
        return {"source_pid": self.source_pid, "announced": self.announced, "received": self.received,
                "kept": self.kept, "lost": self.lost, "lost_keys": [list(k) for k in self.lost_keys[:1000]],
                "lost_keys_truncated": len(self.lost_keys) > 1000, "unnamed": self.unnamed}


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
                ev, fds = await _recv_event(conn, m, hello_timeout, "handoff hello")
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
                if pidfd is not None and pidfd >= 0:
                    os.close(pidfd)

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
    sock, m, hello = inc.sock, inc.machine, inc.hello
    path = hello.control_path
    if not path.startswith("/") or len(path.encode()) >= 108:
        msg = f"the source's control path {path!r} is not an absolute UNIX socket path under 108 bytes"
        await _try_send(sock, m, hp.Abort(hp.AbortCode.PROTOCOL, msg))
        raise ProtocolError(msg)
    soft, open_fds, capacity = fd_capacity(reserve)
    if hello.fds + 1 > capacity:
        msg = (f"this target (pid {os.getpid()}) can take {capacity} more fds (RLIMIT_NOFILE soft limit {soft}, "
               f"{open_fds} open, {reserve} kept in reserve) but the source has {hello.fds} + 1; raise the "
               "target's limit (ulimit -n, LimitNOFILE=) and start it again")
        await _try_send(sock, m, hp.Abort(hp.AbortCode.CAPACITY, msg))
        raise CapacityError(msg)
    _grow_fd_table(sock.fileno(), min(soft - 1, open_fds + hello.fds + reserve))
    table = FdTable()
    listener = OwnedFds()
    results: list[tuple[str, object]] = []
    deleted: set[tuple[str, int]] = set()  # keys the source deleted during the copy (not lost if it dies)
    ended = committed = False
    deltas = deletes = len_results = 0  # messages of each kind so far (fault points)

    async def tsend(ev: hp.Event) -> None:
        """Send to the source; if it is gone, keep reading what it queued before it went (a dead
        source's batches still sit in our receive queue) and let the end of the stream decide."""
        data = m.send(ev)
        try:
            with trio.move_on_after(timeout):
                await scm.send(sock, data, (), "handoff")
        except (CprdError, OSError) as e:
            log.info("event=send_to_source_failed error=%r note=reading-what-is-queued", str(e))

    # Snapshot batches are verified on a helper thread (the C Verifier) while the next ones arrive;
    # a batch is acknowledged once it is verified, in order. Anything that may close an fd (a
    # delta, a delete, the end, a failure) first waits until the verifier is idle.
    verifier = _c.Verifier(_MASK32) if _c is not None else None
    checking: dict[int, tuple[hp.Batch, list[int]]] = {}  # seq -> (batch, its fds) being verified
    verified = 0  # entries verified so far (what an Ack reports)
    readable = select.poll()
    readable.register(sock.fileno(), select.POLLIN)

    async def ack_verified(block: bool, send: bool = True) -> None:
        """Acknowledge the batches the verifier has finished (waiting for one if block)."""
        nonlocal verified
        for seq, bad in verifier.completed(block):
            ev, bfds = checking.pop(seq)
            if bad >= 0:
                _verify_error(ev, bfds, bad)
            verified += ev.count
            if send:
                await tsend(hp.Ack(seq, verified))

    async def settle(send: bool = True) -> None:
        while checking:
            await ack_verified(True, send)

    gc_was = gc.isenabled()
    gc.disable()  # tens of thousands of small objects arrive; collections mid-transfer only cost time
    try:
        try:
            await scm.send(sock, m.send(hp.TargetHello(m.version, os.getpid(), soft, open_fds, capacity)), (),
                           "handoff hello")
            fault.point("target", "hello", sock=sock)
            clock.mark("hello")
            while True:
                if checking:
                    await ack_verified(False)
                    # Nothing to read, or as many unacknowledged batches as a window holds: wait for
                    # the verifier (the window is not on the wire; a target that acks in time never
                    # sees more).
                    if checking and (len(checking) >= m.window or not readable.poll(0)):
                        await ack_verified(True)
                        continue
                ev, fds = await _recv_event(sock, m, timeout, "handoff transfer")
                if isinstance(ev, hp.Batch):
                    with fds:
                        if ev.replace:
                            await settle()
                            _apply_delta(ev, fds, table)
                            fault.point("target", "delta", deltas, sock=sock)
                            deltas += 1
                        else:
                            bfds = _take_batch(ev, fds, table, verifier)
                            if bfds is not None:
                                checking[ev.seq] = (ev, bfds)
                            else:
                                await settle()  # acks go in order
                    if ev.seq not in checking:
                        verified = len(table)
                        await tsend(hp.Ack(ev.seq, verified))
                    fault.point("target", "batch", ev.seq, sock=sock,
                                last=(hello.entries - 1) // max(1, hello.batch_max))
                elif isinstance(ev, hp.Delete):
                    await settle()
                    for key in ev.keys():
                        if key not in table:
                            raise ProtocolError(f"handoff delete: the source deletes {key!r}, which it never sent")
                        table.delete(*key)
                        deleted.add(key)
                    fault.point("target", "delete", deletes, sock=sock)
                    fault.point("target", "delta", deltas, sock=sock)
                    deletes, deltas = deletes + 1, deltas + 1
                elif isinstance(ev, hp.Results):
                    results.extend(ev.results)
                    fault.point("target", "results", len_results, sock=sock)
                    len_results += 1
                elif isinstance(ev, hp.End):
                    await settle()
                    if ev.entries != len(table):
                        raise ProtocolError(f"handoff end: the source holds {ev.entries} entries, this target "
                                            f"{len(table)} after applying every delta")
                    break
                elif isinstance(ev, hp.Abort):
                    raise _abort_error(ev, "source")
            ended = True
            clock.mark("transfer")
            fault.point("target", "end", sock=sock)
            await tsend(hp.Ready(len(table), m.digest))
            if verifier is not None:  # idle since End: join its helper while the source commits, not after
                verifier.close()
            await fault.apoint("target", "ready", sock=sock)
            ev, fds = await _recv_event(sock, m, timeout, "handoff commit")
            if isinstance(ev, hp.Abort):
                fds.close()
                raise _abort_error(ev, "source")
            listener, committed = fds, True
            clock.mark("commit")
            fault.point("target", "commit", sock=sock)
        except (scm.Closed, OSError, HandoffError) as e:
            if isinstance(e, (VerifyError, CapacityError)) or committed or m.state is hp.State.ABORTED:
                raise
            # The connection broke. If the source lives, it owns everything: give up. If it died,
            # what reached us exists nowhere else: keep it.
            fate = await peer_fate(inc.pidfd, inc.source_pid, hello.control_path, timeout)
            if fate != "dead":
                raise HandoffError(f"the handoff connection broke ({e}) while the source (pid {inc.source_pid})"
                                   f" is {fate}; it keeps every entry, this target keeps none") from None
            await settle(send=False)  # keep only what is verified (a VerifyError fails the whole)
            salvage = None if ended else _salvage(inc, m, table, deleted)
            log.error("event=source_died source_pid=%d stage=%s entries_kept=%d%s", inc.source_pid,
                      "after-end" if ended else "mid-transfer", len(table),
                      f" lost={salvage.lost} lost_keys={salvage.lost_keys[:20]!r} unnamed={salvage.unnamed}"
                      if salvage else "")
            return Received(table, listener, hello, m, inc.source_pid, False, salvage, clock.phases, results)
    except BaseException as e:
        if verifier is not None:
            verifier.close()  # it reads fds of the table: stop it before they close
        table.close_all()
        listener.close()
        if isinstance(e, (VerifyError, ProtocolError, CapacityError)) and not isinstance(e, scm.Closed):
            code = {VerifyError: hp.AbortCode.VERIFY, CapacityError: hp.AbortCode.CAPACITY}.get(
                type(e), hp.AbortCode.PROTOCOL)
            await _try_send(sock, m, hp.Abort(code, str(e)))
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
    return Received(table, listener, hello, m, inc.source_pid, True, None, clock.phases, results)


def _grow_fd_table(fd: int, slots: int) -> None:
    """Make the kernel's fd table of this process hold `slots` fds now, in one step.

    Received fds grow it by doubling as they arrive, and in a process with more than one thread
    (the C verifier's helper) every doubling waits for an RCU grace period (milliseconds each).
    Taking a high fd number once, and closing it, sizes the table for the whole handoff."""
    try:
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(0, slots)))
    except OSError:
        pass  # only a matter of speed


def _salvage(inc: Incoming, m: hp.Handoff, table: FdTable, deleted: set[tuple[str, int]]) -> Salvage:
    named: list[tuple[str, int]] = []
    for man in m.manifests:
        try:
            named.extend(man.keys())
        except ProtocolError:
            break
    lost = [k for k in named if k not in table and k not in deleted]
    snapshot_received = sum(1 for k in named if k in table or k in deleted)
    unnamed = max(0, inc.hello.entries - len(named))
    return Salvage(inc.source_pid, inc.hello.entries, snapshot_received, lost, unnamed, len(table))


async def confirm(sock, r: Received) -> None:
    """Tell the source we own the table and serve its control socket."""
    try:
        await scm.send(sock, r.machine.send(hp.Confirm(os.getpid())), (), "handoff confirm")
    except (CprdError, OSError) as e:
        log.warning("event=confirm_not_delivered error=%r note=the-target-owns-the-table-anyway", str(e))
    fault.point("target", "confirm", sock=sock)


_c = hp._c  # the optional C loops (cprd/_speedups.c); None runs the pure-Python ones below
_MASK32 = ~MUTABLE_FLAGS & 0xFFFFFFFF
_NAMES: dict[str, str] = {}  # one str object for each distinct name the C path has seen (names repeat)


def speedups() -> bool:
    return _c is not None


def _take_batch(ev: hp.Batch, fds: OwnedFds, table: FdTable, verifier=None) -> list[int] | None:
    """Move a snapshot batch's entries into the table, all or nothing, each fd verified against its
    record (one fstat and one fcntl an fd).

    The hot loop of a handoff. With the C speedup, one call builds the Identity and Entry objects
    and inserts them; when a `verifier` is given, it verifies them afterwards on its helper thread
    and this returns the batch's fds (now the table's) that it checks; the caller must wait for its
    verdict before it acknowledges the batch or closes anything. Otherwise (None returned) every
    fd was verified here. The Python path below is the reference, and also the one that names
    what is wrong (a duplicate key) or handles names that are not plain ASCII."""
    if _c is not None:
        r = _c.absorb(ev.raw, ev.count, fds.fds, table.bulk_dict(), _MASK32, hp.KINDS, Identity, Entry, _NAMES,
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
    bad = _py_verify(fixed, fds.fds)
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


def _apply_delta(ev: hp.Batch, fds: OwnedFds, table: FdTable) -> None:
    """A pre-copy delta: verify like a snapshot batch, then each record replaces its key (in order)."""
    bad = _c.verify_batch(ev.raw, ev.count, fds.fds, _MASK32) if _c else _py_verify(ev.decoded()[0], fds.fds)
    if bad >= 0:
        _verify_error(ev, fds.fds, bad)
    for r, fd in zip(ev.records(), list(fds.fds)):
        table.save(r.name, r.id, fd, r.ident, replace=True)
        fds.fds.remove(fd)  # the table owns it now; what a failing save leaves is closed by the caller


def _py_verify(fixed: list[tuple], fds: list[int]) -> int:
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


