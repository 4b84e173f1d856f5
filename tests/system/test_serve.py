"""Listeners cprd makes and keeps (`cprd run --listen`), dialects, and `cprd serve`'s generations:
real daemons, real sockets, a real HTTP server that knows only LISTEN_FDS (and READY=1 when asked),
and clients that open a new connection for every request, so that a refused one would show."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from helpers import NOBODY, Shared

from cprd import proc
from cprd.tools.bench_restart import SERVER, ConnectFailed
from cprd.tools.bench_restart import get as _get


class Clients:
    """Threads that each make one request per new connection, all along; every failure is kept."""

    def __init__(self, port: int, n: int = 4) -> None:
        self.port, self.ok, self.failed, self.pids = port, 0, [], set()
        self.at_connect: list[str] = []  # refused or reset at connect: never, whatever happens to a server
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pids.add(_get(self.port))
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                self.failed.append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}")
                if isinstance(e, ConnectFailed):
                    self.at_connect.append(self.failed[-1])

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


class App:
    """`cprd serve` of the test server on a listener cprd keeps, port chosen by the kernel."""

    def __init__(self, cluster, tmp_path, name: str = "web", ready: str = "notify", *extra: str) -> None:
        self.cluster, self.name = cluster, name
        self.script = tmp_path / "server.py"
        self.script.write_text(SERVER)
        self.mode = tmp_path / f"{name}.mode"  # what the next generation does: "", exit, never-ready
        self.args = ["--name", name, "--listen", "http=tcp:127.0.0.1:0", "--ready", ready, "--ready-timeout", "10",
                     "--drain", "5", *extra, "--", sys.executable, str(self.script), "{fd:http}", str(self.mode)]
        self.proc = self.start()
        self.port = self.wait_port()

    def start(self) -> subprocess.Popen:
        log = open(self.cluster.dir / f"serve-{time.monotonic_ns()}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "cprd", "--log-level", "info", "serve", "--control",
                              self.cluster.control, *self.args], stdin=subprocess.DEVNULL, stderr=log, stdout=log)
        log.close()
        self.cluster.procs.append(p)
        return p

    def served(self) -> dict:
        with self.cluster.client() as c:
            return c.status().get("fdstore", {}).get(self.name, {}).get("serve") or {}

    def wait(self, what, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            got = what()
            if got:
                return got
            assert time.monotonic() < deadline, (self.served(), self.cluster.logs()[-3000:])
            time.sleep(0.02)

    def ready_gens(self) -> list[dict]:
        """The ready generations, as this App's `cprd serve` reports them."""
        served = self.served()
        if served.get("pid") != self.proc.pid:
            return []
        return [g for g in served.get("generations", []) if g["state"] == "ready"]

    def wait_port(self) -> int:
        self.wait(self.ready_gens)
        with self.cluster.client() as c:
            (row,) = c.fdstore(self.name, "list")
            self.inode = row["ino"]
            _, fd = c.get(f"fdstore/{self.name}", row["id"])
        try:
            return socket.socket(fileno=fd).getsockname()[1]
        finally:
            pass

    def restart(self, *extra: str) -> subprocess.CompletedProcess:
        return self.cluster.ctl("restart", self.name, "--json", *extra)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0


def _children_of_serve(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


# -- cprd run --listen ----------------------------------------------------------------------------
def _run(cluster, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CPRD_CONTROL": cluster.control}
    return subprocess.run([sys.executable, "-m", "cprd", "run", *args], env=env, capture_output=True, text=True,
                          timeout=60)


SHOW = ("import os; print(os.readlink('/proc/self/fd/3'), os.environ.get('LISTEN_FDS'), "
        "os.environ.get('LISTEN_FDNAMES'))")


def test_run_makes_a_listener_once_and_hands_the_same_socket_to_every_run(cluster):
    cluster.source("eventfds=1")
    first = _run(cluster, "--name", "web", "--listen", "http=tcp:127.0.0.1:0,backlog=64", "--", sys.executable,
                 "-c", SHOW)
    assert first.returncode == 0, first.stderr
    inode, n, names = first.stdout.split()
    assert inode.startswith("socket:[") and (n, names) == ("1", "http")
    with cluster.client() as c:
        (row,) = c.fdstore("web", "list")
        _, fd = c.get("fdstore/web", row["id"])
    sock = socket.socket(fileno=fd)
    port = sock.getsockname()[1]
    # nobody accepts now: a connection waits in the backlog, and the next run's program answers it
    waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
    waiting.sendall(b"hello")
    again = _run(cluster, "--name", "web", "--listen", f"http=tcp:127.0.0.1:{port}", "--", sys.executable, "-c",
                 "import socket; s = socket.socket(fileno=3); c, _ = s.accept(); print(c.recv(5).decode()); " + SHOW)
    assert again.returncode == 0, again.stderr
    said, inode2, _, _ = again.stdout.split()
    assert said == "hello" and inode2 == inode, "the same socket, and the connection that waited in it"
    waiting.close()
    # a changed spec is an error that changes nothing; --replace-listeners makes a new one
    other = _run(cluster, "--name", "web", "--listen", "http=udp:127.0.0.1:0", "--", "true")
    assert other.returncode == 2 and "does not match udp:127.0.0.1:0" in other.stderr, other.stderr
    assert "--replace-listeners" in other.stderr
    with cluster.client() as c:
        assert [r["ino"] for r in c.fdstore("web", "list")] == [row["ino"]]
    new = _run(cluster, "--name", "web", "--listen", "http=tcp:127.0.0.1:0", "--replace-listeners", "--",
               sys.executable, "-c", SHOW)
    assert new.returncode == 0 and new.stdout.split()[0] == inode, "port 0 matches any port: nothing replaced"
    new = _run(cluster, "--name", "web", "--listen", "http=udp:127.0.0.1:0", "--replace-listeners", "--",
               sys.executable, "-c", SHOW)
    assert new.returncode == 0 and new.stdout.split()[0] != inode, new.stderr
    with cluster.client() as c:
        assert len(c.fdstore("web", "list")) == 1, "the old one was removed, not kept beside"
    sock.close()


def test_run_makes_a_unix_listener_path_again_when_the_last_program_removed_it(cluster, tmp_path):
    cluster.source("eventfds=1")
    path = str(tmp_path / "app.sock")
    args = ["--name", "u", "--listen", f"s=unix:{path},mode=0660", "--", sys.executable, "-c"]
    first = _run(cluster, *args, "import os, socket; print(os.readlink('/proc/self/fd/3')); "
                 "os.unlink(socket.socket(fileno=3).getsockname())")  # as gunicorn --bind fd:// does on its stop
    assert first.returncode == 0 and not os.path.lexists(path), first.stderr
    again = _run(cluster, *args, "import os; print(os.readlink('/proc/self/fd/3'))")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout, "the same socket"
    assert oct(os.stat(path).st_mode & 0o777) == "0o660"
    assert "event=listener_path_restored name=s" in again.stderr, again.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)  # it waits in the kept socket's backlog


def test_each_dialect_hands_the_listener_as_the_server_expects(cluster):
    cluster.source("eventfds=1")
    args = ["--name", "web", "--listen", "a=tcp:127.0.0.1:0", "--listen", "b=tcp:[::1]:0"]
    r = _run(cluster, *args, "--dialect", "nginx", "--", sys.executable, "-c",
             "import os; print(os.environ['NGINX'], os.environ['LISTEN_FDNAMES'])")
    assert r.returncode == 0 and r.stdout.split() == ["3;4;", "b:a"], r  # newest first, as systemd
    r = _run(cluster, *args, "--", sys.executable, "-c", "import socket, sys; print(socket.socket(fileno=int("
             "sys.argv[1])).family.name, socket.socket(fileno=int(sys.argv[2])).family.name)", "{fd:a}", "{fd:b}")
    assert r.returncode == 0 and r.stdout.split() == ["AF_INET", "AF_INET6"], r
    r = _run(cluster, "--name", "inetd", "--listen", "s=tcp:127.0.0.1:0", "--dialect", "stdin", "--", sys.executable,
             "-c", "import os, socket; s = socket.socket(fileno=0); print(s.getsockopt(socket.SOL_SOCKET, "
             "socket.SO_ACCEPTCONN), os.environ.get('LISTEN_FDS'), sorted(os.listdir('/proc/self/fd'))[:4])")
    assert r.returncode == 0 and r.stdout.strip() == "1 None ['0', '1', '2', '3']", r
    r = _run(cluster, *args, "--dialect", "stdin", "--", "true")
    assert r.returncode == 2 and "exactly one" in r.stderr, r.stderr
    r = _run(cluster, *args, "--", "echo", "{fd:c}")
    assert r.returncode == 2 and "{fd:c} in the command names no stored fd" in r.stderr, r.stderr


@pytest.mark.requires("root")
def test_a_listener_is_made_with_the_rights_of_whoever_asks(cluster):
    """nobody may not bind a privileged port, nor make a socket file in a directory it cannot write:
    through cprd neither; its store stays empty and the daemon serves on."""
    shared = Shared(cluster)
    shut = os.path.join(shared.dir, "root-only")
    os.mkdir(shut, 0o755)
    for spec, says in (("http=tcp:127.0.0.1:81", "port 81 is privileged"),
                       (f"s=unix:{shut}/app.sock", "you cannot create a file in its directory")):
        r = shared.ctl(NOBODY, "run", "--name", "nb", "--listen", spec, "--", "true")
        assert r.returncode == 2 and says in r.stderr and "cprd binds with your rights" in r.stderr, r.stderr
    assert not os.listdir(shut)
    with shared.client() as c:
        assert c.fdstore("nb", "list") == [] and c.status()["pid"] == shared.proc.pid
    ok = shared.ctl(NOBODY, "run", "--name", "nb", "--listen", "http=tcp:127.0.0.1:0", "--", "true")
    assert ok.returncode == 0, ok.stderr
    with shared.client() as c:
        (row,) = c.fdstore("nb", "list")
        assert row["fdname"] == "http"


# -- cprd serve -----------------------------------------------------------------------------------
def test_restarts_start_a_ready_generation_before_the_old_one_stops_and_refuse_no_connection(cluster, tmp_path):
    cluster.source("eventfds=1")
    app = App(cluster, tmp_path)
    try:
        first = app.ready_gens()[0]["pid"]
        seen = [first]
        with Clients(app.port) as clients:
            for i in range(3):
                r = app.restart()
                assert r.returncode == 0, r.stderr
                res = json.loads(r.stdout)
                assert res["ok"] and res["retired"]["pid"] == seen[-1] and res["pid"] not in seen, res
                seen.append(res["pid"])
                app.wait(lambda: not proc.alive(seen[-2]))
            app.proc.send_signal(signal.SIGHUP)  # a reload the usual way
            app.wait(lambda: [g for g in app.ready_gens() if g["pid"] not in seen])
            seen.append(app.ready_gens()[-1]["pid"])
            app.wait(lambda: clients.pids >= {seen[-1]})
        assert not clients.failed, clients.failed[:5]
        assert clients.ok > 50 and set(seen[1:]) <= clients.pids, (clients.ok, seen, clients.pids)
        assert app.served()["restarts_done"] == 4
        with cluster.client() as c:
            assert [r["ino"] for r in c.fdstore("web", "list")] == [app.inode], "one listener all along"
        text = cluster.ctl("fdstore", "web").stdout
        assert f"generation 5: pid {seen[-1]}, ready" in text and "cprd serve pid" in text, text
        app.stop()
        assert not _children_of_serve(app.proc.pid)
        for pid in seen:
            assert not proc.alive(pid)
        # the listener stays in cprd: a connection still waits in its backlog
        socket.create_connection(("127.0.0.1", app.port), timeout=5).close()
    finally:
        app.proc.kill()


@pytest.mark.parametrize("mode, reason", [("exit", "exited before it was ready: exit status 3"),
                                          ("never-ready", "was not ready within 5 s (notify)")])
def test_a_new_generation_that_fails_is_killed_and_the_old_one_keeps_serving(cluster, tmp_path, mode, reason):
    cluster.source("eventfds=1")
    app = App(cluster, tmp_path, "web", "notify", "--ready-timeout", "5")
    try:
        old = app.ready_gens()[0]["pid"]
        app.mode.write_text(mode)
        with Clients(app.port) as clients:
            r = app.restart()
        assert r.returncode == 1, r.stdout
        res = json.loads(r.stdout)
        assert not res["ok"] and reason in res["reason"] and res["serving"]["pid"] == old, res
        # (a generation that never says it is ready may still accept from the shared queue: it is stopped
        # gracefully, so that what it accepted is answered)
        assert not clients.failed and old in clients.pids, (clients.failed[:3], clients.pids)
        text = subprocess.run([sys.executable, "-m", "cprd", "ctl", "restart", "web", "--control", cluster.control],
                              capture_output=True, text=True, timeout=60)
        assert text.returncode == 1 and "rolled back" in text.stderr and f"(pid {old}) keeps serving" in text.stderr
        app.wait(lambda: [g["pid"] for g in app.served()["generations"]] == [old])  # the failed one is gone
        assert [p.pid for p in _children_of_serve(app.proc.pid)] == [old]
        app.mode.write_text("")
        assert app.restart().returncode == 0
    finally:
        app.proc.kill()


def test_a_check_is_told_the_new_generation_and_the_restart_waits_for_it(cluster, tmp_path):
    """--ready check:CMD: the command runs with CPRD_GENERATION_PID; the old generation serves until
    the check passes for the new one."""
    cluster.source("eventfds=1")
    oks = tmp_path / "ok"
    oks.mkdir()
    starting = []

    def bless_starting() -> bool:  # what the server would do once it serves: here, the test says so
        with cluster.client() as c:
            served = c.status().get("fdstore", {}).get("web", {}).get("serve") or {}
        gens = [g for g in served.get("generations", []) if g["state"] == "starting"]
        for g in gens:
            (oks / str(g["pid"])).touch()
            starting.append(g["pid"])
        return bool(gens)

    blesser = threading.Thread(target=lambda: _until(bless_starting, 30), daemon=True)
    blesser.start()
    app = App(cluster, tmp_path, "web", f'check:test -e {oks}/"$CPRD_GENERATION_PID"')
    try:
        blesser.join(30)
        first = app.ready_gens()[0]["pid"]
        assert starting == [first]
        r = subprocess.Popen([sys.executable, "-m", "cprd", "ctl", "restart", "web", "--json", "--control",
                              cluster.control], stdout=subprocess.PIPE, text=True)
        new = app.wait(lambda: [g["pid"] for g in app.served().get("generations", []) if g["state"] == "starting"])
        time.sleep(0.5)
        assert r.poll() is None and [g["pid"] for g in app.ready_gens()] == [first], "not ready before the check"
        (oks / str(new[0])).touch()
        out, _ = r.communicate(timeout=30)
        res = json.loads(out)
        assert res["ok"] and res["pid"] == new[0] and res["retired"]["pid"] == first, res
        app.stop()
    finally:
        app.proc.kill()


def _until(what, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_generation_that_dies_is_started_again_and_connections_wait_meanwhile(cluster, tmp_path):
    cluster.source("eventfds=1")
    app = App(cluster, tmp_path)
    try:
        with Clients(app.port) as clients:
            for _ in range(2):
                pid = app.ready_gens()[0]["pid"]
                os.kill(pid, signal.SIGKILL)
                app.wait(lambda: [g for g in app.ready_gens() if g["pid"] != pid])
                n = clients.ok
                app.wait(lambda: clients.ok > n + 20)
        # what the killed server had accepted dies with it (at most one request per client each time);
        # nothing is refused: new connections wait in the listener's backlog for the next generation
        assert not clients.at_connect and len(clients.failed) <= 2 * 4, clients.failed[:8]
        assert "event=generation_died" in "".join(p.read_text() for p in cluster.dir.glob("serve-*.log"))
    finally:
        app.proc.kill()


def test_a_killed_serve_leaves_the_server_serving_and_the_next_serve_takes_it_over(cluster, tmp_path):
    cluster.source("eventfds=1")
    app = App(cluster, tmp_path)
    try:
        orphan = app.ready_gens()[0]["pid"]
        second = app.start()  # a second supervisor while the first is heard from: refused
        assert second.wait(30) == 1
        assert "is served by cprd serve pid" in "".join(p.read_text() for p in cluster.dir.glob("serve-*.log"))
        with Clients(app.port) as clients:
            app.proc.kill()
            app.proc.wait(10)
            assert _get(app.port) == orphan, "the generation serves on without its supervisor"
            app.proc = app.start()
            app.wait(lambda: [g for g in app.ready_gens() if g["pid"] != orphan])
            app.wait(lambda: not proc.alive(orphan))
        assert not clients.failed, clients.failed[:5]
        logs = "".join(p.read_text() for p in cluster.dir.glob("serve-*.log"))
        assert f"event=generation_adopted app=web gen=1 pid={orphan}" in logs
        app.stop()
    finally:
        app.proc.kill()


def test_a_killed_serve_s_generation_is_taken_over_after_cprd_was_upgraded_and_handed_off(cluster, tmp_path):
    """Who the generations are travels with the table (the store's log): a `cprd serve` started after
    the first died and cprd moved takes the orphan over and retires it; none is left serving forever."""
    src = cluster.source("eventfds=1")
    app = App(cluster, tmp_path)
    try:
        orphan = app.ready_gens()[0]["pid"]
        with Clients(app.port) as clients:
            app.proc.kill()
            app.proc.wait(10)
            assert cluster.ctl("upgrade").returncode == 0
            tgt, listen = cluster.target()
            assert cluster.ctl("handoff", "--to", listen).returncode == 0
            src.wait(30)
            with cluster.client() as c:
                assert c.status()["pid"] == tgt.pid
            assert app.served()["generations"][0]["pid"] == orphan, "the target knows the orphan"
            app.proc = app.start()
            app.wait(lambda: [g for g in app.ready_gens() if g["pid"] != orphan])
            app.wait(lambda: not proc.alive(orphan))
            new = app.ready_gens()[0]["pid"]
            app.wait(lambda: new in clients.pids)
        assert not clients.failed, clients.failed[:5]
        logs = "".join(p.read_text() for p in cluster.dir.glob("serve-*.log"))
        assert f"event=generation_adopted app=web gen=1 pid={orphan}" in logs, logs[-3000:]
        app.stop()
        assert not _children_of_serve(app.proc.pid) and not proc.alive(orphan)
    finally:
        app.proc.kill()


def test_a_record_naming_a_process_that_is_no_generation_of_the_app_gets_it_no_signal(cluster, tmp_path):
    """A supervisor's report names pids. One that names a process which leads its own session and is
    what the record says (pid, start time) but holds none of the store's fds is not taken over: the
    next `cprd serve` leaves it alone."""
    cluster.source("eventfds=1")
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        ticks = proc.start_ticks(bystander.pid)
        gen = {"gen": 1, "pid": bystander.pid, "ticks": ticks, "started": time.time(), "ready": True,
               "state": "ready"}
        with cluster.client() as c:
            c.fdstore("web", "socket")
            c.request("fdstore", app="web", action="serve", report=json.dumps(
                {"token": "f" * 16, "pid": 999999, "generations": [gen], "restarts_done": 0}))[1].close()
        app = App(cluster, tmp_path)  # waits out the forged supervisor's 3 s (its pid is gone), then serves
        try:
            app.wait(lambda: app.ready_gens())
            logs = "".join(p.read_text() for p in cluster.dir.glob("serve-*.log"))
            assert f"event=generation_not_adopted app=web pid={bystander.pid}" in logs, logs[-3000:]
            assert "event=generation_adopted" not in logs
            time.sleep(0.5)
            assert bystander.poll() is None, "a process that is no generation of the app was signalled"
            app.stop()
            assert bystander.poll() is None
        finally:
            app.proc.kill()
    finally:
        bystander.kill()
        bystander.wait()


def test_serve_keeps_serving_across_a_handoff_and_an_upgrade_of_cprd(cluster, tmp_path):
    src = cluster.source("eventfds=1")
    app = App(cluster, tmp_path)
    try:
        with Clients(app.port) as clients:
            assert cluster.ctl("upgrade").returncode == 0
            assert app.restart().returncode == 0
            tgt, listen = cluster.target()
            assert cluster.ctl("handoff", "--to", listen).returncode == 0
            src.wait(30)
            r = app.restart()
            assert r.returncode == 0, (r.stderr, cluster.logs()[-2000:])
        assert not clients.failed, clients.failed[:5]
        with cluster.client() as c:
            assert c.status()["pid"] == tgt.pid
            assert [r["ino"] for r in c.fdstore("web", "list")] == [app.inode]
        assert app.served()["restarts_done"] == 2
        app.stop()
    finally:
        app.proc.kill()
