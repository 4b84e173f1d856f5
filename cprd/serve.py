"""`cprd serve`: an app's supervisor that restarts it in generations over the same listeners.

Theory of operation
-------------------
The listeners live in the app's fd store in the daemon (listeners.py), so they outlive every
generation of the program, this supervisor, and the daemon's own handoffs and upgrades: a
connection that arrives while nobody accepts waits in the backlog instead of being refused.

* A **generation** is one start of CMD with the store's fds (launch.py), in its own session and
  process group. Its pid and start time (clock ticks) name it for good.
* **Restart** (`cprd ctl restart APP`, or SIGHUP): a new generation starts beside the old one and
  both share the listeners. Once the new one is **ready** (READY=1 from it or a process it forked,
  on the app's notify socket; or a delay; or a check command that exits 0), the old one gets its
  stop signal and, after the drain time, SIGKILL with its whole process group. A new generation
  that exits or is not ready in time is stopped the same way (it may have accepted connections
  from the shared queue: its stop signal lets it answer them) and the old one keeps serving:
  rolled back, with the reason.
* A generation that **dies by itself** is started again, after a backoff that doubles from 0.1 s to
  10 s (back to 0.1 s once one ran for a minute).
* **Liveness of this supervisor** is its heartbeat to the daemon (every 0.1 s; 0.02 s while a
  generation's READY=1 is awaited): the daemon hands it the restarts asked and the READY=1 senders,
  and keeps its report (the generations) for `ctl status` and `ctl fdstore`. A second `cprd serve`
  of the same app is refused while the first is heard from and its process lives. One that finds
  the first gone (its process, or no heartbeat for 3 s: stopped) takes over: it starts its own generation and, once that
  is ready, retires the first one's generations (each checked by pid, start time and session). The
  daemon keeps who they are in the store's log, so this holds after a cprd handoff or upgrade too. The first,
  if it wakes up, finds itself replaced and exits, leaving its generations to the second.
* A unix listener's path that a generation removes as it stops is made again at once (listeners.py).
* SIGTERM or SIGINT stops the generations (stop signal, drain, SIGKILL) and exits; the listeners
  stay in cprd for the next `cprd serve`.

Nothing here waits without a deadline: every wait races the generation's exit, the readiness
timeout, the drain time, or a stop.

What this module may know: trio, the client, launch and listeners, processes (pidfds, /proc).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import trio

from . import launch, listeners, proc
from .client import AsyncClient, Client
from .errors import Busy, CprdError, UsageError
from .fdstore import SUPERVISOR_STALE_S
from .listeners import Listen

log = logging.getLogger("cprd.serve")

HEARTBEAT_S = 0.1
FAST_S = 0.02  # while a generation's READY=1 is awaited
CHECK_EVERY_S = 0.1
BACKOFF_S = (0.1, 10.0)
HEALTHY_S = 60.0  # a generation that ran this long resets the backoff
KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the exit to be seen


@dataclass(slots=True, frozen=True)
class Readiness:
    mode: str  # notify, delay, check
    delay: float = 0.0
    check: str = ""

    def __str__(self) -> str:
        return {"notify": "notify", "delay": f"delay:{self.delay:g}", "check": f"check:{self.check}"}[self.mode]


def parse_ready(text: str) -> Readiness:
    kind, _, arg = text.partition(":")
    if kind == "notify" and not arg:
        return Readiness("notify")
    if kind == "delay":
        try:
            d = float(arg)
        except ValueError:
            d = -1.0
        if 0 <= d <= 3600 and math.isfinite(d):
            return Readiness("delay", delay=d)
    if kind == "check" and arg.strip():
        return Readiness("check", check=arg)
    raise UsageError(f"--ready {text!r} must be notify (READY=1 on the notify socket), delay:SECONDS, or "
                     "check:COMMAND (a shell command that exits 0 once the new generation serves)")


@dataclass(slots=True, frozen=True)
class Options:
    app: str
    cmd: list[str]
    listens: list[Listen]
    dialect: str
    replace: bool
    fdstore_max: int | None
    ready: Readiness
    ready_timeout: float
    stop_signal: int
    drain: float
    control: str | None
    trust_uids: tuple[int, ...] | None


@dataclass(eq=False)
class Gen:
    gen: int
    pid: int
    pidfd: int
    ticks: int
    started: float  # time.time()
    t0: float  # time.monotonic() at spawn (the daemon's clock too: READY=1 is timed by it)
    child: bool  # ours to reap (an adopted generation is not)
    ready: bool = False
    state: str = "starting"  # starting, ready, stopping, exited
    status: str = ""  # how it ended
    exited: trio.Event = field(default_factory=trio.Event)
    ready_event: trio.Event = field(default_factory=trio.Event)

    def report(self) -> dict:
        return {"gen": self.gen, "pid": self.pid, "ticks": self.ticks, "started": round(self.started, 3),
                "ready": self.ready, "state": self.state}


class Supervisor:
    def __init__(self, o: Options) -> None:
        self.o = o
        self.token = uuid.uuid4().hex
        self.gens: list[Gen] = []
        self.current: Gen | None = None
        self.adopted: list[Gen] = []
        self.n = 0
        self.restarts_done = 0
        self.results: deque[dict] = deque(maxlen=8)
        self.send, self.recv = trio.open_memory_channel[tuple](64)
        self.stop = trio.Event()
        self.superseded: str | None = None
        self.backoff = BACKOFF_S[0]
        self.nursery: trio.Nursery | None = None
        self.client = AsyncClient(o.control, timeout=2.0, retry_for=1.0, trust_uids=o.trust_uids)
        self._unreachable_since: float | None = None
        self._previous: dict | None = None
        self._one_request = trio.Lock()

    # -- the whole run -----------------------------------------------------------------------------
    async def run(self) -> int:
        await self.client.request("fdstore", app=self.o.app, action="socket",
                                  max=-1 if self.o.fdstore_max is None else self.o.fdstore_max)  # made if missing
        await self._first_heartbeat()
        async with trio.open_nursery() as n:
            self.nursery = n
            if self._previous:
                await self.adopt(self._previous)
            n.start_soon(self._heartbeats)
            n.start_soon(self._signals)
            n.start_soon(self._keep_paths)
            try:
                await self._manage()
            finally:
                n.cancel_scope.cancel()
        for li in self.o.listens:  # the last generation may have removed a path as it stopped
            listeners.restore(li)
        with trio.move_on_after(2.0):
            await self.heartbeat(final=True)
        self.client.close()
        if self.superseded:
            log.error("event=superseded app=%s reason=%r", self.o.app, self.superseded)
            return 1
        return 0

    async def _first_heartbeat(self) -> None:
        """Refused at once while another supervisor of the app runs; one whose process is gone (killed
        just now) stops being heard from within SUPERVISOR_STALE_S: wait for that."""
        deadline = trio.current_time() + SUPERVISOR_STALE_S + 2
        while True:
            try:
                await self.heartbeat()
                return
            except Busy:
                st = await self.client.status()
                other = (st.get("fdstore", {}).get(self.o.app, {}).get("serve") or {}).get("pid")
                if proc.alive(other) or trio.current_time() > deadline:
                    raise
                await trio.sleep(0.1)

    async def _manage(self) -> None:
        await self._start_until_ready(why="start")
        while not self.stop.is_set() and not self.superseded:
            ev = await self.recv.receive()
            if ev[0] == "restart":
                await self.restart(ev[1])
            elif ev[0] == "exited" and ev[1] is self.current and not self.stop.is_set():
                g = ev[1]
                log.warning("event=generation_died app=%s gen=%d pid=%d status=%s backoff_s=%.1f",
                            self.o.app, g.gen, g.pid, g.status, self.backoff)
                self.current = None
                await self._start_until_ready(why="died")
        if self.superseded:
            return  # the generations are the new supervisor's now
        for g in list(self.gens):
            self.nursery.start_soon(self.retire, g)
        with trio.move_on_after(self.o.drain + KILL_WAIT_S + 1):
            for g in list(self.gens):
                await g.exited.wait()

    async def _start_until_ready(self, why: str) -> None:
        """Start generations (with backoff after a failure) until one is ready, or a stop."""
        while not self.stop.is_set() and not self.superseded:
            if why != "start":
                with trio.move_on_after(self.backoff):
                    await self.stop.wait()
                if self.stop.is_set():
                    return
            g, reason = await self._new_ready_generation()
            if g is not None:
                self.current = g
                for old in self.adopted:
                    self.nursery.start_soon(self.retire, old)
                self.adopted = []
                await self.report()
                return
            log.warning("event=start_failed app=%s reason=%r backoff_s=%.1f", self.o.app, reason, self.backoff)
            why = "retry"
            self.backoff = min(self.backoff * 2, BACKOFF_S[1])

    async def restart(self, rid: str | None) -> None:
        t0 = trio.current_time()
        old = self.current
        g, reason = await self._new_ready_generation()
        ms = round((trio.current_time() - t0) * 1e3, 1)
        if g is None:
            log.warning("event=restart_rolled_back app=%s reason=%r ms=%.1f", self.o.app, reason, ms)
            res = {"ok": False, "reason": reason[:300], "ms": ms,
                   "serving": None if old is None else {"gen": old.gen, "pid": old.pid}}
            if old is None:
                await self._start_until_ready(why="retry")
        else:
            self.current = g
            if old is not None:
                self.nursery.start_soon(self.retire, old)
            log.info("event=restarted app=%s gen=%d pid=%d ready_ms=%.1f", self.o.app, g.gen, g.pid, ms)
            res = {"ok": True, "gen": g.gen, "pid": g.pid, "ms": ms,
                   "retired": None if old is None else {"gen": old.gen, "pid": old.pid}}
        self.restarts_done += 1
        if rid is not None:
            self.results.append({"id": rid, **res})
        await self.report()

    # -- one generation ---------------------------------------------------------------------------
    async def _new_ready_generation(self) -> tuple[Gen | None, str]:
        try:
            g = await self.spawn()
        except (CprdError, OSError) as e:
            return None, f"the new generation could not be started: {e}"
        ok, reason = await self.wait_ready(g)
        if ok:
            g.ready, g.state = True, "ready"
            self._healthy_watch(g)
            return g, ""
        # It shares the listeners: it may have accepted connections already. Its stop signal first, so
        # that it answers them, then SIGKILL after the drain time; the old generation serves meanwhile.
        self.nursery.start_soon(self.retire, g)
        return None, reason

    def _healthy_watch(self, g: Gen) -> None:
        async def watch() -> None:
            with trio.move_on_after(HEALTHY_S):
                await g.exited.wait()
                return
            self.backoff = BACKOFF_S[0]
        self.nursery.start_soon(watch)

    async def spawn(self) -> Gen:
        o = self.o
        self.n += 1
        n = self.n

        def start() -> tuple[int, float]:
            with Client(o.control, timeout=10.0, trust_uids=o.trust_uids) as c:
                g = launch.gather(c, o.app, o.listens, o.replace, o.fdstore_max)
            try:
                p = launch.plan(g, o.cmd, o.dialect, o.listens, dict(os.environ))
                launch.spread_out(p)
            finally:
                g.close()
            argv = p.cmd
            if p.needs_pid:  # LISTEN_PID must be the program's own pid: the shell's, which exec keeps
                argv = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "cprd-serve", *p.cmd]
            try:
                pid = os.posix_spawnp(
                    argv[0], argv, p.env, file_actions=[(os.POSIX_SPAWN_DUP2, fd, at) for fd, at in p.moves],
                    setsid=True, setsigmask=(),
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGINT, signal.SIGTERM))
            finally:
                for fd, _ in p.moves:
                    os.close(fd)
            return pid, time.time()

        pid, started = await trio.to_thread.run_sync(start)
        pidfd = os.pidfd_open(pid)
        g = Gen(n, pid, pidfd, proc.start_ticks(pid) or 0, started, time.monotonic(), child=True)
        self.gens.append(g)
        log.info("event=generation_started app=%s gen=%d pid=%d", o.app, n, pid)
        self.nursery.start_soon(self._reap, g)
        await self.report()
        return g

    async def _reap(self, g: Gen) -> None:
        try:
            await trio.lowlevel.wait_readable(g.pidfd)
        except trio.ClosedResourceError:
            return
        try:
            os.killpg(g.pid, signal.SIGKILL)  # what it forked and left behind (its pid is not free before the reap)
        except OSError:
            pass
        if g.child:
            try:
                _, st = os.waitpid(g.pid, os.WNOHANG)
                g.status = _describe(st)
            except ChildProcessError:
                g.status = "gone"
        else:
            g.status = "exited (not our child: status unknown)"
        os.close(g.pidfd)
        g.state = "exited"
        self.gens.remove(g)
        g.exited.set()
        log.info("event=generation_exited app=%s gen=%d pid=%d status=%s", self.o.app, g.gen, g.pid, g.status)
        self.send.send_nowait(("exited", g))

    async def wait_ready(self, g: Gen) -> tuple[bool, str]:
        r = self.o.ready
        outcome: list[tuple[bool, str]] = []

        async def readiness() -> None:
            if r.mode == "notify":
                await g.ready_event.wait()
            elif r.mode == "delay":
                await trio.sleep(r.delay)
            else:
                await self._check_until_ok(g)
            outcome.append((True, ""))

        async def exited() -> None:
            await g.exited.wait()
            outcome.append((False, f"the new generation (pid {g.pid}) exited before it was ready: {g.status}"))

        async def stopping() -> None:
            await self.stop.wait()
            outcome.append((False, "cprd serve is stopping"))

        with trio.move_on_after(self.o.ready_timeout):
            async with trio.open_nursery() as n:
                for f in (readiness, exited, stopping):
                    async def one(f=f) -> None:
                        await f()
                        n.cancel_scope.cancel()
                    n.start_soon(one)
        if not outcome:
            return False, f"the new generation (pid {g.pid}) was not ready within {self.o.ready_timeout:g} s ({r})"
        if outcome[0][0] and g.exited.is_set():
            return False, f"the new generation (pid {g.pid}) exited: {g.status}"
        return outcome[0]

    async def _check_until_ok(self, g: Gen) -> None:
        """The check command until it exits 0, told which generation it checks: CPRD_GENERATION_PID
        (the old one may answer a plain request on the shared listener)."""
        env = {**os.environ, "CPRD_GENERATION_PID": str(g.pid), "CPRD_GENERATION": str(g.gen)}
        while True:
            try:
                with trio.move_on_after(max(1.0, min(10.0, self.o.ready_timeout))):
                    r = await trio.run_process(["/bin/sh", "-c", self.o.ready.check], check=False, env=env,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
                    if r.returncode == 0:
                        return
            except OSError as e:
                log.warning("event=check_failed app=%s error=%r", self.o.app, str(e))
            await trio.sleep(CHECK_EVERY_S)

    async def retire(self, g: Gen, kill: bool = False) -> None:
        """The stop signal, then after the drain time SIGKILL to its process group; bounded."""
        if g.exited.is_set():
            return
        g.state = "stopping"
        if not kill:
            proc.signal_pidfd(g.pidfd, self.o.stop_signal)
            await self.report()
            with trio.move_on_after(self.o.drain):
                await g.exited.wait()
        if not g.exited.is_set():
            if proc.signal_pidfd(g.pidfd, 0):  # still the same process: its group is still its own
                try:
                    os.killpg(g.pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.signal_pidfd(g.pidfd, signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT_S):
                await g.exited.wait()
        await self.report()

    async def _keep_paths(self) -> None:
        """A unix listener's path that a generation removed (nginx and gunicorn do as they stop) is made
        again at once (listeners.restore): inotify on its directory, and a look every second besides."""
        unix = [li for li in self.o.listens if li.kind == "unix"]
        if not unix:
            return
        try:
            watch: listeners.PathWatch | None = listeners.PathWatch(unix)
        except OSError as e:
            log.warning("event=inotify_unavailable app=%s error=%r: unix paths are looked at every %g s",
                        self.o.app, str(e), FAST_S * 5)
            watch = None
        try:
            while True:
                with trio.move_on_after(1.0 if watch else FAST_S * 5):
                    if watch:
                        await trio.lowlevel.wait_readable(watch.fd)
                        watch.drain()
                for li in unix:
                    listeners.restore(li)
        finally:
            if watch:
                watch.close()

    # -- adopting what a previous supervisor left ----------------------------------------------------
    async def adopt(self, previous: dict) -> None:
        """Take over the generations a previous supervisor left; each is retired once one of ours is
        ready. A process is taken for one only if it still is what the record says (pid, start time),
        leads its own session, and holds one of the store's fds: a record names pids, and signalling a
        process that is not a generation of this app is never acceptable."""
        todo = [d for d in previous.get("generations", []) if d.get("state") != "exited"]
        if not todo:
            return
        idents = await self._store_idents()
        for d in todo:
            if any(x.pid == d["pid"] for x in self.gens):
                continue
            pidfd = proc.pidfd_open(d["pid"])
            if pidfd is None:
                continue
            if proc.start_ticks(d["pid"]) != d["ticks"] or _sid(d["pid"]) != d["pid"]:
                os.close(pidfd)  # the pid was reused (each generation leads a session of its own): not ours
                continue
            if not proc.holds_any(d["pid"], idents):
                os.close(pidfd)
                log.warning("event=generation_not_adopted app=%s pid=%d reason=it-holds-none-of-the-store's-fds "
                            "(left alone)", self.o.app, d["pid"])
                continue
            g = Gen(d["gen"], d["pid"], pidfd, d["ticks"], d["started"], 0.0, child=False, ready=d["ready"],
                    state="adopted")
            self.gens.append(g)
            self.adopted.append(g)
            self.n = max(self.n, g.gen)
            log.info("event=generation_adopted app=%s gen=%d pid=%d from_supervisor=%d", self.o.app, g.gen, g.pid,
                     previous.get("pid", 0))
            self.nursery.start_soon(self._reap, g)
        if self.current is not None:  # ours is ready already
            for old in self.adopted:
                self.nursery.start_soon(self.retire, old)
            self.adopted = []

    async def _store_idents(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every fd in the app's store."""
        deadline = trio.current_time() + 10.0
        while True:
            try:
                async with self._one_request:
                    rows, fds = await self.client.request("fdstore", app=self.o.app, action="list")
                fds.close()
                return {(os.makedev(*map(int, r["dev"].split(":"))), r["ino"]) for r in rows}
            except (CprdError, OSError) as e:
                if trio.current_time() > deadline:
                    log.warning("event=adoption_failed app=%s error=%r: the previous generations are left "
                                "alone", self.o.app, str(e))
                    return set()
                await trio.sleep(0.2)

    # -- the daemon: heartbeat, report, restarts asked, READY=1 -------------------------------------
    def _report_json(self) -> str:
        return json.dumps({"token": self.token, "pid": os.getpid(), "generations": [g.report() for g in self.gens],
                           "restarts_done": self.restarts_done, "results": list(self.results)},
                          separators=(",", ":"))

    async def heartbeat(self, final: bool = False) -> None:
        async with self._one_request:  # one client connection: one request at a time
            reply, fds = await self.client.request("fdstore", app=self.o.app, action="serve",
                                                   report=self._report_json())
        fds.close()
        if reply.get("previous") and not final:
            if self.nursery is None:
                self._previous = reply["previous"]
            else:  # not under this request's deadline: the daemon hands a previous record over once
                self.nursery.start_soon(self.adopt, reply["previous"])
        for rid in reply.get("restarts", []):
            if not final:
                self.send.send_nowait(("restart", rid))
        now = time.monotonic()
        for pid, age in reply.get("ready", []):
            for g in self.gens:
                if g.child and not g.ready_event.is_set() and now - age >= g.t0 and _descends(pid, g.pid):
                    g.ready_event.set()

    async def report(self) -> None:
        """Tell the daemon now (not at the next heartbeat) what changed."""
        try:
            with trio.move_on_after(2.0):
                await self.heartbeat()
        except Busy as e:
            self._superseded(str(e))
        except (CprdError, OSError):
            pass  # the next heartbeat tries again

    async def _heartbeats(self) -> None:
        while True:
            waiting = self.o.ready.mode == "notify" and any(g.state == "starting" for g in self.gens)
            await trio.sleep(FAST_S if waiting else HEARTBEAT_S)
            try:
                with trio.fail_after(3.0):
                    await self.heartbeat()
                if self._unreachable_since is not None:
                    log.info("event=daemon_reachable_again app=%s", self.o.app)
                self._unreachable_since = None
            except Busy as e:
                self._superseded(str(e))
                return
            except (CprdError, OSError, trio.TooSlowError) as e:
                if self._unreachable_since is None:
                    self._unreachable_since = trio.current_time()
                    log.warning("event=daemon_unreachable app=%s error=%r (the generations keep serving)",
                                self.o.app, str(e))
                await trio.sleep(min(1.0, trio.current_time() - self._unreachable_since))

    def _superseded(self, why: str) -> None:
        if self.superseded is None:
            self.superseded = why
            self.stop.set()
            self.send.send_nowait(("superseded",))

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as sigs:
            async for s in sigs:
                if s == signal.SIGHUP:
                    self.send.send_nowait(("restart", None))
                else:
                    log.info("event=stopping app=%s signal=%s", self.o.app, signal.Signals(s).name)
                    self.stop.set()
                    self.send.send_nowait(("stop",))


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        st = proc.stat_of(pid)
        if st is None or st[1] <= 1:
            return False
        pid = st[1]
    return False


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def main(o: Options) -> int:
    return trio.run(Supervisor(o).run)


