"""The fd store endpoints: one notify socket per app, speaking systemd's fd store protocol.

Theory of operation
-------------------
An app's store is three kinds of table entries (fdstore.py): its notify socket (bound SOCK_DGRAM,
SO_PASSCRED), a memfd of names, and the stored fds. Being entries, they move with a handoff and
survive an upgrade: the new owner finds them in its table (``load``) and goes on receiving on the
very same socket.

One task per app reads its socket: each datagram is parsed and decided (fdstore.py) and applied to
the table at once, with no await between (atomic with respect to every other task). While the
daemon is frozen (the last moments of a handoff, an upgrade) the tasks read nothing: datagrams
wait in the socket's queue, with their fds, for whoever owns the table next. Stored fds that are
polled (FDPOLL, the default) are watched on one epoll set for hang-up or error (events 0, as
systemd does); one that reports either is removed and closed. Fds that cannot be polled (regular
files: EPERM) are kept unwatched.

Who may store: the store's owner, the daemon's user and root (the sender's uid, SCM_CREDENTIALS);
its notify socket is the owner's file, mode 0600, so that nobody else can even send to it. A
store's fds count against its owner's quota (access.py); a store keeps its names short enough
together that its program can still be started with them (``FDNAMES_MAX``).

What this module may know: sockets, trio, the table, the rules of fdstore.py.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
import select
import socket
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import fault, proc, scm
from .. import fdstore as fs
from ..access import Peer
from ..errors import BadFd, Busy, CapacityError, Denied, UsageError
from ..fds import OwnedFds, read_all
from ..kinds import classify
from ..paths import bind_datagram, file_id, unlink_if_same, user_name
from ..table import Entry
from .lifecycle import Lifecycle
from .owners import Owners
from .state import DaemonState

log = logging.getLogger("cprd.fdstore")


class _Quiet:
    """At most one warning a second for each (event, app); the others are counted and the count
    goes with the next one logged: a flood of bad datagrams cannot flood the log."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}  # (event/kind, app) -> when last logged
        self.suppressed: Counter[tuple[str, str]] = Counter()

    def warn(self, event: str, app: str, fmt: str, *args: object, kind: str = "") -> None:
        """`kind` tells warnings of one event apart (each kind has its own second)."""
        key, now = (f"{event}/{kind}", app), time.monotonic()
        if now - self.last.get(key, -1e9) < 1.0:
            self.suppressed[key] += 1
            return
        self.last[key] = now
        n = self.suppressed.pop(key, 0)
        log.warning("event=%s app=%s " + fmt + (" suppressed_in_the_last_second=%d" if n else ""), event, app,
                    *args, *((n,) if n else ()))

_UCRED = struct.Struct("iII")  # pid, uid, gid
_ORDER_FROM = 8  # a group of stored fds of one inode this large is kept in kcmp's order
_BATCH = 16  # datagrams handled in a row before other tasks get their turn


@dataclass(slots=True)
class AppStore:
    app: str
    sock_fd: int  # the notify socket (the table's entry)
    meta_fd: int  # the names memfd (the table's entry)
    meta: fs.Meta
    raw: socket.socket  # a borrowed socket object on sock_fd (detached, never closed, when done)
    status: str | None = None
    log_lines: int = 0  # lines in the names memfd
    log_size: int = 0  # its size in bytes
    next_id: int = 0  # the id of the next fd stored: one more than any the store holds
    # (dev, ino) -> ids of the stored fds of that inode (eventfds, say, all share one), in kcmp's
    # order of their open files for the groups in `ordered` (found by bisection), else as stored
    by_inode: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    fid: tuple[int, int] | None = None  # the socket's file (dev, ino), as found when made or taken up
    ordered: set[tuple[int, int]] = field(default_factory=set)
    names_bytes: int = 0  # LISTEN_FDNAMES's bytes for the names stored, a colon after each (kept as they change)
    # for `cprd serve`: its last report (in memory: a supervisor reports again within a second after a
    # handoff or upgrade), whose token, pid and generations are in the log too (meta.serve), so that a
    # `cprd serve` started after one died takes its generations over, wherever the table went meanwhile
    ready: deque = field(default_factory=lambda: deque(maxlen=64))  # (pid, monotonic) of READY=1 senders
    supervisor: dict | None = None  # its last report
    heard: float = -1e9  # when (monotonic)
    restarts: list = field(default_factory=list)  # ids of `ctl restart` requests not yet handed to the supervisor

    def stored(self) -> int:
        return len(self.meta.names)

    def index(self, i: int, e: Entry, pos: int | None = None) -> None:
        group = self.by_inode.setdefault((e.ident.dev, e.ident.ino), [])
        group.append(i) if pos is None else group.insert(pos, i)
        self.next_id = max(self.next_id, i + 1)

    def unindex(self, i: int, e: Entry) -> None:
        k = (e.ident.dev, e.ident.ino)
        group = self.by_inode.get(k)
        if group is not None and i in group:
            group.remove(i)  # the rest stay in order
            if not group:
                del self.by_inode[k]
                self.ordered.discard(k)


class _Unordered(Exception):
    pass


class FdStores:
    def __init__(self, st: DaemonState, life: Lifecycle, room: Any, owners: Owners) -> None:
        self.st, self.life, self.room = st, life, room  # room(): CapacityError when the table is full
        self.owners = owners
        owners.stores_of = self.stores_of
        self._busy_until: dict[int, float] = {}  # owner uid -> until when its stores' readers wait (a flood)
        self.apps: dict[str, AppStore] = {}
        self._epoll: select.epoll | None = None
        self._polled: dict[int, tuple[str, int]] = {}  # fd -> (app, id) of polled stored fds
        self._nursery: trio.Nursery | None = None
        self.quiet = _Quiet()

    # -- from the table, at start -------------------------------------------------------------
    def load(self) -> None:
        """Find the stores the table holds (a target's or a restored daemon's) and take them up. It
        writes nothing: the names memfd is shared with the previous owner, which goes on using it
        if a handoff fails. A store it cannot take up stays as plain entries, logged."""
        by_app: dict[str, dict[int, Entry]] = {}
        for name, id_ in self.st.table.keys_with_prefix(fs.PREFIX):
            app = fs.app_of(name)
            if app is not None:
                by_app.setdefault(app, {})[id_] = self.st.table.find(name, id_)
        for app, entries in sorted(by_app.items()):
            try:
                self._load_one(app, entries)
            except Exception as e:  # noqa: BLE001 - a store must never keep the daemon from serving
                log.error("event=fdstore_not_loaded app=%s error=%r note=entries-kept-as-plain-entries", app, str(e))
                self.apps.pop(app, None)

    def _load_one(self, app: str, entries: dict[int, Entry]) -> None:
        sock, names = entries.get(fs.NOTIFY_ID), entries.get(fs.NAMES_ID)
        if sock is None or names is None:
            log.warning("event=fdstore_incomplete app=%s note=entries-kept-as-plain-entries", app)
            return
        data = read_all(names.fd)
        meta, lines = fs.Log.replay(data)
        meta.path = self.socket_path(app)
        stored = {i for i in entries if i >= 0}
        for i in stored - set(meta.names):  # a name lost with a write cut short: systemd's default name
            meta.names[i] = ("stored", True)
        for i in set(meta.names) - stored:
            del meta.names[i]
        a = AppStore(app, sock.fd, names.fd, meta, socket.socket(fileno=sock.fd), status=meta.status,
                     log_lines=lines, log_size=len(data), fid=file_id(meta.path))
        if meta.serve is not None:  # it reported to the table's previous owner
            a.supervisor = {**meta.serve, "restarts_done": 0, "results": []}
            # a live one is heard again within a heartbeat; until then (SUPERVISOR_STALE_S) no other
            # may take over, unless it had ended (no generation left)
            a.heard = time.monotonic() if meta.serve["generations"] else -1e9
        self.apps[app] = a
        self._ensure_epoll()
        a.names_bytes = sum(len(n) + 1 for n, _ in meta.names.values())
        for i, (_, poll) in sorted(meta.names.items()):
            a.index(i, entries[i])
            if poll:
                self._watch(a, i, entries[i].fd)
        log.info("event=fdstore_loaded app=%s fds=%d max=%d", app, a.stored(), meta.max)

    def socket_path(self, app: str) -> str:
        return os.path.join(os.path.dirname(self.st.control_path), "fdstore", f"{app}.sock")

    # -- running --------------------------------------------------------------------------------
    async def run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        for a in self.apps.values():
            nursery.start_soon(self._read, a)
        if self._epoll is not None:
            nursery.start_soon(self._watch_hangups)

    def close(self) -> None:
        for a in self.apps.values():
            a.raw.detach()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    async def _read(self, a: AppStore) -> None:
        while True:
            await fault.apoint("fdstore", "read")
            await self.life.until_thawed()
            if self.life.handed_off:
                return
            try:
                await trio.lowlevel.wait_readable(a.sock_fd)
            except trio.ClosedResourceError:  # the store was removed
                return
            if self.apps.get(a.app) is not a:
                return
            if self.life.frozen or self.life.handed_off:
                continue  # what arrives now waits in the socket for whoever owns the table next
            try:
                # Another uid's flood gets at most half of the serving thread, whatever number of
                # stores it floods at once: after a full batch, every store of that uid waits as long
                # as it took (its senders meanwhile wait for room in their queue). The daemon's user's
                # and root's own stores go at full speed: nobody else's clients are theirs to protect.
                owner = self.owner(a.app)
                while (wait := self._busy_until.get(owner, 0.0) - time.monotonic()) > 0:
                    await trio.sleep(wait)
                t0, n = time.monotonic(), 0
                while n < _BATCH and self.receive_one(a):  # then let other tasks run
                    n += 1
                if n == _BATCH and not self.owners.grants.trusted(owner):
                    now = time.monotonic()
                    self._busy_until[owner] = now + (now - t0)
            except OSError as e:
                log.warning("event=fdstore_recv_failed app=%s error=%r", a.app, str(e))
                await trio.sleep(0.1)

    def drain(self, app: str, most: int = 100_000) -> int:
        """Handle every datagram queued for the app now, with no await: a program started after the
        previous one died gets every fd that one sent (its last messages may still be queued)."""
        a = self._get(app)
        n = 0
        while n < most:
            try:
                if not self.receive_one(a):
                    break
            except OSError as e:
                log.warning("event=fdstore_recv_failed app=%s error=%r", a.app, str(e))
                break
            n += 1
        return n

    def receive_one(self, a: AppStore) -> bool:
        """Receive and handle one datagram; False if none is queued."""
        try:
            data, fds, flags, blob = scm.recv_nowait(a.raw, fs.NOTIFY_BUFFER_MAX, creds=True)
        except BlockingIOError:
            return False
        creds = _UCRED.unpack_from(blob) if blob is not None and len(blob) >= _UCRED.size else None
        with fds:
            self.handle(a, data, flags, creds, fds)
        self.st.flush()  # a stand-in's changes reach the new program before anything else happens
        return True

    def handle(self, a: AppStore, data: bytes, flags: int, creds: tuple[int, int, int] | None, fds: OwnedFds) -> None:
        """One datagram, applied with no await. Whatever fds are not stored stay in `fds` (closed by
        the caller)."""
        notice = fs.parse(data, flags, creds[0] if creds else None)
        if isinstance(notice, str):
            self.quiet.warn("fdstore_dropped", a.app, "reason=%r fds=%d", notice, len(fds), kind=notice)
            return
        pid, uid, _ = creds  # type: ignore[misc]
        if uid not in self.st.allowed_uids or not self.owners.grants.may_change(Peer(uid), self.key(a.app)):
            self.quiet.warn("fdstore_refused", a.app, "pid=%d uid=%d fds=%d owner=%d", pid, uid, len(fds),
                            self.owner(a.app))
            return
        d = fs.decide(notice, len(fds))
        for w in d.warnings:
            self.quiet.warn("fdstore_notice", a.app, "pid=%d note=%r", pid, w, kind=re.sub(r"\d+", "N", w)[:48])
        if d.status is not None and (d.status or None) != a.status:
            a.status = a.meta.status = d.status or None  # an empty STATUS= clears it
            self._append(a, fs.Log.line_status(a.status))
        if d.ready:
            a.ready.append((pid, time.monotonic()))
        if d.remove is not None:
            self.remove_name(a, d.remove)
        elif d.store:
            self.store(a, fds, d.name, d.poll)

    # -- changing a store -----------------------------------------------------------------------
    def store(self, a: AppStore, fds: OwnedFds, name: str, poll: bool) -> int:
        """Store each fd (the table takes those it keeps out of `fds`); how many were stored."""
        key = fs.entry_name(a.app)
        n = 0
        owner = self.owner(a.app)
        room = self.owners.room_for(owner)  # counted once a datagram: each fd stored takes one
        for fd in list(fds.fds):
            if a.stored() >= a.meta.max:
                self.quiet.warn("fdstore_full", a.app, "max=%d note=closing-the-remaining-fds", a.meta.max)
                break
            if a.names_bytes + len(name) + 1 > fs.FDNAMES_MAX:
                self.quiet.warn("fdstore_names_full", a.app, "fdnames_bytes=%d max=%d note=closing-the-remaining-fds:"
                                "their-names-would-make-LISTEN_FDNAMES-too-long-for-exec;use-shorter-FDNAME=",
                                a.names_bytes, fs.FDNAMES_MAX)
                break
            if room <= 0:
                try:
                    self.owners.check_room(owner, 1)  # for the message
                except CapacityError as e:
                    self.quiet.warn("fdstore_quota", a.app, "owner=%d error=%r note=closing-the-remaining-fds", owner,
                                    str(e))
                break
            try:
                ident = classify(fd)
            except BadFd as e:
                self.quiet.warn("fdstore_refused_fd", a.app, "error=%r", str(e))
                continue
            dup, pos = self._stored_already(a, (ident.dev, ident.ino), fd)
            if dup:
                log.debug("event=fdstore_duplicate app=%s", a.app)
                continue
            try:
                self.room()
            except CapacityError as e:
                self.quiet.warn("fdstore_no_room", a.app, "error=%r", str(e))
                break
            i = a.next_id
            entry = self.st.table.save(key, i, fd, ident)
            fds.fds.remove(fd)
            a.meta.names[i] = (name, poll)
            a.names_bytes += len(name) + 1
            a.index(i, entry, pos)
            self._append(a, fs.Log.line_store(i, poll, name))
            if poll:
                self._watch(a, i, fd)
            n += 1
            room -= 1
        return n

    def _stored_already(self, a: AppStore, k: tuple[int, int], fd: int) -> tuple[bool, int | None]:
        """Whether fd is an open file the app stored already (systemd's same_fd against each stored
        fd of the same inode), and where a new id goes in its group (None: at the end). A group of
        more than a few is kept in kcmp's order of open files and bisected, so that storing N fds
        of one inode (eventfds) costs N log N comparisons, not N squared."""
        group = a.by_inode.get(k)
        if not group:
            return False, None
        key = fs.entry_name(a.app)

        def fd_of(i: int) -> int:
            return self.st.table.find(key, i).fd

        if k not in a.ordered and len(group) >= _ORDER_FROM:
            def cmp(x: int, y: int) -> int:
                r = fs.file_order(fd_of(x), fd_of(y))
                if r is None:
                    raise _Unordered
                return r
            try:
                group.sort(key=functools.cmp_to_key(cmp))
                a.ordered.add(k)
            except _Unordered:
                pass
        if k in a.ordered:
            lo, hi = 0, len(group)
            while lo < hi:
                mid = (lo + hi) // 2
                r = fs.file_order(fd, fd_of(group[mid]))
                if r is None:
                    a.ordered.discard(k)  # kcmp stopped ordering: compare with each, as below
                    break
                if r == 0:
                    return True, None
                lo, hi = (lo, mid) if r < 0 else (mid + 1, hi)
            else:
                return False, lo
        return any(fs.same_fd(fd_of(i), fd) for i in group), None

    def remove_name(self, a: AppStore, name: str) -> int:
        ids = [i for i, (n, _) in a.meta.names.items() if n == name]
        for i in ids:
            self._remove(a, i)
        return len(ids)

    def clean(self, app: str) -> int:
        a = self._get(app)
        ids = list(a.meta.names)
        for i in ids:
            self._remove(a, i)
        self.st.flush()
        return len(ids)

    def remove_store(self, app: str) -> int:
        """Remove the app's store: its fds, its notify socket (and the socket's file), its names."""
        a = self._get(app)
        n = self.clean(app)
        trio.lowlevel.notify_closing(a.sock_fd)  # its reader, waiting on the socket, returns
        a.raw.detach()
        del self.apps[app]
        key = fs.entry_name(app)
        for i in (fs.NOTIFY_ID, fs.NAMES_ID):
            if self.st.table.find(key, i) is not None:
                self.st.table.delete(key, i)
        self.owners.dropped(self.key(app))
        unlink_if_same(a.meta.path, a.fid)  # its file, unless something else was bound there since
        self.st.flush()
        log.info("event=fdstore_removed app=%s fds=%d", app, n)
        return n

    def _remove(self, a: AppStore, i: int) -> None:
        e = self.st.table.find(fs.entry_name(a.app), i)
        if e is not None:
            self._unwatch(e.fd)
            a.unindex(i, e)
            self.st.table.delete(e.name, e.id)
        gone = a.meta.names.pop(i, None)
        if gone is not None:
            a.names_bytes -= len(gone[0]) + 1
        self._append(a, fs.Log.line_remove(i))

    def open(self, app: str, max_fds: int | None, who: Peer) -> AppStore:
        """The app's store, made (socket and names) if it has none, owned by `who`; its limit set if
        given. Only its owner, the daemon's user and root may open a store that exists (running its
        app hands on its notify socket: a way to change it)."""
        fs.check_app(app)
        if max_fds is not None and not 0 <= max_fds <= fs.MAX_LIMIT:
            raise UsageError(f"the fd store limit {max_fds} is outside 0..{fs.MAX_LIMIT}")
        a = self.apps.get(app)
        if a is None:
            path = self.socket_path(app)
            self.room()
            self.owners.check_room(who.uid, 2, new_store=True)
            sock = bind_datagram(path, f"fd store of {app}", who.uid)
            fid = file_id(path)
            key = fs.entry_name(app)
            made: list[int] = []  # what is ours to undo if any step fails
            sfd, memfd = sock.detach(), -1
            try:
                memfd = os.memfd_create(f"cprd-fdstore-{app}", os.MFD_CLOEXEC)
                ident = classify(sfd)
                before = self.owners.before(self.key(app))
                self.owners.made(self.key(app), ident, who)
                made.append(0)
                self.st.table.save(key, fs.NOTIFY_ID, sfd, ident, replace=True)
                made.append(1)
                self.st.table.save(key, fs.NAMES_ID, memfd, classify(memfd), replace=True)
            except BaseException:
                if 1 in made:
                    self.st.table.pop(key, fs.NOTIFY_ID)  # the fd is still ours: closed below
                if 0 in made:
                    self.owners.undo(self.key(app), before)
                for fd in (sfd, memfd):
                    if fd >= 0:
                        os.close(fd)
                unlink_if_same(path, fid)
                raise
            meta = fs.Meta(max=fs.DEFAULT_MAX if max_fds is None else max_fds, path=path)
            a = AppStore(app, sfd, memfd, meta, socket.socket(fileno=sfd), fid=fid)
            self.apps[app] = a
            self._ensure_epoll()
            self._rewrite(a)
            self.st.flush()
            log.info("event=fdstore_opened app=%s socket=%s max=%d", app, path, meta.max)
            if self._nursery is not None:
                self._nursery.start_soon(self._read, a)
        else:
            self.check(app, who, "run or re-limit", change=True)
            owner = self.owner(app)
            if owner != who.uid and not self.owners.grants.trusted(owner):
                # another user's fds, and whatever the program stores would be theirs to take
                raise Denied(f"the fd store of app {app!r} belongs to {user_name(owner)}: its fds are that user's, "
                             "and what a program stores there that user can take. Run the app as that user, or "
                             f"remove the store first (`cprd ctl fdstore {app} --remove`)")
            if max_fds is not None and max_fds != a.meta.max:
                a.meta.max = max_fds
                self._append(a, fs.Log.line_max(max_fds))
        return a

    # -- owners -----------------------------------------------------------------------------------
    @staticmethod
    def key(app: str) -> tuple[str, int]:
        """The key whose grant is the store's: its notify socket's."""
        return (fs.entry_name(app), fs.NOTIFY_ID)

    def owner(self, app: str) -> int:
        return self.owners.grants.grant(self.key(app)).owner

    def check(self, app: str, who: Peer, what: str, change: bool) -> None:
        """Denied unless `who` may read (change) the app's store; UsageError if there is none."""
        self._get(app)
        self.owners.grants.check(who, self.key(app), f"{what} the fd store of app {app!r}", change)

    def stores_of(self, uid: int) -> tuple[int, int]:
        """(stores, entries) of the stores uid owns: their own two entries and their stored fds."""
        n = entries = 0
        for a in self.apps.values():
            if self.owner(a.app) == uid:
                n += 1
                entries += 2 + a.stored()
        return n, entries

    def _get(self, app: str) -> AppStore:
        fs.check_app(app)
        a = self.apps.get(app)
        if a is None:
            raise UsageError(f"no fd store for app {app!r}; `cprd run --name {app} -- CMD` makes one")
        return a

    # -- reading a store ------------------------------------------------------------------------
    def keys_of(self, app: str) -> list[tuple[str, int]]:
        """The keys of the app's store's entries (its own two and its stored fds), none if it has no store."""
        a = self.apps.get(app)
        if a is None:
            return []
        key = fs.entry_name(app)
        return [(key, fs.NOTIFY_ID), (key, fs.NAMES_ID), *((key, i) for i in sorted(a.meta.names))]

    def fds_of(self, app: str) -> list[tuple[str, int]]:
        """(name, fd) of every stored fd, newest first: the order systemd hands them back in."""
        a = self._get(app)
        key = fs.entry_name(app)
        out = []
        for i in sorted(a.meta.names, reverse=True):
            e = self.st.table.find(key, i)
            if e is not None:
                out.append((a.meta.names[i][0], e.fd))
        return out

    def rows(self, app: str, who: Peer) -> list[dict[str, Any]]:
        """What `systemd-analyze fdstore` shows, for each stored fd, newest first."""
        out = []
        self.check(app, who, "list", change=False)
        a = self._get(app)
        key = fs.entry_name(app)
        for i in sorted(a.meta.names, reverse=True):
            e = self.st.table.find(key, i)
            if e is None:
                continue
            try:
                st = os.fstat(e.fd)
                path = proc.fd_path(e.fd)
                acc = os.O_ACCMODE & fcntl.fcntl(e.fd, fcntl.F_GETFL)
            except OSError:
                continue
            out.append({"fdname": a.meta.names[i][0], "kind": e.ident.kind.label, "id": i,
                        "dev": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", "ino": st.st_ino,
                        "rdev": f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if st.st_rdev else None,
                        "path": path, "access": {os.O_RDONLY: "ro", os.O_WRONLY: "wo", os.O_RDWR: "rw"}.get(acc, "?"),
                        "poll": a.meta.names[i][1]})
        return out

    def describe(self, e: Entry) -> dict[str, Any] | None:
        """`app` and `fdname` of an entry of a store (for `ls`), or None for any other entry."""
        app = fs.app_of(e.name)
        a = self.apps.get(app) if app else None
        if a is None:
            return None
        return {"app": app, "fdname": a.meta.names.get(e.id, (None,))[0] if e.id >= 0 else None}

    def summary(self, who: Peer) -> dict[str, Any]:
        """The stores `who` may see, with their owners and supervisors."""
        g = self.owners.grants
        return {a.app: {"fds": a.stored(), "max": a.meta.max, "socket": a.meta.path, "status": a.status,
                        **g.grant(self.key(a.app)).describe(), **self.served(a.app)}
                for a in self.apps.values() if g.may_read(who, self.key(a.app))}

    # -- its supervisor (`cprd serve`) ------------------------------------------------------------
    def served(self, app: str) -> dict[str, Any]:
        """{"serve": the supervisor's last report and how long ago it came} when one reported."""
        a = self.apps.get(app)
        if a is None or a.supervisor is None:
            return {}
        r = {k: v for k, v in a.supervisor.items() if k != "token"}
        return {"serve": {**r, "heard_s_ago": round(time.monotonic() - a.heard, 3),
                          "alive": time.monotonic() - a.heard < fs.SUPERVISOR_STALE_S}}

    def supervise(self, app: str, who: Peer, text: str) -> dict[str, Any]:
        """A supervisor's heartbeat: its report kept; the restarts asked and the READY=1 senders
        back. A second supervisor is refused while the first one is heard from."""
        self.check(app, who, "serve", change=True)
        a = self._get(app)
        r = fs.check_report(text)
        now = time.monotonic()
        old = a.supervisor
        if old is not None and old["token"] != r["token"] and now - a.heard < fs.SUPERVISOR_STALE_S:
            raise Busy(f"app {app} is served by cprd serve pid {old['pid']} (heard from {now - a.heard:.1f} s "
                       f"ago); stop that one first, or wait {fs.SUPERVISOR_STALE_S:g} s if it is gone")
        a.supervisor, a.heard = r, now
        durable = fs.durable_report(r)
        if durable != a.meta.serve:  # a generation started, was ready, stopped or exited; a new supervisor
            a.meta.serve = durable
            self._append(a, fs.Log.line_serve(durable))
        restarts, a.restarts = a.restarts, []
        return {"restarts": restarts, "ready": [[p, round(now - t, 3)] for p, t in a.ready],
                "previous": old if old is not None and old["token"] != r["token"] else None}

    def ask_restart(self, app: str, who: Peer, rid: str) -> dict[str, Any]:
        self.check(app, who, "restart", change=True)
        a = self._get(app)
        if a.supervisor is None or time.monotonic() - a.heard >= fs.SUPERVISOR_STALE_S:
            raise UsageError(f"app {app} has no running cprd serve (none heard from in the last "
                             f"{fs.SUPERVISOR_STALE_S:g} s): start one with cprd serve --name {app} -- CMD")
        if not 8 <= len(rid) <= 64 or len(a.restarts) >= 16:
            raise UsageError("fdstore restart: an id of 8 to 64 characters, at most 16 restarts waiting")
        if rid not in a.restarts:  # a request sent again (its first answer was lost) restarts once
            a.restarts.append(rid)
        return {"app": app, "id": rid, "supervisor": a.supervisor["pid"]}

    # -- the names memfd ------------------------------------------------------------------------
    def _append(self, a: AppStore, line: bytes) -> None:
        a.log_lines += 1
        if a.log_lines > 2 * a.stored() + 64:
            self._rewrite(a)
            return
        os.pwrite(a.meta_fd, line, a.log_size)
        a.log_size += len(line)

    def _rewrite(self, a: AppStore) -> None:
        data = fs.Log.compact(a.meta)
        os.ftruncate(a.meta_fd, 0)
        os.pwrite(a.meta_fd, data, 0)
        a.log_lines, a.log_size = data.count(b"\n"), len(data)

    # -- FDPOLL ---------------------------------------------------------------------------------
    def _ensure_epoll(self) -> select.epoll:
        """The epoll set of polled stored fds: made with the first store, so that a daemon keeps one
        fd for it while it has any store (and none without)."""
        if self._epoll is None:
            self._epoll = select.epoll()
            if self._nursery is not None:
                self._nursery.start_soon(self._watch_hangups)
        return self._epoll

    def _watch(self, a: AppStore, i: int, fd: int) -> None:
        epoll = self._ensure_epoll()
        try:
            epoll.register(fd, 0)  # only EPOLLHUP and EPOLLERR are reported
        except PermissionError:  # a regular file: not pollable, kept unwatched (as systemd does)
            return
        except OSError as e:
            log.warning("event=fdstore_unpollable app=%s id=%d error=%r", a.app, i, str(e))
            return
        self._polled[fd] = (a.app, i)

    def _unwatch(self, fd: int) -> None:
        if self._polled.pop(fd, None) is not None and self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    async def _watch_hangups(self) -> None:
        assert self._epoll is not None
        while True:
            await self.life.until_thawed()
            if self.life.handed_off:
                return
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            if self.life.frozen or self.life.handed_off:
                continue
            for fd, events in self._epoll.poll(0):
                hit = self._polled.get(fd)
                if hit is None:
                    continue
                app, i = hit
                a = self.apps.get(app)
                if a is not None:
                    log.info("event=fdstore_hangup app=%s id=%d fdname=%r events=%#x", app, i,
                             a.meta.names.get(i, ("?",))[0], events)
                    self._remove(a, i)
            self.st.flush()
