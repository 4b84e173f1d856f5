"""systemd's fd store protocol, spoken by real clients nobody here wrote: libsystemd (ctypes),
python3-systemd, systemd-notify. Each rule of docs/fdstore.md is checked against the daemon's
table and the kernel (fd counts in /proc, inodes), across handoffs and upgrades."""

from __future__ import annotations

import array
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import sd
from cprd import fdstore as fs
from cprd.client import Client
from cprd.errors import HandoffError
from helpers import num_fds, settled_fds

SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-systemd lives


needs_libsystemd = pytest.mark.requires("libsystemd")


def run(cluster, app: str, *cmd: str, extra: tuple[str, ...] = (), timeout: float = 60,
        env: dict | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    e = {**os.environ, "CPRD_CONTROL": cluster.control, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cprd", "run", "--name", app, *extra, "--", *cmd], env=e,
                          capture_output=True, text=True, timeout=timeout, pass_fds=pass_fds)


def listened(cluster, app: str, **kw) -> dict:
    """What a program started by `cprd run --name app` got from sd_listen_fds_with_names()."""
    r = run(cluster, app, sys.executable, "-c", sd.LISTEN_PROGRAM, **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def store_of(cluster, app: str) -> list[dict]:
    with cluster.client() as c:
        return c.fdstore(app, "list")


@pytest.fixture
def web(cluster, monkeypatch):
    """A source with a store for app "web"; $NOTIFY_SOCKET points at it for libsystemd's calls."""
    src = cluster.source("eventfds=2")
    with cluster.client() as c:
        info = c.fdstore("web", "socket")
    monkeypatch.setenv("NOTIFY_SOCKET", info["socket"])
    return src, info


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# -- running a program with its store ----------------------------------------------------------------
@needs_libsystemd
def test_a_program_stores_fds_with_libsystemd_and_gets_them_back_named_newest_first(cluster, web):
    src, info = web
    stray = os.open("/dev/null", os.O_RDONLY)  # an fd `cprd run` inherits from whoever ran it (no O_CLOEXEC)
    try:
        first = listened(cluster, "web", pass_fds=(stray,))
    finally:
        os.close(stray)
    assert first["n"] == 0 and first["env"]["LISTEN_FDS"] is None
    assert first["env"]["NOTIFY_SOCKET"] == info["socket"] and first["env"]["FDSTORE"] == "1024"
    assert first["others"] == [], "the program gets no fd but those it stored, as under systemd"
    a, b = _listener(), _listener()
    with a, b:
        assert sd.notify("FDSTORE=1\nFDNAME=listen", [a.fileno()]) > 0
        assert sd.notify("FDSTORE=1\nFDNAME=admin", [b.fileno()]) > 0
        assert sd.barrier() > 0  # every earlier message handled: both are in the store now, no sleep needed
        assert [r["fdname"] for r in store_of(cluster, "web")] == ["admin", "listen"]
        got = listened(cluster, "web")
        ino = {x: os.fstat(x.fileno()).st_ino for x in (a, b)}
    assert got["n"] == 2 and [f["name"] for f in got["fds"]] == ["admin", "listen"]  # newest first, as systemd
    assert [f["ino"] for f in got["fds"]] == [ino[b], ino[a]], "the very sockets we stored"
    assert got["env"]["LISTEN_FDS"] == "2" and got["env"]["LISTEN_FDNAMES"] == "admin:listen"
    assert got["env"]["LISTEN_PID"] == str(got["pid"]) and got["others"] == []
    with cluster.client() as c:
        st = c.status()
        assert st["fdstore"]["web"]["fds"] == 2 and st["entries"] == 2 + 2 + 2  # eventfds, socket+names, stored
        shown = [e for e in c.ls() if e.get("app") == "web"]
    assert sorted((e["id"], e["fdname"]) for e in shown) == [(-2, None), (-1, None), (0, "listen"), (1, "admin")]


@needs_libsystemd
def test_same_open_file_is_stored_once_and_keeps_its_first_name(cluster, web):
    src, _ = web
    before = num_fds(src.pid)  # before any fd is sent: the duplicates must leave nothing behind
    s = _listener()
    dup = os.dup(s.fileno())
    other = os.open("/dev/null", os.O_RDONLY)
    other_again = os.open("/dev/null", os.O_RDONLY)  # the same inode, a different open file: a device, kept
    try:
        sd.notify("FDSTORE=1\nFDNAME=one", [s.fileno()])
        sd.notify("FDSTORE=1\nFDNAME=two", [dup, s.fileno()])
        sd.notify("FDSTORE=1\nFDNAME=null", [other, other_again])
        sd.barrier()
    finally:
        for fd in (dup, other, other_again):
            os.close(fd)
        s.close()
    rows = store_of(cluster, "web")
    assert sorted(r["fdname"] for r in rows) == ["null", "null", "one"]
    assert settled_fds(src.pid, before + 3) == before + 3, "three stored, each duplicate closed"
    base = num_fds(src.pid)
    with _listener() as t:  # a socket of the same kind, another open file: stored
        sd.notify("FDSTORE=1\nFDNAME=three", [t.fileno()])
        sd.barrier()
    assert settled_fds(src.pid, base + 1) == base + 1


@needs_libsystemd
def test_duplicates_among_many_fds_of_one_inode_are_found_across_a_handoff(cluster, web):
    """Eventfds all share one inode: the store keeps such a group in kcmp's order of open files and
    bisects it. Every copy of a stored one is still found, also by a new owner (which orders anew)."""
    src, _ = web
    evs = [os.eventfd(0) for _ in range(40)]
    try:
        sd.notify("FDSTORE=1\nFDNAME=ev", evs[:30])
        sd.barrier()
        copies = [os.dup(fd) for fd in evs[:30]]
        sd.notify("FDSTORE=1\nFDNAME=again", copies[::-1] + evs[30:])  # 30 copies, 10 new
        sd.barrier()
        names = [r["fdname"] for r in store_of(cluster, "web")]
        assert names.count("ev") == 30 and names.count("again") == 10 and len(names) == 40
        tgt, listen = cluster.target()
        with cluster.client() as c:
            c.handoff(listen)
        more = [os.eventfd(0) for _ in range(3)]
        sd.notify("FDSTORE=1\nFDNAME=after", copies[::3] + more + evs[30::2])
        sd.barrier()
        names = [r["fdname"] for r in store_of(cluster, "web")]
        assert names.count("after") == 3 and len(names) == 43
        for fd in copies + more:
            os.close(fd)
    finally:
        for fd in evs:
            os.close(fd)


@needs_libsystemd
def test_remove_takes_precedence_and_closes_every_fd_of_that_name(cluster, web):
    src, _ = web
    socks = [_listener() for _ in range(4)]
    base = num_fds(src.pid)
    sd.notify("FDSTORE=1\nFDNAME=x", [socks[0].fileno(), socks[1].fileno()])
    sd.notify("FDSTORE=1\nFDNAME=y", [socks[2].fileno()])
    sd.barrier()
    assert settled_fds(src.pid, base + 3) == base + 3
    # FDSTOREREMOVE=1 wins over FDSTORE=1 in the same message; the fd sent with it is closed
    sd.notify("FDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=x", [socks[3].fileno()])
    sd.barrier()
    assert [r["fdname"] for r in store_of(cluster, "web")] == ["y"]
    assert settled_fds(src.pid, base + 1) == base + 1
    sd.notify("FDSTOREREMOVE=1\nFDNAME=nosuch")  # nothing of that name: nothing happens
    sd.notify("FDSTOREREMOVE=1")  # no name: ignored with a warning
    sd.barrier()
    assert [r["fdname"] for r in store_of(cluster, "web")] == ["y"]
    for s in socks:
        s.close()


@needs_libsystemd
def test_a_polled_fd_that_hangs_up_is_removed_unless_fdpoll_0(cluster, web):
    src, _ = web
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    path = cluster.dir / "plain"
    path.write_text("x")
    f = os.open(path, os.O_RDONLY)  # a regular file cannot be polled: kept, unwatched
    base = num_fds(src.pid)
    sd.notify("FDSTORE=1\nFDNAME=watched", [r1])
    sd.notify("FDSTORE=1\nFDNAME=unwatched\nFDPOLL=0", [r2])
    sd.notify("FDSTORE=1\nFDNAME=file", [f])
    sd.barrier()
    for fd in (r1, r2, f):
        os.close(fd)
    assert sorted(r["fdname"] for r in store_of(cluster, "web")) == ["file", "unwatched", "watched"]
    assert [r["poll"] for r in store_of(cluster, "web") if r["fdname"] == "unwatched"] == [False]
    os.close(w1)  # the read end stored as "watched" now reports EPOLLHUP
    os.close(w2)  # so does "unwatched", which nobody watches
    deadline = time.monotonic() + 10
    while "watched" in [r["fdname"] for r in store_of(cluster, "web")] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(r["fdname"] for r in store_of(cluster, "web")) == ["file", "unwatched"]
    assert settled_fds(src.pid, base + 2) == base + 2
    assert "event=fdstore_hangup app=web" in cluster.logs()


@needs_libsystemd
def test_a_polled_fd_that_reports_an_error_is_removed(cluster, web):
    """EPOLLERR removes as EPOLLHUP does: the write end of a pipe whose read end is gone."""
    src, _ = web
    r, w = os.pipe()
    base = num_fds(src.pid)
    sd.notify("FDSTORE=1\nFDNAME=writer", [w])
    sd.barrier()
    os.close(w)
    assert [x["fdname"] for x in store_of(cluster, "web")] == ["writer"]
    os.close(r)  # the stored write end now reports EPOLLERR (and nothing else)
    deadline = time.monotonic() + 10
    while store_of(cluster, "web") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store_of(cluster, "web") == []
    assert settled_fds(src.pid, base) == base, "the removed fd was closed"


@needs_libsystemd
def test_an_epoll_fd_is_refused_and_closed_and_the_rest_of_its_message_stored(cluster, web):
    """An epoll fd's interest list names fds of the process that made it: never stored (its
    message's other fds are), and closed."""
    src, _ = web
    ep = select.epoll()
    s = _listener()
    base = num_fds(src.pid)
    try:
        sd.notify("FDSTORE=1\nFDNAME=mixed", [ep.fileno(), s.fileno()])
        sd.barrier()
        rows = store_of(cluster, "web")
        assert [x["fdname"] for x in rows] == ["mixed"] and rows[0]["kind"] == "socket"
    finally:
        ep.close()
        s.close()
    assert settled_fds(src.pid, base + 1) == base + 1, "the epoll fd was closed, the socket kept"
    assert "epoll fd and cannot be stored" in cluster.logs()


@needs_libsystemd
def test_an_fd_stored_without_a_name_reaches_the_program_as_stored(cluster, web):
    """systemd's default name, end to end: no FDNAME= means "stored" in the store and in
    LISTEN_FDNAMES."""
    s = _listener()
    with s:
        sd.notify("FDSTORE=1", [s.fileno()])
        sd.barrier()
        ino = os.fstat(s.fileno()).st_ino
    assert [x["fdname"] for x in store_of(cluster, "web")] == ["stored"]
    got = listened(cluster, "web")
    assert got["env"]["LISTEN_FDNAMES"] == "stored" and [f["name"] for f in got["fds"]] == ["stored"]
    assert [f["ino"] for f in got["fds"]] == [ino]


def test_a_full_notify_queue_makes_the_sender_wait_and_drops_nothing(cluster):
    """While the daemon reads nothing (its reader held back), the kernel's queue fills and refuses a
    sender that will not wait; one that waits sends as soon as there is room. Every message is
    stored once the reader goes on: the daemon drops nothing for being busy."""
    src = cluster.source("eventfds=2", env={"CPRD_FAULT": "fdstore:read::sleep=1"})
    with cluster.client() as c:
        path = c.fdstore("web", "socket")["socket"]
    n = int(open("/proc/sys/net/unix/max_dgram_qlen").read()) + 20
    refused = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        for i in range(n):
            r, w = os.pipe()
            try:
                msg, anc = [b"FDSTORE=1\nFDPOLL=0\nFDNAME=m%d" % i], [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
                try:
                    s.sendmsg(msg, anc, socket.MSG_DONTWAIT)
                except BlockingIOError:  # the queue is full: this sender waits (up to a deadline)
                    refused += 1
                    s.settimeout(60)
                    s.sendmsg(msg, anc)
                    s.settimeout(None)
            finally:
                os.close(r)
                os.close(w)
    assert refused > 0, "the queue never filled: the reader was not held back"
    deadline = time.monotonic() + 60
    while len(store_of(cluster, "web")) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(x["fdname"] for x in store_of(cluster, "web")) == sorted(f"m{i}" for i in range(n))
    assert src.poll() is None


@needs_libsystemd
def test_over_the_limit_the_extra_fds_are_closed(cluster, web):
    src, _ = web
    with cluster.client() as c:
        for fd in c.fdstore_open("web", 3)[1]:
            os.close(fd)
    base = num_fds(src.pid)
    socks = [_listener() for _ in range(5)]
    sd.notify("FDSTORE=1\nFDNAME=a", [s.fileno() for s in socks[:2]])
    sd.notify("FDSTORE=1\nFDNAME=b", [s.fileno() for s in socks[2:]])
    sd.barrier()
    for s in socks:
        s.close()
    assert [r["fdname"] for r in store_of(cluster, "web")] == ["b", "a", "a"]
    assert settled_fds(src.pid, base + 3) == base + 3
    assert "event=fdstore_full app=web max=3" in cluster.logs()
    got = listened(cluster, "web", extra=("--fdstore-max", "5"))
    assert got["n"] == 3 and got["env"]["FDSTORE"] == "5"


@needs_libsystemd
def test_a_program_started_next_gets_every_fd_the_last_one_sent_before_it_died(cluster, monkeypatch):
    """Messages still queued on the notify socket when a program is started are handled first: the
    new program never misses an fd its predecessor sent just before it was killed. The store's
    reader is held back (a fault point) so that the messages are still queued when the request
    comes, whatever the scheduler would have run first."""
    src = cluster.source("eventfds=2", env={"CPRD_FAULT": "fdstore:read::sleep=3600"})
    with cluster.client() as c:
        info = c.fdstore("web", "socket")
    socks = [_listener() for _ in range(8)]  # fits the smallest datagram queue (net.unix.max_dgram_qlen 10)
    sender = subprocess.run(  # a program that stores its listeners and dies
        [sys.executable, "-c", "import os, socket, sys\n"
         "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(sys.argv[1])\n"
         "for i, fd in enumerate(sys.argv[2:]):\n"
         "    s.sendmsg([f'FDSTORE=1\\nFDNAME=s{i}'.encode()], "
         "[(socket.SOL_SOCKET, socket.SCM_RIGHTS, int(fd).to_bytes(4, sys.byteorder))])\n",
         info["socket"], *(str(s.fileno()) for s in socks)],
        pass_fds=[s.fileno() for s in socks], timeout=30)
    assert sender.returncode == 0
    assert "event=fault_fired side=fdstore step=read" in cluster.logs()
    assert store_of(cluster, "web") == []  # nothing was read: all eight are queued
    with cluster.client() as c:
        info, fds = c.fdstore_open("web")
    try:
        assert info["fdnames"] == [f"s{i}" for i in reversed(range(8))]
        got = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds}
        assert got == {(os.fstat(s.fileno()).st_dev, os.fstat(s.fileno()).st_ino) for s in socks}
    finally:
        for fd in fds:
            os.close(fd)
        for s in socks:
            s.close()
    assert src.poll() is None


@needs_libsystemd
def test_barrier_closes_its_fd_and_a_malformed_barrier_is_refused_whole(cluster, web):
    src, info = web
    t0 = time.monotonic()
    for _ in range(20):
        assert sd.barrier(timeout_s=5) > 0
    assert time.monotonic() - t0 < 10  # each returned as soon as the daemon closed its fd
    base = num_fds(src.pid)
    # BARRIER=1 with another tag, or with two fds: nothing is done and every fd is closed
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(info["socket"])
        _send(s, b"BARRIER=1\nFDSTORE=1", [w1])
        _send(s, b"BARRIER=1", [w2, w2])
    os.close(w1)
    os.close(w2)
    for r in (r1, r2):  # every write end closed: the read end sees EOF
        assert _eof_within(r, 5)
        os.close(r)
    assert store_of(cluster, "web") == [] and settled_fds(src.pid, base) == base


def _send(s: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    s.sendmsg([data], anc)


def _eof_within(fd: int, seconds: float) -> bool:
    import select

    r, _, _ = select.select([fd], [], [], seconds)
    return bool(r) and os.read(fd, 1) == b""


# -- bad input ---------------------------------------------------------------------------------------
def test_garbage_junk_fds_bad_names_and_a_flood_are_dropped_without_a_leak(cluster):
    src = cluster.source("eventfds=2")
    with cluster.client() as c:
        path = c.fdstore("web", "socket")["socket"]
        before = c.ls()
    base = num_fds(src.pid)
    junk = [os.open("/dev/null", os.O_RDONLY) for _ in range(253)]
    pr, pw = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        _send(s, b"\xff\xfe garbage \x00\x01" * 10, [pr])  # NUL inside: dropped, fd closed
        _send(s, b"READY=1\nSTATUS=hello", junk)  # 253 fds without FDSTORE=1: closed
        _send(s, b"FDSTORE=1\nFDNAME=has:colon", [pr])  # invalid name: stored as "stored"
        _send(s, b"FDSTORE=1\nFDNAME=" + b"n" * 256, [pw])  # too long: "stored" too, a different pipe end
        _send(s, b"A" * 5000, [pr])  # over 4096 bytes: dropped whole
        _send(s, b"FDSTORE=1\nFDNAME=\x07bell", [pr])  # a control character: invalid (and pr is stored already)
        for i in range(3000):  # a flood of junk with an fd each
            try:
                _send(s, b"X_FLOOD=%d\nWATCHDOG=1\nSTOPPING=1" % i, [junk[i % 253]])
            except BlockingIOError:
                time.sleep(0.001)
    for fd in junk:
        os.close(fd)
    for fd in (pr, pw):
        os.close(fd)
    with Client(cluster.control) as c:
        deadline = time.monotonic() + 30
        while c.status().get("fdstore", {}).get("web", {}).get("status") != "hello" and time.monotonic() < deadline:
            time.sleep(0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # a barrier: everything before it is handled
        s.connect(path)
        r, w = os.pipe()
        _send(s, b"BARRIER=1", [w])
        os.close(w)
        assert _eof_within(r, 30)
        os.close(r)
    rows = store_of(cluster, "web")
    assert sorted(r["fdname"] for r in rows) == ["stored", "stored"]
    assert settled_fds(src.pid, base + 2) == base + 2, "every fd not stored was closed"
    with cluster.client() as c:
        assert c.status()["fdstore"]["web"]["status"] == "hello"
        assert [e for e in c.ls() if e["name"] != "fdstore/web"] == [e for e in before if e["name"] != "fdstore/web"]
    logs = cluster.logs()
    assert "reason='embedded NUL bytes'" in logs and "over the maximum size" in logs
    assert "253 fds sent without FDSTORE=1" in logs
    assert logs.count("event=fdstore_notice") < 100, "a flood is logged at most once a second for each kind"


@pytest.mark.requires("root")
def test_a_sender_of_an_unlisted_uid_is_refused_and_its_fds_closed(cluster):
    """A store's notify socket is its owner's file, mode 0600: nobody cannot even send to it. Made
    reachable (as a careless operator might), the sender's SCM_CREDENTIALS still decide: nobody is
    not allowed here."""
    d = tempfile.mkdtemp(prefix="cprd-fdstore-", dir="/tmp")  # a directory others may pass through
    os.chmod(d, 0o711)
    cluster.keep(_Removed(d))
    control = os.path.join(d, "control.sock")
    from cprd.tools.procs import wait_for_socket

    src = cluster.spawn("source", "--control", control, "--populate", "eventfds=1", "--allow-uid", "daemon")
    wait_for_socket(control, src)
    with Client(control) as c:
        path = c.fdstore("web", "socket")["socket"]
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path).st_uid == 0
    os.chmod(path, 0o666)
    os.chmod(os.path.dirname(path), 0o711)
    base = num_fds(src.pid)
    nobody = pwd.getpwnam("nobody")
    script = ("import array, os, socket, sys\n"
              "r, w = os.pipe()\n"
              "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(sys.argv[1])\n"
              "s.sendmsg([b'FDSTORE=1\\nFDNAME=evil'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, "
              "array.array('i', [r, w]).tobytes())])\n"
              "print('sent')\n")
    r = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                        SYSTEM_PYTHON, "-c", script, path], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "sent", r.stderr
    deadline = time.monotonic() + 10
    while "event=fdstore_refused app=web" not in cluster.logs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f"uid={nobody.pw_uid}" in cluster.logs()
    with Client(control) as c:
        assert c.fdstore("web", "list") == []
    assert settled_fds(src.pid, base) == base


@pytest.mark.requires("root")
def test_the_notify_socket_of_a_private_daemon_is_out_of_reach_of_other_users(cluster):
    cluster.source("eventfds=1")
    with cluster.client() as c:
        path = c.fdstore("web", "socket")["socket"]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    nobody = pwd.getpwnam("nobody")
    script = ("import socket, sys\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
              "try:\n    s.connect(sys.argv[1]); print('reached')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    r = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                        SYSTEM_PYTHON, "-c", script, path], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "PermissionError", (r.stdout, r.stderr)


def test_store_entries_are_not_for_put_and_del(cluster):
    cluster.source("eventfds=1")
    r = cluster.ctl("put", "fdstore/web", "0", "--path", "/dev/null", "--flags", "r")
    assert r.returncode == 2 and "belong to the fd store of app 'web'" in r.stderr, r.stderr
    r = cluster.ctl("del", "fdstore/web", "-1")
    assert r.returncode == 2 and "cprd ctl fdstore web" in r.stderr, r.stderr


class _Removed:
    def __init__(self, path: str) -> None:
        self.path = path

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- the command line -----------------------------------------------------------------------------------
def test_run_and_ctl_fdstore_errors_are_clear(cluster, tmp_path):
    cluster.source("eventfds=1")
    r = run(cluster, "bad:name", "true")
    assert r.returncode == 2 and "app name 'bad:name' must be" in r.stderr, r.stderr
    r = run(cluster, "web")
    assert r.returncode == 2 and "cprd run needs a command" in r.stderr
    r = run(cluster, "web", "true", extra=("--fdstore-max", "-1"))
    assert r.returncode == 2 and "outside 0..65536" in r.stderr
    r = run(cluster, "web", "/nonexistent/program")
    assert r.returncode == 127 and "cannot run '/nonexistent/program'" in r.stderr
    r = run(cluster, "web", "sh", "-c", "exit 7")
    assert r.returncode == 7, "the program's exit status is passed through"
    r = run(cluster, "web", "true", env={"CPRD_CONTROL": str(tmp_path / "nobody-here.sock")})
    assert r.returncode == 1 and r.stderr.startswith("cprd: error:") and "Traceback" not in r.stderr, r.stderr
    r = cluster.ctl("fdstore", "never-made")
    assert r.returncode == 2 and "no fd store for app 'never-made'" in r.stderr
    r = cluster.ctl("fdstore", "web", "--clean", "--socket")
    assert r.returncode == 2 and "do not go together" in r.stderr


@needs_libsystemd
def test_ctl_fdstore_lists_like_systemd_analyze_and_cleans(cluster, web):
    src, _ = web
    base = num_fds(src.pid)
    path = cluster.dir / "data"
    path.write_text("x")
    f = os.open(path, os.O_WRONLY)
    s = _listener()
    sd.notify("FDSTORE=1\nFDNAME=data", [f])
    sd.notify("FDSTORE=1\nFDNAME=sock", [s.fileno()])
    sd.barrier()
    os.close(f)
    s.close()
    r = cluster.ctl("fdstore", "web")
    assert r.returncode == 0
    head, *lines = r.stdout.splitlines()
    assert head.split() == ["FDNAME", "TYPE", "DEVNO", "INODE", "RDEVNO", "PATH", "FLAGS"]
    assert lines[0].split()[0] == "sock" and lines[1].split()[0] == "data"
    rows = json.loads(cluster.ctl("fdstore", "web", "--json").stdout)
    st = os.stat(path)
    assert rows[1]["path"] == str(path) and rows[1]["ino"] == st.st_ino and rows[1]["access"] == "wo"
    assert rows[1]["dev"] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" and rows[1]["rdev"] is None
    r = cluster.ctl("fdstore", "web", "--clean")
    assert r.returncode == 0 and "removed 2 fds" in r.stdout
    assert store_of(cluster, "web") == [] and settled_fds(src.pid, base) == base


@needs_libsystemd
def test_run_raises_a_low_soft_fd_limit_to_fit_the_store_and_refuses_past_the_hard_one(cluster, web):
    import resource

    src, _ = web
    evs = [os.eventfd(0) for _ in range(150)]
    for i in range(0, 150, 50):
        sd.notify("FDSTORE=1\nFDNAME=ev", evs[i:i + 50])
    sd.barrier()
    for fd in evs:
        os.close(fd)

    def limit(soft, hard):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    e = {**os.environ, "CPRD_CONTROL": cluster.control}
    cmd = [sys.executable, "-m", "cprd", "run", "--name", "web", "--", sys.executable, "-c", sd.LISTEN_PROGRAM]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=60, preexec_fn=limit(64, 4096))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 150
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=60, preexec_fn=limit(64, 100))
    assert r.returncode == 1 and "holds 150 fds but this process may open at most 100" in r.stderr, r.stderr
    assert len(store_of(cluster, "web")) == 150


# -- other real clients ---------------------------------------------------------------------------------
@pytest.mark.requires("python3-systemd")
def test_python3_systemd_stores_and_gets_back(cluster):
    cluster.source("eventfds=1")
    program = ("import os, socket, json\n"
               "from systemd import daemon\n"
               "got = daemon.listen_fds_with_names(unset_environment=False)\n"
               "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
               "ok = daemon.notify('FDSTORE=1\\nFDNAME=py%d' % len(got), fds=[s.fileno()])\n"
               "print(json.dumps({'got': {str(k): v for k, v in got.items()}, 'ok': ok,\n"
               "                  'port': s.getsockname()[1],\n"
               "                  'ports': [socket.socket(fileno=os.dup(k)).getsockname()[1] for k in got]}))\n")
    outs = []
    for _ in range(3):
        r = run(cluster, "py", SYSTEM_PYTHON, "-c", program)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    assert all(o["ok"] for o in outs)
    assert outs[0]["got"] == {} and outs[1]["got"] == {"3": "py0"}
    assert outs[2]["got"] == {"3": "py1", "4": "py0"}
    assert outs[2]["ports"] == [outs[1]["port"], outs[0]["port"]], "the very listening sockets, newest first"


@pytest.mark.requires("systemd-notify")
def test_systemd_notify_ready_returns_within_a_second(cluster):
    cluster.source("eventfds=1")
    t0 = time.monotonic()
    r = run(cluster, "notify", "systemd-notify", "--ready", "--status=up")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < 10  # generous here; the benchmark measures it
    with cluster.client() as c:
        deadline = time.monotonic() + 5
        while c.status()["fdstore"]["notify"]["status"] != "up" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.status()["fdstore"]["notify"]["status"] == "up"


# -- across handoffs and upgrades -----------------------------------------------------------------------
@needs_libsystemd
@pytest.mark.parametrize("how", ["handoff", "upgrade"])
def test_the_same_socket_keeps_receiving_across_a_handoff_or_an_upgrade_and_nothing_is_lost(cluster, web, how):
    """A sender that connected its datagram socket once keeps sending through a handoff and an
    upgrade, and every message it sent, during the freeze too, is handled by some owner."""
    src, info = web
    # The sender goes on for as long as the handoff or upgrade takes (on a busy machine, seconds):
    # room for every message it can send, so that the store's limit never decides what is kept.
    most = 8000
    with cluster.client() as c:
        assert c.fdstore("web", "socket", most)["max"] == most
    sock_ino = os.stat(info["socket"]).st_ino
    kept = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    kept.connect(info["socket"])
    kept.settimeout(20)  # a full queue nobody reads (no owner took the store up) fails the send, never hangs
    sent, stop, errors = [], threading.Event(), []

    def sender() -> None:
        i = 0
        while not stop.is_set() and i < most:
            r, w = os.pipe()
            try:
                _send(kept, b"FDSTORE=1\nFDPOLL=0\nFDNAME=n%d" % i, [r])
                sent.append(i)
            except OSError as e:
                errors.append(repr(e))
                return
            finally:
                os.close(r)
                os.close(w)
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=sender)
    t.start()
    try:
        time.sleep(0.3)
        if how == "handoff":
            tgt, listen = cluster.target()
            with cluster.client() as c:
                assert c.handoff(listen)["entries"] > 0
            owner = tgt.pid
        else:
            r = cluster.ctl("upgrade", "--json")
            assert r.returncode == 0, r.stderr
            owner = src.pid
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert not errors and len(sent) > 50  # (a send that failed: nobody reads the socket; libsystemd would block)
    sd.barrier(timeout_s=30)  # libsystemd's own socket, to the same path
    r_, w_ = os.pipe()  # and a barrier on the socket connected before it all
    _send(kept, b"BARRIER=1", [w_])
    os.close(w_)
    assert _eof_within(r_, 30)
    os.close(r_)
    kept.close()
    assert not errors and len(sent) > 50
    names = {r["fdname"] for r in store_of(cluster, "web")}
    assert names == {f"n{i}" for i in sent}, "every message sent was handled once"
    assert os.stat(info["socket"]).st_ino == sock_ino, "the same socket file"
    with cluster.client() as c:
        st = c.status()
        assert st["pid"] == owner and st["fdstore"]["web"]["fds"] == len(sent)
    got = listened(cluster, "web")
    assert got["n"] == len(sent) and got["fds"][0]["name"] == f"n{sent[-1]}"


@needs_libsystemd
def test_names_and_poll_choices_survive_handoff_and_upgrade(cluster, web):
    src, info = web
    r1, w1 = os.pipe()
    s = _listener()
    sd.notify("FDSTORE=1\nFDNAME=pipe", [r1])
    sd.notify("FDSTORE=1\nFDNAME=keep\nFDPOLL=0", [s.fileno()])
    sd.barrier()
    os.close(r1)
    tgt, listen = cluster.target()
    with cluster.client() as c:
        c.handoff(listen)
    assert cluster.ctl("upgrade").returncode == 0
    rows = store_of(cluster, "web")
    assert [(r["fdname"], r["poll"]) for r in rows] == [("keep", False), ("pipe", True)]
    os.close(w1)  # the new owner watches what the old one watched
    deadline = time.monotonic() + 10
    while len(store_of(cluster, "web")) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r["fdname"] for r in store_of(cluster, "web")] == ["keep"]
    got = listened(cluster, "web")
    assert got["n"] == 1 and got["fds"][0]["ino"] == os.fstat(s.fileno()).st_ino
    s.close()
    with cluster.client() as c:
        assert c.status()["pid"] == tgt.pid


# -- the rules, without I/O ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,ok", [("", True), ("stored", True), ("a b~", True), ("x" * 255, True),
                                     ("x" * 256, False), ("a:b", False), ("tab\t", False), ("\x7f", False),
                                     ("é", False)])
def test_fdname_rules_are_systemds(name, ok):
    assert fs.fdname_is_valid(name) is ok


def test_decide_follows_systemds_precedence():
    n = fs.parse(b"FDSTORE=1\nFDNAME=a\nFDNAME=b\n", 0, 1)
    d = fs.decide(n, 2)
    assert d.store and d.name == "a" and d.poll  # the first FDNAME= wins
    d = fs.decide(fs.parse(b"FDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=a", 0, 1), 1)
    assert d.remove == "a" and not d.store and d.warnings  # remove wins; the fd is closed
    d = fs.decide(fs.parse(b"FDSTORE=1\r\nFDPOLL=0\r\nFDNAME=bad:name", 0, 1), 1)
    assert d.store and d.name == "stored" and not d.poll
    d = fs.decide(fs.parse(b"BARRIER=1", 0, 1), 1)
    assert d.barrier and not d.warnings
    assert fs.parse(b"FDSTORE=1", socket.MSG_CTRUNC, 1) == "truncated control data (too many fds sent?)"
    assert fs.parse(b"FDSTORE=1", 0, None) == "no valid credentials"
    assert fs.parse(b"FDSTORE=1\x00\nX=1", 0, 1) == "embedded NUL bytes"
    assert isinstance(fs.parse(b"FDSTORE=1\x00", 0, 1), fs.Notice)  # a trailing NUL is allowed
    assert isinstance(fs.parse(b"x" * 4096, 0, 1), fs.Notice)
    assert fs.parse(b"x" * 4097, 0, 1) == "over the maximum size (4096 bytes)"
    assert fs.decide(fs.parse("STATUS=héllo\nREADY=1".encode(), 0, 1), 0).status == "héllo"
    d = fs.decide(fs.parse(b"STATUS=\xff\xfe", 0, 1), 0)
    assert d.status is None and d.warnings == ["STATUS= is not UTF-8, ignoring it"]
    assert fs.decide(fs.parse(b"STATUS=", 0, 1), 0).status == ""  # clears what was shown


def test_the_names_log_replays_after_a_write_cut_short_and_ignores_lines_that_break_the_rules():
    log = (fs.Log.line_max(7) + fs.Log.line_status("up é") + fs.Log.line_store(0, True, "a b")
           + fs.Log.line_store(1, False, "") + fs.Log.line_remove(0)
           + b"S 3 1 \xff\n"  # not ASCII
           + b"S 4 1 has:colon\n" + b"S -5 1 neg\n" + b"S 6 2 badpoll\n"  # not an fd name, a bad id, a bad poll
           + b"M 99999999\n" + b"P /tmp/evil.sock\n" + b"T [1]\n" + b"Z what\n"  # past the cap, unknown lines
           + b"S 2 1")  # cut short
    meta, lines = fs.Log.replay(log)
    assert meta.max == 7 and meta.names == {1: ("", False)} and meta.status == "up é" and meta.path == ""
    assert lines == 14
    again, _ = fs.Log.replay(fs.Log.compact(meta))
    assert again == meta
    # cprd serve's record: the last valid one counts; one that breaks check_report's rules is ignored
    gen = {"gen": 1, "pid": 4321, "ticks": 99, "started": 1.5, "ready": True, "state": "ready"}
    good = {"token": "t" * 16, "pid": 1234, "generations": [gen]}
    log = (fs.Log.line_serve(good) + fs.Log.line_serve({**good, "token": "short"})
           + fs.Log.line_serve({**good, "generations": [{**gen, "state": "evil" * 100}]})
           + fs.Log.line_serve({**good, "generations": [{**gen, "pid": "1"}]}) + b"V {\n" + b"V [1]\n")
    meta, _ = fs.Log.replay(log)
    assert meta.serve == good
    again, _ = fs.Log.replay(fs.Log.compact(meta))
    assert again == meta


@needs_libsystemd
def test_a_stores_own_socket_and_names_are_never_handed_out(cluster, web):
    r = cluster.ctl("get", "fdstore/web", "-1")
    assert r.returncode == 2 and "the fd store's own notify socket; it is not handed out" in r.stderr, r.stderr
    r = cluster.ctl("get", "fdstore/web", "-2")
    assert r.returncode == 2 and "the fd store's own record of names" in r.stderr, r.stderr
    s = _listener()
    sd.notify("FDSTORE=1\nFDNAME=one", [s.fileno()])
    sd.barrier()
    r = cluster.ctl("get", "fdstore/web", "0", "--json")  # a stored fd is an entry like any other
    assert r.returncode == 0 and json.loads(r.stdout)["fdname"] == "one", r.stderr
    s.close()


@needs_libsystemd
def test_remove_takes_the_whole_store_away_and_run_makes_a_new_one(cluster, web):
    src, info = web
    with cluster.client() as c:
        c.fdstore("other", "socket")
    base = num_fds(src.pid)
    socks = [_listener() for _ in range(3)]
    sd.notify("FDSTORE=1\nFDNAME=x", [s.fileno() for s in socks])
    sd.barrier()
    assert settled_fds(src.pid, base + 3) == base + 3
    r = cluster.ctl("fdstore", "web", "--remove")
    assert r.returncode == 0 and "removed the store of web (3 fds" in r.stdout, r.stderr
    assert not os.path.exists(info["socket"])
    assert settled_fds(src.pid, base - 2) == base - 2, "the stored fds, the socket and the names are closed"
    with cluster.client() as c:
        assert "web" not in c.status()["fdstore"] and "other" in c.status()["fdstore"]
        assert not [e for e in c.ls() if e["name"] == "fdstore/web"]
    r = cluster.ctl("fdstore", "web")
    assert r.returncode == 2 and "no fd store for app 'web'" in r.stderr
    with pytest.raises(OSError):
        sd.notify("FDSTORE=1", [socks[0].fileno()])
    got = listened(cluster, "web")  # a new, empty store at the same path
    assert got["n"] == 0 and got["env"]["NOTIFY_SOCKET"] == info["socket"]
    for s in socks:
        s.close()


@needs_libsystemd
def test_status_persists_across_an_upgrade(cluster, web):
    sd.notify("READY=1\nSTATUS=warming up")
    sd.barrier()
    assert cluster.ctl("upgrade").returncode == 0
    with cluster.client() as c:
        assert c.status()["fdstore"]["web"]["status"] == "warming up"


@needs_libsystemd
def test_a_handoff_whose_target_dies_before_it_confirms_leaves_the_store_whole(cluster, web):
    """The target takes up the stores only once it confirmed: one that dies before leaves the
    shared names untouched, and the source goes on with every name and FDPOLL choice."""
    src, _ = web
    s1, s2 = _listener(), _listener()
    sd.notify("FDSTORE=1\nFDNAME=one\nFDPOLL=0", [s1.fileno()])
    sd.barrier()
    tgt, listen = cluster.target(env={"CPRD_FAULT": "target:commit"})
    with cluster.client() as c:
        with pytest.raises(HandoffError, match="the source keeps every entry"):
            c.handoff(listen)
    assert tgt.wait(30) == -signal.SIGKILL
    assert "event=fault_fired side=target step=commit" in cluster.logs()
    sd.notify("FDSTORE=1\nFDNAME=two", [s2.fileno()])
    sd.barrier()
    assert cluster.ctl("upgrade").returncode == 0  # the new program reads the names back
    rows = store_of(cluster, "web")
    assert [(r["fdname"], r["poll"]) for r in rows] == [("two", True), ("one", False)]
    with cluster.client() as c:
        assert c.status()["fdstore"]["web"]["socket"] and c.status()["pid"] == src.pid
    s1.close()
    s2.close()
