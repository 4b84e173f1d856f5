"""The optional C loops (cprd/_speedups.c) must give exactly the pure-Python code's answers, and
cprd must work end to end without them."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cprd import handoff
from cprd.fds import OwnedFds
from cprd.kinds import Identity, Kind, classify
from cprd.populate import parse_spec, populate
from cprd.protocol import handoff as hp
from cprd.table import Entry, FdTable

needs_c = pytest.mark.requires("speedups")
from cprd.speedups import C as _c  # noqa: E402


@pytest.fixture
def made(tmp_path):
    """(records, fds) of real fds of every kind."""
    made = populate(parse_spec("files=30,eventfds=30,memfds=10,pipes=10,sockets=10,devices=3"), str(tmp_path))
    fds = [fd for _, _, fd in made]
    try:
        yield [hp.Record(n, i, classify(fd)) for n, i, fd in made], fds
    finally:
        for fd in fds:
            os.close(fd)


def _batches(records, fds, rng, trials):
    """Random batches of (records, fds), half of them with two fds swapped, some with a closed fd."""
    for trial in range(trials):
        k = rng.randrange(1, min(len(records), 253))
        start = rng.randrange(0, len(records) - k + 1)
        recs, batch_fds = records[start:start + k], list(fds[start:start + k])
        if trial % 2:
            i, j = rng.randrange(k), rng.randrange(k)
            batch_fds[i], batch_fds[j] = batch_fds[j], batch_fds[i]
        if trial % 7 == 0:
            batch_fds[rng.randrange(k)] = 99999  # not an open fd
        yield trial, hp.Batch.of(trial, recs), batch_fds


@needs_c
def test_c_and_python_verifiers_agree(made):
    records, fds = made
    for trial, ev, batch_fds in _batches(records, fds, random.Random(7), 200):
        c = _c.verify_batch(ev.raw, ev.count, batch_fds, handoff.FLAGS_MASK32)
        py = handoff.py_verify(ev.decoded()[0], batch_fds)
        assert c == py, (trial, c, py)


@needs_c
@pytest.mark.parametrize("threads", [True, False])
def test_verifier_gives_verify_batch_answers_in_order(made, monkeypatch, threads):
    if not threads:
        monkeypatch.setenv("CPRD_NO_THREADS", "1")
    records, fds = made
    batches = list(_batches(records, fds, random.Random(11), 120))
    v = _c.Verifier(handoff.FLAGS_MASK32)
    try:
        got = []
        for trial, ev, batch_fds in batches:
            v.submit(ev.raw, ev.count, batch_fds, trial)
            if trial % 5 == 0:
                got += v.completed(False)
        while v.pending:
            got += v.completed(True)
        assert v.threaded is (threads and len(os.sched_getaffinity(0)) > 1)
    finally:
        v.close()
    assert got == [(trial, _c.verify_batch(ev.raw, ev.count, b, handoff.FLAGS_MASK32)) for trial, ev, b in batches]


@needs_c
def test_a_waiting_caller_verifies_queued_batches_itself_and_order_holds(made):
    """completed(True) does not sleep while batches wait in the queue: it verifies them on the
    calling thread (the helper takes the others), and the answers still come back in order."""
    records, fds = made
    batches = list(_batches(records, fds, random.Random(5), 120))
    want = [(trial, _c.verify_batch(ev.raw, ev.count, b, handoff.FLAGS_MASK32)) for trial, ev, b in batches]
    for _attempt in range(5):  # the helper could, in theory, drain a queue of 120 before we wait
        v = _c.Verifier(handoff.FLAGS_MASK32)
        try:
            for trial, ev, batch_fds in batches:
                v.submit(ev.raw, ev.count, batch_fds, trial)
            got = []
            while v.pending:
                got += v.completed(True)
            assert got == want
            threaded, helped = v.threaded, v.helped  # read before close(), which ends the helper
            if helped or not threaded:
                break
        finally:
            v.close()
    assert helped > 0 or not threaded
    # with two CPUs there is a helper, so the assertion above was not vacuous
    assert threaded is (len(os.sched_getaffinity(0)) > 1 and not os.environ.get("CPRD_NO_THREADS"))


@needs_c
def test_verifier_close_drops_queued_work_and_refuses_more(made):
    records, fds = made
    v = _c.Verifier(handoff.FLAGS_MASK32)
    ev = hp.Batch.of(0, records[:100])
    for i in range(50):
        v.submit(ev.raw, ev.count, fds[:100], i)
    v.close()
    v.close()  # idempotent
    assert v.pending == 0 and v.completed(True) == []
    with pytest.raises(RuntimeError):
        v.submit(ev.raw, ev.count, fds[:100], 99)
    with pytest.raises(ValueError):
        _c.Verifier(0).submit(ev.raw, ev.count, fds[:99], 0)  # one fd short


@needs_c
def test_c_absorb_builds_what_the_python_path_builds(made):
    records, fds = made
    py_table, c_table = FdTable(), FdTable()
    for i in range(0, len(records), 37):
        ev = hp.Batch.of(i, records[i:i + 37])
        batch = fds[i:i + 37]
        fixed, names = hp.decode_records(ev.raw, ev.count)
        py_table.absorb([Entry(n, f[0], fd, Identity(Kind(f[1]), f[3], f[5], f[6], f[4]))
                         for f, n, fd in zip(fixed, names, batch)])
        assert _c.absorb(ev.raw, ev.count, batch, c_table.bulk_dict(), handoff.FLAGS_MASK32, hp.KINDS, Identity, Entry,
                         {}) == -1
    assert len(c_table) == len(records)
    for e in py_table:
        got = c_table.find(e.name, e.id)
        assert got == e and type(got) is Entry and type(got.ident) is Identity and got.ident.kind is e.ident.kind
    # Equal identities in a run are one object (every eventfd has the same): memory, not just speed.
    evs = [e.ident for e in c_table if e.name == "eventfd"]
    assert len(evs) == 30 and len({id(i) for i in evs}) <= 2  # at most one per batch the run spans
    py_table.bulk_dict().clear()  # the fds belong to the fixture
    c_table.bulk_dict().clear()


@needs_c
def test_c_absorb_is_all_or_nothing(made):
    records, fds = made
    t = FdTable()
    d = t.bulk_dict()
    args = (handoff.FLAGS_MASK32, hp.KINDS, Identity, Entry, {})
    first = hp.Batch.of(0, records[30:40])
    assert _c.absorb(first.raw, first.count, fds[30:40], d, *args) == -1
    before = dict(d)
    overlap = hp.Batch.of(1, records[35:50])  # keys 35..39 are in the table already
    assert _c.absorb(overlap.raw, overlap.count, fds[35:50], d, *args) == -2
    repeat = hp.Batch.of(2, records[50:60] + records[50:51])  # a key twice in one batch
    assert _c.absorb(repeat.raw, repeat.count, fds[50:60] + fds[50:51], d, *args) == -2
    swapped = fds[0:10]  # regular files: each its own inode
    swapped[3], swapped[4] = swapped[4], swapped[3]
    bad = hp.Batch.of(3, records[0:10])
    assert _c.absorb(bad.raw, bad.count, swapped, d, *args) == 3
    odd = hp.Batch.of(4, [hp.Record("café", 1, records[60].ident)])  # not plain ASCII: the Python path's
    assert _c.absorb(odd.raw, odd.count, fds[60:61], d, *args) == -3
    assert d == before
    d.clear()


def test_non_ascii_names_take_the_python_path_and_arrive(made):
    records, fds = made
    t = FdTable()
    recs = [hp.Record(f"käse-{i}", i, r.ident) for i, r in enumerate(records[:20])]
    _, ev = hp.decode(hp.encode(hp.Batch.of(0, recs)), 20)
    owned = OwnedFds(fds[:20])
    assert handoff.take_batch(ev, owned, t) is None
    assert len(owned) == 0 and [(e.name, e.id, e.fd) for e in t] == [(r.name, r.id, fd) for r, fd in zip(recs, fds)]
    t.bulk_dict().clear()


@needs_c
def test_c_encoders_agree_with_python(made):
    records, _ = made
    rng = random.Random(3)
    odd = [hp.Record(name, rng.randrange(-2**31, 2**31), records[i % len(records)].ident)
           for i, name in enumerate(["a", "x" * 255, "ünï", "vfio/0001", "名前"])]
    for recs in (records, odd, records[:1], []):
        assert _c.encode_records(list(recs)) == hp.py_encode_records(recs)
        keys = [(r.name, r.id) for r in recs]
        assert _c.encode_keys(keys) == hp.py_encode_keys(keys)
        entries = [Entry(r.name, r.id, 3, r.ident) for r in recs]
        assert _c.encode_records(entries) == hp.py_encode_records(recs)
        assert _c.encode_keys(entries) == hp.py_encode_keys(keys)
    with pytest.raises(ValueError):
        _c.encode_keys([("x" * 256, 1)])
    with pytest.raises(OverflowError):
        _c.encode_keys([("x", 2**31)])
    with pytest.raises(TypeError):
        _c.encode_records([("x", 1)])


_RECORD = struct.Struct("<iBBIIQQ")


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-2**31, 2**31 - 1), st.integers(0, 20),
                          st.one_of(st.binary(min_size=0, max_size=12),  # anything; and plain names, often
                                    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1,
                                            max_size=12).map(str.encode))),
                min_size=1, max_size=12),
       st.integers(-3, 3))
@example([(1, 4, b"eventfd"), (-7, 1, b"vfio/0001")], 0)  # simple: both branches always run
@example([(1, 4, "k\u00e4se".encode())], 0)  # valid, but not plain ASCII
def test_simple_records_accepts_only_what_the_python_decoder_accepts(recs, slack):
    """simple_records says yes only to record bytes the Python decoder decodes to plain ASCII
    names; and to every such batch of known kinds (so the fast path is taken when it can be)."""
    raw = b"".join(_RECORD.pack(i, k, len(n), 0, 0, 0, 0) for i, k, n in recs) + b"".join(n for _, _, n in recs)
    raw = raw[:len(raw) + slack] if slack < 0 else raw + b"a" * slack
    simple = _c.simple_records(raw, len(recs), hp._SIMPLE_KINDS)
    try:
        _, names = hp.decode_records(raw, len(recs))
        ok = True
    except hp.ProtocolError:
        ok = False
    if simple:
        assert ok and all(n.isascii() and n.isprintable() for n in names)
    elif ok and slack == 0:
        assert not all(n.isascii() and n.isprintable() for n in names)


@pytest.mark.parametrize("env", [{"CPRD_NO_SPEEDUPS": "1"}, {"CPRD_NO_THREADS": "1"}])
def test_handoff_works_without_the_speedups(cluster, env):
    """The pure-Python paths (no C at all) and the C path without its helper thread, end to end."""
    src = cluster.source("files=40,eventfds=300,memfds=10,pipes=10,sockets=10,devices=3", env=env)
    tgt, listen = cluster.target(env=env)
    with cluster.client() as c:
        before = {(e["name"], e["id"]): e for e in c.ls()}
        res = c.handoff(listen)
    assert res["confirmed"] and res["entries"] == len(before)
    assert src.wait(30) == 0
    with cluster.client() as c:
        assert c.status()["pid"] == tgt.pid
        after = {(e["name"], e["id"]): e for e in c.ls()}
    assert {k: {**v, "fd": 0} for k, v in after.items()} == {k: {**v, "fd": 0} for k, v in before.items()}
