"""`cprd bench`: measured figures, never pass/fail.

find     N finds in an N-entry table: QEMU's old way (a linear scan of a list, like its QLIST)
         against cprd's FdTable (a hash table), total ns and ratio, beside QEMU's published C figures.
handoff  for each N: the SCM_RIGHTS floor (plain sendmsg/recvmsg of N eventfds in batches of 253
         between two processes), a QEMU/Envoy-style transfer (one fd per message, no
         verification), and cprd's full handoff between two real daemons (verification included).
fdstore  systemd's fd store protocol against cprd's own client: fds stored per second from
         concurrent senders, and the time to start a program with N stored fds (bench_fdstore.py).
upgrade  in-place upgrades under polling clients; ls: get latency while ls loops (bench_serving.py).
memory   for each N: what an FdTable of N real entries costs the process that owns it, in Python
         allocations (tracemalloc) and in resident memory (RSS), per entry.

Every timing is the median of --reps runs. `--plot FILE.png` (find, handoff) draws the figures with
matplotlib, an optional extra (`pip install 'cprd[plot]'`), imported only when a plot is asked
for. See docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import platform
import resource
import socket
import statistics
import struct
import sys
import tempfile
import time
import tracemalloc

from .. import limits
from ..errors import CprdError, UsageError
from ..kinds import Identity, Kind, classify
from ..populate import mixed_spec, parse_spec, populate, spec_fds, spec_string
from ..table import FdTable

QEMU_FIND_NS = {540: (936_753, 393_358), 2870: (24_102_342, 2_212_113), 7530: (152_715_916, 5_474_310)}
SCM_MAX_FD = limits.SCM_MAX_FD
FD_OVERHEAD = 200  # fds a benchmark process needs beside the ones it measures
MEMORY_GOAL_BYTES = 1024  # per entry, in the daemon that owns the table
HANDOFF_GOAL_X_FLOOR = 5


def add_parser(b: argparse.ArgumentParser) -> None:
    sub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")

    def sized(name: str, help: str, sizes: str, reps: int, one: bool, plot: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--sizes", default=sizes, help=f"comma-separated sizes (default {sizes})")
        if one:
            p.add_argument("--fds", type=int, help="one size (short for --sizes N)")
        p.add_argument("--reps", type=int, default=reps, help=f"repetitions, median reported (default {reps})")
        p.add_argument("--json", action="store_true")
        if plot:
            p.add_argument("--plot", metavar="FILE.png", help="also draw time vs N, log-log (needs cprd[plot])")
        return p

    sized("find", "N finds in an N-entry table: linear list vs hash table", "540,2870,7530", 5, False, True)
    h = sized("handoff", "handoff time vs the SCM_RIGHTS floor and one-fd-per-message", "540,2870,7530,19000", 3,
              True, True)
    h.add_argument("--kinds", default="mixed", choices=["mixed", "eventfd", "file", "socket"])
    sized("upgrade", "in-place upgrade: the longest a polling client waits for an answer", "7530", 5, True, False)
    ls = sub.add_parser("ls", help="get latency while another client loops ls on a large table")
    ls.add_argument("--fds", type=int, default=19000, help="fds in the table (default 19000)")
    ls.add_argument("--seconds", type=float, default=5.0, help="seconds of each phase (default 5)")
    ls.add_argument("--json", action="store_true")
    cl = sub.add_parser("close", help="get latency while another client makes the daemon close sockets whose close "
                                      "blocks (SO_LINGER, unsent data, a peer that never reads)")
    cl.add_argument("--seconds", type=float, default=5.0, help="seconds of each phase (default 5)")
    cl.add_argument("--closes", type=int, default=20, help="blocking closes during the attacked phase (default 20)")
    cl.add_argument("--linger", type=int, default=3600, help="seconds each of those closes blocks (default 3600)")
    cl.add_argument("--json", action="store_true")
    tn = sub.add_parser("tenants", help="(root) the daemon's own user's status latency while other uids flood its "
                                        "sockets, hold silent connections or flood their fd store")
    tn.add_argument("--seconds", type=float, default=4.0, help="seconds of each phase (default 4)")
    tn.add_argument("--json", action="store_true")
    s = sub.add_parser("fdstore", help="systemd's fd store protocol: fds stored per second from 4 senders, and how "
                                        "long `cprd run` takes to start a program with N stored fds; the same for "
                                        "cprd's own client (put, get)")
    s.add_argument("--fds", type=int, default=1000, help="fds each sender stores, and fds handed to the program "
                                                         "(default 1000)")
    s.add_argument("--senders", type=int, default=4, help="concurrent senders (default 4)")
    s.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    s.add_argument("--json", action="store_true")
    rs = sub.add_parser("restart", help="cprd serve: ctl restart until the new generation serves and the old one "
                                        "is gone, what clients saw meanwhile; cprd run's start cost beside "
                                        "systemd-socket-activate")
    rs.add_argument("--restarts", type=int, default=10, help="restarts, one after the other (default 10)")
    rs.add_argument("--clients", type=int, default=4, help="client threads, a new connection per request (default 4)")
    rs.add_argument("--steady", type=float, default=3.0, help="seconds of load before the restarts (default 3)")
    rs.add_argument("--reps", type=int, default=5, help="starts measured of each program starter (default 5)")
    rs.add_argument("--json", action="store_true")
    sb = sub.add_parser("standby", help="--standby: what it costs each put and delete, and how long a client "
                                        "waits when the daemon is killed and its standby takes over")
    sb.add_argument("--fds", type=int, default=1000, help="entries in the table (default 1000)")
    sb.add_argument("--mutations", type=int, default=2000, help="puts and deletes measured (default 2000)")
    sb.add_argument("--kills", type=int, default=10, help="SIGKILLs of the serving daemon (default 10)")
    sb.add_argument("--json", action="store_true")
    m = sub.add_parser("memory", help="bytes per entry of an FdTable of N real fds (tracemalloc and RSS)")
    m.add_argument("--sizes", default="540,2870,7530,19000", help="comma-separated table sizes (fds)")
    m.add_argument("--json", action="store_true")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sizes {text!r}: expected comma-separated whole numbers") from None
    if not sizes or any(n < 1 for n in sizes):
        raise UsageError(f"--sizes {text!r}: expected one or more positive whole numbers, e.g. 540,2870,7530")
    return sizes


def main(a: argparse.Namespace) -> int:
    if getattr(a, "reps", 1) < 1:
        raise UsageError(f"--reps {a.reps}: expected at least 1")
    plot = getattr(a, "plot", None)
    if plot:
        _check_plot(plot)  # before anything is measured or written
    if a.bench == "find":
        rows = bench_find(_sizes(a.sizes), a.reps)
        _emit(rows, a.json, print_find)
        if plot:
            plot_find(rows, plot)
        return 0
    if a.bench == "upgrade":
        from .bench_serving import bench_upgrade, print_upgrade

        if a.fds is not None and a.fds < 0:
            raise UsageError(f"--fds {a.fds}: expected a number of fds >= 0")
        rows = bench_upgrade([a.fds] if a.fds is not None else _sizes(a.sizes), a.reps)
        _emit(rows, a.json, print_upgrade)
        return 0
    if a.bench == "ls":
        from .bench_serving import bench_ls, print_ls

        if a.fds < 1 or a.seconds <= 0:
            raise UsageError("--fds must be at least 1 and --seconds above 0")
        _emit(bench_ls(a.fds, a.seconds), a.json, print_ls)
        return 0
    if a.bench == "close":
        from .bench_serving import bench_close, print_close

        if a.seconds <= 0 or a.closes < 1 or a.linger < 1:
            raise UsageError("--seconds must be above 0, --closes and --linger at least 1")
        _emit(bench_close(a.seconds, a.closes, a.linger), a.json, print_close)
        return 0
    if a.bench == "restart":
        from .bench_restart import bench_restart, print_restart

        if a.restarts < 1 or a.clients < 1 or a.steady <= 0:
            raise UsageError("--restarts and --clients must be at least 1, --steady above 0")
        _emit(bench_restart(a.restarts, a.clients, a.steady, a.reps), a.json, print_restart)
        return 0
    if a.bench == "standby":
        from .bench_standby import bench_standby, print_standby

        if a.fds < 0 or a.mutations < 1 or a.kills < 1:
            raise UsageError("--fds must be 0 or more, --mutations and --kills at least 1")
        _emit(bench_standby(a.fds, a.mutations, a.kills), a.json, print_standby)
        return 0
    if a.bench == "tenants":
        from .bench_tenants import bench_tenants, print_tenants

        if a.seconds <= 0:
            raise UsageError("--seconds must be above 0")
        _emit(bench_tenants(a.seconds), a.json, print_tenants)
        return 0
    if a.bench == "fdstore":
        from .bench_fdstore import bench_fdstore, print_fdstore

        if a.fds < 1 or a.senders < 1:
            raise UsageError("--fds and --senders must be at least 1")
        row = bench_fdstore(a.fds, a.senders, a.reps)
        _emit(row, a.json, print_fdstore)
        return 0
    if a.bench == "memory":
        rows = bench_memory(_sizes(a.sizes), progress=not a.json)
        _emit(rows, a.json, print_memory)
        return 0
    if a.fds is not None and a.fds < 1:
        raise UsageError(f"--fds {a.fds}: expected a positive number of fds")
    sizes = [a.fds] if a.fds else _sizes(a.sizes)
    rows = bench_handoff(sizes, a.kinds, a.reps, progress=not a.json)
    _emit(rows, a.json, print_handoff)
    if plot:
        plot_handoff(rows, plot)
    return 0


def _emit(rows: list[dict], as_json: bool, table) -> None:
    if as_json:
        print(json.dumps(rows))
    else:
        table(rows)


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
        table.forget_all()  # the fds are fake numbers: forget them without closing
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
def fd_budget() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard - FD_OVERHEAD


def raw_transfer(fds: list[int], per_msg: int) -> float:
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


def _skipped(total: int, budget: int, progress: bool) -> dict | None:
    """The row for a size that does not fit the fd limit (None if it fits); says so on a terminal."""
    if total <= budget:
        if progress:
            print(f"  N={total}: measuring ...", file=sys.stderr)
        return None
    note = (f"skipped: {total} fds need more than this machine's fd limit allows per process "
            f"(RLIMIT_NOFILE hard limit {budget + FD_OVERHEAD}, {FD_OVERHEAD} kept for the process)")
    if progress:
        print(f"  N={total}: {note}", file=sys.stderr)
    return {"fds": total, "skipped": note}


def _counts(kinds: str, n: int) -> dict[str, int]:
    if kinds == "mixed":
        return mixed_spec(n)
    key = {"eventfd": "eventfds", "file": "files", "socket": "sockets"}[kinds]
    return parse_spec(f"{key}={n // 2 if key == 'sockets' else n}")


def _cprd_handoffs(counts: dict[str, int], reps: int, d: str) -> list[dict]:
    """Start a populated source and hand it along a chain of reps targets; each handoff's result."""
    from ..client import Client
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


def _measurable(sizes: list[int], counts_of, progress: bool, rows: list[dict]):
    """(n, counts, total fds) for each size this process has the fds for; a skipped row (saying why)
    into rows for the others."""
    budget = fd_budget()
    for n in sizes:
        counts = counts_of(n)
        total = spec_fds(counts)
        skipped = _skipped(total, budget, progress)
        if skipped:
            rows.append(skipped)
            continue
        yield n, counts, total


def bench_handoff(sizes: list[int], kinds: str, reps: int, progress: bool = False) -> list[dict]:
    rows: list[dict] = []
    for n, counts, total in _measurable(sizes, lambda n: _counts(kinds, n), progress, rows):
        with tempfile.TemporaryDirectory(prefix="cprd-bench-") as d:
            os.chmod(d, 0o700)
            floor, one = [], []
            evs = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(total)]
            try:
                for _ in range(reps):
                    floor.append(raw_transfer(evs, SCM_MAX_FD))
            finally:
                for fd in evs:
                    os.close(fd)
            mixed = [fd for _, _, fd in populate(counts, os.path.join(d, "raw"))]
            try:
                for _ in range(reps):
                    one.append(raw_transfer(mixed, 1))
            finally:
                for fd in mixed:
                    os.close(fd)
            res = _cprd_handoffs(counts, reps, d)
        fm, om = statistics.median(floor), statistics.median(one)
        hm = statistics.median(r["ms"] for r in res)
        # In this version the source's table is frozen for mutations for the whole handoff; a daemon
        # that reports its own freeze window is read as such.
        frz = statistics.median(r.get("freeze_ms", r["ms"]) for r in res)
        rows.append({
            "fds": total, "kinds": kinds, "reps": reps,
            "floor_ms": round(fm, 3), "one_per_message_ms": round(om, 3), "handoff_ms": round(hm, 3),
            "freeze_ms": round(frz, 3),
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


# -- memory ------------------------------------------------------------------------------------
def _fill(table: FdTable, names: list[bytes], ids: array.array, fds: array.array) -> FdTable:
    """Save every fd as the daemon does: classify it, and key it by a name decoded from bytes (as a
    target decodes each name off the wire), so that each entry owns its name string and its ints."""
    for i in range(len(fds)):
        fd = fds[i]
        table.save(names[i].decode(), ids[i], fd, classify(fd))
    return table


def _memory_one(counts: dict[str, int], directory: str) -> dict:
    """In a fresh process: populate real fds, then build an FdTable of them twice, once for RSS (no
    tracing) and once under tracemalloc; close every fd. Bytes per entry."""
    import psutil

    proc = psutil.Process()
    made = populate(counts, directory)
    # The fds belong to this array until the end; the tables below only borrow them.
    fds = array.array("i", (fd for _, _, fd in made))
    try:
        ids = array.array("i", (id_ for _, id_, _ in made))
        names = [name.encode() for name, _, _ in made]
        del made
        n = len(fds)

        gc.collect()
        rss0 = proc.memory_info().rss
        table = _fill(FdTable(), names, ids, fds)
        rss1 = proc.memory_info().rss
        dict_bytes = sys.getsizeof(table.bulk_dict())
        table.forget_all()  # forget the entries without closing: the array owns the fds
        del table
        gc.collect()

        tracemalloc.start()
        try:
            t0 = tracemalloc.get_traced_memory()[0]
            table = _fill(FdTable(), names, ids, fds)
            t1 = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        table.forget_all()
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    return {"entries": n, "tracemalloc_bytes": t1 - t0, "rss_bytes": rss1 - rss0, "dict_bytes": dict_bytes}


def _in_child(fn, *args) -> dict:
    """Run fn(*args) in a forked child and return its JSON-able result: each size starts from the same
    clean heap, so memory freed by an earlier size cannot hide the growth of a later one."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            data = json.dumps(fn(*args)).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
            code = 0
        except Exception:  # noqa: BLE001  (report any failure; the finally exits either way)
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not data:
        raise CprdError(f"memory benchmark process failed (exit code {code}); its traceback is above")
    return json.loads(data)


def bench_memory(sizes: list[int], progress: bool = False) -> list[dict]:
    rows: list[dict] = []
    for n, counts, total in _measurable(sizes, mixed_spec, progress, rows):
        with tempfile.TemporaryDirectory(prefix="cprd-bench-") as d:
            os.chmod(d, 0o700)
            res = _in_child(_memory_one, counts, os.path.join(d, "files"))
        e = res["entries"]
        tm = res["tracemalloc_bytes"] / e
        rows.append({
            "fds": total, "entries": e,
            "tracemalloc_bytes_per_entry": round(tm, 1),
            "rss_bytes_per_entry": round(res["rss_bytes"] / e, 1),
            "dict_bytes_per_entry": round(res["dict_bytes"] / e, 1),
            "tracemalloc_bytes": res["tracemalloc_bytes"], "rss_bytes": res["rss_bytes"],
            "goal_bytes_per_entry": MEMORY_GOAL_BYTES, "within_goal": tm <= MEMORY_GOAL_BYTES,
        })
    return rows


def print_memory(rows: list[dict]) -> None:
    print(f"{'fds':>6} {'tracemalloc B/entry':>20} {'RSS B/entry':>12} {'of which dict B/entry':>22}   goal")
    for r in rows:
        if "skipped" in r:
            print(f"{r['fds']:>6} {r['skipped']}")
            continue
        goal = f"<= {r['goal_bytes_per_entry']} B: {'met' if r['within_goal'] else 'NOT met'}"
        print(f"{r['fds']:>6} {r['tracemalloc_bytes_per_entry']:>20.1f} {r['rss_bytes_per_entry']:>12.1f} "
              f"{r['dict_bytes_per_entry']:>22.1f}   {goal}")
    print("tracemalloc: Python allocations the table keeps (Entry, Identity, key tuple, dict slots, name "
          "strings, ints); RSS: growth of the process while the table is built (page-grained, noisy at small N)")


# -- plots -------------------------------------------------------------------------------------
PLOT_MISSING = ("--plot needs matplotlib, which is not installed ({why}); install the plot extra with "
                "pip install 'cprd[plot]' (or pip install 'matplotlib>=3.6'), or leave out --plot")


def _check_plot(path: str) -> None:
    """UsageError unless a plot can be written to path, checked before anything is measured, in this
    order (whatever is installed): an existing writable directory, matplotlib importable, a file
    name ending in an image type matplotlib writes."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--plot {path!r}: directory {parent} does not exist or is not writable; "
                         "create it or choose another path")
    try:
        import matplotlib  # noqa: F401  (lazy: never imported unless a plot is asked for)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as e:
        raise UsageError(PLOT_MISSING.format(why=e)) from None
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    known = FigureCanvasAgg.get_supported_filetypes()
    if ext not in known:
        raise UsageError(f"--plot {path!r}: the file name must end in an image type matplotlib writes, "
                         f"e.g. .png (known: {', '.join(sorted(known))})")


def _figure(title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.5)
    ax.grid(True, which="minor", alpha=0.15)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig, ax


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _sizes_axis(ax, notes: dict[int, str]) -> None:
    """Tick the x axis at the measured sizes, written out in full, each with a note (a ratio) under it;
    the legend goes below the axes, where it hides no point."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(sorted(notes)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}\n{notes.get(round(v), '')}"))
    ax.margins(x=0.08, y=0.12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=8, frameon=False)


def _reps(n: int) -> str:
    return f"median of {n} rep{'s' if n != 1 else ''}"


def _save(fig, path: str) -> None:
    fig.savefig(path)
    print(f"plot written to {path}", file=sys.stderr)


def plot_find(rows: list[dict], path: str) -> None:
    fig, ax = _figure("cprd bench find: N finds in an N-entry table")
    n = [r["fds"] for r in rows]
    reps = rows[0]["reps"] if rows else 0
    ax.plot(n, [r["list_ns"] / 1e6 for r in rows], "o-", color="tab:red", label="cprd: list scan (Python)")
    ax.plot(n, [r["hash_ns"] / 1e6 for r in rows], "o-", color="tab:blue", label="cprd: FdTable hash (Python)")
    q = [r for r in rows if "qemu_ratio" in r]
    if q:
        qn = [r["fds"] for r in q]
        ax.plot(qn, [r["qemu_qlist_ns"] / 1e6 for r in q], "s--", color="tab:red", alpha=0.6, mfc="none",
                label="QEMU published: QLIST (C)")
        ax.plot(qn, [r["qemu_ghash_ns"] / 1e6 for r in q], "s--", color="tab:blue", alpha=0.6, mfc="none",
                label="QEMU published: GHashTable (C)")
    _sizes_axis(ax, {r["fds"]: f"list/hash {r['ratio']:g}x" for r in rows})
    ax.set_xlabel("table size N (entries; N finds, one per entry)")
    ax.set_ylabel("total time of N finds (ms)")
    ax.set_title(f"{_reps(reps)}; {_machine()}", fontsize=8)
    _save(fig, path)


def plot_handoff(rows: list[dict], path: str) -> None:
    done = [r for r in rows if "skipped" not in r]
    if not done:
        raise CprdError(f"nothing to plot: every size was skipped (fd limit); {path} not written")
    fig, ax = _figure(f"cprd bench handoff: moving N fds ({done[0]['kinds']}) to another process")
    n = [r["fds"] for r in done]
    ax.plot(n, [r["floor_ms"] for r in done], "o-", color="tab:gray",
            label="floor: sendmsg/recvmsg of N eventfds, 253 a message")
    ax.plot(n, [r["one_per_message_ms"] for r in done], "o-", color="tab:orange",
            label="one fd per message (QEMU/Envoy style), unverified")
    ax.plot(n, [r["handoff_ms"] for r in done], "o-", color="tab:blue",
            label="cprd handoff: connect to Confirm, verified")
    if any(r["freeze_ms"] != r["handoff_ms"] for r in done):  # the daemon reported a shorter freeze
        ax.plot(n, [r["freeze_ms"] for r in done], "^--", color="tab:blue", alpha=0.6, mfc="none",
                label="cprd freeze: source table closed to mutations")
    ax.plot(n, [HANDOFF_GOAL_X_FLOOR * r["floor_ms"] for r in done], ":", color="tab:gray",
            label=f"goal: {HANDOFF_GOAL_X_FLOOR} x floor")
    _sizes_axis(ax, {r["fds"]: f"cprd {r['handoff_vs_floor']:g}x floor" for r in done})
    skipped = [r["fds"] for r in rows if "skipped" in r]
    note = f"; skipped (fd limit): N={', '.join(map(str, skipped))}" if skipped else ""
    ax.set_xlabel("N (fds handed off)")
    ax.set_ylabel("time to move N fds (ms)")
    ax.set_title(f"{_reps(done[0]['reps'])}; {_machine()}{note}", fontsize=8)
    _save(fig, path)
