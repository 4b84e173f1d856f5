"""cprd under systemd's conventions with real programs: socket activation through
systemd-socket-activate, and sd_notify from sources and targets to a NOTIFY_SOCKET we bind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cprd.client import Client
from cprd.tools.procs import stop, wait_for_socket


def _recv_fields(ns: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in ns.recv(4096).decode().splitlines())


@pytest.mark.requires("systemd-socket-activate")
def test_source_under_systemd_socket_activate(tmp_path):
    os.chmod(tmp_path, 0o700)
    path = str(tmp_path / "control.sock")
    p = subprocess.Popen(["systemd-socket-activate", "--seqpacket", "-l", path, "--fdname=control",
                          sys.executable, "-m", "cprd", "source", "--control", path, "--populate", "eventfds=5"],
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(path, p)
        with Client(path) as c:
            st = c.status()
            assert st["entries"] == 5 and st["pid"] == p.pid  # systemd-socket-activate execs the service
        stop(p)
        assert os.path.exists(path), "a socket systemd passed is systemd's: cprd never removes its file"
    finally:
        stop(p)
    assert b"event=socket_activated" in p.stderr.read()


def test_sd_notify_from_source_and_target(cluster, tmp_path):
    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(30)
    env = {"NOTIFY_SOCKET": path}
    src = cluster.source("eventfds=7", env=env)
    first = _recv_fields(ns)
    assert first["READY"] == "1" and "7 entries" in first["STATUS"]
    tgt, listen = cluster.target(env=env)
    waiting = _recv_fields(ns)
    assert waiting["READY"] == "1" and listen in waiting["STATUS"]
    with cluster.client() as c:
        c.handoff(listen)
    took = _recv_fields(ns)
    assert took == {"MAINPID": str(tgt.pid)}
    ready = _recv_fields(ns)
    assert ready["READY"] == "1" and "7 entries" in ready["STATUS"] and "target" in ready["STATUS"]
    assert src.wait(10) == 0
    ns.close()
