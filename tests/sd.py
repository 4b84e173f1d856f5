"""libsystemd (Debian's libsystemd0), called through ctypes: the real client of systemd's fd store
protocol that cprd's tests speak to its notify sockets with.

``notify`` and ``barrier`` read $NOTIFY_SOCKET (libsystemd's own getenv), so a test sets it
(monkeypatch.setenv) before calling them. ``LISTEN_PROGRAM`` is a program that, run by
`cprd run`, prints what sd_listen_fds_with_names() gave it as one JSON line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(ctypes.util.find_library("systemd") or "libsystemd.so.0", use_errno=True)
        _lib.sd_pid_notify_with_fds.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                                ctypes.POINTER(ctypes.c_int), ctypes.c_uint]
        _lib.sd_notify_barrier.argtypes = [ctypes.c_int, ctypes.c_uint64]
    return _lib


def available() -> bool:
    try:
        lib()
    except OSError:
        return False
    return True


def notify(state: str, fds: list[int] = ()) -> int:
    """sd_pid_notify_with_fds(0, 0, state, fds): > 0 when sent; raises OSError on a negative errno."""
    arr = (ctypes.c_int * max(1, len(fds)))(*fds)
    r = lib().sd_pid_notify_with_fds(0, 0, state.encode(), arr, len(fds))
    if r < 0:
        raise OSError(-r, f"sd_pid_notify_with_fds: {os.strerror(-r)}")
    return r


def barrier(timeout_s: float = 5.0) -> int:
    """sd_notify_barrier(0, timeout): returns once the receiver has handled every earlier message."""
    r = lib().sd_notify_barrier(0, int(timeout_s * 1e6))
    if r < 0:
        raise OSError(-r, f"sd_notify_barrier: {os.strerror(-r)}")
    return r


LISTEN_PROGRAM = r'''
import ctypes, ctypes.util, json, os, stat, sys
sd = ctypes.CDLL(ctypes.util.find_library("systemd") or "libsystemd.so.0")
names = ctypes.POINTER(ctypes.c_char_p)()
n = sd.sd_listen_fds_with_names(0, ctypes.byref(names))
fds = []
for i in range(max(n, 0)):
    st = os.fstat(3 + i)
    fds.append({"fd": 3 + i, "name": names[i].decode(), "ino": st.st_ino, "dev": st.st_dev,
                "link": os.readlink(f"/proc/self/fd/{3 + i}")})
def alive(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
others = sorted(f for f in map(int, os.listdir("/proc/self/fd")) if f > 2 + max(n, 0) and alive(f))
print(json.dumps({"n": n, "fds": fds, "pid": os.getpid(),
                  "env": {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID",
                                                          "NOTIFY_SOCKET", "FDSTORE")},
                  "others": others}), flush=True)
'''
