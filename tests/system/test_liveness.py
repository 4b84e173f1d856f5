"""Nothing hangs cprd: a process of an upgrade that stops answering (SIGSTOP, a cgroup freezer) is
fenced and the others go on; a burst of reloads is queued, never fatal; an fd whose close blocks
never holds up the clients. Real daemons, real signals and freezers, real lingering TCP sockets,
another uid where the fd comes from someone not trusted; every acknowledged entry proved by kcmp.
(The rules themselves are checked exhaustively in tests/unit/test_upgrade_rules.py.)"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from cprd.client import Client
from helpers import UPGRADE_SPEC as SPEC
from helpers import Churn, Freezer, assert_sole_holder, child_named, close_copies, hold_copies, num_fds
from helpers import prove_same, settled_fds

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike a root-only interpreter


def _upgrade_in_background(cluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cprd", "ctl", "upgrade", "--json", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CPRD_CONTROL": cluster.control})


def _finish(up: subprocess.Popen, timeout: float = 120) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    out, err = up.communicate(timeout=timeout)
    assert out.strip(), err
    return up.returncode, json.loads(out), time.monotonic() - t0


def _one_owner(cluster, pid: int, copies: dict, churn: Churn) -> None:
    """pid serves every acknowledged entry, each the very open file description (kcmp), and no other
    process holds the table."""
    assert not churn.failed, churn.failed
    with cluster.client() as c:
        st = c.status()
        assert st["pid"] == pid and st["state"] == "serving"
        assert st["entries"] == len(copies) + len(churn.mine)
    prove_same(cluster, {**copies, **churn.mine})
    assert_sole_holder(cluster.control, pid)  # every entry, by kcmp: nobody else holds any of it


# -- a process of the upgrade that stops answering -----------------------------------------------------
@pytest.mark.requires("kcmp")
@pytest.mark.parametrize("how", ["sigstop", pytest.param("frozen", marks=pytest.mark.requires("root",
                                                                                                "cgroup-freezer"))])
def test_a_stand_in_that_stops_answering_is_fenced_and_the_new_program_takes_over(cluster, how):
    """Reported: SIGSTOP of the stand-in during `ctl upgrade` left every client unserved for 30 s, then
    the guardian killed the healthy new program; frozen, nobody was served for 120 s. Now the new
    program waits answer_s (1 s) for the stand-in, fences it, and takes over from its journal; the
    guardian never touches it."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        copies = hold_copies(c)
    frozen = None
    try:
        with Churn(cluster.control) as churn:
            up = _upgrade_in_background(cluster, "--timeout", "60")
            standin = child_named(src.pid, "cprd-standin")
            if how == "sigstop":
                standin.send_signal(signal.SIGSTOP)
            else:
                frozen = Freezer(standin.pid)
            code, res, took = _finish(up)
            if frozen is not None:  # a frozen process dies of its SIGKILL when it is thawed, before it runs again
                frozen.thaw()
        assert code == 0 and not res["rolled_back"] and res["pid"] == src.pid, res
        assert res["fenced"] == ["stand-in"] and res["standin_pid"] == standin.pid, res
        assert took < 30, f"the upgrade waited {took:.1f} s: as long as the timeout, not for an answer"
        assert src.poll() is None, "the guardian did not kill the new program"
        deadline = time.monotonic() + 10
        while psutil.pid_exists(standin.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not psutil.pid_exists(standin.pid), "the stand-in was fenced and reaped"
        _one_owner(cluster, src.pid, copies, churn)
    finally:
        if frozen is not None:
            frozen.thaw()
        close_copies(copies)
        close_copies(locals().get("churn").mine if "churn" in locals() else {})


# The new program's start deadline (--timeout): each new program must reach its fault point before
# it, however busy the machine (a new program starts in ~0.3 s alone, several seconds beside CPU
# hogs); only the case that stops before asking waits it out.
START_S = 12
STOPS = {
    # fault: (who serves afterwards, what the answer says)
    "standin:takeover::stop": ("daemon", "stand-in"),  # it stops when asked: fenced after answer_s
    "upgrade:asked::stop": ("standin", "did not answer within 1 s"),  # the new program stops after T
    "upgrade:restored::stop": ("standin", f"did not ask to take over within {START_S} s"),  # before T
}


@pytest.mark.requires("kcmp")
@pytest.mark.parametrize("fault", sorted(STOPS))
def test_a_process_that_stops_at_each_step_of_the_upgrade_is_fenced(cluster, tmp_path, fault):
    """A stand-in or a new program that stops (alive, answering nothing) at a step of the take-over
    is fenced by the other once its deadline passes; one owner holds every acknowledged entry."""
    owner, says = STOPS[fault]
    env = {"CPRD_FAULT": fault} if fault.startswith("standin") else None
    src = cluster.source(SPEC, env=env)
    with cluster.client() as c:
        copies = hold_copies(c)
    args = ["--timeout", str(START_S)]
    if fault.startswith("upgrade"):
        prog = tmp_path / "stopping-cprd"
        prog.write_text(f'#!/bin/sh\nCPRD_FAULT={fault} exec {sys.executable} -m cprd "$@"\n')
        prog.chmod(0o755)
        args += ["--program", str(prog)]
    serving = None
    try:
        with Churn(cluster.control) as churn:
            up = _upgrade_in_background(cluster, *args)
            code, res, _ = _finish(up)
        side, step = fault.split(":")[:2]
        assert f"event=fault_fired side={side} step={step} n=None action=stop" in cluster.logs()
        serving = res["pid"]
        if owner == "daemon":
            assert code == 0 and not res["rolled_back"] and serving == src.pid and res["fenced"] == [says], res
        else:
            assert code == 1 and res["rolled_back"] and says in res["reason"], res
            assert psutil.Process(serving).name() == "cprd-standin"
            assert src.wait(10) == -signal.SIGKILL, "the stopped new program was fenced (SIGKILL works on it)"
        _one_owner(cluster, serving, copies, churn)
    finally:
        close_copies(copies)
        close_copies(locals().get("churn").mine if "churn" in locals() else {})
        if serving and serving != src.pid:
            os.kill(serving, signal.SIGTERM)
            psutil.Process(serving).wait(10)


@pytest.mark.requires("kcmp")
def test_a_stopped_guardian_is_fenced_and_reaped_once_the_new_program_takes_over(cluster):
    """Reported: a SIGSTOPped guardian kept a copy of every fd of the table until it was continued,
    then stayed a zombie. The new program waits answer_s for its acknowledgement, fences it, and
    reaps it before it answers the upgrade."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        copies = hold_copies(c)
    try:
        with Churn(cluster.control) as churn:
            up = _upgrade_in_background(cluster)
            guardian = child_named(src.pid, "cprd-guardian")
            guardian.send_signal(signal.SIGSTOP)
            code, res, _ = _finish(up)
        assert code == 0 and not res["rolled_back"] and res["pid"] == src.pid, res
        assert not psutil.pid_exists(guardian.pid), "fenced and reaped before the answer: not even a zombie is left"
        assert "guardian" in res.get("fenced", []) or f"event=fenced pid={guardian.pid}" in cluster.logs(), res
        _one_owner(cluster, src.pid, copies, churn)
    finally:
        close_copies(copies)
        close_copies(locals().get("churn").mine if "churn" in locals() else {})


@pytest.mark.requires("kcmp")
def test_a_guardian_that_dies_mid_upgrade_does_not_stop_the_upgrade(cluster, tmp_path):
    """Found by review: the stand-in journaled to a guardian that had died, the send failed, and the
    upgrade rolled back. A guardian whose end is closed can never restore: the journal goes to the new
    program alone, and the upgrade completes with every change acknowledged meanwhile."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        copies = hold_copies(c)
    slow = tmp_path / "slow-cprd"  # the new program takes 2 s to restore: time to kill the guardian and change things
    slow.write_text(f'#!/bin/sh\nCPRD_FAULT=upgrade:restored::sleep=2 exec {sys.executable} -m cprd "$@"\n')
    slow.chmod(0o755)
    try:
        with Churn(cluster.control) as churn:
            up = _upgrade_in_background(cluster, "--program", str(slow))
            guardian = child_named(src.pid, "cprd-guardian")
            time.sleep(0.3)
            guardian.kill()
            time.sleep(0.5)  # changes go on meanwhile (Churn puts every 2 ms)
            code, res, _ = _finish(up)
        assert code == 0 and not res["rolled_back"] and res["pid"] == src.pid, res
        assert "event=fault_fired side=upgrade step=restored" in cluster.logs()
        assert res["standin_journal"] > 0, "changes were journaled to the new program after the guardian died"
        _one_owner(cluster, src.pid, copies, churn)
    finally:
        close_copies(copies)
        close_copies(locals().get("churn").mine if "churn" in locals() else {})


# -- reloads in a burst -----------------------------------------------------------------------------
def _live_children(pid: int) -> list[int]:
    out = []
    for p in psutil.Process(pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:  # it ended while we looked
            pass
    return out


@pytest.mark.requires("kcmp")
@pytest.mark.parametrize("n,within", [(2, 0.25), (10, 0.2)])
def test_reloads_in_a_burst_leave_the_daemon_serving_in_its_own_pid(cluster, n, within):
    """Reported: a second SIGHUP within 0.25 s reached the new program between its exec and its
    handler, and SIGHUP's default action killed the daemon's pid. The signals stay blocked from before
    the fork until the new program's handlers are in place: the ones that arrive meanwhile wait, and
    make (at most) one more upgrade."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        copies = hold_copies(c)
    try:
        for _ in range(n):
            os.kill(src.pid, signal.SIGHUP)
            time.sleep(within / n)
        deadline = time.monotonic() + 60
        while True:  # settled: serving, upgraded, no stand-in or guardian left
            assert src.poll() is None, f"the daemon's pid died ({src.returncode}):\n{cluster.logs()[-3000:]}"
            with cluster.client() as c:
                st = c.status()
            kids = _live_children(src.pid)
            if st["upgrades"] >= 1 and st["state"] == "serving" and not kids:
                time.sleep(0.5)
                with cluster.client() as c:
                    if c.status()["upgrades"] == st["upgrades"]:
                        break
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        # each upgrade takes the reloads that arrived before its own signals were blocked: a few at most
        assert st["pid"] == src.pid and 1 <= st["upgrades"] <= n, st
        assert "rolled_back=True" not in cluster.logs()
        prove_same(cluster, copies)
    finally:
        close_copies(copies)


# -- an fd whose close blocks --------------------------------------------------------------------------
LINGERING = textwrap.dedent("""
    # An fd whose last close blocks for an hour: a loopback TCP socket with unsent data, a peer that
    # never reads, and SO_LINGER {1, 3600} (as cprd.tools.lingering makes one; this runs as another
    # user with the system's python, which has no cprd). Handed to the daemon (argv[1]), our copy closed.
    import array, socket, struct, sys, time
    how, path = sys.argv[1], sys.argv[2]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()  # held, never read, until we are killed
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
    c.setblocking(False)
    try:
        while True:
            c.send(b"x" * 65536)
    except BlockingIOError:
        pass
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [c.fileno()]).tobytes())]
    if how == "datagram":  # without FDSTORE=1: the daemon must drop it
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.connect(path)
        s.sendmsg([b"READY=1"], fds)
    elif how == "frame":  # a request sent before the daemon accepted (and refuses) the connection
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        s.sendmsg([b"CPRC" + bytes(60)], fds)
    c.close()  # the copy queued for the daemon is the last one now
    print("sent", flush=True)
    time.sleep(3600)
""")
OTHER = 65533  # a uid the daemon does not allow (it allows nobody, 65534)


@pytest.mark.requires("root")
@pytest.mark.parametrize("how", ["put-then-del", "datagram", "frame"])
def test_an_fd_whose_close_blocks_never_holds_up_the_other_clients(cluster, how):
    """Reported: a local user handed the daemon a lingering TCP socket in a way that made the daemon
    close the last reference (put then del; a datagram without FDSTORE=1 on an app's notify socket,
    even from a uid that is not allowed; a frame on the control socket before it is accepted), and
    close() blocked the serving thread: root's `ctl status` waited 25 s. The close now runs on a
    closer thread; every other client is answered meanwhile, and the fd is closed in the end."""
    d = tempfile.mkdtemp(prefix="cprd-linger-", dir="/tmp")  # others may pass through (0711)
    os.chmod(d, 0o711)
    control = os.path.join(d, "control.sock")
    attacker = None
    try:
        src = cluster.spawn("source", "--control", control, "--populate", "eventfds=3", "--allow-uid", "nobody")
        from cprd.tools.procs import wait_for_socket

        wait_for_socket(control, src)
        with Client(control) as c:
            notify = c.fdstore("web", "socket")["socket"]
            entries = c.status()["entries"]  # 3 eventfds, the store's socket and its names, nobody's lane
        # Both sockets are root's, mode 0600, so that 65533 cannot even connect: made reachable here, as a
        # careless operator might, the daemon's own refusal is what closes the fd.
        for path in (control, notify):
            os.chmod(path, 0o666)
        os.chmod(os.path.dirname(notify), 0o711)
        base = num_fds(src.pid)
        if how == "put-then-del":
            attacker = subprocess.Popen([sys.executable, "-c", PUT_THEN_DEL, control], stdout=subprocess.PIPE,
                                        text=True)
        else:
            # The daemon waits (stopped) while the attacker queues its fd and closes its own copy, so
            # that the daemon's is the last one, whoever is quicker.
            src.send_signal(signal.SIGSTOP)
            attacker = subprocess.Popen(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups",
                                         SYSTEM_PYTHON, "-c", LINGERING, how, notify if how == "datagram" else control],
                                        stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([attacker.stdout], [], [], 30)
        src.send_signal(signal.SIGCONT)
        assert ready and attacker.stdout.readline().strip() == "sent", "the attacker handed its fd over"
        deadline = time.monotonic() + 10
        waits, seen = [], []
        while time.monotonic() < deadline and seen[-5:] != [1] * 5:  # the daemon has the fd and is closing it
            time.sleep(0.05)  # (a client connection that just ended may be closing too, for a moment)
            t = time.monotonic()
            with Client(control, timeout=5, retry_for=5) as c:  # a daemon blocked in close() answers nobody
                seen.append(c.status().get("closes_pending"))
            waits.append(time.monotonic() - t)
        assert seen[-5:] == [1] * 5, f"one close stays pending on a closer thread: {seen[-10:]}"
        for _ in range(20):  # while it blocks, everyone else is answered
            t = time.monotonic()
            with Client(control, timeout=30) as c:
                st = c.status()
            waits.append(time.monotonic() - t)
            assert st["closes_pending"] >= 1 and st["entries"] == entries
        assert max(waits) < 2.0, f"a client waited {max(waits):.1f} s while a close blocked"
        if how != "put-then-del":
            assert ("fdstore_refused" if how == "datagram" else "refused_peer") in cluster.logs()
        attacker.kill()  # its end of the TCP connection closes: the lingering close ends
        attacker.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with Client(control) as c:
                if c.status()["closes_pending"] == 0:
                    break
            time.sleep(0.05)
        assert settled_fds(src.pid, base) == base, "the fd was closed in the end, nothing leaked"
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait(10)
        cluster.close()
        shutil.rmtree(d, ignore_errors=True)


PUT_THEN_DEL = textwrap.dedent("""
    # put a lingering socket (our copy closed), then del it: the daemon closes the last reference
    import os, sys, time
    from cprd.client import Client
    from cprd.tools.lingering import Lingering
    socks = Lingering()
    fd = socks.make(3600)
    with Client(sys.argv[1], timeout=5) as cl:
        cl.put("linger", 1, fd)
        os.close(fd)
        cl.delete("linger", 1)
    print("sent", flush=True)
    time.sleep(3600)
""")


def test_ordinary_closes_on_the_closer_thread_end_at_once(cluster):
    """closes_pending counts what the closer has yet to close: ordinary fds (a delete, a client's
    connection that ended) are closed within moments, and nothing leaks."""
    src = cluster.source("eventfds=2")

    def drained() -> int:
        with Client(cluster.control, timeout=5) as c:
            c.status()  # this very connection closes on the closer too, after its answer:
        with Client(cluster.control, timeout=5) as c:  # the next status may count it
            return c.status()["closes_pending"]

    deadline = time.monotonic() + 5
    while drained() > 1:
        assert time.monotonic() < deadline
    base = num_fds(src.pid)
    with cluster.client() as c:
        for i in range(50):
            ev = os.eventfd(0)
            c.put("x", i, ev)
            os.close(ev)
        for i in range(50):
            c.delete("x", i)
    deadline = time.monotonic() + 5
    while drained() > 1:
        assert time.monotonic() < deadline, "50 ordinary closes still pending after 5 s"
    assert settled_fds(src.pid, base) == base
