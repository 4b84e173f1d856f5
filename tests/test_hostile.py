"""Hostile or unlucky peers and exhausted resources, with real processes."""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cprd import scm
from cprd.client import Client
from cprd.errors import Busy, CapacityError, CprdError, HandoffError
from cprd.procs import stop, wait_for_socket
from helpers import num_fds, settled_fds, snapshot

NOBODY = pwd.getpwnam("nobody")
AS_USER = str(Path(__file__).parent / "as_user.py")
needs_root = pytest.mark.requires("root")


@pytest.fixture
def nobody_dir():
    """A private directory owned by nobody, outside root's pytest tree (which nobody cannot enter)."""
    d = tempfile.mkdtemp(prefix="cprd-nobody-", dir="/tmp")
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(d, 0o700)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(fn) -> int:
    """Run fn() in a forked child as uid nobody; its return value (an int) is the exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _status_as_nobody(path: str) -> int:
    def probe() -> int:
        try:
            Client(path, timeout=10).status()
            return 0
        except CprdError as e:
            return 3 if f"uid {NOBODY.pw_uid} may not use this cprd" in str(e) else 4
        except OSError:
            return 5

    return _as_nobody(probe)


@needs_root
def test_peer_with_another_uid_is_refused_unless_allowed(cluster, tmp_path):
    # A socket reachable by everyone (0711 directory, 0666 socket, as --allow-uid makes it): the kernel
    # lets nobody connect, so SO_PEERCRED is what refuses it unless it is allowed.
    for allow, want in (([], 3), (["--allow-uid", "nobody"], 0)):
        d = Path(tempfile.mkdtemp(prefix="cprd-open-", dir="/tmp"))
        try:
            os.chmod(d, 0o711)
            path = str(d / "control.sock")
            p = cluster.spawn("source", "--control", path, *allow)
            wait_for_socket(path, p)
            os.chmod(path, 0o666)
            base = num_fds(p.pid)
            assert _status_as_nobody(path) == want
            assert Client(path).status()["pid"] == p.pid, "the daemon goes on serving"
            assert settled_fds(p.pid, base) == base
            stop(p)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def test_silent_client_is_closed_after_the_idle_timeout(cluster):
    src = cluster.spawn("source", "--control", cluster.control, "--idle-timeout", "0.5")
    wait_for_socket(cluster.control, src)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(cluster.control)
    silent.settimeout(30)
    with cluster.client() as c:  # others are served meanwhile
        assert c.status()["pid"] == src.pid
    assert silent.recv(100) == b"", "the daemon closes a connection that never speaks"
    silent.close()


def test_max_clients(cluster):
    src = cluster.spawn("source", "--control", cluster.control, "--max-clients", "3")
    wait_for_socket(cluster.control, src)
    held = [Client(cluster.control).connect() for _ in range(3)]
    for c in held:
        c.status()
    with pytest.raises(Busy, match="serves 3 connections"):
        Client(cluster.control).status()
    held.pop().close()
    deadline = time.monotonic() + 10
    while True:  # the daemon frees the slot once it has seen the close
        try:
            assert Client(cluster.control).status()["pid"] == src.pid
            break
        except Busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for c in held:
        c.close()


def test_a_silent_connection_does_not_hold_up_a_target(cluster):
    cluster.source("eventfds=20")
    tgt, listen = cluster.target()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(listen)  # first in the queue, and never says a word
    try:
        with cluster.client() as c:
            assert c.handoff(listen)["entries"] == 20
        # A target that took connections one at a time would have waited out the silent one's hello
        # timeout (and logged it) before it even read the real source's hello.
        assert "no answer from the peer" not in cluster.logs()
    finally:
        silent.close()


def test_target_out_of_fds_mid_batch_fails_cleanly(cluster):
    src = cluster.source("eventfds=600")
    base = num_fds(src.pid)
    # After batch 0 (253 fds) the target's soft limit drops to 300: batch 1 cannot fit, the kernel
    # truncates it (MSG_CTRUNC) and closes what it could not install.
    tgt, listen = cluster.target(env={"CPRD_FAULT": "target:batch:0:rlimit=300"})
    with cluster.client() as c:
        before = snapshot(c)
        with pytest.raises((HandoffError, CapacityError)) as exc:
            c.handoff(listen)
    assert "MSG_CTRUNC" in str(exc.value) or "fd limit" in str(exc.value)
    assert tgt.wait(30) not in (0, None)
    with cluster.client() as c:
        assert snapshot(c) == before
    assert settled_fds(src.pid, base) == base
    assert "MSG_CTRUNC" in cluster.logs()


def _limit(n: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return set_limit


def test_daemon_at_its_fd_limit_refuses_puts_clearly(cluster):
    src = cluster.spawn("source", "--control", cluster.control, preexec_fn=_limit(100))
    wait_for_socket(cluster.control, src)
    stored = 0
    with cluster.client() as c:
        with pytest.raises(CapacityError, match="fd limit") as exc:
            for i in range(200):
                ev = os.eventfd(i, os.EFD_CLOEXEC)
                try:
                    c.put("ev", i, ev)
                finally:
                    os.close(ev)
                stored += 1
        assert "RLIMIT_NOFILE 100" in str(exc.value)
        assert 40 < stored < 100
        assert len(c.ls()) == stored and c.status()["entries"] == stored
    base = num_fds(src.pid)
    # more connections than fds: the daemon cannot accept, yet each client gets an answer
    conns, refused = [], 0
    for _ in range(40):
        try:
            c = Client(cluster.control, timeout=10).connect()
            c.status()
            conns.append(c)
        except CapacityError:
            refused += 1
    assert refused > 0
    for c in conns:
        c.close()
    with cluster.client() as c:
        assert c.status()["entries"] == stored
    assert settled_fds(src.pid, base) == base


@needs_root
def test_kernel_limits_fds_in_flight_for_unprivileged_senders():
    """The premise of flow control: an unprivileged sender cannot have more fds in flight than its
    RLIMIT_NOFILE (ETOOMANYREFS), however many the receiver could take."""
    def probe() -> int:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        evs = [os.eventfd(0) for _ in range(253)]
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            for _ in range(3):  # nobody receives: 253, 506 in flight, then refused
                scm.send_sync(a, b"x", evs)
        except CapacityError as e:
            return 0 if "ETOOMANYREFS" in str(e) else 2
        return 1

    assert _as_nobody(probe) == 0


@needs_root
def test_unprivileged_source_with_a_low_limit_hands_off(cluster, nobody_dir):
    control, listen = str(nobody_dir / "control.sock"), str(nobody_dir / "handoff.sock")
    # The source (uid nobody) holds 1000 fds, then its limit drops to 300 (test hook, right after its
    # hello): 1000 fds in flight would be refused with ETOOMANYREFS; flow control keeps it under 150.
    src = subprocess.Popen([sys.executable, AS_USER, "nobody", "source", "--control", control, "--populate",
                            "eventfds=500,files=300,sockets=100"], cwd=nobody_dir, stderr=subprocess.PIPE,
                           env={**os.environ, "CPRD_FAULT": "source:hello::rlimit=300"})
    cluster.procs.append(src)
    wait_for_socket(control, src)
    with Client(control) as c:
        before = snapshot(c)
    assert len(before) == 1000
    tgt = cluster.spawn("target", "--listen", listen, "--allow-uid", "nobody")
    wait_for_socket(listen, tgt)
    with Client(control) as c:
        res = c.handoff(listen)
    assert res["entries"] == 1000
    assert src.wait(30) == 0
    with Client(control) as c:
        assert c.status()["pid"] == tgt.pid
        assert snapshot(c) == before
    assert b"batch=150 window=1" in src.stderr.read()
