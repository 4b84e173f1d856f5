"""The control endpoint: the listening socket, who gets a connection, and each connection's loop.

Theory of operation
-------------------
The accept loop runs in the daemon's nursery until stopped (a handoff's commit, an upgrade: the
listening socket is about to travel). It can be stopped and started again at any moment, even
before it has run: the scope and the done event exist from the start.

Lanes: the control socket (mode 0600) serves the daemon's own user and root; each uid given with
--allow-uid has a lane of its own, a listening socket beside it (paths.lane_path) that is that
uid's file, mode 0600, so that the kernel refuses every other uid's connect. Each lane has its
own backlog and accept loop: a flood, silent connections or half frames of one uid fill its own
lane, never the daemon's user's. The lanes' sockets are table entries (access.LANE_NAME, uid), so
they move with a handoff and survive an upgrade like the control socket.

Who is served (``admission``): on the control socket, our uid, root and the --allow-uid uids
(SO_PEERCRED); on uid U's lane, U (still allowed) and our uid and root. At most max_clients
connections are served at once; more wait in their listening socket's backlog until one ends, and
are told Busy only if none ends within queue_timeout. Users other than ours and root hold at most
half of max_clients together and a quarter each: their surplus waits in their lane's backlog. At
its fd limit (EMFILE) the endpoint gives up a spare fd to accept a waiting connection, tells it
why, and takes the spare back; it never waits for a client while it refuses one.

Each connection: requests one at a time, idle_timeout without one closes it; frames are
size-checked before parsing; a reply goes out a frame at a time and must be read within
idle_timeout. What a request does is the handler's (``Handle``); an answer the handler decides not
to give (``Unanswered``: the table moved on while the request waited) closes the connection, and
the client retries at the same path. ``replied(op)`` is told of every answer that went out (after
a handoff's, the daemon stops).

What this module may know: sockets, trio, the control protocol's frames. Not the table, not what a
request means.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import trio

from .. import scm
from ..access import Peer
from ..errors import Busy, CapacityError, CprdError, Denied
from ..fds import OwnedFds, close_later
from ..paths import max_backlog, peer_cred, trusted_uids, user_name
from ..protocol import control as cp
from .state import Config

log = logging.getLogger("cprd.daemon")

ADMIN_OPS = ("handoff", "upgrade")  # only the daemon's own uid and root may ask for these


class Unanswered(Exception):
    """Raised by a handler for a request that must not be answered: the table has a new owner."""


# handle(request, its fds, the connection, the peer) -> (reply frames, fds to attach)
Handle = Callable[[cp.Request, OwnedFds, Any, Peer], Awaitable[tuple[Iterable[bytes], list[int]]]]
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_groups(conn: Any) -> frozenset[int]:
    """The supplementary gids of the peer when it connected (SO_PEERGROUPS; its primary gid is
    SO_PEERCRED's), or none if the kernel cannot say."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
    except OSError:
        return frozenset()
    return frozenset(int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw) - len(raw) % 4, 4))


class Endpoint:
    def __init__(self, listener: socket.socket, config: Config, allowed_uids: set[int], handle: Handle,
                 replied: Callable[[str], None], describe_load: Callable[[], str],
                 version: Callable[[], int] = lambda: -1) -> None:
        self.listener, self.config, self.allowed_uids = listener, config, allowed_uids
        self.lanes: dict[int, tuple[socket.socket, Any]] = {}  # uid -> its lane's listening socket, and trio's
        self.handle, self.replied, self.describe_load = handle, replied, describe_load
        self.version = version  # changes whenever what lends a reply its fds (the table) drops one
        self.conns = 0
        self.by_uid: Counter[int] = Counter()  # connections served, by the peer's uid
        self.closing = False  # a handoff has committed: each connection ends after its reply
        self.nursery: trio.Nursery | None = None
        self._spare: int | None = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self._slot_freed = trio.Event()  # set when a connection ends (a slot for one waiting in the backlog)
        self._loops: list[tuple[trio.CancelScope, trio.Event]] | None = None  # while accepting: each loop's
        try:  # an inherited listener (a handoff from an older cprd, an upgrade) gets the largest backlog too
            listener.listen(max_backlog())
        except OSError:
            pass
        self._tlistener = trio.socket.from_stdlib_socket(listener)

    def close(self) -> None:
        """Give up the spare fd (the listeners are the daemon's table's: they may travel on)."""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        for raw, _ in self.lanes.values():
            raw.detach()
        self.lanes.clear()

    def add_lane(self, uid: int, fd: int) -> None:
        """Serve uid's lane on the listening socket fd (the table's: borrowed, never closed here)."""
        raw = socket.socket(fileno=fd)
        try:
            raw.listen(max_backlog())
        except OSError:
            pass
        self.lanes[uid] = (raw, trio.socket.from_stdlib_socket(raw))
        if self._loops is not None:
            self._start_loop(uid)

    # -- accepting -----------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._loops is not None

    def start_accepting(self) -> None:
        """Accept connections from the next scheduling point on. The scope and the done event
        exist at once, so stop_accepting works even before the loop has run (no start-up round
        trip through the scheduler, which a target would otherwise spend inside the source's freeze:
        connections meanwhile wait in the listening socket's backlog)."""
        assert self.nursery is not None and self._loops is None
        self._loops = []
        self._start_loop(None)
        for uid in self.lanes:
            self._start_loop(uid)

    def _start_loop(self, lane: int | None) -> None:
        assert self.nursery is not None and self._loops is not None
        scope, done = trio.CancelScope(), trio.Event()
        self._loops.append((scope, done))
        self.nursery.start_soon(self._accept_loop, scope, done, lane)

    async def stop_accepting(self) -> None:
        if self._loops is not None:
            for scope, _ in self._loops:
                scope.cancel()
            for _, done in self._loops:
                await done.wait()
            self._loops = None

    async def _accept_loop(self, scope: trio.CancelScope, done: trio.Event, lane: int | None) -> None:
        """Accept on the control socket (lane None) or on uid `lane`'s lane."""
        raw, listener = (self.listener, self._tlistener) if lane is None else self.lanes[lane]
        try:
            with scope:
                while True:
                    await self._wait_for_a_slot(lane)
                    try:
                        conn, _ = await listener.accept()
                    except OSError as e:
                        if e.errno not in (errno.EMFILE, errno.ENFILE):
                            raise
                        await self._refuse_at_limit(raw)
                        continue
                    pid, uid, gid = peer_cred(conn)
                    refusal = self.admission(uid, lane)
                    if refusal is not None:
                        log.warning("event=refused_peer pid=%d uid=%d lane=%s code=%s", pid, uid, lane, refusal.code)
                        refuse(conn, refusal)
                        continue
                    self.conns += 1
                    self.by_uid[uid] += 1
                    assert self.nursery is not None
                    self.nursery.start_soon(self._serve, conn, Peer(uid, peer_groups(conn) | {gid}))
        finally:
            done.set()

    def admission(self, uid: int, lane: int | None = None) -> CprdError | None:
        """Why a connection of `uid` (on uid `lane`'s lane, or the control socket) is refused at
        once, or None to serve it (see the module docstring)."""
        own = trusted_uids()
        if uid not in self.allowed_uids or (lane is not None and uid != lane and uid not in own):
            where = f" on the lane of uid {lane}" if lane is not None and uid in self.allowed_uids else ""
            return Denied(f"uid {uid} may not use this cprd{where} (it serves uids {sorted(self.allowed_uids)}, each "
                          "user but its own and root on a socket of its own beside the control socket); ask its "
                          "operator to add --allow-uid")
        most = self.config.max_clients
        if self.conns >= most:  # none ended within queue_timeout
            return Busy(f"the daemon serves {most} connections already and none ended within "
                        f"{self.config.queue_timeout:g} s; close idle clients and retry")
        if uid not in own:
            others = sum(n for u, n in self.by_uid.items() if u not in own)
            if others >= most // 2 or self.by_uid[uid] >= max(1, most // 4):
                return Busy(f"{user_name(uid)} holds {self.by_uid[uid]} connections and other users "
                            f"{others}: they may hold at most {max(1, most // 4)} each and {most // 2} together "
                            "(a share of --max-clients); close idle clients and retry")
        return None

    def _full(self, lane: int | None) -> bool:
        most = self.config.max_clients
        if self.conns >= most:
            return True
        if lane is None or lane in trusted_uids():
            return False
        own = trusted_uids()
        others = sum(n for u, n in self.by_uid.items() if u not in own)
        return others >= most // 2 or self.by_uid[lane] >= max(1, most // 4)

    async def _wait_for_a_slot(self, lane: int | None) -> None:
        """With max_clients connections served (or the lane's uid, or the other uids together, at
        their share), leave new ones in the backlog until one ends, or for at most queue_timeout
        (then the next one is told Busy)."""
        with trio.move_on_after(self.config.queue_timeout):
            while self._full(lane):
                await self._slot_freed.wait()

    async def _refuse_at_limit(self, listener: socket.socket) -> None:
        """Out of fds, so accept() fails and the client would wait forever: give up the spare fd,
        accept the connection, tell the client why, and take the spare back."""
        log.warning("event=fd_limit_reached where=accept %s", self.describe_load())
        if self._spare is None:
            self._spare = _reopen_spare()
        if self._spare is None:
            await trio.sleep(0.05)
            return
        os.close(self._spare)
        self._spare = None
        try:
            # Never wait here: a client that comes once fds are free again must be served, not refused.
            conn, _ = listener.accept()  # the fd is non-blocking (trio): EAGAIN if none is queued
        except OSError:
            await trio.sleep(0.05)
        else:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            refuse(conn, CapacityError(
                f"the daemon is at its fd limit (RLIMIT_NOFILE {soft}) with {self.describe_load()} and "
                f"{self.conns} clients; close idle clients, delete entries or raise its limit (LimitNOFILE=, "
                "ulimit -n)"))
        finally:
            # the refused connection closes on a closer thread (fds.py): its slot frees in a moment
            with trio.move_on_after(1.0):
                while (spare := _reopen_spare()) is None:
                    await trio.sleep(0.002)
            self._spare = spare

    # -- one connection ------------------------------------------------------------------------
    async def _serve(self, conn: Any, who: Peer) -> None:
        uid = who.uid
        try:
            with closing_later(conn):
                while not self.closing:
                    with trio.move_on_after(self.config.idle_timeout) as cs:
                        try:
                            data, fds = await scm.recv(conn, cp.MAX_FRAME, 1, "control request")
                        except scm.Closed:
                            return
                        except CprdError as e:  # truncated fds (at our limit) or an oversize frame
                            if not await self.reply(conn, cp.encode_error(e), []):
                                return
                            continue
                    if cs.cancelled_caught:
                        return
                    op = ""  # what was asked, once the request is decoded
                    with fds:
                        try:
                            req = cp.decode_request(data, len(fds))
                            op = req.op
                            if req.op in ADMIN_OPS and uid not in trusted_uids():
                                who = "root" if os.geteuid() == 0 else f"{user_name(os.geteuid())} and root"
                                raise Denied(f"{user_name(uid)} may use this cprd's table but not {req.op} it: "
                                             f"only {who} may; ask its operator")
                            frames, lent = await self.handle(req, fds, conn, who)
                            # The table's own fds: copied before any other task can run (a del, a
                            # hang-up) and close them, so that the reply never carries a reused number.
                            lent_at = self.version()
                            out = _copies(lent)
                        except Unanswered:
                            # The table moved on while this request waited: hang up without an answer;
                            # the client retries at the same path and reaches the new owner.
                            return
                        except CprdError as e:
                            log.info("event=request_failed code=%s error=%r", e.code, str(e))
                            frames, out = cp.encode_error(e), OwnedFds()
                            lent_at = None
                    try:
                        if not await self.reply(conn, frames, out.fds):
                            return
                    finally:
                        # A copy is the last reference to its open file (whose close may block) only
                        # if the table dropped the entry meanwhile; else close it here, at once.
                        out.close() if lent_at is None or self.version() != lent_at else out.close_now()
                    self.replied(op)
        finally:
            self.conns -= 1
            self.by_uid[uid] -= 1
            freed, self._slot_freed = self._slot_freed, trio.Event()  # wakes every loop that waits
            freed.set()

    async def reply(self, conn: Any, frames: Iterable[bytes], fds: list[int]) -> bool:
        """Send a reply a frame at a time. False, and the connection should close, if it failed or
        the client did not read it within idle_timeout."""
        try:
            with trio.move_on_after(self.config.idle_timeout) as cs:
                for i, f in enumerate(frames):  # at most SCM_MAX_FD fds on each frame, in order
                    await scm.send(conn, f, fds[i * scm.SCM_MAX_FD:(i + 1) * scm.SCM_MAX_FD], "control reply")
            if cs.cancelled_caught:
                log.info("event=reply_dropped reason=client-not-reading seconds=%g", self.config.idle_timeout)
                return False
        except (CprdError, OSError) as e:
            log.info("event=reply_failed error=%r", str(e))
            return False
        return True


def _reopen_spare() -> int | None:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _copies(fds: list[int]) -> OwnedFds:
    out = OwnedFds()
    try:
        for fd in fds:
            out.fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
    except OSError as e:
        out.close()
        if e.errno in (errno.EMFILE, errno.ENFILE):
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            raise CapacityError(f"the daemon is at its fd limit (RLIMIT_NOFILE {soft}) and cannot copy the "
                                f"{len(fds)} fds of this reply; retry later, delete entries or raise its limit") from e
        raise
    return out


@contextlib.contextmanager
def closing_later(conn: Any) -> Iterator[Any]:
    """Close a client's connection on a closer thread once done with it: its last close also closes
    whatever fds the client queued in it unread, and any of them may block (fds.py)."""
    try:
        yield conn
    finally:
        if conn.fileno() >= 0:
            trio.lowlevel.notify_closing(conn.fileno())  # as trio's close() would: no task waits on it after
        fd = conn.detach()
        if fd >= 0:
            close_later(fd)


def refuse(conn: Any, err: CprdError) -> None:
    """Answer a connection we will not serve with err and close it at once, never waiting for the
    client. What it already sent is read and dropped first (its fds closed), so that the close does
    not reset the connection; the socket is shut for reading before that, so that a request sent
    between the drop and the close cannot reset it either: it fails to send (as one that arrives
    after the close), and cprd's client then reads this answer, which waits in its queue."""
    with closing_later(conn):
        raw = socket.socket(fileno=conn.fileno())  # borrowed for a send that must not wait
        try:
            for f in cp.encode_error(err):
                raw.send(f, socket.MSG_DONTWAIT)
            raw.shutdown(socket.SHUT_RD)
        except OSError:
            return
        finally:
            raw.detach()
        scm.drop_queued(conn.fileno())
