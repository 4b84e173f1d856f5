"""`cprd stress`: fd churn from concurrent clients while a table is handed along a chain of
targets, checked against a model of every acknowledged operation.

Each client owns a share of the keys (so the order of its acknowledged operations is the order
they took effect) and mixes put of new real fds, delete, replace and get at its share of --rate.
A model records what every acknowledged operation left behind under each key: our own copy of the
fd put (or, for the table's first entries, a copy taken out of the daemon with pidfd_getfd), so
that kcmp(KCMP_FILE) tells whether the daemon serves that very open file description (two
eventfds share one inode: no fstat can tell them apart), and its identity, the proof used only
where the kernel will not answer kcmp ("proof" in the JSON says which was used). Every get is
checked against it during the run and the owning daemon's whole table after.
Handoffs run at even intervals, each to a fresh `cprd target`. Violations: a get or a final entry
that differs from the model, a key lost or extra, an fd leaked in the survivor, an old owner that
did not exit 0. Any violation or failed request makes the exit code non-zero.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import trio

from .. import proc
from ..client import AsyncClient
from ..errors import CprdError
from ..kinds import classify
from ..populate import mixed_spec, spec_fds, spec_string
from .procs import quiet_fds, spawn, stop, wait_for_socket
from .proof import kcmp_file

IDENT = ("kind", "mode", "dev", "ino", "flags")


def _ident(d: dict) -> tuple:
    return tuple(d[k] for k in IDENT)


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    handoffs: list[dict] = field(default_factory=list)
    upgrades: list[dict] = field(default_factory=list)
    retries: int = 0
    slow: list[tuple[float, str, float]] = field(default_factory=list)  # (when, op, ms) of requests over SLOW_MS
    moves: list[tuple[str, float, float]] = field(default_factory=list)  # (move, start, end), CLOCK_MONOTONIC


SLOW_MS = 10.0  # a request that took longer is listed (when, which op, during which move)


class Copies:
    """Our own copy of the fd under each key of the model: kcmp compares it with the fd a daemon
    serves. Where we hold no copy, or the kernel will not answer, the identity is compared instead
    (counted: the JSON's "proof" says which proof was used)."""

    def __init__(self) -> None:
        self.fds: dict[tuple[str, int], int] = {}
        self.by_kcmp = self.by_identity = 0

    def set(self, key: tuple[str, int], fd: int | None) -> None:
        """Hold fd (ours now) as the copy of key, closing the copy it replaces."""
        old = self.fds.pop(key, None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self.fds[key] = fd

    def take_from(self, pid: int, entries: list[dict]) -> None:
        """Copies of a running daemon's entries, taken out of it (pidfd_getfd); none if refused."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            for e in entries:
                try:
                    self.set((e["name"], e["id"]), proc.pidfd_getfd(pidfd, e["fd"]))
                except OSError:
                    return
        finally:
            os.close(pidfd)

    def same(self, pid: int, fd: int, key: tuple[str, int], ident: tuple, model: tuple) -> bool:
        """Whether fd of process pid is the fd the model holds under key: by kcmp against our copy,
        or (no copy, kcmp refused) by identity."""
        mine = self.fds.get(key)
        r = None if mine is None else kcmp_file(pid, fd, os.getpid(), mine)
        if r is None:
            self.by_identity += 1
            return ident == model
        self.by_kcmp += 1
        return r

    def proof(self) -> str:
        return "identity" if not self.by_kcmp else "kcmp" if not self.by_identity else "kcmp+identity"

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def new_fd(kind: int, directory: str, n: int) -> tuple[int, list[int]]:
    """A real fd of a rotating kind (eventfd, memfd, pipe, socket pair, file in `directory`), and extra fds
    to close with it (the other end of a pair)."""
    k = kind % 5
    if k == 0:
        return os.eventfd(n % 1000, os.EFD_CLOEXEC), []
    if k == 1:
        fd = os.memfd_create(f"stress-{n}", os.MFD_CLOEXEC)
        os.write(fd, n.to_bytes(8, "little"))
        return fd, []
    if k == 2:
        r, w = os.pipe2(os.O_CLOEXEC)
        return r, [w]
    if k == 3:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return a.detach(), [b.detach()]
    fd = os.open(os.path.join(directory, f"s-{n % 64}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return fd, []


class _Worker:
    def __init__(self, i: int, control: str, model: dict, keys: list, stats: Stats, rate: float,
                 directory: str, seed: int, copies: Copies) -> None:
        self.i, self.control, self.model, self.keys, self.stats = i, control, model, keys, stats
        self.copies = copies
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.dir = directory
        self.rng = random.Random(seed)
        self.next_id = 0

    async def _timed(self, op: str, coro) -> object:
        t0 = time.monotonic()
        try:
            return await coro
        finally:
            ms = (time.monotonic() - t0) * 1e3
            self.stats.latencies.append(ms)
            self.stats.ops[op] = self.stats.ops.get(op, 0) + 1
            if ms > SLOW_MS:
                self.stats.slow.append((t0, op, ms))

    async def run(self, stop_at: float, moves_done: trio.Event) -> None:
        """Churn until stop_at, and on until every move is done: on a busy machine a move may start
        late, and every move must meet the churn it is there to prove."""
        async with AsyncClient(self.control, timeout=60) as c:
            t_next = time.monotonic()
            while time.monotonic() < stop_at or not moves_done.is_set():
                r = self.rng.random()
                try:
                    if r < 0.30 or not self.keys:
                        await self._put(c, replace=False)
                    elif r < 0.50:
                        await self._delete(c)
                    elif r < 0.70:
                        await self._put(c, replace=True)
                    else:
                        await self._get(c)
                except CprdError as e:
                    self.stats.failures.append(f"client {self.i}: {type(e).__name__}: {e}")
                t_next += self.period
                delay = t_next - time.monotonic()
                if delay > 0:
                    await trio.sleep(delay)
            self.stats.retries += c.retries

    async def _put(self, c: AsyncClient, replace: bool) -> None:
        if replace:
            key = self.rng.choice(self.keys)
        else:
            key = (f"stress/{self.i}", self.next_id)
            self.next_id += 1
        fd, extra = new_fd(self.rng.randrange(5), self.dir, self.next_id)
        acked = False
        try:
            local = classify(fd)
            res = await self._timed("replace" if replace else "put", c.put(key[0], key[1], fd, replace=replace))
            acked = True
        finally:
            for x in (*extra, *(() if acked else (fd,))):
                os.close(x)
        self.copies.set(key, fd)  # what the daemon must serve under key from now on: this very fd
        if (res["dev"], res["ino"]) != (local.dev, local.ino):
            self.stats.violations.append(f"put {key}: the daemon stored {res['kind']} {res['ino']}, we sent "
                                         f"{local.kind.label} {local.ino}")
        self.model[key] = _ident(res)
        if not replace:
            self.keys.append(key)

    async def _delete(self, c: AsyncClient) -> None:
        key = self.keys.pop(self.rng.randrange(len(self.keys)))
        await self._timed("del", c.delete(*key))
        self.model.pop(key, None)
        self.copies.set(key, None)

    async def _get(self, c: AsyncClient) -> None:
        key = self.rng.choice(self.keys)
        info, fd = await self._timed("get", c.get(*key))
        try:
            same = self.copies.same(os.getpid(), fd, key, _ident(info), self.model[key])
        finally:
            os.close(fd)
        if not same:
            self.stats.violations.append(f"get {key}: the fd served (identity {_ident(info)}) differs from the model "
                                         f"({self._how(key)})")

    def _how(self, key: tuple[str, int]) -> str:
        return "kcmp: not the fd put" if key in self.copies.fds else f"identity {self.model[key]}"


def plan_moves(handoffs: int, upgrades: int) -> list[str]:
    """The order of the moves of the table: handoffs and in-place upgrades, spread evenly (3 and 2:
    handoff, upgrade, handoff, upgrade, handoff)."""
    total = handoffs + upgrades
    at = {int((k + 0.5) * total / upgrades) for k in range(upgrades)} if upgrades else set()
    return ["upgrade" if i in at else "handoff" for i in range(total)]


async def _moves(handoffs: int, upgrades: int, start: float, duration: float, control: str, d: str, owners: list,
                 bases: dict, stats: Stats, external: bool, done: trio.Event) -> None:
    """The moves of plan_moves at even intervals: a handoff from the current owner to a fresh target
    we start, or an in-place upgrade of the current owner (which keeps its pid). owners holds each
    owner in turn: a Popen we started, or the pid of a daemon we found running. `done` is set once
    the last move ended (or failed)."""
    try:
        await _each_move(handoffs, upgrades, start, duration, control, d, owners, bases, stats, external)
    finally:
        done.set()


async def _each_move(handoffs: int, upgrades: int, start: float, duration: float, control: str, d: str,
                     owners: list, bases: dict, stats: Stats, external: bool) -> None:
    plan = plan_moves(handoffs, upgrades)
    h = 0
    for i, move in enumerate(plan):
        await trio.sleep_until(start + duration * (i + 1) / (len(plan) + 1))
        t_move = time.monotonic()
        if move == "upgrade":
            pid = _pid(owners[-1])
            try:
                async with AsyncClient(control, timeout=120, retry_for=0) as c:
                    res = await c.upgrade()
            except CprdError as e:
                stats.violations.append(f"upgrade {len(stats.upgrades)} failed: {e}")
                return
            stats.moves.append(("upgrade", t_move, time.monotonic()))
            stats.upgrades.append(res)
            if res["rolled_back"] or res["pid"] != pid:
                stats.violations.append(f"upgrade of pid {pid}: rolled back ({res.get('reason')}) or another pid "
                                        f"({res['pid']})")
            continue
        listen = os.path.join(d, f"handoff-{h}.sock")
        h += 1
        # A target that may go on serving someone else's table after we exit must not hold our stderr.
        tgt = spawn(["target", "--listen", listen], stderr=subprocess.DEVNULL if external else None)
        owners.append(tgt)
        await trio.to_thread.run_sync(wait_for_socket, listen, tgt)
        bases[tgt.pid] = await trio.to_thread.run_sync(quiet_fds, tgt.pid)
        old = owners[-2]
        try:
            async with AsyncClient(control, timeout=120, retry_for=0) as c:
                res = await c.handoff(listen)
        except CprdError as e:
            stats.violations.append(f"handoff {h - 1} failed: {e}")
            return
        stats.handoffs.append(res)
        stats.moves.append(("handoff", t_move, time.monotonic()))
        code = await trio.to_thread.run_sync(_exit_code, old)
        if code != 0:
            stats.violations.append(f"old owner pid {_pid(old)} exited {code}, not 0")


def _pid(owner) -> int:
    return owner if isinstance(owner, int) else owner.pid


def _exit_code(owner, timeout: float = 30) -> int | None:
    if not isinstance(owner, int):
        return owner.wait(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # a daemon we did not start: we can only see it go (or turn zombie)
        try:
            if psutil.Process(owner).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    else:
        return None
    return 0  # its exit status belongs to its parent


async def _progress(stats: Stats, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        await trio.sleep(0.5)
        n = sum(stats.ops.values())
        print(f"\r  ops {n}  handoffs {len(stats.handoffs)}  failed {len(stats.failures)}  "
              f"violations {len(stats.violations)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def run(fds: int, rate: float, handoffs: int, duration: float, clients: int, seed: int,
              progress: bool, control: str | None = None, upgrades: int = 0) -> dict:
    """Churn and handoffs against our own source (populated with `fds`), or, with `control`, against a
    daemon already running there: then only keys of our own ("stress/...") are touched, they are
    deleted at the end, and the last target we hand the table to goes on serving it."""
    stats = Stats()
    external = control is not None
    from ..handoff import raise_nofile

    raise_nofile()  # we hold a copy of every fd of the model
    copies = Copies()
    with tempfile.TemporaryDirectory(prefix="cprd-stress-") as d:
        os.chmod(d, 0o700)
        counts = {} if external else (mixed_spec(fds) if fds else {})
        owners: list = []
        bases: dict[int, int] = {}
        if not external:
            control = os.path.join(d, "control.sock")
            owners.append(spawn(["source", "--control", control, "--populate", spec_string(counts),
                                 "--state-dir", os.path.join(d, "state")]))
        assert control is not None
        final_owner = None
        stray_owner = None  # a stand-in or guardian that kept the table after a failed upgrade
        try:
            if not external:
                await trio.to_thread.run_sync(wait_for_socket, control, owners[0])
            async with AsyncClient(control) as c:
                entries = await c.ls()
                first_pid = (await c.status())["pid"]
            if external:
                owners.append(first_pid)
            model = {(e["name"], e["id"]): _ident(e) for e in entries}
            copies.take_from(first_pid, entries)  # the table's first entries, as the daemon holds them
            bases[first_pid] = await trio.to_thread.run_sync(quiet_fds, first_pid) - len(model)
            shares: list[list] = [[] for _ in range(clients)]
            if not external:  # our own table: every key is fair game; someone else's: only ours
                for i, key in enumerate(sorted(model)):
                    shares[i % clients].append(key)
            workers = [_Worker(i, control, model, shares[i], stats, rate / clients, d, seed + i, copies)
                       for i in range(clients)]
            t0 = time.monotonic()
            stop_at = t0 + duration
            moves_done = trio.Event()
            async with trio.open_nursery() as n:
                for w in workers:
                    n.start_soon(w.run, stop_at, moves_done)
                # trio's clock is not time.monotonic(): the moves are timed on trio's
                n.start_soon(_moves, handoffs, upgrades, trio.current_time(), duration, control, d, owners, bases,
                             stats, external, moves_done)
                if progress:
                    n.start_soon(_progress, stats, stop_at)
            elapsed = time.monotonic() - t0
            async with AsyncClient(control) as c:
                st = await c.status()
                served = {(e["name"], e["id"]): e for e in await c.ls()}
            final = {k: _ident(e) for k, e in served.items()}
            _check_table(final, model, stats, st["pid"], {k: e["fd"] for k, e in served.items()}, copies)
            final_owner = next((o for o in owners if _pid(o) == st["pid"]), None)
            if final_owner is None:
                stats.violations.append(f"the table is owned by pid {st['pid']}, not one we know")
                stray_owner = None if external else st["pid"]
            else:
                _check_fds(st["pid"], st["entries"], bases, stats, first=final_owner is owners[0])
            for o in owners:
                if o is not final_owner and not isinstance(o, int) and o.poll() is None:
                    stats.violations.append(f"pid {o.pid} still runs but does not own the table")
            if external:
                async with AsyncClient(control) as c:
                    for key in [k for k in final if k[0].startswith("stress/")]:
                        await c.delete(*key)
        finally:
            copies.close()
            # Someone else's table must outlive this run: never stop the target that owns it now.
            keep = stats.handoffs[-1]["target_pid"] if external and stats.handoffs else None
            for o in owners:
                if not isinstance(o, int) and o.pid != keep:
                    stop(o)
            if stray_owner is not None:  # ours (it took our table over), though not our child: stop it too
                try:
                    os.kill(stray_owner, signal.SIGTERM)
                except OSError:
                    pass
    lat = stats.latencies
    if external and final_owner is not None and not isinstance(final_owner, int):
        print(f"cprd stress: the table at {control} is now served by pid {final_owner.pid}, a cprd target "
              "this run started", file=sys.stderr)
    lat = stats.latencies
    freezes = [h["freeze_ms"] for h in stats.handoffs]
    return {
        "fds": spec_fds(counts) if counts else 0, "rate": rate, "clients": clients, "duration_s": round(elapsed, 3),
        "ops": len(lat), "ops_per_s": round(len(lat) / elapsed, 1), "by_op": stats.ops,
        "failed": len(stats.failures), "failures": stats.failures[:20],
        "violations": len(stats.violations), "violation_details": stats.violations[:20],
        "retries": stats.retries, "entries": len(model), "proof": copies.proof(),
        "handoffs": [{k: h[k] for k in ("entries", "ms", "freeze_ms", "rounds", "delta_ops", "target_pid")}
                     for h in stats.handoffs],
        "stall_ms_p50": round(_pct(lat, 50), 3), "stall_ms_p99": round(_pct(lat, 99), 3),
        "stall_ms_max": round(max(lat, default=0.0), 3),
        "upgrades": [{k: u.get(k) for k in ("entries", "ms", "standin_pid", "standin_journal")}
                     for u in stats.upgrades],
        "moves": [{"move": m, "t_s": round(a - t0, 3), "s": round(b - a, 3)} for m, a, b in stats.moves],
        "slow": [{"t_s": round(t - t0, 3), "op": op, "ms": round(ms, 1), "during": _during(t, ms, stats.moves)}
                 for t, op, ms in sorted(stats.slow, key=lambda x: -x[2])[:20]],
        "freeze_ms_max": round(max(freezes, default=0.0), 3),
        "freeze_ms_median": round(statistics.median(freezes), 3) if freezes else 0.0,
    }


def _during(t: float, ms: float, moves: list[tuple[str, float, float]]) -> str:
    """Which move a request overlapped ("handoff", "upgrade"), or "" (between moves)."""
    for move, a, b in moves:
        if t <= b and t + ms / 1e3 >= a:
            return move
    return ""


def _check_table(final: dict, model: dict, stats: Stats, pid: int, fds: dict, copies: Copies) -> None:
    """The owner's table (pid serves final, with fds) against the model: the same keys, each the
    very fd the model holds (kcmp against our copy)."""
    for key in sorted(set(model) - set(final))[:20]:
        stats.violations.append(f"key {key} acknowledged but missing from the owner's table")
    for key in sorted(set(final) - set(model))[:20]:
        stats.violations.append(f"key {key} in the owner's table but never acknowledged (or deleted)")
    for key in sorted(set(final) & set(model)):
        if not copies.same(pid, fds[key], key, final[key], model[key]):
            how = "kcmp: not the fd put" if key in copies.fds else f"identity {final[key]}"
            stats.violations.append(f"key {key}: the owner's fd differs from the model ({how}; the model's identity "
                                    f"{model[key]})")


def _check_fds(pid: int, entries: int, bases: dict, stats: Stats, first: bool, timeout: float = 10.0) -> None:
    # A target's fds: what it had waiting, plus its table, the control socket instead of its handoff
    # socket, and the spare fd a serving daemon keeps. The source: its baseline plus its table.
    want = bases[pid] + entries if first else bases[pid] + entries + 1
    # The clients' connections just closed: wait until the daemon has closed its ends (it may not
    # run for a while on a busy machine: a count that stays put for a moment is not yet settled).
    deadline = time.monotonic() + timeout
    n = quiet_fds(pid)
    while n != want and time.monotonic() < deadline:
        time.sleep(0.02)
        n = quiet_fds(pid)
    if n != want:
        stats.violations.append(f"owner pid {pid} has {n} fds open, expected {want} ({entries} entries): a leak")


def main(a) -> int:
    if (a.fds < 0 or a.rate <= 0 or a.handoffs < 0 or a.upgrades < 0 or a.clients < 1
            or (a.duration is not None and a.duration <= 0)):
        from ..errors import UsageError

        raise UsageError("--fds, --handoffs and --upgrades must be >= 0, --rate and --duration > 0 and --clients >= 1")
    duration = a.duration if a.duration else max(2.0, a.handoffs * 1.0 + a.upgrades * 1.5 + 1.0)
    progress = sys.stderr.isatty() and not a.json
    res = trio.run(run, a.fds, a.rate, a.handoffs, duration, a.clients, a.seed, progress, a.control, a.upgrades)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"cprd stress: {res['ops']} ops in {res['duration_s']} s ({res['ops_per_s']}/s, "
              f"{res['clients']} clients, {res['entries']} entries at the end), {len(res['handoffs'])} handoffs, "
              f"{len(res['upgrades'])} upgrades")
        for h in res["handoffs"]:
            print(f"  handoff to pid {h['target_pid']}: {h['entries']} entries, {h['ms']:.1f} ms, freeze "
                  f"{h['freeze_ms']:.1f} ms, {h['rounds']} pre-copy rounds, {h['delta_ops']} delta ops")
        for u in res["upgrades"]:
            print(f"  upgrade in place: {u['entries']} entries, no request served for {u['ms']:.1f} ms; the stand-in "
                  f"(pid {u['standin_pid']}) journaled {u['standin_journal']} changes")
        print(f"  client stall ms: p50 {res['stall_ms_p50']}  p99 {res['stall_ms_p99']}  max {res['stall_ms_max']}"
              f"  (retries {res['retries']})")
        if res["slow"]:
            print("  slowest requests over {:g} ms: ".format(SLOW_MS) + ", ".join(
                f"{x['op']} {x['ms']} ms at {x['t_s']} s{' (' + x['during'] + ')' if x['during'] else ''}"
                for x in res["slow"][:5]))
        print(f"  failed requests: {res['failed']}   violations: {res['violations']}")
        for line in res["failures"][:5] + res["violation_details"][:10]:
            print(f"    {line}")
    return 0 if res["failed"] == 0 and res["violations"] == 0 else 1
