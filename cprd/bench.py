"""`cprd bench`: measured figures, never pass/fail.

find     N finds in an N-entry table: QEMU's old way (a linear scan of a list, like its QLIST)
         against cprd's FdTable (a hash table), total ns and ratio, beside QEMU's published C figures.
handoff  for each N: the SCM_RIGHTS floor (plain sendmsg/recvmsg of N eventfds in batches of 253
         between two processes), a QEMU/Envoy-style transfer (one fd per message, no
         verification), and cprd's full handoff between two real daemons (verification included).

Every figure is the median of --reps runs. See docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import resource
import socket
import statistics
import struct
import sys
import tempfile
import time

from .kinds import Identity, Kind, mixed_spec, parse_spec, populate, spec_fds, spec_string
from .table import FdTable

QEMU_FIND_NS = {540: (936_753, 393_358), 2870: (24_102_342, 2_212_113), 7530: (152_715_916, 5_474_310)}
SCM_MAX_FD = 253
FD_OVERHEAD = 200  # fds a benchmark process needs beside the ones it measures


def add_parser(b: argparse.ArgumentParser) -> None:
    sub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    f = sub.add_parser("find", help="N finds in an N-entry table: linear list vs hash table")
    f.add_argument("--sizes", default="540,2870,7530", help="comma-separated table sizes")
    f.add_argument("--reps", type=int, default=5, help="repetitions (median reported)")
    f.add_argument("--json", action="store_true")
    h = sub.add_parser("handoff", help="handoff time vs the SCM_RIGHTS floor and one-fd-per-message")
    h.add_argument("--sizes", default="540,2870,7530,19000", help="comma-separated fd counts")
    h.add_argument("--fds", type=int, help="one size (short for --sizes N)")
    h.add_argument("--kinds", default="mixed", choices=["mixed", "eventfd", "file", "socket"])
    h.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    h.add_argument("--json", action="store_true")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        from .errors import UsageError

        raise UsageError(f"--sizes {text!r}: expected comma-separated whole numbers") from None
    return sizes


def main(a: argparse.Namespace) -> int:
    if a.bench == "find":
        rows = bench_find(_sizes(a.sizes), a.reps)
        if a.json:
            print(json.dumps(rows))
        else:
            print_find(rows)
        return 0
    sizes = [a.fds] if a.fds else _sizes(a.sizes)
    rows = bench_handoff(sizes, a.kinds, a.reps, progress=not a.json)
    if a.json:
        print(json.dumps(rows))
    else:
        print_handoff(rows)
    return 0


# -- find --------------------------------------------------------------------------------------
def bench_find(sizes: list[int], reps: int) -> list[dict]:
    rows = []
    ident = Identity(Kind.EVENTFD, 0o600, 0, 0, 2)
    for n in sizes:
        names = [(f"vfio-device-{i % 97}", i) for i in range(n)]
        # QEMU's QLIST of CprFd {name, id, fd}: a Python list of (name, id, fd), scanned comparing name and id.
        qlist = [(name, id_, 1000 + i) for i, (name, id_) in enumerate(names)]
        table = FdTable()
        for i, (name, id_) in enumerate(names):
            table.save(name, id_, 1000 + i, ident)
        list_ns, hash_ns = [], []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            for name, id_ in names:
                for e in qlist:
                    if e[0] == name and e[1] == id_:
                        break
            list_ns.append(time.perf_counter_ns() - t0)
            find = table.find_fd
            t0 = time.perf_counter_ns()
            for name, id_ in names:
                find(name, id_)
            hash_ns.append(time.perf_counter_ns() - t0)
        table._d.clear()  # the fds are fake numbers: forget them without closing
        lm, hm = statistics.median(list_ns), statistics.median(hash_ns)
        row = {"fds": n, "list_ns": int(lm), "hash_ns": int(hm), "ratio": round(lm / hm, 1), "reps": reps}
        if n in QEMU_FIND_NS:
            q_list, q_hash = QEMU_FIND_NS[n]
            row.update(qemu_qlist_ns=q_list, qemu_ghash_ns=q_hash, qemu_ratio=round(q_list / q_hash, 1))
        rows.append(row)
    return rows


def print_find(rows: list[dict]) -> None:
    print(f"{'fds':>6} {'list ns':>14} {'hash ns':>12} {'ratio':>7}   | QEMU published (C): "
          f"{'QLIST ns':>12} {'GHashTable ns':>13} {'ratio':>6}")
    for r in rows:
        q = (f"{r['qemu_qlist_ns']:>12,} {r['qemu_ghash_ns']:>13,} {r['qemu_ratio']:>6}" if "qemu_ratio" in r
             else f"{'-':>12} {'-':>13} {'-':>6}")
        print(f"{r['fds']:>6} {r['list_ns']:>14,} {r['hash_ns']:>12,} {r['ratio']:>6}x   | {'':>20}{q}")
    print("(cprd: Python, this machine, median of reps; QEMU: published figures for cpr_find_fd, for reference)")


# -- handoff -----------------------------------------------------------------------------------
def _fd_budget() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard - FD_OVERHEAD


def _raw_transfer(fds: list[int], per_msg: int) -> float:
    """ms to move fds to a forked child with sendmsg/recvmsg, per_msg fds a message; no verification.
    The child first closes the copies it inherited (so it has room for the ones it receives) and
    says when it is ready; the clock starts then."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # child: receive until all arrived, say done, then close them
        try:
            a.close()
            keep = b.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            b.send(b"r")
            n, got = len(fds), []
            anc = socket.CMSG_SPACE(per_msg * 4)
            while len(got) < n:
                _, ancdata, flags, _ = b.recvmsg(64, anc, socket.MSG_CMSG_CLOEXEC)
                if flags & socket.MSG_CTRUNC:
                    os._exit(3)
                for _lvl, _typ, blob in ancdata:
                    arr = array.array("i")
                    arr.frombytes(blob)
                    got.extend(arr)
            b.send(b"k")
            for fd in got:
                os.close(fd)
        finally:
            os._exit(0)
    b.close()
    hdr = struct.Struct("<HHi")
    if a.recv(1) != b"r":
        raise RuntimeError("benchmark receiver did not start")
    t0 = time.perf_counter()
    for i in range(0, len(fds), per_msg):
        chunk = fds[i:i + per_msg]
        a.sendmsg([hdr.pack(len(chunk), 0, i)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))])
    a.recv(1)
    ms = (time.perf_counter() - t0) * 1e3
    _, status = os.waitpid(pid, 0)
    a.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark receiver failed with status {status}")
    return ms


def _counts(kinds: str, n: int) -> dict[str, int]:
    if kinds == "mixed":
        return mixed_spec(n)
    key = {"eventfd": "eventfds", "file": "files", "socket": "sockets"}[kinds]
    return parse_spec(f"{key}={n // 2 if key == 'sockets' else n}")


def _cprd_handoffs(counts: dict[str, int], reps: int, d: str) -> list[dict]:
    """Start a populated source and hand it along a chain of reps targets; each handoff's result."""
    from .client import Client
    from .procs import spawn, stop, wait_for_socket

    control = os.path.join(d, "control.sock")
    procs = [spawn(["source", "--control", control, "--populate", spec_string(counts), "--state-dir",
                    os.path.join(d, "state")])]
    results = []
    try:
        wait_for_socket(control, procs[0])
        for r in range(reps):
            listen = os.path.join(d, f"handoff-{r}.sock")
            procs.append(spawn(["target", "--listen", listen]))
            wait_for_socket(listen, procs[-1])
            with Client(control) as c:
                c.status()  # the source is populated and serving
                results.append(c.handoff(listen))
            procs[-2].wait(60)
    finally:
        for p in procs:
            stop(p)
    return results


def bench_handoff(sizes: list[int], kinds: str, reps: int, progress: bool = False) -> list[dict]:
    budget = _fd_budget()
    rows = []
    for n in sizes:
        counts = _counts(kinds, n)
        total = spec_fds(counts)
        if total > budget:
            note = (f"skipped: {total} fds need more than this machine's fd limit allows per process "
                    f"(RLIMIT_NOFILE hard limit {budget + FD_OVERHEAD}, {FD_OVERHEAD} kept for the process)")
            rows.append({"fds": total, "skipped": note})
            if progress:
                print(f"  N={total}: {note}", file=sys.stderr)
            continue
        if progress:
            print(f"  N={total}: measuring ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="cprd-bench-") as d:
            os.chmod(d, 0o700)
            floor, one = [], []
            evs = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(total)]
            try:
                for _ in range(reps):
                    floor.append(_raw_transfer(evs, SCM_MAX_FD))
            finally:
                for fd in evs:
                    os.close(fd)
            mixed = [fd for _, _, fd in populate(counts, os.path.join(d, "raw"))]
            try:
                for _ in range(reps):
                    one.append(_raw_transfer(mixed, 1))
            finally:
                for fd in mixed:
                    os.close(fd)
            res = _cprd_handoffs(counts, reps, d)
        fm, om = statistics.median(floor), statistics.median(one)
        hm = statistics.median(r["ms"] for r in res)
        rows.append({
            "fds": total, "kinds": kinds, "reps": reps,
            "floor_ms": round(fm, 3), "one_per_message_ms": round(om, 3), "handoff_ms": round(hm, 3),
            # In this version the source's table is frozen for mutations for the whole handoff.
            "freeze_ms": round(hm, 3),
            "handoff_vs_floor": round(hm / fm, 2), "one_per_message_vs_handoff": round(om / hm, 2),
            "handoff_us_per_fd": round(hm * 1e3 / total, 3),
            "phases_ms": {k: round(statistics.median(r["phases_ms"][k] for r in res), 3)
                          for k in res[0]["phases_ms"]},
        })
    return rows


def print_handoff(rows: list[dict]) -> None:
    print(f"{'fds':>6} {'floor ms':>9} {'1/msg ms':>9} {'cprd ms':>8} {'x floor':>8} {'1/msg ÷ cprd':>12} "
          f"{'us/fd':>6} {'freeze ms':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['fds']:>6} {r['skipped']}")
            continue
        print(f"{r['fds']:>6} {r['floor_ms']:>9.2f} {r['one_per_message_ms']:>9.2f} {r['handoff_ms']:>8.2f} "
              f"{r['handoff_vs_floor']:>7.1f}x {r['one_per_message_vs_handoff']:>11.1f}x "
              f"{r['handoff_us_per_fd']:>6.2f} {r['freeze_ms']:>9.2f}")
    print("floor: sendmsg/recvmsg of N eventfds, 253 a message; 1/msg: the same fds as cprd's, one a message, "
          "unverified; cprd: full handoff between two daemons, verification included (median of reps)")
