"""No path another user controls, no peer another user runs: real daemons as root, the other user
(nobody) played by real processes, judged by the kernel (/proc, file modes, what arrived where)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from cprd.client import Client
from cprd.errors import CprdError, Denied, UntrustedPeer
from cprd.tools.procs import wait_for_socket
from helpers import num_fds, settled_fds, snapshot

pytestmark = pytest.mark.requires("root")

NOBODY = pwd.getpwnam("nobody")
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike a root-only interpreter
AS_NOBODY = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"]


# A daemon these tests start is refused within a second (a few on a busy machine); one that is not
# refused when it must be runs until this timeout, which fails the test.
def cprd(*args: str, env: dict | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cprd", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def tmp(request):
    """A scratch directory under /tmp that nobody may enter (root's, 0711), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="cprd-trust-", dir="/tmp"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nobodys(path: Path, mode: int = 0o755) -> Path:
    path.mkdir()
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(path, mode)
    return path


def nobodys_symlink(tmp: Path, target: Path, name: str) -> Path:
    """A sticky directory tmp/sticky (like /tmp) in which nobody made the symlink `name` -> target."""
    sticky = tmp / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    r = subprocess.run([*AS_NOBODY, SYSTEM_PYTHON, "-c", f"import os; os.symlink({str(target)!r}, "
                        f"{str(sticky / name)!r})"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return sticky


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("cprd: error:") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


# -- directories -------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["source --control", "target --listen"])
def test_a_directory_another_user_owns_is_refused(tmp, option):
    cmd, flag = option.split()
    theirs = nobodys(tmp / "Y", 0o700)  # nobody could unlink our socket and bind its own
    r = cprd(cmd, flag, str(theirs / "x.sock"))
    refused(r, f"directory {theirs} is owned by uid {NOBODY.pw_uid} (nobody)")
    assert os.listdir(theirs) == []
    # a directory of ours below theirs is no better: they could rename it away
    ours = theirs / "sub"
    ours.mkdir(mode=0o700)
    refused(cprd(cmd, flag, str(ours / "x.sock")), f"directory {theirs} is owned by uid {NOBODY.pw_uid}")
    # nor is a symlink that leads there
    (tmp / "link").symlink_to(ours)
    refused(cprd(cmd, flag, str(tmp / "link" / "x.sock")), f"directory {theirs} is owned by uid {NOBODY.pw_uid}")
    assert os.listdir(ours) == []


def test_writable_by_others_is_refused_unless_sticky_and_above(tmp):
    open_ = tmp / "open"
    open_.mkdir()
    os.chmod(open_, 0o777)
    mine = open_ / "mine"
    mine.mkdir(mode=0o700)
    refused(cprd("source", "--control", str(mine / "c.sock")), f"directory {open_} is writable by other users")
    refused(cprd("source", "--control", str(open_ / "c.sock")), f"directory {open_} is writable by other users")
    # sticky (like /tmp): others cannot remove or rename what is ours, so it may be on the way...
    os.chmod(open_, 0o1777)
    p = subprocess.Popen([sys.executable, "-m", "cprd", "source", "--control", str(mine / "c.sock")],
                         stderr=subprocess.PIPE)
    try:
        wait_for_socket(str(mine / "c.sock"), p)
    finally:
        p.terminate()
        p.wait(10)
    # ...but not where the socket itself lives
    refused(cprd("source", "--control", str(open_ / "c.sock")), "writable by other users (mode 1777)")


def test_a_symlink_another_user_made_is_not_followed(tmp):
    mine = tmp / "mine"
    mine.mkdir(mode=0o700)
    # nobody plants a symlink in a sticky directory, pointing at a directory of ours
    sticky = nobodys_symlink(tmp, mine, "trap")
    refused(cprd("source", "--control", str(sticky / "trap" / "c.sock")),
            f"{sticky}/trap is a symlink made by uid {NOBODY.pw_uid} (nobody)")
    assert os.listdir(mine) == []


@pytest.mark.parametrize("umask", ["000", "777"])  # one would open them to everyone, the other shut them
def test_missing_directories_are_created_private_whatever_the_umask(tmp, umask):
    path = tmp / "a" / "b" / "c" / "control.sock"
    p = subprocess.Popen(["sh", "-c", f'umask {umask}; exec "$0" -m cprd source --control {path}', sys.executable],
                         stderr=subprocess.PIPE)
    try:
        wait_for_socket(str(path), p)
        for d in (tmp / "a", tmp / "a" / "b", tmp / "a" / "b" / "c"):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        p.terminate()
        p.wait(10)


def test_state_directory_is_checked_and_never_followed_out(tmp):
    mine = tmp / "run"
    mine.mkdir(mode=0o700)
    control = str(mine / "c.sock")
    theirs = nobodys(tmp / "Y")
    refused(cprd("source", "--control", control, "--populate", "files=2", "--state-dir", str(theirs / "state")),
            f"directory {theirs} is owned by uid {NOBODY.pw_uid}")
    open_ = tmp / "open"
    open_.mkdir()
    os.chmod(open_, 0o777)
    refused(cprd("source", "--control", control, "--populate", "files=2", "--state-dir", str(open_)),
            f"directory {open_} is writable by other users")
    # A state file is never opened through a symlink, even in a directory of ours.
    victim = tmp / "victim"
    victim.write_text("precious\n")
    state = mine / "state"
    state.mkdir(mode=0o700)
    (state / "file-00000").symlink_to(victim)
    r = cprd("source", "--control", control, "--populate", "files=2", "--state-dir", str(state))
    assert r.returncode == 1 and "file-00000" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert victim.read_text() == "precious\n"
    assert not os.path.exists(control)
    for d in (theirs, open_):
        assert os.listdir(d) == []


# -- peers ---------------------------------------------------------------------------------------------
FAKE_DAEMON = textwrap.dedent("""
    # Plays a daemon that another user put where root's client will look: reports what it received.
    import array, json, os, socket, sys
    path, out = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    os.chmod(path, 0o666)
    s.listen(8)
    print("listening", flush=True)
    got = {"connections": 0, "bytes": 0, "fds": 0}
    s.settimeout(20)
    try:
        while True:
            c, _ = s.accept()
            got["connections"] += 1
            c.settimeout(2)
            try:
                while True:
                    data, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(4 * 253))
                    if not data and not anc:
                        break
                    got["bytes"] += len(data)
                    for _, _, blob in anc:
                        got["fds"] += len(blob) // 4
            except OSError:
                pass
            c.close()
            with open(out, "w") as f:
                json.dump(got, f)
    except OSError:
        pass
""")


def test_client_sends_nothing_to_a_daemon_another_user_runs(tmp):
    theirs = nobodys(tmp / "Y", 0o755)
    path, out = str(theirs / "control.sock"), str(theirs / "got.json")
    fake = subprocess.Popen([*AS_NOBODY, SYSTEM_PYTHON, "-c", FAKE_DAEMON, path, out], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert fake.stdout.readline().strip() == "listening"
        r = cprd("ctl", "put", "secret", "1", "--path", "/etc/shadow", "--flags", "r", "--control", path)
        assert r.returncode == 1, r.stderr
        assert f"served by uid {NOBODY.pw_uid} (nobody)" in r.stderr and "Nothing was sent" in r.stderr
        assert "--trust-uid" in r.stderr
        deadline = time.monotonic() + 10
        while not os.path.exists(out) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(out) as f:
            assert json.load(f) == {"connections": 1, "bytes": 0, "fds": 0}
        with pytest.raises(UntrustedPeer):
            Client(path).status()
    finally:
        fake.kill()
        fake.wait()


def test_source_refuses_a_target_another_user_runs(cluster, tmp):
    src = cluster.source("files=5,eventfds=5")
    with cluster.client() as c:
        before = snapshot(c)
    base = num_fds(src.pid)
    theirs = nobodys(tmp / "Y", 0o755)
    listen = str(theirs / "handoff.sock")
    as_user = str(Path(__file__).resolve().parents[1] / "as_user.py")
    tgt = subprocess.Popen([sys.executable, as_user, "nobody", "target", "--listen", listen], cwd=theirs,
                           stderr=subprocess.PIPE)
    cluster.procs.append(tgt)
    wait_for_socket(listen, tgt)
    tgt_base = num_fds(tgt.pid)
    r = cluster.ctl("handoff", "--to", listen)
    assert r.returncode == 1 and f"runs as uid {NOBODY.pw_uid} (nobody)" in r.stderr, r.stderr
    assert "same user as the source, or as root" in r.stderr and "keeps every entry" in r.stderr
    assert tgt.poll() is None and settled_fds(tgt.pid, tgt_base) == tgt_base, "the target received nothing"
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid and c.status()["state"] == "serving"
        assert snapshot(c) == before
    assert settled_fds(src.pid, base) == base


def test_an_allowed_user_may_use_the_table_but_not_hand_it_off_or_upgrade(cluster, tmp):
    control = str(tmp / "control.sock")
    src = cluster.spawn("source", "--control", control, "--populate", "eventfds=3", "--allow-uid", "nobody")
    wait_for_socket(control, src)
    script = textwrap.dedent(f"""
        import json, sys
        from cprd.client import Client
        from cprd.errors import CprdError
        out = {{}}
        with Client({control!r}) as c:
            out["entries"] = c.status()["you"]["entries"]
            for op, call in (("handoff", lambda: c.handoff("/nonexistent.sock")), ("upgrade", c.upgrade)):
                try:
                    call()
                    out[op] = "done"
                except CprdError as e:
                    out[op] = [e.code, str(e)]
        print(json.dumps(out))
    """)
    # imports while root (the interpreter may be in a root-only home), then runs the script as nobody
    drop = ("import json, os, pwd, sys, cprd.client, cprd.errors; pw = pwd.getpwnam('nobody'); os.setgroups([]); "
            "os.setgid(pw.pw_gid); os.setuid(pw.pw_uid); exec(sys.stdin.read())")
    r = subprocess.run([sys.executable, "-c", drop], input=script, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["entries"] == 0, "nobody holds nothing of the table; it sees its own share only"
    for op in ("handoff", "upgrade"):
        code, message = out[op]
        assert code == Denied.code and f"may use this cprd's table but not {op} it" in message
    with Client(control) as c:
        assert c.status()["pid"] == src.pid and c.status()["upgrades"] == 0


SPEAKS_FIRST = textwrap.dedent("""
    # A peer of a uid the daemon refuses, which sends before it reads, as a source sends its hello.
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    s.send(b"CPRH" + bytes(60))  # a frame it sends before reading anything (queued: the daemon is stopped)
    print("sent", flush=True)
    sys.stdin.readline()  # the daemon has refused and closed by now
    try:
        print(s.recv(65536)[:4].decode(errors="replace"))
    except OSError as e:
        print(type(e).__name__)
""")


@pytest.mark.parametrize("kind", ["control", "handoff"])
def test_a_refused_peer_that_speaks_first_reads_why(cluster, tmp, kind):
    """The daemon drops what a refused peer sent before it closes, so the close does not reset the
    connection and the peer reads the refusal (the control error, or the handoff Abort)."""
    path = str(tmp / f"{kind}.sock")
    if kind == "control":  # --allow-uid of another user makes the socket 0666; nobody is still refused
        p = cluster.spawn("source", "--control", path, "--allow-uid", "daemon")
    else:  # a handoff socket is always 0600; were it reachable, SO_PEERCRED would still refuse nobody
        p = cluster.spawn("target", "--listen", path)
    wait_for_socket(path, p)
    if kind == "control":  # answered: the daemon has set up its sockets (it makes the control socket 0600)
        with Client(path, timeout=10) as c:
            c.status()
    os.chmod(path, 0o666)
    base = num_fds(p.pid)
    # The peer's frame is queued before the daemon even accepts (it is stopped meanwhile), so the refusal
    # certainly meets it; the peer reads once the daemon has refused and closed the connection.
    os.kill(p.pid, signal.SIGSTOP)
    try:
        peer = subprocess.Popen([*AS_NOBODY, SYSTEM_PYTHON, "-c", SPEAKS_FIRST, path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert peer.stdout.readline().strip() == "sent", peer.communicate(timeout=30)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while "event=refused_peer" not in cluster.logs():
        assert time.monotonic() < deadline, "the daemon never refused the peer"
        time.sleep(0.01)
    assert settled_fds(p.pid, base) == base  # the connection is closed
    out, err = peer.communicate("go\n", timeout=30)
    assert out.strip() == ("CPRC" if kind == "control" else "CPRH"), (out, err)
    assert p.poll() is None and settled_fds(p.pid, base) == base


def test_an_upgrade_program_another_user_could_change_is_refused(cluster, tmp):
    """Found by a hostile probe: a symlink nobody made (and could re-point between the check and the
    exec), or a #! interpreter nobody owns, is refused like a program nobody owns."""
    src = cluster.source("eventfds=3")
    good = tmp / "good-cprd"
    good.write_text(f'#!/bin/sh\nexec {sys.executable} -m cprd "$@"\n')
    good.chmod(0o755)
    sticky = nobodys_symlink(tmp, good, "link")
    r = cluster.ctl("upgrade", "--program", str(sticky / "link"))
    assert r.returncode == 2 and f"symlink made by uid {NOBODY.pw_uid} (nobody)" in r.stderr, r.stderr
    theirs = nobodys(tmp / "Y", 0o755)
    interp = theirs / "sh"
    shutil.copy("/bin/sh", interp)
    os.chown(interp, NOBODY.pw_uid, NOBODY.pw_gid)
    script = tmp / "script-cprd"
    script.write_text(f'#!{interp}\nexec {sys.executable} -m cprd "$@"\n')
    script.chmod(0o755)
    r = cluster.ctl("upgrade", "--program", str(script))
    assert r.returncode == 2 and f"interpreter of upgrade program {script}" in r.stderr, r.stderr
    assert f"owned by uid {NOBODY.pw_uid}" in r.stderr
    # a root symlink to the good program is followed, and the program found is what runs
    (tmp / "root-link").symlink_to(good)
    r = cluster.ctl("upgrade", "--program", str(tmp / "root-link"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["pid"] == src.pid and res["program"][0] == str(good)


def test_a_target_takes_a_table_only_from_its_own_user_or_root(cluster, tmp):
    """Found by a hostile probe: a root target given --allow-uid took a table from nobody's source,
    with nobody's listening socket, on which nobody could then accept root's clients."""
    tgt = cluster.spawn("target", "--listen", str(tmp / "handoff.sock"), "--allow-uid", "nobody")
    listen = str(tmp / "handoff.sock")
    wait_for_socket(listen, tgt)
    os.chmod(listen, 0o666)  # reachable, as a careless operator might make it: SO_PEERCRED still refuses
    theirs = nobodys(tmp / "Y", 0o755)
    control = str(theirs / "control.sock")
    as_user = str(Path(__file__).resolve().parents[1] / "as_user.py")
    src = subprocess.Popen([sys.executable, as_user, "nobody", "source", "--control", control, "--populate",
                            "eventfds=5"], cwd=theirs, stderr=subprocess.PIPE)
    cluster.procs.append(src)
    wait_for_socket(control, src)
    nobody = (NOBODY.pw_uid,)
    with Client(control, trust_uids=nobody) as c:
        before = snapshot(c)
        with pytest.raises(CprdError, match="only from a source of its own user or root"):
            c.handoff(listen)
        assert c.status()["pid"] == src.pid and snapshot(c) == before
    assert tgt.poll() is None  # still waiting, with nothing received
    root_control = str(tmp / "control.sock")
    root_src = cluster.spawn("source", "--control", root_control, "--populate", "eventfds=7")
    wait_for_socket(root_control, root_src)
    with Client(root_control) as c:
        assert c.handoff(listen)["target_pid"] == tgt.pid


def test_an_allowed_user_cannot_crowd_out_the_daemons_own_user(cluster, tmp):
    """Other users share at most half of --max-clients, each a quarter; their surplus waits in their
    own lane's backlog, so the daemon's own user is answered at once however many connections they
    hold."""
    control = str(tmp / "control.sock")
    src = cluster.spawn("source", "--control", control, "--max-clients", "40", "--allow-uid", "nobody")
    wait_for_socket(control, src)
    base = num_fds(src.pid)
    hog = textwrap.dedent("""
        import socket, sys, time
        request = bytes.fromhex(sys.argv[2])
        conns = []
        for _ in range(200):  # each sends a request: served only while it holds one of nobody's slots
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sys.argv[1])
            s.send(request)
            conns.append(s)
        time.sleep(1.0)
        answered = 0
        for s in conns:
            s.setblocking(False)
            try:
                answered += bool(s.recv(65536))
            except OSError:
                pass
        print(answered, flush=True)
        sys.stdin.read()  # hold them until told
    """)
    from cprd.protocol import control as cp
    lane = f"{control}.{NOBODY.pw_uid}"
    p = subprocess.Popen([*AS_NOBODY, SYSTEM_PYTHON, "-c", hog, lane, cp.encode_request("status").hex()],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        answered = int(p.stdout.readline())
        assert answered == 10, answered  # a quarter of 40; the others wait in nobody's own backlog
        for _ in range(20):  # the daemon's own user: answered, with no wait for a slot
            with Client(control, timeout=5, retry_for=0) as c:
                assert c.status()["pid"] == src.pid
    finally:
        p.stdin.close()
        p.wait(30)
    assert settled_fds(src.pid, base) == base
