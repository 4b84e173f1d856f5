"""Drive the handoff protocol (protocol/handoff.py) over SOCK_SEQPACKET with trio and scm.py.

Theory of operation
-------------------
``send_table`` runs in the source. Its table is frozen while it runs (the daemon refuses
mutations). Until it has sent Commit, any failure leaves the source owning everything: it only
ever sent duplicates (SCM_RIGHTS copies) and closes nothing. After Commit the target owns the
table. If the connection then breaks before Confirm, the source asks the kernel whether the
target still lives (a pidfd opened at connect, pid from SO_PEERCRED): a dead target never
served anything, so the source takes ownership back; a live one has the Commit in its queue
and owns the table.

``receive_table`` runs in the target. Every fd that arrives is owned at once (OwnedFds) and
verified against the identity the source sent (kinds.verify: file type, inode, open flags);
entries go into a fresh FdTable. Any failure before Commit closes everything received, so a
target never holds a partial table while its source lives.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import fault, scm
from .errors import CapacityError, CprdError, HandoffError, ProtocolError, VerifyError
from .fds import OwnedFds
from .kinds import KIND_BY_CODE, MUTABLE_FLAGS, Identity, verify
from .paths import peer_cred
from .protocol import handoff as hp
from .table import Entry, FdTable

log = logging.getLogger("cprd.handoff")

RESERVE_FDS = 64  # fds a target keeps free for its own sockets and clients
TIMEOUT = 30.0
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

    def describe(self) -> dict:
        return {"entries": self.entries, "fds": self.fds, "ms": round(self.ms, 3), "target_pid": self.target_pid,
                "confirmed": self.confirmed, "phases_ms": {k: round(v, 3) for k, v in self.phases.items()}}


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


async def _owner_after_lost_confirm(pidfd: int | None, target_pid: int, control_path: str,
                                    timeout: float) -> bool:
    """After Commit, the connection broke without a Confirm. True if the target owns the table,
    False if it died (then our copies are the only ones left and we take the table back).

    Two proofs race: the target's pidfd turning readable (it died; a SIGKILLed process resets its
    sockets a moment before its pidfd says it exited, so we wait for it rather than peek), and the
    target answering a status request on the control socket (it serves only after it has read
    Commit). If neither comes within timeout, the target lives with the Commit in its queue: it
    owns the table."""
    if pidfd is None:
        return False  # gone before we could even open a pidfd
    verdict = True

    async def died(cancel: trio.CancelScope) -> None:
        nonlocal verdict
        await trio.lowlevel.wait_readable(pidfd)
        verdict = False
        cancel.cancel()

    async def serves(cancel: trio.CancelScope) -> None:
        while True:
            with trio.move_on_after(1):
                if await _status_pid(control_path) == target_pid:
                    cancel.cancel()
                    return
            await trio.sleep(0.02)

    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as n:
            n.start_soon(died, scope)
            n.start_soon(serves, scope)
    return verdict


async def _status_pid(control_path: str) -> int | None:
    """The pid of whoever answers a status request on the control socket (None if nobody does)."""
    from .protocol import control as cp

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with sock:
        try:
            await sock.connect(control_path)
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


async def send_table(table: FdTable, to: str, *, listener_fd: int | None, control_path: str,
                     batch: int = hp.SCM_MAX_FD, window: int = 4, timeout: float = TIMEOUT,
                     before_commit: Callable[[], Awaitable[None]] | None = None) -> Result:
    """Hand every entry of table (and the listening control socket) to the target at `to`.

    Raises a CprdError when the handoff did not take; then the caller still owns everything.
    On success the target owns the table; the caller must not serve it any more and should close
    its copies (exiting does that)."""
    if not 1 <= batch <= hp.SCM_MAX_FD:
        raise HandoffError(f"batch size {batch} is outside 1..{hp.SCM_MAX_FD} (the kernel's SCM_MAX_FD)")
    if window < 1:
        raise HandoffError(f"window {window} must be at least 1")
    clock = _Clock()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pidfd = None
    with sock:
        try:
            await sock.connect(to)
        except OSError as e:
            raise HandoffError(f"cannot reach a target at {to}: {e.strerror}; start one with "
                               f"`cprd target --listen {to}`") from None
        target_pid, _, _ = peer_cred(sock)
        try:
            pidfd = os.pidfd_open(target_pid)
        except OSError:
            pidfd = None
        try:
            return await _send(sock, table, clock, target_pid, pidfd, listener_fd, control_path,
                               batch, window, timeout, before_commit)
        except (HandoffError, CapacityError):
            raise
        except (CprdError, OSError) as e:
            raise HandoffError(f"handoff to {to} (target pid {target_pid}) failed: {e}; the source keeps"
                               " every entry") from None
        finally:
            if pidfd is not None:
                os.close(pidfd)


async def _send(sock, table, clock, target_pid, pidfd, listener_fd, control_path, batch, window, timeout,
                before_commit) -> Result:
    m = hp.Handoff("source", window)
    entries = list(table)
    n = len(entries)
    await scm.send(sock, m.send(hp.SourceHello(os.getpid(), n, n, batch, control_path)), (), "handoff hello")
    fault.point("source", "hello", sock=sock)
    ev, _ = await _recv_event(sock, m, timeout, "handoff hello")
    if isinstance(ev, hp.Abort):
        raise _abort_error(ev, "target")
    assert isinstance(ev, hp.TargetHello)
    need = n + (1 if listener_fd is not None else 0)
    if ev.capacity < need:
        msg = (f"target pid {ev.pid} has room for {ev.capacity} more fds (RLIMIT_NOFILE {ev.fd_limit}, "
               f"{ev.open_fds} open) but the table needs {need}; raise the target's limit (ulimit -n or "
               "LimitNOFILE=)")
        await _try_send(sock, m, hp.Abort(hp.AbortCode.CAPACITY, msg))
        raise CapacityError(msg)
    clock.mark("hello")
    for seq, i in enumerate(range(0, n, batch)):
        chunk = entries[i:i + batch]
        while not m.can_send_batch():
            ev, _ = await _recv_event(sock, m, timeout, "handoff transfer")
            if isinstance(ev, hp.Abort):
                raise _abort_error(ev, "target")
        batch_ev = hp.Batch.of(seq, [hp.Record(e.name, e.id, e.ident) for e in chunk])
        await scm.send(sock, m.send(batch_ev), [e.fd for e in chunk], "handoff batch")
        fault.point("source", "batch", seq, sock=sock)
    clock.mark("transfer")
    await scm.send(sock, m.send(hp.End(m.records, m.fds, m.digest)), (), "handoff end")
    fault.point("source", "end", sock=sock)
    while True:
        ev, _ = await _recv_event(sock, m, timeout, "handoff verify")
        if isinstance(ev, hp.Abort):
            raise _abort_error(ev, "target")
        if isinstance(ev, hp.Ready):
            break
    clock.mark("verify")
    fault.point("source", "ready", sock=sock)
    if before_commit is not None:
        await before_commit()
    await scm.send(sock, m.send(hp.Commit(listener_fd is not None)),
                   [listener_fd] if listener_fd is not None else [], "handoff commit")
    # From here on the target owns the table.
    fault.point("source", "commit", sock=sock)
    confirmed = False
    try:
        ev, _ = await _recv_event(sock, m, timeout, "handoff confirm")
        confirmed = isinstance(ev, hp.Confirm)
        problem = "" if confirmed else f"it sent {type(ev).__name__} instead of Confirm"
    except (CprdError, OSError) as e:
        problem = str(e)
    if not confirmed:
        if not await _owner_after_lost_confirm(pidfd, target_pid, control_path, timeout):
            raise HandoffError(f"the target (pid {target_pid}) died after the commit and before it confirmed"
                               f" ({problem}); the source keeps every entry")
        log.warning("event=confirm_lost target_pid=%d problem=%r note=target-lives-and-owns-the-table",
                    target_pid, problem)
    clock.mark("commit")
    fault.point("source", "confirm", sock=sock)
    res = Result(n, need, clock.total_ms, target_pid, confirmed, clock.phases)
    log.info("event=handoff_sent entries=%d fds=%d ms=%.2f target_pid=%d %s", n, need, res.ms, target_pid,
             " ".join(f"{k}_ms={v:.2f}" for k, v in clock.phases.items()))
    return res


async def _try_send(sock, m: hp.Handoff, ev: hp.Event) -> None:
    try:
        await scm.send(sock, m.send(ev), (), "handoff abort")
    except (CprdError, OSError):
        pass


@dataclass(slots=True)
class Received:
    table: FdTable
    listener: OwnedFds
    hello: hp.SourceHello
    machine: hp.Handoff
    source_pid: int
    phases: dict[str, float]


class NotAHandoff(ProtocolError):
    """The connection never started a valid handoff (garbage before the hello)."""


async def receive_table(sock, *, reserve: int = RESERVE_FDS, timeout: float = TIMEOUT) -> Received:
    """Receive a whole table on a connected socket, up to and including Commit.

    On any failure every fd received is closed and the error is raised; on success the caller owns
    the returned table and listener and must send Confirm (``confirm``) once it serves."""
    clock = _Clock()
    m = hp.Handoff("target")
    source_pid, _, _ = peer_cred(sock)
    try:
        ev, _ = await _recv_event(sock, m, timeout, "handoff hello")
    except ProtocolError as e:
        await _try_send(sock, hp.Handoff("target"), hp.Abort(hp.AbortCode.PROTOCOL, str(e)))
        raise NotAHandoff(str(e)) from None
    if not isinstance(ev, hp.SourceHello):
        raise NotAHandoff(f"expected a source hello, got {type(ev).__name__}")
    hello = ev
    soft, open_fds, capacity = fd_capacity(reserve)
    if hello.fds + 1 > capacity:
        msg = (f"this target (pid {os.getpid()}) can take {capacity} more fds (RLIMIT_NOFILE soft limit {soft}, "
               f"{open_fds} open, {reserve} kept in reserve) but the source has {hello.fds} + 1; raise the "
               "target's limit (ulimit -n, LimitNOFILE=) and start it again")
        await _try_send(sock, m, hp.Abort(hp.AbortCode.CAPACITY, msg))
        raise CapacityError(msg)
    await scm.send(sock, m.send(hp.TargetHello(m.version, os.getpid(), soft, open_fds, capacity)), (),
                   "handoff hello")
    fault.point("target", "hello", sock=sock)
    clock.mark("hello")
    table = FdTable()
    listener = OwnedFds()
    gc_was = gc.isenabled()
    gc.disable()  # tens of thousands of small objects arrive; collections mid-transfer only cost time
    try:
        while True:
            ev, fds = await _recv_event(sock, m, timeout, "handoff transfer")
            if isinstance(ev, hp.Batch):
                with fds:
                    _verify_batch(ev, fds, table)
                await scm.send(sock, m.send(hp.Ack(ev.seq, len(table))), (), "handoff ack")
                fault.point("target", "batch", ev.seq, sock=sock)
            elif isinstance(ev, hp.End):
                break
            elif isinstance(ev, hp.Abort):
                raise _abort_error(ev, "source")
        clock.mark("transfer")
        fault.point("target", "end", sock=sock)
        await scm.send(sock, m.send(hp.Ready(len(table), m.digest)), (), "handoff ready")
        fault.point("target", "ready", sock=sock)
        ev, fds = await _recv_event(sock, m, timeout, "handoff commit")
        if isinstance(ev, hp.Abort):
            raise _abort_error(ev, "source")
        listener = fds
        clock.mark("commit")
        fault.point("target", "commit", sock=sock)
    except BaseException as e:
        table.close_all()
        listener.close()
        if isinstance(e, (VerifyError, ProtocolError)) and not isinstance(e, scm.Closed):
            code = hp.AbortCode.VERIFY if isinstance(e, VerifyError) else hp.AbortCode.PROTOCOL
            await _try_send(sock, m, hp.Abort(code, str(e)))
        raise
    finally:
        gc.freeze()  # what arrived lives as long as the table: keep it out of every later collection
        if gc_was:
            gc.enable()
    log.info("event=handoff_received entries=%d source_pid=%d %s", len(table), source_pid,
             " ".join(f"{k}_ms={v:.2f}" for k, v in clock.phases.items()))
    return Received(table, listener, hello, m, source_pid, clock.phases)


try:  # optional C loop (built by hatch_build.py when a compiler is there); same checks, no stat_result objects
    if os.environ.get("CPRD_NO_SPEEDUPS"):
        raise ImportError
    from ._speedups import verify_batch as _c_verify
except ImportError:
    _c_verify = None

_MASK32 = ~MUTABLE_FLAGS & 0xFFFFFFFF


def speedups() -> bool:
    return _c_verify is not None


def _verify_batch(ev: hp.Batch, fds: OwnedFds, table: FdTable) -> None:
    """Verify each fd of a batch against its record, then move them all into the table.

    The hot loop of a handoff: one fstat and one fcntl an fd (in C when the speedup is built),
    then the Identity and Entry that the table keeps."""
    assert ev.fixed is not None and ev.names is not None
    make_ident, make_entry, kinds = Identity._make, Entry._make, KIND_BY_CODE
    if _c_verify is not None:
        bad = _c_verify(ev.raw, ev.count, fds.fds, _MASK32)
    else:
        bad = _py_verify(ev.fixed, fds.fds)
    if bad >= 0:
        id_, kind, _nlen, mode, flags, dev, ino = ev.fixed[bad]
        ident = make_ident((kinds[kind], mode, dev, ino, flags))
        raise VerifyError(f"entry ({ev.names[bad]!r}, {id_}) ({ident.kind.label}) does not match what the "
                          f"source sent: {verify(fds.fds[bad], ident)}")
    entries = [make_entry((name, id_, fd, make_ident((kinds[kind], mode, dev, ino, flags))))
               for (id_, kind, _nlen, mode, flags, dev, ino), name, fd in zip(ev.fixed, ev.names, fds.fds)]
    dup = table.absorb(entries)
    if dup is not None:
        raise ProtocolError(f"handoff batch {ev.seq}: duplicate key ({dup.name!r}, {dup.id})")
    fds.take()


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


async def confirm(sock, r: Received) -> None:
    """Tell the source we own the table and serve its control socket."""
    try:
        await scm.send(sock, r.machine.send(hp.Confirm(os.getpid())), (), "handoff confirm")
    except (CprdError, OSError) as e:
        log.warning("event=confirm_not_delivered error=%r note=the-target-owns-the-table-anyway", str(e))
    fault.point("target", "confirm", sock=sock)
