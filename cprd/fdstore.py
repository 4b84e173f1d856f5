"""systemd's fd store protocol, spoken by cprd: the rules, with no I/O but what an fd comparison needs.

Theory of operation
-------------------
A program stores fds the systemd way: one datagram on $NOTIFY_SOCKET of ``KEY=VALUE`` lines
(``FDSTORE=1``, ``FDNAME=...``) with the fds attached (SCM_RIGHTS), and gets them back at its
next start as fds 3, 4, ... with $LISTEN_FDS, $LISTEN_FDNAMES and $LISTEN_PID. cprd keeps one
store per *app*, a name `cprd run --name APP` gives. The rules below are systemd's (the source
lines each comes from are cited in docs/fdstore.md):

- ``parse``: a datagram of more than 4096 bytes or whose fds the kernel truncated (MSG_TRUNC,
  MSG_CTRUNC), one without the sender's credentials, or with a NUL before its last byte is
  dropped, and every fd it carried closed. The text is split into lines ("tags").
- ``decide``: ``BARRIER=1`` (which must be the only tag, with exactly one fd) makes the fd be
  closed and nothing else done: once every earlier datagram has been handled, which is what the
  sender waits for. ``FDSTOREREMOVE=1`` with a valid ``FDNAME=`` removes (and closes) every stored
  fd of that name; it takes precedence over ``FDSTORE=1``, which stores each attached fd under the
  first ``FDNAME=`` if valid, else under "stored", polled for hang-up unless ``FDPOLL=0``. Fds
  that come without ``FDSTORE=1`` are closed. ``STATUS=`` is kept to show; every other tag is
  accepted and ignored.
- ``same_fd``: an fd that is the same open file description as one the app stored already is not
  stored again (F_DUPFD_QUERY, else kcmp, else same inode and open flags, never for devices).
- Over the app's limit, fds are closed with a warning.
- Stored fds are handed back newest first (systemd prepends each to its list).

Where a store lives: in the daemon's table, so that it moves with every handoff and survives
every upgrade like any entry. For app A: the notify socket is entry ("fdstore/A", -1), a memfd
with the names, FDPOLL choices, limit and status (an append-only log: ``Log``) is ("fdstore/A",
-2), and each stored fd is ("fdstore/A", n), n = 0, 1, ... in the order stored. The first two are
the store's own: never handed out.

What this module may know: strings, fds as numbers to compare. Nothing of sockets or the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import stat
from dataclasses import dataclass, field

from . import proc
from .errors import UsageError

PREFIX = "fdstore/"
NOTIFY_ID, NAMES_ID = -1, -2  # the entries of an app's notify socket and of its names
NOTIFY_BUFFER_MAX = 4096  # systemd's: a datagram of this size or more is dropped
DEFAULT_MAX = 1024
MAX_LIMIT = 65536  # cprd's cap on an app's limit (systemd has none but its own fd limit)
FDNAME_MAX = 255
# The bytes of an app's fd names together (LISTEN_FDNAMES's value, a colon after each): one string of
# the environment may be at most MAX_ARG_STRLEN (32 pages, 131,072 bytes) or exec fails (E2BIG); a
# store keeps 4 KiB of that free and refuses, at store time, an fd whose name would not fit.
FDNAMES_MAX = 131072 - 4096
APP_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
_F_DUPFD_QUERY = 1027  # Linux 6.10 (fcntl.h: F_LINUX_SPECIFIC_BASE + 3)


def check_app(app: str) -> str:
    """UsageError unless `app` is a name cprd can keep a store under: an fdname (systemd's rule)
    that is also a file name and fits cprd's paths and entry names: 1..64 of [A-Za-z0-9_.@-], not
    starting with '.' or '-'."""
    if not isinstance(app, str) or not APP_RE.fullmatch(app):
        raise UsageError(f"app name {app!r} must be 1 to 64 characters of letters, digits, '_', '.', '@' or '-', "
                         "not starting with '.', '-' or '@'")
    return app


def entry_name(app: str) -> str:
    return PREFIX + app


def app_of(name: str) -> str | None:
    """The app an entry of this name belongs to, or None."""
    return name[len(PREFIX):] if name.startswith(PREFIX) and APP_RE.fullmatch(name[len(PREFIX):]) else None


def fdname_is_valid(name: str) -> bool:
    """systemd's fdname_is_valid: ASCII without control characters or ':', at most 255 characters
    (the empty name is allowed)."""
    return len(name) <= FDNAME_MAX and all(" " <= c < "\x7f" and c != ":" for c in name)


# -- one datagram ------------------------------------------------------------------------------
@dataclass(slots=True)
class Notice:
    tags: list[str]

    def first(self, prefix: str) -> str | None:
        """The value of the first tag that starts with prefix (systemd's strv_find_startswith)."""
        for t in self.tags:
            if t.startswith(prefix):
                return t[len(prefix):]
        return None

    def has(self, tag: str) -> bool:
        return tag in self.tags


def parse(data: bytes, msg_flags: int, pid: int | None) -> Notice | str:
    """The tags of one datagram, or why it is dropped (its fds must then be closed)."""
    if msg_flags & socket.MSG_CTRUNC:
        return "truncated control data (too many fds sent?)"
    if pid is None or pid <= 0:
        return "no valid credentials"
    if len(data) > NOTIFY_BUFFER_MAX or msg_flags & socket.MSG_TRUNC:
        return f"over the maximum size ({NOTIFY_BUFFER_MAX} bytes)"
    if len(data) > 1 and b"\0" in data[:-1]:
        return "embedded NUL bytes"
    text = data.rstrip(b"\0").decode("latin-1")
    return Notice([t for t in re.split(r"[\n\r]", text) if t])  # systemd's strv_split_newlines


@dataclass(slots=True)
class Decision:
    """What to do with a datagram's fds and the app's store."""

    barrier: bool = False  # close the fds (the sender waits for that), nothing else
    remove: str | None = None  # close every stored fd of this name
    store: bool = False  # store the fds under `name`
    name: str = "stored"
    poll: bool = True
    status: str | None = None
    ready: bool = False  # READY=1: a generation of `cprd serve` may be waiting for it
    warnings: list[str] = field(default_factory=list)


def decide(n: Notice, nfds: int) -> Decision:
    if n.has("BARRIER=1"):
        d = Decision(barrier=True)
        if len(n.tags) != 1:
            d.warnings.append("extra notification tags sent with BARRIER=1, ignoring everything")
        elif nfds != 1:
            d.warnings.append(f"BARRIER=1 with {nfds} fds instead of 1, closing them")
        return d
    d = Decision(status=n.first("STATUS="), ready=n.has("READY=1"))
    if d.status is not None:  # the text was decoded byte for byte: STATUS= must be UTF-8, as systemd wants
        try:
            d.status = d.status.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            d.warnings.append("STATUS= is not UTF-8, ignoring it")
            d.status = None
    if n.has("FDSTOREREMOVE=1"):
        name = n.first("FDNAME=")
        if name is None or not fdname_is_valid(name):
            d.warnings.append("FDSTOREREMOVE=1 without a valid FDNAME=, ignoring")
        else:
            d.remove = name
    elif n.has("FDSTORE=1"):
        name = n.first("FDNAME=")
        if name is not None and not fdname_is_valid(name):
            d.warnings.append(f"FDNAME={name[:64]!r} is not a valid fd name, storing as 'stored'")
            name = None
        d.store, d.name, d.poll = True, "stored" if name is None else name, not n.has("FDPOLL=0")
    if nfds and not d.store:
        d.warnings.append(f"{nfds} fds sent without FDSTORE=1, closing them")
    return d


# -- the same open file description ----------------------------------------------------------------
def _kcmp_file(a: int, b: int) -> int:
    """kcmp(KCMP_FILE) of fds a and b of this process (proc.kcmp_file)."""
    return proc.kcmp_file(os.getpid(), a, os.getpid(), b)


def file_order(a: int, b: int) -> int | None:
    """The order kcmp gives the open file descriptions of fds a and b: 0 the same, -1 a's first,
    1 b's first (an order that holds while this kernel runs), or None where it gives none."""
    return {0: 0, 1: -1, 2: 1}.get(_kcmp_file(a, b))


def same_fd(a: int, b: int) -> bool:
    """Whether fds a and b of this process are the same open file description (systemd's same_fd:
    F_DUPFD_QUERY, else kcmp, else the same inode and open flags, and never for a device)."""
    if a == b:
        return True
    try:
        return fcntl.fcntl(a, _F_DUPFD_QUERY, b) == 1
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    r = _kcmp_file(a, b)
    if r >= 0:
        return r == 0
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino) or stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return False
    return fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)


# -- what an app's store keeps besides its fds -----------------------------------------------------
@dataclass(slots=True)
class Meta:
    """An app's limit, its last STATUS=, and for each stored fd (by id) its name and whether it is
    polled."""

    max: int = DEFAULT_MAX
    path: str = ""  # where its notify socket is (not kept in the log: it follows from the control path)
    names: dict[int, tuple[str, bool]] = field(default_factory=dict)
    status: str | None = None
    serve: dict | None = None  # its supervisor's token, pid and generations (durable_report)


class Log:
    """The append-only text a store's names memfd holds, a line each: ``M max``, ``S id poll name``,
    ``R id``, ``T "status"``, ``V {supervisor}`` (JSON, ASCII). Replaying it gives the Meta; it is
    written again compactly when mostly obsolete. Every line is checked as it is replayed (the memfd
    is shared with whoever held a copy of it): a line that breaks the rules, or was cut short by a crash, is ignored."""

    @staticmethod
    def line_max(n: int) -> bytes:
        return f"M {n}\n".encode()

    @staticmethod
    def line_store(id_: int, poll: bool, name: str) -> bytes:
        return f"S {id_} {int(poll)} {name}\n".encode("ascii")

    @staticmethod
    def line_remove(id_: int) -> bytes:
        return f"R {id_}\n".encode()

    @staticmethod
    def line_status(status: str | None) -> bytes:
        return b"T " + json.dumps(status).encode() + b"\n"

    @staticmethod
    def line_serve(record: dict) -> bytes:
        return b"V " + json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"

    @staticmethod
    def replay(data: bytes) -> tuple[Meta, int]:
        """The Meta the log describes, and how many lines it has."""
        meta, lines = Meta(), 0
        for raw in data.split(b"\n"):
            lines += 1
            try:
                kind, _, rest = raw.decode("ascii").partition(" ")
                if kind == "M":
                    n = int(rest)
                    if 0 <= n <= MAX_LIMIT:
                        meta.max = n
                elif kind == "S":
                    id_, poll, name = rest.split(" ", 2)
                    if int(id_) >= 0 and poll in ("0", "1") and fdname_is_valid(name):
                        meta.names[int(id_)] = (name, poll == "1")
                elif kind == "R":
                    meta.names.pop(int(rest), None)
                elif kind == "T":
                    status = json.loads(rest)
                    if status is None or isinstance(status, str):
                        meta.status = status
                elif kind == "V":
                    meta.serve = durable_report(check_report(rest, durable=True))
            except (ValueError, UsageError):  # UnicodeDecodeError and JSONDecodeError too: the line is ignored
                continue
        return meta, lines

    @staticmethod
    def compact(meta: Meta) -> bytes:
        return (Log.line_max(meta.max) + (Log.line_status(meta.status) if meta.status is not None else b"")
                + (Log.line_serve(meta.serve) if meta.serve is not None else b"")
                + b"".join(Log.line_store(i, p, n) for i, (n, p) in sorted(meta.names.items())))


# -- the supervisor of an app (`cprd serve`) ---------------------------------------------------------
SUPERVISOR_STALE_S = 3.0  # a supervisor not heard from for this long is gone (or stopped): another may take over
GEN_STATES = ("starting", "ready", "stopping", "exited", "adopted")
_GEN_KEYS = {"gen": int, "pid": int, "ticks": int, "started": float, "ready": bool, "state": str}


def check_report(text: str, durable: bool = False) -> dict:
    """A supervisor's report (JSON): {token, pid, generations: [{gen, pid, started, ready, state}],
    restarts_done, results: [{id, ...} of the last restarts]}; a UsageError says what is wrong.
    Kept in memory, shown by status."""
    try:
        r = json.loads(text)
    except (ValueError, RecursionError):
        raise UsageError("fdstore serve: the report is not JSON") from None
    if not isinstance(r, dict) or not isinstance(r.get("token"), str) or not 8 <= len(r["token"]) <= 64:
        raise UsageError("fdstore serve: the report needs a token of 8 to 64 characters")
    if durable:  # a line of the store's log: durable_report's keys
        r = {**r, "restarts_done": 0}
    if not isinstance(r.get("pid"), int) or not isinstance(r.get("restarts_done"), int):
        raise UsageError("fdstore serve: the report needs pid and restarts_done (integers)")
    gens = r.get("generations")
    if not isinstance(gens, list) or len(gens) > 16:
        raise UsageError("fdstore serve: the report needs generations, a list of at most 16")
    for g in gens:
        if not isinstance(g, dict) or set(g) != set(_GEN_KEYS) or not all(
                isinstance(g[k], t) or (t is float and isinstance(g[k], int)) for k, t in _GEN_KEYS.items()):
            raise UsageError(f"fdstore serve: a generation must have exactly {', '.join(_GEN_KEYS)}")
        if g["state"] not in GEN_STATES:
            raise UsageError(f"fdstore serve: a generation's state is one of {', '.join(GEN_STATES)}")
    results = r.get("results", [])
    if not isinstance(results, list) or len(results) > 8 or len(json.dumps(results)) > 4096 or not all(
            isinstance(x, dict) and isinstance(x.get("id"), str) for x in results):
        raise UsageError("fdstore serve: results must be a list of at most 8 objects with an id (4096 bytes)")
    return {"token": r["token"], "pid": r["pid"], "generations": gens, "restarts_done": r["restarts_done"],
            "results": results}


def durable_report(report: dict) -> dict:
    """What of a supervisor's report the store's log keeps, so that it travels with the table (a
    handoff, an upgrade): who it is and its generations, for a later `cprd serve` to take over the
    generations of one that died meanwhile. Restarts and results are of the moment, not kept."""
    return {"token": report["token"], "pid": report["pid"], "generations": report["generations"]}
