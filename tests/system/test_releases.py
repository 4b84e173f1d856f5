"""Every release in RELEASES keeps working with this version, with real daemons: its source hands off
to our target, our source to its target, and a daemon of that release is upgraded in place to this
program. Every entry is proved the same open file description by kcmp (copies taken out of the
first daemon before anything moves).

A release is installed from a clean export of its commit (git archive) into a virtualenv of its own,
built once and kept in a cache ($XDG_CACHE_HOME/cprd-releases, by commit and Python version), with
pip, as a user would install it. Add each new release here, and keep the old ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cprd.client import Client
from cprd.tools.procs import wait_for_socket
from helpers import RELEASES, install, release_spawn as spawn, snapshot
from helpers import Copies

pytestmark = [pytest.mark.slow, pytest.mark.requires("kcmp")]

SPEC = "files=40,eventfds=40,memfds=10,pipes=5,sockets=5,devices=3"


@pytest.fixture(params=RELEASES, ids=[v for v, _ in RELEASES])
def release(request) -> tuple[str, Path]:
    version, commit = request.param
    return version, install(version, commit)


def version_of(cluster) -> str:
    with cluster.client() as c:
        return c.status()["version"]


def release_source(cluster, version: str, python: Path):
    """A source of the release with a populated table: (process, its snapshot, copies of its fds)."""
    src = spawn(cluster, python, "source", "--control", cluster.control, "--populate", SPEC, "--state-dir",
                str(cluster.dir / "state"))
    wait_for_socket(cluster.control, src)
    assert version_of(cluster) == version
    with cluster.client() as c:
        before = snapshot(c)
    return src, before, cluster.keep(Copies(cluster.control, src.pid))


def hand_off(cluster, src, tgt, listen: str, before: dict, copies: Copies) -> None:
    """src hands its table to tgt: confirmed, src exits 0, tgt serves every entry, the very fds."""
    with cluster.client() as c:
        res = c.handoff(listen)
    assert res["confirmed"] and res["target_pid"] == tgt.pid
    assert src.wait(30) == 0
    with cluster.client() as c:
        assert c.status()["pid"] == tgt.pid and snapshot(c) == before
    assert copies.prove(cluster.control, tgt.pid) == len(before)


def test_a_release_source_hands_off_to_this_target(cluster, release):
    version, python = release
    src, before, copies = release_source(cluster, version, python)
    tgt, listen = cluster.target()  # this version
    hand_off(cluster, src, tgt, listen, before, copies)
    assert version_of(cluster) != version


def test_this_source_hands_off_to_a_release_target(cluster, release):
    version, python = release
    src = cluster.source(SPEC)  # this version
    with cluster.client() as c:
        before = snapshot(c)
    copies = cluster.keep(Copies(cluster.control, src.pid))
    listen = str(cluster.dir / "release-handoff.sock")
    tgt = spawn(cluster, python, "target", "--listen", listen)
    wait_for_socket(listen, tgt)
    hand_off(cluster, src, tgt, listen, before, copies)
    assert version_of(cluster) == version


def test_a_release_daemon_upgrades_in_place_to_this_program(cluster, release, tmp_path):
    version, python = release
    src, before, copies = release_source(cluster, version, python)
    new = tmp_path / "this-cprd"
    new.write_text(f'#!/bin/sh\nexec {sys.executable} -m cprd "$@"\n')
    new.chmod(0o755)
    r = cluster.ctl("upgrade", "--program", str(new), "--json")
    assert r.returncode == 0, r.stderr
    with Client(cluster.control) as c:
        st = c.status()
        assert st["pid"] == src.pid and st["upgrades"] == 1 and st["version"] != version
        assert snapshot(c) == before
    assert copies.prove(cluster.control, src.pid) == len(before)
