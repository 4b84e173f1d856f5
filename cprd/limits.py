"""The kernel's limits that more than one part of cprd must respect, each in one place.

What this module may know: numbers the kernel fixes, and what they mean to a user. It imports
nothing of cprd.
"""

from __future__ import annotations

SCM_MAX_FD = 253  # fds in one SCM_RIGHTS message: 254 is EINVAL
UNIX_PATH_MAX = 107  # bytes of a UNIX socket path: sockaddr_un.sun_path holds 108 with the NUL


def unix_path_problem(path: str, what: str) -> str | None:
    """Why `path` cannot name a UNIX socket (too long), in words that say what to do, or None."""
    n = len(path.encode("utf-8", "surrogateescape"))
    if n > UNIX_PATH_MAX:
        return (f"{what} {path} is {n} bytes; UNIX socket paths are limited to {UNIX_PATH_MAX}: choose a shorter "
                "path")
    return None
