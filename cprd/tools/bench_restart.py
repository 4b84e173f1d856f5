"""`cprd bench restart`: how long `cprd ctl restart` takes and what clients see meanwhile; and what
`cprd run` costs to start a program on a listener, beside systemd-socket-activate.

A source daemon and `cprd serve` run a small HTTP server (SERVER: it answers with its pid on a
new connection per request, says READY=1, and stops gracefully on SIGTERM). Clients (threads, one
new connection per request) run through a steady phase, then through R restarts one after the
other. For each restart: the time until the new generation was ready (serve's own figure), and
until the old one was gone. For the clients: requests served, failures (split: at connect, or
later), and latency percentiles in the steady phase and during the restarts.

What this module may know: processes, the client, sockets.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from .. import proc
from ..client import Client
from .procs import cprd_cmd, stop, wait_for_socket

# The server `cprd serve` runs here (and in the tests): LISTEN_FDS-style, graceful on SIGTERM; argv:
# the listener's fd, and a file whose content makes it exit at start ("exit") or never say READY=1.
SERVER = r"""
import os, signal, socket, sys, threading, time
mode = open(sys.argv[2]).read().strip() if len(sys.argv) > 2 and os.path.exists(sys.argv[2]) else ""
if mode == "exit":
    sys.exit(3)
ls = socket.socket(fileno=int(sys.argv[1]))
def handle(c):
    with c:
        c.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            got = c.recv(4096)
            if not got:
                return
            data += got
        body = f"{os.getpid()}\n".encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stopping.set())
if mode != "never-ready" and os.environ.get("NOTIFY_SOCKET"):
    u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    u.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
ls.settimeout(0.05)
busy = []
while not stopping.is_set():
    try:
        c, _ = ls.accept()
    except TimeoutError:
        continue
    busy.append(threading.Thread(target=handle, args=(c,), daemon=True))
    busy[-1].start()
for t in busy:  # a graceful stop: what was accepted is answered
    t.join(10)
"""


def get(port: int, timeout: float = 30.0) -> int:
    """One request on a new connection; the pid that answered. ConnectionError subclasses at connect
    are raised as ConnectFailed."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        raise ConnectFailed(f"at connect: {e}") from None
    with s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            got = s.recv(4096)
            if not got:
                break
            data += got
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"bad answer {data[:60]!r}")
    return int(body)


class ConnectFailed(ConnectionError):
    pass


class _Load:
    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.samples: list[tuple[float, float]] = []  # (when, seconds) of each request served
        self.failures: list[tuple[float, str, bool]] = []  # (when, what, at connect)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                get(self.port)
                self.samples.append((t, time.monotonic() - t))
            except Exception as e:  # noqa: BLE001 - a failure is a figure
                self.failures.append((t, f"{type(e).__name__}: {e}", isinstance(e, ConnectFailed)))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        lat = sorted(d for t, d in self.samples if t0 <= t < t1)
        fails = [f for f in self.failures if t0 <= f[0] < t1]
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 2)) if lat else (lambda q: None)
        return {"requests": len(lat), "per_s": round(len(lat) / max(t1 - t0, 1e-9)), "p50_ms": pct(0.5),
                "p99_ms": pct(0.99), "max_ms": round(lat[-1] * 1e3, 2) if lat else None,
                "failed": len(fails), "failed_at_connect": sum(1 for f in fails if f[2]),
                "failures": [f[1] for f in fails[:5]]}


def _served(c: Client, app: str) -> dict:
    return c.status().get("fdstore", {}).get(app, {}).get("serve") or {}


def _wait(what, timeout: float, why: str):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(why)
        time.sleep(0.005)


def bench_restart(restarts: int, clients: int, steady_s: float, reps: int) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="cprd-bench-")
    control = os.path.join(d, "control.sock")
    script = os.path.join(d, "server.py")
    with open(script, "w") as f:
        f.write(SERVER)
    procs: list[subprocess.Popen] = []
    try:
        src = subprocess.Popen(cprd_cmd("source", "--control", control), stdin=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        procs.append(src)
        wait_for_socket(control, src)
        serve = subprocess.Popen(cprd_cmd("serve", "--control", control, "--name", "bench", "--listen",
                                          "http=tcp:127.0.0.1:0", "--ready", "notify", "--drain", "10", "--",
                                          sys.executable, script, "{fd:http}"),
                                 stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(serve)
        with Client(control, timeout=10) as c:
            _wait(lambda: [g for g in _served(c, "bench").get("generations", []) if g["ready"]], 60,
                  "cprd serve never had a ready generation")
            (row,) = c.fdstore("bench", "list")
            _, fd = c.get("fdstore/bench", row["id"])
            with socket.socket(fileno=fd) as s:
                port = s.getsockname()[1]
            load = _Load(port, clients)
            load.start()
            try:
                t_steady = time.monotonic()
                time.sleep(steady_s)
                t_restarts = time.monotonic()
                rows = []
                for _ in range(restarts):
                    rid = uuid.uuid4().hex[:16]
                    t0 = time.monotonic()
                    c.fdstore_restart("bench", rid)
                    res = _wait(lambda: next((r for r in _served(c, "bench").get("results", [])
                                              if r["id"] == rid), None), 120, "the restart was never reported")
                    t_ready = time.monotonic()
                    old = (res.get("retired") or {}).get("pid")
                    if old:
                        _wait(lambda: not proc.alive(old), 60,
                              "the old generation never went")
                    rows.append({"ok": res["ok"], "ready_ms": round((t_ready - t0) * 1e3, 1),
                                 "serve_ready_ms": res["ms"], "old_gone_ms": round((time.monotonic() - t0) * 1e3, 1)})
                t_end = time.monotonic()
            finally:
                load.stop()
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        out = {"restarts": rows, "clients": clients,
               "ready_ms": _spread([r["ready_ms"] for r in rows]),
               "old_gone_ms": _spread([r["old_gone_ms"] for r in rows]),
               "steady": load.window(t_steady, t_restarts), "during_restarts": load.window(t_restarts, t_end)}
        out["run_start_ms"] = _run_start(control, reps)
        return out
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(d, ignore_errors=True)


def _spread(xs: list[float]) -> dict[str, float] | None:
    return {"min": min(xs), "median": round(statistics.median(xs), 1), "max": max(xs)} if xs else None


def _run_start(control: str, reps: int) -> dict[str, Any]:
    """The wall time to start a program (/bin/true) on a listener: `cprd run` (the listener kept in
    cprd, made the first time) and systemd-socket-activate (which starts it at the first connection:
    we connect at once)."""
    env = {**os.environ, "CPRD_CONTROL": control}
    cprd = []
    for _ in range(reps + 1):
        t = time.monotonic()
        subprocess.run(cprd_cmd("run", "--name", "bench-run", "--listen", "http=tcp:127.0.0.1:0", "--", "true"),
                       env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        cprd.append((time.monotonic() - t) * 1e3)
    out: dict[str, Any] = {"cprd_run": _spread([round(x, 1) for x in cprd[1:]]),
                           "cprd_run_first": round(cprd[0], 1)}
    ssa = shutil.which("systemd-socket-activate")
    if ssa is None:
        out["systemd_socket_activate"] = "not installed (Debian's systemd package has it)"
        return out
    times = []
    for _ in range(reps):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        t = time.monotonic()
        p = subprocess.Popen([ssa, "-l", f"127.0.0.1:{port}", "true"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: _connects(port), 10, "systemd-socket-activate never listened")
            p.wait(10)
        finally:
            stop(p)
        times.append(round((time.monotonic() - t) * 1e3, 1))
    out["systemd_socket_activate"] = _spread(times)
    return out


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def print_restart(r: dict[str, Any]) -> None:
    print(f"cprd bench restart: {len(r['restarts'])} restarts under {r['clients']} clients (a new connection "
          "per request)")
    print(f"  ctl restart -> new generation ready: {r['ready_ms']} ms; -> old generation gone: {r['old_gone_ms']} ms")
    for name in ("steady", "during_restarts"):
        w = r[name]
        print(f"  {name:<16} {w['requests']:>6} requests ({w['per_s']}/s), p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, "
              f"max {w['max_ms']} ms, failed {w['failed']} ({w['failed_at_connect']} at connect)")
    s = r["run_start_ms"]
    print(f"  start a program on a listener: cprd run {s['cprd_run']} ms (first, making it: {s['cprd_run_first']} ms); "
          f"systemd-socket-activate {s['systemd_socket_activate']} ms")
