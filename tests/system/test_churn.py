"""Live handoff under fd churn: clients keep mutating during handoffs; nothing acknowledged is
lost, nothing applied twice, no request fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from cprd import scm
from cprd.client import AsyncClient, Client
from cprd.errors import CprdError, HandoffError, KeyExists, KeyMissing
from cprd.protocol import control as cp
from helpers import num_fds, settled_fds, snapshot
from helpers import Copies, kcmp_file

pytestmark = pytest.mark.requires("kcmp")


@pytest.mark.slow
def test_stress_model_check_across_a_chain_of_handoffs():
    r = subprocess.run([sys.executable, "-m", "cprd", "stress", "--fds", "400", "--rate", "400", "--handoffs", "3",
                        "--duration", "3", "--clients", "4", "--json"], capture_output=True, text=True, timeout=120)
    res = json.loads(r.stdout)
    assert r.returncode == 0, (res["failures"], res["violation_details"], r.stderr[-8000:])
    assert res["failed"] == 0 and res["violations"] == 0
    assert res["proof"] == "kcmp", "every entry checked by kcmp against the clients' own copies"
    assert len(res["handoffs"]) == 3 and res["ops"] > 500
    assert all(h["freeze_ms"] > 0 for h in res["handoffs"])


@pytest.mark.slow
def test_stress_model_check_across_handoffs_and_upgrades():
    r = subprocess.run([sys.executable, "-m", "cprd", "stress", "--fds", "400", "--rate", "400", "--handoffs", "2",
                        "--upgrades", "2", "--duration", "5", "--clients", "4", "--json"], capture_output=True,
                       text=True, timeout=180)
    res = json.loads(r.stdout)
    assert r.returncode == 0, (res["failures"], res["violation_details"], r.stderr[-8000:])
    assert res["failed"] == 0 and res["violations"] == 0
    assert res["proof"] == "kcmp", "every entry checked by kcmp against the clients' own copies"
    moves = res["moves"]
    assert [m["move"] for m in moves] == ["handoff", "upgrade", "handoff", "upgrade"]
    assert len(res["upgrades"]) == 2 and all(u["standin_journal"] > 0 for u in res["upgrades"]), res["upgrades"]
    # The moves are spread over the run: each waits for its slot (duration * k / 5) and for the one
    # before it to end. On a busy machine a move may take longer than the gap between two slots, and
    # the next one then starts late, never early: a bound on the gap between starts would fail then.
    for k, m in enumerate(moves, 1):
        assert m["t_s"] >= 5 * k / (len(moves) + 1) - 0.05, f"move {k} started before its slot: {moves}"
    for a, b in zip(moves, moves[1:]):
        assert b["t_s"] >= a["t_s"] + a["s"] - 0.01, f"two moves overlapped: {moves}"


def test_moves_are_spread_evenly():
    from cprd.tools.stress import plan_moves

    assert plan_moves(3, 2) == ["handoff", "upgrade", "handoff", "upgrade", "handoff"]
    assert plan_moves(0, 2) == ["upgrade", "upgrade"] and plan_moves(2, 0) == ["handoff", "handoff"]
    for h in range(6):
        for u in range(6):
            plan = plan_moves(h, u)
            assert plan.count("upgrade") == u and plan.count("handoff") == h


class Hammer:
    """Clients that put new keys (an eventfd whose counter is unique to the key) and delete some,
    remembering exactly what was acknowledged: our own copy of each fd that is in the table, so that
    kcmp can tell at the end whether the owner holds that very eventfd (all eventfds share an inode,
    so no fstat could). Each acknowledgement is timed, to show it happened during a handoff."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.acked: dict[tuple[str, int], int] = {}  # key -> our copy of the fd the daemon holds
        self.gone: dict[tuple[str, int], int] = {}  # key -> our copy of the fd an acknowledged delete dropped
        self.acked_at: list[float] = []
        self.failures: list[str] = []
        self.retries = 0
        self.stop = trio.Event()

    async def run(self, i: int) -> None:
        n = 0
        async with AsyncClient(self.control) as c:
            while not self.stop.is_set():
                key = (f"hammer/{i}", n)
                n += 1
                ev = os.eventfd(i * 1_000_000 + n, os.EFD_CLOEXEC)
                try:
                    await c.put(*key, ev)
                    self.acked[key], ev = ev, -1
                    self.acked_at.append(time.monotonic())
                    if n % 3 == 0:
                        gone = (f"hammer/{i}", n - 2)
                        await c.delete(*gone)
                        self.gone[gone] = self.acked.pop(gone)
                        self.acked_at.append(time.monotonic())
                except Exception as e:  # noqa: BLE001 - every failure is reported by the test
                    self.failures.append(repr(e))
                finally:
                    if ev >= 0:
                        os.close(ev)
                await trio.sleep(0)
            self.retries += c.retries

    def during(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.acked_at if t0 <= t <= t1)

    def prove(self, cluster, pid: int) -> None:
        """The owner serves exactly the acknowledged hammer keys, each the very fd we put (kcmp)."""
        with cluster.client() as c:
            served = {(e["name"], e["id"]): e["fd"] for e in c.ls() if e["name"].startswith("hammer/")}
        assert set(served) == set(self.acked), "every acknowledged put is there, once; every delete is gone"
        me = os.getpid()
        wrong = [k for k in sorted(served) if not kcmp_file(pid, served[k], me, self.acked[k])]
        assert not wrong, f"not the fd that was put: {wrong[:10]}"

    def close(self) -> None:
        for fd in [*self.acked.values(), *self.gone.values()]:
            os.close(fd)
        self.acked, self.gone = {}, {}


@pytest.mark.slow
async def test_handoffs_while_clients_hammer(cluster):
    src = await trio.to_thread.run_sync(cluster.source, "files=300,eventfds=300")
    with cluster.client() as c:
        initial = snapshot(c)
    originals = cluster.keep(Copies(cluster.control, src.pid))
    h = cluster.keep(Hammer(cluster.control))
    targets = []
    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(h.run, i)
        for _ in range(3):
            await trio.sleep(0.3)
            tgt, listen = await trio.to_thread.run_sync(cluster.target)
            targets.append(tgt)
            async with AsyncClient(cluster.control, retry_for=0) as c:
                res = await c.handoff(listen)
            assert res["target_pid"] == tgt.pid
        await trio.sleep(0.3)
        h.stop.set()
    assert h.failures == []
    with cluster.client() as c:
        st = c.status()
        final = snapshot(c)
    assert st["pid"] == targets[-1].pid
    assert {k: v for k, v in final.items() if not k[0].startswith("hammer/")} == initial
    assert originals.prove(cluster.control, st["pid"]) == 600
    h.prove(cluster, st["pid"])
    for t in targets[:-1]:
        assert t.wait(10) == 0


async def test_mutations_that_meet_the_freeze_are_retried_at_the_target_exactly_once(cluster):
    """The source holds its freeze for 0.3 s (a test fault), so mutations certainly arrive while it
    lasts: they wait, the source hangs up on them after the commit, and the clients retry them at the
    target, which applies each exactly once."""
    src = await trio.to_thread.run_sync(lambda: cluster.source("files=200,eventfds=200",
                                                               env={"CPRD_FAULT": "source:freeze::sleep=0.3"}))
    originals = cluster.keep(Copies(cluster.control, src.pid))
    h = cluster.keep(Hammer(cluster.control))
    tgt, listen = await trio.to_thread.run_sync(cluster.target)
    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(h.run, i)
        await trio.sleep(0.2)
        t0 = time.monotonic()
        async with AsyncClient(cluster.control, retry_for=0) as c:
            res = await c.handoff(listen)
        t1 = time.monotonic()
        await trio.sleep(0.2)
        h.stop.set()
    assert "event=fault_fired side=source step=freeze" in cluster.logs()
    assert res["freeze_ms"] >= 300 and res["delta_ops"] > 0
    assert h.failures == []
    assert h.during(t0, t1) > 0, "mutations were acknowledged while the handoff ran"
    assert h.retries > 0, "mutations that waited in the freeze were retried at the target"
    assert await trio.to_thread.run_sync(src.wait, 10) == 0
    assert originals.prove(cluster.control, tgt.pid) == 400
    h.prove(cluster, tgt.pid)


# The source pauses after its last snapshot batch (mutations meanwhile become pre-copy deltas:
# replaced entries, deletes, answers); then one side dies at the first such message.
PRECOPY = "source:batch:last:sleep=0.3"


async def _failed_handoff_under_churn(cluster, listen: str, error: type) -> Hammer:
    """Three clients hammer while a handoff to `listen` fails with `error` (a fault point); the
    Hammer, stopped, holds what was acknowledged."""
    h = cluster.keep(Hammer(cluster.control))
    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(h.run, i)
        await trio.sleep(0.1)
        async with AsyncClient(cluster.control, retry_for=0) as c:
            with pytest.raises(error):
                await c.handoff(listen)
        await trio.sleep(0.2)
        h.stop.set()
    return h


@pytest.mark.parametrize("step", ["delta", "delete", "results"])
async def test_target_killed_mid_precopy_leaves_every_mutation_at_the_source(cluster, step):
    src = await trio.to_thread.run_sync(lambda: cluster.source("files=500,eventfds=500",
                                                               env={"CPRD_FAULT": PRECOPY}))
    originals = cluster.keep(Copies(cluster.control, src.pid))
    base = await trio.to_thread.run_sync(num_fds, src.pid)
    tgt, listen = await trio.to_thread.run_sync(lambda: cluster.target(env={"CPRD_FAULT": f"target:{step}:first"}))
    h = await _failed_handoff_under_churn(cluster, listen, HandoffError)
    assert await trio.to_thread.run_sync(tgt.wait, 10) == -signal.SIGKILL
    logs = cluster.logs()
    assert "event=fault_fired side=source step=batch" in logs and f"side=target step={step}" in logs
    assert h.failures == []
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid and c.status()["state"] == "serving"
    assert originals.prove(cluster.control, src.pid) == 1000
    h.prove(cluster, src.pid)
    # Every acknowledged delete took its fd away (the fds that mutations during the handoff dropped
    # are closed once it failed), and nothing of the handoff stays open: counted in /proc.
    want = base + len(h.acked)
    assert await trio.to_thread.run_sync(settled_fds, src.pid, want) == want


@pytest.mark.parametrize("step", ["delta", "delete", "results"])
async def test_source_killed_mid_precopy_leaves_the_target_only_genuine_fds(cluster, step):
    """The source dies while it sends pre-copy deltas: the target salvages what arrived, the whole
    snapshot and the deltas that came before the death, each entry the very fd the source had or a
    client put, and names nothing lost (the snapshot was whole)."""
    src = await trio.to_thread.run_sync(lambda: cluster.source(
        "files=500,eventfds=500", env={"CPRD_FAULT": f"{PRECOPY},source:{step}:first"}))
    originals = cluster.keep(Copies(cluster.control, src.pid))
    tgt, listen = await trio.to_thread.run_sync(cluster.target)
    h = await _failed_handoff_under_churn(cluster, listen, CprdError)
    assert await trio.to_thread.run_sync(src.wait, 10) == -signal.SIGKILL
    assert f"event=fault_fired side=source step={step}" in cluster.logs()
    # A mutation the source applied but answered only in a Results message that died with it is not
    # protected (docs/protocol.md 5.6): its retry at the target may find its own effect.
    assert all("KeyExists" in f or "KeyMissing" in f for f in h.failures), h.failures
    with cluster.client() as c:
        st = c.status()
        served = {(e["name"], e["id"]): e["fd"] for e in c.ls()}
    salvage = st["salvage"]
    assert st["pid"] == tgt.pid and salvage["lost"] == 0 and salvage["received"] == salvage["announced"] > 1000
    assert originals.prove(cluster.control, tgt.pid) == 1000
    # A hammer key is served because its put reached the target, or because its delete did not (a
    # delete the source acknowledged after its last delta dies with it); either way the very fd put.
    me = os.getpid()
    hammered = {k for k in served if k[0].startswith("hammer/")}
    for key in hammered:
        mine = h.acked.get(key, h.gone.get(key))
        if mine is None:  # its put was refused on its retry (above): we no longer hold that fd
            continue
        assert kcmp_file(tgt.pid, served[key], me, mine), key
    assert len(hammered - set(h.acked) - set(h.gone)) <= sum("KeyExists" in f for f in h.failures)


def _raw_put(path: str, rid: str, fd: int) -> dict:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with s:
        s.connect(path)
        scm.send_sync(s, cp.encode_request("put", name="once", id=1, rid=rid), [fd])
        data, fds = scm.recv_sync(s, cp.MAX_FRAME, 1)
        fds.close()
        return cp.ReplyReader().feed(data)


def test_a_retried_mutation_applies_once_even_across_a_handoff(cluster):
    src = cluster.source()
    a, b = os.eventfd(1, os.EFD_CLOEXEC), os.eventfd(2, os.EFD_CLOEXEC)
    try:
        first = _raw_put(cluster.control, "client-x-1", a)
        assert first["ok"]
        base = num_fds(src.pid)
        again = _raw_put(cluster.control, "client-x-1", b)  # the same request, retried (another copy of an fd)
        assert again == first, "a retry gets the first answer"
        assert settled_fds(src.pid, base) == base, "and the fd that came with the retry is closed"
        other = _raw_put(cluster.control, "client-x-2", b)  # a new request for the same key: refused
        assert not other["ok"] and other["error"] == KeyExists.code
        tgt, listen = cluster.target()
        with cluster.client() as c:
            c.handoff(listen)
        assert _raw_put(cluster.control, "client-x-1", b) == first, "the target knows the source's answers"
        with Client(cluster.control) as c:
            info, fd = c.get("once", 1)
            os.close(fd)
            assert info["ino"] == first["result"]["ino"]
    finally:
        os.close(a)
        os.close(b)


@pytest.mark.slow
def test_stress_against_a_running_daemon_touches_only_its_own_keys(cluster):
    import signal

    import psutil

    cluster.source("files=50,eventfds=50")
    with cluster.client() as c:
        before = snapshot(c)
    r = subprocess.run([sys.executable, "-m", "cprd", "stress", "--control", cluster.control, "--rate", "300",
                        "--handoffs", "1", "--duration", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip(), r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert r.returncode == 0, (res["failures"], res["violation_details"])
    with cluster.client() as c:
        st = c.status()
        assert snapshot(c) == before, "the daemon's own entries are untouched and stress/... keys are gone"
    assert st["pid"] == res["handoffs"][0]["target_pid"], "the target stress started serves the table now"
    os.kill(st["pid"], signal.SIGTERM)
    psutil.Process(st["pid"]).wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("upgrades", [0, 1], ids=["no-moves", "across-an-upgrade"])
def test_stress_notices_a_table_that_differs_from_its_model(cluster, upgrades):
    """cprd stress's own checker is not trusted blindly: someone replaces its eventfds behind its back,
    each by another eventfd (one inode for all: no identity tells them apart, only kcmp), early in the
    run, before the upgrade that then carries them to the new program; stress must report violations
    found by kcmp and exit non-zero."""
    duration = 6.0
    cluster.source("eventfds=10")
    t_start = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "cprd", "stress", "--control", cluster.control, "--rate", "300",
                          "--handoffs", "0", "--upgrades", str(upgrades), "--duration", str(duration), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # until stress has eventfds of its own in the table
            with cluster.client() as c:
                theirs = [e for e in c.ls() if e["name"].startswith("stress/") and e["kind"] == "eventfd"]
            if len(theirs) >= 20:
                break
            assert p.poll() is None and time.monotonic() < deadline, "stress put no eventfds"
            time.sleep(0.02)
        sabotaged = 0
        with cluster.client() as c:
            for e in theirs:
                ev = os.eventfd(0, os.EFD_CLOEXEC)
                try:
                    info = c.put(e["name"], e["id"], ev, replace=True)  # another eventfd under its key
                except KeyMissing:  # stress deleted it meanwhile
                    continue
                finally:
                    os.close(ev)
                assert all(info[k] == e[k] for k in ("kind", "mode", "dev", "ino", "flags")), "an identical identity"
                sabotaged += 1
            st = c.status()
        # stress's last check reads the table once its duration is over: ours came before it
        assert time.monotonic() - t_start < duration, "the sabotage came too late to prove anything"
        assert st["upgrades"] == 0, "the upgrade comes after the sabotage, and carries it"
    finally:
        out, err = p.communicate(timeout=120)
    assert sabotaged >= 10, "stress had keys to sabotage"
    res = json.loads(out)
    assert len(res["upgrades"]) == upgrades, res
    assert p.returncode != 0 and res["violations"] > 0, (res, err[-2000:])
    assert res["proof"] == "kcmp", res
    assert any("differs from the model" in v and "kcmp" in v for v in res["violation_details"]), \
        res["violation_details"]
