"""The owners of a daemon's entries and stores, kept in its table (the rules are access.py's).

Theory of operation
-------------------
``Owners`` holds the ``Grants`` of the table and the memfd of their log, entry ``LOG_KEY``. It is
loaded from the table when a daemon is made (a target, a restored daemon: the log came along) and
writes nothing then: a target's table may still go back to its source. Each change writes its
line at the end of the log before the table changes; a log mostly obsolete is written whole into
a new memfd, which replaces the entry (never truncated in place: a crash meanwhile leaves the
old log whole).

Quotas count, for a uid, the entries it owns (records) and its stores with their own two entries
and their stored fds (``stores_of(uid)`` from the fd stores).

What this module may know: the table, memfds, the rules of access.py.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable

from ..access import LOG_KEY, Grant, Grants, Key, Peer, Quota
from ..fds import read_all
from ..handoff import table_limit
from ..kinds import classify
from .state import DaemonState

log = logging.getLogger("cprd.daemon")


class Owners:
    def __init__(self, st: DaemonState) -> None:
        self.st = st
        self.grants = Grants(os.geteuid())
        # (stores, entries) the stores of a uid hold (their own entries and stored fds), set by the stores
        self.stores_of: Callable[[int], tuple[int, int]] = lambda uid: (0, 0)

    def load(self) -> None:
        e = self.st.table.find(*LOG_KEY)
        if e is None:
            return
        data = read_all(e.fd)

        def ident(key: Key):  # type: ignore[no-untyped-def]
            hit = self.st.table.find(*key)
            return hit.ident if hit is not None else None

        ignored = self.grants.load(data, ident)
        log.info("event=owners_loaded records=%d ignored=%d", len(self.grants.grants), ignored)

    # -- quotas -----------------------------------------------------------------------------
    def quota(self) -> tuple[Quota, int]:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        capacity = table_limit(soft)
        c = self.st.config
        return Quota.default(capacity, c.uid_max_entries, c.uid_max_stores, c.reserve), capacity

    def usage(self, uid: int) -> tuple[int, int]:
        """(entries, stores) uid holds, its stores' entries included."""
        stores, in_stores = self.stores_of(uid)
        return self.grants.owned(uid) - stores + in_stores, stores

    def others(self) -> int:
        """Entries held by uids other than the daemon's own and root, their stores' included."""
        total = 0
        for uid in {u for u in self.grants.by_owner if not self.grants.trusted(u)}:
            total += self.usage(uid)[0]
        return total

    def check_room(self, uid: int, adding: int, new_store: bool = False) -> None:
        if self.grants.trusted(uid):
            return
        quota, capacity = self.quota()
        owned, stores = self.usage(uid)
        self.grants.check_room(uid, quota, capacity, adding, owned, stores, self.others(), new_store)

    def describe(self, uid: int) -> dict:
        quota, capacity = self.quota()
        owned, stores = self.usage(uid)
        return {"uid": uid, "entries": owned, "stores": stores,
                **({} if self.grants.trusted(uid) else {"max_entries": quota.entries, "max_stores": quota.stores}),
                "reserve": quota.reserve, "capacity": capacity}

    # -- changes ----------------------------------------------------------------------------
    def set(self, key: Key, grant: Grant) -> None:
        """Record key's grant (the entry must be in the table, with the fd the grant is for)."""
        e = self.st.table.find(*key)
        assert e is not None
        self._write(self.grants.set(key, e.ident, grant))

    def made(self, key: Key, ident: object, who: Peer) -> None:
        """Before an entry is saved under key for `who` (a new entry: `who` owns it)."""
        self._write(self.grants.set(key, ident, Grant(who.uid)))  # type: ignore[arg-type]

    def replaced(self, key: Key, ident: object) -> None:
        """Before a replace: the entry keeps its owner and shares, for its new fd."""
        g = self.grants.grant(key)
        self._write(self.grants.set(key, ident, g))  # type: ignore[arg-type]

    def dropped(self, key: Key) -> None:
        self._write(self.grants.drop(key))

    def _write(self, line: bytes) -> None:
        if not line:
            return
        table = self.st.table
        e = table.find(*LOG_KEY)
        if e is None or self.grants.wants_compaction():
            fd = os.memfd_create("cprd-access", os.MFD_CLOEXEC)
            try:
                data = self.grants.compact()
                if data:
                    os.pwrite(fd, data, 0)
                table.save(*LOG_KEY, fd, classify(fd), replace=True)
            except BaseException:
                os.close(fd)
                raise
            self.st.flush()
            return
        os.pwrite(e.fd, line, os.fstat(e.fd).st_size)  # at the end, whoever wrote last
