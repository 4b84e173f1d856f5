"""An in-place upgrade with a stand-in (cprd/daemon/standin.py): while the new program starts, a
fork of the old one serves, mutations included, and journals every change to the new program. Each
test runs churn across the upgrade and kills the stand-in, the new program, or both, at each step:
exactly one process owns the table afterwards, and it holds every entry acknowledged, each the very
open file description the client put (kcmp)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from cprd.client import Client
from cprd.daemon.takeover import TakeOver, Journal
from cprd.protocol import upgrade as pu
from cprd.protocol.upgrade import Ev
from cprd.table import FdTable
from helpers import UPGRADE_SPEC as SPEC
from helpers import Churn, ChurnWithDeletes, assert_sole_holder, child_named, close_copies, hold_copies, num_fds
from helpers import prove_same, settled_fds



def _program(tmp_path, env: str) -> str:
    p = tmp_path / "faulty-cprd"
    p.write_text(f'#!/bin/sh\n{env} exec {sys.executable} -m cprd "$@"\n')
    p.chmod(0o755)
    return str(p)


def _one_owner_holds_every_acknowledged_entry(cluster, serving: int, copies: dict, churn: Churn) -> None:
    """The daemon in pid `serving` serves every entry acknowledged, each the very open file
    description put (kcmp), and no other process (guardian, stand-in, new program) holds the table."""
    with cluster.client() as c:
        st = c.status()
        assert st["pid"] == serving and st["state"] == "serving"
        assert st["entries"] == len(copies) + len(churn.mine)
    prove_same(cluster, {**copies, **churn.mine})
    assert_sole_holder(cluster.control, serving)  # every entry, by kcmp: nobody else holds any of it


def _clean_up(src, serving: int | None, copies: dict, churn: Churn | None) -> None:
    close_copies(copies)
    if churn is not None:
        close_copies(churn.mine)
    if serving and serving != src.pid:  # the cluster stops the daemons it started, not a stand-in
        os.kill(serving, signal.SIGTERM)
        psutil.Process(serving).wait(10)


CASES = {
    # name: (fault in the stand-in, fault in the new program, who serves afterwards)
    "standin-killed-right-after-the-fork": ("standin:forked", "", "daemon"),
    "standin-killed-when-asked-to-stop": ("standin:takeover", "", "daemon"),
    "standin-killed-after-done": ("standin:done", "", "daemon"),
    "new-program-killed-before-asking": ("", "upgrade:restored", "standin"),
    "new-program-killed-after-asking": ("", "upgrade:asked", "standin"),
    # K is out: the stand-in either reads it while the new program still lives (it releases: the
    # guardian restores) or sees it dead first (it keeps the table); either way one owner
    "new-program-killed-after-taken": ("", "upgrade:taken", "standin|guardian"),
    "new-program-killed-after-released": ("", "upgrade:released", "guardian"),
    # the stand-in may meet the new program's death first (its journal of a churned put breaks): it
    # fences the others and keeps the table before its own fault can fire; else both die: the guardian
    "both-killed": ("standin:takeover", "upgrade:asked", "standin|guardian"),
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
        # (a request that failed here once, beside other work, never again since: should it come back, the
        # daemons' own account of the upgrade says when and why)
        assert not churn.failed, (churn.failed, r.stdout, cluster.logs()[-6000:])
        assert len(churn.mine) > 20, "puts went on across the upgrade"
        res = json.loads(r.stdout)
        serving = res["pid"]
        logs = cluster.logs()
        kept = "the stand-in (pid" in (res.get("reason") or "") and case == "both-killed"
        for fault in (standin_fault, new_fault):
            if fault and not (kept and fault == standin_fault):
                side, step = fault.split(":")
                assert f"event=fault_fired side={side} step={step}" in logs, logs
        if owner == "daemon":  # the new program took over from the journal alone
            assert r.returncode == 0 and not res["rolled_back"] and serving == src.pid, (r.stdout, r.stderr)
            assert res["standin_handed_over"] is (standin_fault == "standin:done")  # Done came before it died
        else:
            assert r.returncode == 1 and res["rolled_back"] is True, (r.stdout, r.stderr)
            assert serving != src.pid and src.wait(10) == -signal.SIGKILL
            assert "died before it took over" in res["reason"]
            who = "standin" if "the stand-in (pid" in res["reason"] else "guardian"
            assert who in owner.split("|"), res["reason"]
            if who == "guardian":
                assert "the guardian restored" in res["reason"]
            # the process that answers is the one the reason names (the stand-in renamed itself)
            assert (psutil.Process(serving).name() == "cprd-standin") is (who == "standin")
        _one_owner_holds_every_acknowledged_entry(cluster, serving, copies, churn)
    finally:
        _clean_up(src, serving, copies, locals().get("churn"))


def test_mutations_during_the_upgrade_reach_the_new_program_and_the_stand_in_exits(cluster):
    """Puts and deletes go on across the upgrade: each put acknowledged is the very fd put (kcmp), each
    delete acknowledged is gone, and the table holds nothing else (a change applied twice, or a
    delete the new program skipped, shows in its count)."""
    src = cluster.source(SPEC)
    with cluster.client() as c:
        copies = hold_copies(c)
    base = num_fds(src.pid)
    try:
        with ChurnWithDeletes(cluster.control) as churn:
            r = cluster.ctl("upgrade", "--json")
        assert r.returncode == 0 and not churn.failed, (r.stderr, churn.failed)
        assert len(churn.deleted) > 10, "deletes went on across the upgrade"
        res = json.loads(r.stdout)
        assert res["pid"] == src.pid and res["standin_handed_over"] is True
        assert res["standin_journal"] > 0, "the stand-in served puts and journaled them"
        assert not psutil.pid_exists(res["standin_pid"]) or \
            psutil.Process(res["standin_pid"]).status() == psutil.STATUS_ZOMBIE
        assert not [p for p in psutil.Process(src.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        prove_same(cluster, {**copies, **churn.mine})  # exactly these entries: no delete undone
        with cluster.client() as c:
            assert c.status()["upgrades"] == 1
            served = {(e["name"], e["id"]) for e in c.ls()}
        assert not served & churn.deleted, f"deletes undone: {sorted(served & churn.deleted)[:5]}"
        want = base + len(churn.mine)  # the puts, and nothing else: no journal, pidfd or state left open
        assert settled_fds(src.pid, want) == want
    finally:
        close_copies(copies)
        close_copies(churn.mine)


def _kept_by_the_stand_in(cluster, fault: str, check) -> None:
    """An upgrade under churn with CPRD_FAULT=fault that the stand-in must end by keeping the table:
    the upgrade rolled back, the stand-in serving (not the daemon's pid), every acknowledged put
    there (kcmp), nobody else holding the table; check(src, res, logs, churn) adds the case's own."""
    src = cluster.source(SPEC, env={"CPRD_FAULT": fault})
    with cluster.client() as c:
        copies = hold_copies(c)
    serving = None
    try:
        with Churn(cluster.control) as churn:
            r = cluster.ctl("upgrade", "--json")
        assert not churn.failed, churn.failed
        res = json.loads(r.stdout)
        serving = res["pid"]
        assert r.returncode == 1 and res["rolled_back"] is True, (r.stdout, r.stderr)
        assert serving != src.pid, "the stand-in keeps the table"
        check(src, res, cluster.logs(), churn)
        _one_owner_holds_every_acknowledged_entry(cluster, serving, copies, churn)
    finally:
        _clean_up(src, serving, copies, locals().get("churn"))


@pytest.mark.parametrize("full", ["new program", "guardian"])
def test_a_journal_the_kernel_refuses_makes_the_stand_in_keep_the_table(cluster, full):
    """A change the stand-in cannot journal (here the kernel refuses it: queues shrunk to a few
    messages, as a non-root daemon's hold a few hundred) must never be taken over from a journal
    with a hole: the stand-in stops the new program before it answers that change, keeps the
    table, and every acknowledged put is there (kcmp). Whichever queue fills: the new program's, or
    only the guardian's copy (whose hole would be restored from)."""

    def check(src, res, logs, churn) -> None:
        assert "event=fault_fired side=standin step=forked" in logs and "event=standin_journal_broken" in logs
        assert "the journal could not be sent" in res["reason"] and f"the {full}'s queue is full" in res["reason"], res
        assert src.wait(10) == -signal.SIGKILL, "the new program was stopped"
        assert len(churn.mine) > 20, "puts went on, answered by the stand-in, after its journal broke"

    _kept_by_the_stand_in(cluster, f"standin:forked::{'sndbuf' if full == 'new program' else 'last-sndbuf'}=4096",
                          check)


def test_a_new_program_whose_journal_has_a_hole_never_takes_over(cluster):
    """End to end: one journal message of the stand-in never reaches the new program (a fault drops
    it; the guardian's copy has it). The new program sees the hole at Done and exits without taking
    over; the stand-in keeps the table, with every acknowledged put (kcmp) and nobody else holding it."""

    def check(src, res, logs, churn) -> None:
        assert "event=fault_fired side=standin step=journal n=2 action=drop" in logs
        assert "hole" in logs, "the new program saw the hole"

    _kept_by_the_stand_in(cluster, "standin:journal:2:drop", check)


def test_a_stand_in_killed_between_journaling_a_change_and_answering_it(cluster):
    """The stand-in queued a put and its answer for the new program and the guardian, and was killed
    before its client heard that answer (the fault `standin:journaled`). The client sends the put
    again, with the same request id, to the new program, which took the change and its answer over
    from the journal: it answers from that, and the change is in the table exactly once (a second
    apply would fail the put: the key exists), the very fd put (kcmp); one owner, nobody else
    holds any of the table."""
    src = cluster.source(SPEC, env={"CPRD_FAULT": "standin:journaled:5"})
    with cluster.client() as c:
        copies = hold_copies(c)
    try:
        with Churn(cluster.control) as churn:
            r = cluster.ctl("upgrade", "--json")
        assert "event=fault_fired side=standin step=journaled n=5 action=kill" in cluster.logs()
        assert not churn.failed, churn.failed
        res = json.loads(r.stdout)
        assert r.returncode == 0 and not res["rolled_back"] and res["pid"] == src.pid, (r.stdout, r.stderr)
        assert res["standin_journal"] == 6 and res["standin_handed_over"] is False, res  # it died after 6
        _one_owner_holds_every_acknowledged_entry(cluster, src.pid, copies, churn)
    finally:
        _clean_up(src, None, copies, locals().get("churn"))


@pytest.mark.parametrize("then", ["completes", "rolls-back"])
def test_a_guardian_killed_during_the_upgrade_leaves_one_owner_with_every_entry(cluster, tmp_path, then):
    """The guardian is SIGKILLed while the new program restores (it takes 2 s to, a fault's pause);
    changes go on after its death. Then the new program takes over (the journal goes to it alone), or
    dies before asking (the stand-in keeps the table, with nobody to wait for): either way one owner,
    the one the answer names, holds every acknowledged entry (kcmp) and nobody else holds any."""
    fault = "upgrade:restored::sleep=2" + (",upgrade:restored::kill" if then == "rolls-back" else "")
    src = cluster.source(SPEC)
    with cluster.client() as c:
        copies = hold_copies(c)
    serving = None
    try:
        with Churn(cluster.control) as churn:
            up = subprocess.Popen([sys.executable, "-m", "cprd", "ctl", "upgrade", "--json", "--program",
                                   _program(tmp_path, f"CPRD_FAULT={fault}")], text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env={**os.environ, "CPRD_CONTROL": cluster.control})
            guardian = child_named(src.pid, "cprd-guardian")
            # the daemon's priority, not the +10 the old program took for the new one's start: a restore
            # at +10 beside busy processes outlasted a client's retry budget
            assert guardian.nice() == os.getpriority(os.PRIO_PROCESS, 0), "the guardian runs at the daemon's priority"
            guardian.kill()
            deadline = time.monotonic() + 10
            while psutil.pid_exists(guardian.pid) and guardian.status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, "the guardian did not die of its SIGKILL"
                time.sleep(0.005)
            n = len(churn.mine)
            while len(churn.mine) < n + 10 and up.poll() is None:  # changes after the guardian's death
                time.sleep(0.005)
            out, err = up.communicate(timeout=120)
        assert "event=fault_fired side=upgrade step=restored" in cluster.logs()
        assert len(churn.mine) >= n + 10, "puts were acknowledged after the guardian died"
        res = json.loads(out)
        serving = res["pid"]
        if then == "completes":
            assert up.returncode == 0 and not res["rolled_back"] and serving == src.pid, (out, err)
            assert res["standin_journal"] > 0 and res["standin_handed_over"] is True, res
        else:
            assert up.returncode == 1 and res["rolled_back"] is True, (out, err)
            assert "died before it took over; the stand-in (pid" in res["reason"], res
            assert serving != src.pid and psutil.Process(serving).name() == "cprd-standin", "the stand-in owns"
            assert src.wait(10) == -signal.SIGKILL
        _one_owner_holds_every_acknowledged_entry(cluster, serving, copies, churn)
    finally:
        _clean_up(src, serving, copies, locals().get("churn"))


def _journal(*messages: bytes) -> socket.socket:
    """The new program's end of a journal that holds `messages` (the stand-in's end closed)."""
    mine, standin = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with standin:
        for m in messages:
            standin.send(m)
    mine.setblocking(False)
    return mine


DEL = pu.encode_journal([pu.remove_op("gone", 1)], [["rid-1", {"ok": True}]])  # a delete of a key nobody has


@pytest.mark.parametrize("strict", [True, False])
def test_a_journal_with_a_hole_is_never_taken_over_from(strict):
    """Done carries how many messages the stand-in sent; a new program that got fewer, or one it
    cannot apply, sees a hole (its session then exits without taking over, and the stand-in keeps
    the table). Not strict (restoring from the guardian's copy, the last resort), what applies is
    kept."""
    cases = [((DEL, DEL, pu.encode_done(2)), [Ev.DONE], 2),
             ((DEL, DEL, pu.encode_done(3)), [Ev.DONE_HOLE], 2),
             ((DEL, b"?junk", DEL, pu.encode_done(3)), [Ev.DONE_HOLE, Ev.DONE_HOLE], 2),
             ((DEL, pu.Msg.JOURNAL + b"{not json", pu.encode_done(2)), [Ev.DONE_HOLE, Ev.DONE_HOLE] if strict
              else [Ev.DONE_HOLE], 1)]
    for messages, events, applied in cases:
        out = TakeOver()
        sock = _journal(*messages)
        j = Journal(sock.detach(), FdTable(), out, strict)
        try:
            got = j.read()
        finally:
            j.close()
        assert got == [*events, Ev.STANDIN_GONE], (messages, got)  # and then its end
        assert out.messages == applied and out.answers[0] == ["rid-1", {"ok": True}]


def test_once_the_stand_in_is_done_an_old_connection_never_reads_the_table_as_it_was(cluster):
    """After Done the new program may serve at once, while the stand-in has yet to read Taken (here
    it takes 1 s to): a read on a connection the stand-in holds must wait and be retried at the new
    program, never answered from the stand-in's table, which no longer changes."""
    cluster.source(SPEC, env={"CPRD_FAULT": "standin:done::sleep=1"})
    stop, old, new = threading.Event(), [], []

    def old_connection() -> None:
        with Client(cluster.control, timeout=60) as c:  # one connection, made before the upgrade
            while not stop.is_set():
                t = time.monotonic()
                old.append((t, c.status()["upgrades"]))

    def new_connections() -> None:
        while not stop.is_set():
            with Client(cluster.control, timeout=60) as c:
                new.append((time.monotonic(), c.status()["upgrades"]))
            time.sleep(0.005)

    threads = [threading.Thread(target=old_connection), threading.Thread(target=new_connections)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        r = cluster.ctl("upgrade", "--json")
        assert r.returncode == 0 and not json.loads(r.stdout)["rolled_back"], (r.stdout, r.stderr)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert "event=fault_fired side=standin step=done" in cluster.logs()
    t_new = min(t for t, upgrades in new if upgrades == 1)  # the new program served from then on
    assert old[-1][1] == 1, "the old connection's client reached the new program in the end"
    assert any(t < t_new for t, _ in old), "the old connection was served before the take-over"
    stale = [(round(t - t_new, 3), upgrades) for t, upgrades in old if t > t_new and upgrades == 0]
    assert not stale, f"read the stand-in's table after the new program served: {stale[:5]}"
