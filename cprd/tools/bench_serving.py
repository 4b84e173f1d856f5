"""`cprd bench ls` and `cprd bench upgrade`: how long clients wait for answers, measured from
separate client processes (so that a client's own work, decoding a large reply, say, never counts
against the daemon).

ls       a table of N entries; one process times `get` of random entries on one connection for S
         seconds: alone; while another process loops `ls` (reading each reply whole, without
         decoding it); and while a third changes the table 100 times a second too (no reply to ls
         can then come from a cache). Reported: get p50, p99, max of each phase, ls per second.
upgrade  for each N: in-place upgrades of a daemon of N fds while two processes poll: one `status`
         on a fresh connection each time (a new client must be served too), one `get` on a
         connection it keeps (which the upgrade closes: the client reconnects and retries).
         unserved_ms: the longest any of their requests waited for its answer while an upgrade
         ran (from sending it, or from starting to connect, to the whole answer); ms: what the
         daemon measured (from asking the stand-in to stop to serving again).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# Times requests for `seconds` (argv: control, op, seconds, names...). Prints one JSON line:
# [[t_start, latency_s], ...] (t_start is CLOCK_MONOTONIC, the same in every process).
TIMER = r'''
import json, os, random, socket, sys, time
from cprd.client import Client
control, op, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
keys = json.loads(sys.stdin.readline())
out = []
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
end = time.monotonic() + seconds
c = Client(control, timeout=60)
while time.monotonic() < end:
    t0 = time.monotonic()
    if op == "status":
        with Client(control, timeout=60) as fresh:
            fresh.status()
    else:
        name, id_ = random.choice(keys)
        os.close(c.get(name, id_)[1])
    out.append((t0, time.monotonic() - t0))
c.close()
print(json.dumps(out))
'''

# Loops `ls` for `seconds`, reading each reply's frames whole without decoding them.
LS_LOOP = r'''
import socket, sys, time
from cprd import scm
from cprd.protocol import control as cp, frame
control, seconds = sys.argv[1], float(sys.argv[2])
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(control)
end, n, took = time.monotonic() + seconds, 0, []
while time.monotonic() < end:
    t0 = time.monotonic()
    scm.send_sync(s, cp.encode_request("ls"), [])
    while True:
        data, fds = scm.recv_sync(s, cp.MAX_FRAME, 1)
        fds.close()
        if not frame.HEADER.unpack_from(data)[3] & cp.MORE:
            break
    took.append(time.monotonic() - t0)
    n += 1
print(n, sum(took) / max(1, n))
'''


# Changes the table `rate` times a second for `seconds` (a put, then a del of it), so that no
# reply to ls can be served from a cache.
CHURN = r'''
import os, sys, time
from cprd.client import Client
control, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
end, i = time.monotonic() + seconds, 0
with Client(control, timeout=60) as c:
    while time.monotonic() < end:
        ev = os.eventfd(0, os.EFD_CLOEXEC)
        c.put("bench-churn", i % 2, ev)
        os.close(ev)
        c.delete("bench-churn", i % 2)
        i += 1
        time.sleep(1 / rate)
print(i)
'''


# Hands the daemon `closes` sockets whose last close blocks (loopback TCP, unsent data, a peer that
# never reads, SO_LINGER {1, linger}) over `seconds`: put (our copy closed), then del, so that the
# daemon closes the last reference. Holds the peers until it ends.
LINGERER = r'''
import os, sys, time
from cprd.client import Client
from cprd.tools.lingering import Lingering
control, closes, seconds, linger = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
socks = Lingering(closes + 1)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
t0 = time.monotonic()
with Client(control, timeout=120) as c:
    for i in range(closes):
        time.sleep(max(0.0, t0 + seconds * i / closes - time.monotonic()))
        fd = socks.make(linger)
        c.put("lingering", i, fd)
        os.close(fd)
        c.delete("lingering", i)
    pending = c.status().get("closes_pending", 0)
time.sleep(max(0.0, t0 + seconds - time.monotonic()))
print(pending)
'''


def bench_close(seconds: float, closes: int, linger: int) -> dict[str, Any]:
    """`cprd bench close`: get latency of one client, alone and while another makes the daemon close
    `closes` sockets whose close blocks for `linger` seconds each."""
    from .procs import stop

    with tempfile.TemporaryDirectory(prefix="cprd-bench-") as d:
        os.chmod(d, 0o700)
        src, control, keys = serving_daemon(d, 1000)
        try:
            row: dict[str, Any] = {"fds": len(keys), "seconds": seconds, "closes": closes, "linger_s": linger}
            for phase in ("alone", "attacked"):
                timer = _start(TIMER, control, "get", str(seconds), stdin_line=json.dumps(keys))
                procs = [timer]
                if phase == "attacked":
                    procs.append(_start(LINGERER, control, str(closes), str(seconds), str(linger)))
                _go(procs)
                lat = [x[1] * 1e3 for x in json.loads(_finish(timer))]
                if phase == "attacked":
                    row["closes_pending"] = int(_finish(procs[1]).strip() or 0)
                row[phase] = {"gets": len(lat), "p50_ms": round(_pct(lat, 0.5), 3), "p99_ms": round(_pct(lat, 0.99), 3),
                              "max_ms": round(max(lat, default=0.0), 3)}
        finally:
            stop(src)
    return row


def print_close(row: dict[str, Any]) -> None:
    print(f"bench close: {row['fds']} entries, {row['seconds']:g} s a phase; the attacker made the daemon close "
          f"{row['closes']} sockets that each block {row['linger_s']} s (pending at its end: "
          f"{row.get('closes_pending')})")
    for phase in ("alone", "attacked"):
        r = row[phase]
        print(f"  {phase:<9} get p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  max {r['max_ms']:8.3f} ms  "
              f"({r['gets']} gets)")


def _start(script: str, *args: str, stdin_line: str = "") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if stdin_line:
        p.stdin.write(stdin_line + "\n")
        p.stdin.flush()
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"a client process did not start: {p.stderr.read()[-500:]}")
    return p


def _go(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def _finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"a client process failed: {err.strip()[-800:]}")
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def serving_daemon(d: str, fds: int):
    """A `cprd source` of about `fds` mixed fds in directory d, once it serves: (its Popen, its control
    socket, the keys of its table)."""
    from ..populate import mixed_spec, spec_string
    from .procs import spawn, wait_for_socket
    from ..client import Client

    control = os.path.join(d, "control.sock")
    spec = spec_string(mixed_spec(fds)) if fds else ""
    src = spawn(["source", "--control", control, "--populate", spec, "--state-dir", os.path.join(d, "state")])
    wait_for_socket(control, src)
    deadline = time.monotonic() + 120
    while True:
        try:
            with Client(control) as c:
                keys = [[e["name"], e["id"]] for e in c.ls()]
                if c.status()["pid"] == src.pid:
                    return src, control, keys
        except Exception:  # noqa: BLE001 - still populating
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not start")
        time.sleep(0.05)


def bench_ls(fds: int, seconds: float) -> dict[str, Any]:
    from .procs import stop

    with tempfile.TemporaryDirectory(prefix="cprd-bench-") as d:
        os.chmod(d, 0o700)
        src, control, keys = serving_daemon(d, fds)
        try:
            row: dict[str, Any] = {"fds": len(keys), "seconds": seconds}
            for phase in ("alone", "with_ls", "with_ls_and_churn"):
                timer = _start(TIMER, control, "get", str(seconds), stdin_line=json.dumps(keys))
                procs = [timer]
                if phase != "alone":
                    procs.append(_start(LS_LOOP, control, str(seconds)))
                if phase == "with_ls_and_churn":
                    procs.append(_start(CHURN, control, str(seconds), "100"))
                _go(procs)
                lat = [x for _, x in json.loads(_finish(timer))]
                if phase != "alone":
                    n, mean = _finish(procs[1]).split()
                    row[f"ls_per_s_{phase}"] = round(int(n) / seconds, 1)
                    row[f"ls_ms_{phase}"] = round(float(mean) * 1e3, 1)
                for p in procs[2:]:
                    _finish(p)
                row[f"get_{phase}"] = {"n": len(lat), "p50_ms": round(_pct(lat, 0.5) * 1e3, 2),
                                       "p99_ms": round(_pct(lat, 0.99) * 1e3, 2),
                                       "max_ms": round(max(lat, default=0) * 1e3, 2)}
        finally:
            stop(src)
    return row


def print_ls(row: dict[str, Any]) -> None:
    print(f"get on a {row['fds']}-entry table, {row['seconds']:g} s each (one client process):")
    for phase, what in (("alone", "alone"), ("with_ls", "while ls loops"),
                        ("with_ls_and_churn", "ls loops, 100 changes/s")):
        g = row[f"get_{phase}"]
        ls = f"; {row[f'ls_per_s_{phase}']} ls/s, {row[f'ls_ms_{phase}']} ms each" if phase != "alone" else ""
        print(f"  {what:<24} p50 {g['p50_ms']:6.2f} ms  p99 {g['p99_ms']:6.2f} ms  max {g['max_ms']:7.2f} ms"
              f"  ({g['n']} gets{ls})")


def bench_upgrade(sizes: list[int], reps: int) -> list[dict[str, Any]]:
    from ..client import Client
    from .procs import stop

    rows = []
    for fds in sizes:
        with tempfile.TemporaryDirectory(prefix="cprd-bench-") as d:
            os.chmod(d, 0o700)
            src, control, keys = serving_daemon(d, fds)
            try:
                seconds = reps * 3.0 + 2
                pollers = [_start(TIMER, control, "status", str(seconds), stdin_line=json.dumps(keys)),
                           _start(TIMER, control, "get", str(seconds), stdin_line=json.dumps(keys))]
                _go(pollers)
                time.sleep(0.5)
                windows, daemon_ms, results = [], [], []
                for _ in range(reps):
                    t0 = time.monotonic()
                    with Client(control, timeout=120, retry_for=0) as c:
                        res = c.upgrade()
                    windows.append((t0, time.monotonic()))
                    if res["rolled_back"]:
                        raise RuntimeError(f"upgrade rolled back: {res['reason']}")
                    daemon_ms.append(res["ms"])
                    results.append(res)
                    time.sleep(max(0.0, 2.5 - (time.monotonic() - t0)))
                done = [json.loads(_finish(p)) for p in pollers]
            finally:
                stop(src)
        per_rep, answered = [], 0
        for a, b in windows:
            worst = 0.0
            for reqs in done:
                for t, lat in reqs:
                    if t <= b and t + lat >= a:  # waited while this upgrade ran
                        worst = max(worst, lat)
                        answered += 1
            per_rep.append(worst * 1e3)
        rows.append({"fds": len(keys), "reps": reps, "unserved_ms": round(statistics.median(per_rep), 2),
                     "unserved_ms_max": round(max(per_rep), 2), "unserved_ms_all": [round(x, 2) for x in per_rep],
                     "ms": round(statistics.median(daemon_ms), 2), "ms_max": round(max(daemon_ms), 2),
                     "upgrade_s": round(statistics.median(b - a for a, b in windows), 3),
                     "answered_during": answered, "pid_kept": all(r["pid"] == src.pid for r in results)})
    return rows


def print_upgrade(rows: list[dict[str, Any]]) -> None:
    print("in-place upgrades with a stand-in; unserved: the longest a polling client waited for an answer")
    print(f"{'fds':>7} {'reps':>4} {'unserved ms (median, max)':>26} {'daemon ms':>10} {'upgrade s':>10} "
          f"{'answered':>9} same pid")
    for r in rows:
        print(f"{r['fds']:>7} {r['reps']:>4} {r['unserved_ms']:>14.1f} {r['unserved_ms_max']:>10.1f} "
              f"{r['ms']:>10.1f} {r['upgrade_s']:>10.2f} {r['answered_during']:>9} {r['pid_kept']}")
