"""The daemon's accept loop, in process: it can be stopped before it has run and started again.

A daemon starts accepting without waiting for the accept task to run (a target does so right
before it confirms a handoff, inside the source's freeze), so stopping must work at any moment
after the start: a handoff's commit stops accepting, and a failed one starts it again."""

from __future__ import annotations

import os
import socket

import psutil
import trio
import trio.testing

from cprd.daemon import Config, Daemon, DaemonState
from cprd.client import probe_status
from cprd.paths import bind_listener
from cprd.table import FdTable


def _pending(path: str) -> socket.socket:
    """A connection that waits in the listening socket's backlog until somebody accepts it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
    s.connect(path)
    return s


async def _accepted_while_idle(d, path: str) -> bool:
    """Whether the daemon accepts a pending connection when it has every chance to: once every
    other task is blocked, an accept loop that runs has taken it (a deterministic test, not a
    timeout: a slow machine cannot make it pass)."""
    before = d.conns
    s = _pending(path)
    try:
        await trio.testing.wait_all_tasks_blocked()
        return d.conns > before
    finally:
        s.close()
        await trio.testing.wait_all_tasks_blocked()  # let a served connection see the close


async def test_stop_accepting_before_the_loop_ran_then_start_again(tmp_path):
    proc = psutil.Process()
    before = proc.num_fds()
    path = str(tmp_path / "control.sock")
    daemon = Daemon(DaemonState.source(FdTable(), bind_listener(path), path, Config()))
    d = daemon.endpoint
    try:
        async with trio.open_nursery() as nursery:
            d.nursery = nursery
            d.start_accepting()
            with trio.fail_after(5):
                await d.stop_accepting()  # the accept task has not run yet
            assert not d.accepting
            assert not await _accepted_while_idle(d, path)  # the connection waits in the backlog
            d.start_accepting()
            assert await _accepted_while_idle(d, path)
            with trio.fail_after(5):
                assert (await probe_status(path, 5))["pid"] == os.getpid()  # and it answers
                await d.stop_accepting()
            assert not await _accepted_while_idle(d, path)
            d.start_accepting()
            with trio.fail_after(5):
                assert (await probe_status(path, 5))["pid"] == os.getpid()
            nursery.cancel_scope.cancel()
    finally:
        d.listener.close()
        d.close()
    assert proc.num_fds() == before
