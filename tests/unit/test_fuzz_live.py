"""Hypothesis against live code with real fds on real sockets: a running daemon's control socket,
and a target's receiving side. Every malformed input gets a clear error, no fd that arrived with
it stays open, and the daemon goes on serving. CPRD_FUZZ_EXAMPLES raises the example counts."""

from __future__ import annotations

import hashlib
import json
import os
import time
import select
import socket
import struct

import psutil
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cprd import handoff as ho
from cprd import scm
from cprd.client import Client
from cprd.errors import CprdError
from cprd.kinds import Identity, Kind, classify
from cprd.protocol import control as cp
from cprd.protocol import frame
from cprd.protocol import handoff as hp

EXAMPLES = int(os.environ.get("CPRD_FUZZ_EXAMPLES") or 150)
live = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

names = st.one_of(
    st.text(min_size=1, max_size=20),
    st.text(min_size=250, max_size=300),
    st.sampled_from(["", "a\x00b", "tab\there", "dev", "é" * 128]),
)
ids = st.one_of(st.integers(-5, 5), st.integers(-(2**40), 2**40), st.sampled_from([2**31, -(2**31) - 1]),
                st.text(max_size=3), st.booleans(), st.none())
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=6)


@st.composite
def control_frames(draw) -> bytes:
    kind = draw(st.sampled_from(["request", "request", "request", "raw", "header"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "header":
        payload = draw(st.binary(max_size=50))
        return frame.HEADER.pack(draw(st.sampled_from([b"CPRC", b"CPRH", b"\0\0\0\0"])), draw(st.integers(0, 255)),
                                 draw(st.integers(0, 255)), draw(st.integers(0, 65535)),
                                 draw(st.sampled_from([len(payload), len(payload) + 1, 0, 2**32 - 1]))) + payload
    obj = {"op": draw(st.sampled_from(list(cp.OPS) + ["nope", 3]))}
    if draw(st.booleans()):
        obj["name"] = draw(names)
    if draw(st.booleans()):
        obj["id"] = draw(ids)
    if draw(st.booleans()):
        obj[draw(st.sampled_from(["replace", "to", "batch", "window", "extra"]))] = draw(json_values)
    if obj["op"] == "handoff":
        obj["to"] = "/nonexistent/handoff.sock"  # never a real target
    if obj["op"] == "upgrade":
        obj["program"] = "/nonexistent/cprd"  # never a real program (the upgrade tests exec real ones)
    payload = json.dumps(obj).encode()
    if draw(st.integers(0, 9)) == 0:
        payload = payload[: draw(st.integers(0, len(payload)))]
    return frame.pack(cp.MAGIC, cp.VERSION, cp.REQUEST, payload)


def _make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "memfd":
        return os.memfd_create("fuzz", os.MFD_CLOEXEC)
    if kind == "epoll":
        ep = select.epoll()
        try:
            return os.dup(ep.fileno())
        finally:
            ep.close()
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from helpers import Cluster

    c = Cluster(tmp_path_factory.mktemp("fuzz"))
    src = c.source("eventfds=3")
    try:
        with Client(c.control) as probe:  # one connection for every example: none closes under a count
            yield c, src, probe
    finally:
        c.close()


def _exchange(path: str, data: bytes, fds: list[int]) -> dict:
    """Send one frame, read the whole reply, then wait until the daemon has closed its end."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(20)
    with s:
        s.connect(path)
        scm.send_sync(s, data, fds)
        reader, reply = cp.ReplyReader(), None
        while reply is None:
            try:
                got, rfds = scm.recv_sync(s, cp.MAX_FRAME, 1)
            except scm.Closed:
                # An empty SOCK_SEQPACKET message reads as end-of-file: the daemon hangs up.
                assert data == b"" and not fds
                return {"ok": False, "error": "closed", "message": "empty message read as end of file"}
            rfds.close()
            reply = reader.feed(got)
        s.shutdown(socket.SHUT_WR)
        try:
            while True:
                _, rfds = scm.recv_sync(s, cp.MAX_FRAME, 1)
                rfds.close()
        except scm.Closed:
            pass
    return reply


@live
@given(data=control_frames(), fd_kinds=st.lists(st.sampled_from(["eventfd", "memfd", "epoll", "pipe", "null"]),
                                                max_size=3))
@pytest.mark.slow
def test_control_socket_fuzz(daemon, data, fd_kinds):
    c, src, probe = daemon
    st0 = probe.status()
    rest0 = _quiet_fds_in(src.pid) - st0["entries"]
    fds = [_make_fd(k) for k in fd_kinds]
    try:
        reply = _exchange(c.control, data, fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert reply["ok"] in (True, False)
    if not reply["ok"]:
        assert reply["error"] and len(reply["message"]) > 10
    st1 = probe.status()
    # Nothing leaked: the daemon's fds beyond its table are what they were (counted in /proc, once it
    # has caught up with the closed connection).
    deadline = time.monotonic() + 5
    while _fds_in(src.pid) - st1["entries"] != rest0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _fds_in(src.pid) - st1["entries"] == rest0, (data, fd_kinds, reply)
    assert src.poll() is None


def _fds_in(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _quiet_fds_in(pid: int) -> int:
    """The count once it stopped changing for 20 ms."""
    last = _fds_in(pid)
    while True:
        time.sleep(0.02)
        now = _fds_in(pid)
        if now == last:
            return now
        last = now


# -- the receiving side of a handoff, in this process, over a real socketpair ----------------------
def _real(kind: str) -> int:
    return {"eventfd": lambda: os.eventfd(1, os.EFD_CLOEXEC), "memfd": lambda: os.memfd_create("f", os.MFD_CLOEXEC),
            "null": lambda: os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)}[kind]()


@st.composite
def handoff_scripts(draw):
    """A source that starts right (hello) and then goes wrong in one of many ways."""
    n = draw(st.integers(1, 6))
    kinds = draw(st.lists(st.sampled_from(["eventfd", "memfd", "null"]), min_size=n, max_size=n))
    names_ = draw(st.lists(st.sampled_from(["a", "b", "dev/1"]), min_size=n, max_size=n))
    ids_ = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    fault = draw(st.sampled_from(["none", "count", "identity", "kind", "truncate", "magic", "version", "length",
                                  "seq", "end_digest", "end_count", "extra_fd", "garbage", "name"]))
    return n, kinds, names_, ids_, fault


def _run_receiver(script) -> tuple[object, int]:
    n, kinds, names_, ids_, fault = script
    fds = [_real(k) for k in kinds]
    idents = [classify(fd) for fd in fds]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    outcome: object = None

    async def main() -> None:
        nonlocal outcome
        tb = trio.socket.from_stdlib_socket(b)
        hello = hp.SourceHello(os.getpid(), n, n, 253, "/nonexistent/cprd-fuzz.sock")
        inc = ho.Incoming(tb, hp.Handoff("target"), hello, os.getpid(), None)
        inc.machine.receive(hp.encode(hello))  # what accept_handoff has done when receive_table starts
        recs = [hp.Record(nm, i, idn) for nm, i, idn in zip(names_, ids_, idents)]
        if fault == "identity":  # metadata of one kind, fd of another
            recs[0] = hp.Record(recs[0].name, recs[0].id, Identity(Kind.FILE, 0o100644, 1, 2, 0))
        batch = hp.encode(hp.Batch.of(0, recs))
        send_fds = list(fds)
        if fault == "count":
            send_fds = send_fds[:-1]
        elif fault == "extra_fd":
            send_fds = send_fds + [fds[0]]
        elif fault == "kind":
            batch = batch[:18] + bytes([14]) + batch[19:]  # first record's kind := epoll
        elif fault == "truncate":
            batch = batch[:-1]
        elif fault == "magic":
            batch = b"XXXX" + batch[4:]
        elif fault == "version":
            batch = batch[:4] + b"\x07" + batch[5:]
        elif fault == "length":
            batch = batch[:8] + struct.pack("<I", len(batch)) + batch[12:]
        elif fault == "seq":
            batch = batch[:12] + struct.pack("<I", 5) + batch[16:]
        elif fault == "garbage":
            batch = os.urandom(40)
        elif fault == "name":
            batch = batch.replace(names_[0].encode(), b"\xff" * len(names_[0].encode()), 1)
        scm.send_sync(a, batch, send_fds)
        end = hp.End(n, n, hashlib.blake2b(hp.Batch.of(0, recs).raw, digest_size=16).digest())
        if fault == "end_digest":
            end = hp.End(n, n, bytes(16))
        elif fault == "end_count":
            end = hp.End(n + 1, n + 1, end.digest)
        scm.send_sync(a, hp.encode(end), [])
        scm.send_sync(a, hp.encode(hp.Commit(False)), [])
        a.shutdown(socket.SHUT_WR)  # all said: the target's reads end here instead of timing out
        try:
            r = await ho.receive_table(inc, timeout=0.3)
        except CprdError as e:
            outcome = e
            return
        outcome = (r, len(r.table))
        r.table.close_all()
        r.listener.close()

    before = psutil.Process().num_fds()
    try:
        trio.run(main)
    finally:
        a.close()
        b.close()
        for fd in fds:
            os.close(fd)
    return outcome, psutil.Process().num_fds() - (before - 2 - len(fds))


@pytest.mark.slow
@live
@given(script=handoff_scripts())
def test_target_receiving_side_fuzz(script):
    n, kinds, names_, ids_, fault = script
    outcome, leaked = _run_receiver(script)
    assert leaked == 0, f"{leaked} fds left open after {fault}: {outcome!r}"
    dup = len(set(zip(names_, ids_))) != n
    if fault == "none" and not dup:
        assert isinstance(outcome, tuple) and outcome[1] == n and outcome[0].committed, outcome
    else:
        assert isinstance(outcome, CprdError), (fault, outcome)
        assert len(str(outcome)) > 10
