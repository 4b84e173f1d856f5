"""Where sockets live, and how a listening UNIX socket is created safely.

The control socket defaults to $XDG_RUNTIME_DIR/cprd/control.sock, or /run/cprd/control.sock for
root; ``--control PATH`` and the environment variable CPRD_CONTROL override it, for every
command. A listening socket is created 0600 in a directory that is 0700 when cprd creates it and
is never writable by other users. A socket file left by a crashed daemon is detected (nobody
accepts on it) and replaced; a live one is never stolen.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from .errors import ControlError

ENV_CONTROL = "CPRD_CONTROL"


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


def ensure_private_dir(directory: str) -> None:
    """Create directory 0700 if missing; refuse one that other users can write to."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=False)
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise ControlError(f"cannot create directory {directory}: {e.strerror}; choose another path") from None
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{directory} is not a directory; choose another socket path")
    if st.st_mode & 0o022:
        raise ControlError(
            f"directory {directory} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}), so another"
            " user could replace the socket; put the socket in a private directory (cprd creates missing"
            " ones with mode 0700)"
        )


def peer_pid(sock: socket.socket) -> int:
    import struct
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    import struct
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _live_owner(path: str) -> str | None:
    """If a process accepts on path, a description of it; None if the socket file is stale."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(2)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:
            return "a process with a socket of another type"
        return f"a process that cannot be reached ({e.strerror})"
    try:
        from .client import status_over  # lazy: client imports this module

        st = status_over(s)
        return f"cprd pid {st['pid']}"
    except Exception:
        return f"pid {peer_pid(s)}"
    finally:
        s.close()


def bind_listener(path: str, what: str = "control", shared: bool = False) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at path, close-on-exec, blocking. Mode 0600, or 0666 when
    `shared` (--allow-uid: other users must be able to connect; the daemon then checks each peer's
    uid with SO_PEERCRED)."""
    path = os.path.abspath(path)
    # We bind a temporary name beside it first (see below), which must fit the 108-byte limit too,
    # whatever the pid (at most 7 digits): the same room for every cprd, source or target.
    room = 107 - len(".4194304.tmp")
    if len(path.encode()) > room:
        raise ControlError(f"{what} socket path {path} is {len(path.encode())} bytes; cprd needs it to be at most "
                           f"{room} (UNIX socket paths are limited to 108 bytes): choose a shorter one")
    ensure_private_dir(os.path.dirname(path))
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket; remove it or choose another {what} path")
        owner = _live_owner(path)
        if owner is not None:
            raise ControlError(f"another cprd serves {path}, {owner}; stop it or choose another {what} path")
        # stale: left by a daemon that died; the rename below replaces it
    # Bind and listen under a temporary name, then rename into place: whoever sees the path can
    # connect at once, and a stale file is replaced atomically.
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        os.chmod(tmp, 0o666 if shared else 0o600)
        sock.listen(128)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise ControlError(f"cannot create {what} socket {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    return sock


def file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at path (not of the socket: sockfs has its own inodes)."""
    try:
        st = os.stat(path)
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
