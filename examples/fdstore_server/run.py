"""Restart a keep-alive HTTP server 5 times under wrk, kill -9 included, while cprd itself is handed
off once and upgraded once: not one socket error, not one failed request.

    python examples/fdstore_server/run.py [--restarts 5] [--connections 16] [--settle 0.5]

The server (server.py) knows nothing of cprd: it speaks systemd's fd store protocol through
python3-systemd, and is started with `cprd run --name web -- /usr/bin/python3 server.py`. It stores
its listening socket and every connection it accepts; each restart hands them all back to the next
server, which goes on serving the same TCP connections. What this checks:

- wrk's summary: requests done, and no socket error (connect, read, write, timeout), no non-2xx;
- every server after the first got every connection back (`connections` in its ready line) and
  accepted none: no connection was dropped and opened again;
- at the end, once wrk closed its connections, the store holds only the listening socket.

Needs wrk and python3-systemd (Debian: apt-get install wrk python3-systemd).
"""

from __future__ import annotations

import argparse
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

from cprd.client import Client
from cprd.tools.procs import spawn, stop, wait_for_socket

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "server.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-systemd is
APP = "web"


class Failed(Exception):
    """A step went wrong; the message says which."""


class Server:
    """One `cprd run --name web -- server.py` and the JSON lines it prints."""

    def __init__(self, control: str, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cprd", "run", "--name", APP, "--control", control, "--",
                                      SYSTEM_PYTHON, SERVER, "--port", str(port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict] = queue.Queue()
        self.accepted = self.closed = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                print(f"  server {self.proc.pid}: {line.rstrip()}", file=sys.stderr)
                continue
            self.accepted += ev.get("event") == "accepted"
            self.closed += ev.get("event") == "closed"
            self.events.put(ev)
        self.events.put({"event": "eof"})

    def wait(self, name: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise Failed(f"server pid {self.proc.pid} did not report {name!r} within {timeout:.0f} s") from None
            if ev["event"] == name:
                return ev
            if ev["event"] == "eof":
                raise Failed(f"server pid {self.proc.pid} exited with code {self.proc.wait()} before {name!r}")

    def end(self, how: str) -> str:
        """Stop it: "term" (SIGTERM, it exits 0) or "kill" (SIGKILL, no chance to tidy up)."""
        if how == "kill":
            self.proc.kill()
            self.proc.wait(30)
            return "killed (SIGKILL)"
        self.proc.send_signal(signal.SIGTERM)
        served = self.wait("stopped")["served"]
        if self.proc.wait(30) != 0:
            raise Failed(f"server pid {self.proc.pid} exited with code {self.proc.returncode} on SIGTERM")
        return f"stopped (SIGTERM) after answering {served} requests"


def wrk_summary(out: str) -> dict[str, int]:
    m = re.search(r"^\s*(\d+) requests in ", out, re.MULTILINE)
    if m is None:
        raise Failed(f"wrk printed no summary:\n{out.strip()}")
    res = {"requests": int(m.group(1))}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res.update(zip(("connect", "read", "write", "timeout"), (int(x) for x in m.groups()) if m else (0, 0, 0, 0)))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    return res


def run(a: argparse.Namespace, work: str, procs: list[subprocess.Popen]) -> bool:
    control = os.path.join(work, "control.sock")
    with open(os.path.join(work, "cprd.log"), "wb") as log:
        src = spawn(["source", "--control", control], stderr=log)
    procs.append(src)
    wait_for_socket(control, src)
    server = Server(control, 0)
    procs.append(server.proc)
    ready = server.wait("ready")
    servers = [server]
    port = ready["port"]
    print(f"server 0: pid {ready['pid']} on 127.0.0.1:{port} (listening socket {ready['listen']}, stored in cprd "
          f"pid {src.pid} as app {APP!r})")
    wrk = subprocess.Popen(["wrk", "-t2", f"-c{a.connections}", "-d120s", "--timeout", "10s",
                            f"http://127.0.0.1:{port}/"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    procs.append(wrk)
    deadline = time.monotonic() + 30
    while server.accepted < a.connections:
        if time.monotonic() > deadline or wrk.poll() is not None:
            raise Failed(f"wrk opened {server.accepted} of {a.connections} connections")
        time.sleep(0.01)
    print(f"wrk: {a.connections} keep-alive connections, each stored in cprd")
    ok = True
    for i in range(1, a.restarts + 1):
        time.sleep(a.settle)
        how = "kill" if i % 2 else "term"
        old = servers[-1]
        ended = old.end(how)
        t0 = time.monotonic()
        new = Server(control, port)
        procs.append(new.proc)
        ready = new.wait("ready")
        servers.append(new)
        print(f"  restart {i}: pid {old.proc.pid} {ended}; pid {ready['pid']} ready in "
              f"{(time.monotonic() - t0) * 1e3:.0f} ms with {ready['connections']} connections back")
        if ready["listen"] != "stored" or ready["connections"] != a.connections:
            print(f"    FAILED: expected the stored listening socket and {a.connections} connections")
            ok = False
        if i == 2:
            print("  " + handoff(control, work, procs))
        elif i == 4:
            print("  " + upgrade(control))
    time.sleep(a.settle)
    wrk.send_signal(signal.SIGINT)
    out, _ = wrk.communicate(timeout=30)
    res = wrk_summary(out)
    errors = {k: v for k, v in res.items() if k != "requests" and v}
    later = sum(s.accepted for s in servers[1:])  # a connection wrk had to open again would show here
    socket_errors = sum(res[k] for k in ("connect", "read", "write", "timeout"))
    print(f"wrk: {res['requests']} requests done, socket errors {socket_errors}, non-2xx {res['non2xx']}"
          + (f" ({errors})" if errors else ""))
    print(f"connections accepted after the first server: {later} (every restart got them all back)")
    deadline = time.monotonic() + 30
    while True:  # wrk closed its connections: the last server sees each close and removes it from the store
        with Client(control) as c:
            left = [r["fdname"] for r in c.fdstore(APP, "list")]
        if left == ["listen"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(f"store after wrk closed its connections: {left}")
    ok = ok and res["requests"] > 0 and not errors and later == 0 and left == ["listen"]
    print(f"  {servers[-1].end('term')}")
    with Client(control) as c:
        c.fdstore(APP, "clean")
    return ok


def handoff(control: str, work: str, procs: list[subprocess.Popen]) -> str:
    listen = os.path.join(work, "handoff.sock")
    with open(os.path.join(work, "cprd-target.log"), "wb") as log:
        tgt = spawn(["target", "--listen", listen], stderr=log)
    procs.append(tgt)
    wait_for_socket(listen, tgt)
    with Client(control, timeout=120, retry_for=0) as c:
        res = c.handoff(listen)
    return f"cprd handed off to pid {res['target_pid']}: {res['entries']} entries in {res['ms']:.1f} ms"


def upgrade(control: str) -> str:
    with Client(control, timeout=120, retry_for=0) as c:
        res, fds = c.request("upgrade", program="")
        fds.close()
    if res["rolled_back"]:
        raise Failed(f"the cprd upgrade was rolled back: {res['reason']}")
    return f"cprd upgraded in place: pid {res['pid']}, {res['entries']} entries, {res['ms']:.0f} ms unserved"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--restarts", type=int, default=5, help="server restarts, odd ones by SIGKILL (default 5)")
    p.add_argument("--connections", type=int, default=16, help="wrk keep-alive connections (default 16)")
    p.add_argument("--settle", type=float, default=0.5, help="seconds of load between steps (default 0.5)")
    a = p.parse_args()
    for tool, package in (("wrk", "wrk"),):
        if shutil.which(tool) is None:
            print(f"run.py: error: {tool} is not installed (Debian: apt-get install {package})", file=sys.stderr)
            return 2
    if subprocess.run([SYSTEM_PYTHON, "-c", "import systemd.daemon"], capture_output=True).returncode != 0:
        print(f"run.py: error: {SYSTEM_PYTHON} cannot import systemd.daemon (Debian: apt-get install "
              "python3-systemd)", file=sys.stderr)
        return 2
    if a.restarts < 4:
        print("run.py: error: --restarts must be at least 4 (cprd moves after restarts 2 and 4)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="cprd-fdstore-")
    os.chmod(work, 0o700)
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        ok = run(a, work, procs)
    except Failed as e:
        print(f"result: FAILED: {e}")
        return 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        for name in sorted(os.listdir(work)):
            if name.endswith(".log") and os.environ.get("CPRD_SHOW_LOGS"):
                with open(os.path.join(work, name), errors="replace") as f:
                    print(f.read(), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    print("result: OK" if ok else "result: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
