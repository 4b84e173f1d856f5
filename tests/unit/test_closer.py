"""The closer (cprd/fds.py): closes that block (real lingering TCP sockets) hold up only the threads
they run on; ordinary closes queued behind them are done meanwhile; its threads end when idle, and
a fork gets the queue without the threads."""

from __future__ import annotations

import os
import time

from cprd.fds import Closer
from cprd.tools.lingering import Lingering


def _lingering(n: int):
    """n sockets whose last close blocks for 30 s (unsent data, a peer that never reads), and what
    holds their peers (closing it ends the linger)."""
    socks = Lingering(n)
    return [socks.make(30) for _ in range(n)], socks


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_ordinary_closes_go_on_while_closes_that_block_hold_their_threads():
    c = Closer()
    stuck, peers = _lingering(20)
    try:
        for fd in stuck:  # all at once: more than the pool's working threads
            c.close(fd)
        time.sleep(0.05)
        ordinary = [os.eventfd(0) for _ in range(50)]
        for fd in ordinary:
            c.close(fd)
        assert _wait(lambda: c.pending() == 20), f"ordinary closes still queued: {c.pending()} pending"
        for fd in ordinary:  # closed for real
            try:
                os.fstat(fd)
                raise AssertionError(f"fd {fd} is still open")
            except OSError:
                pass
        assert c._threads <= 20 + 8  # each stuck close holds one thread, and the pool goes on beside them
    finally:
        peers.close()  # the lingering closes end
    assert c.wait_idle(10) and c.pending() == 0
    assert _wait(lambda: c._threads == 0, 15), "idle threads end"


def test_a_fork_keeps_the_queue_and_starts_its_own_threads():
    c = Closer()
    stuck, peers = _lingering(1)
    try:
        c.close(stuck[0])
        assert _wait(lambda: len(c._busy) == 1)
        pid = os.fork()
        if pid == 0:  # the child: no thread runs here; the queue is its own, and a close still works
            code = 1
            try:
                ev = os.eventfd(0)
                c.close(ev)
                if c.wait_idle(5):
                    try:
                        os.fstat(ev)
                    except OSError:
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        peers.close()
    assert c.wait_idle(10)


SIGNAL_SCRIPT = """
import os, signal, threading, time
from cprd.fds import Closer
got = []
signal.signal(signal.SIGHUP, lambda *a: got.append(threading.current_thread().name))
c = Closer()
c.close(os.eventfd(0))  # a closer thread is born (before the mask, as in a daemon) and idles
deadline = time.monotonic() + 10
while c.pending() and time.monotonic() < deadline:
    time.sleep(0.01)
assert threading.active_count() > 1, "a closer thread runs"
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
os.kill(os.getpid(), signal.SIGHUP)
time.sleep(0.1)
print("handled" if got else "pending" if signal.SIGHUP in signal.sigpending() else "lost")
"""


def test_a_signal_the_main_thread_blocks_stays_pending_whatever_closer_threads_run():
    """An upgrade blocks SIGHUP, SIGTERM and SIGINT in the main thread across its exec (so that a reload
    waits for the new program): a closer thread must never take such a signal instead, where its Python
    handler would queue it in an event loop that never runs again. (In a fresh interpreter: this one's
    other threads would take it.)"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "pending", (r.stdout, r.stderr)
