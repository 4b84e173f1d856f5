"""Source -> target handoffs between real processes, with real fds of every kind."""

from __future__ import annotations

import os
import resource
import socket

import pytest

from cprd import scm
from cprd.errors import CapacityError, HandoffError
from cprd.kinds import Kind, check_populated, same_open_file
from cprd.protocol import handoff as hp
from helpers import close_copies, hold_copies, num_fds, settled_fds, snapshot

SPECS = {
    "files": "files=20",
    "eventfds": "eventfds=20",
    "memfds": "memfds=20",
    "pipes": "pipes=10",
    "sockets": "sockets=10",
    "devices": "devices=4",
}


def prove_same(cluster, copies) -> None:
    """Every entry the daemon now serves is the same open file description as our copy."""
    with cluster.client() as c:
        assert len(c.ls()) == len(copies)
        for (name, id_), (mine, kind) in copies.items():
            _, theirs = c.get(name, id_)
            try:
                ok, method = same_open_file(mine, theirs, Kind.from_label(kind))
                assert ok, f"({name!r}, {id_}) is not the same open file ({method})"
                assert check_populated(name, id_, theirs) is None
            finally:
                os.close(theirs)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_each_kind_is_handed_off_as_the_same_open_file(cluster, kind):
    src = cluster.source(SPECS[kind])
    tgt, listen = cluster.target()
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


def test_7530_mixed_fds(cluster):
    from cprd.kinds import mixed_spec, spec_string

    spec = mixed_spec(7530)
    src = cluster.source(spec_string(spec))
    tgt, listen = cluster.target()
    with cluster.client() as c:
        before = snapshot(c)
        st0 = c.status()
    assert len(before) == 7530
    base = num_fds(tgt.pid)
    with cluster.client() as c:
        res = c.handoff(listen)
    assert res["entries"] == 7530 and res["fds"] == 7531
    assert src.wait(30) == 0
    with cluster.client() as c:
        st = c.status()
        assert snapshot(c) == before
    assert st["by_kind"] == st0["by_kind"] and st["entries"] == 7530
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


def test_connection_shut_down_after_ready_leaves_exactly_one_owner(cluster):
    """The target shuts its socket down right after Ready. Depending on whether the source's Commit
    was already queued, either the source keeps the table or the target owns it: never both,
    never neither."""
    src = cluster.source("files=100,eventfds=100")
    tgt, listen = cluster.target(env={"CPRD_FAULT": "target:ready::shutdown"})
    with cluster.client() as c:
        before = snapshot(c)
        try:
            c.handoff(listen)
            owner, other = tgt, src
        except HandoffError:
            owner, other = src, tgt
    other.wait(30)
    with cluster.client() as c:
        assert c.status()["pid"] == owner.pid
        assert snapshot(c) == before


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


@pytest.mark.parametrize("bad_batch", [0, 2, 3])
def test_target_refuses_an_fd_that_is_not_what_its_record_says(cluster, tmp_path, bad_batch):
    """A source whose record describes another file than the fd it attaches: the target (which
    verifies on a helper thread while later batches arrive) aborts with VERIFY naming the entry,
    acknowledges no batch from the bad one on, closes all it received and exits non-zero; none of
    our fds changes."""
    from cprd.kinds import classify

    tgt, listen = cluster.target()
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
