"""Ownership of raw fds that are in flight (not yet in a table), and how a daemon closes them.

An ``OwnedFds`` holds fds that nobody else will close. Leaving its ``with`` block closes every fd
it still holds; ``take()`` hands them on (to a table, or to a caller) and empties it. Every
place that receives fds from the kernel wraps them in one at once, so every error path closes
what it must.

Closing is ``close_later``: in a daemon, on a ``Closer``'s threads. close() can block: a TCP
socket that lingers (SO_LINGER) with unsent data and a peer that does not read, a file on a
network filesystem, some devices; and the last close of a UNIX socket closes the fds queued in
it, which may be any of those. Any fd a client hands over may be one, so the thread that answers
clients never closes one itself: ``install_closer`` (each daemon process, at its start) makes
every close_later, OwnedFds.close and table drop go to the closer. Elsewhere (the client, the
tools) close_later is os.close.

The closer's queue is bounded by construction: it holds fds this process has open, which
RLIMIT_NOFILE bounds, and each at most once. Its threads (at most MAX_THREADS, started when every
one is busy, ended after IDLE_S without work) each close one fd at a time, so one close that
blocks for an hour holds up one thread, not the others. ``pending()`` is what status reports.
A fork (an upgrade's stand-in) gets a closer with the same queue and no threads (they start again
on demand); a close in progress in the parent at the fork is the parent's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable

log = logging.getLogger("cprd.fds")

MAX_THREADS = 8
IDLE_S = 5.0
SLOW_S = 1.0  # a close that takes longer is logged


class Closer:
    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self.max_threads = max_threads
        self._reset(deque())
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self, queue: deque[int]) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._queue = queue
        self._threads = 0
        self._idle = 0
        self._busy = 0
        self.slow = 0  # closes that took more than SLOW_S

    def _after_fork(self) -> None:
        self._reset(deque(self._queue))  # the child's copies of the queued fds; no thread runs here

    def close(self, fd: int) -> None:
        """Close fd on a closer thread; never waits."""
        with self._cv:
            self._queue.append(fd)
            if self._idle == 0 and self._threads < self.max_threads:
                self._threads += 1
                threading.Thread(target=self._work, name="cprd-closer", daemon=True).start()
            else:
                self._cv.notify()

    def pending(self) -> int:
        """Fds queued or being closed."""
        with self._cv:
            return len(self._queue) + self._busy

    def _work(self) -> None:
        while True:
            with self._cv:
                self._idle += 1
                end = time.monotonic() + IDLE_S
                while not self._queue:
                    left = end - time.monotonic()
                    if left <= 0:
                        self._idle -= 1
                        self._threads -= 1
                        return
                    self._cv.wait(left)
                self._idle -= 1
                fd = self._queue.popleft()
                self._busy += 1
            t0 = time.monotonic()
            try:
                os.close(fd)
            except OSError:
                pass
            took = time.monotonic() - t0
            with self._cv:
                self._busy -= 1
                if took > SLOW_S:
                    self.slow += 1
            if took > SLOW_S:
                log.warning("event=slow_close fd=%d seconds=%.1f note=on-a-closer-thread;clients-were-served-meanwhile",
                            fd, took)

    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until nothing is queued or being closed; whether so (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


_closer: Closer | None = None


def install_closer() -> Closer:
    """Make close_later close on a Closer's threads from now on (a daemon process, at its start)."""
    global _closer
    if _closer is None:
        _closer = Closer()
    return _closer


def closer() -> Closer | None:
    return _closer


def close_later(fd: int) -> None:
    """Close an fd that a client may have handed over: on a closer thread in a daemon, else now."""
    if _closer is not None:
        _closer.close(fd)
        return
    try:
        os.close(fd)
    except OSError:
        pass


def close_all_later(fds: Iterable[int]) -> None:
    for fd in fds:
        close_later(fd)


class OwnedFds:
    __slots__ = ("fds",)

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self.fds: list[int] = list(fds)

    def __len__(self) -> int:
        return len(self.fds)

    def take(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        close_all_later(self.take())

    def __enter__(self) -> OwnedFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; every code path should close or take explicitly
        if self.fds:
            self.close()
