"""Source -> target handoffs between real processes, with real fds of every kind, each proved the
same open file description by kcmp; the target verifies with the C loops and with the Python ones."""

from __future__ import annotations

import os
import resource
import socket

import pytest

from cprd import scm
from cprd.errors import CapacityError, HandoffError
from cprd.protocol import handoff as hp
from helpers import MAKERS, prove_same, close_copies, hold_copies, num_fds, settled_fds, snapshot
from helpers import Copies, kcmp_file

pytestmark = pytest.mark.requires("kcmp")

# How the target verifies what arrives: the optional C module's loops, or the Python reference.
VERIFY = [pytest.param({}, id="c-verify", marks=pytest.mark.requires("speedups")),
          pytest.param({"CPRD_NO_SPEEDUPS": "1"}, id="python-verify")]

SPECS = {
    "files": "files=20",
    "eventfds": "eventfds=20",
    "memfds": "memfds=20",
    "pipes": "pipes=10",
    "sockets": "sockets=10",
    "devices": "devices=4",
}


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_each_kind_is_handed_off_as_the_same_open_file(cluster, kind, verify):
    src = cluster.source(SPECS[kind])
    tgt, listen = cluster.target(env=verify)
    with cluster.client() as c:
        before = snapshot(c)
        copies = hold_copies(c)
    try:
        with cluster.client() as c:
            res = c.handoff(listen)
        assert res["entries"] == len(before) and res["fds"] == len(before) + 1
        assert res["target_pid"] == tgt.pid and res["confirmed"]
        assert src.wait(30) == 0
        with cluster.client() as c:
            st = c.status()
            assert st["pid"] == tgt.pid and st["role"] == "target"
            assert snapshot(c) == before
        prove_same(cluster, copies)
    finally:
        close_copies(copies)
    assert not os.path.exists(listen), "the target removes its handoff socket once it owns the table"


@pytest.mark.parametrize("verify", VERIFY)
def test_7530_mixed_fds(cluster, verify):
    from cprd.populate import mixed_spec, spec_string

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # we hold a copy of each of the 7530
    spec = mixed_spec(7530)
    src = cluster.source(spec_string(spec))
    tgt, listen = cluster.target(env=verify)
    with cluster.client() as c:
        before = snapshot(c)
        st0 = c.status()
    assert len(before) == 7530
    copies = cluster.keep(Copies(cluster.control, src.pid))
    base = num_fds(tgt.pid)
    with cluster.client() as c:
        res = c.handoff(listen)
    assert res["entries"] == 7530 and res["fds"] == 7531
    assert src.wait(30) == 0
    with cluster.client() as c:
        st = c.status()
        assert snapshot(c) == before
    assert st["by_kind"] == st0["by_kind"] and st["entries"] == 7530
    assert copies.prove(cluster.control, tgt.pid) == 7530, "each the very open file description (kcmp)"
    # The target holds exactly the table, the received listener (its handoff socket is closed) and
    # the spare fd a serving daemon keeps to answer clients at its fd limit.
    assert settled_fds(tgt.pid, base + 7530 + 1) == base + 7530 + 1


def test_chain_of_three_handoffs(cluster):
    src = cluster.source("files=30,eventfds=30,memfds=10,pipes=10,sockets=10,devices=3")
    with cluster.client() as c:
        before = snapshot(c)
        copies = hold_copies(c)
    try:
        owner = src
        for _ in range(3):
            tgt, listen = cluster.target()
            with cluster.client() as c:
                res = c.handoff(listen)
            assert res["target_pid"] == tgt.pid
            assert owner.wait(30) == 0, "the old owner exits 0 once the target confirmed"
            with cluster.client() as c:
                assert c.status()["pid"] == tgt.pid
                assert snapshot(c) == before
            owner = tgt
        prove_same(cluster, copies)
    finally:
        close_copies(copies)


def _low_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (150, 150))


def test_target_with_too_small_fd_limit_refuses_and_source_keeps_everything(cluster):
    src = cluster.source("files=200,eventfds=100")
    base = num_fds(src.pid)
    tgt, listen = cluster.target(preexec_fn=_low_limit)
    with cluster.client() as c:
        before = snapshot(c)
        with pytest.raises(CapacityError) as exc:
            c.handoff(listen)
    msg = str(exc.value)
    assert "RLIMIT_NOFILE" in msg and "150" in msg and "300" in msg, msg
    assert tgt.wait(30) != 0
    assert src.poll() is None
    with cluster.client() as c:
        assert snapshot(c) == before
        assert c.status()["state"] == "serving"
    assert settled_fds(src.pid, base) == base
    tgt2, listen2 = cluster.target()
    with cluster.client() as c:
        assert c.handoff(listen2)["entries"] == 300


@pytest.mark.parametrize("fault", ["target:hello", "target:batch:0", "target:batch:1", "target:end",
                                   "target:ready", "target:commit", "target:batch:1:shutdown"])
def test_target_lost_mid_transfer_leaves_source_whole(cluster, fault):
    src = cluster.source("files=300,eventfds=200,sockets=20,devices=2")
    base = num_fds(src.pid)
    tgt, listen = cluster.target(env={"CPRD_FAULT": fault})
    with cluster.client() as c:
        before = snapshot(c)
        with pytest.raises(HandoffError):
            c.handoff(listen)
    assert tgt.wait(30) != 0, "a target that lost its handoff exits non-zero"
    with cluster.client() as c:
        assert snapshot(c) == before
        assert c.status()["state"] == "serving"
    assert settled_fds(src.pid, base) == base
    tgt2, listen2 = cluster.target()
    with cluster.client() as c:
        assert c.handoff(listen2)["entries"] == len(before)
    assert src.wait(30) == 0


@pytest.mark.parametrize("commit_queued", [False, True], ids=["before-commit", "commit-queued"])
def test_connection_shut_down_after_ready_leaves_exactly_one_owner(cluster, commit_queued):
    """The target shuts its socket down right after Ready. Whether the source's Commit was already
    queued decides who owns the table: the source if not (it cannot send it), the target if so (a
    live target reads what was queued). Never both, never neither. Each branch is forced with a
    pause (a test fault) on one side, so both are taken every run."""
    src_fault = None if commit_queued else {"CPRD_FAULT": "source:ready::sleep=0.5"}
    tgt_fault = "target:ready::sleep=0.5,target:ready::shutdown" if commit_queued else "target:ready::shutdown"
    src = cluster.source("files=100,eventfds=100", env=src_fault)
    copies = cluster.keep(Copies(cluster.control, src.pid))
    tgt, listen = cluster.target(env={"CPRD_FAULT": tgt_fault})
    with cluster.client() as c:
        before = snapshot(c)
        if commit_queued:
            res = c.handoff(listen)
            assert res["target_pid"] == tgt.pid and not res["confirmed"]
            owner, other, other_exit = tgt, src, 0  # the source learns the target serves, and exits 0
        else:
            with pytest.raises(HandoffError):
                c.handoff(listen)
            owner, other = src, tgt
    code = other.wait(30)
    assert code == other_exit if commit_queued else code not in (0, None)
    assert "event=fault_fired side=target step=ready n=None action=shutdown" in cluster.logs()
    with cluster.client() as c:
        assert c.status()["pid"] == owner.pid
        assert snapshot(c) == before
    assert copies.prove(cluster.control, owner.pid) == 200


def test_garbage_on_the_handoff_socket(cluster):
    src = cluster.source("eventfds=10")
    tgt, listen = cluster.target()
    base = num_fds(tgt.pid)
    garbage = [
        b"",  # connect and close
        b"hello there",
        b"CPRH" + bytes(8),
        b"CPRH\x01\x03\x00\x00\x06\x00\x00\x00" + bytes(6),  # a batch before any hello
        b"CPRH\x09\x01\x00\x00\x00\x00\x00\x00",
    ]
    for g in garbage:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(listen)
        if g:
            ev = os.eventfd(0)
            try:
                scm.send_sync(s, g, [ev])
            finally:
                os.close(ev)
            data, fds = scm.recv_sync(s, 65536, 1)
            fds.close()
            _, reply = hp.decode(data)
            assert isinstance(reply, hp.Abort) and reply.code == hp.AbortCode.PROTOCOL
        s.close()
    assert tgt.poll() is None, "garbage before a hello does not stop the target"
    assert settled_fds(tgt.pid, base) == base
    with cluster.client() as c:
        assert c.handoff(listen)["entries"] == 10
    assert src.wait(30) == 0


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("bad_batch", [0, 2, 3])
def test_target_refuses_an_fd_that_is_not_what_its_record_says(cluster, tmp_path, bad_batch, verify):
    """A source whose record describes another file than the fd it attaches: the target (which
    verifies on a helper thread while later batches arrive) aborts with VERIFY naming the entry,
    acknowledges no batch from the bad one on, closes all it received and exits non-zero; none of
    our fds changes."""
    from cprd.kinds import classify

    tgt, listen = cluster.target(env=verify)
    mine = num_fds(os.getpid())
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) for i in range(200)]
    try:
        records = [hp.Record("f", i, classify(fd)) for i, fd in enumerate(fds)]
        lie = bad_batch * 50 + 17
        records[lie] = hp.Record("f", lie, records[lie + 1].ident)  # the ino of the next file
        m = hp.Handoff("source")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(30)
        with s:
            s.connect(listen)
            scm.send_sync(s, m.send(hp.SourceHello(os.getpid(), 200, 200, 50, str(tmp_path / "c.sock"))))
            data, got = scm.recv_sync(s, hp.MAX_PAYLOAD, 1)
            assert isinstance(m.receive(data, len(got)), hp.TargetHello)
            for k in range(4):
                scm.send_sync(s, m.send(hp.Batch.of(k, records[k * 50:(k + 1) * 50])), fds[k * 50:(k + 1) * 50])
            acks = []
            while True:
                data, got = scm.recv_sync(s, hp.MAX_PAYLOAD, 1)
                got.close()
                ev = m.receive(data, 0)
                if not isinstance(ev, hp.Ack):
                    break
                acks.append(ev.seq)
        assert isinstance(ev, hp.Abort) and ev.code == hp.AbortCode.VERIFY, ev
        assert f"('f', {lie})" in ev.message and "does not match" in ev.message
        assert acks == list(range(bad_batch))
        assert tgt.wait(30) != 0
    finally:
        for fd in fds:
            os.close(fd)
    assert num_fds(os.getpid()) == mine


@pytest.mark.parametrize("batch,window", [(40, 16), (7, 1), (100, 5)])
def test_any_batch_size_and_window(cluster, batch, window):
    """The window is the source's (not on the wire): any window works with a target that reads ahead."""
    src = cluster.source("files=200,eventfds=400,devices=5")
    tgt, listen = cluster.target()
    with cluster.client() as c:
        before = snapshot(c)
        res = c.handoff(listen, batch=batch, window=window)
    assert res["confirmed"] and res["entries"] == len(before)
    assert src.wait(30) == 0
    with cluster.client() as c:
        assert c.status()["pid"] == tgt.pid and snapshot(c) == before


@pytest.mark.parametrize("verify", VERIFY)
def test_every_kind_a_client_can_put_is_handed_off_as_the_same_open_file(cluster, tmp_path, verify):
    """Beyond what --populate makes: directories, devices, timerfd, signalfd, pidfd, inotify, odd
    sockets and flags, each put by a client, handed off, and found by kcmp to be the very fd."""

    src = cluster.source()
    made: list[int] = []
    mine: dict[tuple[str, int], int] = {}
    try:
        with cluster.client() as c:
            for label, (kind, make) in sorted(MAKERS.items()):
                fds = make(str(tmp_path))
                made += fds
                info = c.put(label, 0, fds[0])
                assert info["kind"] == kind.label, label
                mine[(label, 0)] = fds[0]
        tgt, listen = cluster.target(env=verify)
        with cluster.client() as c:
            assert c.handoff(listen)["entries"] == len(MAKERS)
        assert src.wait(30) == 0
        with cluster.client() as c:
            served = {(e["name"], e["id"]): e for e in c.ls()}
        assert set(served) == set(mine)
        me = os.getpid()
        for key, fd in mine.items():
            assert kcmp_file(tgt.pid, served[key]["fd"], me, fd), f"{key} is not the fd that was put"
        assert {e["kind"] for e in served.values()} >= {"dir", "chardev", "blockdev", "timerfd", "signalfd",
                                                        "pidfd", "inotify"}
    finally:
        for fd in made:
            os.close(fd)
