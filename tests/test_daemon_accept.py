"""The daemon's accept loop, in process: it can be stopped before it has run and started again.

A daemon starts accepting without waiting for the accept task to run (a target does so right
before it confirms a handoff, inside the source's freeze), so stopping must work at any moment
after the start: a handoff's commit stops accepting, and a failed one starts it again."""

from __future__ import annotations

import os

import psutil
import trio

from cprd.daemon import Daemon
from cprd.handoff import _status_pid
from cprd.paths import bind_listener
from cprd.table import FdTable


async def _answers(path: str) -> int | None:
    """The pid that answers a status request at path within a moment, or None."""
    with trio.move_on_after(0.3):
        return await _status_pid(path)
    return None


async def test_stop_accepting_before_the_loop_ran_then_start_again(tmp_path):
    proc = psutil.Process()
    before = proc.num_fds()
    path = str(tmp_path / "control.sock")
    d = Daemon(role="source", table=FdTable(), listener=bind_listener(path), control_path=path)
    try:
        async with trio.open_nursery() as nursery:
            d._nursery = nursery
            d._start_accepting()
            with trio.fail_after(5):
                await d._stop_accepting()  # the accept task has not run yet
            assert d._accept_scope is None
            assert await _answers(path) is None  # the connection waits in the backlog, unanswered
            d._start_accepting()
            assert await _answers(path) == os.getpid()
            with trio.fail_after(5):
                await d._stop_accepting()
            assert await _answers(path) is None
            d._start_accepting()
            assert await _answers(path) == os.getpid()
            nursery.cancel_scope.cancel()
    finally:
        d.listener.close()
        if d._spare is not None:
            os.close(d._spare)
    assert proc.num_fds() == before
