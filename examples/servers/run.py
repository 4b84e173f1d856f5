"""Run gunicorn, uvicorn, lighttpd or nginx, unmodified, under `cprd serve` on a listener cprd keeps,
and keep wrk on it while the server is restarted, killed with SIGKILL, and cprd itself is handed
off and upgraded. Prints a JSON summary; exits 0 only if nothing that must hold broke.

    python examples/servers/run.py {gunicorn,uvicorn,lighttpd,nginx} [--threads 2] [--connections 16]

What happens (README.md says why each server is started as it is):

1. A `cprd source` starts in a private temporary directory.
2. `cprd run --name SERVER-demo --listen http=tcp:127.0.0.1:0 -- python -c ...` makes the listener
   (port chosen by the kernel) and keeps it in the app's store; the server's config gets that port.
3. `cprd serve --name SERVER-demo --listen http=tcp:127.0.0.1:PORT ... -- SERVER ...` starts the
   server on that very socket.
4. Six wrk runs, three with keep-alive, then three with `Connection: close`: during the first of
   each three, a handoff of cprd to a new `cprd target` and an in-place upgrade of cprd; during
   the second, `cprd ctl restart` three times; during the third, SIGKILL to the server's main
   process (`cprd serve` starts a new generation). One kind of step per run: its error counts say
   what they come from.
5. After each step: the store still holds the same socket (inode), a new connection is accepted by
   the current generation and answered 200, the generation listens on no socket of its own, and
   wrk gets answers again.
6. SIGTERM to `cprd serve`: it stops the server gracefully and exits 0, and no process of any
   generation is left.

What must hold (else "problems" lists it and the exit code is 1): every restart, handoff and
upgrade took; the same listener throughout; after each step the current generation answers; no
wrk connect error, timeout or non-2xx; nothing left at the end. wrk's read and write errors are
reported, not judged: a SIGKILL breaks the connections the killed process held, and a graceful stop
may close an idle keep-alive connection just as wrk sends its next request on it (README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LUA = HERE / "wrk_report.lua"
# Each wrk run covers steps of one kind, so that its error counts say what they come from.
PHASES = tuple((mode, steps) for mode in ("keep-alive", "close")
               for steps in (("handoff", "upgrade"), ("restart", "restart", "restart"), ("kill-9",)))
STEP_TIMEOUT_S = 60.0  # every wait below has a deadline; this is the longest


class Failed(Exception):
    """A step could not even be carried out; the message says which and why."""


def binary(name: str) -> str | None:
    """The program `name` on $PATH, or in /usr/sbin (not on a user's $PATH on Debian)."""
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)


def _gunicorn_has_control_socket() -> bool:
    try:
        from gunicorn import config
    except ImportError:
        return False
    return any(getattr(s, "name", None) == "control_socket" for s in config.KNOWN_SETTINGS)


# -- the servers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    name: str
    ready: str  # cprd serve --ready
    stop_signal: str  # cprd serve --stop-signal: the server's graceful stop
    dialect: str = "systemd"
    drain: float = 10.0
    nodelay: bool = False  # set TCP_NODELAY on the listener (accepted sockets inherit it): see uvicorn

    @property
    def app(self) -> str:
        return f"{self.name}-demo"

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        if self.name in ("gunicorn", "uvicorn"):
            try:
                __import__(self.name)
            except ImportError:
                return f"{self.name} is not installed (pip install {self.name})"
            return None
        if binary(self.name) is None:
            package = "nginx-light" if self.name == "nginx" else self.name
            return f"{self.name} is not installed (Debian: apt-get install {package})"
        return None

    def command(self, work: Path, port: int) -> list[str]:
        """Write what the server needs into `work` (its config, for port) and return its command."""
        if self.name == "gunicorn":
            # No --bind: gunicorn takes LISTEN_FDS itself (README.md: --bind fd://{fd:http} as well would
            # make it take fd 3 twice). Its control socket (gunicorn >= 24) would be one path in $HOME for
            # every generation: not wanted here.
            extra = ["--no-control-socket"] if _gunicorn_has_control_socket() else []
            return [sys.executable, "-m", "gunicorn", "--chdir", str(HERE), "--workers", "2",
                    "--graceful-timeout", "10", *extra, "wsgi_app:app"]
        if self.name == "uvicorn":
            return [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "--fd", "{fd:http}", "--no-access-log",
                    "asgi_app:app"]
        if self.name == "lighttpd":
            (work / "www").mkdir(exist_ok=True)
            (work / "www" / "index.txt").write_text("hello\n")
            conf = (HERE / "lighttpd.conf").read_text()
            conf = _replace(conf, 'var.basedir = "/tmp/lighttpd-demo"', f'var.basedir = "{work}"')
            conf = _replace(conf, "server.port = 8083", f"server.port = {port}")
            (work / "lighttpd.conf").write_text(conf)
            return [binary("lighttpd"), "-D", "-f", str(work / "lighttpd.conf")]
        if self.name == "nginx":
            conf = _replace((HERE / "nginx.conf").read_text(), "listen 127.0.0.1:8084;", f"listen 127.0.0.1:{port};")
            (work / "nginx.conf").write_text(conf)
            return [binary("nginx"), "-p", f"{work}/", "-c", str(work / "nginx.conf"), "-e", "error.log"]
        raise ValueError(self.name)


def _replace(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise Failed(f"the example's config no longer holds {old!r} exactly once")
    return text.replace(old, new)


SERVERS = {s.name: s for s in (
    Server("gunicorn", ready="notify", stop_signal="TERM"),  # its arbiter sends READY=1 itself
    # uvicorn --fd wraps the fd as an AF_UNIX socket object, so asyncio never sets TCP_NODELAY on the
    # connections it accepts and every keep-alive answer waits for a delayed ACK (about 40 ms); a
    # listener with TCP_NODELAY passes it on to them (README.md)
    Server("uvicorn", ready="delay:1", stop_signal="TERM", nodelay=True),
    Server("lighttpd", ready="delay:0.5", stop_signal="INT"),  # 1.4: INT graceful, TERM immediate
    Server("nginx", ready="delay:0.5", stop_signal="QUIT", dialect="nginx"),  # QUIT graceful, TERM fast
)}


# -- cprd -----------------------------------------------------------------------------------------
class Cprd:
    """The cprd daemon that keeps the app's store: `cprd ctl` on its control socket, and a handoff to
    a new `cprd target` that `new_target` starts (it returns the target's --listen path)."""

    def __init__(self, control: str, new_target: Callable[[], str]) -> None:
        self.control, self.new_target = control, new_target

    def run(self, *args: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
        env = {**os.environ, "CPRD_CONTROL": self.control}
        return subprocess.run([sys.executable, "-m", "cprd", *args], env=env, capture_output=True, text=True,
                              check=False, timeout=timeout, stdin=subprocess.DEVNULL)

    def ctl_json(self, *args: str, ok_codes: tuple[int, ...] = (0,)):
        r = self.run("ctl", *args, "--json")
        if r.returncode not in ok_codes or not r.stdout.strip():
            raise Failed(f"cprd ctl {' '.join(args)}: exit code {r.returncode}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def status(self) -> dict:
        """`cprd ctl status --json`, asked through the client library (no new process: it is polled)."""
        from cprd.client import Client

        with Client(self.control, timeout=STEP_TIMEOUT_S) as c:
            return c.status()

    def served(self, app: str) -> dict:
        """The app's `cprd serve` as the daemon knows it: pid, generations, restarts, results."""
        return self.status().get("fdstore", {}).get(app, {}).get("serve") or {}

    def listeners(self, app: str) -> list[int]:
        """The inodes of the fds stored under the name `http` (`cprd ctl fdstore APP --json`)."""
        return [r["ino"] for r in self.ctl_json("fdstore", app) if r["fdname"] == "http"]

    def handoff(self) -> dict:
        res = self.ctl_json("handoff", "--to", self.new_target())
        if self.status()["pid"] != res["target_pid"]:
            raise Failed(f"after the handoff the control socket is not served by the target: {res}")
        return res

    def upgrade(self) -> dict:
        res = self.ctl_json("upgrade", ok_codes=(0, 1))
        if res["rolled_back"]:
            raise Failed(f"the cprd upgrade was rolled back: {res.get('reason')}")
        return res


# -- wrk --------------------------------------------------------------------------------------------
class Wrk:
    """wrk with wrk_report.lua: counts the answers as they come, and the summary when stopped."""

    def __init__(self, port: int, mode: str, threads: int, connections: int) -> None:
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", "-d600s", "--timeout", "10s", "-s", str(LUA)]
        if mode == "close":
            cmd += ["-H", "Connection: close"]
        self.cmd = [*cmd, f"http://127.0.0.1:{port}/"]
        self.answered, self.pids, self.summary, self.other = 0, set(), None, []
        self.eof = False
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                with self.cond:
                    if line.startswith("answered "):
                        self.answered += int(line.split()[1])
                    elif line.startswith("pid "):
                        self.pids.add(int(line.split()[1]))
                    elif line.startswith("{"):
                        self.summary = json.loads(line)
                    else:
                        self.other.append(line)
                    self.cond.notify_all()
        except Exception as e:  # noqa: BLE001 - said in stop(), never lost in a thread
            self.other.append(f"reading wrk's output failed: {e!r}\n")
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def wait_answered(self, more: int, since: int | None = None, timeout: float = STEP_TIMEOUT_S) -> int:
        """Wait until wrk got `more` answers after `since` (default: now); return how long it took, in ms."""
        t0 = time.monotonic()
        with self.cond:
            target = (self.answered if since is None else since) + more
            if not self.cond.wait_for(lambda: self.answered >= target or self.eof, timeout):
                raise Failed(f"wrk got no {more} answers within {timeout:.0f} s (it has {self.answered})")
            if self.answered < target:
                raise Failed(f"wrk ended early: {''.join(self.other)[-2000:]}")
        return round((time.monotonic() - t0) * 1e3)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # wrk stops and prints its summary
        try:
            self.proc.wait(30)
        finally:
            self.kill()
        self.thread.join(30)
        if self.summary is None:
            raise Failed(f"wrk printed no summary (exit code {self.proc.returncode}):\n{''.join(self.other)[-2000:]}")
        return {**self.summary, "pids": sorted(self.pids)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- what the kernel says -----------------------------------------------------------------------------
def _tcp_rows(port: int):
    """(local port, remote port, state, inode) of the IPv4 TCP sockets on 127.0.0.1 with local port `port`."""
    key = f"0100007F:{port:04X} "
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            if key not in line:
                continue
            fields = line.split()
            local, remote = fields[1], fields[2]
            if local.startswith(key.strip()):
                yield int(local.split(":")[1], 16), int(remote.split(":")[1], 16), fields[3], int(fields[9])


def listening_inodes() -> set[int]:
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A":
                    out.add(int(fields[9]))
    return out


def socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def session_pids(sids: set[int]) -> list[int]:
    """Every live process (zombies left out) whose session is one of `sids`: each generation of
    `cprd serve` is a session of its own, whose id is its main pid."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.getsid(pid) not in sids:
                continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    continue
        except OSError:
            continue
        out.append(pid)
    return out


# -- one server under load ------------------------------------------------------------------------------
class Exercise:
    def __init__(self, server: Server, cprd: Cprd, work: Path, threads: int = 2, connections: int = 16,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.s, self.cprd, self.work = server, cprd, Path(work)
        self.threads, self.connections, self.log = threads, connections, log
        self.sessions: set[int] = set()  # every generation's pid (= its session id) ever seen
        self.problems: list[str] = []
        self.serve: subprocess.Popen | None = None
        self.wrk: Wrk | None = None

    # the whole run
    def run(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            return self._run()
        finally:
            self._cleanup()

    def _run(self) -> dict:
        s = self.s
        self.port = self.make_listener()
        cmd = s.command(self.work, self.port)
        self.start_serve(cmd)
        first = self.wait_generation(lambda g: True, "the first generation to be ready")
        (self.inode,) = self.cprd.listeners(s.app)
        self.log(f"{s.name}: pid {first} serves 127.0.0.1:{self.port} (listener inode {self.inode})")
        summary = {"server": s.name, "app": s.app, "port": self.port, "listener_inode": self.inode,
                   "serve": self.serve_argv, "phases": []}
        self.check_answers(first, self.inode, "start")
        for mode, steps in PHASES:
            summary["phases"].append(self.phase(mode, steps))
        summary["restarts_done"] = self.cprd.served(s.app).get("restarts_done")
        summary["stopped"] = self.stop_serve()
        summary["generations_seen"] = len(self.sessions)
        summary["problems"] = self.problems
        return summary

    def make_listener(self) -> int:
        """`cprd run` makes the listener (port 0: the kernel picks one) and keeps it in the store; its
        program prints the port, so that the server's config can say it (and sets TCP_NODELAY on the
        socket when the server needs that: the very socket every generation gets)."""
        program = "import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); print(s.getsockname()[1])"
        if self.s.nodelay:
            program += "; s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)"
        r = self.cprd.run("run", "--name", self.s.app, "--listen", "http=tcp:127.0.0.1:0", "--", sys.executable,
                          "-c", program, "{fd:http}")
        if r.returncode != 0:
            raise Failed(f"cprd run could not make the listener: {r.stderr.strip()}")
        return int(r.stdout)

    def start_serve(self, cmd: list[str]) -> None:
        s = self.s
        self.serve_argv = ["cprd", "serve", "--name", s.app, "--listen", f"http=tcp:127.0.0.1:{self.port}",
                           "--dialect", s.dialect, "--ready", s.ready, "--ready-timeout", "30", "--stop-signal",
                           s.stop_signal, "--drain", f"{s.drain:g}", "--", *cmd]
        with open(self.work / "serve.log", "ab") as log:  # cprd serve's log and the server's output
            self.serve = subprocess.Popen(
                [sys.executable, "-m", "cprd", "--log-level", "info", *self.serve_argv[1:]], cwd=self.work,
                env={**os.environ, "CPRD_CONTROL": self.cprd.control}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=log)

    def serve_log(self) -> str:
        try:
            return (self.work / "serve.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def generations(self) -> list[dict]:
        gens = self.cprd.served(self.s.app).get("generations", [])
        self.sessions.update(g["pid"] for g in gens)
        return gens

    def wait_generation(self, which: Callable[[dict], bool], what: str) -> int:
        """The pid of the newest ready generation for which `which` holds, once there is one."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            ready = [g for g in self.generations() if g["state"] == "ready" and which(g)]
            if ready:
                return max(ready, key=lambda g: g["gen"])["pid"]
            if self.serve.poll() is not None:
                raise Failed(f"cprd serve exited with code {self.serve.returncode} before {what}:\n{self.serve_log()}")
            if time.monotonic() > deadline:
                raise Failed(f"no {what} within {STEP_TIMEOUT_S:.0f} s:\n{self.serve_log()}")
            time.sleep(0.05)

    # the load and the steps
    def phase(self, mode: str, steps: tuple[str, ...]) -> dict:
        self.log(f"{self.s.name}: wrk ({mode}) during {', '.join(steps)}")
        self.wrk = Wrk(self.port, mode, self.threads, self.connections)
        done = []
        try:
            self.wrk.wait_answered(100, since=0)
            for step in steps:
                done.append(self.step(step))
        except BaseException:
            self.wrk.kill()
            raise
        wrk, self.wrk = self.wrk, None
        figures = wrk.stop()
        for k in ("connect", "timeout", "non2xx"):
            if figures[k]:
                self.problems.append(f"{mode} wrk during {'/'.join(steps)}: {k} errors {figures[k]}")
        if figures["requests"] <= 0:
            self.problems.append(f"{mode} wrk during {'/'.join(steps)}: no request answered")
        self.log(f"  wrk: {json.dumps(figures)}")
        return {"mode": mode, "steps": done, "wrk": figures}

    def step(self, step: str) -> dict:
        t0 = time.monotonic()
        rec: dict = {"step": step}
        if step == "restart":
            r = self.cprd.run("ctl", "restart", self.s.app, "--json")
            res = json.loads(r.stdout) if r.stdout.strip() else {"ok": False, "reason": r.stderr.strip()}
            rec.update(ok=bool(res.get("ok")), ready_ms=res.get("ms"))
            if not rec["ok"]:
                self.problems.append(f"restart did not take: {res.get('reason')}")
                current = self.wait_generation(lambda g: True, "a ready generation")
            else:
                self.sessions.add(res["pid"])
                current = res["pid"]
        elif step == "kill-9":
            killed = self.wait_generation(lambda g: True, "a ready generation")
            os.kill(killed, signal.SIGKILL)
            rec["killed"] = killed
            current = self.wait_generation(lambda g: g["pid"] != killed, "a new generation after the SIGKILL")
            rec["ok"] = True
        elif step == "handoff":
            res = self.cprd.handoff()
            rec.update(ok=True, to_pid=res["target_pid"])
            current = self.wait_generation(lambda g: True, "a ready generation")
        elif step == "upgrade":
            res = self.cprd.upgrade()
            rec.update(ok=True, unserved_ms=res.get("ms"))
            current = self.wait_generation(lambda g: True, "a ready generation")
        else:
            raise ValueError(step)
        rec["ms"] = round((time.monotonic() - t0) * 1e3)
        rec["pid"] = current
        inodes = self.cprd.listeners(self.s.app)
        rec["same_listener"] = inodes == [self.inode]
        if not rec["same_listener"]:
            self.problems.append(f"after {step}: the store holds {inodes} under 'http', not [{self.inode}]")
        rec.update(self.check_answers(current, self.inode, step))
        self.log(f"  {step}: {json.dumps(rec)}")
        return rec

    def check_answers(self, current: int, inode: int, step: str) -> dict:
        """After a step: the current generation accepts a new connection and answers it 200, listens on
        no socket but the kept one, and wrk gets answers again."""
        out: dict = {}
        try:
            out["probe"] = self.probe(current)
        except Failed as e:
            self.problems.append(f"after {step}: {e}")
        own = {pid: sorted((socket_inodes(pid) & listening_inodes()) - {inode}) for pid in session_pids({current})}
        own = {pid: inos for pid, inos in own.items() if inos}
        if own:
            self.problems.append(f"after {step}: the generation listens on sockets of its own: {own}")
        if self.wrk is not None:
            try:
                out["wrk_again_ms"] = self.wrk.wait_answered(100)
            except Failed as e:
                self.problems.append(f"after {step}: {e}")
        out["processes"] = session_pids({current})  # the generation's, now that it has answered
        return out

    def probe(self, current: int) -> dict:
        """New connections, until one is accepted by a process of the current generation (the previous
        one may still accept for a moment after a restart); each is answered by whoever accepted it.
        The request is sent in two parts so that the process that accepted it can be found meanwhile."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        tries, others = 0, []
        while True:
            tries += 1
            holder, sid, status = self._probe_once(deadline)
            if sid == current:
                if status != 200:
                    raise Failed(f"the current generation (pid {current}) answered {status} to a probe")
                return {"tries": tries, "accepted_by": holder, "status": status, "before": others}
            others.append({"accepted_by": holder, "status": status})
            if time.monotonic() > deadline:
                raise Failed(f"no probe was accepted by the current generation (pid {current}) in {tries} tries: "
                             f"{others[-5:]}")

    def _probe_once(self, deadline: float) -> tuple[int | None, int | None, int | None]:
        """(the pid that accepted the connection, its session, the answer's status)"""
        with socket.create_connection(("127.0.0.1", self.port), timeout=STEP_TIMEOUT_S) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n")
            me = c.getsockname()[1]
            pause = 0.002
            while not (ino := next((i for lp, rp, st, i in _tcp_rows(self.port) if rp == me and i), 0)):
                if time.monotonic() > deadline:  # (an inode once accepted: the accepted socket's)
                    raise Failed(f"nobody accepted a probe's connection within {STEP_TIMEOUT_S:.0f} s")
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            # who holds it (any process at all, if no generation seen so far does), and its session now: a
            # process of an old generation may be gone once it has answered
            holder = next((p for p in session_pids(self.sessions) if ino in socket_inodes(p)), None) or next(
                (int(p) for p in os.listdir("/proc") if p.isdigit() and ino in socket_inodes(int(p))), None)
            try:
                sid = None if holder is None else os.getsid(holder)
            except OSError:
                sid = None
            data = b""
            try:  # the rest of the request (whoever holds it may have closed it: an old generation stopping)
                c.sendall(b"\r\n")
                while chunk := c.recv(65536):
                    data += chunk
            except OSError:
                pass
        status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.") else None
        return holder, sid, int(status) if status else None

    # the end
    def stop_serve(self) -> dict:
        """SIGTERM to cprd serve: it stops every generation gracefully and exits 0; then no process of
        any generation may be left."""
        self.serve.send_signal(signal.SIGTERM)
        try:
            code = self.serve.wait(self.s.drain + 30)
        except subprocess.TimeoutExpired:
            code = None
            self.problems.append(f"cprd serve did not exit within {self.s.drain + 30:g} s of SIGTERM")
        if code != 0:
            self.problems.append(f"cprd serve exited with code {code} on SIGTERM:\n{self.serve_log()}")
        deadline = time.monotonic() + 10  # a process whose parent just exited may still be on its way out
        while (left := session_pids(self.sessions)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left_info = []
        for pid in left:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                left_info.append(f"{pid}: {cmdline}")
            except OSError:
                pass
        if left_info:
            self.problems.append(f"processes left after cprd serve stopped: {left_info}")
        return {"serve_exit": code, "left": left_info}

    def _cleanup(self) -> None:
        """Whatever happened: stop wrk, cprd serve and every generation's processes (by session)."""
        if self.wrk is not None:
            self.wrk.kill()
        if self.serve is not None and self.serve.poll() is None:
            self.serve.kill()
            self.serve.wait()
        for pid in session_pids(self.sessions):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# -- standalone ----------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("server", choices=sorted(SERVERS))
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    a = p.parse_args()
    server = SERVERS[a.server]
    for why in (server.missing(), None if shutil.which("wrk") else "wrk is not installed (apt-get install wrk)"):
        if why:
            print(f"run.py: error: {why}", file=sys.stderr)
            return 2
    from cprd.tools.procs import spawn, stop, wait_for_socket

    work = Path(tempfile.mkdtemp(prefix="cprd-servers-"))
    os.chmod(work, 0o700)
    procs: list[subprocess.Popen] = []

    def daemon(*args: str) -> subprocess.Popen:
        with open(work / f"cprd-{len(procs)}.log", "wb") as log:
            procs.append(spawn(list(args), stderr=log, log_level="info"))
        return procs[-1]

    def new_target() -> str:
        path = str(work / f"target-{len(procs)}.sock")
        wait_for_socket(path, daemon("target", "--listen", path))
        return path

    control = str(work / "control.sock")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        wait_for_socket(control, daemon("source", "--control", control))
        summary = Exercise(server, Cprd(control, new_target), work / a.server, a.threads, a.connections,
                           log=lambda s: print(s, file=sys.stderr)).run()
    except Failed as e:
        print(f"run.py: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
