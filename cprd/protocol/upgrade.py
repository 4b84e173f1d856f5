"""The rules of an in-place upgrade (docs/protocol.md section 6) for each of its three processes,
with no I/O: what a process has seen goes in, what it must do comes out.

Theory of operation
-------------------
Beside the clients, three processes take part in an upgrade:

- the **stand-in** (S): a fork of the old program; it serves while the new program starts, and
  journals every change it makes, fds attached, to the two others;
- the **new program** (P): exec'd in the daemon's own pid; it restores the state the old program
  wrote at the fork, applies the journal and takes the table over;
- the **guardian** (G): forked by the old program just before the exec; it holds a copy of every fd
  and of the journal, and restores the table if both others fail.

They speak on three SOCK_SEQPACKET pairs, whose queues outlive the sender: the journal (S and P),
the guardian's copy (S to G: the same changes, and S's word), and the guardian's link (P and G).
Each message is one of ``Msg``, by its first byte:

    S -> P   J changes (fds attached)    D done, with the count of J sent    B released
    P -> S   T take over                 K taken
    S -> G   J the same changes          O "I keep the table"                K "I handed it over"
    P -> G   C confirmed                 G -> P   c acknowledged

What a process does is decided by ``decide(role, state, event)``: one lookup in ``TRANSITIONS``,
a table of (role, state, event) -> (next state, actions). The drivers (daemon/standin.py, the
new program's take-over in daemon/takeover.py, the guardian in upgrade.py) only turn what they
see into events and carry the actions out. The rules the table keeps:

1. **Answered means journaled.** S answers a change only once it is queued for every process that
   may still take over from it (P and G while it serves; G alone while it keeps the table and G
   has not left). A change it cannot queue breaks the journal: S fences the others before that
   change is answered.
2. **Give up on a peer only by fencing it.** A process that stops waiting for a peer (the peer's
   deadline passed, or its end closed) SIGKILLs it (``Fence``) before it acts on that decision. A
   killed process never runs another instruction of its own (a stopped one dies at once, a frozen
   one at thaw), so it can answer no client after that: it is fenced from the kill on.
3. **Nobody is fenced once it may answer.** P answers clients only after S has released the table
   (B) or been fenced, and G has acknowledged its confirmation (c) or been fenced: by then neither
   will ever fence P. S answers again after the take-over began only once it has fenced P.
4. **Relinquish only to the living.** S on K, G on C and G on O leave the table to another process;
   each first checks that the other is alive (a pidfd). A dead one answered nobody (rule 3), so
   the one that checked takes over instead.
5. **Every wait has a deadline** (``Deadlines``), and they are ordered so that a healthy new
   program is never fenced: the guardian waits for the confirmation longer than a healthy new
   program can take to reach it.

``tests/unit/test_upgrade_rules.py`` drives these sessions through every interleaving of their
messages with every crash and every stop of one or two of the processes at every step, and checks
that exactly one process owns the table in the end, holding the state at the fork plus every
change answered (or that every process that held the table was killed); that at no instant two
processes may answer; and that no process waits without a deadline.

Also here, the wire forms an upgrade needs: the journal's codec (``encode_journal``,
``decode_journal``, ``encode_done``, ``decode_done``) and the state the old program leaves the new
one (``UpgradeState``). What this module may know: entries' keys and identities (kinds.Identity).
No sockets, no fds as resources, no clock, no trio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from ..errors import UpgradeError
from ..kinds import Identity


# -- messages --------------------------------------------------------------------------------------
class Msg(bytes, Enum):
    """The first byte of each message of an upgrade."""

    JOURNAL = b"J"  # S -> P and S -> G: changes and the answers to mutations, fds attached
    TAKE_OVER = b"T"  # P -> S: stop changing the table, send what is left and Done
    DONE = b"D"  # S -> P: nothing more will change; followed by the count of J messages sent
    TAKEN = b"K"  # P -> S: I have every change; S -> G: I handed the table over
    RELEASED = b"B"  # S -> P: I will never act on the table again (and exit)
    CONFIRM = b"C"  # P -> G: I take over now
    CONFIRMED = b"c"  # G -> P: understood, I leave
    STANDIN_OWNS = b"O"  # S -> G: the new program is fenced; I keep the table
    GUARDIAN_PIDFD = b"G"  # old program -> S: a pidfd of the guardian, attached (so that S can fence it)


JOURNAL_MAX = 1 << 20  # bytes of one journal message (at most 253 saves: far below)


def encode_journal(ops: list[list], answers: list[list]) -> bytes:
    """A J message: ops are ["S", name, id, *identity] (an fd attached for each, in order) or
    ["R", name, id]; answers are [rid, answer] of the mutations that made them."""
    return Msg.JOURNAL + json.dumps({"ops": ops, "answers": answers}, separators=(",", ":")).encode()


def save_op(name: str, id_: int, ident: Identity) -> list:
    return ["S", name, id_, *ident.to_json()]


def remove_op(name: str, id_: int) -> list:
    return ["R", name, id_]


@dataclass(slots=True)
class JournalMessage:
    saves: list[tuple[str, int, Identity]]  # in the order of the fds attached
    ops: list[tuple[str, str, int]]  # ("S" or "R", name, id), in order
    answers: list[list]


def decode_journal(data: bytes, n_fds: int) -> JournalMessage:
    """UpgradeError unless data is a well-formed J message carrying exactly n_fds fds."""
    try:
        msg = json.loads(data[1:])
        ops, answers = msg["ops"], msg["answers"]
        if data[:1] != Msg.JOURNAL or not isinstance(ops, list) or not isinstance(answers, list):
            raise TypeError
        out = JournalMessage([], [], answers)
        for op in ops:
            if op[0] == "S":
                name, id_ = op[1], op[2]
                out.saves.append((name, id_, Identity.from_json(op[3:])))
            elif op[0] != "R" or len(op) != 3:
                raise ValueError
            else:
                name, id_ = op[1], op[2]
            if not isinstance(name, str) or not isinstance(id_, int):
                raise TypeError
            out.ops.append((op[0], name, id_))
    except (ValueError, KeyError, TypeError, IndexError):
        raise UpgradeError(f"the stand-in's journal holds a malformed message ({data[:60]!r})") from None
    if len(out.saves) != n_fds:
        raise UpgradeError(f"a journal message names {len(out.saves)} fds but {n_fds} came with it")
    return out


def encode_done(count: int) -> bytes:
    return Msg.DONE + str(count).encode()


def decode_done(data: bytes) -> int:
    body = data[1:]
    if data[:1] != Msg.DONE or not body.isdigit() or len(body) > 12:
        raise UpgradeError(f"the stand-in's Done is malformed ({data[:20]!r})")
    return int(body)


# -- who takes part, and when they give up ----------------------------------------------------------
class Role(Enum):
    STANDIN = "stand-in"
    NEW = "new program"
    GUARDIAN = "guardian"


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long each wait of an upgrade lasts. In order:

    - ``start_s`` (``ctl upgrade --timeout``, the daemon's ``--upgrade-timeout``): S waits this long
      from the fork for T; a new program that has not asked by then is fenced.
    - ``answer_s``: the answer of a live peer to a message it expects: D after T, B after K, c
      after C, S's word after the guardian fenced the new program, the guardian leaving after O.
      A healthy peer answers in milliseconds; one that has not after answer_s (stopped, frozen,
      swapped out) is fenced. Its only cost when it fires too early is a needless kill.
    - ``fence_s``: how long a fenced process is waited for to end (it can answer nobody from the
      kill on; the wait is for its fds and its clients' connections to close).
    - ``guard_s``: the guardian waits this long from its own fork (after S's) for C. A healthy new
      program sends T before start_s (else S fences it), then waits at most answer_s + fence_s for
      D and as long again for B, and sends C: by start_s + 2 (answer_s + fence_s). guard_s adds as
      much again, so the guardian never fences a healthy new program.
    """

    start_s: float = 30.0
    answer_s: float = 1.0
    fence_s: float = 2.0

    @property
    def guard_s(self) -> float:
        return self.start_s + 4 * (self.answer_s + self.fence_s)

    def check(self) -> None:
        if not (0 < self.start_s <= 3600 and 0 < self.answer_s <= 60 and 0 < self.fence_s <= 60):
            raise UpgradeError(f"upgrade deadlines out of range: {self}")


# -- events, states, actions ---------------------------------------------------------------------
class Ev(Enum):
    """What a process has seen, after rule 4's check of who is alive."""

    TAKE_OVER = "T"  # S: T arrived
    DONE = "D"  # P: D arrived, and its count is the number of J applied
    DONE_HOLE = "D!"  # P: D arrived with another count, or a J that does not apply: a journal with a hole
    TAKEN = "K"  # S: K arrived and P is alive
    RELEASED = "B"  # P: B arrived
    CONFIRM = "C"  # G: C arrived and P is alive
    CONFIRMED = "c"  # P: c arrived
    STANDIN_OWNS = "O"  # G: O arrived and S is alive
    STANDIN_HANDED = "SK"  # G: S said K (it handed the table to P)
    NEW_GONE = "new-gone"  # P died or exited (its pidfd; or a message of it arrived after its death)
    STANDIN_GONE = "standin-gone"  # S's end closed (died or exited) with everything it sent read
    GUARDIAN_GONE = "guardian-gone"  # G left or died (its pid ended, or its end of the journal closed)
    TIMEOUT = "timeout"  # the deadline of this process's current wait passed
    BROKEN = "broken"  # S: a change could not be journaled (a queue full, an fd that cannot be copied)


class St(Enum):
    # the stand-in
    SERVING = "serving"  # answers clients, journals to P and G
    DONE_SENT = "done-sent"  # sent D: answers nothing, waits for K
    KEEPING = "keeping"  # fenced P: answers clients, journals to G until G leaves
    OWNER = "owner"  # the table's only owner (S, P or the restored program)
    RELEASED = "released"  # S after B: exits, answering nothing
    # the new program
    WAIT_DONE = "wait-done"  # sent T
    WAIT_RELEASE = "wait-release"  # sent K
    WAIT_ACK = "wait-ack"  # sent C
    FAILED = "failed"  # the journal has a hole: exits 1 without taking over
    # the guardian
    WATCH = "watch"  # waits for C
    WAIT_WORD = "wait-word"  # fenced P; waits for S's word
    LEFT = "left"  # exits, having restored nothing
    RESTORED = "restored"  # execs the previous program with the state and its copy of the journal


class Act(Enum):
    FREEZE = "freeze"  # mutations wait
    STOP_ACCEPTING = "stop-accepting"  # new connections wait in the backlog
    FLUSH = "flush"  # send what is collected of the journal
    FREEZE_ALL = "freeze-all"  # every request waits, reads too
    THAW = "thaw"  # requests go on; accept again
    DRAIN = "drain"  # P: apply everything queued in the journal (its sender is fenced: it is complete)
    OWN = "own"  # answer clients as the table's only owner from now on
    LEAVE = "leave"  # answer nothing more, close the channels, exit
    RESTORE = "restore"  # G: run the previous program with the state at the fork plus its journal
    FAIL = "fail"  # P: exit 1 without taking over


@dataclass(frozen=True, slots=True)
class Send:
    to: Role
    msg: Msg


@dataclass(frozen=True, slots=True)
class Fence:
    """SIGKILL the peer (P: with its process group and whatever still holds the upgrade's state),
    then wait at most fence_s for it to end. It is harmless from the kill on."""

    peer: Role


@dataclass(frozen=True, slots=True)
class JournalTo:
    """S: the readers each change goes to from now on (and that must have it before its answer)."""

    readers: frozenset[Role]


Action = Act | Send | Fence | JournalTo
S, P, G = Role.STANDIN, Role.NEW, Role.GUARDIAN
_KEEP = (Fence(P), Act.THAW, Send(G, Msg.STANDIN_OWNS), JournalTo(frozenset({G})))

# (role, state, event) -> (next state, actions, in order)
TRANSITIONS: dict[tuple[Role, St, Ev], tuple[St, tuple[Action, ...]]] = {
    # -- the stand-in
    (S, St.SERVING, Ev.TAKE_OVER): (St.DONE_SENT, (Act.FREEZE, Act.STOP_ACCEPTING, Act.FLUSH, Send(P, Msg.DONE),
                                                   Act.FREEZE_ALL)),
    (S, St.SERVING, Ev.NEW_GONE): (St.KEEPING, _KEEP),
    (S, St.SERVING, Ev.TIMEOUT): (St.KEEPING, _KEEP),  # no T within start_s
    (S, St.SERVING, Ev.BROKEN): (St.OWNER, (Fence(P), Fence(G), JournalTo(frozenset()))),
    # every holder of the guardian's end closed it (it died, or was never forked): it can never restore,
    # so the journal goes to the new program alone (a send to it would fail, and break the journal)
    (S, St.SERVING, Ev.GUARDIAN_GONE): (St.SERVING, (JournalTo(frozenset({P})),)),
    (S, St.DONE_SENT, Ev.BROKEN): (St.OWNER, (Fence(P), Fence(G), JournalTo(frozenset()))),  # (nothing changes after D)
    (S, St.DONE_SENT, Ev.TAKEN): (St.RELEASED, (Send(G, Msg.TAKEN), Send(P, Msg.RELEASED), Act.LEAVE)),
    (S, St.DONE_SENT, Ev.NEW_GONE): (St.KEEPING, _KEEP),
    (S, St.DONE_SENT, Ev.TIMEOUT): (St.KEEPING, _KEEP),  # no K within answer_s
    (S, St.KEEPING, Ev.GUARDIAN_GONE): (St.OWNER, (JournalTo(frozenset()),)),
    (S, St.KEEPING, Ev.TIMEOUT): (St.OWNER, (Fence(G), JournalTo(frozenset()))),  # G did not leave
    (S, St.KEEPING, Ev.BROKEN): (St.OWNER, (Fence(G), JournalTo(frozenset()))),
    # -- the new program (it sent T when it started)
    (P, St.WAIT_DONE, Ev.DONE): (St.WAIT_RELEASE, (Send(S, Msg.TAKEN),)),
    (P, St.WAIT_DONE, Ev.DONE_HOLE): (St.FAILED, (Act.FAIL,)),
    (P, St.WAIT_DONE, Ev.STANDIN_GONE): (St.WAIT_ACK, (Fence(S), Send(G, Msg.CONFIRM))),
    (P, St.WAIT_DONE, Ev.TIMEOUT): (St.WAIT_ACK, (Fence(S), Act.DRAIN, Send(G, Msg.CONFIRM))),
    (P, St.WAIT_RELEASE, Ev.RELEASED): (St.WAIT_ACK, (Send(G, Msg.CONFIRM),)),
    (P, St.WAIT_RELEASE, Ev.STANDIN_GONE): (St.WAIT_ACK, (Fence(S), Send(G, Msg.CONFIRM))),
    (P, St.WAIT_RELEASE, Ev.TIMEOUT): (St.WAIT_ACK, (Fence(S), Send(G, Msg.CONFIRM))),
    (P, St.WAIT_ACK, Ev.CONFIRMED): (St.OWNER, (Act.OWN,)),
    (P, St.WAIT_ACK, Ev.GUARDIAN_GONE): (St.OWNER, (Act.OWN,)),
    (P, St.WAIT_ACK, Ev.TIMEOUT): (St.OWNER, (Fence(G), Act.OWN)),
    # -- the guardian
    (G, St.WATCH, Ev.CONFIRM): (St.LEFT, (Send(P, Msg.CONFIRMED), Act.LEAVE)),
    (G, St.WATCH, Ev.NEW_GONE): (St.WAIT_WORD, (Fence(P),)),
    (G, St.WATCH, Ev.TIMEOUT): (St.WAIT_WORD, (Fence(P),)),  # no C within guard_s
    (G, St.WATCH, Ev.STANDIN_OWNS): (St.LEFT, (Fence(P), Act.LEAVE)),  # S fenced P already
    (G, St.WAIT_WORD, Ev.STANDIN_OWNS): (St.LEFT, (Act.LEAVE,)),
    (G, St.WAIT_WORD, Ev.STANDIN_HANDED): (St.RESTORED, (Fence(S), Act.RESTORE)),
    (G, St.WAIT_WORD, Ev.STANDIN_GONE): (St.RESTORED, (Fence(S), Act.RESTORE)),
    (G, St.WAIT_WORD, Ev.TIMEOUT): (St.RESTORED, (Fence(S), Act.RESTORE)),  # S silent for answer_s
}

# Rows no schedule reaches (the model checks that none does), kept so that a driver's mistake still
# ends with one owner: the journal cannot break after D, since nothing changes after D.
DEFENSIVE = {(S, St.DONE_SENT, Ev.BROKEN)}

# (role, state, event) that change nothing: what is noted for later (G: S's K or end while it
# watches P; P: G's end), or that comes too late to matter (the process already decided).
NOTED = {(G, St.WATCH, Ev.STANDIN_HANDED), (G, St.WATCH, Ev.STANDIN_GONE)}
IGNORED = {
    *((S, st, ev) for st in (St.KEEPING, St.OWNER, St.RELEASED)
      for ev in (Ev.NEW_GONE, Ev.TAKE_OVER, Ev.TAKEN, Ev.TIMEOUT, Ev.GUARDIAN_GONE, Ev.BROKEN)
      if (S, st, ev) not in TRANSITIONS),
    (S, St.DONE_SENT, Ev.GUARDIAN_GONE),  # it left or died: it restores nothing (and nothing changes after D)
    *((P, st, ev) for st in (St.WAIT_DONE, St.WAIT_RELEASE) for ev in (Ev.GUARDIAN_GONE, Ev.CONFIRMED)),
    *((P, st, ev) for st in (St.WAIT_ACK, St.OWNER, St.FAILED)
      for ev in (Ev.STANDIN_GONE, Ev.RELEASED, Ev.DONE, Ev.DONE_HOLE, Ev.TIMEOUT, Ev.GUARDIAN_GONE, Ev.CONFIRMED)
      if (P, st, ev) not in TRANSITIONS),
    *((G, st, ev) for st in (St.WAIT_WORD, St.LEFT, St.RESTORED)
      for ev in (Ev.CONFIRM, Ev.NEW_GONE, Ev.STANDIN_OWNS, Ev.STANDIN_HANDED, Ev.STANDIN_GONE, Ev.TIMEOUT)
      if (G, st, ev) not in TRANSITIONS),
}

# which deadline runs in each waiting state (the others wait for nothing: they serve or are done)
WAITS: dict[tuple[Role, St], str] = {
    (S, St.SERVING): "start_s", (S, St.DONE_SENT): "answer_s", (S, St.KEEPING): "answer_s",
    (P, St.WAIT_DONE): "answer_s", (P, St.WAIT_RELEASE): "answer_s", (P, St.WAIT_ACK): "answer_s",
    (G, St.WATCH): "guard_s", (G, St.WAIT_WORD): "answer_s",
}
ANSWERS = {(S, St.SERVING), (S, St.KEEPING), (S, St.OWNER), (P, St.OWNER), (G, St.RESTORED)}  # may answer clients
DONE_STATES = {St.OWNER, St.RELEASED, St.FAILED, St.LEFT, St.RESTORED}


def decide(role: Role, state: St, ev: Ev) -> tuple[St, tuple[Action, ...]] | None:
    """What a process in `state` does on `ev`: (next state, actions), or None to stay as it is
    (the event is noted or comes too late). UpgradeError for a combination no rule covers."""
    hit = TRANSITIONS.get((role, state, ev))
    if hit is not None:
        return hit
    if (role, state, ev) in NOTED or (role, state, ev) in IGNORED:
        return None
    raise UpgradeError(f"upgrade: no rule for the {role.value} in state {state.value} on {ev.value}")


@dataclass(slots=True)
class Session:
    """One process's side of an upgrade: its state and what it has noted. ``on`` is the only way
    the state changes."""

    role: Role
    state: St
    standin_handed: bool = False  # G: S said K
    standin_gone: bool = False  # G: S's end closed
    guardian_gone: bool = False  # S: G's end closed (it can never restore)
    why: Ev | None = None  # the event that made S keep the table (or P fail, G restore)
    history: list[tuple[St, Ev, St]] = field(default_factory=list)

    @classmethod
    def standin(cls) -> Session:
        return cls(S, St.SERVING)

    @classmethod
    def new_program(cls) -> tuple[Session, tuple[Action, ...]]:
        """The new program, once it restored the state at the fork and applied the journal queued:
        it asks for the rest."""
        return cls(P, St.WAIT_DONE), (Send(S, Msg.TAKE_OVER),)

    @classmethod
    def guardian(cls) -> Session:
        return cls(G, St.WATCH)

    @property
    def waits(self) -> str | None:
        """The name of the Deadlines field that bounds the current wait, or None (not waiting)."""
        return WAITS.get((self.role, self.state))

    @property
    def answers(self) -> bool:
        """Whether this process may answer clients now."""
        return (self.role, self.state) in ANSWERS

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    def on(self, ev: Ev) -> tuple[Action, ...]:
        hit = decide(self.role, self.state, ev)
        if hit is None:
            if (self.role, self.state, ev) in NOTED:
                self.standin_handed |= ev is Ev.STANDIN_HANDED
                self.standin_gone |= ev is Ev.STANDIN_GONE
            return ()
        new, actions = hit
        if (self.role, ev) == (S, Ev.GUARDIAN_GONE):
            self.guardian_gone = True
        self.history.append((self.state, ev, new))
        if new in (St.KEEPING, St.OWNER, St.FAILED, St.WAIT_WORD, St.RESTORED) and self.why is None:
            self.why = ev
        self.state = new
        if (self.role, new) == (G, St.WAIT_WORD) and (self.standin_handed or self.standin_gone):
            # what S said (or its end) came while the guardian still watched the new program
            more = self.on(Ev.STANDIN_HANDED if self.standin_handed else Ev.STANDIN_GONE)
            return actions + more
        if (self.role, new) == (S, St.KEEPING) and self.guardian_gone:
            return actions + self.on(Ev.GUARDIAN_GONE)  # the guardian went before: nobody to wait for
        return actions

    def on_msg(self, msg: Msg, sender_alive: bool = True) -> tuple[Action, ...]:
        """A message arrived; `sender_alive`: whether its sender is alive as this process reads
        it (rule 4: only K, C and O ask)."""
        ev = _MSG_EVENTS.get((self.role, msg))
        if ev is None:
            raise UpgradeError(f"upgrade: the {self.role.value} does not expect {msg!r}")
        if not sender_alive and ev in (Ev.TAKEN, Ev.CONFIRM):
            ev = Ev.NEW_GONE  # P died after it sent that: it answered nobody (rule 3); take over
        elif not sender_alive and ev is Ev.STANDIN_OWNS:
            ev = Ev.STANDIN_GONE  # S died after it fenced P: the guardian's copy has all it answered (rule 1)
        return self.on(ev)


_MSG_EVENTS = {(S, Msg.TAKE_OVER): Ev.TAKE_OVER, (S, Msg.TAKEN): Ev.TAKEN, (P, Msg.RELEASED): Ev.RELEASED,
               (P, Msg.CONFIRMED): Ev.CONFIRMED, (G, Msg.CONFIRM): Ev.CONFIRM, (G, Msg.STANDIN_OWNS): Ev.STANDIN_OWNS,
               (G, Msg.TAKEN): Ev.STANDIN_HANDED}


# -- the state the old program leaves the new one --------------------------------------------------
STATE_VERSION = 3  # 3: deadlines and the guardian's link (2: a stand-in without fencing; 1: cprd 0.1.0)


@dataclass(slots=True)
class Standin:
    pid: int
    journal_fd: int | None  # the new program's end of the journal (crosses the exec)
    guardian_journal_fd: int | None = None  # the guardian's copy and the stand-in's word (the guardian's only)
    pidfd: int | None = None  # a pidfd of the stand-in (the guardian's only: to fence it)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "journal_fd": self.journal_fd, "guardian_journal_fd": self.guardian_journal_fd,
                "pidfd": self.pidfd}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Standin | None:
        if not d:
            return None
        return cls(int(d["pid"]), d.get("journal_fd"), d.get("guardian_journal_fd"), d.get("pidfd"))


@dataclass(slots=True)
class StateEntry:
    name: str
    id: int
    fd: int
    ident: Identity

    def to_json(self) -> list:
        return [self.name, self.id, self.fd, *self.ident.to_json()]

    @classmethod
    def from_json(cls, row: list) -> StateEntry:
        try:
            name, id_, fd = row[0], row[1], row[2]
            if not isinstance(name, str) or not isinstance(id_, int) or not isinstance(fd, int):
                raise TypeError
            return cls(name, id_, fd, Identity.from_json(row[3:]))
        except (TypeError, IndexError, ValueError):
            raise UpgradeError(f"an entry of the upgrade state is malformed: {row!r:.200}") from None


@dataclass(slots=True)
class UpgradeState:
    """Everything the new program of an upgrade restores from (docs/protocol.md 6.2), as one JSON
    object in a memfd. The envelope (version, previous, env, crossing) is what every version keeps,
    so that a program that cannot read the rest can still hand everything back. Fields this
    program does not know are kept (``extra``) and written back by a rewrite."""

    cprd_state: int
    previous: list[str]
    env: dict[str, str]
    crossing: list[int] | None  # every fd that must survive an exec but the state memfd itself
    argv_new: list[str]
    role: str
    control_path: str
    control_fid: tuple[int, int] | None
    listener_fd: int
    requester_fd: int | None
    entries: list[StateEntry]
    results: list[list]
    config: dict[str, Any]
    pid: int
    t_freeze_ms: float
    deadlines: Deadlines = Deadlines()
    standin: Standin | None = None
    guardian_fd: int | None = None  # the new program's end of the guardian's link
    guardian_pid: int | None = None
    group: int | None = None  # the process group a fence of the new program kills (None: the daemon shares it)
    rolled_back: str | None = None
    failed_program: list[str] | None = None
    mode: str = "take-over"  # "take-over" (from a live stand-in) or "restore" (the guardian's: S and P fenced)
    nice: int | None = None
    handoffs: int = 0
    upgrades: int = 0
    salvage: dict | None = None
    source_died: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name == "entries":
                v = [e.to_json() for e in v]
            elif f.name == "standin":
                v = v.to_json() if v is not None else None
            elif f.name == "deadlines":
                d["deadline_s"], d["answer_s"], d["fence_s"] = v.start_s, v.answer_s, v.fence_s
                continue
            elif f.name == "control_fid":
                v = list(v) if v is not None else None
            d[f.name] = v
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, newest: int = STATE_VERSION) -> UpgradeState:
        """UpgradeError if data is not a state this program can restore from (``envelope`` reads
        the part every version keeps)."""
        d = envelope(data)
        if d["cprd_state"] == 2:
            raise UpgradeError("upgrade state version 2 was written by a development version of cprd whose stand-in "
                               "does not fence; this program restores versions 1 and 3 only")
        if d["cprd_state"] > newest:
            raise UpgradeError(f"upgrade state version {d['cprd_state']} is newer than this program reads "
                               f"({newest}); it cannot restore it")
        known = {f.name for f in fields(cls)}
        try:
            kw: dict[str, Any] = {k: d[k] for k in known - {"extra", "deadlines", "entries", "standin"} if k in d}
            kw["entries"] = [StateEntry.from_json(row) for row in d["entries"]]
            kw["standin"] = Standin.from_json(d.get("standin"))
            kw["control_fid"] = tuple(d["control_fid"]) if d.get("control_fid") else None
            kw["deadlines"] = Deadlines(float(d.get("deadline_s") or 30.0), float(d.get("answer_s") or 1.0),
                                        float(d.get("fence_s") or 2.0))
            kw["extra"] = {k: v for k, v in d.items() if k not in known and k not in ("deadline_s", "answer_s",
                                                                                       "fence_s")}
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise UpgradeError(f"the upgrade state is malformed ({type(e).__name__}: {e})") from None

    def crossing_fds(self, state_fd: int) -> list[int]:
        """Every fd that must survive an exec (the state memfd included)."""
        return [*(self.crossing if self.crossing is not None else self.computed_crossing()), state_fd]

    def computed_crossing(self) -> list[int]:
        fds = [e.fd for e in self.entries] + [self.listener_fd]
        for fd in (self.guardian_fd, self.requester_fd, self.standin.journal_fd if self.standin else None):
            if fd is not None:
                fds.append(fd)
        return fds


def envelope(data: bytes) -> dict[str, Any]:
    """The state as a JSON object with an integer cprd_state (what any version can read)."""
    try:
        d = json.loads(data)
    except ValueError as e:
        raise UpgradeError(f"the upgrade state is not JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("cprd_state"), int):
        raise UpgradeError("no cprd upgrade state")
    return d
