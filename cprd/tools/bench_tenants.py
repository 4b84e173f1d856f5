"""`cprd bench tenants`: how long the daemon's own user waits for answers while other users do their
worst (as root only: the other users are uids 65534, allowed, and 65533, not allowed).

One process of root's times `status`, each on a fresh connection (what a new `cprd ctl` does), for
S seconds: alone, then during each attack, each from three processes of the attacking uid:

cpu             (the reference) 65533 runs busy loops that touch no socket: what three busy processes cost
                root on this machine, whatever they do
connect-flood   65533 connects and closes on the control socket and on 65534's lane, as fast as it can
lane-flood      65534 connects and closes on its own lane, as fast as it can
silent          65534 holds 300 connections on its lane, half of them having sent half a frame
datagrams       65534 floods its own fd store's notify socket with datagrams the store refuses or
                drops (no FDSTORE=1, with an fd; junk text)

Reported for each phase: root's status p50, p99 and max, and how many the attackers made.
The attackers are plain Python with no cprd (another uid may not read this interpreter); they
speak the control protocol from bytes made here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

from ..errors import UsageError
from .bench_serving import TIMER, _finish, _go, _pct, _start

ALLOWED, OTHER = 65534, 65533
SYSTEM_PYTHON = "/usr/bin/python3"

CONNECT_FLOOD = r'''
import socket, sys, time
paths, seconds = sys.argv[1].split(","), float(sys.argv[2])
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
end, n, refused = time.monotonic() + seconds, 0, 0
while time.monotonic() < end:
    for p in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(p)
            n += 1
        except PermissionError:
            refused += 1
        except OSError:
            pass
        s.close()
print(n, refused)
'''

BUSY = r'''
import sys, time
seconds = float(sys.argv[1])
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    n += 1
print(n, 0)
'''

SILENT = r'''
import socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
held = []
for i in range(100):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
        if i % 2:
            s.send(b"CPRC")
    except OSError:
        s.close()
        continue
    held.append(s)
time.sleep(seconds)
print(len(held), 0)
'''

DATAGRAMS = r'''
import array, json, os, socket, sys, time
lane, request, seconds = sys.argv[1], bytes.fromhex(sys.argv[2]), float(sys.argv[3])
c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
c.settimeout(30)  # a daemon that does not answer ends the benchmark, never hangs it
c.connect(lane)
c.send(request)
reply = json.loads(c.recv(65536)[12:])
path = reply["result"]["socket"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(path)
ev = os.eventfd(0)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    try:
        if n % 2:
            s.sendmsg([b"NOT_A_STORE=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ev]))])
        else:
            s.send(b"\0junk\0" * 100)
        n += 1
    except BlockingIOError:
        time.sleep(0.0005)
    except OSError:
        time.sleep(0.001)
print(n, 0)
'''


def _as(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON]


def bench_tenants(seconds: float) -> dict[str, Any]:
    from ..protocol import control as cp
    from .procs import spawn, stop, wait_for_socket

    if os.geteuid() != 0:
        raise UsageError("cprd bench tenants runs as root: it acts as uids 65534 and 65533 (setpriv)")
    if not (os.access(SYSTEM_PYTHON, os.X_OK) and shutil.which("setpriv")):
        raise UsageError(f"cprd bench tenants needs {SYSTEM_PYTHON} and setpriv (util-linux)")
    d = tempfile.mkdtemp(prefix="cprd-bench-")
    try:
        os.chmod(d, 0o711)
        control = os.path.join(d, "control.sock")
        lane = f"{control}.{ALLOWED}"
        src = spawn(["source", "--control", control, "--populate", "eventfds=100", "--allow-uid", str(ALLOWED)])
        try:
            wait_for_socket(control, src)
            wait_for_socket(lane, src)
            store = cp.encode_request("fdstore", app="bench-tenant", action="socket").hex()
            attacks = {
                "cpu": [[*_as(OTHER), "-c", BUSY, str(seconds)]] * 3,
                "connect-flood": [[*_as(OTHER), "-c", CONNECT_FLOOD, f"{control},{lane}", str(seconds)]] * 3,
                "lane-flood": [[*_as(ALLOWED), "-c", CONNECT_FLOOD, lane, str(seconds)]] * 3,
                "silent": [[*_as(ALLOWED), "-c", SILENT, lane, str(seconds)]] * 3,
                "datagrams": [[*_as(ALLOWED), "-c", DATAGRAMS, lane, store, str(seconds)]] * 3,
            }
            row: dict[str, Any] = {"seconds": seconds}
            for phase in ("alone", *attacks):
                timer = _start(TIMER, control, "status", str(seconds), stdin_line="[]")
                procs = [timer] + [_start_raw(argv) for argv in attacks.get(phase, [])]
                _go(procs)
                lat = [x[1] * 1e3 for x in json.loads(_finish(timer))]
                made = [tuple(map(int, _finish(p).split())) for p in procs[1:]]
                row[phase] = {"statuses": len(lat), "p50_ms": round(_pct(lat, 0.5), 3),
                              "p99_ms": round(_pct(lat, 0.99), 3), "max_ms": round(max(lat, default=0.0), 3),
                              **({"attacker_ops": sum(m[0] for m in made), "refused_by_kernel": sum(m[1] for m in made)}
                                 if made else {})}
        finally:
            stop(src)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return row


def _start_raw(argv: list[str]) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"an attacker did not start: {p.stderr.read()[-500:]}")
    return p


def print_tenants(row: dict[str, Any]) -> None:
    print(f"bench tenants: root's `status` on a fresh connection each, {row['seconds']:g} s a phase; attacks from "
          f"three processes of uid {OTHER} (not allowed) or {ALLOWED} (allowed)")
    for phase, r in row.items():
        if not isinstance(r, dict):
            continue
        extra = (f"  attacker ops {r['attacker_ops']}, refused by the kernel {r['refused_by_kernel']}"
                 if "attacker_ops" in r else "")
        print(f"  {phase:<14} p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  max {r['max_ms']:8.3f} ms  "
              f"({r['statuses']} statuses){extra}")
