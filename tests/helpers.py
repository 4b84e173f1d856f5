"""Real cprd daemons as child processes, for the process-level tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


from cprd.client import Client
from cprd.errors import ControlError
from cprd.tools.procs import cprd_cmd, quiet_fds, stop, wait_for_socket


FIRED: set[tuple[str, str]] = set()  # (side, step) of every fault point that fired in a cluster's daemons


class Cluster:
    """Sources and targets started in one private directory; all stopped at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        os.chmod(directory, 0o700)
        self.control = str(directory / "control.sock")
        self.procs: list[subprocess.Popen] = []
        self._kept: list = []
        self._n = 0

    def keep(self, closable):
        """Close `closable` (copies of fds, say) when the cluster closes."""
        self._kept.append(closable)
        return closable

    def spawn(self, *args: str, env: dict[str, str] | None = None, preexec_fn=None) -> subprocess.Popen:
        log = open(self.dir / f"daemon-{len(self.procs)}.log", "wb")
        p = subprocess.Popen(cprd_cmd(*args, log_level="info"), stdin=subprocess.DEVNULL, stderr=log,
                             env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        log.close()
        self.procs.append(p)
        return p

    def source(self, spec: str = "", env: dict[str, str] | None = None) -> subprocess.Popen:
        p = self.spawn("source", "--control", self.control, "--populate", spec,
                       "--state-dir", str(self.dir / "state"), env=env)
        wait_for_socket(self.control, p)
        deadline = time.monotonic() + 30
        while True:  # the path may still be a stale socket file that the daemon is about to replace
            try:
                with self.client() as c:
                    if c.status()["pid"] == p.pid:  # populated and serving
                        return p
            except ControlError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"source did not serve {self.control}:\n{self.logs()}")
            time.sleep(0.01)

    def target(self, env: dict[str, str] | None = None, preexec_fn=None) -> tuple[subprocess.Popen, str]:
        self._n += 1
        path = str(self.dir / f"handoff-{self._n}.sock")
        p = self.spawn("target", "--listen", path, env=env, preexec_fn=preexec_fn)
        wait_for_socket(path, p)
        return p, path

    def client(self) -> Client:
        return Client(self.control, timeout=60)

    def ctl(self, *args: str, env: dict[str, str] | None = None, check: bool = False,
            pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
        e = {**os.environ, "CPRD_CONTROL": self.control, **(env or {})}
        return subprocess.run([sys.executable, "-m", "cprd", "ctl", *map(str, args)], env=e, capture_output=True,
                              text=True, timeout=60, check=check, pass_fds=pass_fds)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("daemon-*.log")))

    def close(self) -> None:
        for k in self._kept:
            k.close()
        for p in self.procs:
            stop(p)
        FIRED.update(re.findall(r"event=fault_fired side=(\w+) step=(\w+)", self.logs()))


def num_fds(pid: int) -> int:
    """The daemon's fd count once it is quiet (client connections we just closed closed on its side too)."""
    return quiet_fds(pid, interval=0.05)


def settled_fds(pid: int, expect: int, timeout: float = 5.0) -> int:
    """The daemon's fd count once it has caught up with closed client connections: polls until it
    equals expect (or the timeout passes) and returns the last count."""
    import time

    deadline = time.monotonic() + timeout
    n = num_fds(pid)
    while n != expect and time.monotonic() < deadline:
        time.sleep(0.01)
        n = num_fds(pid)
    return n


def snapshot(client: Client) -> dict[tuple[str, int], dict]:
    """The table as {key: identity}, without the fd numbers (which differ between processes)."""
    out = {}
    for e in client.ls():
        ident = {k: v for k, v in e.items() if k not in ("fd", "name", "id")}
        out[(e["name"], e["id"])] = ident
    return out


def hold_copies(client: Client) -> dict[tuple[str, int], tuple[int, str]]:
    """Our own fd for every entry: {key: (fd, kind)}. The caller closes them."""
    out = {}
    for e in client.ls():
        _, fd = client.get(e["name"], e["id"])
        out[(e["name"], e["id"])] = (fd, e["kind"])
    return out


def close_copies(copies: dict) -> None:
    for fd, _ in copies.values():
        os.close(fd)
