"""Listeners cprd makes and keeps for servers that never heard of it: `--listen NAME=SPEC`.

Theory of operation
-------------------
A listener is a socket stored in an app's fd store under its NAME, like any fd the app stored
itself. The first `cprd run`/`cprd serve` that asks for NAME makes it; every later one finds it
in the store and hands the very same socket (same inode, same accept queue) to the program. So
connections that arrive while no program accepts (between two generations, during a crash, a
cprd handoff or upgrade) wait in the backlog instead of being refused.

The socket is made by the process that asks (`cprd run`, `cprd serve`), never by the daemon: it
binds with that user's own rights, so a uid that could not bind a privileged port or a path in a
directory it cannot write cannot get cprd to do it either. Then it is stored the systemd way
(`FDSTORE=1`, `FDNAME=NAME` on the store's notify socket) and confirmed with `BARRIER=1`.

SPEC: ``tcp:HOST:PORT``, ``tcp:[V6]:PORT``, ``udp:HOST:PORT``, ``unix:/PATH``, followed by
comma-separated options: ``backlog=N`` (default: as large as the system allows, its somaxconn),
``reuseport``, ``v6only=0|1``, for tcp ``nodelay`` (TCP_NODELAY on the listener, which the connections
it accepts inherit: systemd's NoDelay=; for a server that never sets it itself, as uvicorn --fd), and for
unix sockets ``mode=0660``, ``owner=USER``, ``group=GROUP``.

A unix listener's file gets a second name beside it, `.NAME.cprd` for `NAME` (a hard link, made with
the same rights right after bind). Servers that did not make the socket remove its path anyway when
they stop (nginx after its parent changed, gunicorn given `--bind fd://N`): without the path nobody can
connect, though the socket still listens in cprd. `restore` makes the path again from the second name
(`cprd run` before it starts the program; `cprd serve` as soon as the path goes, watching the
directory with inotify). The second name is trusted only when it is a socket file owned by whoever
owns the listener's file: whoever may replace it in that directory may replace the path itself too.

A listener found in the store is checked against its SPEC (family, type, listening, address);
a changed SPEC is an error unless the caller asks to replace it. `backlog` and `nodelay` are applied
again on every start (listen(2) on a listening socket changes its backlog; a socket option can be set
at any time), so adding them to a kept listener needs no new socket.

What this module may know: sockets, users and groups, files. No trio, no control protocol.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import ipaddress
import logging
import os
import pwd
import re
import select
import socket
import stat
from dataclasses import dataclass

from .errors import UsageError
from .fdstore import fdname_is_valid
from .paths import max_backlog

log = logging.getLogger("cprd.listeners")

KINDS = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM, "unix": socket.SOCK_STREAM}
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(slots=True, frozen=True)
class Listen:
    name: str
    kind: str  # tcp, udp, unix
    host: str = ""  # tcp/udp: the address as written (brackets removed)
    port: int = 0
    path: str = ""  # unix
    backlog: int | None = None
    reuseport: bool = False
    v6only: bool | None = None
    nodelay: bool = False
    mode: int | None = None
    owner: str | None = None
    group: str | None = None

    @property
    def family(self) -> int:
        if self.kind == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def spec(self) -> str:
        where = self.path if self.kind == "unix" else (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{self.kind}:{where}" + ("" if self.kind == "unix" else f":{self.port}")

    def address(self) -> str | tuple:
        return self.path if self.kind == "unix" else (self.host, self.port)


def parse(text: str) -> Listen:
    """`NAME=SPEC[,option...]`, or a UsageError that says what is wrong."""
    name, eq, rest = text.partition("=")
    if not eq or not rest:
        raise UsageError(f"--listen {text!r}: expected NAME=SPEC, e.g. http=tcp:127.0.0.1:8080")
    if not _NAME.match(name) or not fdname_is_valid(name):
        raise UsageError(f"--listen {text!r}: NAME {name!r} must be 1 to 64 letters, digits, '_', '.', '@', '-'")
    where, *options = rest.split(",")
    kind, colon, addr = where.partition(":")
    if kind not in KINDS or not colon or not addr:
        raise UsageError(f"--listen {text!r}: SPEC {where!r} must be tcp:HOST:PORT, udp:HOST:PORT or unix:/PATH")
    kw: dict = {}
    if kind == "unix":
        if not addr.startswith("/") or "\0" in addr or len(addr.encode()) > 107:
            raise UsageError(f"--listen {text!r}: a unix socket's path must be absolute and at most 107 bytes")
        kw["path"] = os.path.normpath(addr)
    else:
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", addr)
        if not m:
            raise UsageError(f"--listen {text!r}: {addr!r} is not HOST:PORT or [IPV6]:PORT")
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"--listen {text!r}: {host!r} is not an IP address (names are not resolved)") from None
        if int(port) > 65535:
            raise UsageError(f"--listen {text!r}: port {port} is over 65535")
        kw.update(host=str(ip), port=int(port))
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "backlog" and value.isdigit() and 1 <= int(value) <= 1 << 20:
            kw["backlog"] = int(value)
        elif key == "reuseport" and value in ("", "1", "0"):
            kw["reuseport"] = value != "0"
        elif key == "v6only" and value in ("0", "1") and kind != "unix":
            kw["v6only"] = value == "1"
        elif key == "nodelay" and value in ("", "1", "0") and kind == "tcp":
            kw["nodelay"] = value != "0"
        elif key == "mode" and kind == "unix" and re.fullmatch(r"0?[0-7]{3}", value):
            kw["mode"] = int(value, 8)
        elif key in ("owner", "group") and kind == "unix" and value:
            kw[key] = value
        else:
            raise UsageError(f"--listen {text!r}: option {opt!r} is not one of backlog=N, reuseport, v6only=0|1"
                             + (", nodelay" if kind == "tcp" else "")
                             + (", mode=0NNN, owner=USER, group=GROUP" if kind == "unix" else ""))
    if kind == "udp" and "backlog" in kw:
        raise UsageError(f"--listen {text!r}: a udp socket has no backlog")
    return Listen(name, kind, **kw)


def parse_all(texts: list[str]) -> list[Listen]:
    out = [parse(t) for t in texts]
    names = [li.name for li in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"--listen names a listener twice: {', '.join(sorted(dup))}")
    return out


def make(li: Listen) -> socket.socket:
    """A new socket for `li`, bound and listening, made with this process's own rights."""
    s = socket.socket(li.family, KINDS[li.kind])
    try:
        if li.kind != "unix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if li.reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if li.family == socket.AF_INET6 and li.v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(li.v6only))
        if li.kind == "unix":
            _clear_stale(li)
        try:
            s.bind(li.address())
        except OSError as e:
            raise UsageError(f"listener {li.name}: cannot bind {li.spec}: {_why(e, li)}") from None
        if li.kind == "unix":
            _set_file(li)
            _keep(li)
        if li.nodelay:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if li.kind != "udp":
            s.listen(li.backlog or max_backlog())
        return s
    except BaseException:
        s.close()
        raise


def _why(e: OSError, li: Listen) -> str:
    if e.errno == errno.EACCES:
        if li.kind == "unix":
            return "permission denied: you cannot create a file in its directory (cprd binds with your rights)"
        return (f"permission denied: port {li.port} is privileged and you may not bind it "
                "(cprd binds with your rights)")
    if e.errno == errno.EADDRINUSE:
        return "the address is in use by another socket (stop what listens there, or pick another address)"
    if e.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address"
    if e.errno == errno.ENOENT:
        return "its directory does not exist"
    return e.strerror or str(e)


def _clear_stale(li: Listen) -> None:
    """A socket file nobody listens on any more (left by a crash) is removed; anything else in the
    way is an error. lstat: a symlink at the path is never followed, never removed."""
    try:
        st = os.lstat(li.path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"listener {li.name}: cannot look at {li.path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"listener {li.name}: {li.path} exists and is not a socket; remove it or pick another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(li.path)
    except ConnectionRefusedError:
        try:
            os.unlink(li.path)  # stale; removed with our rights (a file we may not remove stays and bind says so)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UsageError(f"listener {li.name}: cannot remove the stale socket {li.path}: {e.strerror}") from None
        return
    except OSError:
        return  # bind will say what is wrong
    finally:
        probe.close()
    raise UsageError(f"listener {li.name}: something already listens on {li.path}; stop it or pick another path")


def _set_file(li: Listen) -> None:
    try:
        uid = -1 if li.owner is None else _uid(li.owner)
        gid = -1 if li.group is None else _gid(li.group)
        if uid != -1 or gid != -1:
            os.chown(li.path, uid, gid, follow_symlinks=False)
        if li.mode is not None:
            os.chmod(li.path, li.mode)  # the path is the socket bind just made (no symlink can stand there)
    except OSError as e:
        try:
            os.unlink(li.path)
        except OSError:
            pass
        raise UsageError(f"listener {li.name}: cannot set the owner or mode of {li.path}: {e.strerror} "
                         "(only root may give a file to another user; a group must be one of yours)") from None


def kept_path(li: Listen) -> str:
    """The second name of a unix listener's file, from which its path is made again."""
    head, tail = os.path.split(li.path)
    return os.path.join(head, f".{tail}.cprd")


def _keep(li: Listen) -> None:
    keep = kept_path(li)
    try:
        if stat.S_ISSOCK(os.lstat(keep).st_mode):
            os.unlink(keep)  # left by an earlier listener at this path (its socket is gone: bind succeeded)
    except OSError:
        pass
    try:
        os.link(li.path, keep)
    except OSError as e:
        log.warning("event=listener_not_kept name=%s path=%s error=%r: if a server removes the path, nobody can "
                    "connect until the listener is made again", li.name, keep, e.strerror)


def restore(li: Listen) -> bool:
    """Make a unix listener's path again from its second name if a server removed it. True if made."""
    if li.kind != "unix":
        return False
    try:
        os.lstat(li.path)
        return False  # there (whatever it is: mismatch says if it is not ours)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(kept_path(li))
        owner = os.geteuid() if li.owner is None else _uid(li.owner)
    except (OSError, UsageError):
        return False
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != owner:
        return False
    try:
        os.link(kept_path(li), li.path)  # link(2) never follows the old name if it is a symlink
    except OSError:
        return False  # made by someone meanwhile, or we may not: mismatch reports it
    log.warning("event=listener_path_restored name=%s path=%s: a server removed it", li.name, li.path)
    return True


class PathWatch:
    """inotify on the directories of unix listeners: readable when a name in one of them goes."""

    _IN_DELETE, _IN_MOVED_FROM = 0x200, 0x40

    def __init__(self, lis: list[Listen]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        try:
            for d in sorted({os.path.dirname(li.path) for li in lis if li.kind == "unix"}):
                if libc.inotify_add_watch(self.fd, os.fsencode(d), self._IN_DELETE | self._IN_MOVED_FROM) < 0:
                    raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
        except BaseException:
            os.close(self.fd)
            raise

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def _uid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
    except KeyError:
        raise UsageError(f"owner {name!r}: no such user") from None


def _gid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise UsageError(f"group {name!r}: no such group") from None


def mismatch(fd: int, li: Listen) -> str | None:
    """Why the stored socket `fd` is not what `li` asks for, or None when it is."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        return f"it cannot be inspected ({e.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        return "the fd stored under that name is not a socket"
    s = socket.socket(fileno=fd)  # borrowed: detached, never closed
    try:
        if s.family != li.family or s.type != KINDS[li.kind]:
            return f"it is a {s.family.name}/{s.type.name} socket, the spec asks for {li.spec}"
        if li.kind != "udp" and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "it no longer listens"
        name = s.getsockname()
        if li.kind == "unix":
            bound = name if isinstance(name, str) else name.decode(errors="replace")
            if bound != li.path:
                return f"it is bound to {bound}, the spec asks for {li.path}"
            try:
                if not stat.S_ISSOCK(os.lstat(li.path).st_mode):
                    return f"{li.path} is no longer a socket file"
            except FileNotFoundError:
                return f"its file {li.path} was removed: nobody can connect to it"
        else:
            host, port = name[0], name[1]
            if ipaddress.ip_address(host.split("%")[0]) != ipaddress.ip_address(li.host) or (
                    li.port and port != li.port):
                return f"it is bound to {host}:{port}, the spec asks for {li.spec}"
            if li.reuseport != bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)):
                return "its reuseport differs from the spec's"
            if li.family == socket.AF_INET6 and li.v6only is not None and li.v6only != bool(
                    s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)):
                return "its v6only differs from the spec's"
        return None
    finally:
        s.detach()


def relisten(fd: int, li: Listen) -> None:
    """Apply the spec's backlog again (listen(2) on a listening socket only changes its backlog), and
    its nodelay (never cleared: a kept listener without it in the spec keeps what it has)."""
    if li.kind != "udp":
        s = socket.socket(fileno=fd)
        try:
            if li.nodelay:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.listen(li.backlog or max_backlog())
        finally:
            s.detach()


def remove(notify_socket: str, name: str, timeout: float = 10.0) -> None:
    """FDSTOREREMOVE=1 for `name`, confirmed by a barrier: the daemon closed its copies."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(notify_socket)
            s.send(f"FDSTOREREMOVE=1\nFDNAME={name}".encode())
            barrier(s, timeout)
        except (OSError, TimeoutError) as e:
            raise UsageError(f"listener {name}: cannot remove it from the app's store at {notify_socket}: "
                             f"{getattr(e, 'strerror', None) or e}; is the daemon serving?") from None


def store(notify_socket: str, li: Listen, sock: socket.socket, timeout: float = 10.0) -> None:
    """Store `sock` in the app's store under li.name the systemd way, then wait for BARRIER=1:
    once it returns, the daemon holds the socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(notify_socket)
            s.sendmsg([f"FDSTORE=1\nFDNAME={li.name}".encode()],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, sock.fileno().to_bytes(4, "little"))])
            barrier(s, timeout)
        except (OSError, TimeoutError) as e:
            raise UsageError(f"listener {li.name}: cannot store it in the app's store at {notify_socket}: "
                             f"{getattr(e, 'strerror', None) or e}; is the daemon serving?") from None


def barrier(s: socket.socket, timeout: float) -> None:
    """sd_notify_barrier(3): send BARRIER=1 with a pipe's write end and wait until the daemon has
    closed it, which it does after handling every earlier datagram of ours."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            s.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, "little"))])
        finally:
            os.close(w)
        p = select.poll()
        p.register(r, select.POLLHUP | select.POLLIN)
        if not p.poll(timeout * 1000):
            raise TimeoutError(f"the daemon did not confirm within {timeout} s")
    finally:
        os.close(r)
