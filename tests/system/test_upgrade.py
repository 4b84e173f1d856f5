"""Exec-style in-place upgrade: same PID, every fd kept, and a rollback for every way the new
program can fail, with real processes and deliberately broken "new versions"."""

from __future__ import annotations

import bisect
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest

from cprd.client import Client
from helpers import UPGRADE_SPEC as SPEC
from helpers import assert_sole_holder, close_copies, hold_copies, num_fds, prove_same, settled_fds, snapshot


def _program(tmp_path, name: str, body: str, mode: int = 0o755) -> str:
    p = tmp_path / name
    p.write_text(body.replace("{python}", sys.executable))
    p.chmod(mode)
    return str(p)


def _upgrade(cluster, *args):
    r = cluster.ctl("upgrade", "--json", *args)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), r.stderr


class Hammer:
    """Clients (`threads` of them) that connect afresh for every request during upgrades: none may be
    refused or fail. Each request's start, end and the upgrade count its answer gave are kept, which
    says which program answered it: the one before an upgrade (the old program, or its stand-in) or the
    one after."""

    def __init__(self, path: str, threads: int = 2) -> None:
        assert threads >= 2, "a request in flight across a switch needs another client's answer to date it"
        self.path, self.stop, self.failed = path, threading.Event(), []
        self.done: list[tuple[float, float, int]] = []  # (start, end, upgrades the answer gave)
        self.ts = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with Client(self.path, timeout=30) as c:
                    n = c.status()["upgrades"]
                self.done.append((t0, time.monotonic(), n))
            except Exception as e:  # noqa: BLE001 - any failure at all is a failure of the test
                self.failed.append(repr(e))

    @property
    def ok(self) -> int:
        return len(self.done)

    def waited_through(self, k: int) -> int:
        """Requests answered by the program of upgrade k that had begun before the last answer of the
        program before it reached another client: they were in flight across the switch, waited,
        and were answered by the new program (by the clients' own clock and the answers' counts, not
        by the daemon's account of its freeze)."""
        last_old = max((b for _, b, n in self.done if n == k - 1), default=None)
        assert last_old is not None, f"no request was answered before upgrade {k}"
        return sum(1 for a, _, n in self.done if n == k and a < last_old)

    def went_back(self) -> list[tuple[float, int, int]]:
        """Requests begun after another request had been answered by the program of a later upgrade
        (the old program answering after the new one served): (start, its count, the later count)."""
        ends = sorted((b, n) for _, b, n in self.done)
        best, seen = [], 0
        for _, n in ends:
            seen = max(seen, n)
            best.append(seen)
        bad = []
        for a, _, n in self.done:
            i = bisect.bisect_left(ends, (a, -1))  # the answers that reached their clients before a
            if i and best[i - 1] > n:
                bad.append((a, n, best[i - 1]))
        return bad

    def __enter__(self) -> Hammer:
        for t in self.ts:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.ts:
            t.join(30)
            assert not t.is_alive()


def test_upgrade_in_place_keeps_pid_fds_and_clients(cluster):
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
        copies = hold_copies(c)
    base = num_fds(src.pid)
    try:
        with Hammer(cluster.control, threads=2) as h:
            for k in range(1, 4):
                while sum(1 for *_, n in h.done if n == k - 1) < 20:  # clients served before each upgrade
                    time.sleep(0.01)
                code, res, err = _upgrade(cluster)
                assert code == 0, err
                assert res["pid"] == src.pid and not res["rolled_back"] and res["entries"] == len(before)
                assert res["ms"] > 0
                while sum(1 for *_, n in h.done if n == k) < 20:  # and after it
                    assert not h.failed, h.failed
                    time.sleep(0.01)
        assert h.failed == [] and h.ok > 0
        assert {n for *_, n in h.done} == {0, 1, 2, 3}, "every program answered, one upgrade after another"
        for k in range(1, 4):
            assert h.waited_through(k) > 0, f"no request was in flight across upgrade {k}"
        assert not h.went_back(), f"an older program answered after a newer one: {h.went_back()[:5]}"
        with cluster.client() as c:
            st = c.status()
            assert st["pid"] == src.pid and st["upgrades"] == 3
            assert snapshot(c) == before
        prove_same(cluster, copies)
    finally:
        close_copies(copies)
    assert settled_fds(src.pid, base) == base, "no fd leaked, no guardian left open"
    assert not [p for p in psutil.Process(src.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
    assert_sole_holder(cluster.control, src.pid)  # every entry, by kcmp: no stand-in or guardian holds any


def test_upgrade_to_another_program(cluster, tmp_path):
    src = cluster.source(SPEC)
    mark = tmp_path / "newer-ran"
    newer = _program(tmp_path, "newer-cprd", f'#!/bin/sh\necho "$$" > {mark}\nexec {{python}} -m cprd "$@"\n')
    code, res, err = _upgrade(cluster, "--program", newer)
    assert code == 0, err
    assert res["pid"] == src.pid and res["program"][0] == newer and not res["rolled_back"]
    assert mark.read_text().strip() == str(src.pid), "the new program ran, in the daemon's own pid"


@pytest.mark.parametrize("case", ["missing", "not-executable", "bad-interpreter", "not-a-program"])
def test_exec_failure_leaves_the_old_program_serving(cluster, tmp_path, case):
    """Refused before anything is forked (missing, not executable, an interpreter that is not there),
    or an exec that fails after the fork (a file the kernel cannot run: ENOEXEC): the previous program
    takes the table back in the daemon's own pid and the client is told."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
    base = num_fds(src.pid)
    prog = {
        "missing": str(tmp_path / "no-such-cprd"),
        "not-executable": _program(tmp_path, "plain", "#!/bin/sh\n", 0o644),
        "bad-interpreter": _program(tmp_path, "badinterp", "#!/nonexistent/python\n"),
        "not-a-program": _program(tmp_path, "garbage", "this is no program and has no #! line\n"),
    }[case]
    code, res, err = _upgrade(cluster, "--program", prog)
    if case == "not-a-program":  # it got as far as the exec, in the daemon's pid, which took the table back
        assert code == 1 and res["rolled_back"] is True and res["pid"] == src.pid, (res, err)
        assert f"cannot run {prog}: Exec format error" in res["reason"], res
        assert f"took the table back in pid {src.pid} and goes on serving" in res["reason"], res
    else:
        assert code != 0 and "goes on serving" in err and prog in err, err
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid and c.status()["state"] == "serving"
        assert snapshot(c) == before
        ev = os.eventfd(0)
        try:
            c.put("after", 1, ev)  # mutations flow again
        finally:
            os.close(ev)
        c.delete("after", 1)
    assert settled_fds(src.pid, base) == base
    for fd in os.listdir(f"/proc/{src.pid}/fd"):  # every fd close-on-exec again
        flags = int(open(f"/proc/{src.pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
        assert flags & 0o2000000 or int(fd) <= 2, f"fd {fd} lost close-on-exec"
    assert not [p for p in psutil.Process(src.pid).children() if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("case", ["raises", "unknown-state-version"])
def test_new_program_that_cannot_restore_rolls_back_in_the_same_pid(cluster, tmp_path, case):
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
    env = {"raises": "CPRD_FAULT=restore:raise", "unknown-state-version": "CPRD_TEST_STATE_VERSION=0"}[case]
    prog = _program(tmp_path, "broken-cprd", f'#!/bin/sh\n{env} exec {{python}} -m cprd "$@"\n')
    code, res, err = _upgrade(cluster, "--program", prog)
    assert code == 1 and res["rolled_back"] is True and res["pid"] == src.pid
    assert ("restore raises" if case == "raises" else "newer than this program reads") in res["reason"]
    with cluster.client() as c:
        assert c.status()["pid"] == src.pid
        assert snapshot(c) == before
    code, res, err = _upgrade(cluster)  # and a good upgrade still works afterwards
    assert code == 0 and res["pid"] == src.pid


def test_new_program_killed_before_it_takes_over_leaves_the_stand_in_owning(cluster, tmp_path):
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
        copies = hold_copies(c)
    killer = _program(tmp_path, "killer-cprd", "#!/bin/sh\nkill -9 $$\n")
    restored = None
    try:
        code, res, err = _upgrade(cluster, "--program", killer)
        assert code == 1 and res["rolled_back"] is True, err
        assert "died before it took over; the stand-in (pid" in res["reason"]
        restored = res["pid"]
        assert restored != src.pid and psutil.Process(restored).name() == "cprd-standin", "the stand-in keeps it"
        assert src.wait(10) == -signal.SIGKILL
        with cluster.client() as c:
            assert c.status()["pid"] == restored
            assert snapshot(c) == before
        prove_same(cluster, copies)
        assert_sole_holder(cluster.control, restored)
    finally:
        close_copies(copies)
        if restored:
            os.kill(restored, signal.SIGTERM)
            psutil.Process(restored).wait(10)


def test_sighup_upgrades_and_sd_notify_speaks_the_reload_protocol(cluster, tmp_path):
    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(30)
    src = cluster.source("eventfds=20", env={"NOTIFY_SOCKET": path})

    def next_msg() -> dict[str, str]:
        return dict(line.split("=", 1) for line in ns.recv(4096).decode().splitlines())

    first = next_msg()
    assert first["READY"] == "1" and "20 entries" in first["STATUS"]
    os.kill(src.pid, signal.SIGHUP)
    reloading = next_msg()
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    again = next_msg()
    assert again["READY"] == "1" and "MAINPID" not in again
    with cluster.client() as c:
        st = c.status()
    assert st["pid"] == src.pid and st["upgrades"] == 1 and st["entries"] == 20
    ns.close()


def test_no_leftover_state_or_close_on_exec_slip(cluster):
    src = cluster.source("eventfds=10")
    code, res, err = _upgrade(cluster)
    assert code == 0, err
    for fd in os.listdir(f"/proc/{src.pid}/fd"):
        link = os.readlink(f"/proc/{src.pid}/fd/{fd}")
        assert "cprd-state" not in link, "the state memfd is closed once restored"
        if int(fd) > 2:
            info = open(f"/proc/{src.pid}/fdinfo/{fd}").read()
            flags = int(info.split("flags:")[1].split()[0], 8)
            assert flags & 0o2000000, f"fd {fd} ({link}) is inheritable after the upgrade"
    assert stat.S_ISSOCK(os.stat(cluster.control).st_mode)


def _stop_restored(pid: int | None) -> None:
    if pid:
        os.kill(pid, signal.SIGTERM)
        psutil.Process(pid).wait(10)


def test_new_program_that_never_confirms_is_killed_with_what_it_forked_and_rolled_back(cluster, tmp_path):
    """A new program that hangs (here a script with a child in the background and one in the
    foreground, both holding every fd of the table, and one that escapes its group) is killed, its
    whole process group with it, once the deadline passes; the stand-in keeps the table, and the
    guardian kills what escaped (it holds the upgrade's state)."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
        copies = hold_copies(c)
    # a child in the background that closed the upgrade's state (only a kill of the group finds it), one
    # that escapes the group (only the state it holds finds it), one in the foreground
    hang = _program(tmp_path, "hanging-cprd",
                    '#!/bin/sh\nfor a in "$@"; do [ "$prev" = --restore-fd ] && fd=$a; prev=$a; done\n'
                    '( setsid sleep 100000 & )\n'
                    '{python} -c "import os, sys, time; os.close(int(sys.argv[1])); time.sleep(100000)" "$fd" &\n'
                    'sleep 100000\n')
    restored = None
    try:
        code, res, err = _upgrade(cluster, "--program", hang, "--timeout", "2")
        assert code == 1 and res["rolled_back"] is True, err
        assert "did not ask to take over within 2 s; the stand-in killed its process group" in res["reason"]
        restored = res["pid"]
        assert psutil.Process(restored).name() == "cprd-standin"
        assert restored != src.pid and src.wait(10) == -signal.SIGKILL
        with cluster.client() as c:
            assert c.status()["pid"] == restored and c.status()["state"] == "serving"
            assert snapshot(c) == before
        prove_same(cluster, copies)
        # the sleeps were killed (a killed process may still be closing its fds): none is left holding any entry
        assert_sole_holder(cluster.control, restored)
    finally:
        close_copies(copies)
        _stop_restored(restored)


def test_new_program_that_dies_leaving_a_child_with_its_fds_is_rolled_back(cluster, tmp_path):
    """The stand-in and the guardian watch the daemon's pid (a pidfd), not a pipe: a child the new
    program forked keeps the pipes' ends open after the program itself is gone."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
    dying = _program(tmp_path, "dying-cprd", "#!/bin/sh\nsleep 100000 &\nkill -9 $$\n")
    restored = None
    try:
        code, res, err = _upgrade(cluster, "--program", dying, "--timeout", "60")
        assert code == 1 and res["rolled_back"] is True, err
        assert "died before it took over; the stand-in (pid" in res["reason"]
        restored = res["pid"]
        assert psutil.Process(restored).name() == "cprd-standin"
        assert src.wait(10) == -signal.SIGKILL
        with cluster.client() as c:
            assert c.status()["pid"] == restored
            assert snapshot(c) == before
        assert_sole_holder(cluster.control, restored)
    finally:
        _stop_restored(restored)


def test_a_wrapper_that_forks_before_it_execs_cprd_leaves_nobody_else_holding_the_table(cluster, tmp_path):
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
    wrapper = _program(tmp_path, "wrapper-cprd", '#!/bin/sh\nsleep 100000 &\nexec {python} -m cprd "$@"\n')
    code, res, err = _upgrade(cluster, "--program", wrapper)
    assert code == 0 and not res["rolled_back"] and res["pid"] == src.pid, err
    with cluster.client() as c:
        assert snapshot(c) == before
    assert_sole_holder(cluster.control, src.pid)
    assert "event=upgrade_strays_killed" in cluster.logs()
    assert not [p for p in psutil.Process(src.pid).children() if p.status() != psutil.STATUS_ZOMBIE]


def test_upgrade_timeout_and_program_are_checked(cluster, tmp_path):
    src = cluster.source("eventfds=3")
    for bad in ("0", "-1", "7200"):
        r = cluster.ctl("upgrade", "--timeout", bad)
        assert r.returncode == 2 and "--timeout" in r.stderr, r.stderr
    writable = _program(tmp_path, "writable-cprd", '#!/bin/sh\nexec {python} -m cprd "$@"\n', 0o777)
    code, _, err = _upgrade(cluster, "--program", writable)
    assert code == 2 and "mode 0777" in err and "goes on serving" in err
    with cluster.client() as c:
        st = c.status()
        assert st["pid"] == src.pid and st["upgrades"] == 0 and st["state"] == "serving"


def test_a_rollback_runs_the_cprd_module_not_a_program_an_earlier_upgrade_named(cluster, tmp_path):
    """Found by a hostile probe: a rollback ran the last --program again (a wrapper, unchecked, with
    every fd); it runs the interpreter's cprd module, as docs/protocol.md 6.2 says."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
    runs = tmp_path / "wrapper-runs"
    wrapper = _program(tmp_path, "wrapper-cprd", f'#!/bin/sh\necho run >> {runs}\nexec {{python}} -m cprd "$@"\n')
    code, res, err = _upgrade(cluster, "--program", wrapper)
    assert code == 0 and res["pid"] == src.pid, err
    hang = _program(tmp_path, "hanging-cprd", "#!/bin/sh\nsleep 100000\n")
    restored = None
    try:
        code, res, err = _upgrade(cluster, "--program", hang, "--timeout", "1")
        assert code == 1 and res["rolled_back"], err
        restored = res["pid"]
        assert "the stand-in killed its process group" in res["reason"], res
        assert restored != src.pid and psutil.Process(restored).name() == "cprd-standin", "the stand-in owns"
        with cluster.client() as c:
            assert c.status()["pid"] == restored and snapshot(c) == before
        assert_sole_holder(cluster.control, restored)
        assert runs.read_text() == "run\n", "the wrapper ran once, for its own upgrade"
        assert psutil.Process(restored).cmdline()[1:3] == ["-m", "cprd"]
    finally:
        _stop_restored(restored)


def test_a_wrapper_child_that_escapes_its_group_and_parent_is_found_by_the_state_it_holds(cluster, tmp_path):
    """setsid and a double fork leave both the process group and the parent: the child still holds
    the upgrade's state memfd, which nothing else can, and cprd kills it once it has restored."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        before = snapshot(c)
    wrapper = _program(tmp_path, "escaping-cprd",
                       '#!/bin/sh\n( setsid sleep 100000 & )\nexec {python} -m cprd "$@"\n')
    code, res, err = _upgrade(cluster, "--program", wrapper)
    assert code == 0 and res["pid"] == src.pid, err
    with cluster.client() as c:
        assert snapshot(c) == before
    assert_sole_holder(cluster.control, src.pid)
    assert "event=upgrade_strays_killed" in cluster.logs()


def test_an_upgrade_never_kills_a_process_that_shared_the_daemons_group(cluster, tmp_path):
    """Found by review: a daemon started in a shell pipeline (`cprd source ... | tee log`) leads a process
    group that other processes share; the strays' sweep and every fence killed that whole group. Now
    the group is killed only when the daemon had it to itself; here a process it did not start stays,
    through a successful upgrade and through one whose new program is fenced."""
    src = cluster.spawn("source", "--control", cluster.control, "--populate", "eventfds=5",
                        preexec_fn=os.setpgrp)  # it leads its own group, like the first command of a pipeline
    from cprd.tools.procs import wait_for_socket

    wait_for_socket(cluster.control, src)
    bystander = subprocess.Popen(["sleep", "600"], preexec_fn=lambda: os.setpgid(0, src.pid))
    restored = None
    try:
        assert os.getpgid(bystander.pid) == src.pid
        code, res, err = _upgrade(cluster)
        assert code == 0 and not res["rolled_back"], err
        hang = _program(tmp_path, "hanging-cprd", "#!/bin/sh\nsleep 100000\n")
        code, res, err = _upgrade(cluster, "--program", hang, "--timeout", "2")
        assert code == 1 and res["rolled_back"], err
        restored = res["pid"]
        assert bystander.poll() is None, "the process sharing the daemon's group was killed"
        assert psutil.Process(restored).name() == "cprd-standin"
    finally:
        bystander.kill()
        bystander.wait()
        _stop_restored(restored)
