"""The sans-io protocols: the handoff codec and state machine, and the control codec.

No sockets and no fds: frames are bytes, and the fds that would ride with a frame are a count.
Whatever bytes arrive, a decoder may only return an event or raise ProtocolError (handoff) or a
CprdError subclass (control); any other exception would take a daemon down on a bad peer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import deque

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from cprd import errors
from cprd.errors import CprdError, ProtocolError, UsageError
from cprd.kinds import Identity, Kind
from cprd.protocol import control, frame
from cprd.protocol import handoff as h
from cprd.protocol.handoff import (
    Abort,
    AbortCode,
    Ack,
    Batch,
    Commit,
    Confirm,
    End,
    Handoff,
    Ready,
    Record,
    SourceHello,
    State,
    TargetHello,
    decode,
    encode,
)

STORABLE_KINDS = [k for k in Kind if k is not Kind.EPOLL]
U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1


# -- examples and strategies ----------------------------------------------------------------
def make_records(n: int, start: int = 0) -> list[Record]:
    out = []
    for i in range(start, start + n):
        name = ("dev/" + str(i % 7)) if i % 3 else f"ключ-{i}-é"
        kind = STORABLE_KINDS[i % len(STORABLE_KINDS)]
        ident = Identity(kind, 0o100600 + i % 3, 2049 + i % 2, 10_000 + i, 2 | (i % 2))
        out.append(Record(name, i - 100, ident))
    return out


def digest_of(batches: list[bytes]) -> bytes:
    d = hashlib.blake2b(digest_size=16)
    for raw in batches:
        d.update(raw)
    return d.digest()


EXAMPLES: dict[str, tuple[object, int]] = {  # name -> (event, fds that ride with it)
    "source_hello": (SourceHello(pid=4242, entries=3, fds=3, batch_max=100, control_path="/run/ctl.sock"), 0),
    "source_hello_no_path": (SourceHello(pid=1, entries=0, fds=0), 0),
    "target_hello": (TargetHello(version=1, pid=4343, fd_limit=1 << 20, open_fds=12, capacity=(1 << 20) - 12),
                     0),
    "batch": (Batch.of(0, make_records(3)), 3),
    "batch_one": (Batch.of(7, make_records(1, 50)), 1),
    "ack": (Ack(seq=0, verified=3), 0),
    "end": (End(entries=3, fds=3, digest=bytes(range(16))), 0),
    "ready": (Ready(entries=3, digest=bytes(range(16, 32))), 0),
    "commit_listener": (Commit(True), 1),
    "commit_plain": (Commit(False), 0),
    "confirm": (Confirm(pid=4343), 0),
    "manifest": (h.Manifest.of([("vfio/0000", 0), ("ключ", -5), ("eventfd", 2**31 - 1)]), 0),
    "delete": (h.Delete.of([("vfio/0000", 0), ("ключ", -5)]), 0),
    "results": (h.Results((("c1-7", {"ok": True, "result": {"deleted": True}}),)), 0),
    "batch_replace": (Batch.of(2, make_records(2, 70), replace=True), 2),
    "abort": (Abort(AbortCode.CAPACITY, "not enough fds: need 3, have 2; raise RLIMIT_NOFILE"), 0),
    "abort_empty": (Abort(AbortCode.CANCELLED, ""), 0),
}

names_st = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40).filter(
    lambda s: len(s.encode()) <= 255)
text_st = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
idents_st = st.builds(Identity, st.sampled_from(STORABLE_KINDS), st.integers(0, U32), st.integers(0, U64),
                      st.integers(0, U64), st.integers(0, U32))
records_st = st.builds(Record, names_st, st.integers(-(2**31), 2**31 - 1), idents_st)


@st.composite
def source_hellos(draw):
    lo = draw(st.integers(0, 5))
    hi = draw(st.integers(lo, U16))
    return SourceHello(draw(st.integers(0, U32)), draw(st.integers(0, U32)), draw(st.integers(0, U32)),
                       draw(st.integers(1, h.SCM_MAX_FD)), draw(text_st), lo, hi)


events_st = st.one_of(
    source_hellos(),
    st.builds(TargetHello, st.integers(0, U16), st.integers(0, U32), st.integers(0, U32), st.integers(0, U32),
              st.integers(0, U32)),
    st.builds(Batch.of, st.integers(0, U32), st.lists(records_st, min_size=1, max_size=20)),
    st.builds(Ack, st.integers(0, U32), st.integers(0, U32)),
    st.builds(End, st.integers(0, U32), st.integers(0, U32), st.binary(min_size=16, max_size=16)),
    st.builds(Ready, st.integers(0, U32), st.binary(min_size=16, max_size=16)),
    st.builds(Commit, st.booleans()),
    st.builds(Confirm, st.integers(0, U32)),
    st.builds(Abort, st.integers(0, U16), text_st),
)


def fds_for(ev) -> int:
    if isinstance(ev, Batch):
        return ev.count
    if isinstance(ev, Commit):
        return int(ev.listener)
    return 0


def raw_frame(type_: int, payload: bytes, version: int = 1, flags: int = 0, magic: bytes = h.MAGIC) -> bytes:
    return frame.pack(magic, version, type_, payload, flags)


def read_fully(data: bytes, nfds: int = 0):
    """Decode a frame and read all of it: a Manifest's keys are checked lazily, when read (the
    target reads them only if its source dies)."""
    version, ev = decode(data, nfds)
    if isinstance(ev, h.Manifest):
        ev.keys()
    return version, ev


def assert_protocol_error(data: bytes, nfds: int = 0, match: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as ei:
        read_fully(data, nfds)
    return ei.value


# -- codec: round trips ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip_every_event_type(name):
    ev, nfds = EXAMPLES[name]
    data = encode(ev)
    assert data[:4] == b"CPRH" and data[4] == 1 and data[5] == h._TYPE[type(ev)]
    assert int.from_bytes(data[8:12], "little") == len(data) - frame.HEADER_SIZE
    version, got = decode(data, nfds)
    assert version == h.VERSION == 1
    assert got == ev and type(got) is type(ev)
    assert encode(got) == data
    if isinstance(ev, Batch):
        assert got.records() == ev.records()
        assert got.raw == ev.raw


def test_every_event_type_has_an_example():
    assert {type(ev) for ev, _ in EXAMPLES.values()} == set(h._TYPE)
    assert sorted(h._TYPE.values()) == list(range(1, 13))


def test_batch_records_layout():
    recs = make_records(3)
    b = Batch.of(5, recs)
    assert b.count == 3 and b.seq == 5
    assert b.records() == recs
    # fixed 30-byte records first, then the names
    assert h.RECORD.size == 30
    names = b"".join(r.name.encode() for r in recs)
    assert b.raw.endswith(names) and len(b.raw) == 30 * 3 + len(names)
    fixed = list(h.RECORD.iter_unpack(b.raw[:90]))
    assert [(f[0], f[1], f[2]) for f in fixed] == \
        [(r.id, int(r.ident.kind), len(r.name.encode())) for r in recs]


def test_batch_of_max_size_fits_in_a_frame():
    recs = [Record("n" * 255, i, Identity(Kind.EVENTFD, 0o600, 1, 2, 2)) for i in range(h.SCM_MAX_FD)]
    data = encode(Batch.of(0, recs))
    assert len(data) - frame.HEADER_SIZE <= h.MAX_PAYLOAD
    _, ev = decode(data, h.SCM_MAX_FD)
    assert ev.records() == recs


@given(events_st)
def test_round_trip_random_events(ev):
    data = encode(ev)
    version, got = decode(data, fds_for(ev))
    assert version == 1
    assert got == ev
    if isinstance(ev, Batch):
        assert got.records() == ev.records()


def test_abort_message_is_capped_and_never_fails():
    _, ev = decode(encode(Abort(1, "é" * 5000)), 0)
    assert len(ev.message.encode()) <= 4096 and ev.message.startswith("é" * 100)
    _, ev = decode(raw_frame(h.ABORT, b"\x02\x00\xff\xfe bad utf-8"), 0)
    assert ev.code == 2 and ev.message.endswith(" bad utf-8")


# -- codec: every malformed frame is a ProtocolError ------------------------------------------
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_prefix_of_a_valid_frame_is_refused(name):
    ev, nfds = EXAMPLES[name]
    data = encode(ev)
    for i in range(len(data)):
        assert_protocol_error(data[:i], nfds)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_payload_length_that_lies(name):
    ev, nfds = EXAMPLES[name]
    data = encode(ev)
    n = len(data) - frame.HEADER_SIZE
    for lie in {0, 1, n - 1, n + 1, n + 1000, h.MAX_PAYLOAD, h.MAX_PAYLOAD + 1, U32} - {n}:
        if lie < 0:
            continue
        bad = data[:8] + lie.to_bytes(4, "little") + data[12:]
        assert_protocol_error(bad, nfds, match="announces")


@pytest.mark.parametrize("name", sorted(set(EXAMPLES) - {"abort", "abort_empty"}))
def test_payload_cut_or_padded_with_an_honest_header(name):
    """The header matches the bytes, but the payload is too short or too long for the type."""
    ev, nfds = EXAMPLES[name]
    data = encode(ev)
    payload = data[frame.HEADER_SIZE:]
    for cut in range(len(payload)):
        assert_protocol_error(raw_frame(data[5], payload[:cut]), nfds)
    for pad in (b"\x00", b"x" * 7):
        assert_protocol_error(raw_frame(data[5], payload + pad), nfds)


def test_over_limit_payload_is_refused_before_parsing():
    big = b"\x00" * (h.MAX_PAYLOAD + 1)
    assert_protocol_error(raw_frame(h.BATCH, big), 0, match="over the limit")


@given(magic=st.binary(min_size=4, max_size=4).filter(lambda m: m != b"CPRH"),
       name=st.sampled_from(sorted(EXAMPLES)))
def test_wrong_magic(magic, name):
    ev, nfds = EXAMPLES[name]
    assert_protocol_error(magic + encode(ev)[4:], nfds, match="wrong magic")


def test_control_magic_is_not_handoff():
    assert_protocol_error(control.encode_request("ls"), 0, match="wrong magic")


@given(version=st.integers(0, 255).filter(lambda v: v != 1),
       name=st.sampled_from(sorted(set(EXAMPLES) - {"source_hello", "source_hello_no_path"})))
def test_wrong_or_future_version(version, name):
    ev, nfds = EXAMPLES[name]
    assert_protocol_error(encode(ev, version), nfds, match=f"protocol version {version}")


def test_source_hello_in_a_future_frame_version_is_decoded_for_negotiation():
    hello = SourceHello(pid=9, entries=1, fds=1, min_version=1, max_version=7)
    version, ev = decode(encode(hello, 7), 0)
    assert (version, ev) == (7, hello)
    t = Handoff("target")
    t.receive(encode(hello, 7))
    assert t.version == 1 and t.state is State.HELLO


@given(flags=st.integers(1, U16), name=st.sampled_from(sorted(EXAMPLES)))
def test_nonzero_frame_flags_are_refused(flags, name):
    """v1 defines one flag (REPLACE, on Batch only); any other means something this cprd cannot know."""
    ev, nfds = EXAMPLES[name]
    assume(not (isinstance(ev, Batch) and flags == h.REPLACE))
    data = encode(ev)
    assert_protocol_error(data[:6] + flags.to_bytes(2, "little") + data[8:], nfds, match="flags")


def test_replace_batches_delete_and_results_round_trip():
    b = Batch.of(3, make_records(2), replace=True)
    data = encode(b)
    assert int.from_bytes(data[6:8], "little") == h.REPLACE
    _, got = decode(data, 2)
    assert got.replace and got == b and got.records() == b.records()
    d = h.Delete.of([("a", 1), ("é", -2)])
    _, got = decode(encode(d))
    assert got.keys() == [("a", 1), ("é", -2)]
    r = h.Results((("rid-1", {"ok": True, "result": {"name": "a"}}), ("rid-2", {"ok": False})))
    _, got = decode(encode(r))
    assert got == r
    for bad in (b"{}", b"[1]", b'[["a"]]', b"\xff"):
        with pytest.raises(ProtocolError):
            decode(frame.pack(h.MAGIC, 1, h.RESULTS, bad))


def test_pre_copy_deltas_change_the_end_accounting():
    p = Pair()
    p.hello(2, 2)
    p.s2t(Batch.of(0, make_records(2)))
    p.s2t(Batch.of(1, make_records(1, 10), replace=True))  # one more entry
    p.s2t(h.Delete.of([("n0", 0)]))
    with pytest.raises(ProtocolError, match="snapshot batch"):
        p.tgt.receive(encode(Batch.of(2, make_records(1, 20))), 1)
    p.s2t(End(2, 3, p.src.digest))  # 2 entries in the end, 3 fds sent
    assert p.tgt.state is State.ENDED


@given(t=st.integers(0, 255).filter(lambda t: not 1 <= t <= 12), payload=st.binary(max_size=64))
def test_unknown_message_type(t, payload):
    assert_protocol_error(raw_frame(t, payload), 0, match=f"unknown message type {t}")


@given(records=st.lists(records_st, min_size=1, max_size=12), nfds=st.integers(0, 300))
def test_batch_fd_count_must_match_records(records, nfds):
    assume(nfds != len(records))
    assert_protocol_error(encode(Batch.of(0, records)), nfds, match="fds arrived")


@given(name=st.sampled_from(sorted(EXAMPLES)), extra=st.integers(1, 253))
def test_fd_count_must_match_for_every_type(name, extra):
    ev, nfds = EXAMPLES[name]
    assert_protocol_error(encode(ev), nfds + extra, match="fds arrived")
    if nfds:
        assert_protocol_error(encode(ev), nfds - 1, match="fds arrived")


@given(records=st.lists(records_st, min_size=1, max_size=12), count=st.integers(0, U16), data=st.data())
def test_batch_record_count_that_lies(records, count, data):
    assume(count != len(records))
    raw = Batch.of(0, records).raw
    payload = h._BATCH.pack(data.draw(st.integers(0, U32)), count) + raw
    nfds = data.draw(st.sampled_from([count, len(records)]))
    assert_protocol_error(raw_frame(h.BATCH, payload), nfds)


def test_batch_of_zero_or_too_many_records():
    assert_protocol_error(raw_frame(h.BATCH, h._BATCH.pack(0, 0)), 0, match="0 records")
    recs = [Record("a", i, Identity(Kind.EVENTFD, 0o600, 1, 2, 2)) for i in range(254)]
    payload = h._BATCH.pack(0, 254) + h.encode_records(recs)
    assert_protocol_error(raw_frame(h.BATCH, payload), 254, match="254 records")


def _one_record_frame(name: bytes, kind: int = int(Kind.EVENTFD), nlen: int | None = None) -> bytes:
    fixed = h.RECORD.pack(7, kind, len(name) if nlen is None else nlen, 0o600, 2, 1, 2)
    return raw_frame(h.BATCH, h._BATCH.pack(0, 1) + fixed + name)


@given(name=st.binary(min_size=1, max_size=255))
def test_invalid_utf8_names(name):
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        assert_protocol_error(_one_record_frame(name), 1, match="not valid UTF-8")
    else:
        assume(False)


@pytest.mark.parametrize("name", [b"\xff", b"a\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\x80"])
def test_invalid_utf8_name_examples(name):
    assert_protocol_error(_one_record_frame(name), 1, match="not valid UTF-8")


@given(prefix=names_st, ctrl=st.characters(whitelist_categories=("Cc",)), suffix=names_st)
def test_names_with_control_characters(prefix, ctrl, suffix):
    name = (prefix[:60] + ctrl + suffix[:60]).encode()
    assert_protocol_error(_one_record_frame(name), 1, match="control character")


def test_name_length_zero_or_past_the_end():
    assert_protocol_error(_one_record_frame(b"", nlen=0), 1, match="name length of 0")
    assert_protocol_error(_one_record_frame(b"abc", nlen=4), 1, match="name length of 4")
    # a batch whose names overrun into nothing, and one with bytes left over
    assert_protocol_error(_one_record_frame(b"abcd", nlen=3), 1, match="bytes left")


@given(kind=st.integers(0, 255).filter(lambda k: k not in {int(x) for x in STORABLE_KINDS}))
def test_unknown_or_refused_kind(kind):
    assert_protocol_error(_one_record_frame(b"x", kind=kind), 1, match=f"kind {kind}")


def test_epoll_kind_is_refused():
    assert int(Kind.EPOLL) == 14
    assert_protocol_error(_one_record_frame(b"watcher", kind=14), 1, match="refused kind 14")


def test_hello_and_commit_field_checks():
    p = h._SOURCE_HELLO.pack(3, 2, 1, 1, 1, 253, 0)
    assert_protocol_error(raw_frame(h.SOURCE_HELLO, p), match="version range 3..2 is empty")
    for bmax in (0, 254, U16):
        p = h._SOURCE_HELLO.pack(1, 1, 1, 1, 1, bmax, 0)
        assert_protocol_error(raw_frame(h.SOURCE_HELLO, p), match=f"batch size {bmax}")
    p = h._SOURCE_HELLO.pack(1, 1, 1, 1, 1, 253, 2) + b"\xff\xfe"
    assert_protocol_error(raw_frame(h.SOURCE_HELLO, p), match="not valid UTF-8")
    p = h._SOURCE_HELLO.pack(1, 1, 1, 1, 1, 253, 5) + b"abc"
    assert_protocol_error(raw_frame(h.SOURCE_HELLO, p), match="expected exactly")
    for flag in (2, 255):
        assert_protocol_error(raw_frame(h.COMMIT, bytes([flag])), 0, match=f"listener flag {flag}")


@given(data=st.binary(max_size=300), nfds=st.integers(0, 300))
def test_random_bytes_only_raise_protocol_error(data, nfds):
    try:
        read_fully(data, nfds)
    except ProtocolError:
        pass


@given(type_=st.integers(0, 12), version=st.sampled_from([0, 1, 1, 1, 2]),
       flags=st.sampled_from([0, 0, 0, 1]),
       payload=st.binary(max_size=200), nfds=st.integers(0, 5))
def test_random_payloads_only_raise_protocol_error(type_, version, flags, payload, nfds):
    data = raw_frame(type_, payload, version, flags)
    try:
        v, ev = read_fully(data, nfds)
    except ProtocolError:
        return
    if flags:  # a REPLACE batch, or a hello of a future version (whose flags this cprd cannot know)
        assert (isinstance(ev, SourceHello) and v > h.VERSION) or (isinstance(ev, Batch) and ev.replace)
        return
    # whatever decodes is canonical: it encodes back to the same bytes (Abort text aside)
    if not isinstance(ev, Abort):
        assert encode(ev, v) == data


@given(ev=events_st, data=st.data())
def test_mutated_frames_only_raise_protocol_error(ev, data):
    frame_bytes = bytearray(encode(ev))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, max(0, len(frame_bytes) - 1)))
        if op == "flip" and frame_bytes:
            frame_bytes[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame_bytes[i:]
        elif op == "insert":
            frame_bytes[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and frame_bytes:
            del frame_bytes[i]
    try:
        read_fully(bytes(frame_bytes), data.draw(st.integers(0, 30)))
    except ProtocolError:
        pass


# -- the state machine ----------------------------------------------------------------------
class Pair:
    """A source and a target machine wired back to back (what the I/O layer would do)."""

    def __init__(self, window: int = 4, target_window: int | None = None) -> None:
        self.src = Handoff("source", window=window)
        self.tgt = Handoff("target", window=window if target_window is None else target_window)

    def s2t(self, ev, nfds: int | None = None):
        got = self.tgt.receive(self.src.send(ev), fds_for(ev) if nfds is None else nfds)
        assert got == ev
        return got

    def t2s(self, ev):
        got = self.src.receive(self.tgt.send(ev), fds_for(ev))
        assert got == ev
        return got

    def hello(self, entries: int, batch_max: int = h.SCM_MAX_FD) -> None:
        self.s2t(SourceHello(pid=100, entries=entries, fds=entries, batch_max=batch_max, control_path="/c"))
        self.t2s(TargetHello(version=1, pid=200, fd_limit=1 << 16, open_fds=20, capacity=(1 << 16) - 20))

    def states(self) -> tuple[State, State]:
        return self.src.state, self.tgt.state


@pytest.mark.parametrize("n,batch_max,window", [(1, 253, 4), (600, 100, 2), (1000, 253, 1), (507, 253, 4),
                                                (40, 3, 3)])
def test_full_conversation(n, batch_max, window):
    p = Pair(window)
    records = make_records(n)
    assert p.states() == (State.START, State.START)
    p.hello(n, batch_max)
    assert p.states() == (State.TRANSFER, State.TRANSFER)
    assert p.src.peer_hello.capacity == (1 << 16) - 20 and p.tgt.hello.entries == n

    received: list[Record] = []
    raws: list[bytes] = []
    pending: deque[int] = deque()
    most_unacked = 0
    chunks = [records[i:i + batch_max] for i in range(0, n, batch_max)]
    for seq, chunk in enumerate(chunks):
        while not p.src.can_send_batch():
            assert p.src.unacked == window
            with pytest.raises(ProtocolError, match="window"):  # the machine enforces it too
                p.src.send(Batch.of(seq, chunk))
            done = pending.popleft()
            p.t2s(Ack(done, len(received)))
        b = p.s2t(Batch.of(seq, chunk))
        received += b.records()
        raws.append(b.raw)
        pending.append(seq)
        most_unacked = max(most_unacked, p.src.unacked)
    assert most_unacked == min(window, len(chunks))

    p.s2t(End(entries=n, fds=n, digest=p.src.digest))
    assert p.states() == (State.ENDED, State.ENDED)
    while pending:  # acks still in flight when End went out
        p.t2s(Ack(pending.popleft(), len(received)))
    assert p.src.unacked == 0
    p.t2s(Ready(entries=n, digest=p.tgt.digest))
    assert p.states() == (State.READY, State.READY)
    p.s2t(Commit(True))
    assert p.states() == (State.COMMITTED, State.COMMITTED)
    p.t2s(Confirm(pid=200))
    assert p.states() == (State.DONE, State.DONE)

    assert received == records
    assert p.src.digest == p.tgt.digest == digest_of(raws)
    assert p.src.records == p.tgt.records == p.src.fds == p.tgt.fds == n
    assert p.src.next_seq == p.tgt.next_seq == len(chunks)


def test_empty_table_conversation():
    p = Pair()
    p.hello(0)
    p.s2t(End(0, 0, hashlib.blake2b(digest_size=16).digest()))
    p.t2s(Ready(0, p.tgt.digest))
    p.s2t(Commit(False))
    p.t2s(Confirm(200))
    assert p.states() == (State.DONE, State.DONE)


def test_target_enforces_the_window():
    p = Pair(window=3, target_window=2)  # a source that ignores the agreed window
    p.hello(10, 1)
    for seq in range(2):
        p.s2t(Batch.of(seq, make_records(1, seq)))
    data = p.src.send(Batch.of(2, make_records(1, 2)))
    with pytest.raises(ProtocolError, match="window of 2"):
        p.tgt.receive(data, 1)
    assert p.tgt.next_seq == 2 and p.tgt.records == 2
    p.tgt.send(Ack(0, 1))  # after an ack there is room again
    assert p.tgt.receive(data, 1).seq == 2


def test_ack_ordering():
    p = Pair(window=4)
    p.hello(10, 2)
    for seq in range(3):
        p.s2t(Batch.of(seq, make_records(2, 2 * seq)))
    with pytest.raises(ProtocolError, match="ack for batch 1, expected 0"):
        p.src.receive(encode(Ack(1, 4)))
    with pytest.raises(ProtocolError, match="ack for batch 1, expected 0"):
        p.tgt.send(Ack(1, 4))  # the target's own machine refuses to send it too
    p.t2s(Ack(0, 2))
    with pytest.raises(ProtocolError, match="ack for batch 0, expected 1"):  # a duplicate
        p.src.receive(encode(Ack(0, 2)))
    p.t2s(Ack(1, 4))
    p.t2s(Ack(2, 6))
    with pytest.raises(ProtocolError, match="never sent"):
        p.src.receive(encode(Ack(3, 8)))
    assert p.src.acked == 3 and p.src.unacked == 0


def test_batch_sequence_size_and_total():
    p = Pair()
    p.hello(5, 2)
    with pytest.raises(ProtocolError, match="batch 1 arrived, expected batch 0"):
        p.tgt.receive(encode(Batch.of(1, make_records(1))), 1)
    with pytest.raises(ProtocolError, match="exceeds the agreed 2"):
        p.tgt.receive(encode(Batch.of(0, make_records(3))), 3)
    with pytest.raises(ProtocolError, match="exceeds the agreed 2"):
        p.src.send(Batch.of(0, make_records(3)))
    p.s2t(Batch.of(0, make_records(2)))
    p.s2t(Batch.of(1, make_records(2, 2)))
    with pytest.raises(ProtocolError, match="more entries arrived than the 5 announced"):
        p.tgt.receive(encode(Batch.of(2, make_records(2, 4))), 2)
    assert p.tgt.records == 4


def _transferred(n: int = 4) -> Pair:
    p = Pair()
    p.hello(n, 2)
    for seq in range(math.ceil(n / 2)):
        p.s2t(Batch.of(seq, make_records(min(2, n - 2 * seq), 2 * seq)))
    return p


@pytest.mark.parametrize("end,match", [
    (lambda p: End(4, 4, bytes(16)), "digest"),
    (lambda p: End(4, 4, p.src.digest[::-1]), "digest"),
    (lambda p: End(3, 4, p.src.digest), "3 entries, 4 arrived"),
    (lambda p: End(4, 5, p.src.digest), "sent 5 fds, 4 arrived"),
])
def test_end_is_checked_by_the_target(end, match):
    p = _transferred()
    with pytest.raises(ProtocolError, match=match):
        p.tgt.receive(encode(end(p)))
    assert p.tgt.state is State.TRANSFER
    with pytest.raises(ProtocolError, match=match):  # and the source will not send a wrong one
        p.src.send(end(p))


def test_end_before_all_announced_entries():
    p = Pair()
    p.hello(6, 2)
    p.s2t(Batch.of(0, make_records(2)))
    with pytest.raises(ProtocolError, match="2 entries/2 fds sent, 6/6 announced"):
        p.tgt.receive(encode(End(2, 2, p.src.digest)))


def test_ready_is_checked_by_the_source():
    p = _transferred()
    p.s2t(End(4, 4, p.src.digest))
    for bad in (Ready(4, bytes(16)), Ready(3, p.tgt.digest), Ready(5, p.tgt.digest)):
        with pytest.raises(ProtocolError, match="handoff ready"):
            p.src.receive(encode(bad))
        assert p.src.state is State.ENDED
    p.t2s(Ready(4, p.tgt.digest))
    assert p.src.state is State.READY


def test_digest_covers_the_order_of_batches():
    a, b = make_records(2), make_records(2, 2)
    p = Pair()
    p.hello(4, 2)
    p.s2t(Batch.of(0, a))
    p.s2t(Batch.of(1, b))
    assert p.src.digest == digest_of([Batch.of(0, a).raw, Batch.of(1, b).raw])
    assert p.src.digest != digest_of([Batch.of(0, b).raw, Batch.of(1, a).raw])


# Examples of each event type, to throw at machines in every state.
def _any(ev_type, m: Handoff):
    return {
        SourceHello: SourceHello(1, 1, 1),
        TargetHello: TargetHello(1, 2, 100, 1, 99),
        Batch: Batch.of(m.next_seq, make_records(1, 900)),
        Ack: Ack(m.acked, 1),
        End: End(m.records, m.fds, m.digest),
        Ready: Ready(m.records, m.digest),
        Commit: Commit(False),
        Confirm: Confirm(2),
        h.Manifest: h.Manifest.of([("m", 1)]),
        h.Delete: h.Delete.of([("m", 1)]),
        h.Results: h.Results((("r", None),)),
    }[ev_type]


def _pair_in(state: State) -> Pair:
    p = Pair()
    if state is State.START:
        return p
    p.s2t(SourceHello(pid=100, entries=2, fds=2, batch_max=2))
    if state is State.HELLO:
        return p
    p.t2s(TargetHello(1, 200, 100, 1, 99))
    if state is State.TRANSFER:
        return p
    if state is State.ABORTED:
        p.t2s(Abort(AbortCode.GENERIC, "stop"))
        return p
    p.s2t(Batch.of(0, make_records(2)))
    p.t2s(Ack(0, 2))
    p.s2t(End(2, 2, p.src.digest))
    if state is State.ENDED:
        return p
    p.t2s(Ready(2, p.tgt.digest))
    if state is State.READY:
        return p
    p.s2t(Commit(False))
    if state is State.COMMITTED:
        return p
    p.t2s(Confirm(200))
    assert state is State.DONE
    return p


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("role", ["source", "target"])
def test_events_out_of_turn(state, role):
    """Every (state, event) pair outside TRANSITIONS is refused, on receive and on send, and leaves
    the machine as it was."""
    refused = 0
    for ev_type, sender in h.SENDER.items():
        p = _pair_in(state)
        assert p.states() == (state, state)
        m = p.src if role == "source" else p.tgt
        ev = _any(ev_type, m)
        allowed = (state, ev_type) in h.TRANSITIONS
        if sender != role:  # the peer sends this: receive it
            if allowed:
                continue
            with pytest.raises(ProtocolError):
                m.receive(encode(ev, m.version), fds_for(ev))
        else:
            wrong_side = f"the {m.peer} sent {ev_type.__name__}, which only the {role}"
            with pytest.raises(ProtocolError, match=wrong_side):
                m.receive(encode(ev, m.version), fds_for(ev))  # from the wrong side, never allowed
            assert m.state is state
            if allowed:
                continue
            with pytest.raises(ProtocolError):
                m.send(ev)
        assert m.state is state
        refused += 1
    assert refused >= 4


@pytest.mark.parametrize("state", [s for s in State if s not in (State.DONE, State.ABORTED)])
def test_abort_from_either_side_in_any_live_state(state):
    for sender in ("source", "target"):
        p = _pair_in(state)
        ab = Abort(AbortCode.VERIFY, f"{sender} gives up")
        if sender == "source":
            p.s2t(ab)
        else:
            p.t2s(ab)
        assert p.states() == (State.ABORTED, State.ABORTED)
        assert p.src.abort == p.tgt.abort == ab
        with pytest.raises(ProtocolError):  # nothing follows an abort
            p.tgt.receive(encode(Confirm(1)))


@pytest.mark.parametrize("state", [State.DONE, State.ABORTED])
def test_no_abort_after_the_end(state):
    p = _pair_in(state)
    with pytest.raises(ProtocolError, match="abort from the"):
        p.src.receive(encode(Abort(1, "late")))
    with pytest.raises(ProtocolError, match="abort from the"):
        p.tgt.send(Abort(1, "late"))
    assert p.states() == (state, state)


def test_version_negotiation():
    t = Handoff("target")
    with pytest.raises(ProtocolError, match="source speaks versions 2..3"):
        t.receive(encode(SourceHello(1, 1, 1, min_version=2, max_version=3), 3))
    assert t.state is State.START

    s = Handoff("source")
    s.send(SourceHello(1, 1, 1))
    for bad in (0, 2):
        with pytest.raises(ProtocolError):
            s.receive(encode(TargetHello(bad, 2, 10, 1, 9)))
        assert s.state is State.HELLO

    p = Pair()
    p.hello(1)
    assert p.src.version == p.tgt.version == 1
    msg = encode(Ack(0, 1), version=2)
    with pytest.raises(ProtocolError):
        p.src.receive(msg)


def test_machine_rejects_a_frame_in_another_version_than_agreed():
    # SourceHello in frame version 2 with range 1..2: target settles on 1, and a later v2 frame is refused
    t = Handoff("target")
    t.receive(encode(SourceHello(1, 2, 2, min_version=1, max_version=2), 2))
    assert t.version == 1
    t.send(TargetHello(1, 2, 10, 1, 9))
    with pytest.raises(ProtocolError, match="version 2"):
        payload = h._BATCH.pack(0, 1) + h.encode_records(make_records(1))
        t.receive(frame.pack(h.MAGIC, 2, h.BATCH, payload), 1)


# -- control protocol -----------------------------------------------------------------------
@given(items=st.lists(st.one_of(st.integers(), st.text(max_size=3000), st.dictionaries(st.text(max_size=20),
                                                                                    st.integers())),
                      max_size=120))
@example(items=["x" * 1000] * 200)  # 200 KB: several frames
@example(items=["x" * (control.CHUNK - len('{"ok":true,"result":["",""]}'))])  # ends exactly at a frame's end
def test_streamed_reply_is_the_same_frames_as_the_whole(items):
    """encode_reply_items (what `ls` sends, from JSON cached item by item) puts the same frames on
    the wire as encode_reply of the whole list, and a ReplyReader gets the list back."""
    frames = control.encode_reply_items(iter(items))
    assert frames == control.encode_reply(items)
    if len(json.dumps(items)) > 2 * control.CHUNK:
        assert len(frames) >= 3
    reader = control.ReplyReader()
    got = [reader.feed(f) for f in frames]
    assert got[:-1] == [None] * (len(frames) - 1) and got[-1] == {"ok": True, "result": items}



_VALUES = {str: ["vfio/0000", "", "é"], int: [0, -5, 2**31 - 1], bool: [True, False], float: [30.0, 1.5],
           list: [[65534], [0, 100]]}


def _args_for(op: str, with_optional: bool) -> dict:
    required, optional, _ = control.OPS[op]
    args = {k: _VALUES[t][0] for k, t in required.items()}
    if with_optional:
        args.update({k: _VALUES[t][1] for k, (t, _) in optional.items()})
    return args


def _req(payload: bytes, version: int = 1, type_: int = control.REQUEST, flags: int = 0,
         magic: bytes = control.MAGIC) -> bytes:
    return frame.pack(magic, version, type_, payload, flags)


@pytest.mark.parametrize("op", sorted(control.OPS))
@pytest.mark.parametrize("with_optional", [False, True])
def test_control_request_round_trip(op, with_optional):
    required, optional, want_fds = control.OPS[op]
    args = _args_for(op, with_optional)
    data = control.encode_request(op, **args)
    assert data[:4] == b"CPRC"
    req = control.decode_request(data, want_fds)
    expect = {k: d for k, (_, d) in optional.items()} | args
    assert req == control.Request(op, expect)
    assert set(req.args) == set(required) | set(optional)


def test_control_ops_and_fds():
    assert set(control.OPS) == {"put", "get", "del", "ls", "status", "handoff", "upgrade", "fdstore", "share"}
    assert {op: s[2] for op, s in control.OPS.items()} == {
        "put": 1, "get": 0, "del": 0, "ls": 0, "status": 0, "handoff": 0, "upgrade": 0, "fdstore": 0, "share": 0}


@pytest.mark.parametrize("op", sorted(control.OPS))
def test_control_fd_count_mismatch(op):
    want = control.OPS[op][2]
    data = control.encode_request(op, **_args_for(op, False))
    for n in {0, 1, 2, 253} - {want}:
        with pytest.raises(UsageError, match=rf"{op}: {n} fds arrived with the request, expected {want}"):
            control.decode_request(data, n)


@pytest.mark.parametrize("op", [op for op in sorted(control.OPS) if control.OPS[op][0]])
def test_control_missing_argument(op):
    required, _, fds = control.OPS[op]
    for key in required:
        args = _args_for(op, True)
        del args[key]
        with pytest.raises(UsageError, match=f"{op}: missing argument '{key}'"):
            control.decode_request(control.encode_request(op, **args), fds)


@pytest.mark.parametrize("op", sorted(control.OPS))
def test_control_extra_argument(op):
    fds = control.OPS[op][2]
    with pytest.raises(UsageError, match=f"{op}: unknown argument\\(s\\) bogus, zz"):
        control.decode_request(control.encode_request(op, **_args_for(op, True), zz=1, bogus=None), fds)


_WRONG = {str: [1, None, ["a"], {"a": 1}, True], int: ["1", 1.0, None, True, False, [1]],
          bool: [1, 0, "true", None], float: ["1", None, True, [1], {"a": 1}],
          list: [1, None, "65534", [True], [-1], [2**32], ["0"], list(range(65))]}


@pytest.mark.parametrize("op", sorted(control.OPS))
def test_control_wrong_types(op):
    required, optional, fds = control.OPS[op]
    types = dict(required) | {k: t for k, (t, _) in optional.items()}
    tried = 0
    for key, typ in types.items():
        for bad in _WRONG[typ]:
            args = _args_for(op, True) | {key: bad}
            with pytest.raises(UsageError, match=f"argument '{key}' must be"):
                control.decode_request(control.encode_request(op, **args), fds)
            tried += 1
    assert tried == sum(len(_WRONG[t]) for t in types.values())


@pytest.mark.parametrize("obj", [{}, {"op": "nope"}, {"op": None}, {"op": 1}, {"op": ["ls"]},
                                 {"op": {"a": 1}},
                                 {"op": "LS"}])
def test_control_unknown_op(obj):
    with pytest.raises(UsageError, match="unknown operation"):
        control.decode_request(_req(json.dumps(obj).encode()), 0)


@pytest.mark.parametrize("payload,match", [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"op=ls", "not JSON"),
    (b'{"op":"ls"} trailing', "not JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"op":"\xed\xa0\x80"}', "not valid UTF-8"),
    (b"[]", "must be a JSON object"),
    (b'"ls"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"[" * 5000 + b"]" * 5000, "cannot be parsed"),  # nested past the recursion limit
    (b'{"op":"get","name":"a","id":' + b"9" * 5000 + b"}", "cannot be parsed"),  # over int digit limit
])
def test_control_bad_payloads(payload, match):
    with pytest.raises(ProtocolError, match=match):
        control.decode_request(_req(payload), 0)


def test_control_bad_frames():
    good = control.encode_request("ls")
    with pytest.raises(ProtocolError, match="version 2"):
        control.decode_request(_req(b'{"op":"ls"}', version=2), 0)
    with pytest.raises(ProtocolError, match="expected a request"):
        control.decode_request(_req(b'{"op":"ls"}', type_=control.REPLY), 0)
    with pytest.raises(ProtocolError, match="expected a request"):
        control.decode_request(_req(b'{"op":"ls"}', flags=control.MORE), 0)
    with pytest.raises(ProtocolError, match="wrong magic"):
        control.decode_request(_req(b'{"op":"ls"}', magic=b"CPRH"), 0)
    for i in range(len(good)):
        with pytest.raises(ProtocolError):
            control.decode_request(good[:i], 0)
    with pytest.raises(ProtocolError, match="over the limit"):
        control.decode_request(_req(b" " * (control.MAX_PAYLOAD + 1)), 0)


def test_control_request_size_limit():
    with pytest.raises(UsageError, match="over the limit"):
        control.encode_request("get", name="x" * control.MAX_PAYLOAD, id=0)


@given(data=st.binary(max_size=300), nfds=st.integers(0, 3))
def test_control_random_frames_only_raise_cprd_errors(data, nfds):
    try:
        control.decode_request(data, nfds)
    except CprdError:
        pass


@given(payload=st.binary(max_size=300), nfds=st.integers(0, 3))
def test_control_random_payloads_only_raise_cprd_errors(payload, nfds):
    try:
        control.decode_request(_req(payload), nfds)
    except CprdError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_KEYS = ["op", "name", "id", "replace", "to", "batch", "window"]


@given(obj=st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), json_values, max_size=6),
       op=st.sampled_from(sorted(control.OPS)) | json_values, nfds=st.integers(0, 2), with_op=st.booleans())
def test_control_random_json_objects_only_raise_cprd_errors(obj, op, nfds, with_op):
    if with_op:
        obj = obj | {"op": op}
    try:
        req = control.decode_request(_req(json.dumps(obj).encode()), nfds)
    except CprdError:
        return
    # accepted: then it really is a well-formed request
    required, optional, want_fds = control.OPS[req.op]
    assert nfds == want_fds
    assert set(req.args) == set(required) | set(optional)
    for key, typ in list(required.items()) + [(k, t) for k, (t, _) in optional.items()]:
        assert isinstance(req.args[key], typ) and (typ is bool or not isinstance(req.args[key], bool))


def _feed_all(reader: control.ReplyReader, frames: list[bytes]):
    out = [reader.feed(f) for f in frames]
    assert out[:-1] == [None] * (len(frames) - 1)
    return out[-1]


def test_reply_reader_reassembles_a_large_reply():
    result = {"entries": [{"name": f"vfio/{i:04d}", "id": i, "fd": 1000 + i, "kind": "eventfd", "mode": 384,
                           "dev": 15, "ino": 1038, "flags": 2} for i in range(3000)]}
    frames = control.encode_reply(result)
    size = len(json.dumps({"ok": True, "result": result}, separators=(",", ":")))
    assert size > 200 * 1024
    assert len(frames) == math.ceil(size / control.CHUNK) >= 4
    for i, f in enumerate(frames):
        assert len(f) <= control.MAX_FRAME
        assert f[:4] == b"CPRC" and f[5] == control.REPLY
        assert int.from_bytes(f[6:8], "little") == (control.MORE if i < len(frames) - 1 else 0)
    reader = control.ReplyReader()
    assert _feed_all(reader, frames) == {"ok": True, "result": result}
    # the reader is ready for the next reply
    assert _feed_all(reader, control.encode_reply(None)) == {"ok": True, "result": None}
    assert len(control.encode_reply([])) == 1


@pytest.mark.parametrize("cls", [errors.BadKey, errors.KeyExists, errors.KeyMissing, errors.BadFd,
                                 errors.ProtocolError, errors.CapacityError, errors.HandoffError,
                                 errors.VerifyError, errors.Busy, errors.ControlError, errors.UsageError,
                                 errors.Denied, errors.UpgradeError, errors.UnsafePath, errors.UntrustedPeer,
                                 errors.CprdError])
def test_error_replies_rebuild_the_same_class(cls):
    frames = control.encode_error(cls("what happened; what to do"))
    reply = _feed_all(control.ReplyReader(), frames)
    assert reply == {"ok": False, "error": cls.code, "message": "what happened; what to do"}
    err = errors.error_from_code(reply["error"], reply["message"])
    assert type(err) is cls and str(err) == "what happened; what to do"
    assert type(errors.error_from_code("no-such-code", "m")) is CprdError


def test_reply_reader_refuses_bad_replies():
    with pytest.raises(ProtocolError, match="expected a reply"):
        control.ReplyReader().feed(control.encode_request("ls"))
    for payload in (b"[1]", b'{"result": 1}', b"nope"):
        with pytest.raises(ProtocolError):
            control.ReplyReader().feed(frame.pack(control.MAGIC, 1, control.REPLY, payload))

    class Small(control.ReplyReader):
        MAX_REPLY = 100_000

    frames = control.encode_reply("x" * 200_000)
    reader = Small()
    with pytest.raises(ProtocolError, match="over 100000 bytes"):
        for f in frames:
            reader.feed(f)


@given(frames=st.lists(st.binary(max_size=100), min_size=1, max_size=4))
def test_reply_reader_random_frames_only_raise_cprd_errors(frames):
    reader = control.ReplyReader()
    for data in frames:
        try:
            reader.feed(data)
        except CprdError:
            pass


def test_frame_header_size():
    assert frame.HEADER_SIZE == 12
    assert frame.pack(b"ABCD", 1, 2, b"xyz", 3) == b"ABCD\x01\x02\x03\x00\x03\x00\x00\x00xyz"
    for n in range(12):
        with pytest.raises(ProtocolError, match="truncated frame"):
            frame.unpack(b"ABCD\x01\x02\x03\x00\x00\x00\x00\x00"[:n], b"ABCD", 10, "t")
    empty = b"ABCD\x01\x02\x03\x00\x00\x00\x00\x00"
    assert list(itertools.islice(frame.unpack(empty, b"ABCD", 10, "t"), 3)) == [1, 2, 3]


def test_manifest_keys_round_trip_and_are_checked():
    keys = [(f"k{i}", i - 50) for i in range(100)] + [("é" * 127, 0)]
    m = h.Manifest.of(keys)
    _, got = decode(encode(m))
    assert got.keys() == keys
    bad = h.Manifest(1, b"\x00\x00\x00\x00\x02a\x01")  # name with a control character
    with pytest.raises(ProtocolError):
        read_fully(encode(bad))
    with pytest.raises(ProtocolError):
        read_fully(encode(h.Manifest(2, h.Manifest.of([("a", 1)]).raw)))  # count lies
    with pytest.raises(ProtocolError):
        decode(encode(h.Manifest(h.MANIFEST_CHUNK + 1, b"")))


def test_manifest_cannot_announce_more_keys_than_entries():
    src, tgt = Handoff("source"), Handoff("target")
    tgt.receive(src.send(SourceHello(pid=1, entries=2, fds=2)))
    src.receive(tgt.send(TargetHello(1, 2, 100, 10, 80)))
    tgt.receive(src.send(h.Manifest.of([("a", 1), ("b", 2)])))
    src2 = h.Manifest.of([("c", 3)])
    with pytest.raises(ProtocolError, match="more keys"):
        tgt.receive(encode(src2))


@pytest.mark.parametrize("min_frames", [1, 2, 5, 80])
def test_a_reply_split_into_at_least_min_frames_reads_back_whole(min_frames):
    """A reply with more fds than one frame may carry comes in at least one frame per SCM_MAX_FD fds."""
    result = {"app": "web", "fdnames": [f"n{i}" for i in range(3)]}
    frames = control.encode_reply(result, min_frames)
    assert len(frames) >= min_frames
    reader = control.ReplyReader()
    got = [reader.feed(f) for f in frames]
    assert got[:-1] == [None] * (len(frames) - 1) and got[-1] == {"ok": True, "result": result}
