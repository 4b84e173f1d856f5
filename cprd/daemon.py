"""The daemon: owns an FdTable, serves the control socket, starts handoffs.

Theory of operation
-------------------
One trio nursery holds: a signal watcher (SIGTERM/SIGINT stop the daemon cleanly), the accept
loop on the listening control socket, and one task per client connection. Requests are handled
one at a time per connection; the table is touched only from these tasks, which trio runs one
at a time, so no locks are needed.

States: ``serving`` -> ``handing-off`` -> ``handed-off`` (then exit 0), or back to ``serving``
when a handoff fails. While handing off, the table is frozen: reads (get, ls, status) are
answered, mutations get a Busy error that says to retry. Just before Commit the accept loop
stops (the listening socket travels to the target, which accepts from then on; a client that
connects meanwhile waits in the kernel's backlog, it is never refused).

Each connection is bounded (Config): idle_timeout seconds without a request closes it, and so
does a reply the client does not read within idle_timeout; replies are sent a frame at a time,
and the reply to ``ls`` is built once per version of the table and shared, so a client that
never reads costs a reference, not a copy. At most max_clients are served at once, of which
users other than ours and root (when --allow-uid lets them in at all) hold at most half, each at
most a quarter (more of theirs are told Busy at once): more wait in the listening socket's
backlog (as large as the system allows) until a connection ends, and are told Busy only if none
ends within queue_timeout. Frames are size-checked before parsing. A peer whose uid is neither
ours, root, nor in --allow-uid is refused; an allowed uid that is neither ours nor root may use
the table (put, get, del, ls, status) but not hand it off or upgrade the daemon. At its fd limit
the daemon still answers: a spare fd is given up to accept and refuse a connection (EMFILE)
without waiting for the client, and a put is refused once the table holds as many entries as a
target with the same fd limit could take over (handoff.table_limit) or the daemon would be left
with fewer than FD_RESERVE free fds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from . import __version__, fault, scm, sdnotify
from .errors import (BadFd, Busy, CapacityError, CprdError, Denied, HandoffError, KeyMissing, ProtocolError,
                     UsageError, error_from_code)
from .fds import OwnedFds
from .handoff import Result, SourceHooks, fd_capacity, send_table, table_limit
from .kinds import classify
from .paths import file_id, max_backlog, peer_cred, unlink_if_same, user_name
from .protocol import control as cp
from .table import Entry, FdTable, check_key, check_new_name

log = logging.getLogger("cprd.daemon")

FD_RESERVE = 16  # fds a daemon keeps free for accepting, answering and handing off
RESULTS_KEPT = 4096  # answers to recent mutations, by request id, kept for exactly-once retries
_JSON = json.JSONEncoder(separators=(",", ":"))


ADMIN_OPS = ("handoff", "upgrade")  # only the daemon's own uid and root may ask for these


@dataclass(slots=True, frozen=True)
class Config:
    allow_uids: tuple[int, ...] = ()
    idle_timeout: float = 60.0
    max_clients: int = 256
    queue_timeout: float = 5.0  # how long clients wait in the backlog for a free slot before Busy
    upgrade_timeout: float = 30.0  # a new program that has not confirmed by then is killed and rolled back
    own_args: tuple[str, ...] = ()  # the command line after `cprd`, to exec again on an upgrade


class Daemon:
    def __init__(self, *, role: str, table: FdTable, listener: socket.socket, control_path: str,
                 config: Config = Config(), handoffs: int = 0) -> None:
        self.role = role
        self.table = table
        self.listener = listener
        self.control_path = control_path
        self.control_fid = file_id(control_path)
        self.config = config
        self.allowed_uids = {os.geteuid(), 0, *config.allow_uids}
        self._spare: int | None = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.state = "serving"
        self.handoffs = handoffs
        self.started = time.time()
        self.exit_code = 0
        self.salvage: dict | None = None
        self.source_died = False
        self.results: OrderedDict[str, dict[str, Any]] = OrderedDict()  # recent mutation answers by request id
        self._results_log: list[str] = []  # request ids in the order answered (for handing them on)
        self._results_base = 0  # position in that order of _results_log[0]
        self.committing = False  # the listening socket is (about to be) the target's: never unlink its path
        self._frozen: trio.Event | None = None
        self.upgrades = 0
        self._nursery: trio.Nursery | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._accept_done: trio.Event | None = None
        self._conns = 0
        self._by_uid: Counter[int] = Counter()  # connections served, by the peer's uid
        self._slot_freed = trio.Event()  # set when a connection ends (a slot for one waiting in the backlog)
        self._ls_cache: tuple[int, list[bytes]] | None = None  # (table version, frames of the reply to ls)
        self._ls_json: dict[tuple[str, int], tuple[Entry, bytes]] = {}  # each entry's JSON, while it lives
        self._exit_after_reply = False
        try:  # an inherited listener (a handoff from an older cprd, an upgrade) gets the largest backlog too
            listener.listen(max_backlog())
        except OSError:
            pass
        self._tlistener = trio.socket.from_stdlib_socket(listener)

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, on_serving: Callable[[], Awaitable[None]] | None = None) -> int:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_signals)
            self._start_accepting()
            log.info("event=serving role=%s pid=%d control=%s entries=%d", self.role, os.getpid(),
                     self.control_path, len(self.table))
            if self.role == "target":
                sdnotify.mainpid(os.getpid())  # the service's main process is now this one
            sdnotify.ready(self.status_line())
            if on_serving is not None:
                await on_serving()
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
                log.info("event=stopping signal=%s entries=%d", signal.Signals(signum).name, len(self.table))
                sdnotify.stopping()
                if self.state != "handed-off" and not self.committing:
                    unlink_if_same(self.control_path, self.control_fid)
                self.stop(0)
                return

    async def _upgrade_logged(self) -> None:
        try:
            await self._upgrade(None, None, self.config.upgrade_timeout)
        except CprdError as e:
            log.error("event=upgrade_failed trigger=SIGHUP error=%r", str(e))

    def _start_accepting(self) -> None:
        """Accept connections from the next scheduling point on. The scope and the done event
        exist at once, so _stop_accepting works even before the loop has run (no start-up round
        trip through the scheduler, which a target would otherwise spend inside the source's freeze:
        connections meanwhile wait in the listening socket's backlog)."""
        assert self._nursery is not None and self._accept_scope is None
        self._accept_scope, self._accept_done = trio.CancelScope(), trio.Event()
        self._nursery.start_soon(self._accept_loop, self._accept_scope, self._accept_done)

    async def _accept_loop(self, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope:
                while True:
                    await self._wait_for_a_slot()
                    try:
                        conn, _ = await self._tlistener.accept()
                    except OSError as e:
                        if e.errno not in (errno.EMFILE, errno.ENFILE):
                            raise
                        await self._refuse_at_limit()
                        continue
                    pid, uid, _ = peer_cred(conn)
                    refusal = self._admission(uid)
                    if refusal is not None:
                        log.warning("event=refused_peer pid=%d uid=%d code=%s", pid, uid, refusal.code)
                        self._refuse(conn, refusal)
                        continue
                    self._conns += 1
                    self._by_uid[uid] += 1
                    assert self._nursery is not None
                    self._nursery.start_soon(self._serve_conn, conn, uid)
        finally:
            done.set()

    def _admission(self, uid: int) -> CprdError | None:
        """Why a connection of `uid` is refused at once, or None to serve it. Users other than ours
        and root, when allowed at all, share at most half of max_clients, and each has at most a
        quarter: they can neither lock the daemon's own user out nor make its clients wait."""
        if uid not in self.allowed_uids:
            return Denied(f"uid {uid} may not use this cprd (it serves uids {sorted(self.allowed_uids)}); ask its "
                          "operator to add --allow-uid")
        most = self.config.max_clients
        if self._conns >= most:  # none ended within queue_timeout
            return Busy(f"the daemon serves {most} connections already and none ended within "
                        f"{self.config.queue_timeout:g} s; close idle clients and retry")
        if uid not in (os.geteuid(), 0):
            others = sum(n for u, n in self._by_uid.items() if u not in (os.geteuid(), 0))
            if others >= most // 2 or self._by_uid[uid] >= max(1, most // 4):
                return Busy(f"{user_name(uid)} holds {self._by_uid[uid]} connections and other users "
                            f"{others}: they may hold at most {max(1, most // 4)} each and {most // 2} together "
                            "(a share of --max-clients); close idle clients and retry")
        return None

    async def _wait_for_a_slot(self) -> None:
        """With max_clients connections served, leave new ones in the backlog until one ends, or for
        at most queue_timeout (then the next one is told Busy)."""
        with trio.move_on_after(self.config.queue_timeout):
            while self._conns >= self.config.max_clients:
                self._slot_freed = trio.Event()
                await self._slot_freed.wait()

    async def _stop_accepting(self) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()
            assert self._accept_done is not None
            await self._accept_done.wait()
            self._accept_scope = None

    async def _refuse_at_limit(self) -> None:
        """Out of fds, so accept() fails and the client would wait forever: give up the spare fd,
        accept the connection, tell the client why, and take the spare back."""
        log.warning("event=fd_limit_reached where=accept entries=%d", len(self.table))
        if self._spare is None:
            await trio.sleep(0.05)
            return
        os.close(self._spare)
        self._spare = None
        try:
            # Never wait here: a client that comes once fds are free again must be served, not refused.
            conn, _ = self.listener.accept()  # the fd is non-blocking (trio): EAGAIN if none is queued
        except OSError:
            await trio.sleep(0.05)
        else:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            self._refuse(conn, CapacityError(
                f"the daemon is at its fd limit (RLIMIT_NOFILE {soft}) with {len(self.table)} entries and "
                f"{self._conns} clients; close idle clients, delete entries or raise its limit (LimitNOFILE=, "
                "ulimit -n)"))
        finally:
            try:
                self._spare = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._spare = None

    @staticmethod
    def _refuse(conn: Any, err: CprdError) -> None:
        """Answer a connection we will not serve with err and close it at once, never waiting for the
        client. What it already sent is read and dropped first (its fds closed), so that the close
        does not reset the connection; a request that arrives after the close fails to send, and
        cprd's client then reads this answer, which waits in its queue."""
        with conn:
            raw = socket.socket(fileno=conn.fileno())  # borrowed for a send that must not wait
            try:
                for f in cp.encode_error(err):
                    raw.send(f, socket.MSG_DONTWAIT)
            except OSError:
                return
            finally:
                raw.detach()
            scm.drop_queued(conn.fileno())

    # -- one connection ----------------------------------------------------------------------
    async def _serve_conn(self, conn: Any, uid: int) -> None:
        try:
            with conn:
                while self.state != "handed-off":
                    with trio.move_on_after(self.config.idle_timeout) as cs:
                        try:
                            data, fds = await scm.recv(conn, cp.MAX_FRAME, 1, "control request")
                        except scm.Closed:
                            return
                        except CprdError as e:  # truncated fds (at our limit) or an oversize frame
                            if not await self._reply(conn, cp.encode_error(e), []):
                                return
                            continue
                    if cs.cancelled_caught:
                        return
                    with fds:
                        try:
                            req = cp.decode_request(data, len(fds))
                            if req.op in ADMIN_OPS and uid not in (os.geteuid(), 0):
                                who = "root" if os.geteuid() == 0 else f"{user_name(os.geteuid())} and root"
                                raise Denied(f"{user_name(uid)} may use this cprd's table but not {req.op} it: "
                                             f"only {who} may; ask its operator")
                            frames, out_fds = await self._dispatch(req, fds, conn)
                        except _HandedOff:
                            # The table moved on while this request waited: hang up without an answer;
                            # the client retries at the same path and reaches the new owner.
                            return
                        except CprdError as e:
                            log.info("event=request_failed code=%s error=%r", e.code, str(e))
                            frames, out_fds = cp.encode_error(e), []
                    if not await self._reply(conn, frames, out_fds):
                        return
                    if self._exit_after_reply and req.op == "handoff":
                        self.stop(0)
                        return
        finally:
            self._conns -= 1
            self._by_uid[uid] -= 1
            self._slot_freed.set()

    async def _reply(self, conn: Any, frames: Iterable[bytes], fds: list[int]) -> bool:
        """Send a reply a frame at a time (frames may be a generator that encodes as it goes). False,
        and the connection should close, if it failed or the client did not read it within
        idle_timeout."""
        try:
            with trio.move_on_after(self.config.idle_timeout) as cs:
                for i, f in enumerate(frames):
                    await scm.send(conn, f, fds if i == 0 else [], "control reply")
            if cs.cancelled_caught:
                log.info("event=reply_dropped reason=client-not-reading seconds=%g", self.config.idle_timeout)
                return False
        except (CprdError, OSError) as e:
            log.info("event=reply_failed error=%r", str(e))
            return False
        return True

    # -- requests ----------------------------------------------------------------------------
    async def _dispatch(self, req: cp.Request, fds: OwnedFds, conn: Any = None) -> tuple[Iterable[bytes], list[int]]:
        a = req.args
        if self.state == "handed-off":
            raise _HandedOff()
        if req.op in ("put", "del"):
            while self._frozen is not None:  # the last moments of a handoff: wait for its outcome
                await self._frozen.wait()
                if self.state == "handed-off":
                    raise _HandedOff()
            rid = a.get("rid") or ""
            if rid and rid in self.results:  # a retry of a mutation already applied: same answer
                self.results.move_to_end(rid)
                reply = self.results[rid]
                if reply.get("ok"):
                    return cp.encode_reply(reply["result"]), []
                raise error_from_code(reply["error"], reply["message"])
            try:
                result = self._mutate(req, fds)
            except CprdError as e:
                self._remember(rid, {"ok": False, "error": e.code, "message": str(e)})
                raise
            self._remember(rid, {"ok": True, "result": result})
            return cp.encode_reply(result), []
        if req.op == "get":
            check_key(a["name"], a["id"])
            entry = self.table.find(a["name"], a["id"])
            if entry is None:
                raise KeyMissing(f"no entry ({a['name']!r}, {a['id']}); list entries with `cprd ctl ls`")
            return cp.encode_reply(entry.describe()), [entry.fd]
        if req.op == "ls":
            return self._ls_frames(), []
        if req.op == "status":
            return cp.encode_reply(self.status()), []
        if req.op == "handoff":
            return cp.encode_reply(await self._handoff(a["to"], a["batch"], a["window"])), []
        if req.op == "upgrade":
            # On success this does not return: the new program answers on this very connection.
            timeout = a["timeout"] or self.config.upgrade_timeout
            if not 0 < timeout <= 3600:
                raise UsageError(f"upgrade timeout {timeout:g} s is outside (0, 3600]")
            return cp.encode_reply(await self._upgrade(a["program"] or None, conn, timeout)), []
        raise UsageError(f"unknown operation {req.op!r}")  # decode_request already refuses these

    def _ls_frames(self) -> list[bytes]:
        """The reply to `ls`, built once per version of the table and shared by every client that
        asks meanwhile (a client that never reads its reply costs a reference, not a copy); each
        entry is encoded once, as an Entry never changes (a replace makes a new one)."""
        table = self.table
        if self._ls_cache is not None and self._ls_cache[0] == table.version:
            return self._ls_cache[1]
        enc, parts = self._ls_json, []
        for e in sorted(table, key=Entry.sort_key):
            hit = enc.get((e.name, e.id))
            if hit is None or hit[0] is not e:
                hit = enc[(e.name, e.id)] = (e, _JSON.encode(e.describe()).encode())
            parts.append(hit[1])
        if len(enc) > 2 * len(table) + 64:  # many entries deleted since: forget what they encoded to
            self._ls_json = {(e.name, e.id): enc[(e.name, e.id)] for e in table if (e.name, e.id) in enc}
        frames = cp.encode_reply_parts(parts)
        self._ls_cache = (table.version, frames)
        return frames

    def _mutate(self, req: cp.Request, fds: OwnedFds) -> dict[str, Any]:
        """Apply a put or del (no awaits: atomic with respect to every other task)."""
        a = req.args
        if req.op == "put":
            check_key(a["name"], a["id"])
            check_new_name(a["name"])
            self._check_room()
            ident = classify(fds.fds[0])
            entry = self.table.save(a["name"], a["id"], fds.fds[0], ident, replace=a["replace"])
            fds.take()
            log.debug("event=put name=%r id=%d fd=%d kind=%s", entry.name, entry.id, entry.fd, ident.kind.label)
            return entry.describe()
        check_key(a["name"], a["id"])
        self.table.delete(a["name"], a["id"])
        log.debug("event=del name=%r id=%d", a["name"], a["id"])
        return {"name": a["name"], "id": a["id"], "deleted": True}

    def _remember(self, rid: str, reply: dict[str, Any]) -> None:
        if rid:
            self.results[rid] = reply
            self._results_log.append(rid)
            while len(self.results) > RESULTS_KEPT:
                self.results.popitem(last=False)
            if len(self._results_log) > 2 * RESULTS_KEPT:
                drop = len(self._results_log) - RESULTS_KEPT
                del self._results_log[:drop]
                self._results_base += drop

    def results_since(self, mark: int) -> tuple[list[tuple[str, object]], int]:
        """Answers remembered since `mark` (a position in the log of answers) and the next mark."""
        rids = self._results_log[max(0, mark - self._results_base):]
        out = [(rid, self.results[rid]) for rid in dict.fromkeys(rids) if rid in self.results]
        return out, self._results_base + len(self._results_log)

    def _check_room(self) -> None:
        """Refuse a put once the table holds as many entries as a target with the same fd limit could
        take over, or when it would leave the daemon fewer than FD_RESERVE free fds (counted exactly
        only when anywhere near the limit: listing /proc/self/fd costs ~1 ms)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        most = table_limit(soft)
        if len(self.table) >= most:
            raise CapacityError(f"the table holds {len(self.table)} entries, as many as a target with the same fd "
                                f"limit (RLIMIT_NOFILE {soft}) could take over in a handoff; delete entries or raise "
                                "the limit (LimitNOFILE=, ulimit -n)")
        if len(self.table) + self._conns + 64 + FD_RESERVE < soft:
            return
        _, n_open, _ = fd_capacity(0)
        if n_open + FD_RESERVE > soft:
            raise CapacityError(f"the daemon is at its fd limit ({n_open} open, RLIMIT_NOFILE {soft}, {FD_RESERVE}"
                                " kept free to answer clients); delete entries or raise its limit (LimitNOFILE=,"
                                " ulimit -n)")

    def status(self) -> dict[str, Any]:
        soft, n_open, capacity = fd_capacity(0)
        return {
            "pid": os.getpid(), "role": self.role, "state": self.state, "version": __version__,
            "entries": len(self.table), "by_kind": self.table.by_kind(), "fd_limit": soft, "open_fds": n_open,
            "fd_capacity": capacity, "control": self.control_path, "handoffs_received": self.handoffs,
            "upgrades": self.upgrades,
            "uptime_s": round(time.time() - self.started, 3),
            **({"salvage": self.salvage} if self.salvage else {}),
            **({"source_died": True} if self.source_died else {}),
        }

    async def _handoff(self, to: str, batch: int, window: int) -> dict[str, Any]:
        if self.state != "serving":
            raise Busy(f"a handoff is already {self.state}; wait for it to finish")
        if not os.path.isabs(to):
            raise UsageError(f"handoff target path {to!r} must be absolute")
        if len(to.encode()) > 107:
            raise UsageError(f"handoff target path {to} is {len(to.encode())} bytes; UNIX socket paths are limited "
                             "to 107: give the target a shorter --listen path")
        self.state = "handing-off"
        stopped = False

        async def freeze() -> None:
            self._frozen = trio.Event()

        async def before_commit() -> None:
            nonlocal stopped
            stopped = self.committing = True
            await self._stop_accepting()

        try:
            res: Result = await send_table(
                self.table, to, listener_fd=self.listener.fileno(), control_path=self.control_path, batch=batch,
                window=window, hooks=SourceHooks(freeze, before_commit, self.results_since),
                allowed_uids={os.geteuid(), 0})  # the table goes only to our own user or root
        except BaseException as e:
            self.state = "serving"
            self.committing = False
            self.table.stop_journal()
            self._thaw()
            if stopped and self._nursery is not None and self._accept_scope is None:
                self._start_accepting()
            if isinstance(e, CprdError):
                log.warning("event=handoff_failed to=%s error=%r entries_kept=%d", to, str(e), len(self.table))
                raise
            if isinstance(e, OSError):
                log.warning("event=handoff_failed to=%s error=%r entries_kept=%d", to, str(e), len(self.table))
                raise HandoffError(f"handoff to {to} failed: {e}; the source keeps every entry") from None
            raise
        self.state = "handed-off"
        self._thaw()  # waiting mutations see "handed-off" and hang up: their clients retry at the target
        self._exit_after_reply = True
        assert self._nursery is not None
        self._nursery.start_soon(self._exit_soon)
        return res.describe()

    async def _upgrade(self, program: str | None, conn: Any, timeout: float) -> dict[str, Any]:
        """Exec a new program in this PID with the table (see upgrade.py). Returns only when the exec
        failed, with everything as it was."""
        from . import upgrade
        from .paths import check_program

        if self.state != "serving":
            raise Busy(f"the daemon is {self.state}; retry the upgrade when it is done")
        if program is not None:
            if not os.path.isabs(program):
                raise UsageError(f"upgrade program {program!r} must be an absolute path")
            try:
                program = check_program(program, "upgrade program")  # it will hold every fd of the table
            except CprdError as e:
                raise type(e)(f"{e}; the running daemon (pid {os.getpid()}) goes on serving, nothing changed") \
                    from None
        self.state = "upgrading"
        self._frozen = trio.Event()
        t0 = upgrade.now_ms()
        await self._stop_accepting()  # from now on connections wait in the backlog for the new program
        try:
            state = self.upgrade_state(t0, conn.fileno() if conn is not None else None)
            try:
                prep = upgrade.prepare(state, program, list(self.config.own_args), timeout)
            except OSError as e:  # a memfd, a pipe or the guardian could not be made (at the fd limit?)
                raise upgrade.UpgradeError(f"cannot prepare the upgrade: {e}; the running daemon (pid "
                                           f"{os.getpid()}) goes on serving, nothing changed") from None
            sdnotify.reloading(f"upgrading in place to {prep.argv[0]} with {len(self.table)} entries")
            log.info("event=upgrade_exec program=%r entries=%d guardian_pid=%d", prep.argv, len(self.table),
                     prep.guardian_pid)
            try:
                prep.exec()
            except OSError as e:
                prep.abort()
                raise upgrade.UpgradeError(
                    f"cannot run {prep.argv[0]}: {e.strerror}; the running daemon (pid {os.getpid()}) goes on "
                    "serving, nothing changed") from None
        except BaseException:
            self.state = "serving"
            self._thaw()
            if self._nursery is not None and self._accept_scope is None:
                self._start_accepting()
            sdnotify.ready(self.status_line())
            raise
        raise AssertionError("exec returned")  # pragma: no cover

    def upgrade_state(self, t_freeze_ms: float, requester_fd: int | None) -> dict[str, Any]:
        return {
            "t_freeze_ms": t_freeze_ms, "role": self.role, "control_path": self.control_path,
            "control_fid": list(self.control_fid) if self.control_fid else None,
            "listener_fd": self.listener.fileno(), "requester_fd": requester_fd,
            "entries": [[e.name, e.id, e.fd, int(e.ident.kind), e.ident.mode, e.ident.dev, e.ident.ino,
                         e.ident.flags] for e in self.table],
            "results": [[rid, self.results[rid]] for rid in self.results],
            "config": {"allow_uids": list(self.config.allow_uids), "idle_timeout": self.config.idle_timeout,
                       "max_clients": self.config.max_clients, "queue_timeout": self.config.queue_timeout,
                       "upgrade_timeout": self.config.upgrade_timeout},
            "handoffs": self.handoffs, "upgrades": self.upgrades, "salvage": self.salvage,
            "source_died": self.source_died, "pid": os.getpid(),
        }

    def status_line(self) -> str:
        return f"serving {len(self.table)} entries on {self.control_path} ({self.role})"

    def _thaw(self) -> None:
        if self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            frozen.set()

    async def _exit_soon(self) -> None:
        """Exit even if the client that asked for the handoff is gone (its reply then never goes out)."""
        await trio.sleep(2)
        self.stop(0)


class _HandedOff(Exception):
    """Raised inside a request that must not be answered: the table has a new owner."""


def populate_table(table: FdTable, triples: list[tuple[str, int, int]]) -> None:
    """Move freshly made (name, id, fd) triples into table (closing them all on any error)."""
    it = iter(triples)
    try:
        for name, id_, fd in it:
            try:
                table.save(name, id_, fd, classify(fd))
            except BaseException:
                os.close(fd)
                raise
    except BaseException:
        for _, _, fd in it:
            os.close(fd)
        raise


__all__ = ["Daemon", "populate_table", "BadFd", "CapacityError", "ProtocolError"]


async def serve_source(control: str, *, spec: str = "", state_dir: str | None = None,
                       config: Config = Config()) -> int:
    """`cprd source`: create the control socket, populate the table, serve until handed off or stopped."""
    from .client import describe_daemon
    from .handoff import raise_nofile
    from .kinds import parse_spec, populate, spec_fds
    from .paths import bind_listener, open_dir

    raise_nofile()
    counts = parse_spec(spec)
    need = spec_fds(counts)
    soft, n_open, capacity = fd_capacity()
    most = table_limit(soft)
    if need > min(capacity, most):
        raise CapacityError(f"--populate asks for {need} fds but this process can open {capacity} more and a target "
                            f"with the same fd limit could take over at most {most} (RLIMIT_NOFILE {soft}, {n_open} "
                            "open); ask for fewer or raise the limit")
    listener = sdnotify.control_listener_from_env(control)  # socket activation (cprd.socket)
    if listener is not None:
        fid = None  # systemd's socket file: never ours to remove
        log.info("event=socket_activated fd=%d", listener.fileno())
    else:
        listener = bind_listener(control, "control", shared=bool(config.allow_uids), describe=describe_daemon)
        fid = file_id(control)
    table = FdTable()
    try:
        if need:
            t0 = time.perf_counter()
            directory = state_dir or os.path.join(os.path.dirname(control), f"state-{os.getpid()}")
            try:
                if counts["files"]:  # regular files go into a checked private directory, opened relative to it
                    with open_dir(os.path.abspath(directory), what="state directory", create=True,
                                  private=True) as sd:
                        populate_table(table, populate(counts, sd.fd))
                else:
                    populate_table(table, populate(counts, directory))
            except OSError as e:
                raise CprdError(f"cannot create the --populate fds ({e.filename or 'in ' + directory}): "
                                f"{e.strerror or e}; a state file is never opened through a symlink") from None
            log.info("event=populated entries=%d ms=%.1f state_dir=%s", len(table),
                     (time.perf_counter() - t0) * 1e3, directory)
        d = Daemon(role="source", table=table, listener=listener, control_path=control, config=config)
        d.control_fid = fid
        return await d.run()
    except BaseException:
        unlink_if_same(control, fid)
        table.close_all()
        listener.close()
        raise


async def serve_target(listen: str, *, config: Config = Config()) -> int:
    """`cprd target`: wait for one handoff on `listen`, then serve the received table on the source's
    control socket (which arrives with the Commit; if the source died before sending it, the target
    binds the control path itself)."""
    from .client import describe_daemon
    from .handoff import accept_handoff, confirm, raise_nofile, receive_table
    from .paths import bind_listener

    raise_nofile()
    # Only a source of our own user or root may hand us a table: it hands us its listening control
    # socket too, which another user could still hold a copy of (and accept our clients on).
    hs = bind_listener(listen, "handoff", describe=describe_daemon)
    fid = file_id(listen)
    allowed = {os.geteuid(), 0}
    log.info("event=waiting listen=%s pid=%d", listen, os.getpid())
    sdnotify.ready(f"waiting for a handoff on {listen}")
    try:
        inc = await accept_handoff(trio.socket.from_stdlib_socket(hs), allowed)
    finally:
        unlink_if_same(listen, fid)
        hs.close()
    try:
        received = await receive_table(inc)
    except BaseException:
        inc.close()
        raise
    control = received.hello.control_path
    lfds = received.listener.take()
    try:
        if lfds:
            listener = socket.socket(fileno=lfds[0])
        else:  # the source died before its Commit: its listening socket died with it
            listener = bind_listener(control, "control", shared=bool(config.allow_uids), describe=describe_daemon)
    except BaseException:
        received.table.close_all()
        inc.close()
        raise
    d = Daemon(role="target", table=received.table, listener=listener, control_path=control,
               config=config, handoffs=1)
    d.salvage = received.salvage.describe() if received.salvage else None
    for rid, reply in received.results:  # so that a client retrying at us gets the source's answer
        if isinstance(reply, dict) and isinstance(reply.get("ok"), bool) and (
                ("result" in reply) if reply["ok"] else isinstance(reply.get("error"), str)
                and isinstance(reply.get("message"), str)):
            d._remember(rid, reply)
    d.source_died = not received.committed
    if received.salvage:
        s = received.salvage
        print(f"cprd: SALVAGE: the source (pid {s.source_pid}) died mid-handoff; serving the {s.received} of "
              f"{s.announced} entries that arrived; {s.lost} lost with it: "
              f"{', '.join(f'({n!r}, {i})' for n, i in s.lost_keys[:10])}"
              f"{' ...' if len(s.lost_keys) > 10 else ''}"
              f"{f' and {s.unnamed} the source never named' if s.unnamed else ''}", file=sys.stderr)

    async def on_serving() -> None:
        if received.committed:
            await confirm(inc.sock, received)
        inc.close()

    return await d.run(on_serving)


# -- the new program of an in-place upgrade ------------------------------------------------------
def restore_main(state_fd: int, own_args: tuple[str, ...]) -> int:
    """`cprd ... --restore-fd N`: rebuild the daemon from the state an upgrade left in fd N and serve.
    When it cannot, run the previous program again with the same state (a rollback)."""
    from . import upgrade

    try:
        state = upgrade.read_state(state_fd, check_version=False)
    except (CprdError, OSError) as e:
        # Without a readable state there is nothing to roll back with; exiting lets the guardian restore.
        print(f"cprd: error: cannot read the upgrade state in fd {state_fd}: {e}", file=sys.stderr)
        return 1
    try:
        upgrade.read_state(state_fd)  # a version this program does not know: roll back (below)
        if fault.armed("restore", "raise"):
            log.warning("event=fault_fired side=restore step=raise n=None action=raise")
            raise RuntimeError("test fault: restore raises")
        table, listener = _rebuild(state, state_fd)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the previous program takes over again
        if state.get("rolled_back"):  # we are the previous program and cannot restore either
            print(f"cprd: error: the rollback cannot restore either: {e}", file=sys.stderr)
            return 1
        try:
            upgrade.rollback(state_fd, state, f"the new program could not restore: {type(e).__name__}: {e}")
        except OSError as e2:
            print(f"cprd: error: cannot run the previous program: {e2}", file=sys.stderr)
        return 1
    return trio.run(_serve_restored, state, state_fd, table, listener, own_args)


def _rebuild(state: dict[str, Any], state_fd: int) -> tuple[FdTable, socket.socket]:
    """The table and listener the state describes, every fd verified and close-on-exec again."""
    from . import upgrade
    from .kinds import KIND_BY_CODE, Identity, verify

    for fd in upgrade.crossing_fds(state, state_fd):
        os.set_inheritable(fd, False)
    table = FdTable()
    for name, id_, fd, kind, mode, dev, ino, flags in state["entries"]:
        ident = Identity(KIND_BY_CODE[kind], mode, dev, ino, flags)
        bad = verify(fd, ident)
        if bad is not None:
            table.forget_all()  # the fds are not ours to close: the rollback takes them all back
            raise upgrade.UpgradeError(f"entry ({name!r}, {id_}) fd {fd} does not verify: {bad}")
        table.insert_unchecked_entry(name, id_, fd, ident)
    return table, socket.socket(fileno=state["listener_fd"])


async def _serve_restored(state: dict[str, Any], state_fd: int, table: FdTable, listener: socket.socket,
                          own_args: tuple[str, ...]) -> int:
    from . import upgrade

    cfg = state.get("config", {})
    config = Config(allow_uids=tuple(cfg.get("allow_uids", ())), idle_timeout=cfg.get("idle_timeout", 60.0),
                    max_clients=cfg.get("max_clients", 256), queue_timeout=cfg.get("queue_timeout", 5.0),
                    upgrade_timeout=cfg.get("upgrade_timeout", 30.0), own_args=own_args)
    d = Daemon(role=state["role"], table=table, listener=listener, control_path=state["control_path"],
               config=config, handoffs=state.get("handoffs", 0))
    d.control_fid = tuple(state["control_fid"]) if state.get("control_fid") else None
    d.salvage = state.get("salvage")
    d.source_died = bool(state.get("source_died"))
    d.upgrades = state.get("upgrades", 0) + (0 if state.get("rolled_back") else 1)
    for rid, reply in state.get("results", []):
        d._remember(rid, reply)

    async def on_serving() -> None:
        gw, gpid = state.get("guardian_fd"), state.get("guardian_pid")
        if gw is not None:
            try:
                os.write(gw, upgrade.CONFIRM)
            except OSError:
                pass
            os.close(gw)
            await _reap(gpid)
        strays = upgrade.kill_strays(gpid, state_fd)
        if strays:
            log.warning("event=upgrade_strays_killed pids=%s note=the-new-program-forked-before-it-became-cprd;"
                        "they-held-copies-of-the-table", strays)
        os.close(state_fd)
        ms = upgrade.now_ms() - state["t_freeze_ms"]
        result = {"pid": os.getpid(), "entries": len(table), "ms": round(ms, 3),
                  "rolled_back": bool(state.get("rolled_back")), "reason": state.get("rolled_back"),
                  "program": (state.get("failed_program") if state.get("rolled_back") else state.get("argv_new")),
                  "previous_pid": state.get("pid")}
        log.info("event=upgraded pid=%d entries=%d ms=%.1f rolled_back=%s", os.getpid(), len(table), ms,
                 result["rolled_back"])
        if os.getpid() != state.get("pid"):
            sdnotify.mainpid(os.getpid())
        sdnotify.ready(d.status_line())
        if state.get("requester_fd") is not None:
            conn = trio.socket.from_stdlib_socket(socket.socket(fileno=state["requester_fd"]))
            with conn:
                await d._reply(conn, cp.encode_reply(result), [])

    return await d.run(on_serving)


async def _reap(pid: int | None) -> None:
    """Collect the guardian once it has exited (it does as soon as it reads the confirmation)."""
    if not pid:
        return
    for _ in range(200):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        await trio.sleep(0.005)
