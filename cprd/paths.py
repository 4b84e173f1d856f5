"""Where sockets and state live, and how cprd makes sure no other user controls a path it uses.

Theory of operation
-------------------
The control socket defaults to $XDG_RUNTIME_DIR/cprd/control.sock, or /run/cprd/control.sock for
root; ``--control PATH`` and the environment variable CPRD_CONTROL override it, for every
command.

A daemon that runs as root beside other users must not let them decide what its paths mean. A
path is *trusted* when every directory on the way to it, from "/", is

- owned by this process's user or by root, and
- not writable by group or others, unless it has the sticky bit (like /tmp: others may add
  names there but cannot remove or rename ours);

and the directory that holds the socket or the state files is also *private*: not writable by
group or others at all. ``open_dir`` walks a path one component at a time with
``openat(O_PATH | O_NOFOLLOW)`` from "/", checks each directory it opened (fstat of the open fd,
so nothing can be swapped between the check and the use), and follows a symlink only when
whoever could have made it is trusted (its owner is us, root or the owner of its directory: the
rule the kernel's protected_symlinks applies in sticky directories). Missing directories are
created one by one with mode 0700, whatever the umask. What it returns is an open directory fd:
the socket is bound through /proc/self/fd/N/NAME and state files are opened with
``openat(O_NOFOLLOW)`` relative to it.

A listening socket is bound under a temporary name, set to mode 0600 (0666 with --allow-uid,
where the daemon checks each peer's uid itself), and renamed into place, so that whoever sees
the path can connect at once and a stale socket is replaced atomically; a socket on which a
process still accepts is never stolen.

What this module may know: paths, directory fds, sockets' credentials. It knows nothing of the
protocols except ``socket_owner``, which asks a live socket who serves it.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable

from . import limits, proc
from .errors import ControlError, UnsafePath, UsageError

ENV_CONTROL = "CPRD_CONTROL"
_MAX_SYMLINKS = 40  # as the kernel's path walk
_PATH_MAX_UNIX = limits.UNIX_PATH_MAX


def default_control_path() -> str:
    env = os.environ.get(ENV_CONTROL)
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/cprd/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "cprd", "control.sock")
    return f"/tmp/cprd-{os.geteuid()}/control.sock"


def control_path(arg: str | None) -> str:
    return os.path.abspath(arg or default_control_path())


def lane_path(control: str, uid: int) -> str:
    """Where uid's lane listens: beside the control socket (a uid other than the daemon's own and
    root, given with --allow-uid, connects there: the file is its own, mode 0600)."""
    return f"{control}.{uid}"


def lane_of(control: str) -> str:
    """Where this process connects to reach the daemon at `control`: its own lane if the daemon made
    one for its uid, else the control socket (whoever serves either is checked by the client)."""
    uid = os.geteuid()
    if uid == 0:
        return control
    lane = lane_path(control, uid)
    try:
        st = os.stat(lane, follow_symlinks=False)
    except OSError:
        return control
    return lane if stat.S_ISSOCK(st.st_mode) else control


def trusted_uids() -> set[int]:
    """This process's user and root: who may own a directory on a trusted path, serve a control
    socket a client talks to, hand a table to a daemon or take one from it, and ask a daemon to hand
    off or upgrade (the one place cprd says whom it trusts by default)."""
    return {os.geteuid(), 0}


def user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


# -- walking a path ----------------------------------------------------------------------------
class Dir:
    """An open directory on a trusted path (an O_PATH fd, or O_RDONLY for one cprd created)."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    def at(self, name: str) -> str:
        """A path string that names `name` in this very directory (through /proc/self/fd), whatever
        becomes of the path it was opened by; the real path when that would not fit a UNIX socket
        address (then the directory's trust is what keeps it safe)."""
        via = f"/proc/self/fd/{self.fd}/{name}"
        return via if len(via.encode()) <= _PATH_MAX_UNIX else os.path.join(self.path, name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_dir(st: os.stat_result, shown: str, what: str, private: bool) -> None:
    if st.st_uid not in trusted_uids():
        raise UnsafePath(
            f"{what}: directory {shown} is owned by {user_name(st.st_uid)}, not by this user "
            f"({user_name(os.geteuid())}) or root, so that user could replace what cprd puts there; use a "
            "directory you own (cprd creates missing ones with mode 0700)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and (private or not mode & stat.S_ISVTX):
        raise UnsafePath(
            f"{what}: directory {shown} is writable by other users (mode {mode:04o}), so another user could "
            f"replace what cprd puts {'there' if private else 'below it'}; "
            + ("use a private directory (not writable by group or others)" if private else
               "use a path whose directories only you and root can write to")
            + " (cprd creates missing ones with mode 0700)")


def open_dir(path: str, *, what: str, create: bool = False, private: bool = True) -> Dir:
    """Open directory `path` (absolute) after checking every directory on the way (see the module
    docstring); create missing ones 0700 when `create`. UnsafePath names the directory that fails
    the rule; UsageError a path that is not a directory or does not exist."""
    if not os.path.isabs(path):
        raise UsageError(f"{what}: {path!r} must be an absolute path")
    todo = [p for p in path.split("/") if p][::-1]  # a stack: the next component last
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    shown: list[str] = []
    hops = 0
    try:
        _check_dir(os.fstat(fd), "/", what, private and not todo)
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            here = "/" + "/".join(shown)
            if name == "..":
                nfd = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
                if shown:
                    shown.pop()
                _check_dir(os.fstat(fd), "/" + "/".join(shown), what, private and not todo)
                continue
            shown_next = "/" + "/".join([*shown, name])
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise UsageError(f"{what}: directory {shown_next} does not exist; create it or choose "
                                     "another path") from None
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    todo.append(name)  # made meanwhile by someone: look again
                    continue
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.fchmod(nfd, 0o700)  # whatever the umask
                os.close(fd)
                fd = nfd
                shown.append(name)
                _check_dir(os.fstat(fd), shown_next, what, private and not todo)
                continue
            if stat.S_ISLNK(st.st_mode):
                dst = os.fstat(fd)
                if st.st_uid not in trusted_uids() | {dst.st_uid}:
                    raise UnsafePath(f"{what}: {shown_next} is a symlink made by {user_name(st.st_uid)}, who does "
                                     f"not own {here}; cprd does not follow it: use the real path")
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise UsageError(f"{what}: too many symlinks in {path}")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    nfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                    os.close(fd)
                    fd = nfd
                    shown = []
                    _check_dir(os.fstat(fd), "/", what, private and not [p for p in todo if p != "."])
                todo.extend([p for p in target.split("/") if p][::-1])
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UsageError(f"{what}: {shown_next} exists and is not a directory; choose another path")
            try:
                nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:  # replaced by something else since the stat: look again
                if e.errno in (errno.ENOTDIR, errno.ENOENT, errno.ELOOP):
                    todo.append(name)
                    continue
                raise
            os.close(fd)
            fd = nfd
            shown.append(name)
            _check_dir(os.fstat(fd), shown_next, what, private and not todo)
        return Dir(fd, "/" + "/".join(shown))
    except BaseException:
        os.close(fd)
        raise
    # PermissionError and other OSErrors propagate: the caller says what it was doing


def check_program(path: str, what: str = "program", _hops: int = 0) -> str:
    """The real path of the program at `path` (absolute), once it, every directory on the way, every
    symlink that leads to it and the interpreter its #! line names are trusted (UnsafePath
    otherwise): an in-place upgrade runs it with every fd of the table (as root, for a root daemon).
    The caller execs the returned path, so nothing is looked up again between the check and the
    exec. (A #! interpreter that searches PATH, like /usr/bin/env, is checked, not what it finds.)"""
    if _hops > _MAX_SYMLINKS:
        raise UsageError(f"{what} {path}: too many symlinks or interpreters")
    d, name = os.path.split(path)
    try:
        with open_dir(d, what=what, private=False) as dd:
            st = os.stat(name, dir_fd=dd.fd, follow_symlinks=False)
            real = os.path.join(dd.path, name)
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid not in trusted_uids():  # its directory is trusted: owned by us or root
                    raise UnsafePath(f"{what} {path}: {real} is a symlink made by {user_name(st.st_uid)}, who could "
                                     "point it at another program at any moment; name the program itself")
                target = os.readlink(name, dir_fd=dd.fd)
                return check_program(os.path.normpath(os.path.join(dd.path, target)), what, _hops + 1)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{what} {path} is not a regular file")
            if not st.st_mode & 0o111:
                raise UsageError(f"{what} {path} is not executable (mode {stat.S_IMODE(st.st_mode):04o}): chmod +x it")
            if st.st_uid not in trusted_uids() or stat.S_IMODE(st.st_mode) & 0o022:
                raise UnsafePath(f"{what} {path} is owned by {user_name(st.st_uid)} with mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}: only this user or root may be able to change a "
                                 "program that receives every fd of the table")
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dd.fd)
            except PermissionError:  # executable but not readable: no #! line we could check
                return real
            try:
                head = os.read(fd, 256)
            finally:
                os.close(fd)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        interpreter = os.fsdecode(words[0]) if words else ""
        if not interpreter.startswith("/"):
            raise UsageError(f"{what} {path}: its #! line names no absolute interpreter")
        check_program(interpreter, f"interpreter of {what} {path}", _hops + 1)
    return real


# -- sockets -------------------------------------------------------------------------------------
def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected UNIX socket (SO_PEERCRED:
    the credentials it had when it connected or listened)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


async def connect_seqpacket(path: str, timeout: float) -> object:
    """A trio SOCK_SEQPACKET socket connected to the UNIX socket at path. A full listen backlog
    (EAGAIN) is tried again with backoff until `timeout`; then BlockingIOError. Other failures raise
    their OSError at once. (trio's own connect() takes EAGAIN on a UNIX socket for a connect in
    progress and returns an unconnected socket.)"""
    import time

    import trio

    deadline, delay = time.monotonic() + timeout, 0.001
    while True:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            raw.connect(path)
        except BlockingIOError:
            raw.close()
            if time.monotonic() >= deadline:
                raise
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        except BaseException:
            raw.close()
            raise
        return trio.socket.from_stdlib_socket(raw)


def max_backlog() -> int:
    """The largest listen backlog the system allows (net.core.somaxconn caps any larger value)."""
    return max(socket.SOMAXCONN, proc.sysctl_int("net.core.somaxconn") or 0)


def _socket_owner(addr: str, describe: Callable[[socket.socket], str] | None) -> str | None:
    """If a process accepts on the socket at addr, a description of it; None if the file is stale."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(2)
    try:
        try:
            s.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except BlockingIOError:  # its backlog is full: alive and busy
            return "a process whose listen backlog is full"
        except OSError as e:
            if e.errno == errno.EPROTOTYPE:
                return "a process with a socket of another type"
            return f"a process that cannot be reached ({e.strerror})"
        if describe is not None:
            try:
                return describe(s)
            except Exception:  # noqa: BLE001 - not a cprd, or not answering: say who it is
                pass
        pid, uid, _ = peer_cred(s)
        return f"pid {pid}, {user_name(uid)}"
    finally:
        s.close()


def bind_listener(path: str, what: str = "control", owner: int | None = None,
                  describe: Callable[[socket.socket], str] | None = None) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at path, close-on-exec, blocking, with the largest backlog
    the system allows. Mode 0600: only this user and root can connect; with `owner` (another uid's
    lane) the file is that uid's, so that it (and root) can connect, nobody else (the daemon still
    checks each peer's uid with SO_PEERCRED). The directory must be trusted and private (missing
    ones are created 0700). `describe(sock)` names the daemon that serves a live socket already
    there (in the refusal)."""

    def live(addr: str) -> str | None:
        owner = _socket_owner(addr, describe)
        return None if owner is None else f"another cprd serves {path}, {owner}; stop it or choose another {what} path"

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    return _bind_in_place(sock, path, what, owner, live, lambda: sock.listen(max_backlog()),
                          too_long="choose a shorter one", shared_dir=owner is not None and owner != os.geteuid())


def bind_datagram(path: str, what: str, owner: int | None = None) -> socket.socket:
    """A bound SOCK_DGRAM socket at path (an fd store's notify socket), close-on-exec, non-blocking,
    with SO_PASSCRED on (every datagram then carries its sender's pid, uid and gid). The same rules
    as bind_listener: a trusted private directory (missing ones made 0700, or 0711 with `owner`:
    that uid must reach the socket, which is its own, mode 0600), a stale socket replaced, a live
    one never stolen."""

    def live(addr: str) -> str | None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # stale
        finally:
            probe.close()
        return f"a process is bound to {path} already; stop it or remove the socket"

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return _bind_in_place(sock, path, what, owner, live, lambda: None,
                          too_long="put the control socket in a shorter directory, or use a shorter name",
                          shared_dir=owner is not None and owner != os.geteuid())


def _bind_in_place(sock: socket.socket, path: str, what: str, owner: int | None, live: Callable[[str], str | None],
                   ready: Callable[[], None], too_long: str, shared_dir: bool) -> socket.socket:
    """Bind `sock` at path in a trusted private directory: under a temporary name first (then
    `ready()`, say listen), mode 0600 and owned by `owner` if given, renamed into place, so that
    whoever sees the path can use it at once and a stale socket is replaced atomically. A file
    there that is not a socket, or a live socket (`live(address)` says whose), is refused.
    `shared_dir`: the directory is made 0711, so that others can reach the socket in it (and
    nothing else). sock is closed on any error."""
    try:
        path = os.path.abspath(path)
        # The temporary name beside it must fit the 108-byte limit too, whatever the pid (at most 7
        # digits): the same room for every cprd, source or target.
        room = _PATH_MAX_UNIX - len(".4194304.tmp")
        _check_utf8(path, what)
        if len(path.encode()) > room:
            raise UsageError(f"{what} socket path {path} is {len(path.encode())} bytes; cprd needs it to be at "
                             f"most {room} (UNIX socket paths are limited to 108 bytes): {too_long}")
        directory, name = os.path.split(path)
        with open_dir(directory, what=f"{what} socket {path}", create=True, private=True) as d:
            if shared_dir:
                os.chmod(d.at(""), 0o711)  # others may reach the socket (and only that), not list or change
            try:
                st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not stat.S_ISSOCK(st.st_mode):
                    raise ControlError(f"{path} exists and is not a socket; remove it or choose another {what} path")
                refusal = live(d.at(name))
                if refusal is not None:
                    raise ControlError(refusal)
                # stale: left by a daemon that died; the rename below replaces it
            tmp = f"{name}.{os.getpid()}.tmp"
            old = os.umask(0o177)
            try:
                try:
                    os.unlink(tmp, dir_fd=d.fd)
                except FileNotFoundError:
                    pass
                sock.bind(d.at(tmp))
                os.chmod(tmp, 0o600, dir_fd=d.fd, follow_symlinks=False)
                if owner is not None and owner != os.geteuid():
                    try:
                        os.chown(tmp, owner, -1, dir_fd=d.fd, follow_symlinks=False)
                    except PermissionError:  # a daemon that is not root cannot give a file away:
                        # anyone may connect, and the daemon's SO_PEERCRED check alone keeps others out
                        os.chmod(tmp, 0o666, dir_fd=d.fd, follow_symlinks=False)
                ready()
                os.rename(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
            except OSError as e:
                try:
                    os.unlink(tmp, dir_fd=d.fd)
                except OSError:
                    pass
                raise ControlError(f"cannot create {what} socket {path}: {e.strerror or e}") from None
            finally:
                os.umask(old)
    except BaseException:
        sock.close()
        raise
    return sock


def _check_utf8(path: str, what: str) -> None:
    try:
        path.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} socket path {path.encode(errors='surrogateescape')!r} is not valid UTF-8; "
                         "cprd shows and hands on its paths as text: choose a path in UTF-8") from None


def file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at path (not of the socket: sockfs has its own inodes)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def unlink_if_same(path: str, fid: tuple[int, int] | None) -> None:
    """Unlink path if it still is the socket file we recorded (never another daemon's)."""
    if fid is not None and file_id(path) == fid:
        try:
            os.unlink(path)
        except OSError:
            pass
