"""The upgrade's rules (cprd/protocol/upgrade.py), checked exhaustively in-process, with no sockets.

A small world runs the three sessions the daemon's drivers run (the stand-in S, the new program P,
the guardian G) and everything between them as the kernel would: queues that outlive their
sender (the journal and its copy, S's word to G, the guardian's link), pidfds that tell a death,
deadlines that may pass at any moment (time is left abstract, so no rule may lean on it), clients
whose changes the stand-in and later the owner answer. From the fork it explores every
interleaving of every step, with up to two faults anywhere: a SIGKILL or a SIGSTOP (with a later
SIGCONT, or a fence) of any of the three, a journal queue that refuses the next message, or a
journal message that does not apply at the new program (an fd that does not verify).

For every reachable state it checks:
- at most one process may answer clients (alive or stopped);
- a process answers a change only with every change answered before it in its table;
- the table is lost (no process holds it) only by a fault that killed its last holder, never by
  a process of the upgrade giving it up;
- no process waits without a deadline (a state where nothing can happen is an end);
and in every end (nothing but a fault can happen): exactly one process owns the table and holds
the state at the fork plus every change answered, or the table was lost as above.

A second, timed run gives the deadlines their documented values and checks their order: a new
program that is never stopped is never fenced, whichever other process stops and when.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import pytest

from cprd.protocol import upgrade as u
from cprd.protocol.upgrade import Act, Ev, Fence, JournalTo, Msg, Role, Send, Session, St

S, P, G = Role.STANDIN, Role.NEW, Role.GUARDIAN
ROLES = (S, P, G)
MAX_FAULTS = 2
MUTATIONS = {S: 2, P: 1, G: 1}  # changes each process makes when it may answer

# a process: status, its session's (state, standin_handed, standin_gone), its view of the table,
# and per role: S: (readers of its journal, J sent); P: (phase: 0 forked, 1 guardian forked,
# 2 exec'd; J applied); G: ()
ALIVE, STOPPED, DEAD, ABSENT = "alive", "stopped", "dead", "absent"


@dataclass(frozen=True, slots=True)
class Proc:
    status: str
    st: St | None
    handed: bool = False
    gone: bool = False
    ggone: bool = False  # S: it saw the guardian's end close
    view: frozenset = frozenset()
    readers: frozenset = frozenset({P, G})  # S only
    sent: int = 0  # S: J messages sent to P
    phase: int = 0  # P only
    applied: int = 0  # P only
    made: int = 0  # changes made while answering


@dataclass(frozen=True, slots=True)
class World:
    procs: tuple[Proc, Proc, Proc]
    sp: tuple = ()  # S -> P: ("J", id) ("D", n) ("B",)
    ps: tuple = ()  # P -> S: "T" "K"
    sg: tuple = ()  # S -> G, the journal's copy: ids
    sw: tuple = ()  # S -> G, the word: "O" "K"
    pg: tuple = ()  # P -> G: "C"
    gp: tuple = ()  # G -> P: "c"
    seen: frozenset = frozenset()  # deaths already told: ("P", by), ("G", by)
    acked: frozenset = frozenset()
    next_id: int = 1
    faults: int = 0
    full: frozenset = frozenset()  # readers whose queue refuses the next message; ids of J that do not apply
    lost: bool = False

    def p(self, r: Role) -> Proc:
        return self.procs[ROLES.index(r)]

    def with_p(self, r: Role, pr: Proc) -> World:
        procs = list(self.procs)
        procs[ROLES.index(r)] = pr
        return replace(self, procs=tuple(procs))


class Violation(AssertionError):
    pass


def session(pr: Proc, r: Role) -> Session:
    return Session(r, pr.st, standin_handed=pr.handed, standin_gone=pr.gone, guardian_gone=pr.ggone)


def runs(w: World, r: Role) -> bool:
    pr = w.p(r)
    return pr.status == ALIVE and pr.st is not None


def exists(w: World, r: Role) -> bool:
    return w.p(r).status in (ALIVE, STOPPED)


def holds(w: World, r: Role) -> bool:
    """Whether r still holds the table's duty (it owns it, or may yet take it over)."""
    pr = w.p(r)
    if pr.status not in (ALIVE, STOPPED):
        return False
    if r is P and pr.st is None:
        return True  # the old program, before the exec
    return pr.st in {S: {St.SERVING, St.DONE_SENT, St.KEEPING, St.OWNER}, P: {St.WAIT_DONE, St.WAIT_RELEASE,
                                                                              St.WAIT_ACK, St.OWNER},
                     G: {St.WATCH, St.WAIT_WORD, St.RESTORED}}[r]


def guardian_link_open(w: World) -> bool:
    """Whether the guardian's end of its copy is still held (by the old program before the exec, or
    by the guardian until it leaves): S sees GUARDIAN_GONE once it is not."""
    pp, pg_ = w.p(P), w.p(G)
    old_holds = pp.status in (ALIVE, STOPPED) and pp.st is None and pp.phase < 2
    return old_holds or (pg_.status in (ALIVE, STOPPED) and pg_.st not in (St.LEFT,))


# -- carrying actions out -------------------------------------------------------------------------------
def kill(w: World, r: Role) -> World:
    pr = w.p(r)
    if pr.status in (DEAD, ABSENT):
        return w
    w = w.with_p(r, replace(pr, status=DEAD))
    # what it would have read dies with it; what it sent stays queued (the kernel holds it)
    inbox = {S: "ps", P: "gp", G: "pg"}[r]
    w = replace(w, **{inbox: ()})
    if r is P:
        w = replace(w, sp=())  # nobody reads the journal any more: S's sends to P fail from now on
    if r is G:
        w = replace(w, sg=(), sw=())
    return w


def act(w: World, r: Role, actions) -> World:
    for a in actions:
        pr = w.p(r)
        if isinstance(a, Send):
            w = send(w, r, a.to, a.msg)
        elif isinstance(a, Fence):
            w = kill(w, a.peer)
        elif isinstance(a, JournalTo):
            w = w.with_p(r, replace(pr, readers=a.readers))
        elif a is Act.DRAIN:
            w = drain(w)
        elif a is Act.LEAVE or a is Act.FAIL:
            w = kill(w, r)
        elif a is Act.RESTORE:
            w = w.with_p(G, replace(pr, view=pr.view | frozenset(w.sg)))
            w = replace(w, sg=())
        # FREEZE, STOP_ACCEPTING, FLUSH, FREEZE_ALL, THAW, OWN: what they mean is in `answers`
    return w


def send(w: World, frm: Role, to: Role, msg: Msg) -> World:
    if not (guardian_link_open(w) if to is G else exists(w, to)):
        return w  # nobody holds that end any more
    if frm is S and to is P:
        item = ("D", w.p(S).sent) if msg is Msg.DONE else ("B",)
        return replace(w, sp=w.sp + (item,))
    if frm is S and to is G:
        return replace(w, sw=w.sw + (msg.value.decode(),))
    if frm is P and to is S:
        return replace(w, ps=w.ps + (msg.value.decode(),))
    if frm is P and to is G:
        return replace(w, pg=w.pg + ("C",))
    if frm is G and to is P:
        return replace(w, gp=w.gp + ("c",))
    raise AssertionError((frm, to, msg))


def drain(w: World) -> World:
    pp = w.p(P)
    ids = frozenset(x[1] for x in w.sp if x[0] == "J")
    return replace(w.with_p(P, replace(pp, view=pp.view | ids, applied=pp.applied + len(ids))), sp=())


def event(w: World, r: Role, ev: Ev | None = None, msg: Msg | None = None, alive: bool = True) -> World:
    pr = w.p(r)
    s = session(pr, r)
    actions = s.on(ev) if ev is not None else s.on_msg(msg, alive)
    w = w.with_p(r, replace(pr, st=s.state, handed=s.standin_handed, gone=s.standin_gone, ggone=s.guardian_gone))
    return act(w, r, actions)


# -- the world's steps ----------------------------------------------------------------------------------
def steps(w: World):
    """(label, next world, is_fault) for every step that can happen now."""
    out = []
    sp_, pp, gp_ = w.p(S), w.p(P), w.p(G)
    # the old program: forks the guardian, then execs the new program
    if pp.status == ALIVE and pp.st is None:
        if pp.phase == 0:
            out.append(("fork-guardian", w.with_p(G, Proc(ALIVE, St.WATCH)).with_p(P, replace(pp, phase=1)), False))
        else:
            s, actions = Session.new_program()
            w2 = w.with_p(P, replace(pp, st=s.state, phase=2))
            out.append(("exec", act(w2, P, actions), False))
    # deliveries, each queue in order
    if runs(w, P) and w.sp:
        item, rest = w.sp[0], w.sp[1:]
        w2 = replace(w, sp=rest)
        if item[0] == "J" and item[1] in w.full:  # a message that does not apply (an fd that does not verify)
            out.append(("P<bad-J", event(w2, P, Ev.DONE_HOLE), False))
        elif item[0] == "J":
            out.append(("P<J", w2.with_p(P, replace(pp, view=pp.view | {item[1]}, applied=pp.applied + 1)), False))
        elif item[0] == "D":
            out.append(("P<D", event(w2, P, Ev.DONE if item[1] == pp.applied else Ev.DONE_HOLE), False))
        else:
            out.append(("P<B", event(w2, P, msg=Msg.RELEASED), False))
    if runs(w, P) and not w.sp and not exists(w, S) and ("S", P) not in w.seen:
        out.append(("P:S-gone", event(replace(w, seen=w.seen | {("S", P)}), P, Ev.STANDIN_GONE), False))
    if runs(w, P) and w.gp:
        out.append(("P<c", event(replace(w, gp=w.gp[1:]), P, msg=Msg.CONFIRMED), False))
    if runs(w, P) and not exists(w, G) and gp_.status != ABSENT and ("G", P) not in w.seen:
        out.append(("P:G-gone", event(replace(w, seen=w.seen | {("G", P)}), P, Ev.GUARDIAN_GONE), False))
    if runs(w, S) and w.ps:
        m = w.ps[0]
        w2 = replace(w, ps=w.ps[1:])
        msg = Msg.TAKE_OVER if m == "T" else Msg.TAKEN
        out.append((f"S<{m}", event(w2, S, msg=msg, alive=exists(w, P)), False))
    if runs(w, S) and not exists(w, P) and ("P", S) not in w.seen:
        out.append(("S:P-gone", event(replace(w, seen=w.seen | {("P", S)}), S, Ev.NEW_GONE), False))
    if runs(w, S) and not guardian_link_open(w) and ("G", S) not in w.seen:
        out.append(("S:G-gone", event(replace(w, seen=w.seen | {("G", S)}), S, Ev.GUARDIAN_GONE), False))
    if runs(w, G) and w.sw:
        m = w.sw[0]
        w2 = replace(w, sw=w.sw[1:])
        out.append((f"G<{m}", event(w2, G, msg=Msg.STANDIN_OWNS if m == "O" else Msg.TAKEN, alive=exists(w, S)),
                    False))
    if runs(w, G) and not w.sw and not exists(w, S) and ("S", G) not in w.seen:
        out.append(("G:S-gone", event(replace(w, seen=w.seen | {("S", G)}), G, Ev.STANDIN_GONE), False))
    if runs(w, G) and w.pg:
        out.append(("G<C", event(replace(w, pg=w.pg[1:]), G, msg=Msg.CONFIRM, alive=exists(w, P)), False))
    if runs(w, G) and not exists(w, P) and ("P", G) not in w.seen:
        out.append(("G:P-gone", event(replace(w, seen=w.seen | {("P", G)}), G, Ev.NEW_GONE), False))
    # deadlines: any time a process waits (time is abstract)
    for r in ROLES:
        if runs(w, r) and session(w.p(r), r).waits is not None:
            out.append((f"{r.name}:timeout", event(w, r, Ev.TIMEOUT), False))
    # clients' changes, answered by whoever may answer
    for r in ROLES:
        pr = w.p(r)
        if runs(w, r) and session(pr, r).answers and pr.made < MUTATIONS[r]:
            out.append((f"{r.name}:change", mutate(w, r), False))
    # SIGCONT
    for r in ROLES:
        if w.p(r).status == STOPPED:
            out.append((f"cont-{r.name}", w.with_p(r, replace(w.p(r), status=ALIVE)), False))
    # faults
    if w.faults < MAX_FAULTS:
        for r in ROLES:
            if exists(w, r):
                out.append((f"KILL-{r.name}", replace(kill(w, r), faults=w.faults + 1), True))
            if w.p(r).status == ALIVE:
                out.append((f"STOP-{r.name}", replace(w.with_p(r, replace(w.p(r), status=STOPPED)),
                                                      faults=w.faults + 1), True))
        for r in (P, G):
            if r not in w.full and sp_.status == ALIVE and r in sp_.readers:
                out.append((f"FULL-{r.name}", replace(w, full=w.full | {r}, faults=w.faults + 1), True))
        for item in w.sp:
            if item[0] == "J" and item[1] not in w.full:
                out.append((f"BAD-J{item[1]}", replace(w, full=w.full | {item[1]}, faults=w.faults + 1), True))
    return out


def mutate(w: World, r: Role) -> World:
    """A client's change: made in r's table, journaled to r's readers (S), then answered."""
    pr = w.p(r)
    i = w.next_id
    w = replace(w, next_id=i + 1)
    pr = replace(pr, view=pr.view | {i}, made=pr.made + 1)
    w = w.with_p(r, pr)
    if r is S and G in pr.readers and G not in w.full and not guardian_link_open(w):
        w = event(w, S, Ev.GUARDIAN_GONE)  # the send to the guardian fails: its end is closed (as the driver does)
        pr = w.p(S)
    if r is S and pr.readers:
        ok = all(q not in w.full and (guardian_link_open(w) if q is G else exists(w, P)) for q in pr.readers)
        if not ok:  # the kernel refused it (a full queue, or a reader that is gone): the journal broke
            w = event(w, S, Ev.BROKEN)
            pr = w.p(S)
        else:
            if P in pr.readers:
                w = replace(w, sp=w.sp + (("J", i),))
                pr = replace(pr, sent=pr.sent + 1)
            if G in pr.readers:
                w = replace(w, sg=w.sg + (i,))
            w = w.with_p(S, pr)
    if not session(w.p(r), r).answers:
        return w  # it may not answer any more (it cannot, here: BROKEN makes S the owner)
    if not w.p(r).view >= w.acked:
        raise Violation(f"{r.value} answered change {i} from a table that misses {sorted(w.acked - w.p(r).view)}")
    return replace(w, acked=w.acked | {i})


def check_state(w: World, label: str, before: World) -> World:
    answering = [r for r in ROLES if w.p(r).status in (ALIVE, STOPPED) and w.p(r).st is not None
                 and session(w.p(r), r).answers]
    if len(answering) > 1:
        raise Violation(f"two processes may answer: {[r.value for r in answering]}")
    had = any(holds(before, r) for r in ROLES)
    has = any(holds(w, r) for r in ROLES)
    if had and not has and not w.lost:
        if not label.startswith("KILL-"):
            raise Violation(f"the table was given up by step {label}: no process holds it")
        w = replace(w, lost=True)
    return w


def check_end(w: World) -> str:
    owners = [r for r in ROLES if w.p(r).status == ALIVE and session(w.p(r), r).answers]
    waiting = [r for r in ROLES if runs(w, r) and not session(w.p(r), r).done]
    if waiting:
        raise Violation(f"nothing can happen but {[r.value for r in waiting]} still wait: a wait without a deadline")
    if w.lost:
        if owners:
            raise Violation(f"the table was lost, yet {owners} answers")
        return "lost"
    if len(owners) != 1:
        raise Violation(f"the upgrade ended with {len(owners)} owners: {[r.value for r in owners]}")
    o = owners[0]
    if not w.p(o).view >= w.acked:
        raise Violation(f"the owner ({o.value}) misses answered changes {sorted(w.acked - w.p(o).view)}")
    return o.name


def explore():
    start = World((Proc(ALIVE, St.SERVING), Proc(ALIVE, None), Proc(ABSENT, None)))
    memo: dict[World, int] = {}
    ends: dict[str, int] = {}
    path: list[str] = []
    sys.setrecursionlimit(10000)

    def paths(w: World) -> int:
        hit = memo.get(w)
        if hit is not None:
            return hit
        nxt = steps(w)
        protocol = [x for x in nxt if not x[2]]
        n = 0
        if not protocol:  # an end: only faults (or nothing) may follow
            try:
                outcome = check_end(w)
            except Violation as e:
                raise Violation(f"{e}\n  after: {' '.join(path)}") from None
            ends[outcome] = ends.get(outcome, 0) + 1
            n += 1
        for label, w2, _ in nxt:
            path.append(label)
            try:
                w2 = check_state(w2, label, w)
            except Violation as e:
                raise Violation(f"{e}\n  after: {' '.join(path)}") from None
            n += paths(w2)
            path.pop()
        memo[w] = n
        return n

    total = paths(start)
    return total, len(memo), ends


def test_every_schedule_with_up_to_two_faults_ends_with_one_owner_holding_every_answered_change():
    total, states, ends = explore()
    print(f"\nupgrade rules: {total} schedules, {states} states; ends by owner: {ends}")
    assert ends.get("NEW") and ends.get("STANDIN") and ends.get("GUARDIAN") and ends.get("lost"), ends
    assert total > 1_000_000, "the exploration is as wide as the faults allow"


def test_every_rule_is_used_and_every_event_has_an_answer():
    """The table has no dead rows, and each (role, state) a process can be in answers every event
    it can see there (a missing row raises, which the exploration would have caught)."""
    seen: set[tuple] = set()
    orig = u.decide

    def spy(role, state, ev):
        seen.add((role, state, ev))
        return orig(role, state, ev)

    u.decide = spy
    try:
        explore()
    finally:
        u.decide = orig
    unused = sorted(f"{r.name}/{s.value}/{e.value}" for (r, s, e) in u.TRANSITIONS
                    if (r, s, e) not in seen and (r, s, e) not in u.DEFENSIVE)
    assert not unused, f"rules never used: {unused}"
    reached = sorted(f"{r.name}/{s.value}/{e.value}" for (r, s, e) in u.DEFENSIVE if (r, s, e) in seen)
    assert not reached, f"rules marked unreachable were reached: {reached}"


# -- the deadlines' order, with time -------------------------------------------------------------------
STOPS = {  # which process stops (SIGSTOP, for good), and as what arrives
    "nobody": (None, None), "standin-at-once": (S, "fork"), "standin-as-T-arrives": (S, "T"),
    "standin-as-K-arrives": (S, "K"), "guardian-at-once": (G, "fork"), "guardian-as-C-arrives": (G, "C"),
}


@pytest.mark.parametrize("stop", sorted(STOPS))
@pytest.mark.parametrize("start_after", [0.3, 10.0, 29.9])
def test_a_new_program_that_is_never_stopped_is_never_fenced(stop, start_after):
    """With the documented deadlines, a new program that starts (restored, asking for the rest)
    within start_s, and every wait for a fenced process taking all of fence_s: whoever else stops,
    and whenever, nobody fences the new program, and it owns the table in the end."""
    d = u.Deadlines()
    owner, t, log = timeline(d, start_after, *STOPS[stop])
    assert "fence new program" not in log, log
    assert owner is P, log
    # and it took over within one answer_s + fence_s per process that stopped, after it asked
    assert t <= start_after + 2 * (d.answer_s + d.fence_s) + 1e-9, log


def timeline(d: u.Deadlines, start_after: float, stopper: Role | None, when: str | None):
    """A timed run from the fork: messages take no time, a running process acts at once, a stopped
    one never again (it can only be fenced); a deadline passes at its time; a fence takes fence_s.
    Returns (who owns the table, when, what happened)."""
    sessions = {S: Session.standin(), G: Session.guardian()}
    running = {S: True, P: True, G: True}
    due: dict[Role, float | None] = {S: d.start_s, G: d.guard_s, P: None}
    log: list[str] = []
    now = [0.0]

    def stops(r: Role, what: str) -> bool:
        if stopper is r and when == what:
            running[r] = False
            log.append(f"{now[0]:.1f} {r.value} stops")
        return not running[r]

    def carry_out(r: Role, actions) -> None:
        for a in actions:
            if isinstance(a, Fence):
                log.append(f"{now[0]:.1f} {r.value}: fence {a.peer.value}")
                running[a.peer] = False
                sessions.pop(a.peer, None)
                end = now[0] + d.fence_s
                deadlines_until(end, r)  # the others' deadlines run on while r waits for the fenced one
                now[0] = max(now[0], end)
            elif isinstance(a, Send):
                deliver(a.to, a.msg, r)

    def deadlines_until(end: float, busy: Role | None) -> None:
        """Every deadline of a running process other than `busy` that passes by `end`, in order."""
        while True:
            pending = sorted((t, r.value, r) for r, t in due.items()
                             if t is not None and t <= end and running[r] and r in sessions and r is not busy)
            if not pending:
                return
            t, _, r = pending[0]
            now[0] = max(now[0], t)
            log.append(f"{now[0]:.1f} {r.value}: deadline")
            s = sessions[r]
            actions = s.on(Ev.TIMEOUT)
            due[r] = now[0] + getattr(d, s.waits) if s.waits else None
            carry_out(r, actions)

    def deliver(to: Role, msg: Msg, frm: Role) -> None:
        log.append(f"{now[0]:.1f} {frm.value} -> {to.value}: {msg.value.decode()}")
        s = sessions.get(to)
        if s is None or stops(to, msg.value.decode()) or msg is Msg.GUARDIAN_PIDFD:
            return
        actions = s.on(Ev.DONE) if msg is Msg.DONE else s.on_msg(msg, frm in sessions)
        due[to] = now[0] + getattr(d, s.waits) if s.waits else None
        carry_out(to, actions)

    stops(S, "fork")
    stops(G, "fork")
    now[0] = start_after
    sessions[P], actions = Session.new_program()
    due[P] = now[0] + d.answer_s
    carry_out(P, actions)
    while P in sessions and sessions[P].state is not St.OWNER:
        pending = sorted((t, r.value, r) for r, t in due.items() if t is not None and running[r] and r in sessions)
        if not pending:
            break
        now[0] = max(now[0], pending[0][0])
        r = pending[0][2]
        s = sessions[r]
        log.append(f"{now[0]:.1f} {r.value}: deadline")
        actions = s.on(Ev.TIMEOUT)
        due[r] = now[0] + getattr(d, s.waits) if s.waits else None
        carry_out(r, actions)
    owner = P if P in sessions and sessions[P].state is St.OWNER else None
    return owner, now[0], "\n".join(log)
