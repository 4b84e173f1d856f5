"""gunicorn, uvicorn, lighttpd and nginx, unmodified, on a listener cprd keeps (examples/servers):
`cprd serve` under wrk, with and without keep-alive, across three `ctl restart`s, a SIGKILL of the
server's main process, a handoff and an in-place upgrade of cprd; and each README `cprd run` line.

Real daemons, real servers, real sockets. What every run must show: no connection refused (wrk's
connect errors), no timeout, no non-2xx; every restart took; one listener (the same inode) in the
store throughout; after each step the current generation accepts and answers; SIGTERM to cprd
serve ends every process of every generation.

Read and write errors, by what the wrk run covered (one kind of step per run, so that the counts
say where they come from):

- a handoff or an upgrade of cprd: none, with or without keep-alive (the servers never notice);
- restarts without keep-alive: none for gunicorn, lighttpd and nginx, whose graceful stop answers
  every connection it accepted. uvicorn's graceful stop closes the connections whose request it has
  not read yet (`H11Protocol.shutdown`: `cycle is None`), so a few break: at most one per wrk
  connection per restart;
- restarts with keep-alive: lighttpd, nginx and uvicorn close their idle keep-alive connections when
  stopped gracefully, and wrk, which sends its next request as soon as the last answer is in, may
  have sent one on each: at most one error per wrk connection per restart, never a refused
  connection (wrk opens a new one, which the new generation accepts). gunicorn's sync workers answer
  every request with `Connection: close`: none;
- SIGKILL: the connections the killed generation held break, and wrk's new ones wait in the backlog
  for the next generation; none is refused. Seen: at most one error per wrk connection but once
  (17 for 16, nginx with keep-alive: its workers outlive their master until cprd serve kills the
  process group); the bound asserted is two per connection.

The figures of each run are printed (pytest -rP shows them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cprd.errors import CprdError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "servers"
THREADS, CONNECTIONS = 2, 16


def _load_run():
    spec = importlib.util.spec_from_file_location("servers_run", EXAMPLE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while they are made
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


run = _load_run()

NEEDS = {"gunicorn": ("wrk", "gunicorn"), "uvicorn": ("wrk", "uvicorn"), "lighttpd": ("wrk", "lighttpd"),
         "nginx": ("wrk", "nginx")}
SERVERS = [pytest.param(name, marks=pytest.mark.requires(*NEEDS[name]), id=name) for name in NEEDS]
# restarts without keep-alive break no connection of these (see the module's docstring)
CLOSE_CLEAN = {"gunicorn", "lighttpd", "nginx"}
KEEPALIVE_CLEAN = {"gunicorn"}


def _cprd(cluster) -> run.Cprd:
    return run.Cprd(cluster.control, lambda: cluster.target()[1])


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_a_server_keeps_answering_across_restarts_a_kill_and_cprd_moving(cluster, server):
    cluster.source()
    s = run.SERVERS[server]
    summary = run.Exercise(s, _cprd(cluster), cluster.dir / server, THREADS, CONNECTIONS, log=print).run()
    print(json.dumps({"server": server, "figures": [
        {"mode": p["mode"], "steps": [st["step"] for st in p["steps"]],
         **{k: v for k, v in p["wrk"].items() if k != "pids"}} for p in summary["phases"]]}))
    assert summary["problems"] == [], "\n".join(summary["problems"])

    phases = summary["phases"]
    assert [(p["mode"], tuple(st["step"] for st in p["steps"])) for p in phases] == list(run.PHASES)
    steps = [st for p in phases for st in p["steps"]]
    assert all(st["ok"] for st in steps), steps
    assert [st["step"] for st in steps].count("restart") == 6 and summary["restarts_done"] == 6
    assert all(st["same_listener"] for st in steps), "one listener (one inode) in the store throughout"
    for st in steps:  # the generation current after the step accepted a new connection and answered it 200
        assert st["probe"]["status"] == 200 and st["probe"]["accepted_by"] in st["processes"], st
    killed = [st for st in steps if st["step"] == "kill-9"]
    assert all(st["pid"] != st["killed"] for st in killed), "a new generation after each SIGKILL"
    # every restart and every SIGKILL made a new generation; a handoff or an upgrade of cprd none
    assert summary["generations_seen"] == 1 + 6 + 2

    for p in phases:
        w, kind = p["wrk"], p["steps"][0]["step"]
        where = f"{server}, {p['mode']}, during {kind}: {w}"
        assert w["requests"] > 0 and w["connect"] == 0 and w["timeout"] == 0 and w["non2xx"] == 0, where
        broken = w["read"] + w["write"]
        if kind in ("handoff", "upgrade"):
            assert broken == 0, where
        elif kind == "restart":
            clean = CLOSE_CLEAN if p["mode"] == "close" else KEEPALIVE_CLEAN
            assert broken <= (0 if server in clean else CONNECTIONS * len(p["steps"])), where
        else:
            assert broken <= 2 * CONNECTIONS, where
        # each generation started during the run answered wrk (lighttpd's answer names no pid)
        if server != "lighttpd" and kind in ("restart", "kill-9"):
            for st in p["steps"]:
                assert set(st["processes"]) & set(w["pids"]), (st, w["pids"])
    assert summary["stopped"] == {"serve_exit": 0, "left": []}


# -- the README's `cprd run` lines ------------------------------------------------------------------
def _http_get(where: int | str, timeout: float = 30.0) -> bytes:
    """GET / on a new connection to a port of 127.0.0.1, or to a unix socket's path."""
    if isinstance(where, str):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(timeout)
        try:
            c.connect(where)
        except BaseException:
            c.close()
            raise
    else:
        c = socket.create_connection(("127.0.0.1", where), timeout=timeout)
    with c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return data


def _wait(what, timeout: float = 60.0, why: str = ""):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, why
        time.sleep(0.02)
    return got


@pytest.mark.parametrize("server", SERVERS)
def test_cprd_run_hands_the_server_the_kept_listener_and_the_next_run_the_same_one(cluster, server):
    """`cprd run` as the README says: the server answers on the listener cprd made and listens on
    nothing of its own; stopped gracefully and run again, it gets the very same socket."""
    cluster.source()
    s = run.SERVERS[server]
    work = cluster.dir / server
    work.mkdir()
    ex = run.Exercise(s, _cprd(cluster), work)
    port = ex.make_listener()  # as run.py does: `cprd run -- python` prints the port the kernel chose
    cmd = s.command(work, port)
    inodes = [_run_once(cluster, s, work, port, cmd) for _ in range(2)]
    assert inodes[0] == inodes[1], "the second run got the very socket the first one had"


def _run_once(cluster, s, work: Path, port: int, cmd: list[str]) -> int:
    """`cprd run` of the server until it answers; then its graceful stop. The listener's inode."""
    with open(work / "run.log", "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "cprd", "run", "--name", s.app, "--listen",
                              f"http=tcp:127.0.0.1:{port}", "--dialect", s.dialect, "--", *cmd], cwd=work,
                             env={**os.environ, "CPRD_CONTROL": cluster.control}, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True)  # its pid is its session's id
    stop = getattr(signal, "SIG" + s.stop_signal)
    try:
        def listening() -> dict[int, set[int]]:
            assert p.poll() is None, (work / "run.log").read_text()[-3000:]
            held = {q: run.socket_inodes(q) & run.listening_inodes() for q in run.session_pids({p.pid})}
            return {q: inos for q, inos in held.items() if inos}

        held = _wait(listening, why="the server did not take the listener")
        with cluster.client() as c:
            (row,) = [r for r in c.fdstore(s.app, "list") if r["fdname"] == "http"]
        assert all(inos == {row["ino"]} for inos in held.values()), (held, row)  # cprd's socket, only
        answer = _wait(lambda: _http_get(port), why="no answer")
        assert re.match(rb"HTTP/1\.[01] 200 ", answer), answer[:300]
    finally:
        os.kill(p.pid, stop)  # its graceful stop, as cprd serve sends it
        try:
            assert p.wait(30) in (0, -stop), (work / "run.log").read_text()[-3000:]
        finally:
            for q in run.session_pids({p.pid}):
                os.kill(q, signal.SIGKILL)
            p.wait(10)
    _wait(lambda: not run.session_pids({p.pid}), 10, "the server left processes behind")
    return row["ino"]


@pytest.mark.requires("gunicorn")
def test_gunicorn_bound_to_fd_colon_slash_slash_fd_http_serves(cluster, tmp_path):
    """`gunicorn --bind fd://{fd:http}` with --dialect fds (no LISTEN_FDS: told of fd 3 by both, gunicorn
    would take it twice and fail with EBADF)."""
    cluster.source()
    p = subprocess.Popen([sys.executable, "-m", "cprd", "run", "--name", "g", "--listen", "http=tcp:127.0.0.1:0",
                          "--dialect", "fds", "--", sys.executable, "-m", "gunicorn", "--chdir", str(EXAMPLE),
                          "--bind", "fd://{fd:http}",
                          *(["--no-control-socket"] if run._gunicorn_has_control_socket() else []), "wsgi_app:app"],
                         env={**os.environ, "CPRD_CONTROL": cluster.control}, cwd=tmp_path, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # it either exits (the bug) or answers on the socket cprd keeps
        port = _wait(lambda: _port_of(cluster, "g"), why="no listener in the store")

        def answered_or_exited() -> bytes | bool:
            if p.poll() is not None:
                return True
            try:
                return _http_get(port, timeout=1.0)
            except OSError:
                return b""

        got = _wait(answered_or_exited, why="gunicorn neither exited nor answered")
        assert p.poll() is None and got.startswith(b"HTTP/1.1 200"), p.stderr.read()[-1500:]
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(30)
        for q in run.session_pids({p.pid}):
            os.kill(q, signal.SIGKILL)
        p.stderr.close()


def _port_of(cluster, app: str) -> int:
    """The port of the listener stored for `app` (0: none yet)."""
    with cluster.client() as c:
        try:
            rows = c.fdstore(app, "list")
        except CprdError:  # no store yet
            return 0
        if not rows:
            return 0
        _, fd = c.get(f"fdstore/{app}", rows[0]["id"])
    with socket.socket(fileno=fd) as s:
        return s.getsockname()[1]


# -- a unix listener whose path a server removes ------------------------------------------------------
UNIX_CASES = [pytest.param("nginx", marks=pytest.mark.requires("nginx"), id="nginx-adopted"),
              pytest.param("gunicorn", marks=pytest.mark.requires("gunicorn"), id="gunicorn-bind-fd")]


@pytest.mark.parametrize("server", UNIX_CASES)
def test_a_unix_listener_keeps_its_path_when_a_stopping_server_removes_it(cluster, tmp_path, server):
    """Servers remove a unix socket's path as they stop even though cprd made it: nginx once its parent
    changed (a generation a new `cprd serve` adopted after the first was killed), gunicorn given
    `--bind fd://N` on every stop. cprd serve makes the path again at once from the file's second name
    (listeners.py), so the next restarts take and clients keep connecting."""
    cluster.source()
    path = str(tmp_path / "http.sock")
    if server == "nginx":
        conf = run._replace((EXAMPLE / "nginx.conf").read_text(), "listen 127.0.0.1:8084;", f"listen unix:{path};")
        (tmp_path / "nginx.conf").write_text(conf)
        opts = ["--dialect", "nginx", "--ready", "delay:0.5", "--stop-signal", "QUIT"]
        cmd = [run.binary("nginx"), "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"), "-e", "error.log"]
    else:
        opts = ["--dialect", "fds", "--ready", "notify", "--stop-signal", "TERM"]
        cmd = [sys.executable, "-m", "gunicorn", "--chdir", str(EXAMPLE), "--bind", "fd://{fd:http}",
               "--graceful-timeout", "5", *(["--no-control-socket"] if run._gunicorn_has_control_socket() else []),
               "wsgi_app:app"]
    cprd = _cprd(cluster)

    def serve() -> subprocess.Popen:
        log = open(tmp_path / "serve.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "cprd", "--log-level", "info", "serve", "--control",
                              cluster.control, "--name", "u", "--listen", f"http=unix:{path}", *opts, "--drain",
                              "10", "--", *cmd], cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        cluster.procs.append(p)
        return p

    def answers() -> bool:
        try:
            return _http_get(path, timeout=5).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    seen: set[int] = set()

    def ready() -> list[int]:
        pids = [g["pid"] for g in cprd.served("u").get("generations", []) if g["state"] == "ready"]
        seen.update(pids)
        return pids

    first = serve()
    try:
        (orphan,) = _wait(ready, why="the first generation was never ready")
        assert _wait(answers, why="no answer on the unix socket")
        if server == "nginx":
            first.kill()
            first.wait(10)
            second = serve()  # adopts the orphan and retires it once its own generation is ready
            _wait(lambda: [p for p in ready() if p != orphan] and orphan not in ready() and not run.session_pids(
                {orphan}), why="the orphan was not retired")
            assert answers(), "the adopted nginx removed the path and it was not made again"
            first = second
        for _ in range(2):
            before = ready()
            r = cprd.ctl_json("restart", "u")
            assert r["ok"], r
            _wait(lambda: not run.session_pids(set(before)), why="the old generation did not stop")
            _wait(lambda: os.path.exists(path), 5, why="the path was not made again")
            assert answers()
        log = (tmp_path / "serve.log").read_text()
        assert "event=listener_path_restored name=http" in log, log[-3000:]
        assert cprd.listeners("u") and len(cprd.listeners("u")) == 1
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
        # its last generation removed the path as it stopped; the listener stays in cprd, reachable
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(path)
    finally:
        first.kill()
        for q in run.session_pids(seen):
            os.kill(q, signal.SIGKILL)


# -- the README -----------------------------------------------------------------------------------------
def test_readme_gives_each_server_its_serve_and_run_lines_as_run_py_starts_them():
    text = (EXAMPLE / "README.md").read_text()
    for s in run.SERVERS.values():
        serve = [line for line in text.splitlines() if line.lstrip().startswith(f"cprd serve --name {s.app} ")]
        assert serve, s.name
        for line in serve:
            assert f"--ready {s.ready} " in line and f"--stop-signal {s.stop_signal} " in line, line
            assert (f"--dialect {s.dialect} " in line) == (s.dialect != "systemd"), line
        assert re.search(rf"^\s*cprd run --name {re.escape(s.app)} ", text, re.MULTILINE), s.name
    assert "python examples/servers/run.py" in text
