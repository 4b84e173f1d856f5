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
- **upgrade**: serving -> upgrading. Mutations freeze, accepting stops, the new program is exec'd
  in this very process (upgrade.py) and answers the requester; if the exec fails, serving again.

What this module may know: trio, the lifecycle, the endpoint, the handoff driver, the upgrade.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .. import sdnotify
from ..errors import Busy, CprdError, HandoffError, UsageError
from ..fds import OwnedFds
from ..handoff import Result, SourceHooks, send_table
from ..paths import unlink_if_same
from ..protocol import control as cp
from .endpoint import Endpoint, Unanswered
from .handlers import Handlers, Reply, upgrade_timeout
from .notify import FdStores
from .lifecycle import Lifecycle, Phase
from .state import DaemonState

log = logging.getLogger("cprd.daemon")


class Daemon:
    def __init__(self, st: DaemonState) -> None:
        self.st = st
        self.life = Lifecycle()
        self.exit_code = 0
        self._nursery: trio.Nursery | None = None
        self.endpoint = Endpoint(st.listener, st.config, st.allowed_uids, self._handle, self._replied,
                                 lambda: f"{len(st.table)} entries")
        self.handlers = Handlers(st, self.life, lambda: self.endpoint.conns, self._handoff_req, self._upgrade_req,
                                 self._fdstore_req, lambda e: self.stores.describe(e), self._status_extra)
        self.stores = FdStores(st, self.life, self.handlers.check_room)
        self.stores.load()  # the fd stores a handoff or an upgrade brought along

    async def _handle(self, req: cp.Request, fds: OwnedFds, conn: Any, uid: int) -> Reply:
        return await self.handlers(req, fds, conn, uid)

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, on_serving: Callable[[], Awaitable[None]] | None = None) -> int:
        st = self.st
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self.endpoint.nursery = nursery
                nursery.start_soon(self._watch_signals)
                self.endpoint.start_accepting()
                await self.stores.run(nursery)
                log.info("event=serving role=%s pid=%d control=%s entries=%d", st.role, os.getpid(),
                         st.control_path, len(st.table))
                if st.role == "target":
                    sdnotify.mainpid(os.getpid())  # the service's main process is now this one
                sdnotify.ready(self.status_line())
                if on_serving is not None:
                    await on_serving()
        finally:
            self.endpoint.close()
            self.stores.close()
        return self.exit_code

    def stop(self, code: int = 0) -> None:
        self.exit_code = code
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
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

    def _status_extra(self) -> dict[str, Any]:
        summary = self.stores.summary()
        return {"fdstore": summary} if summary else {}

    # -- the fd stores (systemd's protocol) ------------------------------------------------------
    async def _fdstore_req(self, req: cp.Request, fds: OwnedFds, conn: Any) -> Reply:
        a = req.args
        action, app, limit = a["action"], a["app"], (None if a["max"] < 0 else a["max"])
        if action in ("open", "socket"):
            await self.life.until_thawed()  # a store made during a handoff's last moments would not travel
            if self.life.handed_off:
                raise Unanswered()
            store = self.stores.open(app, limit, shared=bool(self.st.config.allow_uids))
            self.stores.drain(app)  # what the app's previous run sent before it died is stored first
            info = {"app": app, "socket": store.meta.path, "max": store.meta.max, "fds": store.stored()}
            if action == "socket":
                return cp.encode_reply(info), []
            held = self.stores.fds_of(app)
            info["fdnames"] = [name for name, _ in held]
            fds_out = [fd for _, fd in held]
            return cp.encode_reply(info, -(-len(fds_out) // 253) or 1), fds_out
        if action == "list":
            return cp.encode_reply(self.stores.rows(app)), []
        if action == "clean":
            await self.life.until_thawed()
            if self.life.handed_off:
                raise Unanswered()
            return cp.encode_reply({"app": app, "removed": self.stores.clean(app)}), []
        raise UsageError(f"fdstore action {action!r} is not one of open, socket, list, clean")

    def status_line(self) -> str:
        return f"serving {len(self.st.table)} entries on {self.st.control_path} ({self.st.role})"

    async def _exit_soon(self) -> None:
        """Exit even if the client that asked for the handoff is gone (its reply then never goes out)."""
        await trio.sleep(2)
        self.stop(0)

    # -- handoff -----------------------------------------------------------------------------
    async def _handoff_req(self, req: cp.Request, fds: OwnedFds, conn: Any) -> Reply:
        a = req.args
        return cp.encode_reply(await self.handoff(a["to"], a["batch"], a["window"])), []

    async def handoff(self, to: str, batch: int, window: int) -> dict[str, Any]:
        if self.life.phase is not Phase.SERVING:
            raise Busy(f"a handoff is already {self.life.phase.value}; wait for it to finish")
        if not os.path.isabs(to):
            raise UsageError(f"handoff target path {to!r} must be absolute")
        if len(to.encode()) > 107:
            raise UsageError(f"handoff target path {to} is {len(to.encode())} bytes; UNIX socket paths are limited "
                             "to 107: give the target a shorter --listen path")
        st, life, endpoint = self.st, self.life, self.endpoint
        life.to(Phase.HANDING_OFF)
        stopped = False

        async def freeze() -> None:
            life.freeze()

        async def before_commit() -> None:
            nonlocal stopped
            stopped = life.committing = True
            await endpoint.stop_accepting()

        try:
            res: Result = await send_table(
                st.table, to, listener_fd=st.listener.fileno(), control_path=st.control_path, batch=batch,
                window=window, hooks=SourceHooks(freeze, before_commit, st.replies.since),
                allowed_uids={os.geteuid(), 0})  # the table goes only to our own user or root
        except BaseException as e:
            life.to(Phase.SERVING)
            life.committing = False
            st.table.stop_journal()
            life.thaw()
            if stopped and self._nursery is not None and not endpoint.accepting:
                endpoint.start_accepting()
            if isinstance(e, (CprdError, OSError)):
                log.warning("event=handoff_failed to=%s error=%r entries_kept=%d", to, str(e), len(st.table))
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
    async def _upgrade_req(self, req: cp.Request, fds: OwnedFds, conn: Any) -> Reply:
        timeout = upgrade_timeout(req, self.st.config.upgrade_timeout)
        # On success this does not return: the new program answers on this very connection.
        return cp.encode_reply(await self.upgrade(req.args["program"] or None, conn, timeout)), []

    async def _upgrade_logged(self) -> None:
        try:
            await self.upgrade(None, None, self.st.config.upgrade_timeout)
        except CprdError as e:
            log.error("event=upgrade_failed trigger=SIGHUP error=%r", str(e))

    async def upgrade(self, program: str | None, conn: Any, timeout: float) -> dict[str, Any]:
        """Exec a new program in this PID with the table (see upgrade.py). Returns only when the exec
        failed, with everything as it was."""
        from .. import upgrade
        from ..paths import check_program

        st, life = self.st, self.life
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
        life.to(Phase.UPGRADING)
        life.freeze()
        t0 = upgrade.now_ms()
        await self.endpoint.stop_accepting()  # from now on connections wait in the backlog for the new program
        try:
            state = st.upgrade_state(t0, conn.fileno() if conn is not None else None)
            try:
                prep = upgrade.prepare(state, program, list(st.config.own_args), timeout)
            except OSError as e:  # a memfd, a pipe or the guardian could not be made (at the fd limit?)
                raise upgrade.UpgradeError(f"cannot prepare the upgrade: {e}; the running daemon (pid "
                                           f"{os.getpid()}) goes on serving, nothing changed") from None
            sdnotify.reloading(f"upgrading in place to {prep.argv[0]} with {len(st.table)} entries")
            log.info("event=upgrade_exec program=%r entries=%d guardian_pid=%d", prep.argv, len(st.table),
                     prep.guardian_pid)
            try:
                prep.exec()
            except OSError as e:
                prep.abort()
                raise upgrade.UpgradeError(
                    f"cannot run {prep.argv[0]}: {e.strerror}; the running daemon (pid {os.getpid()}) goes on "
                    "serving, nothing changed") from None
        except BaseException:
            life.to(Phase.SERVING)
            life.thaw()
            if self._nursery is not None and not self.endpoint.accepting:
                self.endpoint.start_accepting()
            sdnotify.ready(self.status_line())
            raise
        raise AssertionError("exec returned")  # pragma: no cover
