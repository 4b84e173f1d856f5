"""systemd integration: the units in systemd/ and cprd.sdnotify, checked with systemd's own programs.

- `systemd-analyze verify` must accept every unit without a single warning, and must reject the
  same units with a typo (so the check means something).
- The units agree with each other and with cprd's command line and sdnotify's fd name.
- Every system call of a real handoff (traced with strace) is allowed by the units' SystemCallFilter=.
- sd_notify datagrams reach a SOCK_DGRAM socket bound by the test (a path and an abstract name),
  with exactly the fields sent and the sender's credentials.
- Socket activation: `systemd-socket-activate` starts a real child that takes its control socket
  with control_listener_from_env and answers the test's connection; wrong sockets are refused with a
  message that names what was passed and the unit setting that fixes it.

Needs Debian's systemd package (systemd-analyze, systemd-socket-activate), not systemd as PID 1.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cprd import sdnotify
from cprd.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
ACTIVATE = shutil.which("systemd-socket-activate")
STRACE = shutil.which("strace")

needs_analyze = pytest.mark.requires("systemd-analyze")
needs_activate = pytest.mark.requires("systemd-socket-activate")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path: UNIX socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="cprd-sd-"))
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- the units -----------------------------------------------------------------------------------
def unit_files(directory: Path = UNITS) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".service", ".socket", ".timer", ".path"))


def verify(directory: Path) -> list[str]:
    """Every complaint of `systemd-analyze verify` about the units in directory (a template is
    verified as an instance, so that its specifiers are resolved). [] means clean."""
    args = []
    for p in unit_files(directory):
        name = p.name.replace("@.", "@check.") if "@." in p.name else p.name
        args.append(str(directory / name))
    assert args, f"no units in {directory}"
    r = subprocess.run([ANALYZE, "verify", "--man=no", *args], check=False, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})
    problems = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    if r.returncode != 0:
        problems.append(f"systemd-analyze verify exited with {r.returncode}")
    return problems


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order (keys may repeat)."""
    out, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in directives(path) if k == key]


def one(path: Path, key: str) -> str:
    vs = values(path, key)
    assert len(vs) == 1, f"{path.name}: expected one {key}=, found {vs}"
    return vs[0]


@needs_analyze
def test_systemd_analyze_verify_accepts_every_unit_without_a_warning():
    names = [p.name for p in unit_files()]
    assert {"cprd.service", "cprd.socket", "cprd-target@.service"} <= set(names), names
    assert verify(UNITS) == []


@needs_analyze
@pytest.mark.parametrize("unit, good, typo", [
    ("cprd.service", "ProtectSystem=strict", "ProtectSytem=strict"),                   # unknown key
    ("cprd.service", "ProtectSystem=strict", "ProtectSystem=stirct"),                  # bad value
    ("cprd.service", "ExecStart=/usr/bin/env ", "ExecStart=/usr/bin/no-such-env "),    # missing binary
    ("cprd.socket", "ListenSequentialPacket=", "ListenSequentalPacket="),              # no Listen*=
    ("cprd-target@.service", "[Service]", "[Servcie]"),                                 # unknown section
    ("cprd-target@.service", "RestrictAddressFamilies=AF_UNIX", "RestrictAddressFamilies=AF_UNXI"),
])
def test_systemd_analyze_verify_catches_a_typo(tmp_path, unit, good, typo):
    """The check above is only worth something if it fails on a broken unit."""
    for p in unit_files():
        shutil.copy(p, tmp_path / p.name)
    text = (tmp_path / unit).read_text()
    assert good in text
    (tmp_path / unit).write_text(text.replace(good, typo, 1))
    problems = verify(tmp_path)
    assert problems, f"systemd-analyze verify did not notice {typo!r} in {unit}"


def test_units_agree_with_each_other_and_with_cprd():
    from cprd.cli import build_parser

    service, sock, target = UNITS / "cprd.service", UNITS / "cprd.socket", UNITS / "cprd-target@.service"
    # The socket unit listens where the service's cprd would bind, with the fd name cprd looks for.
    exec_source = one(service, "ExecStart").split()
    control = exec_source[exec_source.index("--control") + 1]
    assert one(sock, "ListenSequentialPacket") == control == "%t/cprd/control.sock"
    assert one(sock, "FileDescriptorName") == sdnotify.CONTROL_FDNAME
    assert one(sock, "Service") == "cprd.service"
    assert [one(sock, k) for k in ("SocketMode", "DirectoryMode", "Accept")] == ["0600", "0700", "no"]
    assert one(sock, "RemoveOnStop") == "no"
    # The command lines parse with cprd's own parser (after systemd's specifiers).
    exec_target = one(target, "ExecStart").split()
    for argv in (exec_source, exec_target):
        assert argv[0] == "/usr/bin/env" and argv[1] == "cprd"
        build_parser().parse_args([a.replace("%t", "/run").replace("%i", "new") for a in argv[2:]])
    assert exec_source[2] == "source" and exec_target[2:4] == ["target", "--listen"]
    assert exec_target[4] == "%t/cprd/handoff-%i.sock"
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert (one(service, "Type"), one(service, "NotifyAccess")) == ("notify", "main")
    assert (one(target, "Type"), one(target, "NotifyAccess")) == ("notify", "all")
    # Both services share a runtime directory that outlives either of them, and the same limits
    # and hardening (a target must be able to hold what a source holds).
    hardening = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                 "PrivateNetwork", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                 "ProtectControlGroups", "ProtectHostname", "ProtectProc", "ProcSubset",
                 "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                 "LockPersonality", "MemoryDenyWriteExecute", "SystemCallArchitectures", "SystemCallFilter",
                 "SystemCallErrorNumber")
    shared = ("RuntimeDirectory", "RuntimeDirectoryMode", "RuntimeDirectoryPreserve", "LimitNOFILE")
    for key in (*shared, *hardening):
        assert values(service, key) == values(target, key) != [], key
    assert one(service, "RuntimeDirectoryPreserve") == "yes"
    assert one(service, "RestrictAddressFamilies") == "AF_UNIX"
    assert one(service, "LimitNOFILE") == "65536"


def _expand_syscall_group(name: str, seen: set[str]) -> set[str]:
    if name in seen:
        return set()
    seen.add(name)
    r = subprocess.run([ANALYZE, "syscall-filter", name], capture_output=True, text=True, timeout=60,
                       check=True)
    out: set[str] = set()
    for line in r.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        out |= _expand_syscall_group(item, seen) if item.startswith("@") else {item}
    return out


@needs_analyze
@pytest.mark.requires("strace")
def test_syscall_filter_allows_every_call_of_a_real_handoff(short_dir):
    """SystemCallFilter= with SystemCallErrorNumber=EPERM turns a missing syscall into an error in
    production; here a traced `cprd demo` (a source with fds of every kind, a target, the handoff
    with its verification, ctl requests) must not make one call the units do not allow."""
    probe = subprocess.run([STRACE, "-qq", "-o", os.devnull, "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("strace cannot trace processes here (ptrace not permitted)")
    allowed: set[str] = set()
    seen: set[str] = set()
    for item in one(UNITS / "cprd.service", "SystemCallFilter").split():
        assert not item.startswith("~"), "this test expects an allow-list"
        allowed |= _expand_syscall_group(item, seen) if item.startswith("@") else {item}
    trace = short_dir / "trace"
    demo = [sys.executable, "-m", "cprd", "--log-level", "warning", "demo", "--fds", "200"]
    r = subprocess.run([STRACE, "-f", "-qq", "-o", str(trace), *demo], check=False, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    used = set(re.findall(r"^\d+\s+([a-z_0-9]+)\(", trace.read_text(errors="replace"), re.MULTILINE))
    assert {"sendmsg", "recvmsg", "kcmp"} <= used, sorted(used)  # the trace saw the handoff
    assert sorted(used - allowed) == []


# -- sd_notify -----------------------------------------------------------------------------------
class Manager:
    """A stand-in for systemd's notify socket: SOCK_DGRAM with SO_PASSCRED, as systemd binds it."""

    def __init__(self, address: str) -> None:
        self.address = address  # as in $NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(10)
        self.env = {"NOTIFY_SOCKET": address}

    def receive(self) -> tuple[list[str], int]:
        """The fields of one datagram and the sender's pid (from SCM_CREDENTIALS)."""
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pids = [struct.unpack("3i", d)[0] for lvl, typ, d in anc
                if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS]
        return data.decode().split("\n"), pids[0]

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(10)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request, short_dir) -> Iterator[Manager]:
    if request.param == "path":
        address = str(short_dir / "notify")
    else:
        address = f"@cprd-test/notify-{os.getpid()}-{secrets.token_hex(4)}"
    m = Manager(address)
    try:
        yield m
    finally:
        m.close()


def test_notify_sends_exactly_the_fields_in_one_datagram(manager):
    assert sdnotify.notify("READY=1", "STATUS=serving 3 entries", env=manager.env) is True
    fields, pid = manager.receive()
    assert fields == ["READY=1", "STATUS=serving 3 entries"]
    assert pid == os.getpid()  # what NotifyAccess= is judged by
    manager.assert_empty()


def test_helpers_send_the_documented_assignments(manager):
    env = manager.env
    assert sdnotify.ready("serving 7 entries on /run/cprd/control.sock", env=env)
    assert manager.receive()[0] == ["READY=1", "STATUS=serving 7 entries on /run/cprd/control.sock"]
    assert sdnotify.ready(env=env)
    assert manager.receive()[0] == ["READY=1"]
    assert sdnotify.status("handing off\nto pid 42", env=env)  # one line: a newline would add a field
    assert manager.receive()[0] == ["STATUS=handing off to pid 42"]
    assert sdnotify.mainpid(4242, env=env)
    assert manager.receive()[0] == ["MAINPID=4242"]
    assert sdnotify.stopping(env=env)
    assert manager.receive()[0] == ["STOPPING=1"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading("upgrading", env=env)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = manager.receive()[0]
    assert fields[0] == "RELOADING=1" and fields[2] == "STATUS=upgrading" and len(fields) == 3
    name, _, usec = fields[1].partition("=")
    assert name == "MONOTONIC_USEC" and before <= int(usec) <= after
    manager.assert_empty()


def test_notify_without_notify_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("x") is False and sdnotify.stopping() is False and sdnotify.reloading() is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False


def test_notify_to_a_missing_or_closed_socket_returns_false(short_dir, caplog):
    closed = Manager(str(short_dir / "closed"))
    closed.close()  # the file stays, nobody reads: ECONNREFUSED
    caplog.set_level("DEBUG", logger="cprd.sdnotify")
    for address in (str(short_dir / "missing"), str(short_dir / "closed"),
                    f"@cprd-test/nobody-{secrets.token_hex(8)}", "vsock:2:9999", "relative/notify"):
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": address}) is False, address
    assert "event=notify_failed" in caplog.text and "event=notify_skipped" in caplog.text


def test_notify_does_not_block_on_a_manager_that_does_not_read(short_dir, monkeypatch):
    m = Manager(str(short_dir / "stuck"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.connect(m.address)
            for _ in range(100_000):  # fill its queue (net.unix.max_dgram_qlen datagrams)
                try:
                    filler.send(b"X=1", socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
            else:
                pytest.fail("the notify socket's queue never filled")
        monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 0.2)
        t0 = time.monotonic()
        assert sdnotify.ready("x", env=m.env) is False
        assert time.monotonic() - t0 < 5
    finally:
        m.close()


@pytest.mark.parametrize("fields", [(), ("READY",), ("=1",), ("STATUS=a\nREADY=1",), ("STATUS=a\0b",)])
def test_malformed_fields_are_refused(fields):
    with pytest.raises(UsageError):
        sdnotify.notify(*fields, env={})


def test_mainpid_must_be_a_pid():
    for bad in (0, -1, True, "12"):
        with pytest.raises(UsageError):
            sdnotify.mainpid(bad, env={})  # type: ignore[arg-type]


# -- sd_listen_fds, in this process (no fd is touched: every case stops before fd 3) ---------------
def test_listen_fds_without_listen_pid_is_empty_and_unsets():
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "control", "OTHER": "x"}
    assert sdnotify.listen_fds(env) == []
    assert env == {"OTHER": "x"}
    assert sdnotify.control_listener_from_env("/run/cprd/control.sock", env={}) is None


def test_listen_fds_of_another_process_are_not_ours():
    env = {"LISTEN_PID": str(os.getppid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"}
    assert sdnotify.listen_fds(env, unset=False) == []
    assert env["LISTEN_FDS"] == "1"  # unset=False leaves them
    assert sdnotify.listen_fds(env) == []
    assert env == {}  # as sd_listen_fds(1): unset whatever the outcome, so children never inherit them
    assert sdnotify.control_listener_from_env("/x", env={"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None


def test_listen_fds_zero_is_empty():
    assert sdnotify.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


@pytest.mark.parametrize("env, words", [
    ({"LISTEN_FDS": "abc"}, "LISTEN_FDS='abc'"),
    ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1'"),
    ({"LISTEN_FDS": ""}, "LISTEN_FDS=''"),
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "control"}, "names 1 fds but LISTEN_FDS=2"),
    ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID='me'"),
])
def test_malformed_listen_variables_are_usage_errors(env, words):
    env = {"LISTEN_PID": str(os.getpid()), **env}
    with pytest.raises(UsageError, match=re.escape(words)):
        sdnotify.listen_fds(env)
    assert not any(k.startswith("LISTEN_") for k in env)


# -- socket activation with real processes ---------------------------------------------------------
# The child: take the control socket as `cprd source` will, then answer one connection with what it
# saw. The outcome also goes to a file, since a refused child has no connection to answer on.
CHILD = r"""
import fcntl, json, os, socket, sys
from cprd.errors import UsageError
from cprd.sdnotify import control_listener_from_env

control, result = sys.argv[1], sys.argv[2]
setup = sys.argv[3] if len(sys.argv) > 3 else ""
if setup == "pipe":  # as a service manager that passed a pipe would
    r, w = os.pipe()
    os.dup2(r, 3)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="control")
elif setup == "count-too-high":
    r, w = os.pipe()
    os.dup2(r, 3)
    try:
        os.close(4)
    except OSError:
        pass
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
before = {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}

def report(obj):
    with open(result + ".tmp", "w") as f:
        json.dump(obj, f)
    os.rename(result + ".tmp", result)

try:
    s = control_listener_from_env(control)
except UsageError as e:
    report({"error": str(e), "before": before})
    sys.exit(3)
if s is None:
    report({"none": True, "before": before})
    sys.exit(4)
info = {"pid": os.getpid(), "fd": s.fileno(), "before": before,
        "after": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
        "cloexec": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "blocking": s.getblocking(), "family": int(s.family), "type": int(s.type),
        "others_cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                           for fd in range(3, 3 + int(before.get("LISTEN_FDS", "0"))) if fd != s.fileno()]}
report(info)
conn, _ = s.accept()
with conn:
    request = conn.recv(4096)
    conn.send(json.dumps({**info, "request": request.decode()}).encode())
s.close()
"""


class Activated:
    """`systemd-socket-activate OPTIONS... python -c CHILD` with its sockets in a directory."""

    def __init__(self, directory: Path, listen: list[str], *options: str) -> None:
        self.dir = directory
        self.paths = [str(directory / name) for name in listen]
        self.result = directory / "result.json"
        argv = [ACTIVATE, *options]
        for p in self.paths:
            argv += ["-l", p]
        argv += [sys.executable, "-c", CHILD, self.paths[-1], str(self.result)]
        self.log = open(directory / "activate.log", "w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not all(os.path.exists(p) for p in self.paths):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"systemd-socket-activate did not listen:\n{self.logs()}")
            time.sleep(0.01)

    def connect(self, kind: socket.SocketKind = socket.SOCK_SEQPACKET) -> socket.socket:
        """A client of the last socket. It exists once bound, and refuses until it listens."""
        deadline = time.monotonic() + 30
        while True:
            c = socket.socket(socket.AF_UNIX, kind)
            c.settimeout(30)
            try:
                if kind == socket.SOCK_DGRAM:
                    c.sendto(b"hello", self.paths[-1])
                else:
                    c.connect(self.paths[-1])
                return c
            except ConnectionRefusedError:
                c.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def outcome(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while not self.result.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"the activated child reported nothing:\n{self.logs()}")
            time.sleep(0.01)
        return json.loads(self.result.read_text())

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def activated(short_dir) -> Iterator:
    made: list[Activated] = []

    def start(listen: list[str], *options: str) -> Activated:
        a = Activated(short_dir, listen, *options)
        made.append(a)
        return a

    try:
        yield start
    finally:
        for a in made:
            a.close()


@needs_activate
@pytest.mark.parametrize("listen, options, fd, names", [
    (["control.sock"], ["--fdname=control"], 3, "control"),          # as cprd.socket passes it
    (["control.sock"], [], 3, None),                                   # one fd, no name: that one
    (["other.sock", "control.sock"], ["--fdname=other:control"], 4, "other:control"),  # picked by name
])
def test_socket_activated_child_serves_the_control_socket(activated, listen, options, fd, names):
    a = activated(listen, "--seqpacket", *options)
    with a.connect() as c:  # the connection waits in the backlog while the child starts
        c.send(b"status")
        answer = json.loads(c.recv(65536))
    assert a.proc.wait(30) == 0, a.logs()
    assert answer["request"] == "status"
    assert answer["fd"] == fd
    assert (answer["family"], answer["type"]) == (socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert answer["blocking"] is True and answer["cloexec"] is True
    assert answer["others_cloexec"] == [True] * (len(listen) - 1)
    before = answer["before"]
    assert before["LISTEN_PID"] == str(answer["pid"]) and before["LISTEN_FDS"] == str(len(listen))
    assert before.get("LISTEN_FDNAMES") == names
    assert answer["after"] == {}  # unset: a process cprd starts does not inherit them


@needs_activate
@pytest.mark.parametrize("listen, options, connect, found", [
    (["control.sock"], ["--fdname=control"], socket.SOCK_STREAM, "a listening AF_UNIX SOCK_STREAM socket"),
    (["control.sock"], ["--datagram", "--fdname=control"], socket.SOCK_DGRAM,
     "a non-listening AF_UNIX SOCK_DGRAM socket"),
    (["control.sock"], ["--seqpacket", "--accept"], socket.SOCK_SEQPACKET, "Accept=yes"),
    (["a.sock", "control.sock"], ["--seqpacket", "--fdname=a:b"], socket.SOCK_SEQPACKET,
     "none is named 'control'"),
])
def test_socket_activation_of_a_wrong_socket_is_refused_clearly(activated, listen, options, connect, found):
    a = activated(listen, *options)
    with a.connect(connect):
        out = a.outcome()
    assert "error" in out, out
    msg = out["error"]
    assert found in msg, msg
    assert f"LISTEN_FDS={len(listen)}" in msg
    if "named" in found:
        assert "FileDescriptorName=control" in msg
    else:
        assert f"ListenSequentialPacket={a.paths[-1]}" in msg


@pytest.mark.parametrize("setup, found", [
    ("pipe", "fd 3 named 'control': a pipe or FIFO"),
    ("count-too-high", "fd 4 is not open"),
])
def test_passed_fds_that_are_not_sockets_are_refused_clearly(short_dir, setup, found):
    result = short_dir / "result.json"
    r = subprocess.run([sys.executable, "-c", CHILD, str(short_dir / "control.sock"), str(result), setup],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    out = json.loads(result.read_text())
    assert found in out["error"], out
