"""kinds: classify real fds of every kind, verify identities, prove "same open file", make fds.

All fds are real (files in tmp_path, memfds, eventfds, pipes, sockets, /dev/null, pidfds...). Every
test checks with the process's open-fd count that it leaks nothing; the populate tests also force
EMFILE at every point of the creation sequence to prove that a failure closes what was made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import resource
import select
import socket
import stat
from collections.abc import Iterator

import psutil
import pytest

from cprd.errors import BadFd, CprdError, UsageError
from cprd.kinds import MUTABLE_FLAGS, Kind, classify, identity_of, kind_of, verify
from cprd.populate import (DEVICE_CMD_ID, DEVICE_CMD_PEER_ID, DEVICE_IRQ_BASE, DEVICE_IRQS, DEVICE_REGION_ID,
                           DEVICE_REGION_MAGIC, DEVICE_REGION_SIZE, FDS_PER, POPULATE_KEYS, REGION_HEADER, device_name,
                           file_content, file_offset, memfd_content, mixed_spec, parse_spec, populate, spec_fds)
from cprd.tools.proof import kcmp_file, same_open_file
from helpers import MAKERS

_PROC = psutil.Process()


def num_fds() -> int:
    return _PROC.num_fds()


@pytest.fixture(autouse=True)
def no_fd_leak():
    before = num_fds()
    yield
    assert num_fds() == before, "the test leaked (or over-closed) fds"


@contextlib.contextmanager
def opened(label: str, directory: str) -> Iterator[int]:
    fds = MAKERS[label][1](directory)
    try:
        yield fds[0]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture(params=sorted(MAKERS))
def kind_fd(request, tmp_path) -> Iterator[tuple[str, Kind, int]]:
    label = request.param
    with opened(label, str(tmp_path)) as fd:
        yield label, MAKERS[label][0], fd


# -- classify -------------------------------------------------------------------------------
def test_classify_each_kind(kind_fd):
    label, kind, fd = kind_fd
    ident = classify(fd)
    st = os.fstat(fd)
    assert ident.kind is kind, label
    assert kind_of(fd) is kind
    assert (ident.mode, ident.dev, ident.ino) == (st.st_mode, st.st_dev, st.st_ino)
    assert ident.flags == fcntl.fcntl(fd, fcntl.F_GETFL) & ~MUTABLE_FLAGS
    assert ident.flags & MUTABLE_FLAGS == 0
    assert identity_of(fd, kind) == ident
    d = ident.describe()
    assert d == {"kind": kind.label, "mode": st.st_mode, "dev": st.st_dev, "ino": st.st_ino,
                 "flags": ident.flags}


def test_memfd_and_file_are_told_apart(tmp_path):
    m = os.memfd_create("looks-like-a-file", os.MFD_CLOEXEC)
    f = os.open(tmp_path / "memfd:trick", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        assert stat.S_ISREG(os.fstat(m).st_mode) and stat.S_ISREG(os.fstat(f).st_mode)
        assert classify(m).kind is Kind.MEMFD
        assert classify(f).kind is Kind.FILE
    finally:
        os.close(m)
        os.close(f)


def test_nonblock_does_not_change_the_identity():
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        assert classify(a).flags == classify(b).flags
        before = classify(a)
        os.set_blocking(a, False)
        assert classify(a) == before
    finally:
        os.close(a)
        os.close(b)


def test_epoll_is_refused():
    ep = select.epoll()  # keep the object alive: it owns the fd
    try:
        assert kind_of(ep.fileno()) is Kind.EPOLL
        with pytest.raises(BadFd, match="epoll") as ei:
            classify(ep.fileno())
        assert f"fd {ep.fileno()}" in str(ei.value)
        assert isinstance(ei.value, CprdError)
    finally:
        ep.close()


def test_closed_fd_is_refused():
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    os.close(fd)  # nothing opens an fd before classify, so the number stays free
    with pytest.raises(BadFd, match=rf"fd {fd} is not open"):
        classify(fd)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    for bad in (-1, soft + 10):  # never valid fd numbers
        with pytest.raises(BadFd, match="not open"):
            classify(bad)


def test_kind_labels():
    for k in Kind:
        assert Kind.from_label(k.label) is k
        assert Kind.from_label(k.label.upper()) is k
    with pytest.raises(UsageError, match=r"unknown fd kind 'socks'.*known: file, dir"):
        Kind.from_label("socks")
    # the numbering is part of the wire format (handoff records carry it)
    assert [(k.label, int(k)) for k in Kind] == [
        ("file", 1), ("dir", 2), ("memfd", 3), ("eventfd", 4), ("pipe", 5), ("socket", 6), ("chardev", 7),
        ("blockdev", 8), ("timerfd", 9), ("signalfd", 10), ("pidfd", 11), ("inotify", 12), ("anon", 13),
        ("epoll", 14)]


# -- verify ---------------------------------------------------------------------------------
def test_verify_same_fd_and_dup(kind_fd):
    _, _, fd = kind_fd
    ident = classify(fd)
    assert verify(fd, ident) is None
    dup = os.dup(fd)
    try:
        assert verify(dup, ident) is None
    finally:
        os.close(dup)


def test_verify_ignores_mutable_flags(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        ident = classify(fd)
        os.set_blocking(fd, False)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        assert verify(fd, ident) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("label", ["file", "dir", "memfd", "pipe-read", "unix-stream", "tcp"])
def test_verify_names_another_inode(tmp_path, label):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with opened(label, str(tmp_path / "a")) as fd1, opened(label, str(tmp_path / "b")) as fd2:
        msg = verify(fd2, classify(fd1))
        assert msg is not None and "inode" in msg, msg


def test_verify_names_another_type(tmp_path):
    with opened("file", str(tmp_path)) as f, opened("pipe-read", str(tmp_path)) as p, \
            opened("eventfd", str(tmp_path)) as e:
        for fd, ident in ((p, classify(f)), (f, classify(p)), (e, classify(p)), (p, classify(e))):
            msg = verify(fd, ident)
            assert msg is not None and msg.startswith("file type"), msg


def test_verify_names_other_open_flags(tmp_path):
    path = tmp_path / "f"
    rw = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    ro = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        msg = verify(ro, classify(rw))
        assert msg is not None and msg.startswith("open flags"), msg
        msg = verify(w, classify(r))  # one pipe: same inode, other direction
        assert msg is not None and msg.startswith("open flags"), msg
    finally:
        for fd in (rw, ro, r, w):
            os.close(fd)


def test_verify_closed_fd():
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    ident = classify(fd)
    os.close(fd)
    msg = verify(fd, ident)
    assert msg is not None and "cannot be read" in msg


# -- same open file description -------------------------------------------------------------
def test_same_open_file_true_for_dup(kind_fd):
    _, kind, fd = kind_fd
    if kind is Kind.FILE and not os.fstat(fd).st_size:
        os.write(fd, b"x" * 32) if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY else None
    pos = os.lseek(fd, 0, os.SEEK_CUR) if kind in (Kind.FILE, Kind.MEMFD) else None
    dup = os.dup(fd)
    try:
        ok, method = same_open_file(fd, dup, kind)
        assert ok, method
        assert method
        if kind in (Kind.FILE, Kind.MEMFD):
            assert "shared offset" in method
            assert os.lseek(fd, 0, os.SEEK_CUR) == pos, "the offset probe must restore the offset"
        if kind is Kind.EVENTFD:
            assert "eventfd" in method
    finally:
        os.close(dup)


def test_same_open_file_false_for_two_opens_of_one_file(tmp_path):
    path = tmp_path / "f"
    a = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    b = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.write(a, b"0123456789" * 4)
        os.lseek(a, 3, os.SEEK_SET)
        os.lseek(b, 3, os.SEEK_SET)  # same offset by chance: the probe must still tell them apart
        ok, method = same_open_file(a, b, Kind.FILE)
        assert not ok, method
        assert os.lseek(a, 0, os.SEEK_CUR) == 3 and os.lseek(b, 0, os.SEEK_CUR) == 3
    finally:
        os.close(a)
        os.close(b)


def test_same_open_file_false_for_reopened_memfd():
    a = os.memfd_create("cprd-test", os.MFD_CLOEXEC)
    try:
        os.write(a, b"same bytes")
        b = os.open(f"/proc/self/fd/{a}", os.O_RDWR | os.O_CLOEXEC)  # same inode, new open file
        try:
            assert os.fstat(a).st_ino == os.fstat(b).st_ino
            assert classify(b).kind is Kind.MEMFD
            ok, method = same_open_file(a, b, Kind.MEMFD)
            assert not ok, method
        finally:
            os.close(b)
    finally:
        os.close(a)


@pytest.mark.parametrize("label,kind", [
    ("eventfd", Kind.EVENTFD), ("unix-stream", Kind.SOCKET), ("memfd", Kind.MEMFD),
])
def test_same_open_file_false_for_two_of_a_kind(tmp_path, label, kind):
    with opened(label, str(tmp_path)) as a, opened(label, str(tmp_path)) as b:
        ok, method = same_open_file(a, b, kind)
        assert not ok, method


def test_same_open_file_false_for_two_ends_of_a_pipe():
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        ok, method = same_open_file(r, w, Kind.PIPE)
        assert not ok, method
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.requires("kcmp")  # only kcmp tells these apart
@pytest.mark.parametrize("label", ["dir", "chardev"])
def test_same_open_file_false_for_two_opens_needs_kcmp(tmp_path, label):
    with opened(label, str(tmp_path)) as a, opened(label, str(tmp_path)) as b:
        ok, method = same_open_file(a, b, MAKERS[label][0])
        assert not ok and "kcmp" in method


@pytest.mark.requires("kcmp")
def test_kcmp_answers_for_this_process():
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.dup(a)
    c = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        assert kcmp_file(os.getpid(), a, os.getpid(), b) is True
        assert kcmp_file(os.getpid(), a, os.getpid(), c) is False
    finally:
        for fd in (a, b, c):
            os.close(fd)


# -- parse_spec, spec_fds, mixed_spec -------------------------------------------------------
@pytest.mark.parametrize("spec,want", [
    ("", {}),
    ("   ", {}),
    ("files=5", {"files": 5}),
    ("files=500,eventfds=300,devices=10", {"files": 500, "eventfds": 300, "devices": 10}),
    (" memfds=1 , pipes=2,sockets=0 ", {"memfds": 1, "pipes": 2}),
    ("files=0", {}),
    ("devices=007", {"devices": 7}),
])
def test_parse_spec_good(spec, want):
    got = parse_spec(spec)
    assert set(got) == set(POPULATE_KEYS)
    assert got == {k: want.get(k, 0) for k in POPULATE_KEYS}


@pytest.mark.parametrize("spec,message", [
    ("foo=1", r"bad populate item 'foo=1': expected KIND=COUNT"),
    ("files", r"bad populate item 'files'"),
    ("files=1,,eventfds=2", r"bad populate item ''"),
    ("files=1,", r"bad populate item ''"),
    ("=3", r"bad populate item"),
    ("Files=3", r"bad populate item"),
    ("files=x", r"bad count 'x' for files: expected a whole number"),
    ("files=1.5", r"bad count '1.5'"),
    ("files=", r"bad count ''"),
    ("files=-1", r"must not be negative, got -1"),
])
def test_parse_spec_bad(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_spec(spec)


def test_spec_fds_and_mixed_spec():
    assert spec_fds(parse_spec("files=3,eventfds=2,memfds=1,pipes=2,sockets=1,devices=2")) == \
        3 + 2 + 1 + 4 + 2 + 2 * (3 + DEVICE_IRQS)
    assert FDS_PER["devices"] == 3 + DEVICE_IRQS
    for total in (200, 1000, 7530):
        spec = mixed_spec(total)
        assert set(spec) == set(POPULATE_KEYS)
        assert all(v > 0 for v in spec.values()), spec
        assert spec_fds(spec) == total
    small = mixed_spec(10)  # too few for one of each kind and the files: one of each, no files
    assert small["files"] == 0 and all(small[k] == 1 for k in POPULATE_KEYS if k not in ("files", "eventfds"))


# -- populate -------------------------------------------------------------------------------
COUNTS = {"files": 3, "eventfds": 4, "memfds": 2, "pipes": 2, "sockets": 2, "devices": 2}


def _close(made):
    for _, _, fd in made:
        os.close(fd)


def _so_type(fd: int) -> int:
    s = socket.socket(fileno=fd)
    try:
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    finally:
        s.detach()


def test_populate_makes_every_kind(tmp_path):
    directory = tmp_path / "sub" / "files"
    before = num_fds()
    made = populate(COUNTS, str(directory))
    try:
        assert num_fds() == before + spec_fds(COUNTS) == before + len(made)
        by_key = {(name, id): fd for name, id, fd in made}
        assert len(by_key) == len(made), "keys must be unique"
        assert len({fd for _, _, fd in made}) == len(made)
        kinds: dict[str, set[Kind]] = {}
        for name, _, fd in made:
            kinds.setdefault(name.split("/")[0], set()).add(classify(fd).kind)
        assert kinds == {"file": {Kind.FILE}, "eventfd": {Kind.EVENTFD}, "memfd": {Kind.MEMFD},
                         "pipe": {Kind.PIPE}, "socket": {Kind.SOCKET},
                         "vfio": {Kind.MEMFD, Kind.SOCKET, Kind.EVENTFD}}
        assert sorted(os.listdir(directory)) == [f"file-{i:05d}" for i in range(3)]

        for i in range(COUNTS["files"]):
            fd = by_key["file", i]
            assert os.pread(fd, 4096, 0) == file_content(i)
            assert os.lseek(fd, 0, os.SEEK_CUR) == file_offset(i)
        for i in range(COUNTS["eventfds"]):
            assert os.eventfd_read(by_key["eventfd", i]) == i + 1
        for i in range(COUNTS["memfds"]):
            assert os.pread(by_key["memfd", i], 4096, 0) == memfd_content(i)
        for i in range(COUNTS["pipes"]):
            r, w = by_key["pipe", 2 * i], by_key["pipe", 2 * i + 1]
            assert fcntl.fcntl(r, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            assert fcntl.fcntl(w, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
            assert os.read(r, 100) == f"pipe {i}\n".encode()
            os.write(w, b"more")
            assert os.read(r, 100) == b"more"
        for i in range(COUNTS["sockets"]):
            a, b = by_key["socket", 2 * i], by_key["socket", 2 * i + 1]
            assert _so_type(a) == _so_type(b) == socket.SOCK_STREAM
            os.write(a, b"ping")
            assert os.read(b, 100) == b"ping"

        for n in range(COUNTS["devices"]):
            name = device_name(n)
            ids = sorted(id for nm, id, _ in made if nm == name)
            assert ids == [DEVICE_REGION_ID, DEVICE_CMD_ID, DEVICE_CMD_PEER_ID] + \
                [DEVICE_IRQ_BASE + k for k in range(DEVICE_IRQS)]
            region = by_key[name, DEVICE_REGION_ID]
            assert classify(region).kind is Kind.MEMFD
            assert os.fstat(region).st_size == DEVICE_REGION_SIZE
            assert REGION_HEADER.unpack(os.pread(region, REGION_HEADER.size, 0)) == \
                (DEVICE_REGION_MAGIC, n, DEVICE_REGION_SIZE)
            with mmap.mmap(region, DEVICE_REGION_SIZE) as m:
                assert REGION_HEADER.unpack_from(m, 0) == (DEVICE_REGION_MAGIC, n, DEVICE_REGION_SIZE)
                m[DEVICE_REGION_SIZE - 1] = 0x5A
            assert os.pread(region, 1, DEVICE_REGION_SIZE - 1) == b"\x5a"
            cmd, peer = by_key[name, DEVICE_CMD_ID], by_key[name, DEVICE_CMD_PEER_ID]
            assert _so_type(cmd) == _so_type(peer) == socket.SOCK_SEQPACKET
            os.write(cmd, b"reset")
            os.write(cmd, b"go")
            assert os.read(peer, 100) == b"reset"  # message boundaries kept
            assert os.read(peer, 100) == b"go"
            for k in range(DEVICE_IRQS):
                irq = by_key[name, DEVICE_IRQ_BASE + k]
                assert classify(irq).kind is Kind.EVENTFD
                with pytest.raises(BlockingIOError):  # starts at zero, non-blocking
                    os.eventfd_read(irq)
    finally:
        _close(made)


def test_populate_nothing(tmp_path):
    assert populate(parse_spec(""), str(tmp_path / "none")) == []
    assert not (tmp_path / "none").exists(), "no files asked for, so no directory is made"


def _free_fd_numbers(count: int) -> list[int]:
    def is_open(fd: int) -> bool:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
            return True
        except OSError as e:
            assert e.errno == errno.EBADF
            return False

    listed = {int(x) for x in os.listdir("/proc/self/fd")}
    open_now = {fd for fd in listed if is_open(fd)}
    out, n = [], 0
    while len(out) < count:
        if n not in open_now:
            out.append(n)
        n += 1
    return out


@contextlib.contextmanager
def room_for(k: int):
    """Let this process open exactly k more fds (RLIMIT_NOFILE), then restore the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = _free_fd_numbers(k + 1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[k], hard))  # numbers free[0..k-1] stay usable
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_room_for_is_exact():
    with room_for(3):
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
        with pytest.raises(OSError) as ei:
            os.eventfd(0, os.EFD_CLOEXEC)
    for fd in fds:
        os.close(fd)
    assert ei.value.errno == errno.EMFILE


@pytest.mark.parametrize("room", range(0, 2 * FDS_PER["devices"] + 3))
def test_populate_closes_everything_on_emfile(tmp_path, room):
    """Run out of fds at every point of the sequence, mid-device included."""
    counts = {"files": 1, "eventfds": 1, "devices": 3}
    (tmp_path / "d").mkdir()
    before = num_fds()
    with room_for(room):
        with pytest.raises(OSError) as ei:
            populate(counts, str(tmp_path / "d"))
    assert ei.value.errno == errno.EMFILE
    assert num_fds() == before, f"populate leaked fds after EMFILE with room for {room}"


def test_populate_closes_everything_on_a_bad_count(tmp_path):
    before = num_fds()
    with pytest.raises(TypeError):
        populate({"eventfds": 3, "memfds": 2, "pipes": "2"}, str(tmp_path))
    assert num_fds() == before


def test_populate_closes_everything_when_the_directory_fails(tmp_path):
    (tmp_path / "plain").write_bytes(b"not a directory")
    before = num_fds()
    with pytest.raises(OSError):
        populate({"files": 2, "eventfds": 2}, str(tmp_path / "plain" / "sub"))
    assert num_fds() == before
