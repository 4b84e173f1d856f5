"""The fd table: (name, id) -> Entry, with QEMU CPR's operation names.

Theory of operation
-------------------
QEMU's CPR keeps the fds a new process must inherit in a table keyed by (name, id) and finds
them with ``cpr_find_fd``. This module is that table, as a hash table: every operation is O(1)
except ``walk`` and iteration.

Ownership: a table owns the fds of its entries. ``save`` takes ownership of the fd only when it
succeeds; when it raises, the caller still owns the fd and must close it. ``delete`` and a
``save(..., replace=True)`` close the fd they drop (``fds.close_later``: in a daemon, on a closer
thread, since a client's fd may block its close). ``pop`` hands ownership back to the caller.

Journal: while a live handoff copies the table, ``start_journal`` returns a ``Journal`` to which
every mutation appends a typed op (``Saved(entry)`` or ``Removed(key)``), and the fds mutations
drop stay open in its graveyard instead of being closed, because a snapshot being sent may still
name them. ``stop_journal`` closes the graveyard.

What this module may know: fds as numbers it owns (it closes what it drops) and the Identity
record of ``kinds``. Nothing of sockets, trio or the wire format; it imports only ``kinds``,
``fds`` and ``errors``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .errors import BadKey, KeyExists, KeyMissing
from .fds import close_all_later, close_later
from .kinds import Identity

NAME_MAX_BYTES = 255
ID_MIN = -(2**31)
ID_MAX = 2**31 - 1
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # never in a name


class Entry(NamedTuple):
    """One table entry (immutable: a replace stores a new Entry)."""

    name: str
    id: int
    fd: int
    ident: Identity

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.id)

    def sort_key(self) -> tuple[str, int]:
        """The order `ctl ls` lists entries in: by name, then id."""
        return (self.name, self.id)

    def describe(self) -> dict:
        """The entry as plain data (what `ctl ls --json` and `ctl get --json` print)."""
        return {"name": self.name, "id": self.id, "fd": self.fd, **self.ident.describe()}


class Saved(NamedTuple):
    """A journal op: this entry was saved (new, or replacing what its key held)."""

    entry: Entry


class Removed(NamedTuple):
    """A journal op: the entry under this key was deleted."""

    key: tuple[str, int]


Op = Saved | Removed


class Journal:
    """What changed in a table since a live handoff took its snapshot, in order, and the fds the
    changes dropped (kept open until the handoff ends)."""

    __slots__ = ("ops", "graveyard")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.graveyard: list[int] = []

    def take(self) -> list[Op]:
        """The ops since the last take (and start a new list)."""
        ops, self.ops = self.ops, []
        return ops


def check_key(name: object, id: object) -> None:
    """Raise BadKey unless (name, id) follows the naming rules."""
    if not isinstance(name, str):
        raise BadKey(f"entry name must be a string, got {type(name).__name__}")
    n = len(name.encode("utf-8", "surrogatepass"))
    if n == 0 or n > NAME_MAX_BYTES:
        raise BadKey(
            f"entry name must be 1 to {NAME_MAX_BYTES} bytes of UTF-8, got {n} bytes; use a shorter name"
        )
    bad = CONTROL_CHARS.search(name)
    if bad:
        raise BadKey(
            f"entry name {name!r} contains control character {bad.group()!r} at {bad.start()};"
            " names may not contain NUL or control characters"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadKey(f"entry name {name!r} is not valid UTF-8 (lone surrogate); use valid text") from None
    if not isinstance(id, int) or isinstance(id, bool):
        raise BadKey(f"entry id must be an integer, got {type(id).__name__}")
    if not ID_MIN <= id <= ID_MAX:
        raise BadKey(f"entry id {id} is out of range: ids are signed 32-bit ({ID_MIN}..{ID_MAX})")


_HIDDEN = ("Cf", "Zl", "Zp")  # format (bidi controls, zero-width), line and paragraph separators


def check_new_name(name: str) -> None:
    """What `put` adds to the naming rules for a new entry: no character that reorders or hides text
    where a name is shown (U+202E RIGHT-TO-LEFT OVERRIDE, zero-width spaces...). Tables handed on by
    older versions may hold such names; they are kept, and shown escaped."""
    for i, ch in enumerate(name):
        if unicodedata.category(ch) in _HIDDEN:
            raise BadKey(f"entry name {name.encode('unicode_escape').decode('ascii')!r} contains U+{ord(ch):04X} "
                         f"({unicodedata.name(ch, 'unnamed')}) at {i}, which reorders or hides text where names are "
                         "shown; use visible characters")


class FdTable:
    """A hash table of fds keyed by (name, id). Not thread-safe; one owner task at a time."""

    __slots__ = ("_d", "journal", "version", "stream", "_kinds")

    def __init__(self) -> None:
        self._d: dict[tuple[str, int], Entry] = {}
        self.journal: Journal | None = None
        self.version = 0  # changes with every change of the entries (for caches of what they encode to)
        # Told of every save and pop as it happens, before the caller goes on (an upgrade's stand-in
        # copies each change to the new program: see daemon/standin.py). It must not raise.
        self.stream: Callable[[Op], None] | None = None
        self._kinds: Counter[str] | None = Counter()  # entries by kind; None: count again (after a bulk load)

    # -- journal (live handoff) -----------------------------------------------------------
    def start_journal(self) -> Journal:
        """Journal every mutation from now on (see the module docstring)."""
        assert self.journal is None, "one journal at a time"
        self.journal = Journal()
        return self.journal

    def stop_journal(self) -> None:
        """Stop journaling and close the fds mutations dropped meanwhile."""
        journal, self.journal = self.journal, None
        close_all_later(journal.graveyard if journal is not None else ())

    def _drop(self, fd: int) -> None:
        if self.journal is not None:
            self.journal.graveyard.append(fd)
        else:
            close_later(fd)

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._d.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._d

    # -- QEMU names ---------------------------------------------------------------------
    def save(self, name: str, id: int, fd: int, ident: Identity, *, replace: bool = False) -> Entry:
        """Store fd under (name, id). KeyExists if the key is taken, unless replace=True, which closes
        the old fd. Ownership of fd passes to the table only on success."""
        check_key(name, id)
        key = (name, id)
        old = self._d.get(key)
        if old is not None and not replace:
            raise KeyExists(
                f"key ({name!r}, {id}) already holds fd {old.fd} ({old.ident.kind.label});"
                " delete it first or save with replace"
            )
        entry = Entry(name, id, fd, ident)
        self._d[key] = entry
        self.version += 1
        if self._kinds is not None:
            self._kinds[ident.kind.label] += 1
            if old is not None:
                self._kinds[old.ident.kind.label] -= 1
        if self.journal is not None:
            self.journal.ops.append(Saved(entry))
        if self.stream is not None:
            self.stream(Saved(entry))
        if old is not None and old.fd != fd:
            self._drop(old.fd)
        return entry

    def absorb(self, entries: list[Entry]) -> Entry | None:
        """Insert entries whose keys the caller has already checked (a handoff's hot path). All or
        nothing: if a key is already present (or repeats), nothing is inserted and the first
        offending entry is returned; the caller still owns every fd then."""
        d = self._d
        keys = [(e[0], e[1]) for e in entries]
        self.version += 1
        self._kinds = None
        if len(set(keys)) == len(keys) and d.keys().isdisjoint(keys):  # the common case, in C loops
            d.update(zip(keys, entries))
            return None
        done = []
        for e in entries:
            k = (e.name, e.id)
            if k in d:
                for kk in done:
                    del d[kk]
                return e
            d[k] = e
            done.append(k)
        return None

    def bulk_dict(self) -> dict[tuple[str, int], Entry]:
        """The dict itself, for a bulk loader (a handoff's C receive path) that inserts Entry values
        under their (name, id) keys, all or nothing, checking keys as absorb does (or for measuring
        its size). Counts as a change of the table."""
        self.version += 1
        self._kinds = None
        return self._d

    def insert_unchecked_entry(self, name: str, id: int, fd: int, ident: Identity) -> None:
        """Insert an entry whose key the caller knows to be valid and new (restoring a saved table)."""
        self._d[(name, id)] = Entry(name, id, fd, ident)
        self.version += 1
        self._kinds = None

    def keys_with_prefix(self, prefix: str) -> list[tuple[str, int]]:
        """The keys whose name starts with prefix (a scan, in C: about 1 ms for 20,000 entries)."""
        return [k for k in self._d if k[0].startswith(prefix)]

    def find(self, name: str, id: int) -> Entry | None:
        """The entry for (name, id), or None. O(1)."""
        return self._d.get((name, id))

    def find_fd(self, name: str, id: int) -> int:
        """Like QEMU's cpr_find_fd: the fd, or -1 when absent."""
        e = self._d.get((name, id))
        return -1 if e is None else e.fd

    def resave(self, name: str, id: int, fd: int, ident: Identity) -> Entry:
        """Like cpr_resave_fd: save if absent; nothing if present with this fd; KeyExists if present
        with another fd."""
        e = self._d.get((name, id))
        if e is None:
            return self.save(name, id, fd, ident)
        if e.fd != fd:
            raise KeyExists(
                f"resave of ({name!r}, {id}) with fd {fd}, but the table holds fd {e.fd} for it;"
                " delete it first or save with replace"
            )
        return e

    def pop(self, name: str, id: int) -> Entry:
        """Remove (name, id) and hand its fd to the caller (who must close it; while a journal runs,
        the caller must not close it before stop_journal: use delete)."""
        try:
            e = self._d.pop((name, id))
        except KeyError:
            raise KeyMissing(f"no entry ({name!r}, {id}); list entries with `cprd ctl ls`") from None
        self.version += 1
        if self._kinds is not None:
            self._kinds[e.ident.kind.label] -= 1
        if self.journal is not None:
            self.journal.ops.append(Removed((name, id)))
        if self.stream is not None:
            self.stream(Removed((name, id)))
        return e

    def delete(self, name: str, id: int) -> None:
        """Remove (name, id) and close its fd (later, if a journal runs). KeyMissing if absent."""
        self._drop(self.pop(name, id).fd)

    def walk(self, fn: Callable[[Entry], object]) -> bool:
        """Call fn on each entry until it returns a true value (like cpr_walk_fd); return whether it
        stopped early."""
        for e in list(self._d.values()):
            if fn(e):
                return True
        return False

    # -- bulk ---------------------------------------------------------------------------
    def by_kind(self) -> dict[str, int]:
        """{kind: entries}: counted as entries come and go (once more after a bulk load)."""
        if self._kinds is None:
            self._kinds = Counter(e.ident.kind.label for e in self._d.values())
        return {k: n for k, n in self._kinds.items() if n}

    def fds(self) -> list[int]:
        return [e.fd for e in self._d.values()]

    def forget_all(self) -> None:
        """Empty the table without closing any fd (whoever else holds them will)."""
        self._d = {}
        self.version += 1
        self._kinds = Counter()

    def close_all(self) -> None:
        """Close every fd (and the graveyard) and empty the table."""
        self.stop_journal()
        entries, self._d = list(self._d.values()), {}
        self.version += 1
        self._kinds = Counter()
        close_all_later(e.fd for e in entries)
