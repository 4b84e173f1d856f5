"""The standby (`--standby`): a second process that holds a copy of every fd, is told of every change
before its client is answered, and takes over when the daemon dies. Real daemons, SIGKILLs under
churn, every acknowledged entry proved the very open file (kcmp) against the clients' own copies."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
from helpers import (UPGRADE_SPEC, ChurnWithDeletes, close_copies, hold_copies, kcmp_file, prove_same,
                     table_holders)

SPEC = UPGRADE_SPEC


def _status(cluster) -> dict:
    with cluster.client() as c:
        return c.status()


def _standing_by(cluster, daemon: int, timeout: float = 30.0) -> int:
    """The pid of the daemon's standby, once it stands by (its program started and holds the table)."""
    deadline = time.monotonic() + timeout
    while True:
        st = _status(cluster)
        sb = st.get("standby") or {}
        if st["pid"] == daemon and sb.get("state") == "up":
            assert f"event=standing_by pid={sb['pid']} for={daemon}" in cluster.logs()
            return sb["pid"]
        assert time.monotonic() < deadline, (st.get("standby"), cluster.logs()[-3000:])
        time.sleep(0.02)


def _serving(cluster, not_pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid = _status(cluster)["pid"]
            if pid != not_pid:
                return pid
        except Exception:  # noqa: BLE001 - the control socket is served again within a moment
            pass
        assert time.monotonic() < deadline, cluster.logs()[-3000:]
        time.sleep(0.01)


def test_each_sigkill_of_the_daemon_under_churn_loses_no_acknowledged_change(cluster):
    """Three SIGKILLs of whichever process serves, under puts and deletes: each time its standby
    serves the same control socket in its own pid, with every acknowledged put (the very fd put,
    kcmp) and no acknowledged delete undone, no client request fails (each retried one is answered
    once), and a new standby follows."""
    src = cluster.source(SPEC, extra=("--standby",))
    with cluster.client() as c:
        copies = hold_copies(c)
    churn = None
    try:
        daemon = src.pid
        standby = _standing_by(cluster, daemon)
        with ChurnWithDeletes(cluster.control) as churn:
            for _ in range(3):
                time.sleep(0.3)
                os.kill(daemon, signal.SIGKILL)
                serving = _serving(cluster, daemon)
                assert serving == standby, "the standby serves, in its own pid"
                assert psutil.Process(serving).name() != "cprd-standby", "it no longer calls itself a standby"
                daemon, standby = serving, _standing_by(cluster, serving)
        assert not churn.failed, churn.failed
        assert len(churn.mine) > 20 and len(churn.deleted) > 5
        prove_same(cluster, {**copies, **churn.mine})  # exactly these entries: none lost, no delete undone
        with cluster.client() as c:
            served = {(e["name"], e["id"]) for e in c.ls()}
            st = c.status()
        assert not served & churn.deleted
        assert st["standby"]["pid"] == standby and st["standby"]["state"] == "up"
        logs = cluster.logs()
        assert logs.count("event=took_over") == 3, logs[-3000:]
        # who holds the table: the daemon and its standby, every entry each; nobody else
        holders = table_holders(cluster.control, daemon)
        assert set(holders) == {daemon, standby} and len(set(holders.values())) == 1, holders
    finally:
        close_copies(copies)
        if churn is not None:
            close_copies(churn.mine)


def test_a_standby_that_dies_or_stops_reading_is_replaced_and_a_stop_retires_it(cluster):
    """The standby killed: a new one within a moment. The standby stopped (SIGSTOP) while changes
    come: once its queue is full it is fenced and replaced, and the changes go on being answered.
    SIGTERM to the daemon: it and its standby exit; nobody takes over."""
    src = cluster.source("eventfds=4", extra=("--standby",))
    first = _standing_by(cluster, src.pid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (second := (_status(cluster)["standby"] or {}).get("pid")) in (None, first):
        assert time.monotonic() < deadline, cluster.logs()[-3000:]
        time.sleep(0.02)
    second = _standing_by(cluster, src.pid)
    assert "event=standby_ended pid=%d" % first in cluster.logs()
    os.kill(second, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    with cluster.client() as c:
        i = 0
        while (c.status()["standby"] or {}).get("pid") == second:  # until it is fenced
            ev = os.eventfd(0)  # each put's journal message waits in the stopped standby's queue
            try:
                c.put("q", i, ev)  # answered all along
            finally:
                os.close(ev)
            i += 1
            assert time.monotonic() < deadline, f"the stopped standby was never fenced: {c.status()['standby']}"
    # judged by its queue not going down (--answer-timeout), long before the queue is full
    assert "event=standby_fenced pid=%d reason='it read none of the" % second in cluster.logs(), cluster.logs()[-3000:]
    third = _standing_by(cluster, src.pid)
    assert third != second
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
    src.send_signal(signal.SIGTERM)
    assert src.wait(30) == 0
    deadline = time.monotonic() + 10
    while psutil.pid_exists(third) and psutil.Process(third).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the retired standby did not exit"
        time.sleep(0.02)
    assert "event=took_over" not in cluster.logs() and not os.path.exists(cluster.control)


def test_status_shows_the_standby_and_a_handoff_gives_the_target_its_own(cluster):
    src = cluster.source("eventfds=4", extra=("--standby",))
    first = _standing_by(cluster, src.pid)
    r = cluster.ctl("status", "--json")
    st = json.loads(r.stdout)
    assert st["standby"]["pid"] == first and st["standby"]["synchronous"] is True
    assert st["standby"]["queued_bytes"] == 0
    tgt = cluster.spawn("target", "--listen", str(cluster.dir / "h.sock"), "--standby")
    from cprd.tools.procs import wait_for_socket
    wait_for_socket(str(cluster.dir / "h.sock"), tgt)
    r = cluster.ctl("handoff", "--to", str(cluster.dir / "h.sock"), "--json")
    assert r.returncode == 0, r.stderr
    assert src.wait(30) == 0
    standby = _standing_by(cluster, tgt.pid)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(first) and psutil.Process(first).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the source's standby did not exit after the handoff"
        time.sleep(0.02)
    os.kill(tgt.pid, signal.SIGKILL)
    assert _serving(cluster, tgt.pid) == standby
    with cluster.client() as c:
        assert len(c.ls()) == 4


def test_a_stopped_daemon_is_killed_by_its_standby_which_serves(cluster):
    """A daemon that stops answering (SIGSTOP: alive, silent) is judged by answers: its standby kills
    it (SIGKILL reaches a stopped process) and serves once it is gone, never beside it. (A table past
    fd 1023, which select() could not watch.)"""
    src = cluster.source("eventfds=1100", extra=("--standby",))
    standby = _standing_by(cluster, src.pid)
    with cluster.client() as c:
        ev = os.eventfd(7)
        c.put("before", 1, ev)
    t0 = time.monotonic()
    os.kill(src.pid, signal.SIGSTOP)
    assert _serving(cluster, src.pid) == standby
    waited = time.monotonic() - t0
    assert src.wait(10) == -signal.SIGKILL
    # silent for 3 s counted from its last answer (probes go every second): killed 2-3 s after the stop
    assert 1.9 <= waited < 30, waited
    assert "event=daemon_silent pid=%d" % src.pid in cluster.logs()
    with cluster.client() as c:
        _, fd = c.get("before", 1)
    try:
        assert kcmp_file(os.getpid(), ev, os.getpid(), fd), "the very eventfd put"
    finally:
        os.close(fd)
        os.close(ev)


def test_an_upgrade_retires_the_standby_and_the_new_program_starts_its_own(cluster):
    """The standby is retired as an in-place upgrade starts (the guardian protects the upgrade); the
    program that serves after it forks a new one, which takes over at the next SIGKILL."""
    src = cluster.source("eventfds=6", extra=("--standby",))
    first = _standing_by(cluster, src.pid)
    r = cluster.ctl("upgrade", "--json")
    assert r.returncode == 0 and not json.loads(r.stdout)["rolled_back"], (r.stdout, r.stderr)
    second = _standing_by(cluster, src.pid)
    assert second != first
    deadline = time.monotonic() + 10
    while psutil.pid_exists(first) and psutil.Process(first).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the retired standby did not exit"
        time.sleep(0.02)
    assert "event=standby_retired pid=%d why=an upgrade starts" % first in cluster.logs()
    os.kill(src.pid, signal.SIGKILL)
    assert _serving(cluster, src.pid) == second
    with cluster.client() as c:
        assert len(c.ls()) == 6


def test_an_apps_store_and_its_listener_survive_the_daemons_death(cluster, tmp_path):
    """What `cprd run --listen` keeps (an app's fd store: its listener, its notify socket, its names)
    is part of the table: after a SIGKILL of the daemon its standby serves the store, the next run
    gets the very same listener, and a connection that waited in its backlog meanwhile is there."""
    import socket
    import subprocess
    import sys

    src = cluster.source("eventfds=2", extra=("--standby",))
    env = {**os.environ, "CPRD_CONTROL": cluster.control}
    show = "import os; print(os.readlink('/proc/self/fd/3'))"
    first = subprocess.run([sys.executable, "-m", "cprd", "run", "--name", "web", "--listen", "http=tcp:127.0.0.1:0",
                            "--", sys.executable, "-c", show], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    with cluster.client() as c:
        (row,) = c.fdstore("web", "list")
        _, fd = c.get("fdstore/web", row["id"])
    with socket.socket(fileno=fd) as s:
        port = s.getsockname()[1]
    standby = _standing_by(cluster, src.pid)
    os.kill(src.pid, signal.SIGKILL)
    waiting = socket.create_connection(("127.0.0.1", port), timeout=10)  # nobody accepts: it waits in the backlog
    waiting.sendall(b"hi")
    assert _serving(cluster, src.pid) == standby
    again = subprocess.run([sys.executable, "-m", "cprd", "run", "--name", "web", "--listen",
                            f"http=tcp:127.0.0.1:{port}", "--", sys.executable, "-c",
                            "import socket; s = socket.socket(fileno=3); c, _ = s.accept(); print(c.recv(2).decode()); "
                            + show], env=env, capture_output=True, text=True, timeout=60, input="")
    assert again.returncode == 0, again.stderr
    said, inode = again.stdout.split()
    assert said == "hi" and inode == first.stdout.strip(), "the very listener, and the connection that waited in it"
    waiting.close()


def test_the_service_manager_is_told_the_standbys_pid_when_it_takes_over(cluster, tmp_path):
    """MAINPID= (sd_notify) from the standby that took over, then READY=1, on the NOTIFY_SOCKET the
    daemon was started with; the standby says nothing while it stands by."""
    import socket

    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(30)
    src = cluster.source("eventfds=3", env={"NOTIFY_SOCKET": path}, extra=("--standby",))

    def fields() -> dict[str, str]:
        return dict(line.split("=", 1) for line in ns.recv(4096).decode().splitlines())

    assert fields()["READY"] == "1"
    standby = _standing_by(cluster, src.pid)
    ns.settimeout(0.3)
    try:
        extra = ns.recv(4096)
    except TimeoutError:
        extra = b""
    assert extra == b"", f"the standby spoke while it stood by: {extra!r}"
    ns.settimeout(30)
    os.kill(src.pid, signal.SIGKILL)
    assert fields() == {"MAINPID": str(standby)}
    assert fields()["READY"] == "1"
    ns.close()


def test_a_daemon_stopped_before_its_standby_started_is_not_taken_over(cluster):
    """SIGTERM right after the start, while the standby's program is still starting: the R the daemon
    wrote before it exited is read by the standby when it finds the daemon gone; it exits and
    nobody serves the table (it was stopped on purpose)."""
    src = cluster.source("eventfds=3", extra=("--standby",))
    standby = (_status(cluster).get("standby") or {}).get("pid")
    src.send_signal(signal.SIGTERM)
    assert src.wait(30) == 0
    if standby:
        deadline = time.monotonic() + 30
        while psutil.pid_exists(standby) and psutil.Process(standby).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the standby did not exit"
            time.sleep(0.02)
    time.sleep(0.3)
    assert "event=took_over" not in cluster.logs() and "event=daemon_died" not in cluster.logs(), cluster.logs()[-2000:]
    assert not os.path.exists(cluster.control)
