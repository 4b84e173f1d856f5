"""The control socket and `cprd ctl`, against a real daemon: every command, every user error."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import select
import socket
import stat
import subprocess
import sys

import pytest

from cprd import scm
from cprd.errors import BadFd, BadKey, ControlError, KeyExists, KeyMissing
from cprd.protocol import control as cp
from helpers import num_fds, settled_fds


def test_put_get_del_ls_status_with_the_cli(cluster, tmp_path):
    src = cluster.source()
    f = tmp_path / "data.bin"
    f.write_bytes(b"0123456789")
    r = cluster.ctl("put", "disk", 7, "--path", str(f), "--flags", "r", "--json")
    assert r.returncode == 0, r.stderr
    put = json.loads(r.stdout)
    assert put["name"] == "disk" and put["id"] == 7 and put["kind"] == "file"
    assert put["ino"] == os.stat(f).st_ino

    ev = os.eventfd(5, os.EFD_CLOEXEC)
    os.set_inheritable(ev, True)
    try:
        r = cluster.ctl("put", "irq", -3, "--fd", str(ev), "--json", pass_fds=(ev,))
    finally:
        os.close(ev)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "eventfd"

    ls = json.loads(cluster.ctl("ls", "--json", check=True).stdout)
    assert [(e["name"], e["id"], e["kind"]) for e in ls] == [("disk", 7, "file"), ("irq", -3, "eventfd")]
    assert all(isinstance(e["fd"], int) and e["fd"] > 2 for e in ls)

    st = json.loads(cluster.ctl("status", "--json", check=True).stdout)
    assert st["pid"] == src.pid and st["role"] == "source" and st["entries"] == 2
    assert st["by_kind"] == {"file": 1, "eventfd": 1}
    assert st["fd_limit"] > 0 and st["open_fds"] > 2

    got = json.loads(cluster.ctl("get", "disk", 7, "--json", check=True).stdout)
    assert got["ino"] == put["ino"] and got["kind"] == "file"

    r = cluster.ctl("del", "disk", 7, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["deleted"] is True
    assert cluster.ctl("get", "disk", 7).returncode == 1
    human = cluster.ctl("ls", check=True).stdout
    assert "irq" in human and "disk" not in human


def test_get_exec_passes_the_fd_as_systemd_does(cluster, tmp_path):
    cluster.source()
    f = tmp_path / "payload"
    f.write_bytes(b"hello from cprd")
    assert cluster.ctl("put", "payload", 1, "--path", str(f), "--flags", "r").returncode == 0
    script = ("import os; assert os.environ['LISTEN_PID'] == str(os.getpid()); "
              "print(os.environ['LISTEN_FDS'], os.environ['LISTEN_FDNAMES'], os.pread(3, 100, 0).decode())")
    r = cluster.ctl("get", "payload", 1, "--exec", sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1 payload hello from cprd"


def test_user_errors_are_clear_and_change_nothing(cluster, tmp_path):
    src = cluster.source("eventfds=5")
    with cluster.client() as c:
        before = c.ls()
    base = num_fds(src.pid)
    f = tmp_path / "x"
    f.write_text("x")
    cases = [
        (("put", "eventfd", 0, "--path", str(f)), 1, "already holds"),
        (("put", "bad\x01name", 0, "--path", str(f)), 1, "control character"),
        (("put", "n" * 256, 0, "--path", str(f)), 1, "1 to 255 bytes"),
        (("put", "big", 2**31, "--path", str(f)), 1, "signed 32-bit"),
        (("get", "nope", 1), 1, "no entry"),
        (("del", "nope", 1), 1, "no entry"),
        (("put", "x", 1), 2, "exactly one of --path"),
        (("put", "x", 1, "--fd", "999"), 2, "not an open fd"),
        (("put", "x", 1, "--path", str(tmp_path / "missing"), "--flags", "r"), 2, "cannot open"),
        (("handoff", "--to", str(tmp_path / "nobody.sock")), 1, "cannot reach a target"),
        (("handoff", "--to", str(tmp_path / "t.sock"), "--batch", "254"), 2, "1..253"),
        (("handoff", "--to", "/" + "x" * 120), 2, "limited to 107"),
        (("get", "eventfd", 0, "--exec"), 2, "--exec needs a command"),
        (("put", "x", 1, "--path", str(tmp_path / "typo")), 2, "no such file; check the path, or pass --create"),
        (("put", "x", 1, "--fd", "0", "--create"), 2, "go with --path"),
        (("put", "x", 1, "--path", str(tmp_path / "new"), "--create", "--flags", "r"), 2, "--create makes"),
        (("put", "evil\u202egnp.exe", 1, "--path", str(f)), 1, "U+202E"),
        (("put", "zero\u200bwidth", 1, "--path", str(f)), 1, "U+200B"),
    ]
    for args, code, text in cases:
        r = cluster.ctl(*map(str, args))
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("cprd: error: ")
    assert src.poll() is None
    with cluster.client() as c:
        assert c.ls() == before
    assert settled_fds(src.pid, base) == base
    assert not (tmp_path / "typo").exists() and not (tmp_path / "new").exists(), "no file made by a typo"


def test_put_opens_without_waiting_and_creates_only_when_asked(cluster, tmp_path):
    src = cluster.source()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # (a put answers at once or not at all: 15 s is ample on a busy machine, and a hang fails fast)
    r = cluster.ctl("put", "fifo", 0, "--path", str(fifo), "--flags", "r", timeout=15)  # no writer: used to hang
    assert r.returncode == 0, r.stderr
    r = cluster.ctl("put", "fifo", 1, "--path", str(fifo), "--flags", "w", timeout=15)  # no reader: ours is in it
    assert r.returncode == 0, r.stderr
    other = tmp_path / "fifo2"
    os.mkfifo(other)
    r = cluster.ctl("put", "fifo", 2, "--path", str(other), "--flags", "w", timeout=15)
    assert r.returncode == 2 and "a FIFO that nobody reads" in r.stderr
    made = tmp_path / "made"
    r = cluster.ctl("put", "made", 0, "--path", str(made), "--create")
    assert r.returncode == 0 and stat.S_IMODE(os.stat(made).st_mode) == 0o600
    with cluster.client() as c:
        info, fd = c.get("fifo", 0)
        try:  # stored as opened normally: blocking, read-only
            assert not fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_NONBLOCK | os.O_WRONLY | os.O_RDWR)
        finally:
            os.close(fd)
        assert {(e["name"], e["id"]) for e in c.ls()} == {("fifo", 0), ("fifo", 1), ("made", 0)}
    assert src.poll() is None


def test_populate_is_checked_before_anything_is_made(tmp_path):
    control = str(tmp_path / "c.sock")
    r = subprocess.run([sys.executable, "-m", "cprd", "source", "--control", control, "--populate",
                        "files=5,files=6"], capture_output=True, text=True, timeout=15)
    assert r.returncode == 2 and "names files twice" in r.stderr
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    r = subprocess.run([sys.executable, "-m", "cprd", "source", "--control", control, "--populate",
                        f"eventfds={soft - 70}"], capture_output=True, text=True, timeout=15)
    assert r.returncode == 1 and "a target with the same fd limit could take over at most" in r.stderr
    # One fd more than a target with the same limit could take, though this process could open it: refused
    # for the target's sake alone (a limit of 1024 keeps the daemon small should it wrongly start).
    from cprd.handoff import table_limit

    def limit_1024() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    most = table_limit(1024)
    r = subprocess.run([sys.executable, "-m", "cprd", "source", "--control", control, "--populate",
                        f"eventfds={most + 1}"], capture_output=True, text=True, timeout=30, preexec_fn=limit_1024)
    assert r.returncode == 1 and f"could take over at most {most} (RLIMIT_NOFILE 1024" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_names_that_hide_text_are_shown_escaped():
    from cprd.cli import _shown

    assert _shown("vfio/0001") == "vfio/0001"
    assert _shown("evil\u202egnp.exe") == "evil\\u202egnp.exe"
    assert _shown("tab\there") == "tab\\there"


def test_epoll_fds_are_refused_with_a_reason(cluster):
    src = cluster.source()
    base = num_fds(src.pid)
    ep = select.epoll()
    try:
        with cluster.client() as c:
            with pytest.raises(BadFd, match="epoll"):
                c.put("poller", 0, ep.fileno())
            assert c.ls() == []
    finally:
        ep.close()
    assert settled_fds(src.pid, base) == base


def test_client_library_errors(cluster):
    cluster.source()
    with cluster.client() as c:
        ev = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            c.put("e", 1, ev)
            with pytest.raises(KeyExists):
                c.put("e", 1, ev)
            with pytest.raises(BadKey):
                c.put("", 1, ev)
            info = c.put("e", 1, ev, replace=True)
            assert info["kind"] == "eventfd"
        finally:
            os.close(ev)
        with pytest.raises(KeyMissing):
            c.get("e", 2)
        assert len(c.ls()) == 1


def _raw(control: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(control)
    return s


GARBAGE = [
    b"x",
    b"not a frame at all, but long enough",
    b"CPRX" + bytes(8),
    b"CPRC\x01\x01\x00\x00\xff\xff\x00\x00{}",  # length lies
    b"CPRC\x09\x01\x00\x00\x02\x00\x00\x00{}",  # future version
    cp.encode_request("ls")[:-1],  # truncated
    b"CPRC\x01\x01\x00\x00\x02\x00\x00\x00[]",  # not an object
    b"CPRC\x01\x01\x00\x00\x02\x00\x00\x00\xff\xfe",  # not UTF-8
    cp.encode_request("launch"),
    cp.encode_request("get", name="a"),
    cp.encode_request("get", name="a", id="one"),
    cp.encode_request("ls", extra=1),
    b"CPRC\x01\x01\x00\x00" + (70000).to_bytes(4, "little") + b"{" * 70000,  # over the frame limit
]


@pytest.mark.parametrize("with_fds", [0, 1, 3])
def test_garbage_on_the_control_socket(cluster, with_fds):
    src = cluster.source("files=3")
    base = num_fds(src.pid)
    for g in GARBAGE:
        s = _raw(cluster.control)
        evs = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(with_fds)]
        try:
            scm.send_sync(s, g, evs)
        finally:
            for ev in evs:
                os.close(ev)
        data, fds = scm.recv_sync(s, cp.MAX_FRAME, 1)
        fds.close()
        reply = cp.ReplyReader().feed(data)
        assert reply["ok"] is False and reply["message"], g
        s.close()
    assert src.poll() is None
    assert settled_fds(src.pid, base) == base, "no fd that arrived with a bad frame stays open"
    with cluster.client() as c:
        assert c.status()["entries"] == 3


def test_put_with_the_wrong_number_of_fds(cluster):
    src = cluster.source()
    base = num_fds(src.pid)
    s = _raw(cluster.control)
    scm.send_sync(s, cp.encode_request("put", name="a", id=1), [])
    data, fds = scm.recv_sync(s, cp.MAX_FRAME, 1)
    reply = cp.ReplyReader().feed(data)
    assert not reply["ok"] and "expected 1" in reply["message"]
    ev = os.eventfd(0)
    scm.send_sync(s, cp.encode_request("ls"), [ev])
    os.close(ev)
    reply = cp.ReplyReader().feed(scm.recv_sync(s, cp.MAX_FRAME, 1)[0])
    assert not reply["ok"] and "expected 0" in reply["message"]
    s.close()
    assert settled_fds(src.pid, base) == base


def test_control_socket_is_private_and_never_stolen(cluster, tmp_path):
    cluster.control = str(tmp_path / "made-by-cprd" / "control.sock")  # a directory cprd creates itself
    src = cluster.source()
    st = os.stat(cluster.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(cluster.control)).st_mode) == 0o700
    # a second daemon on the same path refuses and names the owner
    r = subprocess.run([sys.executable, "-m", "cprd", "source", "--control", cluster.control],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 1 and f"another cprd serves {cluster.control}, cprd pid {src.pid}" in r.stderr
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid


def test_stale_socket_is_replaced_and_new_dirs_are_private(cluster, tmp_path):
    d = tmp_path / "run" / "cprd"
    d.parent.mkdir(mode=0o700)
    path = str(d / "control.sock")
    os.mkdir(d, 0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(path)  # bound, never listening, then closed: what a crashed daemon leaves
    stale.close()
    cluster.control = path
    src = cluster.source()
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid
    # a directory other users could write to is refused
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    r = subprocess.run([sys.executable, "-m", "cprd", "source", "--control", str(open_dir / "c.sock")],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 2 and "writable by other users" in r.stderr
    # a missing directory is created 0700
    fresh = tmp_path / "fresh" / "control.sock"
    cluster.control = str(fresh)
    cluster.source()
    assert stat.S_IMODE(os.stat(fresh.parent).st_mode) == 0o700


def test_control_path_from_the_environment_and_the_flag(cluster, tmp_path):
    src = cluster.source()
    r = subprocess.run([sys.executable, "-m", "cprd", "ctl", "status", "--json"], capture_output=True, text=True,
                       env={**os.environ, "CPRD_CONTROL": cluster.control}, timeout=15)
    assert json.loads(r.stdout)["pid"] == src.pid
    r = subprocess.run([sys.executable, "-m", "cprd", "ctl", "status", "--json", "--control", cluster.control],
                       capture_output=True, text=True, env={**os.environ, "CPRD_CONTROL": "/nonexistent/x.sock"},
                       timeout=15)
    assert json.loads(r.stdout)["pid"] == src.pid
    r = subprocess.run([sys.executable, "-m", "cprd", "ctl", "status"], capture_output=True, text=True,
                       env={**os.environ, "CPRD_CONTROL": str(tmp_path / "none.sock")}, timeout=15)
    assert r.returncode == 1 and "no cprd serves" in r.stderr


def test_no_daemon_gives_a_clear_error(tmp_path):
    from cprd.client import Client

    with pytest.raises(ControlError, match="no cprd serves"):
        Client(str(tmp_path / "none.sock")).status()


def test_socket_path_too_long_is_a_clear_error(tmp_path):
    path = str(tmp_path / ("a" * (100 - len(str(tmp_path)))))
    r = subprocess.run([sys.executable, "-m", "cprd", "source", "--control", path], capture_output=True, text=True,
                       timeout=15)
    assert r.returncode == 2 and "at most 95" in r.stderr and "Traceback" not in r.stderr
    assert not os.listdir(tmp_path)


def test_a_daemon_that_never_answers_is_a_clear_error(tmp_path):
    from cprd.client import Client

    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mute.bind(path)
    mute.listen(1)  # accepts into the backlog, never reads, never answers
    try:
        with pytest.raises(ControlError, match="no answer from the daemon within"):
            Client(path, timeout=0.3, retry_for=0).status()
    finally:
        mute.close()


def test_a_control_path_that_is_not_utf8_is_refused_clearly(tmp_path):
    d = os.path.join(os.fsencode(tmp_path), b"d\xff")
    os.mkdir(d, 0o700)
    r = subprocess.run([sys.executable, "-m", "cprd", "source", "--control", os.path.join(d, b"control.sock")],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 2 and "is not valid UTF-8" in r.stderr and "Traceback" not in r.stderr, r.stderr
