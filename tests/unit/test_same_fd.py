"""The fd store's "same open file" (systemd's same_fd) and its bisection, with each fallback forced.

`fdstore.same_fd` asks F_DUPFD_QUERY (Linux 6.10), else kcmp(KCMP_FILE), else judges by inode and
open flags, never for a device. The fd store keeps a large group of stored fds of one inode in kcmp's
order and bisects it; where kcmp stops ordering it compares with each. Each fallback is forced for
real: F_DUPFD_QUERY by asking with a command number the kernel does not know (it answers EINVAL, as
a kernel older than 6.10 does), kcmp by making cprd's wrapper of the syscall answer -1 (what it
answers where a seccomp profile refuses kcmp), the bisection's order by making `file_order` (the
wrapper the bisection calls) answer None. The fds compared are real: which are one open file and
which are not is fixed by how they were made (dup versus a second open).
"""

from __future__ import annotations

import errno
import fcntl
import os
import types
from collections.abc import Iterator

import psutil
import pytest

from cprd import fdstore as fs
from cprd import proc
from cprd.daemon.notify import _ORDER_FROM, AppStore, FdStores
from cprd.kinds import classify
from cprd.table import FdTable

_UNKNOWN_FCNTL = 0x7FFF0000  # no kernel knows this fcntl command: EINVAL, as F_DUPFD_QUERY before 6.10


@pytest.fixture(autouse=True)
def no_fd_leak():
    before = psutil.Process().num_fds()
    yield
    assert psutil.Process().num_fds() == before, "the test leaked (or over-closed) fds"


class Mode:
    """How same_fd must decide: as the kernel offers (F_DUPFD_QUERY where it has it), by kcmp (no
    F_DUPFD_QUERY), or by inode and flags (neither). Counts the calls of cprd's kcmp wrapper, which
    answers -1 (the kernel refused) in the last."""

    def __init__(self, name: str, monkeypatch) -> None:
        self.name, self.kcmp_calls, real = name, 0, proc.kcmp_file
        if name != "as-the-kernel-offers":
            with pytest.raises(OSError) as e:
                fcntl.fcntl(0, _UNKNOWN_FCNTL, 1)
            assert e.value.errno == errno.EINVAL
            monkeypatch.setattr(fs, "_F_DUPFD_QUERY", _UNKNOWN_FCNTL)

        def kcmp(*args: int) -> int:
            self.kcmp_calls += 1
            return -1 if name == "inode-and-flags" else real(*args)

        monkeypatch.setattr(proc, "kcmp_file", kcmp)

    @property
    def can_tell(self) -> bool:
        """Whether two open files of one inode with the same flags can be told apart."""
        return self.name != "inode-and-flags"

    def taken(self) -> None:
        """The fallback this mode forces was asked (else the test proved nothing about it)."""
        if self.name != "as-the-kernel-offers":
            assert self.kcmp_calls, f"{self.name}: kcmp was never asked"


@pytest.fixture(params=["as-the-kernel-offers", pytest.param("kcmp", marks=pytest.mark.requires("kcmp")),
                        "inode-and-flags"])
def mode(request, monkeypatch) -> Mode:
    return Mode(request.param, monkeypatch)


def _closing(*fds: int):
    class _C:
        def __enter__(self):
            return fds

        def __exit__(self, *exc):
            for fd in fds:
                os.close(fd)
    return _C()


def test_a_duplicate_is_the_same_open_file_unless_a_device_is_judged_by_inode(mode, tmp_path):
    name = mode.name
    f = tmp_path / "f"
    f.write_bytes(b"x")
    r, w = os.pipe()
    with _closing(os.open(f, os.O_RDWR | os.O_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC),
                  os.memfd_create("m", os.MFD_CLOEXEC), r, w) as fds:
        for fd in fds:
            with _closing(os.dup(fd)) as (d,):
                assert fs.same_fd(fd, d), (name, fd)
                assert fs.same_fd(d, fd), (name, fd)
    with _closing(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)) as (null,), _closing(os.dup(null)) as (d,):
        # a device is never judged by its inode: where only that is left, even its duplicate is "not the same"
        assert fs.same_fd(null, d) is mode.can_tell
    mode.taken()


def test_two_opens_of_one_inode_are_told_apart_where_the_method_can(mode, tmp_path):
    name, can_tell = mode.name, mode.can_tell
    f = tmp_path / "f"
    f.write_bytes(b"x")
    # Other open flags: every method tells these apart (inode and flags by the flags).
    with _closing(os.open(f, os.O_RDONLY | os.O_CLOEXEC), os.open(f, os.O_RDWR | os.O_CLOEXEC),
                  os.open(f, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)) as fds:
        for a in fds:
            for b in fds:
                assert fs.same_fd(a, b) is (a == b), (name, a, b)
    # The same flags: F_DUPFD_QUERY and kcmp tell these apart; inode and flags cannot (as systemd's).
    with _closing(os.open(f, os.O_RDWR | os.O_CLOEXEC), os.open(f, os.O_RDWR | os.O_CLOEXEC)) as (a, b):
        assert fs.same_fd(a, b) is not can_tell
    with _closing(os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)) as (a, b):
        assert os.fstat(a).st_ino == os.fstat(b).st_ino  # one anonymous inode for every eventfd
        assert fs.same_fd(a, b) is not can_tell
    # A device: two opens with the same flags are never the same, whatever the method.
    with _closing(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)) as ab:
        assert not fs.same_fd(*ab)
    # Other inodes are never the same.
    g = tmp_path / "g"
    g.write_bytes(b"y")
    with _closing(os.open(f, os.O_RDONLY | os.O_CLOEXEC), os.open(g, os.O_RDONLY | os.O_CLOEXEC)) as ab:
        assert not fs.same_fd(*ab)
    mode.taken()


# -- the bisection over a store's group of fds of one inode ---------------------------------------------
N = 3 * _ORDER_FROM  # a group large enough to be kept in kcmp's order


@pytest.fixture
def store() -> Iterator[tuple[FdStores, AppStore, list[int]]]:
    """An fd store's index over N eventfds (one inode, N open files) held in a real table; and the
    table's fds in the order stored."""
    table = FdTable()
    stores = FdStores(types.SimpleNamespace(table=table), life=None, room=None, owners=types.SimpleNamespace())
    a = AppStore("app", -1, -1, fs.Meta(), raw=None)
    key = fs.entry_name("app")
    fds = []
    try:
        for i in range(N):
            fd = os.eventfd(i, os.EFD_CLOEXEC)
            e = table.save(key, i, fd, classify(fd))
            a.index(i, e)
            fds.append(fd)
        yield stores, a, fds
    finally:
        table.close_all()


def _check_answers(stores: FdStores, a: AppStore, fds: list[int]) -> None:
    """A copy of each stored fd is found stored; a new eventfd (the same inode) is not."""
    k = (os.fstat(fds[0]).st_dev, os.fstat(fds[0]).st_ino)
    for fd in fds[::5] + [fds[-1]]:
        with _closing(os.dup(fd)) as (d,):
            assert stores._stored_already(a, k, d)[0], fd
    with _closing(os.eventfd(0, os.EFD_CLOEXEC)) as (new,):
        assert stores._stored_already(a, k, new)[0] is False


@pytest.mark.requires("kcmp")
def test_the_bisection_finds_what_is_stored_and_where_a_new_fd_goes(store):
    stores, a, fds = store
    _check_answers(stores, a, fds)
    k = next(iter(a.by_inode))
    assert k in a.ordered, "a group this large is kept in kcmp's order"
    group = a.by_inode[k]
    with _closing(os.eventfd(0, os.EFD_CLOEXEC)) as (new,):
        dup, pos = stores._stored_already(a, k, new)
        assert not dup and pos is not None
        order = [fs.file_order(new, stores.st.table.find("fdstore/app", i).fd) for i in group]
        assert order == [1] * pos + [-1] * (len(group) - pos), "the new fd goes between its neighbours"


@pytest.mark.requires("kcmp")
def test_where_kcmp_stops_ordering_mid_bisection_each_stored_fd_is_compared(store, monkeypatch):
    stores, a, fds = store
    _check_answers(stores, a, fds)  # ordered now, by kcmp
    k = next(iter(a.by_inode))
    assert k in a.ordered
    asked = []
    monkeypatch.setattr(fs, "file_order", lambda x, y: asked.append((x, y)))  # kcmp stops ordering
    _check_answers(stores, a, fds)
    assert asked, "the bisection was never taken"
    assert k not in a.ordered, "an order kcmp no longer gives is not relied on"


def test_where_kcmp_never_orders_each_stored_fd_is_compared(store, monkeypatch):
    stores, a, fds = store
    asked = []
    monkeypatch.setattr(fs, "file_order", lambda x, y: asked.append((x, y)))
    k = (os.fstat(fds[0]).st_dev, os.fstat(fds[0]).st_ino)
    for fd in fds[::7]:
        with _closing(os.dup(fd)) as (d,):
            assert stores._stored_already(a, k, d) == (True, None)
    if fs.same_fd(fds[0], fds[1]):
        pytest.fail("same_fd cannot tell two eventfds apart here (no F_DUPFD_QUERY and no kcmp)")
    with _closing(os.eventfd(0, os.EFD_CLOEXEC)) as (new,):
        assert stores._stored_already(a, k, new) == (False, None)
    assert asked and not a.ordered
