"""An in-place upgrade with a stand-in (cprd/daemon/standin.py): while the new program starts, a
fork of the old one serves, mutations included, and journals every change to the new program. Each
test runs churn across the upgrade and kills the stand-in, the new program, or both, at each step:
exactly one process owns the table afterwards, and it holds every entry acknowledged, each the very
open file description the client put (kcmp)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import psutil
import pytest

from cprd.client import Client
from helpers import close_copies, hold_copies, num_fds, settled_fds, snapshot
from test_handoff_e2e import prove_same
from test_upgrade import SPEC, _memfd_of, pids_holding



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
                    self.failed.append(repr(e))
                    os.close(ev)
                i += 1
                time.sleep(0.002)

    def __enter__(self) -> Churn:
        self.t.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)
        self.stop.set()
        self.t.join(60)
        assert not self.t.is_alive()


def _program(tmp_path, env: str) -> str:
    p = tmp_path / "faulty-cprd"
    p.write_text(f'#!/bin/sh\n{env} exec {sys.executable} -m cprd "$@"\n')
    p.chmod(0o755)
    return str(p)


CASES = {
    # name: (fault in the stand-in, fault in the new program, who serves afterwards)
    "standin-killed-right-after-the-fork": ("standin:forked", "", "daemon"),
    "standin-killed-when-asked-to-stop": ("standin:takeover", "", "daemon"),
    "standin-killed-after-done": ("standin:done", "", "daemon"),
    "new-program-killed-before-asking": ("", "upgrade:restored", "standin"),
    "new-program-killed-after-asking": ("", "upgrade:asked", "standin"),
    "new-program-killed-after-taken": ("", "upgrade:taken", "guardian"),
    "both-killed": ("standin:takeover", "upgrade:asked", "guardian"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failure_at_each_step_leaves_one_owner_with_every_acknowledged_entry(cluster, tmp_path, case):
    standin_fault, new_fault, owner = CASES[case]
    src = cluster.source(SPEC, env={"CPRD_FAULT": standin_fault} if standin_fault else None)
    with cluster.client() as c:
        copies = hold_copies(c)
    args = ["--program", _program(tmp_path, f"CPRD_FAULT={new_fault}")] if new_fault else []
    serving = None
    try:
        with Churn(cluster.control) as churn:
            r = cluster.ctl("upgrade", "--json", *args)
        assert not churn.failed, churn.failed
        assert len(churn.mine) > 20, "puts went on across the upgrade"
        res = json.loads(r.stdout)
        serving = res["pid"]
        logs = cluster.logs()
        for fault in (standin_fault, new_fault):
            if fault:
                side, step = fault.split(":")
                assert f"event=fault_fired side={side} step={step}" in logs, logs
        if owner == "daemon":  # the new program took over from the journal alone
            assert r.returncode == 0 and not res["rolled_back"] and serving == src.pid, (r.stdout, r.stderr)
            assert res["standin_handed_over"] is (standin_fault == "standin:done")  # Done came before it died
        else:
            assert r.returncode == 1 and res["rolled_back"] is True, (r.stdout, r.stderr)
            assert serving != src.pid and src.wait(10) == -signal.SIGKILL
            assert "died before it confirmed" in res["reason"]
            if owner == "standin":
                assert "the stand-in (pid" in res["reason"]
            else:
                assert "the guardian restored" in res["reason"]
        with cluster.client() as c:
            st = c.status()
            assert st["pid"] == serving and st["state"] == "serving"
            assert st["entries"] == len(copies) + len(churn.mine)
        prove_same(cluster, {**copies, **churn.mine})
        with cluster.client() as c:
            before = snapshot(c)
        assert pids_holding(_memfd_of(before)) == {serving, os.getpid()}, "exactly one process holds the table"
    finally:
        close_copies(copies)
        if "churn" in locals():
            close_copies(churn.mine)
        if serving and serving != src.pid:
            os.kill(serving, signal.SIGTERM)
            psutil.Process(serving).wait(10)


def test_mutations_during_the_upgrade_reach_the_new_program_and_the_stand_in_exits(cluster):
    src = cluster.source(SPEC)
    with cluster.client() as c:
        copies = hold_copies(c)
    base = num_fds(src.pid)
    try:
        with Churn(cluster.control) as churn:
            r = cluster.ctl("upgrade", "--json")
        assert r.returncode == 0 and not churn.failed, (r.stderr, churn.failed)
        res = json.loads(r.stdout)
        assert res["pid"] == src.pid and res["standin_handed_over"] is True
        assert res["standin_journal"] > 0, "the stand-in served puts and journaled them"
        assert not psutil.pid_exists(res["standin_pid"]) or \
            psutil.Process(res["standin_pid"]).status() == psutil.STATUS_ZOMBIE
        assert not [p for p in psutil.Process(src.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        prove_same(cluster, {**copies, **churn.mine})
        with cluster.client() as c:
            assert c.status()["upgrades"] == 1
        want = base + len(churn.mine)  # the puts, and nothing else: no journal, pidfd or state left open
        assert settled_fds(src.pid, want) == want
    finally:
        close_copies(copies)
        close_copies(churn.mine)
