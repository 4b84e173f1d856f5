"""The handoff's rules, in process: a SourceSession talks to a TargetSession with no socket, no
thread and no trio. Frames go through the codec as bytes; fds "travel" as duplicates (what
SCM_RIGHTS does), and the target's driver part (moving fds into its table, verifying them) is the
real one from cprd.handoff, run synchronously. Deterministic: every step can be stopped at."""

from __future__ import annotations

import os

import pytest

from cprd import proc
from cprd.errors import CapacityError, Closed, HandoffError, ProtocolError, VerifyError
from cprd.handoff import apply_delta, take_batch
from cprd.kinds import classify
from cprd.fds import OwnedFds
from cprd.protocol import handoff as hp
from cprd.protocol.session import (FREEZE_OPS, MAX_ROUNDS, SourceSession, TargetSession, abort_error, abort_for,
                                   results_chunks)
from cprd.table import FdTable

CONTROL = "/run/cprd-test/control.sock"


def make_table(n: int) -> FdTable:
    t = FdTable()
    for i in range(n):
        fd = os.eventfd(i, os.EFD_CLOEXEC)
        t.save("ev", i, fd, classify(fd))
    return t


class Wire:
    """Source and target sessions joined by a list of frames: each send is encoded, each frame
    decoded by the peer; fds are duplicated on the way, as the kernel does."""

    def __init__(self, src: FdTable, batch: int = 7, window: int = 3, listener: bool = True) -> None:
        self.src_table = src
        self.listener = os.eventfd(0, os.EFD_CLOEXEC) if listener else None
        self.s = SourceSession(src, pid=os.getpid(), control_path=CONTROL, listener_fd=self.listener,
                               batch=batch, window=window)
        self.t: TargetSession | None = None
        self.delivered = 0  # messages the target has handled
        self.stop_at: int | None = None  # stop delivering after this many (a broken connection)
        self.log: list[str] = []
        self.committed_fds: list[int] = []

    def close(self) -> None:
        if self.t is not None:
            self.t.table.close_all()
        for fd in self.committed_fds:
            os.close(fd)
        self.src_table.stop_journal()
        self.src_table.close_all()
        if self.listener is not None:
            os.close(self.listener)

    def _to_target(self, send) -> list:
        """Deliver one source message; returns the target's replies (events)."""
        if self.stop_at is not None and self.delivered >= self.stop_at:
            raise Closed("test: the connection broke")
        data = self.s.m.send(send.event)
        fds = OwnedFds(os.dup(fd) for fd in send.fds)
        self.delivered += 1
        self.log.append(type(send.event).__name__)
        if self.t is None:  # the hello: the target side starts
            m = hp.Handoff("target")
            ev = m.receive(data, len(fds))
            fds.close()
            self.t = TargetSession(m, ev, os.getpid())
            return [self.t.start(pid=os.getpid(), fd_limit=1024, open_fds=10, capacity=1000, reserve=64).event]
        t = self.t
        ev = t.receive(data, len(fds))
        with fds:
            if isinstance(ev, hp.Batch):
                if ev.replace:
                    apply_delta(ev, fds, t.table)
                    return [t.delta_applied(ev).event]
                assert take_batch(ev, fds, t.table) is None  # verified as it went in
                return [t.batch_absorbed(ev).event]
            if isinstance(ev, hp.Delete):
                for key in t.on_delete(ev):
                    t.table.delete(*key)
            elif isinstance(ev, hp.Results):
                t.on_results(ev)
            elif isinstance(ev, hp.End):
                return [t.on_end(ev).event]
            elif isinstance(ev, hp.Commit):
                t.on_commit(ev)
                self.committed_fds += fds.take()
                return [t.confirm(os.getpid()).event]
        return []

    def _back(self, ev) -> None:
        """A target event goes back through the codec to the source's session."""
        self.pending.append(self.s.receive(self.t.m.send(ev), 0))

    def run(self, mutate=None, results=None) -> str:
        """The source driver's loop, synchronous; mutate(round) changes the source table at each
        round of pre-copy. Returns what the Confirm check said ('' = confirmed)."""
        s = self.s
        self.pending: list = []

        def send(x) -> None:
            for ev in self._to_target(x):
                self._back(ev)

        def recv():
            return self.pending.pop(0)

        send(s.hello())
        s.on_target_hello(recv())
        s.flow(s.batch, s.window)
        for m in s.manifests():
            send(m)
        if mutate:
            mutate(0)
        for b in s.snapshot():
            while not s.can_send():
                s.on_ack(recv())
            send(b)
        while not s.settled():
            s.on_ack(recv())
        rnd = 0
        while (deltas := s.precopy()) is not None:
            rnd += 1
            for d in deltas:
                if isinstance(d.event, hp.Batch):
                    while not s.can_send():
                        s.on_ack(recv())
                send(d)
            while not s.settled():
                s.on_ack(recv())
            if mutate:
                mutate(rnd)
        for r in s.before_freeze(results):
            send(r)
        for m in s.after_freeze(results):
            if isinstance(m.event, hp.Batch):
                while not s.can_send():
                    s.on_ack(recv())
            send(m)
        send(s.end())
        while (commit := s.on_ready(recv())) is None:
            pass
        send(commit)
        return s.on_confirm(recv())


def same_file(a: int, b: int) -> bool:
    """Whether fds a and b of this process are one open file description (kcmp: two eventfds have
    equal identities, so identities alone would not tell a wrong one apart)."""
    r = proc.kcmp_file(os.getpid(), a, os.getpid(), b)
    if r < 0:
        pytest.skip("kcmp is not permitted here; these checks need it to tell eventfds apart")
    return r == 0


def same_table(a: FdTable, b: FdTable) -> bool:
    """The same keys, each the same open file description."""
    fa, fb = {e.key: e.fd for e in a}, {e.key: e.fd for e in b}
    return fa.keys() == fb.keys() and all(same_file(fa[k], fb[k]) for k in fa)


def test_a_whole_handoff_with_precopy_rounds_leaves_the_target_with_the_source_table():
    src = make_table(40)
    w = Wire(src)
    changes = []

    def mutate(rnd: int) -> None:
        if rnd == 0:  # during the snapshot: many changes -> pre-copy rounds
            for i in range(10):
                fd = os.eventfd(100 + i, os.EFD_CLOEXEC)
                src.save("new", i, fd, classify(fd))
            for i in range(5):
                src.delete("ev", i)
            fd = os.eventfd(7, os.EFD_CLOEXEC)
            src.save("ev", 10, fd, classify(fd), replace=True)
            changes.append(rnd)
        elif rnd == 1:  # a small change: the next take freezes
            src.delete("new", 0)
            changes.append(rnd)

    answers = [("rid-1", {"ok": True, "result": {"x": 1}}), ("rid-2", {"ok": False, "error": "exists",
                                                                      "message": "m"})]
    try:
        assert w.run(mutate, results=lambda mark: (answers[mark:], len(answers))) == ""
        s, t = w.s, w.t
        assert s.rounds == 1 and s.delta_ops == 16 + 1 and changes == [0, 1]
        assert t.committed and t.ended and t.kept() is None
        assert same_table(t.table, src)
        assert t.results == answers
        assert len(w.committed_fds) == 1  # the listening socket
        assert w.log[:1] == ["SourceHello"] and w.log[-2:] == ["End", "Commit"]
        assert "Delete" in w.log and "Results" in w.log
    finally:
        w.close()


def test_churn_faster_than_the_copy_freezes_after_max_rounds():
    src = make_table(20)
    w = Wire(src)
    n = [0]

    def mutate(rnd: int) -> None:
        for _ in range(FREEZE_OPS + 1):  # always more than a freeze takes
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            src.save("churn", n[0], fd, classify(fd))
            n[0] += 1

    try:
        assert w.run(mutate) == ""
        assert w.s.rounds == MAX_ROUNDS
        assert same_table(w.t.table, src)
    finally:
        w.close()


def churn(src: FdTable):
    """The same changes at each run: puts, replaces and deletes during the snapshot (a pre-copy
    round), one delete more (the frozen last delta)."""
    def mutate(rnd: int) -> None:
        if rnd == 0:
            for i in range(8):
                fd = os.eventfd(100 + i, os.EFD_CLOEXEC)
                src.save("new", i, fd, classify(fd))
            for i in range(3):
                src.delete("ev", i)
        elif rnd == 1:
            src.delete("new", 0)
    return mutate


ANSWERS = [("rid-1", {"ok": True, "result": 1})]


def _messages() -> list[str]:
    """The messages a whole handoff of 30 entries under that churn takes, hello to Commit."""
    src = make_table(30)
    w = Wire(src)
    try:
        w.run(churn(src), lambda mark: (ANSWERS[mark:], len(ANSWERS)))
        return w.log
    finally:
        w.close()


MESSAGES = _messages()


@pytest.mark.parametrize("k", range(1, len(MESSAGES)), ids=[f"after-{i}-{m}" for i, m in enumerate(MESSAGES[:-1], 1)])
def test_the_source_dying_after_any_message_leaves_the_target_what_the_rules_say(k):
    """Stop after k messages (the source died), through manifests, batches, deltas, deletes,
    answers, End: before End the target keeps a salvage naming what was lost; after End, the whole
    table. While the source lives it keeps nothing."""
    assert {"Manifest", "Batch", "Delete", "Results", "End", "Commit"} <= set(MESSAGES)
    src = make_table(30)
    w = Wire(src)
    w.stop_at = k
    mutate = churn(src)
    ever: dict = {}  # key -> a copy of each fd the source ever held under it

    def remember() -> None:
        for e in src:
            held = ever.setdefault(e.key, [])
            if not any(same_file(e.fd, fd) for fd in held):
                held.append(os.dup(e.fd))

    def remembering(rnd: int) -> None:
        remember()
        mutate(rnd)
        remember()
    try:
        with pytest.raises(Closed):
            w.run(remembering, lambda mark: (ANSWERS[mark:], len(ANSWERS)))
        t = w.t
        err = Closed("test")
        if t.committed:
            assert t.gives_up(err)  # after Commit the target owns the table: nothing to decide
            return
        assert not t.gives_up(err)
        with pytest.raises(HandoffError, match="keeps every entry"):
            t.on_broken(err, "alive")
        t.on_broken(err, "dead")
        kept = t.kept()
        if t.ended:
            assert kept is None and same_table(t.table, src)
            return
        assert kept is not None and kept.announced == 30
        named = {k for m in t.m.manifests for k in m.keys()}
        assert set(kept.lost_keys) == named - set(t.table.bulk_dict()) - t.deleted
        assert kept.unnamed == 30 - len(named)
        assert kept.received + kept.lost == 30 and kept.kept == len(t.table)
        remember()
        assert all(any(same_file(e.fd, fd) for fd in ever.get(e.key, [])) for e in t.table), \
            "only what the source held, each under its own key"
    finally:
        w.close()
        for fds in ever.values():
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("code,cls", [(hp.AbortCode.GENERIC, HandoffError), (hp.AbortCode.CAPACITY, CapacityError),
                                      (hp.AbortCode.VERSION, HandoffError), (hp.AbortCode.VERIFY, VerifyError),
                                      (hp.AbortCode.PROTOCOL, ProtocolError), (hp.AbortCode.BUSY, HandoffError),
                                      (hp.AbortCode.CANCELLED, HandoffError)])
@pytest.mark.parametrize("after", [1, 3, 6])
def test_every_abort_code_either_way_is_the_error_it_stands_for(code, cls, after):
    """An Abort from the target after `after` messages reaches the source as its error class; the
    same Abort from the source reaches the target as that class; and what each side sends when it
    gives up with that error is the same code (abort_for)."""
    src = make_table(30)
    w = Wire(src)
    try:
        original = w._to_target

        def to_target(send):
            out = original(send)
            if w.delivered == after:
                return [hp.Abort(code, "test abort")]
            return out

        w._to_target = to_target
        with pytest.raises(cls, match="the target aborted the handoff: test abort") as exc:
            w.run()
        assert type(exc.value) is cls
        assert w.s.m.state is hp.State.ABORTED
        assert abort_error(hp.Abort(code, "x"), "source").__class__ is cls
        back = abort_for(cls("x"))
        assert back is None if cls is HandoffError else back.code == code
    finally:
        w.close()


def test_a_target_too_small_or_a_bad_control_path_is_refused_at_the_hello():
    src = make_table(5)
    w = Wire(src)
    try:
        m = hp.Handoff("target")
        hello = m.receive(w.s.m.send(w.s.hello().event), 0)
        t = TargetSession(m, hello, 1)
        with pytest.raises(CapacityError, match="can take 5 more fds"):
            t.start(pid=2, fd_limit=100, open_fds=31, capacity=5, reserve=64)
        assert abort_for(CapacityError("x")).code == hp.AbortCode.CAPACITY
        bad = TargetSession(m, hp.SourceHello(1, 5, 5, 253, "relative/path"), 1)
        with pytest.raises(ProtocolError, match="not an absolute UNIX socket path"):
            bad.start(pid=2, fd_limit=100, open_fds=3, capacity=90, reserve=64)
        # and the source refuses a target whose capacity is too small
        with pytest.raises(CapacityError, match="has room for 4 more fds"):
            w.s.on_target_hello(hp.TargetHello(1, 2, 100, 3, 4))
    finally:
        w.close()


def test_the_target_checks_deletes_and_the_end_against_what_arrived():
    src = make_table(3)
    w = Wire(src, listener=False)
    try:
        w.run()
        t = w.t
        with pytest.raises(ProtocolError, match="which it never sent"):
            t.on_delete(hp.Delete.of([("never", 1)]))
        with pytest.raises(ProtocolError, match="the source holds 4 entries, this target 3"):
            t.on_end(hp.End(4, 3, b""))
    finally:
        w.close()


def test_a_lost_confirm_means_what_the_target_became():
    src = make_table(3)
    w = Wire(src)
    try:
        w.run()
        w.s.confirm_lost("no answer", "serving")  # it owns the table
        w.s.confirm_lost("no answer", "alive")  # it may: only a proven death gives the table back
        with pytest.raises(HandoffError, match="died after the commit"):
            w.s.confirm_lost("no answer", "dead")
    finally:
        w.close()


def test_answers_are_split_to_fit_and_an_oversize_one_is_named():
    answers = [(f"r{i}", {"ok": True, "result": "x" * 1000}) for i in range(300)]
    chunks, dropped = results_chunks(answers + [("huge", {"ok": True, "result": "y" * hp.MAX_PAYLOAD})])
    assert dropped == ["huge"] and sum(len(c) for c in chunks) == 300 and len(chunks) >= 3
    for c in chunks:
        assert len(hp.encode(hp.Results(tuple(c)))) <= hp.MAX_PAYLOAD
