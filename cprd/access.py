"""Who may do what to an entry or a store, and how much of the table each user may hold. Sans-io.

Theory of operation
-------------------
Every entry and every fd store has an owner: the uid that made it (SO_PEERCRED of the client that
put it, or that opened the store; the daemon's own uid for what it made itself or was handed by a
cprd older than this rule). Who may do what:

- the daemon's own user and root (``trusted``) may do anything to anything;
- an entry's or a store's owner may read and change it: get, replace, delete; a store's owner may
  also run its app (`cprd run`), store into it, clean, remove or re-limit it;
- a uid or gid it is shared with may read it (get; list a store and get its fds), never change it;
- everyone else is refused, and nothing changes.

A store's stored fds belong to the store: their owner is the store's, whoever sent them.

Where the owners live: in the table itself, so that they move with every handoff and survive
every upgrade as entries do. Only entries whose owner is not the daemon's user, or that are
shared, have a record (a root-only table has none). The records are an append-only log of JSON
lines in a memfd, entry ("cprd/access", 0): ``{"k": [name, id], "i": identity, "o": uid,
"u": [uids], "g": [gids]}`` sets the grant of an entry, ``{"k": [name, id]}`` drops it. A record
names the identity of the fd it was made for, and is taken up (``Grants.load``) only if the entry
under its key still has that identity: a process that died between writing a record and changing
the table (a stand-in, a source in a handoff) leaves records that match nothing, which are
ignored, never applied to another fd. The daemon writes a record before it changes the table.

Quotas (``Quota``): a uid other than the daemon's own and root may hold at most ``entries``
entries (its stores' entries and stored fds included) and ``stores`` stores, and such uids
together may hold at most the table's capacity less ``reserve``: the daemon's own user and root
can always put that many.

Names: names starting with ``cprd/`` are the daemon's own (this log, the listening sockets of the
other users' lanes) and those starting with ``fdstore/`` belong to the fd stores: neither can be
put, replaced or deleted through `put` and `del`.

What this module may know: uids, gids, entry keys and identities, bytes of the log. No sockets,
no fds, no trio.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import CapacityError, Denied
from .kinds import Identity
from .paths import user_name as user

OWN_PREFIX = "cprd/"
LOG_KEY = ("cprd/access", 0)  # the memfd of the log
LANE_NAME = "cprd/lane"  # (LANE_NAME, uid): the listening socket of uid's lane
Key = tuple[str, int]


@dataclass(slots=True, frozen=True)
class Peer:
    """Who asks: a uid and every gid it has (SO_PEERCRED, SO_PEERGROUPS)."""

    uid: int
    gids: frozenset[int] = frozenset()


@dataclass(slots=True, frozen=True)
class Grant:
    """An entry's or a store's owner, and the uids and gids it is shared with (to read)."""

    owner: int
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def describe(self) -> dict:
        d: dict = {"owner": self.owner}
        if self.uids or self.gids:
            d["shared"] = {"uids": sorted(self.uids), "gids": sorted(self.gids)}
        return d


@dataclass(slots=True, frozen=True)
class Quota:
    """What the uids other than the daemon's own and root may hold (see the module docstring)."""

    entries: int  # per uid
    stores: int  # per uid
    reserve: int  # of the table's capacity, kept for the daemon's own user and root

    @classmethod
    def default(cls, capacity: int, entries: int | None = None, stores: int | None = None,
                reserve: int | None = None) -> Quota:
        """The defaults: an eighth of the capacity a uid, 16 stores a uid, a quarter kept back."""
        return cls(capacity // 8 if entries is None else entries, 16 if stores is None else stores,
                   capacity // 4 if reserve is None else reserve)


class Grants:
    """The grants of a table's entries and stores (only those not owned by the daemon's user alone),
    the log that keeps them, and who may do what."""

    def __init__(self, own_uid: int) -> None:
        self.own = own_uid
        self.grants: dict[Key, tuple[Identity, Grant]] = {}
        self.default = Grant(own_uid)  # the grant of every entry without a record
        self.by_owner: Counter[int] = Counter()  # records by owner
        self.keys_by_owner: dict[int, set[Key]] = {}  # the keys of those records, by owner
        self.shared: set[Key] = set()  # the keys shared with any uid or gid
        self.version = 0  # changes with every grant set or dropped (for caches of what ls shows)
        self.lines = 0  # lines in the log since it was last written whole

    # -- rules ----------------------------------------------------------------------------------
    def trusted(self, uid: int) -> bool:
        return uid == self.own or uid == 0

    def grant(self, key: Key) -> Grant:
        hit = self.grants.get(key)
        return hit[1] if hit is not None else self.default

    def may_read(self, who: Peer, key: Key) -> bool:
        if self.trusted(who.uid):
            return True
        g = self.grant(key)
        return who.uid == g.owner or who.uid in g.uids or bool(who.gids & g.gids)

    def may_change(self, who: Peer, key: Key) -> bool:
        return self.trusted(who.uid) or who.uid == self.grant(key).owner

    def check(self, who: Peer, key: Key, what: str, change: bool) -> None:
        """Denied unless `who` may read (or, with `change`, change) the entry or store at key."""
        if (self.may_change if change else self.may_read)(who, key):
            return
        g = self.grant(key)
        raise Denied(f"{user(who.uid)} may not {what}: it belongs to {user(g.owner)}"
                     + ("" if change or not (g.uids or g.gids) else ", who shares it with others only")
                     + "; only its owner, the daemon's user and root may change it"
                     + ("" if change else ", and only they and those it is shared with may read it")
                     + ("" if change else f" (its owner can share it: `cprd ctl share ... --uid {who.uid}`)"))

    # -- quotas ---------------------------------------------------------------------------------
    def check_room(self, uid: int, quota: Quota, capacity: int, adding: int, owned: int, stores: int,
                   others: int, new_store: bool = False) -> None:
        """CapacityError if uid, holding `owned` entries and `stores` stores while all uids but the
        trusted hold `others` entries, may not add `adding` entries (and a store, with
        `new_store`). The trusted are limited by the capacity alone (checked elsewhere)."""
        if self.trusted(uid):
            return
        if new_store and stores + 1 > quota.stores:
            raise CapacityError(f"{user(uid)} holds {stores} fd stores, its quota; remove one (`cprd ctl fdstore "
                                "APP --remove`) or ask the daemon's operator for more (--uid-max-stores)")
        if owned + adding > quota.entries:
            raise CapacityError(f"{user(uid)} holds {owned} entries (its stores' fds included) and may hold "
                                f"{quota.entries}; delete some or ask the daemon's operator for more "
                                "(--uid-max-entries)")
        if others + adding > capacity - quota.reserve:
            raise CapacityError(f"users other than the daemon's own and root hold {others} entries together, "
                                f"all they may: {quota.reserve} of the table's {capacity} are kept for the "
                                "daemon's user and root (--reserve); delete entries or ask its operator")

    # -- changes (each returns the log line to write first) -------------------------------------
    def _pop(self, key: Key) -> tuple[Identity, Grant] | None:
        """Take key's record out of the grants and of their indexes."""
        old = self.grants.pop(key, None)
        if old is not None:
            self.by_owner[old[1].owner] -= 1
            self.keys_by_owner[old[1].owner].discard(key)
            self.shared.discard(key)
        return old

    def _put(self, key: Key, rec: tuple[Identity, Grant]) -> None:
        self.grants[key] = rec
        self.by_owner[rec[1].owner] += 1
        self.keys_by_owner.setdefault(rec[1].owner, set()).add(key)
        if rec[1].uids or rec[1].gids:
            self.shared.add(key)

    def set(self, key: Key, ident: Identity, g: Grant) -> bytes:
        old = self._pop(key)
        self.version += 1
        if g.owner == self.own and not g.uids and not g.gids:
            return self._drop_line(key) if old is not None else b""
        self._put(key, (ident, g))
        self.lines += 1
        return (json.dumps({"k": list(key), "i": ident.to_json(), "o": g.owner, "u": sorted(g.uids),
                            "g": sorted(g.gids)}, separators=(",", ":")) + "\n").encode()

    def put_back(self, key: Key, before: tuple[Identity, Grant] | None) -> None:
        """key's record as it was before a change that could not be written."""
        self._pop(key)
        if before is not None:
            self._put(key, before)
        self.version += 1

    def drop(self, key: Key) -> bytes:
        if self._pop(key) is None:
            return b""
        self.version += 1
        return self._drop_line(key)

    def _drop_line(self, key: Key) -> bytes:
        self.lines += 1
        return (json.dumps({"k": list(key)}, separators=(",", ":")) + "\n").encode()

    def owned(self, uid: int) -> int:
        return self.by_owner[uid]

    def others(self) -> int:
        return sum(n for u, n in self.by_owner.items() if not self.trusted(u))

    def keys_of(self, who: Peer) -> Iterable[Key]:
        """The keys with a record that `who` may read: those it owns and those shared with it (for a
        list filtered to what it may see; O(its own and the shared ones), never the whole table)."""
        return [*self.keys_by_owner.get(who.uid, ()), *(k for k in self.shared if self.grant(k).owner != who.uid
                                                         and self.may_read(who, k))]

    # -- the log --------------------------------------------------------------------------------
    def compact(self) -> bytes:
        self.lines = len(self.grants)
        out = []
        for key, (ident, g) in sorted(self.grants.items()):
            out.append(json.dumps({"k": list(key), "i": ident.to_json(), "o": g.owner, "u": sorted(g.uids),
                                   "g": sorted(g.gids)}, separators=(",", ":")) + "\n")
        return "".join(out).encode()

    def wants_compaction(self) -> bool:
        return self.lines > 2 * len(self.grants) + 64

    def load(self, data: bytes, find: Callable[[Key], Identity | None]) -> int:
        """Replay the log; keep the grants whose key the table holds with the same identity
        (`find(key)` gives the entry's Identity or None). How many records were ignored."""
        replayed: dict[Key, tuple[Identity, Grant]] = {}
        for raw in data.split(b"\n"):
            if not raw:
                continue
            try:
                rec = json.loads(raw)
                name, id_ = rec["k"]
                if not isinstance(name, str) or not isinstance(id_, int):
                    continue
                if "o" not in rec:
                    replayed.pop((name, id_), None)
                    continue
                owner = rec["o"]
                uids, gids = rec.get("u", []), rec.get("g", [])
                if not isinstance(owner, int) or not all(isinstance(x, int) for x in [*uids, *gids]):
                    continue
                replayed[(name, id_)] = (Identity.from_json(rec["i"]), Grant(owner, frozenset(uids),
                                                                             frozenset(gids)))
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash, or not ours: ignored
                continue
        ignored = 0
        for key, (ident, g) in replayed.items():
            if find(key) != ident:
                ignored += 1
                continue
            self._put(key, (ident, g))
        self.version += 1
        self.lines = data.count(b"\n")
        return ignored
