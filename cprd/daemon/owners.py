"""The owners of a daemon's entries and stores, kept in its table (the rules are access.py's).

Theory of operation
-------------------
``Owners`` holds the ``Grants`` of the table and the memfd of their log, entry ``LOG_KEY``. It is
loaded from the table when a daemon is made (a target, a restored daemon: the log came along) and
writes nothing then: a target's table may still go back to its source.

Whose log it is: its first line is a token kept in a file beside the control socket that only the
daemon's user and root can read (``TOKEN_SUFFIX``). A log without it (a table that went through a
cprd older than owners, where any allowed uid could put a name starting with ``cprd/``) is not
believed: every entry is then the daemon's user's, which gives no other uid anything.

Writing: a change of an entry's grant is written before the entry is made or replaced, its drop
after the entry is gone (a crash in between leaves a record that matches no fd, which the next
load ignores). The first write after a load, and a log mostly obsolete, go into a new memfd that
replaces the entry: a daemon never appends to a log it inherited (the source of a handoff that
fails goes on with its own), and a crash never leaves a log cut in place. A load that ignored
records writes the log anew once the daemon serves alone (``settle``), so that an ignored record
cannot match a later fd of the same identity.

Quotas count, for a uid, the entries it owns (records) and its stores with their own two entries
and their stored fds (``stores_of(uid)`` from the fd stores).

What this module may know: the table, memfds, files beside the control socket, access.py's rules.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
from collections.abc import Callable

from ..access import LOG_KEY, Grant, Grants, Key, Peer, Quota
from ..errors import CapacityError, CprdError
from ..fds import read_all
from ..handoff import table_limit
from ..kinds import Kind, classify
from ..paths import open_dir
from .state import DaemonState

TOKEN_SUFFIX = ".owners"  # <control socket>.owners: the token that marks the daemon's own log
_HEADER = b"cprd-owners "
Before = tuple | None  # a key's record as it was (see Owners.undo)

log = logging.getLogger("cprd.daemon")


class Owners:
    def __init__(self, st: DaemonState) -> None:
        self.st = st
        self.grants = Grants(os.geteuid())
        # (stores, entries) the stores of a uid hold (their own entries and stored fds), set by the stores
        self.stores_of: Callable[[int], tuple[int, int]] = lambda uid: (0, 0)
        self._token: bytes | None = None
        self._inherited = False  # the log's memfd came with the table: never appended to
        self._stale = False  # the load ignored records: write the log anew once serving alone

    # -- the token --------------------------------------------------------------------------
    def token(self, create: bool) -> bytes | None:
        """This daemon's token (made, 0600, if missing and `create`), or None."""
        if self._token is not None:
            return self._token
        directory, name = os.path.split(self.st.control_path)
        name += TOKEN_SUFFIX
        try:
            with open_dir(directory, what="the owners' token") as d:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                 dir_fd=d.fd)
                    os.write(fd, secrets.token_hex(16).encode())
                    os.fsync(fd)
                try:
                    st = os.fstat(fd)
                    if not self.grants.trusted(st.st_uid) or st.st_mode & 0o077:
                        log.error("event=owners_token_refused uid=%d mode=%o note=not-private", st.st_uid,
                                  st.st_mode & 0o777)
                        return None
                    token = os.pread(fd, 64, 0).strip()
                finally:
                    os.close(fd)
        except (OSError, ValueError) as e:
            log.error("event=owners_token_unreadable error=%r", str(e))
            return None
        except Exception as e:  # noqa: BLE001 - an unsafe directory (UnsafePath): believe no log
            log.error("event=owners_token_unreadable error=%r", str(e))
            return None
        self._token = token if len(token) == 32 else None
        return self._token

    # -- loading ----------------------------------------------------------------------------
    def load(self) -> None:
        e = self.st.table.find(*LOG_KEY)
        if e is None:
            return
        self._inherited = True
        try:
            data = read_all(e.fd) if e.ident.kind is Kind.MEMFD else b""
        except OSError:
            data = b""
        head, _, body = data.partition(b"\n")
        token = self.token(create=False)
        if token is None or head != _HEADER + token:
            log.warning("event=owners_log_not_ours note=a-table-from-an-older-cprd-or-a-forged-log;"
                        "every-entry-is-the-daemons-users")
            self._stale = True
            return

        def ident(key: Key):  # type: ignore[no-untyped-def]
            hit = self.st.table.find(*key)
            return hit.ident if hit is not None else None

        ignored = self.grants.load(body, ident)
        self._stale = ignored > 0
        log.info("event=owners_loaded records=%d ignored=%d", len(self.grants.grants), ignored)

    def settle(self) -> None:
        """Once the daemon serves alone: write the log anew if the load ignored any of it."""
        if self._stale:
            self._stale = False
            self._compact()

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

    def room_for(self, uid: int) -> int:
        """How many entries uid may still add (its quota, and the others' share of the table)."""
        if self.grants.trusted(uid):
            return 1 << 30
        quota, capacity = self.quota()
        owned, _ = self.usage(uid)
        return max(0, min(quota.entries - owned, capacity - quota.reserve - self.others()))

    def describe(self, uid: int) -> dict:
        quota, capacity = self.quota()
        owned, stores = self.usage(uid)
        return {"uid": uid, "entries": owned, "stores": stores,
                **({} if self.grants.trusted(uid) else {"max_entries": quota.entries, "max_stores": quota.stores}),
                "reserve": quota.reserve, "capacity": capacity}

    # -- changes ----------------------------------------------------------------------------
    def before(self, key: Key) -> Before:
        return self.grants.grants.get(key)

    def undo(self, key: Key, before: Before) -> None:
        """Put key's record back as it was (a table change that failed after its record)."""
        self._change(key, lambda: self.grants.set(key, *before) if before else self.grants.drop(key))

    def _change(self, key: Key, change: Callable[[], bytes]) -> None:
        """Apply a change to the grants and write it; if the write fails, the grants are as before."""
        before = self.grants.grants.get(key)
        line = change()
        try:
            self._write(line)
        except BaseException:
            self.grants.put_back(key, before)
            raise

    def set(self, key: Key, grant: Grant) -> None:
        """Record key's grant (the entry must be in the table, with the fd the grant is for)."""
        e = self.st.table.find(*key)
        assert e is not None
        self._change(key, lambda: self.grants.set(key, e.ident, grant))

    def made(self, key: Key, ident: object, who: Peer) -> None:
        """Before an entry is saved under key for `who` (new, or replacing another's: `who` owns it,
        shared with nobody)."""
        self._change(key, lambda: self.grants.set(key, ident, Grant(who.uid)))  # type: ignore[arg-type]

    def replaced(self, key: Key, ident: object, who: Peer) -> None:
        """Before a replace by `who`: its owner's replace keeps the owner and shares, for its new
        fd; anybody else's (the daemon's user, root) makes the entry theirs, shared with nobody, so
        that the fd they put never reaches the uid that made the name."""
        g = self.grants.grant(key)
        if g.owner != who.uid:
            g = Grant(who.uid)
        self._change(key, lambda: self.grants.set(key, ident, g))  # type: ignore[arg-type]

    def dropped(self, key: Key) -> None:
        """After an entry is gone (a failure to write this leaves a record that matches no fd)."""
        try:
            self._change(key, lambda: self.grants.drop(key))
        except CprdError as e:
            log.warning("event=owner_not_dropped name=%r id=%d error=%r", key[0], key[1], str(e))

    def _write(self, line: bytes) -> None:
        """Write a change (the grants already hold it); CapacityError if it cannot be written."""
        if not line:
            return
        e = self.st.table.find(*LOG_KEY)
        if e is None or self._inherited or self.grants.wants_compaction():
            self._compact()
            return
        try:
            os.pwrite(e.fd, line, os.fstat(e.fd).st_size)  # at the end, whoever wrote last
        except OSError as err:
            raise CapacityError(f"cannot record an owner: {err.strerror}; retry later") from None

    def _compact(self) -> None:
        """The whole log into a new memfd, which replaces the entry."""
        token = self.token(create=True)
        if token is None:
            raise CapacityError(f"cannot keep owners: the token file {self.st.control_path}{TOKEN_SUFFIX} cannot "
                                "be made or read (see the daemon's log); entries of other users cannot be made")
        try:
            fd = os.memfd_create("cprd-access", os.MFD_CLOEXEC)
        except OSError as err:
            raise CapacityError(f"cannot record an owner: {err.strerror}; retry later") from None
        try:
            os.pwrite(fd, _HEADER + token + b"\n" + self.grants.compact(), 0)
            self.st.table.save(*LOG_KEY, fd, classify(fd), replace=True)
        except OSError as err:
            os.close(fd)
            raise CapacityError(f"cannot record an owner: {err.strerror}; retry later") from None
        except BaseException:
            os.close(fd)
            raise
        self._inherited = False
        self.st.flush()
