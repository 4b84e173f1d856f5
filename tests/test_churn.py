"""Live handoff under fd churn: clients keep mutating during handoffs; nothing acknowledged is
lost, nothing applied twice, no request fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from cprd import scm
from cprd.client import AsyncClient, Client
from cprd.errors import HandoffError, KeyExists
from cprd.protocol import control as cp
from helpers import num_fds, settled_fds, snapshot


@pytest.mark.slow
def test_stress_model_check_across_a_chain_of_handoffs():
    r = subprocess.run([sys.executable, "-m", "cprd", "stress", "--fds", "400", "--rate", "400", "--handoffs", "3",
                        "--duration", "3", "--clients", "4", "--json"], capture_output=True, text=True, timeout=120)
    res = json.loads(r.stdout)
    assert r.returncode == 0, (res["failures"], res["violation_details"], r.stderr[-2000:])
    assert res["failed"] == 0 and res["violations"] == 0
    assert len(res["handoffs"]) == 3 and res["ops"] > 500
    assert all(h["freeze_ms"] > 0 for h in res["handoffs"])


async def _hammer(control: str, i: int, stop: trio.Event, acked: dict, failures: list) -> None:
    """Put new keys and delete some, remembering exactly what was acknowledged."""
    n = 0
    async with AsyncClient(control) as c:
        while not stop.is_set():
            key = (f"hammer/{i}", n)
            n += 1
            ev = os.eventfd(n, os.EFD_CLOEXEC)
            try:
                res = await c.put(*key, ev)
                acked[key] = (res["dev"], res["ino"])
                if n % 3 == 0:
                    gone = (f"hammer/{i}", n - 2)
                    await c.delete(*gone)
                    acked.pop(gone)
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                failures.append(repr(e))
            finally:
                os.close(ev)
            await trio.sleep(0)


@pytest.mark.slow
async def test_handoffs_while_clients_hammer(cluster):
    await trio.to_thread.run_sync(cluster.source, "files=300,eventfds=300")
    with cluster.client() as c:
        initial = snapshot(c)
    acked: dict = {}
    failures: list = []
    stop = trio.Event()
    targets = []
    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(_hammer, cluster.control, i, stop, acked, failures)
        for _ in range(3):
            await trio.sleep(0.3)
            tgt, listen = await trio.to_thread.run_sync(cluster.target)
            targets.append(tgt)
            async with AsyncClient(cluster.control, retry_for=0) as c:
                res = await c.handoff(listen)
            assert res["target_pid"] == tgt.pid
        await trio.sleep(0.3)
        stop.set()
    assert failures == []
    with cluster.client() as c:
        st = c.status()
        final = snapshot(c)
    assert st["pid"] == targets[-1].pid
    hammered = {k: (v["dev"], v["ino"]) for k, v in final.items() if k[0].startswith("hammer/")}
    assert hammered == acked, "every acknowledged put is there, once; every acknowledged delete is gone"
    assert {k: v for k, v in final.items() if not k[0].startswith("hammer/")} == initial
    for t in targets[:-1]:
        assert t.wait(10) == 0


async def test_target_killed_mid_precopy_leaves_every_mutation_at_the_source(cluster):
    src = await trio.to_thread.run_sync(cluster.source, "files=500,eventfds=500")
    acked: dict = {}
    failures: list = []
    stop = trio.Event()
    tgt, listen = await trio.to_thread.run_sync(lambda: cluster.target(env={"CPRD_FAULT": "target:batch:last"}))
    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(_hammer, cluster.control, i, stop, acked, failures)
        await trio.sleep(0.2)
        async with AsyncClient(cluster.control, retry_for=0) as c:
            try:
                await c.handoff(listen)
                raise AssertionError("the handoff should have failed")
            except HandoffError:
                pass
        await trio.sleep(0.2)
        stop.set()
    assert failures == []
    assert await trio.to_thread.run_sync(tgt.wait, 10) != 0
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid and c.status()["state"] == "serving"
        final = snapshot(c)
    assert {k: (v["dev"], v["ino"]) for k, v in final.items() if k[0].startswith("hammer/")} == acked
    assert len([k for k in final if not k[0].startswith("hammer/")]) == 1000


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
