"""What a program started by `cprd run` or `cprd serve` gets: its app's stored fds (listeners
made first when missing), placed where its dialect wants them, and the environment that names them.

Theory of operation
-------------------
`gather` opens the app's store (made on first use), makes each `--listen` listener the store does
not hold yet (with the caller's rights: see listeners.py) and returns every fd the store holds,
newest first, as systemd hands them. `Plan` then says, for one dialect, which fd goes to which
number and which variables to set:

| dialect | fds | variables |
|---|---|---|
| systemd (default) | every stored fd at 3, 4, ... | LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID |
| nginx | the same | the same, and NGINX="3;4;" naming the listeners |
| stdin | the one listener at fd 0 (inetd's "wait" style) | none of the LISTEN_* |
| fds | every stored fd at 3, 4, ... | none of the LISTEN_*: the command names them ({fd:NAME}) |

In every dialect `{fd:NAME}` in the command's arguments becomes the number of the fd named NAME
(uvicorn's `--fd {fd:http}`, which ignores LISTEN_FDS; gunicorn's `--bind fd://{fd:http}` needs the fds
dialect: told of fd 3 by LISTEN_FDS too, gunicorn adopts it twice and fails with EBADF; in the systemd
dialect gunicorn needs no --bind at all), NOTIFY_SOCKET is the app's notify
socket and FDSTORE its limit. LISTEN_PID must be the program's own pid: `cprd run` execs in place
(its pid is the program's); `cprd serve` spawns through `/bin/sh -c 'LISTEN_PID=$$ exec "$@"'`.

What this module may know: the client, listeners, fd numbers, the environment. No trio.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from dataclasses import dataclass, field

from . import listeners
from .errors import UsageError
from .listeners import Listen

DIALECTS = ("systemd", "nginx", "stdin", "fds")
_SUBST = re.compile(r"\{fd:([^{}]*)\}")


@dataclass(slots=True)
class Gathered:
    info: dict  # the store: socket, max, fdnames
    fds: list[int]  # owned: every stored fd, newest first
    names: list[str]
    made: list[str] = field(default_factory=list)  # the listeners made now

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def gather(c, app: str, listens: list[Listen], replace: bool, fdstore_max: int | None) -> Gathered:
    """The app's stored fds, with every listener of `listens` in them (made when missing, or when
    `replace` and the stored one does not match its spec)."""
    info, fds = c.fdstore_open(app, fdstore_max)
    g = Gathered(info, fds, list(info["fdnames"]))
    try:
        stale: list[str] = []
        for li in listens:
            at = [i for i, n in enumerate(g.names) if n == li.name]
            if len(at) == 1:
                listeners.restore(li)  # its path, if the last program removed it
            why = listeners.mismatch(g.fds[at[0]], li) if len(at) == 1 else (
                f"{len(at)} fds are stored under that name" if at else None)
            if at and why is None:
                listeners.relisten(g.fds[at[0]], li)
                continue
            if at and not replace:
                raise UsageError(f"listener {li.name}: the socket stored for it does not match {li.spec}: {why}. "
                                 "Fix the spec, or run again with --replace-listeners to make a new one (the "
                                 "connections waiting in the old one's backlog are then lost)")
            if at:
                stale.append(li.name)
            g.made.append(li.name)
        if not g.made:
            return g
        g.close()  # our copies of the old listeners go: a port is free again once the daemon closed its copy
        for name in stale:
            listeners.remove(info["socket"], name)
        for li in listens:
            if li.name in g.made:
                sock = listeners.make(li)
                try:
                    listeners.store(info["socket"], li, sock)
                finally:
                    sock.close()
        info, fds = c.fdstore_open(app, fdstore_max)
        g.info, g.fds, g.names = info, fds, list(info["fdnames"])
        return g
    except BaseException:
        g.close()
        raise


@dataclass(slots=True)
class Plan:
    moves: list[tuple[int, int]]  # (fd now, the number the program gets it at)
    env: dict[str, str]
    cmd: list[str]
    needs_pid: bool  # LISTEN_PID must be set to the program's pid


def plan(g: Gathered, cmd: list[str], dialect: str, listens: list[Listen], base_env: dict[str, str]) -> Plan:
    if dialect not in DIALECTS:
        raise UsageError(f"--dialect {dialect!r} is not one of {', '.join(DIALECTS)}")
    env = dict(base_env, NOTIFY_SOCKET=g.info["socket"], FDSTORE=str(g.info["max"]))
    for var in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "NGINX"):
        env.pop(var, None)
    if dialect == "stdin":
        wanted = [li.name for li in listens] or g.names
        if len(wanted) != 1 or g.names.count(wanted[0]) != 1:
            raise UsageError("--dialect stdin hands one listener to the program as its fd 0: give exactly one "
                             f"--listen (the store holds {len(g.names)} fds)")
        at = {wanted[0]: 0}
        moves = [(g.fds[g.names.index(wanted[0])], 0)]
        return Plan(moves, env, _substitute(cmd, at), False)
    moves = [(fd, 3 + i) for i, fd in enumerate(g.fds)]
    at = {}
    for i, n in enumerate(g.names):
        at[n] = -1 if n in at else 3 + i  # -1: the name is not unique
    if g.fds and dialect != "fds":
        env.update(LISTEN_FDS=str(len(g.fds)), LISTEN_FDNAMES=":".join(g.names))
    if dialect == "nginx":
        socks = sorted(3 + g.names.index(li.name) for li in listens) or [
            3 + i for i, fd in enumerate(g.fds) if _is_listener(fd)]
        env["NGINX"] = "".join(f"{n};" for n in socks)
    return Plan(moves, env, _substitute(cmd, at), bool(g.fds) and dialect != "fds")


def _is_listener(fd: int) -> bool:
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        s.detach()


def _substitute(cmd: list[str], at: dict[str, int]) -> list[str]:
    def one(m: re.Match) -> str:
        n = at.get(m.group(1))
        if n is None:
            raise UsageError(f"{m.group(0)} in the command names no stored fd; the store holds: "
                             f"{', '.join(sorted(at)) or 'nothing'} (add --listen {m.group(1)}=SPEC?)")
        if n < 0:
            raise UsageError(f"{m.group(0)}: several stored fds have that name; remove the extra ones "
                             "(cprd ctl fdstore APP) or use another name")
        return str(n)

    return [_SUBST.sub(one, arg) for arg in cmd]


def spread_out(p: Plan) -> None:
    """Move every fd of `p` above the numbers it goes to (close-on-exec), so that placing one never
    overwrites another that is still to be placed."""
    top = max([n for _, n in p.moves], default=2) + 1
    moved = []
    for fd, n in p.moves:
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(top, 10))
        moved.append((new, n))
    p.moves = moved


def place_here(p: Plan) -> None:
    """For an exec in this process: each fd at its number (inheritable), every other fd above 2
    closed, as under systemd."""
    if p.moves and p.moves[0][1] == 0:  # stdin
        os.dup2(p.moves[0][0], 0, inheritable=True)
        os.closerange(3, 1 << 20)
        return
    fds = [fd for fd, _ in p.moves]
    _place(fds)
    os.closerange(3 + len(fds), 1 << 20)


def _place(fds: list[int]) -> None:
    """Move fds[i] to fd 3 + i (inheritable), using at most one more fd than there are: an fd that
    sits where another must go is moved out of the way first."""
    where = {fd: i for i, fd in enumerate(fds)}  # fd -> the index it must go to
    for i in range(len(fds)):
        want, fd = 3 + i, fds[i]
        if fd != want:
            j = where.get(want)
            if j is not None:  # fds[j] occupies our place: move it to the lowest free fd
                moved = fcntl.fcntl(want, fcntl.F_DUPFD_CLOEXEC, 3)
                os.close(want)
                del where[want]
                fds[j], where[moved] = moved, j
            os.dup2(fd, want, inheritable=True)
            os.close(fd)
            del where[fd]
            fds[i], where[want] = want, i
        else:
            os.set_inheritable(want, True)
