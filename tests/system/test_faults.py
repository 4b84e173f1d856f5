"""The fault matrix: SIGKILL (or a shut-down connection) on either side at every step of a
handoff, with real processes. After each case exactly one process owns every surviving entry,
each the very open file description the source had (kcmp against copies taken out of the source
before the handoff), and no fd leaked. Each case checks that its fault fired."""

from __future__ import annotations

import os
import signal

import pytest

from cprd.client import Client
from cprd.errors import CprdError, HandoffError
from helpers import num_fds, settled_fds, snapshot
from helpers import Copies

pytestmark = pytest.mark.requires("kcmp")

SPEC = "files=400,eventfds=300,memfds=20,pipes=10,sockets=10,devices=4"  # 780 fds: batches 0..3
N = 780
BATCH = 253
STEPS = ["hello", "batch:first", "batch:middle", "batch:last", "end", "ready", "commit", "confirm"]


def _received_after(step: str) -> int:
    """How many entries a target holds when its source dies right after `step`."""
    if step == "hello":
        return 0
    if step.startswith("batch:"):
        k = {"first": 0, "middle": 1, "last": 3}[step.split(":")[1]]
        return min(N, (k + 1) * BATCH)
    return N


def _start(cluster, side, step, action=""):
    fault = f"{side}:{step}" + ("" if ":" in step else ":") + (f":{action}" if action else "")
    env = {"CPRD_FAULT": fault}
    src = cluster.source(SPEC, env=env if side == "source" else None)
    tgt, listen = cluster.target(env=env if side == "target" else None)
    with cluster.client() as c:
        before = snapshot(c)
    assert len(before) == N
    copies = cluster.keep(Copies(cluster.control, src.pid))
    return src, tgt, listen, before, copies, num_fds(src.pid), num_fds(tgt.pid)


def fired(cluster, side: str, step: str) -> None:
    """The fault under test did happen (a test whose fault never fired proves nothing)."""
    assert f"event=fault_fired side={side} step={step.split(':')[0]}" in cluster.logs(), cluster.logs()[-3000:]


def wait_serving(cluster, pid: int, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with cluster.client() as c:
                if c.status()["pid"] == pid:
                    return
        except CprdError:
            pass
        assert time.monotonic() < deadline, f"pid {pid} did not serve the control socket"
        time.sleep(0.01)


def served_mutations(cluster, timeout: float = 10) -> None:
    """The owner serves mutations, not only reads: a handoff that failed after its freeze must have
    let them through again (a frozen daemon would keep a put waiting until the client's deadline)."""
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with Client(cluster.control, timeout=timeout, retry_for=0) as c:
            c.put("after-the-fault", 0, ev)
            c.delete("after-the-fault", 0)
    finally:
        os.close(ev)


def _handoff(cluster, listen):
    with cluster.client() as c:
        try:
            return c.handoff(listen)
        except CprdError as e:  # HandoffError, or the connection closing when the source dies
            return e


@pytest.mark.parametrize("step", STEPS)
def test_target_killed(cluster, step):
    src, tgt, listen, before, copies, src_fds, _ = _start(cluster, "target", step)
    res = _handoff(cluster, listen)
    assert tgt.wait(30) == -signal.SIGKILL
    fired(cluster, "target", step)
    if step == "confirm":
        # The target confirmed: the handoff was complete and the target the only owner when it died,
        # like any daemon that crashes. The source had already let go (it exits 0).
        assert isinstance(res, dict) and res["confirmed"]
        assert src.wait(30) == 0
        return
    assert isinstance(res, HandoffError), res
    assert src.poll() is None
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid and c.status()["state"] == "serving"
        assert snapshot(c) == before
    assert copies.prove(cluster.control, src.pid) == N
    served_mutations(cluster)
    assert settled_fds(src.pid, src_fds) == src_fds
    tgt2, listen2 = cluster.target()
    with cluster.client() as c:
        assert c.handoff(listen2)["entries"] == N
    assert src.wait(30) == 0
    assert copies.prove(cluster.control, tgt2.pid) == N


@pytest.mark.parametrize("step", STEPS)
def test_source_killed(cluster, step):
    src, tgt, listen, before, copies, _, tgt_fds = _start(cluster, "source", step)
    res = _handoff(cluster, listen)
    assert src.wait(30) == -signal.SIGKILL
    fired(cluster, "source", step)
    assert not isinstance(res, dict) or step in ("confirm",)
    assert tgt.poll() is None, "the target survives its source"
    wait_serving(cluster, tgt.pid)  # a dead source's socket refuses until the target binds the path
    with cluster.client() as c:
        st = c.status()
        after = snapshot(c)
    assert st["pid"] == tgt.pid
    got = _received_after(step)
    assert st["entries"] == got == len(after)
    assert all(before[k] == v for k, v in after.items()), "every surviving entry keeps its identity"
    assert copies.prove(cluster.control, tgt.pid, keys=set(after)) == got, "and is the very same open file"
    if step in ("hello",) or step.startswith("batch:"):
        salvage = st["salvage"]
        assert salvage["announced"] == N and salvage["received"] == got and salvage["lost"] == N - got
        # The manifest went ahead of the batches: the target names exactly the keys lost.
        lost = {tuple(k) for k in salvage["lost_keys"]}
        if step == "hello":  # it died before it could name its keys: the target can only count them
            assert lost == set() and salvage["unnamed"] == N
        else:  # the manifest went ahead of the batches: the target names exactly the keys lost
            assert lost == set(before) - set(after) and salvage["unnamed"] == 0
    else:
        assert "salvage" not in st
    # the table, the control socket instead of the handoff socket, and the serving daemon's spare fd
    assert settled_fds(tgt.pid, tgt_fds + got + 1) == tgt_fds + got + 1


@pytest.mark.parametrize("side,step", [("target", "hello"), ("target", "batch:first"), ("target", "batch:last"),
                                       ("target", "end"), ("source", "hello"), ("source", "batch:middle"),
                                       ("source", "end"), ("source", "ready")])
def test_connection_broken_while_both_live(cluster, side, step):
    """A shut-down connection is not a death: the source keeps everything, the target closes all it
    received and exits non-zero; it never serves a partial table while its source lives."""
    src, tgt, listen, before, copies, src_fds, _ = _start(cluster, side, step, "shutdown")
    res = _handoff(cluster, listen)
    assert isinstance(res, HandoffError), res
    assert tgt.wait(30) not in (0, None) and tgt.returncode != -signal.SIGKILL
    fired(cluster, side, step)
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid
        assert snapshot(c) == before
    assert copies.prove(cluster.control, src.pid) == N
    served_mutations(cluster)
    assert settled_fds(src.pid, src_fds) == src_fds


@pytest.mark.parametrize("side,step", [("source", "commit"), ("target", "commit"), ("source", "confirm"),
                                       ("target", "confirm")])
def test_connection_broken_after_commit_leaves_the_target_owning(cluster, side, step):
    """Once the target has read Commit it owns the table, whichever side's connection breaks then:
    the source learns the target serves (it asks at the control socket) and exits 0."""
    src, tgt, listen, before, copies, _, tgt_fds = _start(cluster, side, step, "shutdown")
    res = _handoff(cluster, listen)
    assert isinstance(res, dict) and res["target_pid"] == tgt.pid, res
    # only a Confirm lost in the shutdown leaves the source unsure: it then proves the target serves
    assert res["confirmed"] == (step == "confirm")
    assert src.wait(30) == 0
    fired(cluster, side, step)
    with cluster.client() as c:
        assert c.status()["pid"] == tgt.pid
        assert snapshot(c) == before
    assert copies.prove(cluster.control, tgt.pid) == N
    assert settled_fds(tgt.pid, tgt_fds + N + 1) == tgt_fds + N + 1
