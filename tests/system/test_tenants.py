"""Other users as tenants: owners, shares, quotas, lanes (issue: a root daemon beside other users).

Every test runs a root daemon that allows nobody (65534) and not 65533, and acts as each of them in
a child that drops to that uid; what changed (or did not) is judged by /proc and kcmp."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from helpers import DROP_TO, NOBODY, OTHER, SYSTEM_PYTHON, Shared, num_fds, settled_fds

from cprd.client import Client
from cprd.errors import CapacityError, ControlError, Denied, UsageError
from cprd.fdstore import FDNAMES_MAX
from cprd.kinds import Kind
from cprd.tools.bench_tenants import CONNECT_FLOOD
from cprd.tools.procs import wait_for_socket
from cprd.tools.proof import same_open_file

pytestmark = pytest.mark.requires("root")

@pytest.fixture
def shared(cluster):
    return Shared(cluster)


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0, r.stdout
    for w in words:
        assert w in r.stderr, r.stderr


def same(fd_a: int, fd_b: int, kind: str) -> bool:
    ok, method = same_open_file(fd_a, fd_b, Kind.from_label(kind))
    assert method.startswith("kcmp"), method
    return ok


# -- owners -------------------------------------------------------------------------------------------
def test_an_allowed_uid_cannot_change_what_root_made(shared):
    """Reported: nobody's `ctl del`, `put --replace`, `fdstore --clean`, `--remove` and `cprd run
    --fdstore-max 0` all changed root's entries and stores. Each is refused now, and nothing changes."""
    with shared.client() as c:
        _, mine = c.get("eventfd", 0)
        c.fdstore("web", "socket")
        r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import array, os, socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(sys.argv[1])
            s.sendmsg([b'FDSTORE=1\\nFDNAME=kept'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                        array.array('i', [os.eventfd(0)]))])
        """), c.fdstore("web", "socket")["socket"]], timeout=30)
        assert r.returncode == 0
        for _ in range(100):
            if c.fdstore("web", "list"):
                break
            time.sleep(0.02)
        before_rows = c.fdstore("web", "list")
        before = c.ls()
    assert len(before_rows) == 1
    sock = before_rows and shared.client().fdstore("web", "socket")["socket"]
    fid = os.stat(sock).st_ino
    attempts = {
        "del": ("del", "eventfd", "0"),
        "replace": ("put", "eventfd", "0", "--path", "/dev/null", "--flags", "r", "--replace"),
        "clean": ("fdstore", "web", "--clean"),
        "remove": ("fdstore", "web", "--remove"),
        "share": ("share", "eventfd", "0", "--uid", str(NOBODY)),
        "run": ("run", "--name", "web", "--fdstore-max", "0", "--", "/bin/true"),
        "get": ("get", "eventfd", "0"),
    }
    for what, args in attempts.items():
        r = shared.ctl(NOBODY, *args)
        refused(r, "uid 65534 (nobody) may not", "belongs to uid 0 (root)")
    with shared.client() as c:
        assert c.ls() == before, "nothing changed"
        assert c.fdstore("web", "list") == before_rows
        _, now = c.get("eventfd", 0)
        try:
            assert same(mine, now, "eventfd"), "root's entry is still root's fd"
        finally:
            os.close(now)
            os.close(mine)
    assert os.stat(sock).st_ino == fid, "root's store's socket file is still there"
    # and root's store's notify socket is root's: nobody cannot even send to it
    st = os.stat(sock)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


def test_each_uid_owns_what_it_made_and_sees_only_that(shared):
    out = shared.as_nobody("""
        c = cprd.client.Client(sys.argv[1])
        r, w = os.pipe()
        put = c.put("nobodys", 1, r)
        ls = c.ls()
        st = c.status()
        c.delete("nobodys", 1)
        c.put("nobodys", 2, w)
        print(json.dumps({"put": put, "ls": ls, "status": st}))
    """)
    assert out["put"]["owner"] == NOBODY
    assert [(e["name"], e["id"], e["owner"]) for e in out["ls"]] == [("nobodys", 1, NOBODY)], "only its own"
    assert out["status"]["you"]["entries"] == 1 and "entries" not in out["status"], "its share, not the table's"
    with shared.client() as c:
        ls = {(e["name"], e["id"]): e for e in c.ls()}
        assert ls[("nobodys", 2)]["owner"] == NOBODY and ls[("eventfd", 0)]["owner"] == 0
        assert c.status()["owners"] == {str(NOBODY): 1}
        # root may change anything: it deletes nobody's entry
        c.delete("nobodys", 2)
        assert c.status()["owners"] == {}


def test_sharing_lets_named_uids_and_gids_read_never_change(shared):
    with shared.client() as c:
        c.share("eventfd", 1, uids=[NOBODY])
        c.fdstore("web", "socket")
        c.share("fdstore/web", -1, gids=[NOBODY])  # nogroup: nobody's primary group
        assert {(e["name"], e["id"]): e.get("shared") for e in c.ls()}[("eventfd", 1)] == {"uids": [NOBODY],
                                                                                           "gids": []}
    script = """
        c = cprd.client.Client(sys.argv[1])
        out = {"ls": sorted((e["name"], e["id"]) for e in c.ls())}
        try:
            info, fd = c.get("eventfd", 1)
            out["got"] = info["kind"]
        except cprd.errors.CprdError as e:
            out["got"] = e.code
        for what, call in (("del", lambda: c.delete("eventfd", 1)), ("list", lambda: c.fdstore("web", "list")),
                           ("clean", lambda: c.fdstore("web", "clean"))):
            try:
                call()
                out[what] = "done"
            except cprd.errors.CprdError as e:
                out[what] = e.code
        print(json.dumps(out))
    """
    # SO_PEERGROUPS: the daemon sees every group of the peer; nobody's script keeps its primary group only
    out = shared.as_nobody(script)
    assert out["got"] == "eventfd" and out["del"] == Denied.code, "shared to read, never to change"
    assert out["list"] == "done" and out["clean"] == Denied.code
    assert ["eventfd", 1] in out["ls"] and ["fdstore/web", -1] in out["ls"] and ["eventfd", 0] not in out["ls"]
    with shared.client() as c:  # shared with nobody again: refused again
        c.share("eventfd", 1)
        c.share("fdstore/web", -1)
    out = shared.as_nobody(script)
    assert out["got"] == Denied.code and out["list"] == Denied.code and out["ls"] == []


def test_names_of_the_stores_and_of_the_daemon_cannot_be_put(shared):
    """Reported: `ctl put 'fdstore/.x' 1` (and fdstore/a/b, fdstore/) was accepted though
    docs/fdstore.md says names starting with fdstore/ are refused."""
    with shared.client() as c:
        n = len(c.ls())
        r, w = os.pipe()
        try:
            for name in ("fdstore/.x", "fdstore/a/b", "fdstore/", "fdstore/web", "cprd/access", "cprd/x"):
                with pytest.raises(UsageError, match="cannot be put|the daemon's own"):
                    c.put(name, 1, r)
        finally:
            os.close(r)
            os.close(w)
        assert len(c.ls()) == n


# -- quotas ---------------------------------------------------------------------------------------
HOG = """
    # as nobody, under `cprd run`: store fds through the app's notify socket, 253 a datagram, then
    # one a datagram, until `goal` were sent; then how many the store holds (BARRIER: all handled)
    import array, json, os, socket, sys
    goal = int(sys.argv[1])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ["NOTIFY_SOCKET"])
    sent = 0
    def send(n):
        fds = [os.eventfd(0) for _ in range(n)]
        s.sendmsg([b"FDSTORE=1\\nFDNAME=hog"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        for fd in fds:
            os.close(fd)
        return n
    while sent < goal - 2000:
        sent += send(253)
    while sent < goal:
        sent += send(1)
    r, w = os.pipe()
    s.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
    os.close(w)
    os.read(r, 1)  # EOF once the daemon closed the barrier's fd: every earlier datagram was handled
    print(json.dumps({"sent": sent}))
"""


def test_an_allowed_uid_cannot_fill_the_table(shared):
    """Reported: nobody filled the whole table (19,903 fds) through one app's notify socket with
    `cprd run --fdstore-max 65536`; root's put and every new `cprd run` were then refused. Now
    nobody stops at its quota, and root keeps its reserve."""
    r = shared.ctl(NOBODY, "run", "--name", "hog", "--fdstore-max", "65536", "--", SYSTEM_PYTHON, "-c",
                   textwrap.dedent(HOG), "21000")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sent"] == 21000
    with shared.client() as c:
        r_, w_ = os.pipe()
        try:
            c.put("roots", 1, r_)  # root can still put
        finally:
            os.close(r_)
            os.close(w_)
    r = shared.ctl(None, "run", "--name", "roots-app", "--", "/bin/true")
    assert r.returncode == 0, r.stderr  # and run a new app
    with shared.client() as c:
        st = c.status()
        per_uid = st["you"]["capacity"] // 8
        assert st["owners"] == {str(NOBODY): per_uid}, "nobody holds exactly its quota: its store's 2 and the fds"
        assert st["fdstore"]["hog"]["fds"] == per_uid - 2 and st["fdstore"]["hog"]["owner"] == NOBODY
    assert "fdstore_quota" in shared.cluster.logs()


def test_an_allowed_uid_cannot_make_stores_without_end(shared):
    """Reported: nobody made 3,000 stores in 2.2 s (6,001 entries, 3,000 socket files)."""
    out = shared.as_nobody("""
        c = cprd.client.Client(sys.argv[1])
        made, refusal = 0, None
        for i in range(40):
            try:
                c.fdstore(f"app-{i}", "socket")
                made += 1
            except cprd.errors.CprdError as e:
                refusal = [e.code, str(e)]
        print(json.dumps({"made": made, "refusal": refusal}))
    """)
    assert out["made"] == 16 and out["refusal"][0] == CapacityError.code and "its quota" in out["refusal"][1]
    files = [f for f in os.listdir(os.path.join(shared.dir, "fdstore")) if f.startswith("app-")]
    assert len(files) == 16
    st = os.stat(os.path.join(shared.dir, "fdstore", files[0]))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600), "nobody's store's socket is nobody's alone"


def test_a_store_keeps_its_program_startable(shared):
    """Reported: 600 fds with 255-character names stored into root's app made root's next `cprd run`
    fail (LISTEN_FDNAMES of 153,599 bytes, too large for exec). The store refuses, at store time,
    an fd whose name would not fit, and the program starts."""
    script = textwrap.dedent("""
        import array, os, socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ["NOTIFY_SOCKET"])
        for i in range(600):
            fd = os.eventfd(0)
            name = (f"{i:04d}" + "x" * 251).encode()
            s.sendmsg([b"FDSTORE=1\\nFDNAME=" + name], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            os.close(fd)
        r, w = os.pipe()
        s.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
        os.close(w)
        os.read(r, 1)
    """)
    r = shared.ctl(None, "run", "--name", "web", "--", SYSTEM_PYTHON, "-c", script)
    assert r.returncode == 0, r.stderr
    with shared.client() as c:
        kept = c.status()["fdstore"]["web"]["fds"]
    assert kept == FDNAMES_MAX // 256 < 600
    r = shared.ctl(None, "run", "--name", "web", "--", SYSTEM_PYTHON, "-c",
                   "import os; print(os.environ['LISTEN_FDS'], len(os.environ['LISTEN_FDNAMES']))")
    assert r.returncode == 0, r.stderr
    n, size = map(int, r.stdout.split())
    assert n == kept and size <= FDNAMES_MAX
    assert "fdstore_names_full" in shared.cluster.logs()
    # and nobody cannot even send to root's store
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON, "-c",
                        "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
                        "s.sendto(b'FDSTORE=1', sys.argv[1])", os.path.join(shared.dir, "fdstore", "web.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "PermissionError" in r.stderr


# -- lanes ----------------------------------------------------------------------------------------


def test_a_uid_that_is_not_allowed_cannot_even_connect(shared):
    """Reported: 65533 (not allowed) flooded connect/close on the control socket (0666 once
    --allow-uid was given) from three processes, and root's requests went from 0.78 ms to 510 ms.
    The control socket is root's alone now, and nobody's lane nobody's: the kernel refuses 65533's
    every connect, and root is answered throughout."""
    for path in (shared.control, shared.lane(NOBODY)):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert os.stat(shared.lane(NOBODY)).st_uid == NOBODY
    def flood(uid: int, path: str) -> subprocess.Popen:  # the benchmark's attacker: connect, close, again
        p = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON, "-c",
                              CONNECT_FLOOD, path, "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        p.stdin.write("go\n")
        p.stdin.flush()
        return p

    floods = [flood(OTHER, path) for path in (shared.control, shared.control, shared.lane(NOBODY))]
    floods.append(flood(NOBODY, shared.lane(NOBODY)))  # and nobody floods its own lane meanwhile
    answered = 0
    until = time.monotonic() + 2.5
    with shared.client() as c:
        while time.monotonic() < until:
            assert c.status()["pid"] == shared.proc.pid
            answered += 1
    results = [tuple(map(int, f.communicate(timeout=30)[0].split())) for f in floods]
    for connected, refused_ in results[:3]:
        assert connected == 0 and refused_ > 0, "the kernel refused every connect of 65533"
    assert results[3][0] > 0 and results[3][1] == 0, "nobody reaches its own lane"
    assert answered > 100, answered


def test_the_daemons_user_is_never_crowded_by_silent_or_half_frames(shared):
    """nobody holds every slot it may with connections that say nothing or half a frame: root is
    answered at once, and nobody's surplus waits in nobody's own backlog."""
    hog = textwrap.dedent("""
        import socket, sys
        conns = []
        for i in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sys.argv[1])
            if i % 2:
                s.send(b"CPRC")  # half a frame header
            conns.append(s)
        print("held", flush=True)
        sys.stdin.read()
    """)
    base = num_fds(shared.proc.pid)
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON,
                          "-c", hog, shared.lane(NOBODY)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        for _ in range(50):
            with Client(shared.control, timeout=5, retry_for=0) as c:
                assert c.status()["pid"] == shared.proc.pid
    finally:
        p.stdin.close()
        p.wait(30)
    assert settled_fds(shared.proc.pid, base, timeout=20) == base


def test_a_daemon_error_reaches_the_user_at_once(cluster):
    """Reported: with the control directory on a small filesystem, root's next store took 30 s to
    fail: the client retried the daemon's own `control` error about 600 times. The daemon's own
    errors (here: no inode left for the store's socket) reach the user at once."""
    d = tempfile.mkdtemp(prefix="cprd-small-", dir="/tmp")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=6,mode=0711", "tmpfs", d],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); CI runs as root, where it can")
        try:
            control = os.path.join(d, "control.sock")
            p = cluster.spawn("source", "--control", control)
            wait_for_socket(control, p)
            with Client(control, timeout=30) as c:
                made = 0
                with pytest.raises(ControlError, match="No space left on device"):
                    for i in range(10):
                        c.fdstore(f"app-{i}", "socket")
                        made += 1
                assert 0 < made < 10 and c.retries == 0, "told at once, never retried"
                assert c.status()["pid"] == p.pid
            from cprd.tools.procs import stop

            stop(p)
        finally:
            subprocess.run(["umount", "-l", d], check=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- across a handoff and an upgrade ----------------------------------------------------------------
def test_owners_and_lanes_survive_an_upgrade_and_a_handoff(shared):
    put = """
        c = cprd.client.Client(sys.argv[1])
        out = {}
        if sys.argv[2] == "put":
            r, w = os.pipe()
            c.put("nobodys", 1, r)
        for what, call in (("ls", lambda: [(e["name"], e["id"], e["owner"]) for e in c.ls()]),
                           ("del-roots", lambda: c.delete("eventfd", 0))):
            try:
                out[what] = call()
            except cprd.errors.CprdError as e:
                out[what] = e.code
        print(json.dumps(out))
    """
    out = shared.as_nobody(put, "put")
    assert out["ls"] == [["nobodys", 1, NOBODY]] and out["del-roots"] == Denied.code
    with shared.client() as c:
        assert c.upgrade()["rolled_back"] is False
    out = shared.as_nobody(put, "")
    assert out["ls"] == [["nobodys", 1, NOBODY]] and out["del-roots"] == Denied.code, "after an upgrade"
    tgt = shared.cluster.spawn("target", "--listen", os.path.join(shared.dir, "h.sock"), "--allow-uid", "nobody")
    wait_for_socket(os.path.join(shared.dir, "h.sock"), tgt)
    with shared.client() as c:
        assert c.handoff(os.path.join(shared.dir, "h.sock"))["target_pid"] == tgt.pid
    out = shared.as_nobody(put, "")
    assert out["ls"] == [["nobodys", 1, NOBODY]] and out["del-roots"] == Denied.code, "after a handoff"
    with shared.client() as c:
        assert c.status()["pid"] == tgt.pid and c.status()["owners"] == {str(NOBODY): 1}


# -- what a review found ------------------------------------------------------------------------------
def test_a_name_another_uid_made_first_never_catches_roots_fds(shared):
    """Found by a review: nobody puts a name first; root's `put --replace` of it kept nobody the
    owner, so nobody could get root's fd; root's `cprd run` of a store nobody made handed root's
    program nobody's socket. A replace by another makes the entry theirs; a store is run only by its
    owner (or, for the daemon's user's, by root)."""
    out = shared.as_nobody("""
        c = cprd.client.Client(sys.argv[1])
        r, w = os.pipe()
        c.put("db", 0, r)
        c.fdstore("web2", "socket")
        print(json.dumps({}))
    """)
    with shared.client() as c:
        ev = os.eventfd(0)
        try:
            assert c.put("db", 0, ev, replace=True)["owner"] == 0
        finally:
            os.close(ev)
        assert c.status()["owners"] == {str(NOBODY): 2}, "nobody's store (2 entries) only"
    out = shared.as_nobody("""
        c = cprd.client.Client(sys.argv[1])
        try:
            c.get("db", 0)
            print(json.dumps({"got": "fd"}))
        except cprd.errors.CprdError as e:
            print(json.dumps({"got": e.code}))
    """)
    assert out["got"] == Denied.code
    r = shared.ctl(None, "run", "--name", "web2", "--", "/bin/true")
    refused(r, "belongs to uid 65534 (nobody)", "--remove")


@pytest.mark.slow
def test_a_forged_owners_log_or_lane_from_an_older_table_is_not_believed(cluster):
    """Found by a review: a cprd older than owners let an allowed uid put names starting with cprd/;
    a table of it handed to this version must not have a log it forged believed (which would make
    it the owner of root's entries) nor a socket it made served as a lane."""
    from helpers import RELEASES, install, release_spawn

    from cprd.kinds import classify

    version, commit = RELEASES[0]
    python = install(version, commit)
    d = tempfile.mkdtemp(prefix="cprd-tenants-", dir="/tmp")
    cluster.keep(_Removed(d))
    os.chmod(d, 0o711)
    control = os.path.join(d, "control.sock")
    src = release_spawn(cluster, python, "source", "--control", control, "--populate", "eventfds=3")
    wait_for_socket(control, src)
    with Client(control) as c:
        _, ev = c.get("eventfd", 0)
        ident = classify(ev).to_json()
        os.close(ev)
        log = os.memfd_create("forged")  # a record naming root's eventfd for nobody, under a token made up
        os.write(log, b"cprd-owners " + b"0" * 32 + b"\n"
                 + json.dumps({"k": ["eventfd", 0], "i": ident, "o": NOBODY, "u": [], "g": []}).encode() + b"\n")
        c.put("cprd/access", 0, log)
        os.close(log)
        not_a_lane = os.eventfd(0)
        c.put("cprd/lane", NOBODY, not_a_lane)
        os.close(not_a_lane)
        listen = os.path.join(d, "handoff.sock")
        tgt = cluster.spawn("target", "--listen", listen, "--allow-uid", "nobody")
        wait_for_socket(listen, tgt)
        assert c.handoff(listen)["target_pid"] == tgt.pid
    with Client(control) as c:
        assert c.status()["pid"] == tgt.pid
        assert {e["name"]: e["owner"] for e in c.ls()}["eventfd"] == 0
    out = subprocess.run([sys.executable, "-c", DROP_TO.format(uid=NOBODY, gid=NOBODY), control],
                         input=textwrap.dedent("""
                             c = cprd.client.Client(sys.argv[1])
                             try:
                                 c.get("eventfd", 0)
                                 got = "fd"
                             except cprd.errors.CprdError as e:
                                 got = e.code
                             print(json.dumps({"got": got, "ls": [e["name"] for e in c.ls()]}))
                         """), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"got": Denied.code, "ls": []}, "the log is not believed; nobody's lane serves"
    logs = cluster.logs()
    assert "event=owners_log_not_ours" in logs and "event=lane_refused" in logs


class _Removed:
    def __init__(self, path: str) -> None:
        self.path = path

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
