"""An upgrade's state memfd and the exec that hands it on: write it, rewrite it, read it, exec a
program with the fds that must cross, and roll back (run the previous program again with the same
state). Used by the old program (upgrade.py), a new program that cannot restore (daemon/main.py) and
the guardian when it restores (guardian.py).

What this module may know: fds, exec, the state's format (protocol/upgrade.py). No trio.
"""

from __future__ import annotations

import json
import logging
import os

from .errors import UpgradeError
from .fds import read_all
from .protocol import upgrade as pu
from .protocol.upgrade import UpgradeState

log = logging.getLogger("cprd.upgrade")


def max_state_version() -> int:
    """The newest state version this program reads (tests lower it to play an older program)."""
    return int(os.environ.get("CPRD_TEST_STATE_VERSION", pu.STATE_VERSION))


def write_state(state: UpgradeState) -> int:
    """A memfd (close-on-exec for now) holding the state, offset 0."""
    fd = os.memfd_create("cprd-state", os.MFD_CLOEXEC)
    try:
        rewrite_state(fd, state)
    except BaseException:
        os.close(fd)
        raise
    return fd


def rewrite_state(fd: int, state: UpgradeState) -> None:
    data = state.to_json()
    os.ftruncate(fd, 0)
    view = memoryview(data)
    off = 0
    while off < len(data):
        off += os.pwrite(fd, view[off:], off)


def read_raw(fd: int) -> bytes:
    return read_all(fd, 1 << 20)


def exec_with(argv: list[str], fds: list[int], state_fd: int, env: dict[str, str] | None = None) -> None:
    """Exec argv + --restore-fd state_fd with fds inheritable; returns only if exec failed (then
    every fd is close-on-exec again and OSError is raised)."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        os.execve(argv[0], [*argv, "--restore-fd", str(state_fd)], os.environ if env is None else env)
    except OSError:
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        raise


def rollback(state_fd: int, state: UpgradeState, reason: str) -> None:
    """The new program cannot restore: run the previous one again, in this pid, with the same state
    marked rolled back. Returns only if that exec fails too (then the caller exits 1: the stand-in
    keeps the table, or the guardian restores it)."""
    log.error("event=upgrade_rollback reason=%r previous=%r", reason, state.previous)
    state.rolled_back, state.failed_program = reason, state.argv_new
    rewrite_state(state_fd, state)
    # The previous program runs as it ran before: with its own environment, not the new one's.
    exec_with(state.previous, state.crossing_fds(state_fd), state_fd, state.env)


def rollback_raw(state_fd: int, reason: str) -> None:
    """A rollback by a program that cannot read the state (a version it does not know): the envelope
    every version keeps (previous, env, crossing) is enough to hand everything back."""
    data = pu.envelope(read_raw(state_fd))
    if data.get("rolled_back"):
        raise UpgradeError(f"the previous program could not restore either ({data['rolled_back']})")
    data.update(rolled_back=reason, failed_program=data.get("argv_new"))
    raw = json.dumps(data, separators=(",", ":")).encode()
    os.ftruncate(state_fd, 0)
    os.pwrite(state_fd, raw, 0)
    crossing = data.get("crossing")
    if not isinstance(crossing, list):
        raise UpgradeError("the state names no fds to hand back")
    exec_with(data["previous"], [*crossing, state_fd], state_fd, data.get("env"))
