"""`cprd bench fdstore`: systemd's fd store protocol against cprd's own client, on one daemon.

store   S sender processes store N fds each, one fd a message: with libsystemd's
        sd_pid_notify_with_fds (FDSTORE=1, ending with sd_notify_barrier, so every fd is in the
        store when the clock stops), and with cprd's Client.put on one connection each. Each sender
        makes its fds first and starts on a common signal; the time runs from the first start to the
        last end (CLOCK_MONOTONIC is the same in every process).
start   how long `cprd run --name APP -- true` takes with N stored fds (and with none): from spawn to
        exit, the interpreter's start included, and of `cprd run ... -- systemd-notify --ready`;
        beside them a program that fetches N entries with
        Client.get on one connection, the way a program using cprd's own client would.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SD_SENDER = r'''
import ctypes, ctypes.util, json, os, sys, time
sd = ctypes.CDLL(ctypes.util.find_library("systemd") or "libsystemd.so.0")
sd.sd_pid_notify_with_fds.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                      ctypes.c_uint]
sd.sd_notify_barrier.argtypes = [ctypes.c_int, ctypes.c_uint64]
n, tag = int(sys.argv[1]), sys.argv[2]
fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]
one = (ctypes.c_int * 1)()
state = f"FDSTORE=1\nFDNAME={tag}".encode()
sys.stdin.read(1)
t0 = time.monotonic()
for fd in fds:
    one[0] = fd
    r = sd.sd_pid_notify_with_fds(0, 0, state, one, 1)
    if r <= 0:
        sys.exit(f"sd_pid_notify_with_fds: {r}")
if sd.sd_notify_barrier(0, 60_000_000) <= 0:
    sys.exit("sd_notify_barrier failed")
print(json.dumps([t0, time.monotonic()]))
'''

PUT_SENDER = r'''
import json, os, sys, time
from cprd.client import Client
n, tag, control = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]
with Client(control, timeout=120) as c:
    c.status()
    sys.stdin.read(1)
    t0 = time.monotonic()
    for i, fd in enumerate(fds):
        c.put(tag, i, fd)
    print(json.dumps([t0, time.monotonic()]))
'''

GETTER = r'''
import os, sys
from cprd.client import Client
n, tag, control = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with Client(control, timeout=120) as c:
    for i in range(n):
        os.close(c.get(tag, i)[1])
'''


def _senders(script: str, n: int, senders: int, env: dict[str, str], extra: tuple[str, ...] = ()) -> float:
    """Run the senders together; seconds from the first start to the last end."""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n), f"s{k}", *extra], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k in range(senders)]
    time.sleep(0.3 + 0.1 * senders)  # each has made its fds (and connected) by now
    outs = []
    try:
        for p in procs:
            p.stdin.write("g")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"a sender failed: {err.strip()[-500:]}")
            outs.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(t1 for _, t1 in outs) - min(t0 for t0, _ in outs)


def _wall(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed: {r.stderr.strip()[-500:]}")
    return took


def _libsystemd() -> bool:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("systemd") or "libsystemd.so.0")
    except OSError:
        return False
    return True


def bench_fdstore(n: int, senders: int, reps: int) -> dict[str, Any]:
    from ..client import Client
    from .bench_serving import serving_daemon
    from .procs import stop

    if not _libsystemd():
        raise RuntimeError("libsystemd is not installed (Debian: apt-get install libsystemd0): it is the client "
                           "this benchmark measures")
    need = n * senders * 2 + n + 200
    row: dict[str, Any] = {"fds_per_sender": n, "senders": senders, "reps": reps}
    with tempfile.TemporaryDirectory(prefix="cprd-bench-") as d:
        os.chmod(d, 0o700)
        src, control, _ = serving_daemon(d, 0)
        try:
            env = {**os.environ, "CPRD_CONTROL": control}
            sd_rates, put_rates, run_n, run_0, get_n, ready = [], [], [], [], [], []
            for rep in range(reps):
                with Client(control) as c:
                    if c.status()["fd_capacity"] < need:
                        raise RuntimeError(f"the daemon can hold {c.status()['fd_capacity']} fds; this benchmark "
                                           f"needs {need}: use fewer --fds or --senders")
                    sock = c.fdstore("sd", "socket", max_fds=n * senders)["socket"]
                    c.fdstore("sd", "clean")
                t = _senders(SD_SENDER, n, senders, {**env, "NOTIFY_SOCKET": sock})
                sd_rates.append(n * senders / t)
                with Client(control) as c:
                    stored = c.status()["fdstore"]["sd"]["fds"]
                if stored != n * senders:
                    raise RuntimeError(f"the store holds {stored} fds, not the {n * senders} sent")
                t = _senders(PUT_SENDER, n, senders, env, (control,))
                put_rates.append(n * senders / t)
                # the start of a program with n stored fds (the store keeps the newest n)
                with Client(control) as c:
                    sock = c.fdstore("run", "socket", max_fds=n)["socket"]
                    c.fdstore("run", "clean")
                    c.fdstore("empty", "socket")
                _senders(SD_SENDER, n, 1, {**env, "NOTIFY_SOCKET": sock})
                run_n.append(_wall([sys.executable, "-m", "cprd", "run", "--name", "run", "--", "true"], env))
                run_0.append(_wall([sys.executable, "-m", "cprd", "run", "--name", "empty", "--", "true"], env))
                get_n.append(_wall([sys.executable, "-c", GETTER, str(n), "s0", control], env))
                if shutil.which("systemd-notify"):
                    ready.append(_wall([sys.executable, "-m", "cprd", "run", "--name", "empty", "--",
                                        "systemd-notify", "--ready"], env))
                with Client(control) as c:  # the put entries go, for the next repetition
                    for k in range(senders):
                        for i in range(n):
                            c.delete(f"s{k}", i)
        finally:
            stop(src)
    med = statistics.median
    row.update({
        "sd_notify_fds_per_s": round(med(sd_rates)), "sd_notify_fds_per_s_range": [round(min(sd_rates)),
                                                                                   round(max(sd_rates))],
        "put_fds_per_s": round(med(put_rates)), "put_fds_per_s_range": [round(min(put_rates)),
                                                                        round(max(put_rates))],
        "run_ms": round(med(run_n) * 1e3, 1), "run_ms_range": [round(min(run_n) * 1e3, 1),
                                                               round(max(run_n) * 1e3, 1)],
        "run_empty_ms": round(med(run_0) * 1e3, 1),
        "notify_ready_ms": round(med(ready) * 1e3, 1) if ready else None,
        "get_ms": round(med(get_n) * 1e3, 1), "get_ms_range": [round(min(get_n) * 1e3, 1),
                                                               round(max(get_n) * 1e3, 1)],
    })
    return row


def print_fdstore(row: dict[str, Any]) -> None:
    n, s = row["fds_per_sender"], row["senders"]
    print(f"storing {n} fds from each of {s} senders, one fd a message (median of {row['reps']}):")
    print(f"  sd_pid_notify_with_fds (libsystemd)  {row['sd_notify_fds_per_s']:>8} fds/s  "
          f"(range {row['sd_notify_fds_per_s_range'][0]}-{row['sd_notify_fds_per_s_range'][1]})")
    print(f"  Client.put (cprd's own client)       {row['put_fds_per_s']:>8} fds/s  "
          f"(range {row['put_fds_per_s_range'][0]}-{row['put_fds_per_s_range'][1]})")
    print(f"starting a program with {n} fds (spawn to exit, the interpreter's start included):")
    print(f"  cprd run --name APP -- true          {row['run_ms']:>8} ms  "
          f"(range {row['run_ms_range'][0]}-{row['run_ms_range'][1]}; with no fds: {row['run_empty_ms']} ms)")
    print(f"  a program doing {n} Client.get        {row['get_ms']:>8} ms  "
          f"(range {row['get_ms_range'][0]}-{row['get_ms_range'][1]})")
    if row["notify_ready_ms"] is not None:
        print(f"  cprd run ... -- systemd-notify --ready {row['notify_ready_ms']:>7} ms  (spawn to exit)")
