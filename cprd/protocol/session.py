"""The rules of one handoff, for each side, as sans-io sessions on top of the codec (handoff.py).

Theory of operation
-------------------
A handoff is a conversation with rules beyond which message may come next (the state machine of
handoff.py): which batches go out and when (the window), what a pre-copy round sends and when to
freeze instead, what End, Ready and Commit must agree on, who owns the table after which message,
and what a target keeps when its source dies. Those rules live here, in two classes:

- ``SourceSession`` takes a snapshot of a table and starts its journal in one step; then it says
  what to send, in order: the keys (Manifest), the snapshot batches (each with the fds it
  carries), and, round after round, the pre-copy deltas (the journal's ops: runs of saves as
  batches of replaced entries, runs of deletes as Delete), until the journal is small enough to
  freeze (``FREEZE_OPS``) or churns faster than the copy (``MAX_ROUNDS``); then the last delta,
  the answers to recent mutations (Results), End, and after Ready, Commit with the listening
  socket. It decides what a lost Confirm means, given what the driver learned of the target.
- ``TargetSession`` answers the hello (version, capacity), decides when a batch can be
  acknowledged, checks each Delete against what arrived, checks End against the table it holds,
  and when the connection breaks, decides from what the driver learned of the source whether to
  give everything up (the source lives and owns it) or keep it: the whole table after End, a
  salvage before End, naming the keys lost from the Manifests.

Every method takes what arrived (an event, a verdict of verification, the peer's fate) and
returns what to send (``Send``: an event, the fds that go with it, and the fault point the driver
passes afterwards) or raises a CprdError that says what is wrong; ``abort_for`` says which Abort,
if any, tells the peer. Nothing here does I/O: no sockets, no trio, no clock, no fstat. The
sessions read the table and its journal (both pure data); the target session inserts nothing
itself: the driver moves each batch's fds into ``TargetSession.table`` (the hot loop, in C when
the optional module is built) and reports each batch once it is verified.

What this module may know: the codec and state machine (handoff.py), tables and their journals,
entries' keys and identities. Not fds as resources: it never opens, closes or inspects one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .. import limits
from ..errors import CapacityError, Closed, CprdError, HandoffError, ProtocolError, VerifyError
from ..table import Entry, FdTable, Journal, Removed, Saved
from . import handoff as hp

FREEZE_OPS = 4  # freeze once at most this many ops are left to send (each costs the freeze ~0.05 ms)
MAX_ROUNDS = 8  # pre-copy rounds before freezing anyway (churn faster than the copy)
RESULTS_ROOM = hp.MAX_PAYLOAD - 1024  # bytes of answers one Results message carries


Point = tuple[str, "int | None", "int | None"]  # a fault point: (step, n, last)


class Send(NamedTuple):
    """Send `event` with `fds` attached (borrowed: the sender keeps owning them); then the source's
    driver passes the fault points `points`, each (step, n, last)."""

    event: hp.Event
    fds: Sequence[int] = ()
    points: tuple[Point, ...] = ()


def abort_for(err: BaseException) -> hp.Abort | None:
    """The Abort that tells the peer why this side gives up, or None when nothing should be sent
    (the connection broke, or the peer aborted first)."""
    if isinstance(err, Closed) or not isinstance(err, (VerifyError, ProtocolError, CapacityError)):
        return None
    code = {VerifyError: hp.AbortCode.VERIFY, CapacityError: hp.AbortCode.CAPACITY}.get(type(err),
                                                                                          hp.AbortCode.PROTOCOL)
    return hp.Abort(code, str(err))


def abort_error(ev: hp.Abort, who: str) -> CprdError:
    """The error an Abort from the peer stands for."""
    cls = {hp.AbortCode.CAPACITY: CapacityError, hp.AbortCode.VERIFY: VerifyError,
           hp.AbortCode.PROTOCOL: ProtocolError}.get(ev.code, HandoffError)
    return cls(f"the {who} aborted the handoff: {ev.message}")


def results_chunks(results: list[tuple[str, object]], limit: int = RESULTS_ROOM) -> tuple[list[list], list[str]]:
    """Answers split into Results messages that each fit the payload limit, and the request ids of
    answers too large to travel at all (left out: a client that retries such a mutation has it
    applied again, which matters only for a put that replaced; keys, names and ids are at most a
    few hundred bytes, so this does not happen with cprd's own answers)."""
    chunks: list[list] = [[]]
    dropped: list[str] = []
    size = 2
    for rid, answer in results:
        n = len(json.dumps([rid, answer], separators=(",", ":")).encode()) + 1
        if n > limit:
            dropped.append(rid)
            continue
        if size + n > limit:
            chunks.append([])
            size = 2
        chunks[-1].append((rid, answer))
        size += n
    return [c for c in chunks if c], dropped


# -- the source ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Result:
    """What a completed handoff reports (``ctl handoff --json``)."""

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


class SourceSession:
    """The source's side of one handoff. Construct it where no other task can run in between with
    the table's owner: it takes the snapshot and starts the journal in one step. The caller stops
    the journal (table.stop_journal) when the handoff is over, whatever its outcome.

    The driver's loop, in order: send ``hello()``; give the TargetHello to ``on_target_hello``;
    ``flow(batch, window)`` with what the kernel allows; send ``manifests()``; send each of
    ``snapshot()`` when ``can_send()`` (else receive an Ack for ``on_ack``); wait until
    ``settled()``; then ``precopy()`` rounds (send what it returns, settle) until it returns None;
    send ``before_freeze(results)``; freeze mutations; send ``after_freeze(results)``, then ``end()``;
    receive until Ready (``on_ready`` returns the Commit); send it; then ``on_confirm`` or
    ``confirm_lost``."""

    def __init__(self, table: FdTable, *, pid: int, control_path: str, listener_fd: int | None,
                 batch: int = hp.SCM_MAX_FD, window: int = 4) -> None:
        self.table = table
        self.entries: list[Entry] = list(table)  # the snapshot, and from this very instant the journal
        self.journal: Journal = table.start_journal()
        self.pid, self.control_path, self.listener_fd = pid, control_path, listener_fd
        self.m = hp.Handoff("source", window)
        self.batch, self.window = batch, window
        self.seq = 0  # the next batch's sequence number
        self.rounds = 0
        self.delta_ops = 0
        self.deltas = self.deletes = self.results_sent = 0  # messages of each kind so far (fault points)
        self.dropped_results: list[str] = []
        self.pending: list = []  # journal ops taken but not sent yet (the freeze's last delta)
        self.results_mark = 0
        self.target: hp.TargetHello | None = None

    # the hello
    def hello(self) -> Send:
        n = len(self.entries)
        return Send(hp.SourceHello(self.pid, n, n, self.batch, self.control_path), (), (("hello", None, None),))

    def receive(self, data: bytes, nfds: int) -> hp.Event:
        """Decode what the target sent; an Abort is raised as the error it stands for."""
        ev = self.m.receive(data, nfds)
        if isinstance(ev, hp.Abort):
            raise abort_error(ev, "target")
        return ev

    def on_target_hello(self, ev: hp.Event) -> None:
        """CapacityError (tell the target with abort_for) when it cannot hold the table."""
        if not isinstance(ev, hp.TargetHello):  # the state machine allows nothing else here
            raise ProtocolError(f"handoff: expected the target's hello, got {type(ev).__name__}")
        self.target = ev
        need = len(self.entries) + (1 if self.listener_fd is not None else 0)
        if ev.capacity < need:
            raise CapacityError(f"target pid {ev.pid} has room for {ev.capacity} more fds (RLIMIT_NOFILE "
                                f"{ev.fd_limit}, {ev.open_fds} open) but the table needs {need}; raise the target's "
                                "limit (ulimit -n or LimitNOFILE=)")

    def flow(self, batch: int, window: int) -> None:
        """The batch size and window the kernel lets this process keep in flight (ETOOMANYREFS)."""
        self.batch, self.m.window = batch, window

    # the snapshot
    def manifests(self) -> list[Send]:
        """The keys first (cheap: ~0.1 us a key), so that a target whose source dies mid-transfer can
        name what was lost."""
        e, k = self.entries, hp.MANIFEST_CHUNK
        return [Send(hp.Manifest.of(e[i:i + k])) for i in range(0, len(e), k)]

    def snapshot(self) -> Iterator[Send]:
        """The snapshot batches, each built when the driver asks for it (send it only if can_send)."""
        n = len(self.entries)
        last = (n - 1) // self.batch if n else -1
        for i in range(0, n, self.batch):
            part = self.entries[i:i + self.batch]
            ev = hp.Batch.of(self.seq, part)  # an Entry has a Record's name, id and ident
            self.seq += 1
            yield Send(ev, [e.fd for e in part], (("batch", ev.seq, last),))

    def can_send(self) -> bool:
        return self.m.can_send_batch()

    def unacked(self) -> int:
        return self.m.unacked

    def on_ack(self, ev: hp.Event) -> None:
        if not isinstance(ev, hp.Ack):
            raise ProtocolError(f"handoff: expected an Ack, got {type(ev).__name__}")

    def settled(self) -> bool:
        """Every batch sent has been acknowledged (verified by the target)."""
        return self.m.unacked == 0

    # pre-copy, the freeze, the end
    def precopy(self) -> list[Send] | None:
        """One pre-copy round: the deltas for what changed since the last take of the journal, to
        send and then settle; or None when it is time to freeze (what changed is small, or has
        not shrunk for MAX_ROUNDS rounds). Every round waits until the target has verified all it
        was sent, so that the freeze covers only the last delta, never a backlog."""
        ops = self.pending + self.journal.take()
        if len(ops) <= FREEZE_OPS or self.rounds >= MAX_ROUNDS:
            self.pending = ops
            return None
        self.pending = []
        self.rounds += 1
        return self._deltas(ops)

    def before_freeze(self, results: Callable[[int], tuple[list[tuple[str, object]], int]] | None) -> list[Send]:
        """The answers to mutations given so far (Results), sent before the freeze."""
        return self._results(results)

    def after_freeze(self, results: Callable[[int], tuple[list[tuple[str, object]], int]] | None) -> list[Send]:
        """Mutations now wait: the last delta and the answers given since before_freeze (then end())."""
        ops, self.pending = self.pending + self.journal.take(), []
        return self._deltas(ops) + self._results(results)

    def end(self) -> Send:
        """End, once everything before it has been sent: it carries the count and digest of all of it."""
        return Send(hp.End(len(self.table), self.m.fds, self.m.digest), (), (("end", None, None),))

    def on_ready(self, ev: hp.Event) -> Send | None:
        """An Ack (of the last delta) or Ready; for Ready, the Commit to send, with the listening
        socket attached."""
        if isinstance(ev, hp.Ready):
            fds = [self.listener_fd] if self.listener_fd is not None else []
            return Send(hp.Commit(self.listener_fd is not None), fds, (("commit", None, None),))
        if not isinstance(ev, hp.Ack):
            raise ProtocolError(f"handoff: expected Ready, got {type(ev).__name__}")
        return None

    # after Commit: the target owns the table, unless it turns out to be dead
    def on_confirm(self, ev: hp.Event) -> str:
        """'' if ev is the Confirm, else what went wrong instead."""
        return "" if isinstance(ev, hp.Confirm) else f"it sent {type(ev).__name__} instead of Confirm"

    def confirm_lost(self, problem: str, fate: str) -> None:
        """The Confirm did not come (problem) and the driver learned the target's fate ("dead",
        "serving", "alive"): only a proven death gives the table back to the source."""
        pid = self.target.pid if self.target else "?"
        if fate == "dead":
            raise HandoffError(f"the target (pid {pid}) died after the commit and before it confirmed ({problem}); "
                               "the source keeps every entry")

    def fds_sent(self) -> int:
        return self.m.fds + (1 if self.listener_fd is not None else 0)

    # helpers
    def _deltas(self, ops: list) -> list[Send]:
        """Journal ops in order: runs of saves as batches of replaced entries, runs of deletes as
        Delete messages."""
        self.delta_ops += len(ops)
        out: list[Send] = []
        i = 0
        while i < len(ops):
            kind = type(ops[i])
            limit = self.batch if kind is Saved else hp.MANIFEST_CHUNK
            j = i
            while j < len(ops) and type(ops[j]) is kind and j - i < limit:
                j += 1
            if kind is Saved:
                part = [op.entry for op in ops[i:j]]
                out.append(Send(hp.Batch.of(self.seq, part, replace=True), [e.fd for e in part],
                                (("delta", self.deltas, None),)))
                self.seq += 1
            else:
                assert kind is Removed
                out.append(Send(hp.Delete.of([op.key for op in ops[i:j]]), (),
                                (("delete", self.deletes, None), ("delta", self.deltas, None))))
                self.deletes += 1
            self.deltas += 1
            i = j
        return out

    def _results(self, results: Callable[[int], tuple[list[tuple[str, object]], int]] | None) -> list[Send]:
        if results is None:
            return []
        answers, self.results_mark = results(self.results_mark)
        chunks, dropped = results_chunks(answers)
        self.dropped_results += dropped
        out = []
        for chunk in chunks:
            out.append(Send(hp.Results(tuple(chunk)), (), (("results", self.results_sent, None),)))
            self.results_sent += 1
        return out


# -- the target ----------------------------------------------------------------------------------
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


class TargetSession:
    """The target's side of one handoff, from the source's hello on.

    The driver: check with ``start`` and send the TargetHello it returns; then for each event it
    receives: a snapshot batch goes into ``table`` (the driver's hot loop) and, once verified,
    ``batch_verified`` gives its Ack; for a delta batch, a Delete, End (``needs_settle``) the
    driver first waits until every batch in verification is acknowledged; a delta batch is applied
    by the driver and ``delta_applied`` gives its Ack; ``on_delete`` gives the keys to delete;
    ``on_results`` keeps the answers; ``on_end`` gives Ready; ``on_commit`` takes the listening
    socket. When the connection breaks, ``on_broken`` decides."""

    def __init__(self, machine: hp.Handoff, hello: hp.SourceHello, source_pid: int) -> None:
        self.m, self.hello, self.source_pid = machine, hello, source_pid
        self.table = FdTable()
        self.results: list[tuple[str, object]] = []
        self.deleted: set[tuple[str, int]] = set()  # keys the source deleted during the copy (not lost)
        self.verified = 0  # entries verified so far (what an Ack reports)
        self.ended = self.committed = False
        self.deltas = self.deletes = self.results_seen = 0  # messages of each kind so far (fault points)

    def start(self, *, pid: int, fd_limit: int, open_fds: int, capacity: int, reserve: int) -> Send:
        """The TargetHello, or ProtocolError/CapacityError (tell the source with abort_for) when the
        control path cannot be a UNIX socket path or the table would not fit."""
        path = self.hello.control_path
        if not path.startswith("/") or limits.unix_path_problem(path, "control path") is not None:
            raise ProtocolError(f"the source's control path {path!r} is not an absolute UNIX socket path of at most "
                                f"{limits.UNIX_PATH_MAX} bytes")
        if self.hello.fds + 1 > capacity:
            raise CapacityError(f"this target (pid {pid}) can take {capacity} more fds (RLIMIT_NOFILE soft limit "
                                f"{fd_limit}, {open_fds} open, {reserve} kept in reserve) but the source has "
                                f"{self.hello.fds} + 1; raise the target's limit (ulimit -n, LimitNOFILE=) and "
                                "start it again")
        return Send(hp.TargetHello(self.m.version, pid, fd_limit, open_fds, capacity))

    def receive(self, data: bytes, nfds: int) -> hp.Event:
        """Decode what the source sent; an Abort is raised as the error it stands for."""
        ev = self.m.receive(data, nfds)
        if isinstance(ev, hp.Abort):
            raise abort_error(ev, "source")
        return ev

    def last_batch(self) -> int:
        """The sequence number of the last snapshot batch (for the fault point 'batch:last')."""
        return (self.hello.entries - 1) // max(1, self.hello.batch_max)

    @staticmethod
    def needs_settle(ev: hp.Event) -> bool:
        """Whether every batch in verification must be acknowledged before ev is handled: anything
        that may close an fd (a delta, a delete, the end) waits until no fd is being verified, and
        acknowledgements go out in order."""
        return isinstance(ev, (hp.Delete, hp.End)) or (isinstance(ev, hp.Batch) and ev.replace)

    def must_wait_for_verdicts(self, in_verification: int, readable: bool) -> bool:
        """With batches in verification: wait for a verdict rather than read on when nothing is there
        to read, or when a window's worth is unacknowledged already (the window is the source's and
        not on the wire; a target that acknowledges in time never sees more)."""
        return in_verification > 0 and (in_verification >= self.m.window or not readable)

    def batch_verified(self, ev: hp.Batch) -> Send:
        """The Ack of a snapshot batch whose every fd matched its record."""
        self.verified += ev.count
        return Send(hp.Ack(ev.seq, self.verified))

    def batch_absorbed(self, ev: hp.Batch) -> Send:
        """The Ack of a snapshot batch verified as it went into the table."""
        self.verified = len(self.table)
        return Send(hp.Ack(ev.seq, self.verified))

    def delta_applied(self, ev: hp.Batch) -> Send:
        """The Ack of a delta batch the driver has applied (each record replaced its key)."""
        self.verified = len(self.table)
        self.deltas += 1
        return Send(hp.Ack(ev.seq, self.verified))

    def on_delete(self, ev: hp.Delete) -> list[tuple[str, int]]:
        """The keys to delete; ProtocolError if the source deletes one it never sent."""
        keys = ev.keys()
        for key in keys:
            if key not in self.table:
                raise ProtocolError(f"handoff delete: the source deletes {key!r}, which it never sent")
        self.deleted.update(keys)
        self.deletes += 1
        self.deltas += 1
        return keys

    def on_results(self, ev: hp.Results) -> None:
        self.results.extend(ev.results)
        self.results_seen += 1

    def on_end(self, ev: hp.End) -> Send:
        """Ready, once the table the deltas left agrees with the source's."""
        if ev.entries != len(self.table):
            raise ProtocolError(f"handoff end: the source holds {ev.entries} entries, this target {len(self.table)} "
                                "after applying every delta")
        self.ended = True
        return Send(hp.Ready(len(self.table), self.m.digest))

    def on_commit(self, ev: hp.Event) -> None:
        if not isinstance(ev, hp.Commit):
            raise ProtocolError(f"handoff: expected Commit, got {type(ev).__name__}")
        self.committed = True

    def confirm(self, pid: int) -> Send:
        return Send(hp.Confirm(pid))

    def gives_up(self, err: BaseException) -> bool:
        """Whether an error ends the handoff for good whatever became of the source: a verdict of
        ours, an Abort either way, or anything after the Commit (we own the table then)."""
        return isinstance(err, (VerifyError, CapacityError)) or self.committed or self.m.state is hp.State.ABORTED

    def on_broken(self, err: BaseException, fate: str) -> None:
        """The connection broke (err) and the driver learned the source's fate: if it lives it owns
        everything (HandoffError: close all that arrived); if it died, what reached us exists
        nowhere else: keep it (``kept``, once the driver has settled what is in verification)."""
        if fate != "dead":
            raise HandoffError(f"the handoff connection broke ({err}) while the source (pid {self.source_pid}) is "
                               f"{fate}; it keeps every entry, this target keeps none")

    def kept(self) -> Salvage | None:
        """After the source died: None if it died after End (the whole table arrived), else the
        salvage: what arrived, and the keys lost with it, from its Manifests."""
        return None if self.ended else self.salvage()

    def salvage(self) -> Salvage:
        named: list[tuple[str, int]] = []
        for man in self.m.manifests:
            try:
                named.extend(man.keys())
            except ProtocolError:
                break
        lost = [k for k in named if k not in self.table and k not in self.deleted]
        received = sum(1 for k in named if k in self.table or k in self.deleted)
        unnamed = max(0, self.hello.entries - len(named))
        return Salvage(self.source_pid, self.hello.entries, received, lost, unnamed, len(self.table))
