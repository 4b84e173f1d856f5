"""The daemon: a DaemonState served on its control endpoint, handed off or upgraded whole.

Theory of operation
-------------------
One trio nursery holds: a signal watcher (SIGTERM/SIGINT stop the daemon cleanly, SIGHUP upgrades
it in place, as systemd's ExecReload= asks), the endpoint's accept loop, and one task per client
connection (endpoint.py). Requests are handled by the request table (handlers.py); the table is
touched only from these tasks, which trio runs one at a time, so no locks are needed.

The two requests that move the whole table live here, as they drive the lifecycle
(lifecycle.py) and the endpoint:

- **handoff**: serving -> handing-off. The source session (handoff.py) copies the table while
  the daemon goes on serving, mutations included; it freezes them for the last delta, and stops
  accepting just before Commit (the listening socket travels with it; a client that connects
  meanwhile waits in the backlog, it is never refused). Success: handed-off; the daemon answers
  the requester and exits; mutations that waited hang up and are retried at the target. Failure:
  serving again, accepting again, nothing lost.
- **upgrade**: serving -> upgrading. With SIGHUP, SIGTERM and SIGINT blocked (a reload that
  arrives now waits for the new program's handlers instead of killing it), the daemon forks: the
  child, the stand-in (standin.py), serves on with the table and every connection; this process
  never returns to the event loop: it writes the state as it was at the fork, forks the guardian
  and execs the new program in this very pid (upgrade.py), which takes the table over from the
  stand-in (takeover.py) and answers the requester. An error before the fork: serving again,
  nothing changed. Who owns the table after any failure is the upgrade's sessions' to say
  (protocol/upgrade.py).

What this module may know: trio, the lifecycle, the endpoint, the handoff driver, the upgrade.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio

from .. import proc, sdnotify
from ..access import LANE_NAME, Peer
from ..errors import Busy, CprdError, HandoffError, UpgradeError, UsageError
from ..fds import OwnedFds
from ..handoff import Result, SourceHooks, send_table
from ..limits import unix_path_problem
from ..kinds import classify
from ..paths import bind_listener, file_id, lane_path, peer_cred, trusted_uids, unlink_if_same
from ..protocol import control as cp
from .endpoint import Endpoint, Unanswered
from .handlers import Handlers, Reply, upgrade_timeout
from .notify import FdStores
from .owners import Owners
from .standby import Standby
from .standin import StandIn
from .lifecycle import Lifecycle, Phase
from .state import DaemonState

log = logging.getLogger("cprd.daemon")


RELOAD_SIGNALS = proc.RELOAD_SIGNALS


def _yield_cpu(state: Any) -> None:
    """The new program starts (an interpreter, trio, cprd, the state verified: a few hundred ms of
    CPU) while the stand-in serves on the same cores: let the stand-in go first. Only as root, who
    may take the priority back once the new program serves (upgrade state "nice")."""
    if os.geteuid() != 0:
        return
    try:
        old = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(19, old + 10))
    except OSError:
        return
    state.nice = old



def _is_lane(fd: int) -> bool:
    """Whether fd is a listening UNIX SOCK_SEQPACKET socket that the daemon's user or root made
    listen (SO_PEERCRED of a listening socket: who called listen()): a lane this daemon made."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return (s.family == socket.AF_UNIX and s.type == socket.SOCK_SEQPACKET
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                and peer_cred(s)[1] in trusted_uids())
    except OSError:
        return False
    finally:
        s.detach()

class Daemon:
    def __init__(self, st: DaemonState) -> None:
        self.st = st
        self.life = Lifecycle()
        self.exit_code = 0
        self._nursery: trio.Nursery | None = None
        # Set once what follows the start of serving is done (a take-over's reaping, its strays, its
        # answer): a move waits for it, since a fork would copy that unfinished task into the stand-in.
        self.settled = trio.Event()
        self.endpoint = Endpoint(st.listener, st.config, st.allowed_uids, self._handle, self._replied,
                                 lambda: f"{len(st.table)} entries", lambda: st.table.version)
        self.owners = Owners(st)
        self.owners.load()  # who owns what: its log came along with the table
        self.handlers = Handlers(st, self.life, self.owners, lambda: self.endpoint.conns, self._handoff_req,
                                 self._upgrade_req, self._fdstore_req, lambda e: self.stores.describe(e),
                                 self._status_extra, lambda app: self.stores.keys_of(app))
        self.stores = FdStores(st, self.life, self.handlers.check_room, self.owners)
        self.stores.load()  # the fd stores a handoff or an upgrade brought along
        self._open_lanes()
        self.standby = Standby(self) if st.config.standby else None

    def _open_lanes(self) -> None:
        """A lane for each uid of --allow-uid (endpoint.py): its listening socket is a table entry,
        found there if the table came from a handoff or an upgrade, else made. The control socket
        itself is only the daemon's user's and root's (mode 0600, whatever an older cprd made it)."""
        st = self.st
        fid = file_id(st.control_path)
        if fid is not None and fid == st.control_fid:
            try:
                os.chmod(st.control_path, 0o600, follow_symlinks=False)
            except OSError:
                pass
        for uid in sorted(set(st.config.allow_uids) - trusted_uids()):
            old = st.table.find(LANE_NAME, uid)
            if old is not None and _is_lane(old.fd):
                continue
            if old is not None:  # not a lane this daemon made (see below): dropped, and a lane made
                log.error("event=lane_refused uid=%d note=not-a-listening-socket-the-daemon-made;replaced", uid)
                st.table.delete(LANE_NAME, uid)
            try:
                sock = bind_listener(lane_path(st.control_path, uid), f"lane of uid {uid}", owner=uid)
            except CprdError as e:
                if st.role == "source" and not st.handoffs and not st.upgrades:
                    raise
                log.error("event=lane_not_made uid=%d error=%r note=that-uid-cannot-connect", uid, str(e))
                continue
            fd = sock.detach()
            try:
                st.table.save(LANE_NAME, uid, fd, classify(fd))
            except BaseException:
                os.close(fd)
                raise
        for name, uid in st.table.keys_with_prefix(LANE_NAME):
            e = st.table.find(name, uid)
            if name != LANE_NAME or e is None:
                continue
            if not _is_lane(e.fd):
                # not a socket this daemon made (a table from a cprd older than lanes, where any allowed
                # uid could put such a name): never served as a lane
                log.error("event=lane_refused uid=%d note=not-a-listening-socket-the-daemon-made", uid)
                continue
            self.endpoint.add_lane(uid, e.fd)

    async def _handle(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        return await self.handlers(req, fds, conn, who)

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, on_serving: Callable[[], Awaitable[None]] | None = None, stores_after: bool = False,
                  new_main_pid: bool = False) -> int:
        """Serve until stopped. `stores_after`: read the fd stores' sockets only once on_serving
        returned (a target: once it confirmed; before that the table may still go back to the
        source, and a datagram read meanwhile would be lost with the target)."""
        st = self.st
        # What exists now (the table above all) lives as long as the daemon: out of the collector's
        # sight, so that a full collection scans only what came since (at 7,530 entries, a full
        # collection otherwise stalls every client for about 15 ms). No collection first: at
        # 19,000 entries it would itself take 30 ms, while clients wait for this daemon to serve.
        gc.freeze()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self.endpoint.nursery = nursery
                await nursery.start(self._watch_signals)
                self.endpoint.start_accepting()
                if not stores_after:
                    await self.stores.run(nursery)
                log.info("event=serving role=%s pid=%d control=%s entries=%d", st.role, os.getpid(),
                         st.control_path, len(st.table))
                if st.role == "target" or new_main_pid:
                    sdnotify.mainpid(os.getpid())  # the service's main process is now this one
                sdnotify.ready(self.status_line())
                if on_serving is not None:
                    await on_serving()
                try:
                    self.owners.settle()  # serving alone now: a log whose load ignored records is written anew
                except CprdError as e:
                    log.error("event=owners_not_settled error=%r", str(e))
                self.settled.set()
                if self.standby is not None:  # the table is ours alone now (a target: confirmed)
                    nursery.start_soon(self.standby.run)
                if stores_after:
                    await self.stores.run(nursery)
        finally:
            self.endpoint.close()
            self.stores.close()
        return self.exit_code

    @property
    def nursery(self) -> trio.Nursery | None:
        return self._nursery

    def nursery_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn)

    def stop(self, code: int = 0) -> None:
        if self.standby is not None:  # a deliberate end: the standby must not take over
            self.standby.retire("the daemon stops")
        self.exit_code = code
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _watch_signals(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*RELOAD_SIGNALS) as signals:
            # An upgrade blocked them before its exec (a reload that arrived meanwhile waits, instead
            # of killing the new program): our handlers are in place, so let them in, queued ones too.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, RELOAD_SIGNALS)
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:  # systemd's ExecReload=: upgrade in place to the same program
                    assert self._nursery is not None
                    self._nursery.start_soon(self._upgrade_logged)
                    continue
                log.info("event=stopping signal=%s entries=%d", signal.Signals(signum).name, len(self.st.table))
                sdnotify.stopping()
                if not self.life.handed_off and not self.life.committing:
                    unlink_if_same(self.st.control_path, self.st.control_fid)
                self.stop(0)
                return

    def _replied(self, op: str) -> None:
        if op == "handoff" and self.life.handed_off:
            self.stop(0)

    def _status_extra(self, who: Peer) -> dict[str, Any]:
        summary = self.stores.summary(who)
        extra: dict[str, Any] = {"fdstore": summary} if summary else {}
        if self.standby is not None:
            extra["standby"] = self.standby.describe()
        return extra

    # -- the fd stores (systemd's protocol) ------------------------------------------------------
    async def _fdstore_req(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        a = req.args
        action, app, limit = a["action"], a["app"], (None if a["max"] < 0 else a["max"])
        if action in ("open", "socket"):
            await self.life.until_thawed()  # a store made during a handoff's last moments would not travel
            if self.life.handed_off:
                raise Unanswered()
            store = self.stores.open(app, limit, who)
            self.stores.drain(app)  # what the app's previous run sent before it died is stored first
            info = {"app": app, "socket": store.meta.path, "max": store.meta.max, "fds": store.stored()}
            if action == "socket":
                return cp.encode_reply(info), []
            held = self.stores.fds_of(app)
            info["fdnames"] = [name for name, _ in held]
            fds_out = [fd for _, fd in held]
            return cp.encode_reply(info, -(-len(fds_out) // 253) or 1), fds_out
        if action == "list":
            return cp.encode_reply(self.stores.rows(app, who)), []
        if action in ("clean", "remove"):
            await self.life.until_thawed()
            if self.life.handed_off:
                raise Unanswered()
            self.stores.check(app, who, action, change=True)
            n = self.stores.clean(app) if action == "clean" else self.stores.remove_store(app)
            return cp.encode_reply({"app": app, "removed": n}), []
        if action == "serve":
            return cp.encode_reply(self.stores.supervise(app, who, a["report"])), []
        if action == "restart":
            return cp.encode_reply(self.stores.ask_restart(app, who, a["report"])), []
        raise UsageError(f"fdstore action {action!r} is not one of open, socket, list, clean, remove, serve, restart")

    def status_line(self) -> str:
        return f"serving {len(self.st.table)} entries on {self.st.control_path} ({self.st.role})"

    async def _exit_soon(self) -> None:
        """Exit even if the client that asked for the handoff is gone (its reply then never goes out)."""
        await trio.sleep(2)
        self.stop(0)

    # -- handoff -----------------------------------------------------------------------------
    async def _handoff_req(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        a = req.args
        return cp.encode_reply(await self.handoff(a["to"], a["batch"], a["window"])), []

    async def handoff(self, to: str, batch: int, window: int) -> dict[str, Any]:
        await self.settled.wait()
        if self.life.phase is not Phase.SERVING:
            raise Busy(f"a handoff is already {self.life.phase.value}; wait for it to finish")
        if not os.path.isabs(to):
            raise UsageError(f"handoff target path {to!r} must be absolute")
        if (problem := unix_path_problem(to, "handoff target path")) is not None:
            raise UsageError(f"{problem} (the target's --listen)")
        st, life, endpoint = self.st, self.life, self.endpoint
        life.to(Phase.HANDING_OFF)
        stopped = False
        if self.standby is not None:  # from now on the target may hold the table: one owner's protocol
            self.standby.retire("a handoff starts")

        async def freeze() -> None:
            life.freeze()

        async def before_commit() -> None:
            log.info("event=shared pid=%d why=handoff-ready note=the-target-holds-every-entry", os.getpid())
            nonlocal stopped
            stopped = life.committing = True
            await endpoint.stop_accepting()

        try:
            res: Result = await send_table(
                st.table, to, listener_fd=st.listener.fileno(), control_path=st.control_path, batch=batch,
                window=window, hooks=SourceHooks(freeze, before_commit, st.replies.since),
                allowed_uids=trusted_uids())  # the table goes only to our own user or root
        except BaseException as e:
            life.to(Phase.SERVING)
            life.committing = False
            st.table.stop_journal()
            life.thaw()
            if self.standby is not None:
                self.standby.resume()
            if stopped and self._nursery is not None and not endpoint.accepting:
                endpoint.start_accepting()
            if isinstance(e, (CprdError, OSError)):
                log.warning("event=handoff_failed to=%s error=%r entries_kept=%d", to, str(e), len(st.table))
            log.info("event=sole_owner pid=%d role=%s", os.getpid(), st.role)
            if isinstance(e, OSError):
                raise HandoffError(f"handoff to {to} failed: {e}; the source keeps every entry") from None
            raise
        life.to(Phase.HANDED_OFF)
        endpoint.closing = True
        life.thaw()  # waiting mutations see "handed-off" and hang up: their clients retry at the target
        assert self._nursery is not None
        self._nursery.start_soon(self._exit_soon)
        return res.describe()

    # -- upgrade -----------------------------------------------------------------------------
    async def _upgrade_req(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        timeout = upgrade_timeout(req, self.st.config.upgrade_timeout)
        # On success this does not return: the new program answers on this very connection.
        return cp.encode_reply(await self.upgrade(req.args["program"] or None, conn, timeout)), []

    async def _upgrade_logged(self) -> None:
        try:
            await self.upgrade(None, None, self.st.config.upgrade_timeout)
        except Unanswered:
            pass  # the stand-in, once the new program took over
        except CprdError as e:
            log.error("event=upgrade_failed trigger=SIGHUP error=%r", str(e))

    async def upgrade(self, program: str | None, conn: Any, timeout: float) -> dict[str, Any]:
        """Upgrade in place (upgrade.py, standin.py): fork a stand-in that serves on, and exec the new
        program in this pid. In this process it returns only if nothing was forked (an error before
        the fork: everything as it was); in the stand-in it returns the answer of a rolled-back
        upgrade, or raises Unanswered when the new program has taken over (which answers)."""
        from .. import upgrade
        from ..paths import check_program
        from ..protocol.upgrade import Deadlines

        st, life = self.st, self.life
        await self.settled.wait()  # (a reload queued across the last upgrade's exec arrives before it is done)
        if life.phase is not Phase.SERVING:
            raise Busy(f"the daemon is {life.phase.value}; retry the upgrade when it is done")
        if program is not None:
            if not os.path.isabs(program):
                raise UsageError(f"upgrade program {program!r} must be an absolute path")
            try:
                program = check_program(program, "upgrade program")  # it will hold every fd of the table
            except CprdError as e:
                raise type(e)(f"{e}; the running daemon (pid {os.getpid()}) goes on serving, nothing changed") \
                    from None
        deadlines = Deadlines(start_s=timeout, answer_s=st.config.answer_timeout)
        # From here to the fork nothing awaits: the table at the fork is the one the state describes.
        life.to(Phase.UPGRADING)
        if self.standby is not None:  # the guardian protects the upgrade; the program that serves after starts one
            self.standby.retire("an upgrade starts")
        t0 = upgrade.now_ms()
        socks: list[socket.socket] = []
        fds: list[int] = []
        mask = None
        try:
            upgrade.new_argv(program, list(st.config.own_args))  # a missing program: nothing happens
            pair = lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)  # noqa: E731
            jp, jc = pair()  # the journal: the new program's end, the stand-in's
            gp, gc = pair()  # the guardian's copy of it: the guardian's end, the stand-in's
            lp, lg = pair()  # the guardian's link: the new program's end, the guardian's
            socks += [jp, jc, gp, gc, lp, lg]
            hr, hw = os.pipe2(os.O_CLOEXEC)  # the stand-in's word to the guardian
            fds += [hr, hw]
            watch = os.pidfd_open(os.getpid())  # the stand-in's view of this pid
            fds.append(watch)
            parent = os.getpid()
            if os.getpgid(0) != parent:  # lead a process group of our own (upgrade.py), before the fork
                os.setpgid(0, 0)
            # A fence kills the new program's whole group, what a wrapper forked with it; unless others
            # share it (started in a shell pipeline, `cprd source | tee`): then only pidfds, children and
            # the holders of the upgrade's state are killed, never a process the upgrade did not start.
            group = None if proc.group_members(parent) - {parent} else parent
            # A reload or a stop that arrives from now until the new program's handlers are in place
            # waits (the mask survives the exec); SIGHUP's default action would kill the new program.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, RELOAD_SIGNALS)
            t_fork = time.perf_counter()
            pid = os.fork()
        except BaseException as e:
            for sock in socks:
                sock.close()
            for fd in fds:
                os.close(fd)
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            life.to(Phase.SERVING)
            if self.standby is not None:
                self.standby.resume()
            if isinstance(e, OSError):  # a memfd, a socket or the fork could not be made (at the fd limit?)
                raise UpgradeError(f"cannot prepare the upgrade: {e}; the running daemon (pid "
                                           f"{os.getpid()}) goes on serving, nothing changed") from None
            raise
        if pid == 0:  # the stand-in
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # it serves as the daemon did, signals included
            for sock in (jp, gp, lp, lg):
                sock.close()
            os.close(hr)
            try:
                os.setpgid(0, 0)  # out of the daemon's group, which a failed upgrade kills
            except OSError:
                pass
            proc.set_name("cprd-standin")
            notify = os.environ.pop("NOTIFY_SOCKET", None)  # the service manager hears the daemon's pid only
            s = StandIn(self, jc, gc, hw, watch, parent, deadlines, notify,
                        upgrade.new_argv(program, list(st.config.own_args)), group)
            s.start()
            result = await s.serve()
            if result is None:
                raise Unanswered()  # the new program answers the client that asked
            return result
        for sock in (jc, gc):
            sock.close()
        os.close(hw)
        os.close(watch)
        try:  # the same from this side: out of our group before either process runs on (a group kill)
            os.setpgid(pid, pid)
        except OSError:
            pass  # it is gone already (it does the same itself)
        log.info("event=upgrade_forked standin_pid=%d fork_ms=%.1f entries=%d", pid,
                 (time.perf_counter() - t_fork) * 1e3, len(st.table))
        self._exec_upgrade(program, deadlines, t0, conn, pid, jp, gp, lp, lg, hr, group)  # never returns
        raise AssertionError("exec returned")  # pragma: no cover

    def _exec_upgrade(self, program: str | None, deadlines: Any, t0: float, conn: Any, standin: int,
                      jp: socket.socket, gp: socket.socket, lp: socket.socket, lg: socket.socket, hr: int,
                      group: int | None) -> NoReturn:
        """The old program after the fork: the state of the table as it was at the fork (this
        process's copy of it no longer changes), the guardian, the exec. It must never return to
        the event loop (the stand-in is the daemon now): if even running the previous program again
        fails, it exits, and the stand-in keeps the table."""
        from .. import statefd, upgrade
        from ..protocol.upgrade import Standin

        st = self.st
        log.info("event=shared pid=%d why=upgrade standin=%d", os.getpid(), standin)
        try:
            standin_pidfd = proc.pidfd_open(standin)  # for the guardian: to fence it, and to tell it alive (rule 4)
            if standin_pidfd is None:
                raise UpgradeError(f"cannot open a pidfd of the stand-in (pid {standin}): the guardian could not "
                                   "tell it alive")
            state = st.upgrade_state(t0, conn.fileno() if conn is not None else None, deadlines)
            state.standin = Standin(standin, jp.fileno())
            state.group = group
            prep = upgrade.prepare(state, program, list(st.config.own_args))
            _yield_cpu(prep.state)
            prep.guard(lp.fileno(), lg.fileno(), hr, gp.fileno(), standin_pidfd, jp.fileno())
            lg.close()  # the guardian has its copies; the new program must not hold them
            gp.close()
            os.close(hr)
            if standin_pidfd is not None:
                os.close(standin_pidfd)
            sdnotify.reloading(f"upgrading in place to {prep.state.argv_new[0]} with {len(self.st.table)} entries")
            log.info("event=upgrade_exec program=%r entries=%d guardian_pid=%s standin_pid=%d", prep.state.argv_new,
                     len(self.st.table), prep.guardian_pid, standin)
            try:
                prep.exec()
            except OSError as e:
                reason = (f"cannot run {prep.state.argv_new[0]}: {e.strerror}; the previous program took the table "
                          f"back in pid {os.getpid()} and goes on serving, nothing changed")
                statefd.rollback(prep.state_fd, prep.state, reason)
        except BaseException as e:  # noqa: BLE001 - nothing may return into the event loop
            log.error("event=upgrade_exec_failed error=%r note=the-stand-in-keeps-the-table", str(e))
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(1)
