"""`cprd chaos`: rounds of handoffs and in-place upgrades under churn, with random SIGKILLs and
SIGSTOPs of every role, judged by the kernel (kcmp) against the clients' own copies.

Theory of operation
-------------------
A campaign starts a source with a small table. Each round:

1. Clients (trio tasks, each with its own connection and keys) churn: put fresh fds of several
   kinds and keep their own copy of each, delete, replace, get (each get proved by kcmp against
   the client's copy). What was acknowledged is the model.
2. A move starts: a handoff to a fresh target, or an in-place upgrade; the two alternate.
3. At random moments of the move, one or two faults: SIGKILL or SIGSTOP of a role (a handoff's
   source or target; an upgrade's daemon pid (the old program, then the new one), its stand-in,
   its guardian). A stopped process is continued after a random hold, unless it was fenced.
   The first fault of a move takes its roles in turn (each turn shuffled), so that a short
   campaign hits every role, whatever the seed; a second fault picks any role.
4. The round settles: the move answered (or failed), every stopped process continued, somebody
   answers a status, and the upgrade's other processes are gone.
5. The checks, each a violation: an acknowledged put missing, or not the same open file
   description (kcmp, owner's fd against the client's copy: wrong identity); an acknowledged
   delete undone; more than one process holding the listening control socket; nobody serving
   while a process of the table lives; a request that failed or waited past the clients' bound;
   the owner's fds growing beside its table (a leak).

With ``--standby`` the source runs with ``--standby`` and every round is a "standby" round: no
move, one or two faults (SIGKILL or SIGSTOP of the serving daemon or of its standby, at random
moments under churn); the round settles once a daemon serves with its standby up. The same checks
hold, with the standby allowed beside the owner among the holders of the listening socket; only a
round that kills both the daemon and its standby may lose the table.

``CPRD_CHAOS_TAMPER=1`` (tests only) injects no fault and changes the table behind the model's
back in the first round, so that a test can see the checks catch it.

A round that SIGKILLs the table's sole owner (the daemon after a take-over, a target after it
confirmed, a source before its target had everything, a stand-in or a restored program that
serves alone: each logs ``event=sole_owner`` when it becomes one and ``event=shared`` when a move
gives the table a second holder) may lose the table, or (a source killed mid-handoff) leave its
target a salvage: that is counted as ``owner-killed``, never as a violation, and the next round
starts a new source. Exit status 1 on any violation, with the seed that reproduces the campaign.

What this module may know: the client, processes and /proc, kcmp. It starts daemons as processes.
"""

from __future__ import annotations

import ctypes
import datetime
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil
import trio

from .. import proc
from ..client import AsyncClient, Client
from ..errors import CprdError, UsageError
from .procs import cprd_cmd, wait_for_socket
from .stress import new_fd

ROLES = {"handoff": ("source", "target"), "upgrade": ("daemon", "stand-in", "guardian"),
         "standby": ("daemon", "standby")}
# when faults fire, after the move began (its span); a standby round's move is the faults themselves
MOMENTS_MS = {"handoff": (0, 25), "upgrade": (0, 450), "standby": (0, 500)}
HOLD_S = (0.1, 2.5)  # how long a SIGSTOP lasts before its SIGCONT
WAIT_BOUND_S = 45.0  # a client request may take this long at most (its own retries included)
SETTLE_S = 60.0
ANSWER_TIMEOUT = 0.5  # the daemons' --answer-timeout: short, so that fences come within a round
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Fault:
    role: str
    action: str  # "kill" or "stop"
    at_ms: float
    pid: int | None = None
    fired_at: float | None = None  # time.time() when sent
    hold_s: float = 0.0

    @property
    def moment(self) -> str:
        return f"{int(self.at_ms // 50) * 50}-{int(self.at_ms // 50) * 50 + 50}ms"


@dataclass
class Round:
    n: int
    move: str
    faults: list[Fault]
    owner_before: int
    outcome: str = ""
    owner_after: int | None = None
    move_result: str = ""
    violations: list[str] = field(default_factory=list)
    max_wait_s: float = 0.0
    ops: int = 0


# log events that make a pid the table's sole owner, or give the table a second holder. A new program
# logs `confirming` just before it confirms to the guardian, which then leaves at once (or, if the new
# program died first, restores), and a handoff's target just before it confirms to the source, which
# then exits (or, if the target died first, keeps the table): from then on its death alone may lose it.
_OWNERSHIP = ("event=sole_owner", "event=confirming", "event=shared")

class Model:
    """What the clients had acknowledged: their own fd of every put (same open file description as
    the one the daemon stored), and the keys they deleted."""

    def __init__(self) -> None:
        self.mine: dict[tuple[str, int], int] = {}
        self.deleted: set[tuple[str, int]] = set()
        self.earlier: dict[tuple[str, int], list[int]] = {}  # this round's replaced versions (a salvage may serve one)

    def put(self, key: tuple[str, int], fd: int) -> None:
        old = self.mine.pop(key, None)
        if old is not None:
            self.earlier.setdefault(key, []).append(old)
        self.mine[key] = fd
        self.deleted.discard(key)

    def delete(self, key: tuple[str, int]) -> None:
        old = self.mine.pop(key, None)
        if old is not None:
            self.earlier.setdefault(key, []).append(old)
        self.deleted.add(key)

    def versions(self, key: tuple[str, int]) -> list[int]:
        """Every fd this round put under key, the acknowledged one first."""
        return ([self.mine[key]] if key in self.mine else []) + self.earlier.get(key, [])

    def new_round(self) -> None:
        for fds in self.earlier.values():
            for fd in fds:
                os.close(fd)
        self.earlier = {}

    def clear(self) -> None:
        self.new_round()
        for fd in self.mine.values():
            os.close(fd)
        self.mine, self.deleted = {}, set()


class Churner:
    def __init__(self, i: int, control: str, model: Model, rng: random.Random, rate: float, ids) -> None:
        self.i, self.control, self.model, self.rng, self.rate = i, control, model, rng, rate
        self.ids = ids  # the campaign's counter of this client's keys (a key is never put new twice)
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self.stale: list[str] = []  # gets that returned an earlier version of this round (only a salvage may)
        self.waits: list[float] = []

    def mine(self) -> list[tuple[str, int]]:
        return [k for k in self.model.mine if k[0] == f"chaos/{self.i}"]

    async def run(self, stop: trio.Event) -> None:
        async with AsyncClient(self.control, timeout=WAIT_BOUND_S, retry_for=WAIT_BOUND_S) as c:
            while not stop.is_set():
                r = self.rng.random()
                mine = self.mine()
                t0 = time.monotonic()
                try:
                    if r < 0.45 or not mine:
                        await self._put(c, (f"chaos/{self.i}", next(self.ids)), False)
                    elif r < 0.65:
                        key = self.rng.choice(mine)
                        await c.delete(*key)
                        self.model.delete(key)
                    elif r < 0.8:
                        await self._put(c, self.rng.choice(mine), True)
                    else:
                        key = self.rng.choice(mine)
                        _, fd = await c.get(*key)
                        try:
                            me = os.getpid()
                            if proc.kcmp_file(me, fd, me, self.model.mine[key]) != 0:
                                older = self.model.versions(key)[1:]
                                earlier = any(proc.kcmp_file(me, fd, me, old) == 0 for old in older)
                                (self.stale if earlier else self.wrong).append(
                                    f"get {key}: not the open file description put"
                                    + (" (an earlier version of this round)" if earlier else ""))
                        finally:
                            os.close(fd)
                except CprdError as e:
                    self.failures.append(f"client {self.i}: {type(e).__name__}: {e}")
                    await trio.sleep(0.05)
                self.waits.append(time.monotonic() - t0)
                await trio.sleep(self.rng.expovariate(self.rate))

    async def _put(self, c: AsyncClient, key: tuple[str, int], replace: bool) -> None:
        fd, extra = new_fd(self.rng.randrange(4), "", key[1])  # no file: kinds 0-3
        try:
            await c.put(key[0], key[1], fd, replace=replace)
        except BaseException:
            os.close(fd)
            raise
        finally:
            for x in extra:
                os.close(x)
        self.model.put(key, fd)


class Campaign:
    def __init__(self, seed: int, fds: int, clients: int, rate: float, log_dir: str, standby: bool = False) -> None:
        self.standby = standby
        self.rng = random.Random(seed)
        self.seed, self.fds, self.clients, self.rate = seed, fds, clients, rate
        self.dir = log_dir
        self.control = os.path.join(log_dir, "control.sock")
        self.model = Model()
        self.spawned: list[psutil.Process] = []
        self.n_logs = 0
        self.base: int | None = None
        self.restarts = 0
        self.ids = [itertools.count() for _ in range(clients)]
        self.turns: dict[str, list[str]] = {move: [] for move in ROLES}

    def next_role(self, move: str) -> str:
        """The move's roles in turn, each turn in a new random order: every role is hit early."""
        if not self.turns[move]:
            self.turns[move] = self.rng.sample(ROLES[move], len(ROLES[move]))
        return self.turns[move].pop()

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, *args: str) -> psutil.Popen:
        log = open(os.path.join(self.dir, f"daemon-{self.n_logs}.log"), "wb")
        self.n_logs += 1
        try:
            p = psutil.Popen(cprd_cmd(*args, "--answer-timeout", str(ANSWER_TIMEOUT), log_level="info"),
                             stdin=subprocess_devnull(), stdout=subprocess_devnull(), stderr=log)
        finally:
            log.close()
        self.spawned.append(p)
        return p

    def start_source(self) -> int:
        for name in os.listdir(self.dir):
            if name.startswith("state"):
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        p = self.spawn("source", "--control", self.control, "--populate", f"eventfds={self.fds}",
                       "--state-dir", os.path.join(self.dir, f"state-{self.restarts}"),
                       *(["--standby"] if self.standby else []))
        wait_for_socket(self.control, p)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = _status(self.control, 1.0)
            if st and st["pid"] == p.pid and (not self.standby or (st.get("standby") or {}).get("state") == "up"):
                return p.pid
            time.sleep(0.02)
        raise CprdError("the chaos source did not start serving")

    def logs(self) -> list[str]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out += f.read().splitlines()
        return out

    def sole_owner_at(self, pid: int, t: float) -> bool:
        """Whether pid had made itself the table's sole owner (by its own log) and not shared it
        since, at time t."""
        last = None
        for line in self.logs():
            if f"cprd[{pid}]" not in line or not any(e in line for e in _OWNERSHIP):
                continue
            when = _log_time(line)
            if when is not None and when <= t:
                last = "shared" if "event=shared" in line else "sole"
        return last == "sole"

    def role_pid(self, role: str, daemon: int, target: int | None) -> int | None:
        if role in ("source", "daemon"):
            return daemon
        if role == "target":
            return target
        name = {"stand-in": "cprd-standin", "guardian": "cprd-guardian", "standby": "cprd-standby"}[role]
        try:
            for c in psutil.Process(daemon).children():
                if c.name() == name:
                    return c.pid
        except psutil.Error:
            pass
        return None

    # -- one round ---------------------------------------------------------------------------
    async def round(self, n: int) -> Round:
        st = _status(self.control, 5.0)
        if st is None:  # the table was lost (its sole owner killed) last round: start again
            self.restarts += 1
            self.model.clear()
            owner = await trio.to_thread.run_sync(self.start_source)
        else:
            owner = st["pid"]
        move = "standby" if self.standby else ("handoff", "upgrade")[n % 2]
        faults = []
        for i in range(0 if os.environ.get("CPRD_CHAOS_TAMPER") else self.rng.choice((1, 1, 2))):
            lo, hi = MOMENTS_MS[move]
            role = self.next_role(move) if i == 0 else self.rng.choice(ROLES[move])
            faults.append(Fault(role, self.rng.choice(("kill", "stop")),
                                self.rng.uniform(lo, hi), hold_s=self.rng.uniform(*HOLD_S)))
        r = Round(n, move, faults, owner)
        churners = [Churner(i, self.control, self.model, random.Random(self.rng.random()), self.rate, self.ids[i])
                    for i in range(self.clients)]
        stop = trio.Event()
        target = None
        listen = os.path.join(self.dir, f"handoff-{n}.sock")
        if move == "handoff":
            target = await trio.to_thread.run_sync(lambda: self.spawn("target", "--listen", listen))
            await trio.to_thread.run_sync(wait_for_socket, listen, target)
        async with trio.open_nursery() as nursery:
            for c in churners:
                nursery.start_soon(c.run, stop)
            await trio.sleep(0.3)
            t_move = trio.current_time()
            done = trio.Event()
            nursery.start_soon(self._move, r, move, listen, done)
            for f in faults:
                nursery.start_soon(self._fire, f, t_move, owner, target.pid if target else None)
            with trio.move_on_after(SETTLE_S):
                await done.wait()
            await trio.sleep(max((f.hold_s for f in faults), default=0.0) + 0.2)  # every stop continued by now
            r.owner_after = await self._settle(r)
            await trio.sleep(0.3)
            stop.set()
            if r.owner_after is None:  # nobody serves: what the clients still retry is moot (nothing acks it)
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
        if target is not None and target.pid != r.owner_after:  # a target that did not take the table over
            _kill(target.pid)
        _reap_orphans()
        r.ops = sum(len(c.waits) for c in churners)
        r.max_wait_s = max((w for c in churners for w in c.waits), default=0.0)
        try:
            await trio.to_thread.run_sync(self._check, r, churners)
        finally:
            self.model.new_round()
        return r

    async def _move(self, r: Round, move: str, listen: str, done: trio.Event) -> None:
        if move == "standby":  # the faults are the move: over once the last has fired
            await trio.sleep(MOMENTS_MS["standby"][1] / 1e3 + 0.1)
            r.move_result = "faults fired"
            done.set()
            return
        try:
            async with AsyncClient(self.control, timeout=SETTLE_S, retry_for=0) as c:
                if move == "handoff":
                    res = await c.handoff(listen)
                    r.move_result = f"handed off to pid {res['target_pid']}"
                else:
                    res = await c.upgrade(timeout=3.0)
                    r.move_result = ("rolled back: " + str(res["reason"])) if res["rolled_back"] else \
                        f"upgraded, fenced {res.get('fenced')}"
        except CprdError as e:
            r.move_result = f"{type(e).__name__}: {e}"
        finally:
            done.set()

    async def _fire(self, f: Fault, t_move: float, daemon: int, target: int | None) -> None:
        await trio.sleep_until(t_move + f.at_ms / 1e3)
        f.pid = self.role_pid(f.role, daemon, target)
        if f.pid is None:
            return
        pidfd = proc.pidfd_open(f.pid)
        if pidfd is None:
            f.pid = None
            return
        try:
            f.fired_at = time.time()
            proc.signal_pidfd(pidfd, signal.SIGKILL if f.action == "kill" else signal.SIGSTOP)
            if f.action == "stop":
                await trio.sleep(f.hold_s)
                proc.signal_pidfd(pidfd, signal.SIGCONT)
        finally:
            os.close(pidfd)

    async def _settle(self, r: Round) -> int | None:
        """Who serves once the move is over: status answered, no stand-in or guardian left."""
        deadline = trio.current_time() + SETTLE_S
        while trio.current_time() < deadline:
            st = await trio.to_thread.run_sync(_status, self.control, 2.0)
            if st is not None and st["state"] == "serving":
                kids = [c for c in _children(st["pid"]) if c.name() in ("cprd-standin", "cprd-guardian")]
                if not kids and (r.move != "standby" or (st.get("standby") or {}).get("state") == "up"):
                    return st["pid"]
            elif st is None and not self._alive():
                return None  # nobody serves and no process of the table lives
            await trio.sleep(0.05)
        r.violations.append(f"nobody serving within {SETTLE_S:g} s while processes of the table live: "
                            f"{[p.pid for p in self._alive()]}")
        return None

    def _alive(self) -> list[psutil.Process]:
        """The processes of the table still alive: whoever holds its listening socket, and any
        stand-in or guardian (a target still waiting for a handoff is not one)."""
        holders = _holders_of_listener(self.control)
        out = []
        for p in _descendants():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and (p.pid in holders or
                                                           p.name() in ("cprd-standin", "cprd-guardian")):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def _check(self, r: Round, churners: list[Churner]) -> None:
        killed_sole = any(f.action == "kill" and f.pid and f.fired_at and self.sole_owner_at(f.pid, f.fired_at)
                          for f in r.faults)
        # a handoff's source and target both killed: every holder of the table died, it may be lost
        killed = {f.role for f in r.faults if f.action == "kill" and f.pid and f.fired_at}
        killed_sole = killed_sole or (r.move == "handoff" and {"source", "target"} <= killed)
        if r.move == "standby":  # the table has two holders: only both killed may lose it
            killed_sole = {"daemon", "standby"} <= killed
        for c in churners:
            r.violations += c.wrong
        st = _status(self.control, 5.0) if r.owner_after else None
        if st is None:
            if killed_sole:
                r.outcome = "owner-killed"
                self._reap_all()
                return
            if not r.violations:
                r.violations.append("the table was lost though no fault killed its sole owner")
            r.outcome = "lost"
            return
        r.outcome = _owner_kind(st["pid"], r, self)
        failed = [msg for c in churners for msg in c.failures]
        salvage = st.get("salvage") or {}
        salvaged = r.move == "handoff" and salvage.get("source_pid") == r.owner_before and st["pid"] != r.owner_before
        if salvaged:  # this round's source was killed before its target had everything
            r.outcome = "owner-killed (salvaged)"
            if not killed_sole:
                r.violations.append("the target salvaged a partial table though no fault killed its source")
        elif failed:
            r.violations += failed[:5]
        if not salvaged:  # a salvage serves what arrived: an earlier version is genuine there, nowhere else
            for c in churners:
                r.violations += c.stale
        if r.max_wait_s > WAIT_BOUND_S:
            r.violations.append(f"a request waited {r.max_wait_s:.1f} s")
        if os.environ.get("CPRD_CHAOS_TAMPER") and r.n == 0:
            self._tamper()
        entries = {(e["name"], e["id"]): e["fd"] for e in _ls(self.control)}
        me, owner = os.getpid(), st["pid"]
        for key, mine in sorted(self.model.mine.items()):
            if key not in entries:
                if not salvaged:
                    r.violations.append(f"acknowledged put {key} is missing")
                continue
            if proc.kcmp_file(owner, entries[key], me, mine) == 0:
                continue
            # A salvage (its source, the sole owner, was killed mid-copy) serves the table as it arrived:
            # an earlier version this round put is genuine there; any other fd never is.
            if not (salvaged and any(proc.kcmp_file(owner, entries[key], me, fd) == 0
                                     for fd in self.model.versions(key)[1:])):
                r.violations.append(f"{key}: the owner's fd is not the open file description put (kcmp)")
        for key in sorted(self.model.deleted):
            if key in entries and not salvaged:
                r.violations.append(f"acknowledged delete of {key} undone")
        if salvaged:  # a source killed before its target had everything: the model restarts from what is served
            self.model.clear()
            for e in _ls(self.control):
                if e["name"].startswith("chaos/"):
                    with Client(self.control) as c:
                        c.delete(e["name"], e["id"])
        holders = _holders_of_listener(self.control)
        if r.move == "standby":
            holders -= {((st.get("standby") or {}).get("pid"))}  # its copy, by design
        if holders - {owner}:
            r.violations.append(f"processes besides the owner hold the listening control socket: {sorted(holders)}")
        # (entries counted again: a salvage's clean-up above deleted some since st was asked)
        entries_now = (_status(self.control, 5.0) or st)["entries"]
        n = len(os.listdir(f"/proc/{owner}/fd")) - entries_now
        if self.base is None:
            self.base = n
        elif n > self.base + 4:
            r.violations.append(f"the owner (pid {owner}) has {n} fds beside its {entries_now} entries; a new "
                                f"source had {self.base}: a leak")

    def _tamper(self) -> None:
        """Test only (CPRD_CHAOS_TAMPER=1): change the table behind the model's back, twice (a delete
        and a replace of acknowledged puts, and one acknowledged delete put back), so that a test can
        see the checks report each."""
        keys = sorted(self.model.mine)
        with Client(self.control) as c:
            c.delete(*keys[0])
            ev = os.eventfd(0)
            c.put(*keys[1], ev, replace=True)
            os.close(ev)
            if self.model.deleted:
                ev = os.eventfd(0)
                c.put(*sorted(self.model.deleted)[0], ev)
                os.close(ev)

    def _reap_all(self) -> None:
        for p in _descendants():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    p.wait(0)
            except (psutil.Error, psutil.TimeoutExpired):
                pass

    def stop_all(self) -> None:
        st = _status(self.control, 2.0) if self.standby else None
        if st is not None:  # SIGTERM retires the standby; a SIGKILL of the daemon alone would make it take over
            try:
                psutil.Process(st["pid"]).terminate()
                psutil.Process(st["pid"]).wait(10)
            except (psutil.Error, psutil.TimeoutExpired):
                pass
        for _ in range(2):  # (a second pass: whatever a standby forked while the first ran)
            self._kill_descendants()
        self.model.clear()

    def _kill_descendants(self) -> None:
        for p in _descendants():
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.Error:
                pass
        for p in _descendants():
            try:
                p.wait(10)
            except (psutil.Error, psutil.TimeoutExpired):
                pass


def subprocess_devnull():
    import subprocess

    return subprocess.DEVNULL


def _kill(pid: int) -> None:
    pidfd = proc.pidfd_open(pid)
    if pidfd is not None:
        proc.kill(pidfd)
        os.close(pidfd)


def _reap_orphans() -> None:
    """Collect what ended among our children: as the campaign's subreaper, a stand-in or guardian
    orphaned by a killed daemon becomes ours."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _owner_kind(pid: int, r: Round, c: Campaign) -> str:
    """Who owns the table after the round: for a handoff the source (it kept it) or the target; for an
    upgrade the new program (the daemon's pid), the stand-in, or the guardian's restored program."""
    if r.move == "handoff":
        return "source" if pid == r.owner_before else "target"
    if r.move == "standby":
        return "daemon" if pid == r.owner_before else "standby"
    try:
        name = psutil.Process(pid).name()
    except psutil.Error:
        return "unknown"
    if name == "cprd-standin":
        return "stand-in"
    if pid == r.owner_before:
        return "new program"
    return "restored" if any(f"cprd[{pid}]" in line and "role=restored" in line for line in c.logs()) else "unknown"


def _status(control: str, timeout: float) -> dict | None:
    try:
        with Client(control, timeout=timeout, retry_for=timeout) as c:
            return c.status()
    except (CprdError, OSError):
        return None


def _ls(control: str) -> list[dict]:
    with Client(control, timeout=30) as c:
        return c.ls()


def _holders_of_listener(control: str) -> set[int]:
    """The processes that hold the listening socket bound at `control` (its inode from
    /proc/net/unix; its holders from /proc/*/fd)."""
    inode = None
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == control and int(parts[3], 16) & 0x10000:
                inode = parts[6]
    if inode is None:
        return set()
    want = f"socket:[{inode}]"
    out = set()
    for p in _descendants():
        try:
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                if os.readlink(f"/proc/{p.pid}/fd/{fd}") == want:
                    out.add(p.pid)
                    break
        except OSError:
            continue
    return out


def _log_time(line: str) -> float | None:
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


async def run(rounds: int, seed: int, fds: int, clients: int, rate: float, progress: bool,
              log_dir: str, standby: bool = False) -> dict:
    ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphaned stand-ins become ours
    c = Campaign(seed, fds, clients, rate, log_dir, standby)
    results: list[Round] = []
    t0 = time.monotonic()
    try:
        await trio.to_thread.run_sync(c.start_source)
        for n in range(rounds):
            r = await c.round(n)
            results.append(r)
            if progress:
                print(f"\r  round {n + 1}/{rounds}: {r.move} {[(f.role, f.action) for f in r.faults]} -> "
                      f"{r.outcome}{' VIOLATION' if r.violations else ''}   ", end="", file=sys.stderr, flush=True)
    finally:
        c.stop_all()
        if progress:
            print(file=sys.stderr)
    faults = [f for r in results for f in r.faults]
    fired = [f for f in faults if f.pid is not None]
    violations = [{"round": r.n, "move": r.move, "faults": [(f.role, f.action, round(f.at_ms)) for f in r.faults],
                   "what": v} for r in results for v in r.violations]
    return {
        "seed": seed, "rounds": len(results), "duration_s": round(time.monotonic() - t0, 1),
        "faults": len(faults), "faults_fired": len(fired),
        "by_role": dict(Counter(f"{f.role}:{f.action}" for f in fired)),
        "by_moment": dict(sorted(Counter(f.moment for f in fired).items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "missed": dict(Counter(f.role for f in faults if f.pid is None)),
        "by_outcome": dict(Counter(r.outcome for r in results)),
        "moves": dict(Counter(r.move for r in results)),
        "ops": sum(r.ops for r in results),
        "max_wait_s": round(max((r.max_wait_s for r in results), default=0.0), 3),
        "restarts": c.restarts,
        "violations": len(violations), "violation_details": violations[:50],
    }


def main(a) -> int:
    if a.rounds < 1 or a.fds < 0 or a.clients < 1 or a.rate <= 0:
        raise UsageError("--rounds and --clients must be at least 1, --fds at least 0 and --rate positive")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    log_dir = tempfile.mkdtemp(prefix="cprd-chaos-")
    os.chmod(log_dir, 0o700)
    progress = sys.stderr.isatty() and not a.json
    try:
        res = trio.run(run, a.rounds, seed, a.fds, a.clients, a.rate, progress, log_dir, a.standby)
    finally:
        keep = a.keep_logs
        if not keep:
            shutil.rmtree(log_dir, ignore_errors=True)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"cprd chaos: {res['rounds']} rounds ({res['moves']}) in {res['duration_s']} s, seed {seed}: "
              f"{res['faults_fired']} faults fired ({res['faults'] - res['faults_fired']} found no process)")
        print(f"  by role: {res['by_role']}")
        print(f"  by moment: {res['by_moment']}")
        print(f"  by outcome: {res['by_outcome']}; {res['ops']} client requests, the longest {res['max_wait_s']} s")
        print(f"  violations: {res['violations']}")
        for v in res["violation_details"][:20]:
            print(f"    round {v['round']} ({v['move']}, faults {v['faults']}): {v['what']}")
    if res["violations"]:
        print(f"cprd: error: {res['violations']} violations; reproduce with `cprd chaos --seed {seed} --rounds "
              f"{a.rounds}{' --standby' if a.standby else ''}`"
              + (f" (logs kept in {log_dir})" if a.keep_logs else " (--keep-logs keeps the logs)"), file=sys.stderr)
        return 1
    return 0
