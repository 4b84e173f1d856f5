"""Starting and stopping cprd daemons as child processes (demo, bench, stress, tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import psutil

from ..errors import CprdError


def cprd_cmd(*args: str, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "cprd", "--log-level", log_level, *args]


def spawn(args: Sequence[str], *, env: dict[str, str] | None = None, log_level: str = "warning",
          stderr=None, preexec_fn=None) -> subprocess.Popen:
    # Daemons print nothing on stdout: never hold the caller's stdout (a pipe stays open while they run).
    return subprocess.Popen(cprd_cmd(*args, log_level=log_level), env=env, stderr=stderr,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=preexec_fn)


def wait_for_socket(path: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Wait until a daemon listens on path (cprd renames its socket into place after listen())."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise CprdError(f"daemon exited with code {proc.returncode} before it listened on {path}")
        if time.monotonic() > deadline:
            raise CprdError(f"no daemon listened on {path} within {timeout:.0f} s")
        time.sleep(0.005)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after timeout; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def quiet_fds(pid: int, interval: float = 0.02, tries: int = 100) -> int:
    """A process's fd count once it is quiet: the same in two reads `interval` apart (so that client
    connections just closed on our side are closed on its side too)."""
    n = psutil.Process(pid).num_fds()
    for _ in range(tries):
        time.sleep(interval)
        m = psutil.Process(pid).num_fds()
        if m == n:
            return n
        n = m
    return n
