"""Real cprd daemons as child processes, for the process-level tests."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from cprd import proc
from cprd.client import Client
from cprd.errors import ControlError
from cprd.kinds import Kind
from cprd.tools.procs import cprd_cmd, quiet_fds, stop, wait_for_socket
from cprd.tools.proof import check_populated, same_open_file
from cprd.tools.proof import kcmp_file as proof_kcmp_file

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

    def source(self, spec: str = "", env: dict[str, str] | None = None,
               extra: tuple[str, ...] = ()) -> subprocess.Popen:
        p = self.spawn("source", "--control", self.control, "--populate", spec,
                       "--state-dir", str(self.dir / "state"), *extra, env=env)
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
            pass_fds: tuple[int, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess:
        e = {**os.environ, "CPRD_CONTROL": self.control, **(env or {})}
        return subprocess.run([sys.executable, "-m", "cprd", "ctl", *map(str, args)], env=e, capture_output=True,
                              text=True, timeout=timeout, check=check, pass_fds=pass_fds)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("daemon-*.log")))

    def close(self) -> None:
        for k in self._kept:
            k.close()
        for p in self.procs:
            stop(p)
        # A stand-in or guardian that kept or restored the table is nobody's child here: stop what still
        # serves (or holds) this cluster's paths, so that no daemon of a test outlives it.
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(str(self.dir) in a for a in p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        FIRED.update(re.findall(r"event=fault_fired side=(\w+) step=(\w+)", self.logs()))


class Freezer:
    """Freeze a process with a cgroup freezer, as an orchestrator or a container runtime does: it
    stops without a signal, and a SIGKILL sent to it takes effect only once it is thawed (cgroup
    v1) or at once (cgroup v2). Prefers v1, the harder case."""

    V1, V2 = "/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified"

    def __init__(self, pid: int) -> None:
        self.pid, self.kind = pid, Freezer.available()
        assert self.kind is not None, "no cgroup freezer"
        root = self.V1 if self.kind == "v1" else self.V2
        self.dir = os.path.join(root, f"cprd-test-{os.getpid()}-{pid}")
        os.mkdir(self.dir)
        with open(os.path.join(self.dir, "tasks" if self.kind == "v1" else "cgroup.procs"), "w") as f:
            f.write(str(pid))
        self._write("FROZEN" if self.kind == "v1" else "1")

    def _write(self, value: str) -> None:
        with open(os.path.join(self.dir, "freezer.state" if self.kind == "v1" else "cgroup.freeze"), "w") as f:
            f.write(value)

    def thaw(self) -> None:
        if self.dir is None:
            return
        self._write("THAWED" if self.kind == "v1" else "0")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a killed process leaves its cgroup once it has ended
            try:
                os.rmdir(self.dir)
                break
            except OSError:
                time.sleep(0.02)
        self.dir = None

    @classmethod
    def available(cls) -> str | None:
        for kind, root in (("v1", cls.V1), ("v2", cls.V2)):
            probe = os.path.join(root, f"cprd-probe-{os.getpid()}")
            try:
                os.mkdir(probe)
            except OSError:
                continue
            ok = os.path.exists(os.path.join(probe, "freezer.state" if kind == "v1" else "cgroup.freeze"))
            os.rmdir(probe)
            if ok:
                return kind
        return None


def child_named(pid: int, name: str, timeout: float = 20.0) -> psutil.Process:
    """The child of `pid` that calls itself `name` (an upgrade's cprd-standin or cprd-guardian), as
    soon as there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for p in psutil.Process(pid).children():
                try:
                    if p.name() == name:
                        return p
                except psutil.NoSuchProcess:
                    continue
        except psutil.NoSuchProcess:
            break
        time.sleep(0.001)
    raise AssertionError(f"no child {name} of pid {pid} within {timeout} s")


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
    """The table as {key: identity}, without the fd numbers (which differ between processes) and the
    owners (which a release before owners does not show)."""
    out = {}
    for e in client.ls():
        ident = {k: v for k, v in e.items() if k not in ("fd", "name", "id", "owner", "shared")}
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


UPGRADE_SPEC = "files=40,eventfds=40,memfds=10,pipes=5,sockets=5,devices=3"  # a small table of every kind


def prove_same(cluster, copies) -> None:
    """Every entry the daemon now serves is the same open file description as our copy."""
    with cluster.client() as c:
        assert len(c.ls()) == len(copies)
        for (name, id_), (mine, kind) in copies.items():
            _, theirs = c.get(name, id_)
            try:
                ok, method = same_open_file(mine, theirs, Kind.from_label(kind))
                assert ok, f"({name!r}, {id_}) is not the same open file ({method})"
                assert method.startswith("kcmp"), f"({name!r}, {id_}) proved only by {method}"
                assert check_populated(name, id_, theirs) is None
            finally:
                os.close(theirs)


def pids_holding(ident: dict) -> set[int]:
    """Every process with an fd open on the inode of an entry (judged by the kernel: /proc)."""
    out = set()
    for pid in psutil.pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (ident["dev"], ident["ino"]):
                    out.add(pid)
        except OSError:
            continue
    return out


def memfd_of(snap: dict) -> dict:
    return next(v for (name, _), v in snap.items() if name == "memfd")


class Churn:
    """Puts of new eventfds, one after another, on one client (which retries across the upgrade with
    the same request id): every put must be acknowledged, exactly once."""

    def __init__(self, path: str) -> None:
        self.path, self.stop, self.failed = path, threading.Event(), []
        self.mine: dict[tuple[str, int], tuple[int, str]] = {}  # acknowledged: our copy of each fd put
        self.t = threading.Thread(target=self.run)

    def run(self) -> None:
        i = 0
        with Client(self.path, timeout=60) as c:
            while not self.stop.is_set():
                ev = os.eventfd(i)
                try:
                    c.put("churn", i, ev)
                    self.mine[("churn", i)] = (ev, "eventfd")
                except Exception as e:  # noqa: BLE001 - any failure at all fails the test
                    now = time.time()  # the daemons' logs' clock, to find the request in them
                    self.failed.append(f"{time.strftime('%H:%M:%S', time.localtime(now))},{int(now * 1000) % 1000:03d}"
                                       f" put churn/{i}: {e!r}")
                    os.close(ev)
                self.after_put(c, i)
                i += 1
                time.sleep(0.002)

    def after_put(self, c: Client, i: int) -> None:
        """What else a churner does after its i-th put, on the same client."""

    def __enter__(self) -> Churn:
        self.t.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)
        self.stop.set()
        self.t.join(60)
        assert not self.t.is_alive()


# -- an fd of every kind a client can put ----------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _libc_fd(fn: str, *args) -> int:
    f = getattr(_libc, fn, None)
    if f is None:
        pytest.skip(f"libc has no {fn}")
    fd = f(*args)
    if fd < 0:
        pytest.skip(f"{fn} failed: {os.strerror(ctypes.get_errno())}")
    return fd


def _timerfd() -> int:
    if hasattr(os, "timerfd_create"):  # Python 3.13+
        return os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_CLOEXEC)
    return _libc_fd("timerfd_create", time.CLOCK_MONOTONIC, os.O_CLOEXEC)  # TFD_CLOEXEC == O_CLOEXEC


def _signalfd() -> int:
    mask = (ctypes.c_ubyte * 128)()  # an empty sigset_t
    return _libc_fd("signalfd", -1, mask, os.O_CLOEXEC)


def _inotify() -> int:
    return _libc_fd("inotify_init1", os.O_CLOEXEC)


def _blockdev() -> int:
    for name in sorted(os.listdir("/dev")):
        path = os.path.join("/dev", name)
        try:
            if not stat.S_ISBLK(os.stat(path).st_mode):
                continue
        except OSError:
            continue
        for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_PATH):
            try:
                return os.open(path, flags | os.O_CLOEXEC)
            except OSError:
                pass
    pytest.skip("no block device that this process can open")


def _sock(family: int, type_: int) -> Callable[[], list[int]]:
    def make() -> list[int]:
        if family == socket.AF_UNIX:
            a, b = socket.socketpair(family, type_)
            return [a.detach(), b.detach()]
        return [socket.socket(family, type_).detach()]

    return make


# kind label -> (expected Kind, maker returning [the fd under test, other fds to close with it])
MAKERS: dict[str, tuple[Kind, Callable[..., list[int]]]] = {
    "file": (Kind.FILE, lambda d: [
        os.open(os.path.join(d, "f"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)]),
    "file-rdonly-append": (Kind.FILE, lambda d: [
        os.close(os.open(os.path.join(d, "g"), os.O_CREAT | os.O_WRONLY, 0o600)),
        os.open(os.path.join(d, "g"), os.O_RDONLY | os.O_APPEND | os.O_CLOEXEC)][1:]),
    "dir": (Kind.DIR, lambda d: [os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]),
    "memfd": (Kind.MEMFD, lambda d: [os.memfd_create("cprd-test", os.MFD_CLOEXEC)]),
    "eventfd": (Kind.EVENTFD, lambda d: [os.eventfd(3, os.EFD_CLOEXEC)]),
    "eventfd-nonblock": (Kind.EVENTFD, lambda d: [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]),
    "timerfd": (Kind.TIMERFD, lambda d: [_timerfd()]),
    "signalfd": (Kind.SIGNALFD, lambda d: [_signalfd()]),
    "inotify": (Kind.INOTIFY, lambda d: [_inotify()]),
    "pipe-read": (Kind.PIPE, lambda d: list(os.pipe2(os.O_CLOEXEC))),
    "pipe-write": (Kind.PIPE, lambda d: list(reversed(os.pipe2(os.O_CLOEXEC)))),
    "unix-stream": (Kind.SOCKET, lambda d: _sock(socket.AF_UNIX, socket.SOCK_STREAM)()),
    "unix-seqpacket": (Kind.SOCKET, lambda d: _sock(socket.AF_UNIX, socket.SOCK_SEQPACKET)()),
    "unix-dgram": (Kind.SOCKET, lambda d: _sock(socket.AF_UNIX, socket.SOCK_DGRAM)()),
    "tcp": (Kind.SOCKET, lambda d: _sock(socket.AF_INET, socket.SOCK_STREAM)()),
    "chardev": (Kind.CHARDEV, lambda d: [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)]),
    "blockdev": (Kind.BLOCKDEV, lambda d: [_blockdev()]),
    "pidfd": (Kind.PIDFD, lambda d: [os.pidfd_open(os.getpid())]),
}


# -- proofs by the kernel ---------------------------------------------------------------------------------
# kcmp(KCMP_FILE) compares two fds in any two processes (ptrace-read permission: the tests run as root) and
# says whether they are the same open file description: it tells two eventfds apart, which share one inode,
# as no fstat can. pidfd_getfd(2) takes a copy of an fd out of another process. Together they let a test
# hold the source's fds before a handoff and ask the kernel, entry by entry, whether the target serves the
# same ones, with no use of cprd's own account of its table. These raise when the kernel cannot answer;
# tests that need them declare @pytest.mark.requires("kcmp").
class NoProof(AssertionError):
    """The kernel could not give the evidence a test needs."""


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """True when fd1 of pid1 and fd2 of pid2 are the same open file description (cprd.tools.proof's
    kcmp, which says None where the kernel does not answer: a proof is never downgraded here)."""
    r = proof_kcmp_file(pid1, fd1, pid2, fd2)
    if r is None:
        raise NoProof(f"kcmp({pid1}, {fd1}, {pid2}, {fd2}) was refused (no ptrace permission, or a seccomp "
                      "profile)")
    return r


def kcmp_works() -> bool:
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.dup(a)
    try:
        return kcmp_file(os.getpid(), a, os.getpid(), b)
    except NoProof:
        return False
    finally:
        os.close(a)
        os.close(b)


def take_fd(pid: int, fd: int) -> int:
    """A copy, in this process, of fd `fd` of process `pid` (the same open file description)."""
    pidfd = os.pidfd_open(pid)
    try:
        return proc.pidfd_getfd(pidfd, fd)
    except OSError as e:
        raise NoProof(f"pidfd_getfd({pid}, {fd}) failed: {e.strerror}") from None
    finally:
        os.close(pidfd)


class Copies:
    """Our own copy of every entry a daemon serves, taken out of the daemon with pidfd_getfd (no
    request through cprd but `ls`, for the fd numbers). Close with close() or a with block."""

    def __init__(self, control: str, pid: int, trust_uids: tuple[int, ...] = ()) -> None:
        with Client(control, trust_uids=trust_uids) as c:
            entries = c.ls()
        self.fds: dict[tuple[str, int], int] = {}
        try:
            for e in entries:
                self.fds[(e["name"], e["id"])] = take_fd(pid, e["fd"])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> Copies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.fds)

    def prove(self, control: str, pid: int, keys: set | None = None, trust_uids: tuple[int, ...] = ()) -> int:
        """Assert, by kcmp, that the daemon `pid` serving `control` holds exactly the same open file
        description as our copy for every key in `keys` (default: all of ours), and that it serves
        exactly those keys. Returns how many were proved."""
        want = set(self.fds) if keys is None else set(keys)
        with Client(control, trust_uids=trust_uids) as c:
            entries = c.ls()
        served = {(e["name"], e["id"]): e["fd"] for e in entries}
        assert set(served) >= want, f"keys missing: {sorted(want - set(served))[:10]}"
        me = os.getpid()
        wrong = [k for k in sorted(want) if not kcmp_file(pid, served[k], me, self.fds[k])]
        assert not wrong, f"{len(wrong)} entries are not the same open file description: {wrong[:10]}"
        return len(want)


# -- releases (test_releases.py, test_tenants.py) -------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
# where the releases' history is: this checkout, or (a copy of it without .git, as tests/mutants.py
# makes) the checkout it names
HISTORY = Path(os.environ.get("CPRD_HISTORY") or ROOT)
RELEASES = [  # (version, commit): the commit, so that a clone without tags still has it
    ("0.1.0", "787d21c377c05a4aa13b2f5a42f641908bcdc2f0"),
]


def _cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cprd-releases"


def install(version: str, commit: str) -> Path:
    """The python of a virtualenv with release `version` installed (built once, then reused)."""
    if not (HISTORY / ".git").exists():
        pytest.fail(f"release {version} comes from git history, and {HISTORY} is not a git checkout")
    tag = f"{commit[:12]}-py{sysconfig.get_python_version()}"
    home = _cache() / tag
    py = home / "venv" / "bin" / "python"
    ok = home / "installed"
    if ok.exists() and py.exists():
        return py
    shutil.rmtree(home, ignore_errors=True)
    (home / "src").mkdir(parents=True)
    have = subprocess.run(["git", "-C", str(HISTORY), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if have.returncode != 0:
        pytest.fail(f"commit {commit} of release {version} is not in this clone's history (a shallow clone?)")
    archive = subprocess.run(["git", "-C", str(HISTORY), "archive", "--format=tar", commit], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(home / "src")], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(home / "src")], capture_output=True,
                       text=True, timeout=600, cwd=home)
    if r.returncode != 0:
        pytest.skip(f"cannot install release {version} from its export (pip needs PyPI for its build tools): "
                    f"{r.stderr[-500:]}")
    got = subprocess.run([str(py), "-c", "import cprd; print(cprd.__version__)"], capture_output=True, text=True,
                         cwd=home)  # not where a cprd package of this checkout would be imported
    assert got.stdout.strip() == version, got
    ok.write_text(version)
    return py


def release_spawn(cluster, python: Path, *args: str):
    """A daemon of the release (its own interpreter and package), logged like the cluster's own."""
    log = open(cluster.dir / f"daemon-{len(cluster.procs)}.log", "wb")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.Popen([str(python), "-m", "cprd", "--log-level", "info", *args], stdin=subprocess.DEVNULL,
                         stderr=log, env=env, cwd=cluster.dir)
    log.close()
    cluster.procs.append(p)
    return p


# -- who holds a table (every entry, judged by kcmp) -------------------------------------------------
def _kcmp_order(pid1: int, fd1: int, pid2: int, fd2: int) -> int | None:
    """kcmp(KCMP_FILE) as an order: 0 the same open file description, -1 or 1 which comes first in the
    kernel's total order of open files; None if either fd is gone (the process ended, or closed it)."""
    r = proc.kcmp_file(pid1, fd1, pid2, fd2)
    if r < 0:
        if os.path.exists(f"/proc/{pid1}/fd/{fd1}") and os.path.exists(f"/proc/{pid2}/fd/{fd2}"):
            raise NoProof(f"kcmp({pid1}, {fd1}, {pid2}, {fd2}) was refused (no ptrace permission, or a seccomp "
                          "profile)")
        return None
    return {0: 0, 1: -1, 2: 1}.get(r)


def table_holders(control: str, pid: int, trust_uids: tuple[int, ...] = ()) -> dict[int, int]:
    """Every process but this one that holds at least one of the open file descriptions the daemon `pid`
    serving `control` holds for its entries (every entry, not one inode), with how many it holds.
    Judged by the kernel: each fd of every process in /proc whose inode is an entry's (eventfds share one
    inode, two opens of one file share theirs) is compared with the entries by kcmp(KCMP_FILE), by a
    binary search in kcmp's total order, so that another process's thousands of eventfds cost a few
    calls each. Only `ls` is asked of cprd, for the fd numbers."""
    import functools

    with Client(control, trust_uids=trust_uids) as c:
        fds = [e["fd"] for e in c.ls()]
    inodes = set()
    for fd in fds:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        inodes.add((st.st_dev, st.st_ino))

    def cmp(a: int, b: int) -> int:
        r = _kcmp_order(pid, a, pid, b)
        if r is None:
            raise AssertionError(f"the daemon {pid} closed fd {a} or {b} while its holders were counted")
        return r

    order = sorted(fds, key=functools.cmp_to_key(cmp))
    me, out = os.getpid(), {}
    for other in psutil.pids():
        if other == me:
            continue
        try:
            names = os.listdir(f"/proc/{other}/fd")
        except OSError:
            continue
        held = 0
        for name in names:
            try:
                st = os.stat(f"/proc/{other}/fd/{name}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in inodes:
                continue
            lo, hi = 0, len(order)
            while lo < hi:
                mid = (lo + hi) // 2
                r = _kcmp_order(other, int(name), pid, order[mid])
                if r is None or r == 0:
                    held += r == 0
                    break
                lo, hi = (lo, mid) if r < 0 else (mid + 1, hi)
        if held:
            out[other] = held
    return out


def assert_sole_holder(control: str, pid: int, timeout: float = 10.0, trust_uids: tuple[int, ...] = ()) -> None:
    """Assert that the daemon `pid` serving `control` holds every entry it serves and that no other
    process (but this test's, whose copies are its own) holds any of them (table_holders). A process
    that was killed may still be on its way out (its fds are closed as it exits): this waits for that,
    until `timeout`, and then names whoever still holds what."""
    deadline = time.monotonic() + timeout
    while True:
        with Client(control, trust_uids=trust_uids) as c:
            n = len(c.ls())
        holders = table_holders(control, pid, trust_uids)
        others = {p: k for p, k in holders.items() if p != pid}
        if not others and holders.get(pid, 0) >= n:
            return
        if time.monotonic() > deadline:
            names = {}
            for p in others:
                try:
                    names[p] = psutil.Process(p).name()
                except psutil.Error:
                    names[p] = "?"
            raise AssertionError(f"the daemon {pid} holds {holders.get(pid, 0)} of its {n} entries; other processes "
                                 f"hold some of them {timeout} s later: "
                                 + ", ".join(f"pid {p} ({names[p]}): {k}" for p, k in others.items()))
        time.sleep(0.05)


class ChurnWithDeletes(Churn):
    """Churn that also deletes: after each put, every third acknowledged put (the oldest still there) is
    deleted, on the same client (retried across the upgrade with the same request id). `mine` holds
    what must be in the table afterwards (each the very fd put), `deleted` what must not."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.deleted: set[tuple[str, int]] = set()

    def after_put(self, c: Client, i: int) -> None:
        if i % 3 == 2 and self.mine:
            key = min(self.mine)
            try:
                c.delete(*key)
                os.close(self.mine.pop(key)[0])
                self.deleted.add(key)
            except Exception as e:  # noqa: BLE001
                self.failed.append(f"delete {key}: {e!r}")


# -- other users ------------------------------------------------------------------------------
NOBODY, OTHER = 65534, 65533  # an allowed uid, and one that is not
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike a root-only interpreter
AS_USER = str(Path(__file__).resolve().parent / "as_user.py")
# a script run as uid 65534: imports while root (the interpreter may be in a root-only home), then drops
DROP_TO = ("import json, os, socket, sys, time, cprd.client, cprd.errors, cprd.protocol.control; os.setgroups([]); "
         "os.setgid({gid}); os.setuid({uid}); exec(sys.stdin.read())")


class Shared:
    """A root daemon in a directory other users may pass through (0711), allowing nobody."""

    def __init__(self, cluster, *daemon_args: str) -> None:
        self.cluster = cluster
        self.dir = tempfile.mkdtemp(prefix="cprd-tenants-", dir="/tmp")
        os.chmod(self.dir, 0o711)
        self.control = os.path.join(self.dir, "control.sock")
        self.proc = cluster.spawn("source", "--control", self.control, "--populate", "eventfds=3",
                                  "--allow-uid", "nobody", *daemon_args)
        wait_for_socket(self.control, self.proc)
        wait_for_socket(self.lane(NOBODY), self.proc)
        cluster.keep(self)

    def lane(self, uid: int) -> str:
        return f"{self.control}.{uid}"

    def client(self, **kw) -> Client:
        return Client(self.control, timeout=30, **kw)

    def ctl(self, uid: int | None, *args: str) -> subprocess.CompletedProcess:
        """`cprd ctl ARGS` (or `cprd ARGS` when args start with "run") as nobody, or root (None)."""
        cmd = list(args) if args[0] == "run" else ["ctl", *args]
        argv = [sys.executable, AS_USER, "nobody", *cmd] if uid == NOBODY else [sys.executable, "-m", "cprd", *cmd]
        return subprocess.run(argv, env={**os.environ, "CPRD_CONTROL": self.control}, capture_output=True, text=True,
                              timeout=120)

    def as_nobody(self, script: str, *args: str) -> dict:
        """Run a Python script as nobody (with cprd importable); its last line of output is JSON."""
        r = subprocess.run([sys.executable, "-c", DROP_TO.format(uid=NOBODY, gid=NOBODY), self.control, *args],
                           input=textwrap.dedent(script), capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
