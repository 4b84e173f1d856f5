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
RLIMIT_NOFILE bounds, and each at most once. Its threads each close one fd at a time, so one close
that blocks for an hour holds up one thread, not the others: a thread is started when none is
idle and fewer than MAX_THREADS are working on closes that have not yet taken STUCK_S (one stuck
in a close that blocks does not count), up to HARD_CAP threads in all; a thread ends after IDLE_S
without work. ``pending()`` is what status reports.
A fork (an upgrade's stand-in) gets a closer with the same queue and no threads (they start again
on demand); a close in progress in the parent at the fork is the parent's (see _after_fork).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable

from .proc import start_thread

log = logging.getLogger("cprd.fds")

MAX_THREADS = 8  # threads working on closes that have not blocked (yet)
HARD_CAP = 256  # threads in all, stuck ones included (each costs a stack's address space, little memory)
STUCK_S = 0.2  # a close that has taken this long counts as stuck: another thread takes the queue on
IDLE_S = 5.0
SLOW_S = 1.0  # a close that takes longer is logged


class Closer:
    def __init__(self, max_threads: int = MAX_THREADS, hard_cap: int = HARD_CAP) -> None:
        self.max_threads, self.hard_cap = max_threads, hard_cap
        self._reset(deque())
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self, queue: deque[int]) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._queue = queue
        self._threads = 0
        self._idle = 0
        self._busy: dict[int, tuple[float, int]] = {}  # thread ident -> (when its close began, the fd)
        self._rescue_armed = False
        self._starting = 0  # threads started that have not taken up work yet
        self.slow = 0  # closes that took more than SLOW_S

    def _after_fork(self) -> None:
        """In a fork: the queue is the child's (copies of the same fds), no thread runs. An fd a
        parent's thread was closing at the fork stays open in the child if its slot was still in use
        then: the child cannot tell it from a number the parent freed and reused just before the
        fork, so it leaves it (at most one fd per busy thread, in a short-lived stand-in) rather
        than risk closing another."""
        self._reset(deque(self._queue))

    def close(self, fd: int) -> None:
        """Close fd on a closer thread; never waits."""
        with self._cv:
            self._queue.append(fd)
            self._staff()

    def _staff(self) -> None:
        """(Lock held.) Start a thread for the queue if none is idle and fewer than max_threads are
        working on closes that have not blocked; if the queue must wait for the busy ones, look again
        in STUCK_S (they may be stuck by then)."""
        if self._idle >= len(self._queue):
            self._cv.notify()
            return
        now = time.monotonic()
        working = self._threads - sum(1 for t0, _ in self._busy.values() if now - t0 > STUCK_S)
        waiting = len(self._queue) - self._idle - self._starting
        while waiting > 0 and working < self.max_threads and self._threads < self.hard_cap:
            self._threads += 1
            self._starting += 1
            start_thread(threading.Thread(target=self._work, name="cprd-closer", daemon=True))
            working += 1
            waiting -= 1
        self._cv.notify(len(self._queue))
        if waiting > 0 and not self._rescue_armed and self._threads < self.hard_cap:
            self._rescue_armed = True
            t = threading.Timer(STUCK_S, self._rescue)
            t.daemon = True
            start_thread(t)

    def _rescue(self) -> None:
        with self._cv:
            self._rescue_armed = False
            if self._queue:
                self._staff()

    def pending(self) -> int:
        """Fds queued or being closed."""
        with self._cv:
            return len(self._queue) + len(self._busy)

    def _work(self) -> None:
        first = True
        while True:
            with self._cv:
                if first:
                    self._starting -= 1
                    first = False
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
                me = threading.get_ident()
                t0 = time.monotonic()
                self._busy[me] = (t0, fd)
            try:
                os.close(fd)
            except OSError:
                pass
            took = time.monotonic() - t0
            with self._cv:
                del self._busy[me]
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

    def close_now(self) -> None:
        """Close on this thread: only for fds known not to be the last reference to their file
        (copies of fds a table still holds), whose close cannot block."""
        for fd in self.take():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> OwnedFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; every code path should close or take explicitly
        if self.fds:
            self.close()


def read_all(fd: int, chunk_size: int = 1 << 16) -> bytes:
    """Every byte of a file (a memfd) from offset 0, whatever its own offset."""
    chunks, off = [], 0
    while True:
        chunk = os.pread(fd, chunk_size, off)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        off += len(chunk)
