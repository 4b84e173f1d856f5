"""`cprd bench standby`: what a standby costs each mutation, and how long clients wait when the daemon
is killed and its standby takes over.

1. Cost: a source with `--populate eventfds=N`, without and then with `--standby`; one client puts a
   new eventfd and deletes it again, M times; the latency of each put and each delete (every one is
   journaled to the standby before its answer).
2. Take-over: a source with `--standby`; one client loops a put of a new eventfd and a delete of
   the put KEEP before it (each retried with the same request id across the take-over); K times,
   SIGKILL to whichever daemon serves, once its standby is up. For each kill: the longest a request
   sent from 50 ms before the kill to 1 s after it waited for its answer, and the new daemon's own
   figure (from the death seen to serving). The table must then hold exactly the last KEEP puts.

What this module may know: processes, the client.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any

from .. import proc
from ..client import Client
from .procs import cprd_cmd, stop, wait_for_socket

KEEP = 100  # puts the take-over churn keeps in the table (each older one is deleted)


def _source(d: str, control: str, fds: int, standby: bool) -> subprocess.Popen:
    log = open(os.path.join(d, "daemon.log"), "ab")
    p = subprocess.Popen(cprd_cmd("source", "--control", control, "--populate", f"eventfds={fds}",
                                  "--state-dir", os.path.join(d, "state"), *(["--standby"] if standby else []),
                                  log_level="info"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    wait_for_socket(control, p)
    return p


def _up(control: str, daemon: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(control, timeout=5) as c:
                st = c.status()
            sb = st.get("standby") or {}
            if st["pid"] == daemon and sb.get("state") == "up":
                return sb["pid"]
        except Exception:  # noqa: BLE001 - not serving yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the standby never came up")
        time.sleep(0.01)


def _pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    at = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 3)  # noqa: E731
    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(xs[-1] * 1e3, 3)}


def _cost(d: str, fds: int, mutations: int, standby: bool) -> dict[str, Any]:
    control = os.path.join(d, f"c-{int(standby)}.sock")
    p = _source(d, control, fds, standby)
    try:
        if standby:
            _up(control, p.pid)
        puts, dels = [], []
        with Client(control, timeout=30) as c:
            for i in range(mutations):
                ev = os.eventfd(0)
                try:
                    t = time.perf_counter()
                    c.put("bench", i, ev)
                    puts.append(time.perf_counter() - t)
                finally:
                    os.close(ev)
                t = time.perf_counter()
                c.delete("bench", i)
                dels.append(time.perf_counter() - t)
        return {"standby": standby, "put": _pct(puts), "del": _pct(dels)}
    finally:
        stop(p)


def _takeovers(d: str, fds: int, kills: int) -> dict[str, Any]:
    control = os.path.join(d, "k.sock")
    p = _source(d, control, fds, True)
    done: list[tuple[float, float]] = []  # (start, seconds) of each acknowledged put
    failed: list[str] = []
    stop_ev = threading.Event()

    def churn() -> None:
        i = 0
        with Client(control, timeout=30, retry_for=30) as c:
            while not stop_ev.is_set():
                ev = os.eventfd(0)
                t = time.monotonic()
                try:
                    c.put("k", i, ev)
                    done.append((t, time.monotonic() - t))
                    if i >= KEEP:  # the table stays the same size: the oldest put goes
                        t = time.monotonic()
                        c.delete("k", i - KEEP)
                        done.append((t, time.monotonic() - t))
                except Exception as e:  # noqa: BLE001 - a figure
                    failed.append(f"{type(e).__name__}: {e}")
                finally:
                    os.close(ev)
                i += 1
        last[0] = i

    rows = []
    last = [0]
    daemons = [p.pid]
    try:
        _up(control, p.pid)
        th = threading.Thread(target=churn, daemon=True)
        th.start()
        daemon = p.pid
        for _ in range(kills):
            standby = _up(control, daemon)
            time.sleep(0.2)
            t_kill = time.monotonic()
            os.kill(daemon, signal.SIGKILL)
            daemon = standby
            daemons.append(daemon)
            _up(control, daemon)
            time.sleep(0.2)
            # the requests in flight at the kill, or sent until the standby serves
            around = [s for t, s in done if t_kill - 0.05 <= t <= t_kill + 1.0]
            rows.append({"longest_wait_ms": round(max(around) * 1e3, 1) if around else None})
        stop_ev.set()
        th.join(60)
        with open(os.path.join(d, "daemon.log"), errors="replace") as f:
            figures = [float(x.split("ms=")[1].split()[0]) for x in f if "event=took_over" in x]
        with Client(control, timeout=30) as c:
            served = sorted(e["id"] for e in c.ls() if e["name"] == "k")
        want = list(range(max(0, last[0] - KEEP), last[0]))
        served = len(served) if served == want else f"{len(served)}, not the {len(want)} acknowledged: {served[:5]}"
        waits = [r["longest_wait_ms"] for r in rows if r["longest_wait_ms"] is not None]
        return {"kills": rows, "failed": failed[:5], "failures": len(failed), "acknowledged": len(done),
                "served": served, "longest_wait_ms": _spread(waits), "takeover_ms": _spread(figures)}
    finally:
        stop_ev.set()
        _end(daemons[-1])  # the one that serves: SIGTERM retires its standby (a SIGKILL would make it take over)
        for pid in daemons[:-1]:
            _end(pid)
        stop(p)


def _end(pid: int) -> None:
    """SIGTERM (a daemon retires its standby), then SIGKILL after 10 s."""
    pidfd = proc.pidfd_open(pid)
    if pidfd is None:
        return
    try:
        proc.signal_pidfd(pidfd, signal.SIGTERM)
        if not proc.wait_ended(pidfd, 10.0):
            proc.signal_pidfd(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _spread(xs: list[float]) -> dict[str, float] | None:
    return {"min": min(xs), "median": round(statistics.median(xs), 1), "max": max(xs)} if xs else None


def bench_standby(fds: int, mutations: int, kills: int) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="cprd-bench-")
    try:
        cost = [_cost(d, fds, mutations, False), _cost(d, fds, mutations, True)]
        return {"fds": fds, "mutations": mutations, "cost": cost, "takeover": _takeovers(d, fds, kills)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def print_standby(r: dict[str, Any]) -> None:
    print(f"cprd bench standby: {r['fds']} entries, {r['mutations']} puts and deletes from one client")
    for row in r["cost"]:
        name = "with a standby   " if row["standby"] else "without a standby"
        print(f"  {name}: put p50 {row['put']['p50_ms']} ms p99 {row['put']['p99_ms']} ms; "
              f"del p50 {row['del']['p50_ms']} ms p99 {row['del']['p99_ms']} ms")
    t = r["takeover"]
    print(f"  take-over after SIGKILL ({len(t['kills'])} kills, a client putting all along): longest wait for an "
          f"answer {t['longest_wait_ms']} ms; the standby's own figure (death seen -> serving) {t['takeover_ms']} ms")
    print(f"  requests acknowledged {t['acknowledged']}, failed {t['failures']}; the table holds the last puts: "
          f"{t['served']}")
