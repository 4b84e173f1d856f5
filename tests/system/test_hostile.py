"""Hostile or unlucky peers and exhausted resources, with real processes."""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cprd import scm
from cprd.client import Client
from cprd.errors import Busy, CapacityError, CprdError, HandoffError, UntrustedPeer
from cprd.handoff import table_limit
from cprd.tools.procs import stop, wait_for_socket
from cprd.protocol import control as cp
from helpers import num_fds, settled_fds, snapshot

NOBODY = pwd.getpwnam("nobody")
AS_USER = str(Path(__file__).resolve().parents[1] / "as_user.py")
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


@pytest.fixture
def reachable_dir():
    """A directory of root's, mode 0711: other users may reach the sockets in it, not change it."""
    d = tempfile.mkdtemp(prefix="cprd-open-", dir="/tmp")
    os.chmod(d, 0o711)
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
            Client(path, timeout=10).status()  # answered: the daemon has made its control socket 0600
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
    silent.settimeout(10)  # 20 times the idle timeout
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


def test_a_client_beyond_max_clients_waits_for_a_slot_and_is_served(cluster):
    """With every slot held, a new client is not told Busy at once: it waits in the backlog and is
    served as soon as a slot frees, within --queue-timeout."""
    src = cluster.spawn("source", "--control", cluster.control, "--max-clients", "3", "--queue-timeout", "20")
    wait_for_socket(cluster.control, src)
    held = [Client(cluster.control).connect() for _ in range(3)]
    for c in held:
        c.status()
    got: list = []

    def waiter() -> None:
        t0 = time.monotonic()
        try:
            got.append((Client(cluster.control, timeout=30).status()["pid"], time.monotonic() - t0))
        except CprdError as e:
            got.append((e, time.monotonic() - t0))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(1.0)
    assert not got, f"answered while every slot was held: {got}"
    held.pop().close()
    t.join(30)
    assert got and got[0][0] == src.pid and got[0][1] >= 1.0, got  # served once the slot freed, never Busy
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
    """A table never grows past what a target with the same fd limit can take over; at its fd limit
    the daemon answers every client clearly, at once, however many silent connections it refuses."""
    limit = 300
    src = cluster.spawn("source", "--control", cluster.control, preexec_fn=_limit(limit))
    wait_for_socket(cluster.control, src)
    stored = 0
    with cluster.client() as c:
        with pytest.raises(CapacityError, match="fd limit") as exc:
            for i in range(limit):
                ev = os.eventfd(i, os.EFD_CLOEXEC)
                try:
                    c.put("ev", i, ev)
                finally:
                    os.close(ev)
                stored += 1
        assert f"RLIMIT_NOFILE {limit}" in str(exc.value) and "target with the same fd limit" in str(exc.value)
        assert stored == table_limit(limit)
        assert len(c.ls()) == stored and c.status()["entries"] == stored
    base = num_fds(src.pid)
    # A target with the same limit takes that table whole.
    tgt, listen = cluster.target(preexec_fn=_limit(limit))
    with cluster.client() as c:
        assert c.handoff(listen)["entries"] == stored
    assert src.wait(30) == 0
    base = num_fds(tgt.pid)
    # More connections than fds: the daemon cannot accept, yet each client gets an answer; connections
    # that never speak and never close do not hold up the answers to the others.
    silent, conns, refused = [], [], 0
    for _ in range(limit - base + 40):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(cluster.control)
        silent.append(s)
    try:
        for _ in range(5):
            try:
                c = Client(cluster.control, timeout=5, retry_for=0).connect()
                c.status()
                conns.append(c)
            except CapacityError as e:
                assert "at its fd limit" in str(e)
                refused += 1
        assert refused == 5
    finally:
        for s in silent:
            s.close()
        for c in conns:
            c.close()
    assert settled_fds(tgt.pid, base) == base  # every connection closed there too, and nothing leaked
    with cluster.client() as c:
        assert c.status()["entries"] == stored
    assert settled_fds(tgt.pid, base) == base


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
    # Its target runs as nobody too: a table goes only to its own user or root.
    src = subprocess.Popen([sys.executable, AS_USER, "nobody", "source", "--control", control, "--populate",
                            "eventfds=500,files=300,sockets=100"], cwd=nobody_dir, stderr=subprocess.PIPE,
                           env={**os.environ, "CPRD_FAULT": "source:hello::rlimit=300"})
    cluster.procs.append(src)
    wait_for_socket(control, src)
    with pytest.raises(UntrustedPeer, match="served by uid 65534"):
        Client(control).status()  # root does not talk to another user's daemon unless told to
    nobody = (NOBODY.pw_uid,)
    with Client(control, trust_uids=nobody) as c:
        before = snapshot(c)
    assert len(before) == 1000
    tgt = subprocess.Popen([sys.executable, AS_USER, "nobody", "target", "--listen", listen], cwd=nobody_dir,
                           stderr=subprocess.DEVNULL)
    cluster.procs.append(tgt)
    wait_for_socket(listen, tgt)
    with Client(control, trust_uids=nobody) as c:
        res = c.handoff(listen)
    assert res["entries"] == 1000
    assert src.wait(30) == 0
    with Client(control, trust_uids=nobody) as c:
        assert c.status()["pid"] == tgt.pid
        assert snapshot(c) == before
    assert b"batch=150 window=1" in src.stderr.read()


# -- bursts and clients that never read ---------------------------------------------------------------
BURST = 1000


def _room_for(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n + 200:
        pytest.skip(f"this process may open {hard} fds; {n} clients need {n + 200} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _burst(path: str, n: int, during=None) -> tuple[int, list[str]]:
    """n first-time clients connect at once and ask for status; `during` runs meanwhile once they
    have all started, and must overlap them: some client began before it ended and was answered
    after it began (else the burst proved nothing about it). (answered, failures)."""
    import trio

    from cprd.client import AsyncClient

    answered, failures = 0, []
    spans: list[tuple[float, float]] = []  # each answered client's (began, answered)
    started = trio.Event()
    go = trio.Event()
    waiting = n

    async def one() -> None:
        nonlocal answered, waiting
        waiting -= 1
        if not waiting:
            started.set()
        await go.wait()
        t0 = trio.current_time()
        try:
            async with AsyncClient(path, timeout=120) as c:
                await c.status()
            answered += 1
            spans.append((t0, trio.current_time()))
        except CprdError as e:
            failures.append(repr(e))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
        await started.wait()
        go.set()
        if during is not None:
            t_begin = trio.current_time()
            await during()
            t_end = trio.current_time()
    if during is not None:
        overlapped = sum(1 for a, b in spans if a < t_end and b > t_begin)
        assert overlapped, f"no client was in flight during the move ({t_begin:.3f}-{t_end:.3f})"
    return answered, failures


@pytest.mark.slow
def test_a_burst_of_first_time_clients_is_answered_also_during_a_handoff_and_an_upgrade(cluster):
    import trio

    from cprd.client import AsyncClient

    _room_for(BURST)
    cluster.source("eventfds=5000")
    assert trio.run(_burst, cluster.control, BURST) == (BURST, [])
    tgt, listen = cluster.target()

    async def handoff() -> None:
        async with AsyncClient(cluster.control, retry_for=0) as c:
            assert (await c.handoff(listen))["entries"] == 5000

    assert trio.run(_burst, cluster.control, BURST, handoff) == (BURST, [])

    async def upgrade() -> None:
        async with AsyncClient(cluster.control, timeout=120, retry_for=0) as c:
            res = await c.upgrade()
            assert res["pid"] == tgt.pid and not res["rolled_back"]

    assert trio.run(_burst, cluster.control, BURST, upgrade) == (BURST, [])
    with cluster.client() as c:
        st = c.status()
        assert (st["pid"], st["entries"], st["upgrades"]) == (tgt.pid, 5000, 1)


def test_clients_that_never_read_their_ls_cost_no_memory_and_are_dropped(cluster):
    """250 clients ask for `ls` of a 10,000-entry table and never read: the reply is shared, not
    copied per client, and each connection is dropped once it has not read for --idle-timeout."""
    import psutil

    src = cluster.spawn("source", "--control", cluster.control, "--populate", "eventfds=10000",
                        "--idle-timeout", "2")
    wait_for_socket(cluster.control, src)
    with cluster.client() as c:
        assert len(c.ls()) == 10000
    proc = psutil.Process(src.pid)
    base_fds, base_rss = num_fds(src.pid), proc.memory_info().rss
    silent = []
    try:
        for _ in range(250):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(cluster.control)
            scm.send_sync(s, cp.encode_request("ls"))
            silent.append(s)
        peak = base_rss
        deadline = time.monotonic() + 30
        while num_fds(src.pid) > base_fds:  # dropped once the idle timeout passes, though never closed
            peak = max(peak, proc.memory_info().rss)
            assert time.monotonic() < deadline, "connections that never read are never dropped"
            time.sleep(0.1)
        assert all(s.recv(1, socket.MSG_PEEK) for s in silent), "each got the start of its reply"
    finally:
        for s in silent:
            s.close()
    # Before, each kept its own copy of a 1.2 MB reply: 250 of them took the daemon from 33 to 284 MB.
    assert peak - base_rss < 20 * 2**20, (base_rss, peak)
    assert proc.memory_info().rss - base_rss < 20 * 2**20
    with cluster.client() as c:
        assert len(c.ls()) == 10000
    assert "event=reply_dropped reason=client-not-reading" in cluster.logs()


def test_a_full_backlog_makes_clients_wait_not_fail(cluster):
    """The listen backlog is as large as the system allows; when even that is full (here: the daemon
    stopped while connections pile up), a client retries its connect until the daemon catches up."""
    import threading

    import trio

    from cprd.client import AsyncClient
    from cprd.paths import max_backlog

    _room_for(max_backlog() + 100)
    src = cluster.source("eventfds=10")
    os.kill(src.pid, signal.SIGSTOP)
    queued, threads = [], []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(cluster.control)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
            assert len(queued) <= max_backlog() + 1, "more connections queued than the backlog holds"
        assert len(queued) >= max_backlog(), f"a backlog of {len(queued)}, not the system's {max_backlog()}"
        results: dict[str, object] = {}

        def sync_client() -> None:
            try:
                results["sync"] = Client(cluster.control, timeout=60).status()["pid"]
            except Exception as e:  # noqa: BLE001 - reported below
                results["sync"] = e

        async def async_client() -> None:
            try:
                async with AsyncClient(cluster.control, timeout=60) as c:
                    results["async"] = (await c.status())["pid"]
            except Exception as e:  # noqa: BLE001 - reported below
                results["async"] = e

        threads = [threading.Thread(target=sync_client), threading.Thread(target=trio.run, args=(async_client,))]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both are retrying EAGAIN now
        early = dict(results)
    finally:
        for s in queued:
            s.close()
        os.kill(src.pid, signal.SIGCONT)
        for t in threads:  # joined whatever happened: no client outlives the test
            t.join(60)
    assert not early, f"a client was done while the backlog was full (it gave up): {early}"
    assert results == {"sync": src.pid, "async": src.pid}
