"""What each control request does to a daemon's table, keyed like the control protocol's ops.

Theory of operation
-------------------
``Handlers.table_for(op)`` is the request table: put, get, del, ls, status act on the DaemonState
here; handoff and upgrade move the whole table and belong to the Daemon, which lends them.

Mutations (put, del) are atomic with respect to every other task (no await between their check
and their change). While the daemon is frozen (the last moments of a handoff, an upgrade) they
wait; if the table moved on meanwhile they are not answered (``Unanswered``): their client
retries at the new owner. A mutation's answer, success or error, is remembered under its request
id, and a retry gets that answer instead of a second application (replies.py).

``ls`` is built once per version of the table and shared by every client that asks meanwhile;
each entry's JSON is made once, since an Entry never changes (a replace makes a new one).

What this module may know: the table, kinds (to classify a put), the control protocol's replies.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from .. import __version__
from ..access import LOG_KEY, OWN_PREFIX, Grant, Peer
from ..errors import CapacityError, CprdError, KeyExists, KeyMissing, UsageError, error_from_code
from ..fds import OwnedFds, closer
from ..handoff import fd_capacity, table_limit
from ..kinds import classify
from ..protocol import control as cp
from ..fdstore import PREFIX as FS_PREFIX, app_of
from ..table import Entry, check_key, check_new_name
from .endpoint import Unanswered
from .lifecycle import Lifecycle
from .owners import Owners
from .state import DaemonState

log = logging.getLogger("cprd.daemon")

FD_RESERVE = 16  # fds a daemon keeps free for accepting, answering and handing off
LS_STEP = 1000  # entries ls encodes between two turns of the other tasks
FD_REST_GUESS = 16  # open fds beside the table and the connections, until counted
_JSON = json.JSONEncoder(separators=(",", ":"))

Reply = tuple[Iterable[bytes], list[int]]
Handler = Callable[[cp.Request, OwnedFds, Any, Peer], Awaitable[Reply]]


class Handlers:
    def __init__(self, st: DaemonState, life: Lifecycle, owners: Owners, conns: Callable[[], int], handoff: Handler,
                 upgrade: Handler, fdstore: Handler, extra: Callable[[Entry], dict | None],
                 status_extra: Callable[[Peer], dict], store_keys: Callable[[str], list[tuple[str, int]]]) -> None:
        self.st, self.life, self.conns, self.extra, self.status_extra = st, life, conns, extra, status_extra
        self.owners, self.store_keys = owners, store_keys
        self.table: dict[str, Handler] = {"put": self.mutate, "del": self.mutate, "share": self.mutate,
                                          "get": self.get, "ls": self.ls, "status": self.status_req,
                                          "handoff": handoff, "upgrade": upgrade, "fdstore": fdstore}
        assert set(self.table) == set(cp.OPS), "every control op has its handler"
        self._ls_cache: tuple[tuple[int, int], list[bytes]] | None = None  # (versions, frames of the reply to ls)
        # each entry's JSON, while it lives and its grant does not change: (entry, grant, JSON)
        self._ls_json: dict[tuple[str, int], tuple[Entry, Grant, bytes]] = {}
        # open fds beside the table and the connections, as counted last (a guess until then: a
        # daemon has about 12; the first count would cost a new daemon 24 ms at 19,000 entries)
        self._fd_rest = FD_REST_GUESS

    async def __call__(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        if self.life.frozen_for_all:  # a stand-in's last moments: the new program may serve already
            await self.life.until_thawed()
        if self.life.handed_off:
            raise Unanswered()
        return await self.table[req.op](req, fds, conn, who)

    # -- mutations ---------------------------------------------------------------------------
    async def mutate(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        await self.life.until_thawed()  # the last moments of a handoff or an upgrade: wait for its outcome
        if self.life.handed_off:
            raise Unanswered()
        rid = req.args.get("rid") or ""
        cached = self.st.replies.get(rid) if rid else None
        if cached is not None:  # a retry of a mutation already applied: the same answer
            if cached.get("ok"):
                return cp.encode_reply(cached["result"]), []
            raise error_from_code(cached["error"], cached["message"])
        try:
            result = self._apply(req, fds, who)
        except CprdError as e:
            self.st.answered(rid, {"ok": False, "error": e.code, "message": str(e)})
            raise
        self.st.answered(rid, {"ok": True, "result": result})
        return cp.encode_reply(result), []

    def _apply(self, req: cp.Request, fds: OwnedFds, who: Peer) -> dict[str, Any]:
        """A put, del or share, with no await: atomic with respect to every other task. The owners'
        log is written before the table changes (owners.py)."""
        a, table, owners = req.args, self.st.table, self.owners
        name, id_ = a["name"], a["id"]
        key = (name, id_)
        check_key(name, id_)
        if req.op == "share":
            return self._share(key, a["uids"], a["gids"], who)
        app = app_of(name)
        if app is not None or name.startswith(FS_PREFIX):
            raise UsageError(f"entries named {name!r} belong to the fd store" + (f" of app {app!r}" if app else "s")
                             + f"; use `cprd ctl fdstore {app or 'APP'}` (or `--clean`) and `cprd run --name "
                             f"{app or 'APP'}`: names starting with {FS_PREFIX!r} cannot be put or deleted")
        if name.startswith(OWN_PREFIX):
            raise UsageError(f"entries named {name!r} are the daemon's own (names starting with {OWN_PREFIX!r}); "
                             "choose another name")
        old = table.find(name, id_)
        if req.op == "put":
            check_new_name(name)
            if old is not None:  # another's name: refused before anything of its entry is told
                owners.grants.check(who, key, f"{'replace' if a['replace'] else 'put'} entry ({name!r}, {id_})",
                                    change=True)
                if not a["replace"]:
                    raise KeyExists(f"key ({name!r}, {id_}) already holds fd {old.fd} ({old.ident.kind.label}); delete "
                                    "it first or save with replace")
            else:
                self.check_room()
                owners.check_room(who.uid, 1)
            ident = classify(fds.fds[0])
            before = owners.before(key)
            if old is not None:
                owners.replaced(key, ident, who)
            else:
                owners.made(key, ident, who)
            try:
                entry = table.save(name, id_, fds.fds[0], ident, replace=a["replace"])
            except CprdError:
                owners.undo(key, before)
                raise
            fds.take()
            log.debug("event=put name=%r id=%d fd=%d kind=%s uid=%d", entry.name, entry.id, entry.fd,
                      ident.kind.label, who.uid)
            return {**entry.describe(), **owners.grants.grant(key).describe()}
        if old is None:
            raise KeyMissing(f"no entry ({name!r}, {id_}); list entries with `cprd ctl ls`")
        owners.grants.check(who, key, f"delete entry ({name!r}, {id_})", change=True)
        table.delete(name, id_)
        owners.dropped(key)
        log.debug("event=del name=%r id=%d uid=%d", name, id_, who.uid)
        return {"name": name, "id": id_, "deleted": True}

    def _share(self, key: tuple[str, int], uids: list[int], gids: list[int], who: Peer) -> dict[str, Any]:
        """Let `uids` and `gids` read the entry (a store: its notify socket's entry), instead of those
        it was shared with before."""
        owners = self.owners
        if key == LOG_KEY or key[0].startswith(OWN_PREFIX) or (app_of(key[0]) is not None and key[1] != -1):
            raise UsageError(f"entry {key!r} cannot be shared: share an entry, or a store as (fdstore/APP, -1)")
        if self.st.table.find(*key) is None:
            raise KeyMissing(f"no entry {key!r}" + (" (no such fd store)" if app_of(key[0]) else "")
                             + "; list entries with `cprd ctl ls`")
        owners.grants.check(who, key, f"share {key!r}", change=True)
        g = owners.grants.grant(key)
        owners.set(key, Grant(g.owner, frozenset(uids), frozenset(gids)))
        log.info("event=shared_with name=%r id=%d uids=%s gids=%s by=%d", key[0], key[1], uids, gids, who.uid)
        return {"name": key[0], "id": key[1], **owners.grants.grant(key).describe()}

    def check_room(self) -> None:
        """Refuse a put once the table holds as many entries as a target with the same fd limit could
        take over, or when it would leave the daemon fewer than FD_RESERVE free fds (counted exactly
        only when anywhere near the limit: listing /proc/self/fd costs ~1 ms)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        n = len(self.st.table)
        most = table_limit(soft)
        if n >= most:
            raise CapacityError(f"the table holds {n} entries, as many as a target with the same fd limit "
                                f"(RLIMIT_NOFILE {soft}) could take over in a handoff; delete entries or raise the "
                                "limit (LimitNOFILE=, ulimit -n)")
        if n + self.conns() + 64 + FD_RESERVE < soft:
            return
        try:
            _, n_open, _ = fd_capacity(0)
        except OSError:  # not even an fd to count them with
            n_open = soft
        if n_open + FD_RESERVE > soft:
            raise CapacityError(f"the daemon is at its fd limit ({n_open} open, RLIMIT_NOFILE {soft}, {FD_RESERVE}"
                                " kept free to answer clients); delete entries or raise its limit (LimitNOFILE=,"
                                " ulimit -n)")

    # -- reads ------------------------------------------------------------------------------
    async def get(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        a = req.args
        check_key(a["name"], a["id"])
        entry = self.st.table.find(a["name"], a["id"])
        if entry is None:
            raise KeyMissing(f"no entry ({a['name']!r}, {a['id']}); list entries with `cprd ctl ls`")
        app = app_of(a["name"])
        self.owners.grants.check(who, (f"{FS_PREFIX}{app}", -1) if app else entry.key,
                                 f"get entry ({a['name']!r}, {a['id']})", change=False)
        if a["name"].startswith(OWN_PREFIX):
            raise UsageError(f"entry ({a['name']!r}, {a['id']}) is the daemon's own; it is not handed out")
        if a["id"] < 0 and app_of(a["name"]) is not None:  # a store's own socket and names: never handed out
            raise UsageError(f"entry ({a['name']!r}, {a['id']}) is the fd store's own "
                             f"{'notify socket' if a['id'] == -1 else 'record of names'}; it is not handed out "
                             f"(the stored fds are: `cprd ctl fdstore {app_of(a['name'])}`)")
        extra = self.extra(entry)
        return cp.encode_reply({**entry.describe(), **extra} if extra else entry.describe()), [entry.fd]

    async def ls(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        if self.owners.grants.trusted(who.uid):
            return await self.ls_frames(), []
        parts = []
        for i, e in enumerate(sorted(self.visible(who))):
            if i % LS_STEP == LS_STEP - 1:
                await trio.sleep(0)
            parts.append(self._entry_json(e))
        return cp.encode_reply_parts(parts), []

    def visible(self, who: Peer) -> list[Entry]:
        """The entries `who` (not trusted) may see: those it owns or that are shared with it, and
        every entry of a store it may see. O(records) plus those stores' entries."""
        grants, table, out = self.owners.grants, self.st.table, []
        for key in grants.keys_of(who):
            app = app_of(key[0])
            keys = self.store_keys(app) if app is not None and key[1] == -1 else [key] if app is None else []
            out.extend(e for k in keys if (e := table.find(*k)) is not None)
        return out

    def _entry_json(self, e: Entry) -> bytes:
        """An entry's JSON as ls shows it (kept while the entry and the grants do not change)."""
        hit = self._ls_json.get((e.name, e.id))
        g = self.owners.grants.grant((e.name, -1) if app_of(e.name) else e.key)
        if hit is None or hit[0] is not e or hit[1] is not g:
            extra = self.extra(e) or {}
            hit = self._ls_json[(e.name, e.id)] = (e, g, _JSON.encode({**e.describe(), **extra,
                                                                       **g.describe()}).encode())
        return hit[2]

    async def ls_frames(self) -> list[bytes]:
        """The reply to ls: each entry's JSON is made once and kept while the entry lives, the whole
        reply kept while the table does not change. Building it yields to other tasks every
        LS_STEP entries, so that a large table never holds the others up for long; it lists the
        table as it was when the ls began (entries are tuples: sorting them compares (name, id))."""
        table, grants = self.st.table, self.owners.grants
        version = (table.version, grants.version)
        if self._ls_cache is not None and self._ls_cache[0] == version:
            return self._ls_cache[1]
        entries = sorted(table)
        parts = []
        for i, e in enumerate(entries):
            if i % LS_STEP == LS_STEP - 1:
                await trio.sleep(0)
            parts.append(self._entry_json(e))
        enc = self._ls_json
        if len(enc) > 2 * len(table) + 64:  # many entries deleted since: forget what they encoded to
            self._ls_json = {(e.name, e.id): enc[(e.name, e.id)] for e in table if (e.name, e.id) in enc}
        frames = cp.encode_reply_parts(parts)
        if (table.version, grants.version) == version:
            self._ls_cache = (version, frames)
        return frames

    async def status_req(self, req: cp.Request, fds: OwnedFds, conn: Any, who: Peer) -> Reply:
        return cp.encode_reply(self.status(who)), []

    def open_fds(self) -> tuple[int, int, bool]:
        """(soft limit, open fds, whether they were counted). Counting lists /proc/self/fd, 1 ms a
        thousand fds, so only near the limit is it done; elsewhere the count is the table, the
        connections, and the rest as counted last, or guessed (a handoff's dropped fds are not in
        it)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        base = len(self.st.table) + self.conns()
        if base + self._fd_rest + 2 * FD_RESERVE + 64 >= soft:
            try:
                _, n_open, _ = fd_capacity(0)
            except OSError:  # not even an fd to list them with: at the limit
                return soft, soft, False
            self._fd_rest = max(0, n_open - base)
            return soft, n_open, True
        return soft, base + self._fd_rest, False

    def status(self, who: Peer | None = None) -> dict[str, Any]:
        """O(1) in the size of the table (see open_fds). A uid other than the daemon's own and root
        sees the daemon's state and its own share of the table, not what others hold."""
        st = self.st
        if who is not None and not self.owners.grants.trusted(who.uid):
            return {"pid": os.getpid(), "role": st.role, "state": self.life.phase.value, "version": __version__,
                    "control": st.control_path, "you": self.owners.describe(who.uid), **self.status_extra(who)}
        soft, n_open, counted = self.open_fds()
        return {
            "pid": os.getpid(), "role": st.role, "state": self.life.phase.value, "version": __version__,
            "entries": len(st.table), "by_kind": st.table.by_kind(), "fd_limit": soft, "open_fds": n_open,
            "open_fds_counted": counted, "fd_capacity": max(0, soft - n_open),
            "control": st.control_path, "handoffs_received": st.handoffs,
            "upgrades": st.upgrades,
            "uptime_s": round(time.time() - st.started, 3),
            "closes_pending": closes_pending(),
            **({"salvage": st.salvage} if st.salvage else {}),
            **({"source_died": True} if st.source_died else {}),
            **({"you": self.owners.describe(who.uid)} if who is not None else {}),
            "owners": {str(u): self.owners.usage(u)[0] for u in sorted(self.owners.grants.by_owner)
                       if self.owners.grants.by_owner[u]},
            **self.status_extra(who or Peer(os.geteuid())),
        }


def closes_pending() -> int:
    """Fds queued for or in a close on the closer's threads (one that blocks shows here)."""
    c = closer()
    return c.pending() if c is not None else 0


def upgrade_timeout(req: cp.Request, default: float) -> float:
    timeout = req.args["timeout"] or default
    if not 0 < timeout <= 3600:
        raise UsageError(f"upgrade timeout {timeout:g} s is outside (0, 3600]")
    return timeout
