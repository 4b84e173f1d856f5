"""Restart an HTTP server 20 times under load, and hand off and upgrade cprd itself meanwhile,
without one failed connection.

    python examples/zero_downtime_server/run.py [--restarts 20] [--requests N] [--port P]
                                                [--load auto|python|wrk] [--no-handoff]

What happens:

1. A `cprd source` is started in a private temporary directory (or, if $CPRD_CONTROL is set, the
   cprd serving that socket is used).
2. server.py starts: it asks cprd for ("http", 0), finds nothing, creates a listening socket on
   127.0.0.1 and stores it in cprd.
3. A load generator sends GET requests to it, a new connection for each request: `wrk` if it is
   installed (and --load is auto or wrk), else Python threads with http.client.
4. The server is restarted --restarts times. Each restart starts a new server.py, which gets the
   very same listening socket from cprd and starts accepting, and then stops the old one
   gracefully (SIGTERM: it stops accepting, answers what it accepted, exits). The socket never
   closes, so connections that arrive meanwhile wait in its backlog.
5. In the middle, cprd itself moves: once to a new process (`cprd target` + handoff) and once to a
   new program in the same process (an in-place upgrade). The servers started after that get the
   socket from the new owner.

It prints what the load generator counted and exits 0 only if every request sent was answered
(200) and no connection failed. Traffic goes only to 127.0.0.1; the load stops after the last
restart, after --requests requests (Python load) or after --timeout seconds, whichever is first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from cprd.client import Client
from cprd.errors import CprdError
from cprd.tools.procs import spawn, stop, wait_for_socket

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "server.py")
KEY = ("http", 0)


class Failed(Exception):
    """A step of the scenario went wrong; the message says which."""


# -- the servers ---------------------------------------------------------------------------------
class ServerProc:
    """One server.py child and the JSON lines it prints."""

    def __init__(self, control: str, generation: int, port: int, env: dict[str, str]) -> None:
        self.generation = generation
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--control", control, "--port", str(port),
             "--generation", str(generation)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env)
        self.events: queue.Queue[dict] = queue.Queue()
        self.ready: dict = {}
        self.served: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                print(f"  server {self.pid}: {line.rstrip()}", file=sys.stderr)
        self.events.put({"event": "eof"})

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise Failed(f"server pid {self.pid} did not report {name!r} within {timeout:.0f} s") \
                    from None
            if ev.get("event") == name:
                return ev
            if ev.get("event") == "eof":
                code = self.proc.wait()
                raise Failed(f"server pid {self.pid} exited with code {code} before it reported {name!r}")

    def wait_ready(self, timeout: float = 30.0) -> dict:
        self.ready = self.wait_event("ready", timeout)
        return self.ready

    def stop_gracefully(self, timeout: float = 30.0) -> int:
        """SIGTERM; the server stops accepting, answers what it accepted, reports and exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        self.served = int(self.wait_event("stopped", timeout)["served"])
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"server pid {self.pid} reported it stopped but did not exit") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            stop(self.proc, timeout=5)


# -- the load generators ---------------------------------------------------------------------------
@dataclass
class LoadResult:
    tool: str
    sent: int = 0
    answered: int = 0  # 200 with our body
    failed: int = 0  # connection refused/reset, timeouts, socket errors
    bad_status: int = 0  # answered, but not 200
    errors: dict[str, int] = field(default_factory=dict)
    answered_by: set[int] = field(default_factory=set)


class PythonLoad:
    """Threads that each send one GET per new connection (no keep-alive), until stopped or until
    `limit` requests were sent."""

    name = "python"

    def __init__(self, port: int, threads: int, limit: int) -> None:
        self.port, self.limit = port, limit
        self.res = LoadResult(f"python ({threads} threads, http.client, one connection per request)")
        self._errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def done(self) -> int:
        """Requests finished so far (answered or failed)."""
        with self._lock:
            return self.res.answered + self.res.failed + self.res.bad_status

    def finished(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self.res.sent >= self.limit:
                    return
                self.res.sent += 1
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                m = re.match(rb"hello from pid (\d+)", body)
                with self._lock:
                    if resp.status == 200 and m:
                        self.res.answered += 1
                        self.res.answered_by.add(int(m.group(1)))
                    else:
                        self.res.bad_status += 1
                        self._errors[f"HTTP {resp.status}"] += 1
            except (OSError, http.client.HTTPException) as e:
                with self._lock:
                    self.res.failed += 1
                    self._errors[type(e).__name__] += 1
            finally:
                conn.close()

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.res.errors = dict(self._errors)
        return self.res


class WrkLoad:
    """wrk with its default keep-alive (our server answers `Connection: close`, so wrk opens a new
    connection for every request), stopped with SIGINT, after which it prints its summary."""

    name = "wrk"

    def __init__(self, wrk: str, port: int, threads: int, connections: int, cap_s: float) -> None:
        self.argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{int(cap_s)}s", "--timeout", "10s",
                     f"http://127.0.0.1:{port}/"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def done(self) -> None:
        return None  # wrk reports only at the end

    def finished(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> LoadResult:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return parse_wrk(out, self.proc.returncode, " ".join(self.argv[1:-1]))


def parse_wrk(out: str, code: int, opts: str) -> LoadResult:
    """wrk's summary: 'N requests in ...', and, only when not zero, 'Socket errors: connect C, read R,
    write W, timeout T' and 'Non-2xx or 3xx responses: N'."""
    res = LoadResult(f"wrk ({opts}, new connection per request)")
    m = re.search(r"^\s*(\d+) requests in ", out, re.MULTILINE)
    if m is None:
        raise Failed(f"wrk exited with code {code} without a summary:\n{out.strip()}")
    done = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeout = (int(x) for x in m.groups()) if m else (0, 0, 0, 0)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    # wrk counts a request in "requests" once its response is complete; a request that broke on a
    # read, a write or a timeout was sent but never answered; a connect error never got as far.
    res.sent = done + read + write + timeout
    res.answered = done - non2xx
    res.bad_status = non2xx
    res.failed = connect + read + write + timeout
    counts = {"connect": connect, "read": read, "write": write, "timeout": timeout, "non-2xx": non2xx}
    res.errors = {k: v for k, v in counts.items() if v}
    return res


# -- cprd ------------------------------------------------------------------------------------------
class Cprd:
    """The cprd serving `control`: our own `cprd source` (and later targets) or an external one."""

    def __init__(self, work: str, external: str | None) -> None:
        self.work = work
        self.external = external is not None
        self.control = external or os.path.join(work, "control.sock")
        self.procs: list[subprocess.Popen] = []
        self.handoffs = 0
        self.upgrades = 0

    def _spawn(self, args: list[str], detached: bool = False) -> subprocess.Popen:
        if detached:  # it will own someone else's store: it must outlive us
            return subprocess.Popen([sys.executable, "-m", "cprd", "--log-level", "warning", *args],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        with open(os.path.join(self.work, f"cprd-{len(self.procs)}.log"), "wb") as log:
            p = spawn(args, stderr=log)
        self.procs.append(p)
        return p

    def start(self) -> None:
        if self.external:
            return
        p = self._spawn(["source", "--control", self.control])
        wait_for_socket(self.control, p)

    def client(self, **kw) -> Client:
        return Client(self.control, **kw)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def entry_inode(self) -> int | None:
        with self.client() as c:
            for e in c.ls():
                if (e["name"], e["id"]) == KEY:
                    return e["ino"]
        return None

    def handoff(self) -> str:
        old = self.status()["pid"]
        listen = os.path.join(self.work, f"handoff-{self.handoffs}.sock")
        tgt = self._spawn(["target", "--listen", listen], detached=self.external)
        wait_for_socket(listen, tgt)
        with self.client(timeout=120, retry_for=0) as c:
            res = c.handoff(listen)
        owner = next((p for p in self.procs if p.pid == old), None)
        if owner is not None:
            code = owner.wait(30)
            if code != 0:
                raise Failed(f"the old cprd (pid {old}) exited with code {code} after the handoff, not 0")
        if self.status()["pid"] != tgt.pid:
            raise Failed(f"after the handoff {self.control} is not served by the target pid {tgt.pid}")
        self.handoffs += 1
        return (f"cprd handoff: pid {old} -> pid {res['target_pid']}, {res['entries']} entries, "
                f"{res['ms']:.1f} ms (freeze {res.get('freeze_ms', 0):.1f} ms)")

    def upgrade(self) -> str:
        with self.client(timeout=120, retry_for=0) as c:
            before = c.status()["pid"]
            res, fds = c.request("upgrade", program="")
            fds.close()
        if res["rolled_back"]:
            raise Failed(f"the cprd upgrade was rolled back: {res['reason']}")
        if res["pid"] != before:
            raise Failed(f"the cprd upgrade changed the pid from {before} to {res['pid']}")
        self.upgrades += 1
        return (f"cprd upgrade in place: pid {res['pid']} (same pid, new program), {res['entries']} entries, "
                f"no request served for {res['ms']:.1f} ms")

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.work)):
            if name.startswith("cprd-") and name.endswith(".log"):
                with open(os.path.join(self.work, name), errors="replace") as f:
                    text = f.read().strip()
                if text:
                    out.append(f"--- {name}\n{text}")
        return "\n".join(out)


# -- the scenario ----------------------------------------------------------------------------------
def settle(load: PythonLoad | WrkLoad, requests: int, seconds: float, deadline: float) -> None:
    """Let the load run on: `requests` more requests finished (Python load), or `seconds` (wrk)."""
    start = load.done()
    if start is None:
        time.sleep(min(seconds, max(0.0, deadline - time.monotonic())))
        return
    while load.done() < start + requests and not load.finished():
        if time.monotonic() > deadline:
            raise Failed(f"the load made no progress ({load.done() - start} of {requests} requests) before "
                         "the time limit")
        time.sleep(0.005)


def run(a: argparse.Namespace) -> int:
    external = os.environ.get("CPRD_CONTROL") or None
    work = tempfile.mkdtemp(prefix="cprd-zero-downtime-")
    os.chmod(work, 0o700)
    cprd = Cprd(work, external)
    servers: list[ServerProc] = []
    load: PythonLoad | WrkLoad | None = None
    res: LoadResult | None = None
    env = dict(os.environ)
    env.pop("CPRD_CONTROL", None)
    deadline = time.monotonic() + a.timeout
    handoff_at = max(1, a.restarts // 3)
    upgrade_at = max(1, (2 * a.restarts) // 3)
    ok = False
    had_entry = True  # until we know better, never delete an entry that may not be ours
    capped = False
    try:
        cprd.start()
        had_entry = cprd.entry_inode() is not None
        if had_entry and external:
            print(f"note: {KEY} is already stored in the cprd at {cprd.control}; the servers use that socket")
        wrk = shutil.which("wrk") if a.load in ("auto", "wrk") else None
        if a.load == "wrk" and wrk is None:
            raise Failed("--load wrk: wrk is not installed (on Debian: apt-get install wrk)")

        first = ServerProc(cprd.control, 0, a.port, env)
        servers.append(first)
        ready = first.wait_ready()
        port = ready["port"]
        inode = cprd.entry_inode()
        print(f"server generation 0: pid {first.pid} listening on 127.0.0.1:{port} "
              f"(socket {ready['socket']}, stored in cprd pid {ready['cprd_pid']} as {KEY})")
        if wrk:
            load = WrkLoad(wrk, port, a.threads, a.connections, a.timeout)
        else:
            load = PythonLoad(port, a.threads, a.requests)
        load.start()
        print(f"load: {load.name}, {a.restarts} restarts to go")
        settle(load, a.settle_requests, a.settle_seconds, deadline)

        for i in range(1, a.restarts + 1):
            if i == handoff_at and not a.no_handoff:
                print(f"  {cprd.handoff()}")
            if i == upgrade_at and not a.no_upgrade:
                print(f"  {cprd.upgrade()}")
            old = servers[-1]
            t0 = time.monotonic()
            new = ServerProc(cprd.control, i, a.port, env)
            servers.append(new)
            r = new.wait_ready()
            t_ready = (time.monotonic() - t0) * 1e3
            if r["socket"] != "from-cprd" or r["port"] != port:
                raise Failed(f"server generation {i} did not get the listening socket from cprd: {r}")
            settle(load, a.settle_requests, a.settle_seconds, deadline)  # both servers accept now
            code = old.stop_gracefully()
            if code != 0:
                raise Failed(f"server pid {old.pid} exited with code {code}, not 0")
            settle(load, a.settle_requests, a.settle_seconds, deadline)  # only the new one accepts now
            print(f"  restart {i:2d}: pid {new.pid} ready in {t_ready:.0f} ms (socket from cprd pid "
                  f"{r['cprd_pid']}); pid {old.pid} stopped after answering {old.served} requests")
            if time.monotonic() > deadline:
                raise Failed(f"the time limit ({a.timeout:.0f} s) passed after {i} restarts")
            if load.finished() and i < a.restarts and not capped:
                capped = True
                print(f"  note: the load stopped after restart {i} (it sent --requests {a.requests}); "
                      "raise --requests to keep it running through every restart")
        res = load.stop()
        last = servers[-1]
        if last.stop_gracefully() != 0:
            raise Failed(f"server pid {last.pid} exited with code {last.proc.returncode}, not 0")
        if cprd.entry_inode() != inode:
            raise Failed(f"cprd no longer holds the same listening socket under {KEY}")
        ok = report(res, servers, cprd)
    except (Failed, CprdError) as e:
        print(f"zero-downtime: error: {e}", file=sys.stderr)
        logs = cprd.logs()
        if logs:
            print(logs, file=sys.stderr)
    finally:
        if load is not None and res is None:
            load.stop()
        for s in servers:
            s.kill()
        if external and not had_entry:
            try:
                with cprd.client(retry_for=5) as c:
                    c.delete(*KEY)  # release the port: the socket was ours
            except CprdError:
                pass
        cprd.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def report(res: LoadResult, servers: list[ServerProc], cprd: Cprd) -> bool:
    served = [s.served or 0 for s in servers]
    answering = sum(1 for n in served if n > 0)
    ok = res.failed == 0 and res.bad_status == 0 and res.answered == res.sent and res.sent > 0
    print(f"zero-downtime summary ({res.tool})")
    print(f"  restarts: {len(servers) - 1}, server processes: {len(servers)}, "
          f"that answered requests: {answering}")
    print(f"  cprd: handoffs {cprd.handoffs}, in-place upgrades {cprd.upgrades}, "
          f"({KEY[0]!r}, {KEY[1]}) kept the same socket throughout")
    print(f"  requests: sent {res.sent}, answered {res.answered}, failed connections {res.failed}, "
          f"non-200 {res.bad_status}")
    print(f"  the servers' own count: {sum(served)} answered")
    if res.errors:
        print(f"  errors: {', '.join(f'{k} {v}' for k, v in sorted(res.errors.items()))}")
    print("  result: OK, no request lost" if ok else
          "  result: FAILED: some requests were not answered (see above)")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description="Restart an HTTP server whose listening socket lives in cprd, "
                                "under load, and hand off and upgrade cprd meanwhile; exit 0 only if no "
                                "request failed.")
    p.add_argument("--restarts", type=int, default=20, help="server restarts (default 20)")
    p.add_argument("--requests", type=int, default=50000,
                   help="at most this many requests (Python load; default 50000); the load stops after the "
                        "last restart anyway")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: an ephemeral port)")
    p.add_argument("--load", choices=("auto", "python", "wrk"), default="auto",
                   help="load generator: wrk if installed (auto), or the Python loop")
    p.add_argument("--threads", type=int, default=4, help="load threads (default 4)")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--settle-requests", type=int, default=25,
                   help="requests the Python load completes at each step of a restart (default 25)")
    p.add_argument("--settle-seconds", type=float, default=0.1,
                   help="seconds the wrk load runs at each step of a restart (default 0.1)")
    p.add_argument("--timeout", type=float, default=120, help="give up after this many seconds (default 120)")
    p.add_argument("--no-handoff", action="store_true", help="do not hand cprd off to a new process")
    p.add_argument("--no-upgrade", action="store_true", help="do not upgrade cprd in place")
    a = p.parse_args()
    if (a.restarts < 1 or a.requests < 1 or a.threads < 1 or a.connections < a.threads
            or not 0 <= a.port < 65536):
        p.error("--restarts, --requests and --threads must be >= 1, --connections >= --threads, "
                "--port in 0..65535")

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks, which stop every child

    signal.signal(signal.SIGTERM, terminate)
    try:
        return run(a)
    except KeyboardInterrupt:
        print("zero-downtime: interrupted; stopped every process it started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
