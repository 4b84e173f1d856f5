"""The examples in examples/: each one's single command, run as a user would (a subprocess, small
sizes), judged by its exit code and the counts in its printed summary. Each run must also stop
every process it started and remove its temporary directory."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from cprd.client import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def tmpdir_short():
    """A short private TMPDIR for the example (its UNIX socket paths must stay under 108 bytes)."""
    d = tempfile.mkdtemp(prefix="cprd-ex-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_example(tmpdir: Path, script: str, *args: str, env: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "TMPDIR": str(tmpdir), **(env or {})}
    if not env or "CPRD_CONTROL" not in env:
        e.pop("CPRD_CONTROL", None)
    p = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(tmpdir) in arg for arg in proc.info["cmdline"] or []):
            left.append(proc)
    for proc in left:  # do not leak them into the next test, but fail this one
        proc.kill()
    assert not left, f"{script} left processes behind: {[q.info for q in left]}\n{p.stdout}\n{p.stderr}"
    assert not list(tmpdir.iterdir()), f"{script} left files behind: {list(tmpdir.iterdir())}"
    return p


def field(pattern: str, text: str) -> tuple[int, ...]:
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return tuple(int(g) for g in m.groups())


# -- zero_downtime_server ---------------------------------------------------------------------------
def check_zero_downtime(p: subprocess.CompletedProcess, restarts: int,
                        handoffs: int = 1) -> tuple[int, int, int]:
    out = p.stdout
    assert p.returncode == 0, f"exit code {p.returncode}\n{out}\n{p.stderr}"
    sent, answered, failed, non200 = field(
        r"requests: sent (\d+), answered (\d+), failed connections (\d+), non-200 (\d+)", out)
    assert sent > 0 and answered == sent and failed == 0 and non200 == 0, out
    n_restarts, n_servers, n_answering = field(
        r"restarts: (\d+), server processes: (\d+), that answered requests: (\d+)", out)
    assert (n_restarts, n_servers) == (restarts, restarts + 1), out
    assert field(r"cprd: handoffs (\d+), in-place upgrades (\d+)", out) == (handoffs, 1), out
    restart_lines = re.findall(r"^  restart +\d+: pid \d+ ready in .* \(socket from cprd pid \d+\)", out,
                               re.MULTILINE)
    assert len(restart_lines) == restarts, out
    assert "result: OK" in out
    (served,) = field(r"the servers' own count: (\d+) answered", out)
    return answered, served, n_answering


@pytest.mark.slow
def test_zero_downtime_server_python_load(tmpdir_short):
    p = run_example(tmpdir_short, "zero_downtime_server/run.py", "--restarts", "4", "--load", "python")
    answered, served, n_answering = check_zero_downtime(p, 4)
    assert "python (" in p.stdout
    # The Python load counts every request itself: what the servers answered is what it received, and
    # each of the 5 servers answered some (the load runs on across every step of every restart).
    assert served == answered
    assert n_answering == 5


@pytest.mark.slow
@pytest.mark.requires("wrk")
def test_zero_downtime_server_wrk_load(tmpdir_short):
    p = run_example(tmpdir_short, "zero_downtime_server/run.py", "--restarts", "3", "--load", "wrk")
    answered, served, _ = check_zero_downtime(p, 3)
    assert "wrk (" in p.stdout
    assert served >= answered  # wrk drops the requests in flight when it is stopped


@pytest.mark.slow
def test_zero_downtime_server_with_an_existing_cprd(cluster, tmpdir_short):
    """With $CPRD_CONTROL the example uses that cprd: upgraded in place, same pid, and the example's
    entry is gone again at the end (its port released)."""
    src = cluster.source()
    p = run_example(tmpdir_short, "zero_downtime_server/run.py", "--restarts", "2", "--load", "python",
                    "--no-handoff", env={"CPRD_CONTROL": cluster.control})
    check_zero_downtime(p, 2, handoffs=0)
    with Client(cluster.control) as c:
        st = c.status()
        assert st["pid"] == src.pid and st["upgrades"] == 1
        assert c.ls() == []


def test_wrk_summary_is_parsed_with_its_error_lines():
    spec = importlib.util.spec_from_file_location("zd_run", EXAMPLES / "zero_downtime_server" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while they are made
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    clean = ("Running 30s test @ http://127.0.0.1:1/\n  2 threads and 8 connections\n"
             "  1234 requests in 2.00s, 1MB read\n")
    r = mod.parse_wrk(clean, 0, "-t2 -c8")
    assert (r.sent, r.answered, r.failed, r.bad_status) == (1234, 1234, 0, 0)
    broken = clean + "  Socket errors: connect 3, read 2, write 1, timeout 4\n  Non-2xx or 3xx responses: 5\n"
    r = mod.parse_wrk(broken, 0, "-t2 -c8")
    assert (r.sent, r.answered, r.failed, r.bad_status) == (1234 + 2 + 1 + 4, 1234 - 5, 3 + 2 + 1 + 4, 5)
    with pytest.raises(mod.Failed, match="without a summary"):
        mod.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n", 1, "-t2 -c8")


# -- fdstore_server ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.requires("wrk", "python3-systemd")
def test_fdstore_server_keeps_every_keep_alive_connection_across_kill_9(tmpdir_short):
    """A server that knows only systemd's protocol, restarted 5 times (3 by SIGKILL) under wrk while
    cprd is handed off and upgraded: no socket error, no failed request, no connection opened again."""
    p = run_example(tmpdir_short, "fdstore_server/run.py", "--restarts", "5", "--connections", "8",
                    "--settle", "0.3")
    out = p.stdout
    assert p.returncode == 0, f"exit code {p.returncode}\n{out}\n{p.stderr}"
    assert len(re.findall(r"^  restart \d: pid \d+ killed \(SIGKILL\); pid \d+ ready in \d+ ms with 8 "
                          r"connections back$", out, re.MULTILINE)) == 3, out
    assert len(re.findall(r"^  restart \d: .*SIGTERM.* with 8 connections back$", out, re.MULTILINE)) == 2, out
    assert "cprd handed off to pid" in out and "cprd upgraded in place" in out
    (done, errors, non2xx) = field(r"wrk: (\d+) requests done, socket errors (\d+), non-2xx (\d+)", out)
    assert done > 0 and errors == 0 and non2xx == 0, out
    assert field(r"connections accepted after the first server: (\d+)", out) == (0,)
    assert "store after wrk closed its connections: ['listen']" in out and "result: OK" in out


# -- vm_handoff -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vm_handoff(tmpdir_short):
    p = run_example(tmpdir_short, "vm_handoff/run.py", "--ticks", "300", "--ram-mb", "2", "--devices", "3")
    out = p.stdout
    assert p.returncode == 0, f"exit code {p.returncode}\n{out}\n{p.stderr}"
    assert field(r"counter before: (\d+), found: (\d+) \(as expected\)", out) == (300, 300)
    assert field(r"counter after: (\d+) \(as expected\)", out) == (600,)
    assert field(r"found (\d+) fds by \(name, id\)", out) == (1 + 3 * 5,)
    assert len(re.findall(r"vfio/\d{4}: region header ok, irqs pending \[\d+, \d+\] \(as expected\), queued "
                          r"command 'sync counter=300' \(as expected\)", out)) == 3
    assert "MISMATCH" not in out
    assert field(r"vm-handoff: OK: counter (\d+) -> (\d+)", out) == (300, 600)


# -- fd_churn ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fd_churn(tmpdir_short):
    p = run_example(tmpdir_short, "fd_churn/run.py", "--fds", "200", "--rate", "200", "--handoffs", "2",
                    "--duration", "2")
    out = p.stdout
    assert p.returncode == 0, f"exit code {p.returncode}\n{out}\n{p.stderr}"
    assert "$ cprd stress --fds 200 --rate 200.0 --handoffs 2" in out
    (ops,) = field(r"ops: (\d+) \(", out)
    assert ops > 0
    assert field(r"failed: (\d+)   violations: (\d+)", out) == (0, 0)
    assert field(r"handoffs: (\d+)", out) == (2,)
    handoffs = re.findall(r"^    \d\. to pid \d+: \d+ entries in [\d.]+ ms, freeze [\d.]+ ms", out,
                          re.MULTILINE)
    assert len(handoffs) == 2, out
    assert re.search(r"client stall ms: p50 [\d.]+, p99 [\d.]+, max [\d.]+", out), out
    assert "result: OK" in out


# -- the README -------------------------------------------------------------------------------------
def test_readme_gives_each_example_its_one_command():
    text = (EXAMPLES / "README.md").read_text()
    for cmd in ("python examples/zero_downtime_server/run.py", "python examples/vm_handoff/run.py",
                "python examples/fd_churn/run.py", "python examples/mini_vmm/run.py"):
        assert cmd in text, cmd
