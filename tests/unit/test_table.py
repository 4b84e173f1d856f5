"""FdTable: the (name, id) -> fd hash table, its ownership rules and its key rules.

Every test works on real fds and checks with the process's open-fd count that nothing leaks and
that the table closes exactly what it says it closes. fd numbers are reused by the kernel, so
"this fd was closed" is proven by the count of open fds, never by fstat on an old number.
"""

from __future__ import annotations

import os
import socket
import unicodedata

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cprd.errors import BadKey, CprdError, KeyExists, KeyMissing
from cprd.kinds import Kind, classify
from cprd.table import ID_MAX, ID_MIN, NAME_MAX_BYTES, Entry, FdTable, check_key

_PROC = psutil.Process()


def num_fds() -> int:
    return _PROC.num_fds()


@pytest.fixture(autouse=True)
def no_fd_leak():
    before = num_fds()
    yield
    assert num_fds() == before, "the test leaked (or over-closed) fds"


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def memfd(tag: str = "t") -> int:
    return os.memfd_create(f"cprd-test-{tag}", os.MFD_CLOEXEC)


@pytest.fixture
def table():
    t = FdTable()
    yield t
    t.close_all()


def put(t: FdTable, name: str, id: int, fd: int | None = None, **kw) -> Entry:
    fd = eventfd() if fd is None else fd
    try:
        return t.save(name, id, fd, classify(fd), **kw)
    except BaseException:
        os.close(fd)
        raise


# -- basic operations ---------------------------------------------------------------------
def test_save_find_find_fd_len_contains(table):
    assert len(table) == 0
    assert table.find("net", 0) is None
    assert table.find_fd("net", 0) == -1
    fd = eventfd()
    ident = classify(fd)
    e = table.save("net", 0, fd, ident)
    assert (e.name, e.id, e.fd, e.ident) == ("net", 0, fd, ident)
    assert e.key == ("net", 0)
    assert table.find("net", 0) is e
    assert table.find_fd("net", 0) == fd
    assert ("net", 0) in table
    assert ("net", 1) not in table
    assert table.find("net", 1) is None and table.find_fd("net", 1) == -1
    assert table.find("ne", 0) is None
    assert len(table) == 1


def test_keys_are_name_and_id_together(table):
    a = put(table, "dev", 0)
    b = put(table, "dev", 1)
    c = put(table, "dev2", 0)
    assert len(table) == 3
    assert {table.find_fd("dev", 0), table.find_fd("dev", 1), table.find_fd("dev2", 0)} == {a.fd, b.fd, c.fd}
    assert len({a.fd, b.fd, c.fd}) == 3


def test_save_existing_key_raises_and_caller_keeps_fd(table):
    old = put(table, "k", 7)
    fd = eventfd()
    n = num_fds()
    with pytest.raises(KeyExists, match=r"\('k', 7\) already holds fd"):
        table.save("k", 7, fd, classify(fd))
    assert table.find_fd("k", 7) == old.fd
    assert num_fds() == n, "a failed save must neither close the new fd nor the old one"
    os.fstat(fd)  # still ours
    os.close(fd)


def test_save_replace_closes_old_fd(table):
    put(table, "k", 1)
    new = memfd()
    n = num_fds()
    e = table.save("k", 1, new, classify(new), replace=True)
    assert num_fds() == n - 1, "replace=True must close the fd it drops"
    assert table.find("k", 1) is e and e.fd == new and e.ident.kind is Kind.MEMFD
    assert len(table) == 1


def test_save_replace_with_same_fd_does_not_close_it(table):
    e = put(table, "k", 1)
    n = num_fds()
    e2 = table.save("k", 1, e.fd, e.ident, replace=True)
    assert num_fds() == n
    os.fstat(e.fd)
    assert table.find("k", 1) is e2 and len(table) == 1


def test_save_replace_of_absent_key_is_a_plain_save(table):
    fd = eventfd()
    n = num_fds()
    table.save("k", 3, fd, classify(fd), replace=True)
    assert num_fds() == n and table.find_fd("k", 3) == fd


def test_resave_semantics(table):
    fd = eventfd()
    e = table.resave("r", 0, fd, classify(fd))  # absent: saves
    assert table.find("r", 0) is e
    n = num_fds()
    assert table.resave("r", 0, fd, classify(fd)) is e  # same fd: nothing happens
    assert num_fds() == n and len(table) == 1
    other = eventfd()
    with pytest.raises(KeyExists, match=r"resave of \('r', 0\) with fd"):
        table.resave("r", 0, other, classify(other))
    assert table.find_fd("r", 0) == fd
    os.fstat(other)  # the caller still owns it
    os.close(other)


def test_resave_checks_the_key():
    t = FdTable()
    fd = eventfd()
    try:
        with pytest.raises(BadKey):
            t.resave("", 0, fd, classify(fd))
        assert len(t) == 0
    finally:
        os.close(fd)


def test_delete_closes_and_missing_raises(table):
    put(table, "d", 0)
    put(table, "d", 1)
    n = num_fds()
    table.delete("d", 0)
    assert num_fds() == n - 1
    assert table.find("d", 0) is None and len(table) == 1
    with pytest.raises(KeyMissing, match=r"no entry \('d', 0\)"):
        table.delete("d", 0)
    assert num_fds() == n - 1 and len(table) == 1


def test_pop_hands_fd_back(table):
    e = put(table, "p", 5)
    n = num_fds()
    got = table.pop("p", 5)
    assert got is e
    assert num_fds() == n, "pop must not close the fd"
    assert table.find("p", 5) is None and len(table) == 0
    with pytest.raises(KeyMissing):
        table.pop("p", 5)
    os.close(got.fd)


def test_walk_visits_all_and_stops_early(table):
    for i in range(10):
        put(table, "w", i)
    seen: list[tuple[str, int]] = []
    assert table.walk(lambda e: seen.append(e.key)) is False
    assert sorted(seen) == [("w", i) for i in range(10)]

    visited = []

    def stop_at_third(e: Entry) -> bool:
        visited.append(e)
        return len(visited) == 3

    assert table.walk(stop_at_third) is True
    assert len(visited) == 3
    assert FdTable().walk(lambda e: True) is False


def test_walk_and_iter_tolerate_deletion(table):
    for i in range(6):
        put(table, "x", i)
    assert table.walk(lambda e: table.delete(*e.key)) is False
    assert len(table) == 0
    for i in range(6):
        put(table, "y", i)
    for e in table:
        table.delete(e.name, e.id)
    assert len(table) == 0


def test_iter_by_kind_fds(table, tmp_path):
    put(table, "ev", 0)
    put(table, "ev", 1)
    put(table, "mem", 0, memfd())
    r, w = os.pipe2(os.O_CLOEXEC)
    put(table, "pipe", 0, r)
    put(table, "pipe", 1, w)
    a, b = socket.socketpair()
    put(table, "sock", 0, a.detach())
    put(table, "sock", 1, b.detach())
    put(table, "file", 0, os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    entries = list(table)
    assert len(entries) == len(table) == 8
    assert all(isinstance(e, Entry) for e in entries)
    assert {e.key for e in entries} == {("ev", 0), ("ev", 1), ("mem", 0), ("pipe", 0), ("pipe", 1),
                                       ("sock", 0), ("sock", 1), ("file", 0)}
    assert table.by_kind() == {"eventfd": 2, "memfd": 1, "pipe": 2, "socket": 2, "file": 1}
    assert sorted(table.fds()) == sorted(e.fd for e in entries)
    d = table.find("mem", 0).describe()
    assert d["name"] == "mem" and d["id"] == 0 and d["kind"] == "memfd" and d["fd"] == table.find_fd("mem", 0)
    assert {"mode", "dev", "ino", "flags"} <= set(d)


def test_close_all_closes_everything():
    t = FdTable()
    n = num_fds()
    for i in range(50):
        put(t, "c", i)
    assert num_fds() == n + 50
    t.close_all()
    assert num_fds() == n
    assert len(t) == 0 and list(t) == [] and t.by_kind() == {}
    t.close_all()  # idempotent


def test_close_all_survives_an_fd_closed_behind_its_back():
    t = FdTable()
    n = num_fds()
    put(t, "a", 0)
    stolen = put(t, "a", 1)
    put(t, "a", 2)
    os.close(stolen.fd)  # nothing opens an fd between this and close_all, so the number stays free
    t.close_all()
    assert len(t) == 0
    assert num_fds() == n


def test_many_entries_are_all_distinct(table):
    n = num_fds()
    for i in range(500):
        put(table, f"bulk/{i % 7}", i)
    assert len(table) == 500 and num_fds() == n + 500
    assert all(table.find(f"bulk/{i % 7}", i) is not None for i in range(500))
    assert table.find("bulk/0", 1) is None


def _entries(name: str, ids) -> list[Entry]:
    out = []
    for i in ids:
        fd = eventfd()
        out.append(Entry(name, i, fd, classify(fd)))
    return out


def test_absorb_inserts_all(table):
    batch = _entries("h", range(5))
    assert table.absorb(batch) is None
    assert len(table) == 5 and [table.find("h", i) for i in range(5)] == batch


def test_absorb_is_all_or_nothing_on_an_existing_key(table):
    put(table, "h", 3)
    batch = _entries("h", range(6))
    n = num_fds()
    assert table.absorb(batch) == batch[3]
    assert len(table) == 1, "nothing of a refused batch may stay in the table"
    assert all(table.find("h", i) is None for i in (0, 1, 2, 4, 5))
    assert table.find_fd("h", 3) != batch[3].fd
    assert num_fds() == n, "the caller still owns every fd of a refused batch"
    for e in batch:
        os.close(e.fd)


def test_absorb_refuses_a_key_that_repeats_in_the_batch(table):
    batch = _entries("h", [0, 1, 0])
    assert table.absorb(batch) == batch[2]
    assert len(table) == 0
    for e in batch:
        os.close(e.fd)


# -- key rules ------------------------------------------------------------------------------
GOOD_KEYS = [
    ("a", 0),
    ("a" * NAME_MAX_BYTES, 0),
    ("é" * 127 + "a", 1),  # 255 bytes of UTF-8
    ("🔑" * 63 + "abc", 2),  # 255 bytes, 4-byte characters
    ("vfio/0000", 16),
    ("name with spaces", -1),
    ("x", ID_MIN),
    ("x", ID_MAX),
]


@pytest.mark.parametrize("name,id", GOOD_KEYS)
def test_good_keys_are_accepted(table, name, id):
    check_key(name, id)
    e = put(table, name, id)
    assert table.find(name, id) is e


BAD_KEYS = [
    ("", 0, r"1 to 255 bytes.*got 0 bytes"),
    ("a" * 256, 0, r"1 to 255 bytes.*got 256 bytes"),
    ("é" * 128, 0, r"got 256 bytes"),
    ("🔑" * 64, 0, r"got 256 bytes"),
    ("a\x00b", 0, r"control character '\\x00' at 1"),
    ("line\n", 0, r"control character '\\n' at 4"),
    ("\ttab", 0, r"control character '\\t' at 0"),
    ("del\x7f", 0, r"control character '\\x7f'"),
    ("c1\x85", 0, r"control character '\\x85'"),
    ("c1\x9f", 0, r"control character '\\x9f'"),
    ("lone\ud800", 0, r"not valid UTF-8 \(lone surrogate\)"),
    ("\udfff", 0, r"lone surrogate"),
    (b"bytes", 0, r"name must be a string, got bytes"),
    (None, 0, r"name must be a string, got NoneType"),
    (42, 0, r"name must be a string, got int"),
    ("ok", ID_MAX + 1, r"out of range: ids are signed 32-bit"),
    ("ok", ID_MIN - 1, r"out of range"),
    ("ok", 2**64, r"out of range"),
    ("ok", True, r"id must be an integer, got bool"),
    ("ok", False, r"id must be an integer, got bool"),
    ("ok", 1.0, r"id must be an integer, got float"),
    ("ok", "1", r"id must be an integer, got str"),
    ("ok", None, r"id must be an integer, got NoneType"),
]


@pytest.mark.parametrize("name,id,message", BAD_KEYS)
def test_bad_keys_raise_badkey_and_caller_keeps_fd(name, id, message):
    assert issubclass(BadKey, CprdError)
    t = FdTable()
    fd = eventfd()
    try:
        n = num_fds()
        with pytest.raises(BadKey, match=message):
            check_key(name, id)
        for replace in (False, True):
            with pytest.raises(BadKey, match=message):
                t.save(name, id, fd, classify(fd), replace=replace)
        assert len(t) == 0
        assert num_fds() == n, "a refused save must leave the fd open for its owner"
    finally:
        os.close(fd)


def _oracle_ok(name: str) -> bool:
    try:
        b = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 1 <= len(b) <= 255 and all(unicodedata.category(c) not in ("Cc", "Cs") for c in name)


@given(name=st.text(min_size=0, max_size=140), id=st.integers(min_value=-(2**40), max_value=2**40))
def test_check_key_matches_the_rules(name, id):
    ok = _oracle_ok(name) and ID_MIN <= id <= ID_MAX
    try:
        check_key(name, id)
    except BadKey:
        assert not ok
    else:
        assert ok


@given(name=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=63),
       id=st.integers(min_value=ID_MIN, max_value=ID_MAX))
def test_any_valid_key_round_trips(name, id):
    t = FdTable()
    fd = eventfd()
    t.save(name, id, fd, classify(fd))
    try:
        assert t.find_fd(name, id) == fd
        assert t.find(name, id).key == (name, id)
    finally:
        t.close_all()
