"""The handoff protocol (version 1), as a codec and a state machine with no I/O.

Theory of operation
-------------------
A handoff is one SOCK_SEQPACKET connection from the source (the process that owns the table) to
the target (the process that will own it). Each message is one frame (see frame.py) with magic
b"CPRH". The conversation, with who sends what::

    source                                  target
    SourceHello(versions, pid, counts) -->
                                       <--  TargetHello(version, pid, fd capacity)  | Abort
    Batch(seq, records) + fds          -->                (up to `window` unacked)
    Manifest(keys)                     -->                (any number, while batches flow)
                                       <--  Ack(seq, verified so far)
    ...
    End(entries, fds, digest)          -->
                                       <--  Ready(entries, digest)                  | Abort
    Commit(+ listening control socket) -->
                                       <--  Confirm(pid)

Either side may send Abort(code, message) at any point before Confirm. Ownership (enforced by
the I/O layer, handoff.py): until the source has sent Commit, the source owns every fd, and a
target that fails closes what it received. Once the target has read Commit it owns everything.
If the source *dies* (not merely disconnects) the fds that reached the target exist nowhere
else: before End the target keeps them ("salvage") and names the keys lost with the source,
from the Manifest; after End it has the whole table and owns it. This file only says which
message may come next (TRANSITIONS), encodes and decodes, counts fds against metadata, and
computes the digest.

Each Batch carries the metadata of exactly the fds attached to that message (at most 253, the
kernel's SCM_MAX_FD): `count` fixed 30-byte records (id, kind, name length, mode, flags, dev,
ino) followed by the `count` names, concatenated. Fixed records first let the receiver unpack
them all in one C call (struct.iter_unpack). The digest is BLAKE2b-128 over the record bytes
(fixed part and names) of every batch, in order.

Version rule: a target accepts any source version it knows (1..VERSION) and answers in the
source's highest version that it also speaks. Golden byte fixtures of each version live in
tests/unit/golden/.
"""

from __future__ import annotations

import hashlib
import json
import struct
from itertools import accumulate
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from .. import limits
from ..errors import ProtocolError
from ..kinds import KIND_BY_CODE, Identity, Kind
from ..speedups import C
from ..table import CONTROL_CHARS
from . import frame

MAGIC = b"CPRH"
VERSION = 1
MIN_VERSION = 1
SCM_MAX_FD = limits.SCM_MAX_FD  # the most fds one Batch carries: the kernel's limit for one message
MAX_PAYLOAD = 128 * 1024  # a full batch of 253 records with 255-byte names is 72 KiB
DIGEST_SIZE = 16

# message types
SOURCE_HELLO, TARGET_HELLO, BATCH, ACK, END, READY, COMMIT, CONFIRM, ABORT, MANIFEST, DELETE, RESULTS = range(1, 13)
REPLACE = 0x0001  # Batch flag: a pre-copy delta; each record replaces what its key holds

_SOURCE_HELLO = struct.Struct("<HHIIIHH")  # min_ver, max_ver, pid, entries, fds, batch_max, path_len
_TARGET_HELLO = struct.Struct("<HIIII")  # version, pid, fd_limit, open_fds, capacity
_BATCH = struct.Struct("<IH")  # seq, count
RECORD = struct.Struct("<iBBIIQQ")  # id, kind, name_len, mode, flags, dev, ino (30 bytes) + name
_ACK = struct.Struct("<II")  # seq, verified
_END = struct.Struct(f"<II{DIGEST_SIZE}s")  # entries, fds, digest
_READY = struct.Struct(f"<I{DIGEST_SIZE}s")  # entries, digest
_COMMIT = struct.Struct("<B")  # listener attached (0/1)
_CONFIRM = struct.Struct("<I")  # pid
_ABORT = struct.Struct("<H")  # code, then UTF-8 message
_MANIFEST = struct.Struct("<I")  # count, then count keys: <iB id, name_len> + name
_KEY = struct.Struct("<iB")
MANIFEST_CHUNK = 400  # keys a Manifest message: at most 400 * 260 bytes, under MAX_PAYLOAD

# the optional C loops (cprd/_speedups.c, built at install when a compiler is there); same bytes, same checks
_c = C



# -- events ---------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class SourceHello:
    pid: int
    entries: int
    fds: int
    batch_max: int = SCM_MAX_FD
    control_path: str = ""
    min_version: int = MIN_VERSION
    max_version: int = VERSION


@dataclass(slots=True, frozen=True)
class TargetHello:
    version: int
    pid: int
    fd_limit: int
    open_fds: int
    capacity: int


class Record(NamedTuple):
    name: str
    id: int
    ident: Identity


@dataclass(slots=True, eq=False)
class Batch:
    """One batch of `count` records whose fds ride with the message. `raw` is the record bytes
    (what the digest covers). A decoded batch also has `fixed` (the RECORD tuples: id, kind,
    name_len, mode, flags, dev, ino) and `names`, so the receiver's hot loop builds no per-record
    objects it does not need; ``records()`` builds Record objects on demand."""

    seq: int
    count: int
    raw: bytes = field(repr=False)
    fixed: list[tuple] | None = field(default=None, repr=False)
    names: list[str] | None = field(default=None, repr=False)
    replace: bool = False  # a delta of the pre-copy: records replace what their keys hold

    @classmethod
    def of(cls, seq: int, records: list[Record], replace: bool = False) -> Batch:
        return cls(seq, len(records), encode_records(records), replace=replace)

    def decoded(self) -> tuple[list[tuple], list[str]]:
        """(fixed, names), decoded now if decode() left that to the C receive path."""
        if self.fixed is None or self.names is None:
            self.fixed, self.names = decode_records(self.raw, self.count)
        return self.fixed, self.names

    def records(self) -> list[Record]:
        fixed, names = self.decoded()
        return [Record(n, f[0], Identity._make((KIND_BY_CODE[f[1]], f[3], f[5], f[6], f[4])))
                for f, n in zip(fixed, names)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Batch) and (self.seq, self.count, self.raw, self.replace) == \
            (other.seq, other.count, other.raw, other.replace)


@dataclass(slots=True, frozen=True)
class Ack:
    seq: int
    verified: int


@dataclass(slots=True, frozen=True)
class End:
    entries: int
    fds: int
    digest: bytes


@dataclass(slots=True, frozen=True)
class Ready:
    entries: int
    digest: bytes


@dataclass(slots=True, frozen=True)
class Commit:
    listener: bool


@dataclass(slots=True, frozen=True)
class Confirm:
    pid: int


class AbortCode:
    GENERIC = 1
    CAPACITY = 2
    VERSION = 3
    VERIFY = 4
    PROTOCOL = 5
    BUSY = 6
    CANCELLED = 7


@dataclass(slots=True, frozen=True)
class Abort:
    code: int
    message: str


def _encode_keys(keys: list[tuple[str, int]]) -> bytes:
    """Key bytes from (name, id) pairs, or anything whose items 0 and 1 are name and id (an Entry)."""
    if _c is not None:
        return _c.encode_keys(keys if isinstance(keys, list) else list(keys))
    return py_encode_keys(keys)


def py_encode_keys(keys: list[tuple[str, int]]) -> bytes:
    """_encode_keys in Python: the reference the C loop must agree with."""
    pack = _KEY.pack
    parts = []
    for k in keys:
        name, id_ = k[0], k[1]
        nb = name.encode("utf-8")
        parts.append(pack(id_, len(nb)))
        parts.append(nb)
    return b"".join(parts)


def _decode_keys(p: bytes, count: int, what: str) -> list[tuple[str, int]]:
    out, off = [], 0
    for i in range(count):
        if off + _KEY.size > len(p):
            raise ProtocolError(f"handoff {what}: key {i} of {count} is cut short")
        id_, nlen = _KEY.unpack_from(p, off)
        off += _KEY.size
        if nlen == 0 or off + nlen > len(p):
            raise ProtocolError(f"handoff {what}: key {i} has a name length of {nlen} that does not fit")
        out.append((_name(p[off:off + nlen], i), id_))
        off += nlen
    if off != len(p):
        raise ProtocolError(f"handoff {what}: {len(p) - off} bytes left after {count} keys")
    return out


@dataclass(slots=True, eq=False)
class Manifest:
    """Keys of entries the source will send (a chunk of the whole list). The target keeps the raw
    bytes and decodes them only if the source dies mid-transfer, to name the keys lost with it."""

    count: int
    raw: bytes = field(repr=False)

    @classmethod
    def of(cls, keys: list[tuple[str, int]]) -> Manifest:
        return cls(len(keys), _encode_keys(keys))

    def keys(self) -> list[tuple[str, int]]:
        return _decode_keys(self.raw, self.count, "manifest")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and (self.count, self.raw) == (other.count, other.raw)


@dataclass(slots=True, eq=False)
class Delete:
    """A pre-copy delta: these keys were deleted since they were sent. Covered by the digest."""

    count: int
    raw: bytes = field(repr=False)

    @classmethod
    def of(cls, keys: list[tuple[str, int]]) -> Delete:
        return cls(len(keys), _encode_keys(keys))

    def keys(self) -> list[tuple[str, int]]:
        return _decode_keys(self.raw, self.count, "delete")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Delete) and (self.count, self.raw) == (other.count, other.raw)


@dataclass(slots=True, frozen=True)
class Results:
    """Answers the source gave to recent mutations, by request id, so that a client that retries a
    mutation at the target gets the same answer instead of applying it twice. JSON payload."""

    results: tuple[tuple[str, object], ...]


Event = SourceHello | TargetHello | Batch | Ack | End | Ready | Commit | Confirm | Abort | Manifest | Delete | Results
_TYPE = {SourceHello: SOURCE_HELLO, TargetHello: TARGET_HELLO, Batch: BATCH, Ack: ACK, End: END,
         Ready: READY, Commit: COMMIT, Confirm: CONFIRM, Abort: ABORT, Manifest: MANIFEST, Delete: DELETE,
         Results: RESULTS}


# -- codec ----------------------------------------------------------------------------------
def encode_records(records: list[Record]) -> bytes:
    """The record bytes of a batch: fixed records, then the names. Anything with a Record's name, id
    and ident attributes will do (the source passes its table's entries as they are)."""
    if _c is not None and isinstance(records, list) and (not records or isinstance(records[0], tuple)):
        return _c.encode_records(records)  # Entry and Record are tuples: name, id, ..., ident
    return py_encode_records(records)


def py_encode_records(records: list[Record]) -> bytes:
    """encode_records in Python: the reference the C loop must agree with."""
    names = [r.name.encode("utf-8") for r in records]
    pack = RECORD.pack
    fixed = [pack(r.id, r.ident.kind, len(nb), r.ident.mode, r.ident.flags, r.ident.dev, r.ident.ino)
             for r, nb in zip(records, names)]
    return b"".join(fixed) + b"".join(names)


def encode(ev: Event, version: int = VERSION) -> bytes:
    """The frame for one event."""
    match ev:
        case SourceHello():
            path = ev.control_path.encode("utf-8")
            p = _SOURCE_HELLO.pack(ev.min_version, ev.max_version, ev.pid, ev.entries, ev.fds, ev.batch_max,
                                   len(path)) + path
        case TargetHello():
            p = _TARGET_HELLO.pack(ev.version, ev.pid, ev.fd_limit, ev.open_fds, ev.capacity)
        case Batch():
            p = _BATCH.pack(ev.seq, ev.count) + ev.raw
        case Ack():
            p = _ACK.pack(ev.seq, ev.verified)
        case End():
            p = _END.pack(ev.entries, ev.fds, ev.digest)
        case Ready():
            p = _READY.pack(ev.entries, ev.digest)
        case Commit():
            p = _COMMIT.pack(1 if ev.listener else 0)
        case Confirm():
            p = _CONFIRM.pack(ev.pid)
        case Abort():
            text = ev.message.encode("utf-8", "replace")[:4096].decode("utf-8", "ignore")  # never split a character
            p = _ABORT.pack(ev.code) + text.encode("utf-8")
        case Manifest():
            p = _MANIFEST.pack(ev.count) + ev.raw
        case Delete():
            p = _MANIFEST.pack(ev.count) + ev.raw
        case Results():
            p = json.dumps([list(r) for r in ev.results], separators=(",", ":")).encode()
            if len(p) > MAX_PAYLOAD:
                raise ProtocolError(f"handoff results: {len(p)} bytes, over the limit of {MAX_PAYLOAD}")
        case _:
            raise TypeError(f"not a handoff event: {ev!r}")
    flags = REPLACE if isinstance(ev, Batch) and ev.replace else 0
    return frame.pack(MAGIC, version, _TYPE[type(ev)], p, flags)


def _need(p: memoryview, n: int, what: str) -> None:
    if len(p) < n:
        raise ProtocolError(f"handoff {what}: payload of {len(p)} bytes is too short (needs {n})")


def _exact(p: memoryview, n: int, what: str) -> None:
    if len(p) != n:
        raise ProtocolError(f"handoff {what}: payload of {len(p)} bytes, expected exactly {n}")


_NAME_OK: dict[bytes, str] = {}  # names already checked (names repeat a lot: "eventfd", "vfio/0001")


def _name(raw: bytes, i: int) -> str:
    name = _NAME_OK.get(raw)
    if name is not None:
        return name
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"handoff batch: record {i} has a name that is not valid UTF-8") from None
    if CONTROL_CHARS.search(name):
        raise ProtocolError(f"handoff batch: record {i} name {name!r} contains a control character")
    if len(_NAME_OK) < 65536:
        _NAME_OK[raw] = name
    return name


_KIND_OK = frozenset(int(k) for k in Kind if k is not Kind.EPOLL)
# For the C loops: KINDS[code] is the Kind a record may carry (None: unknown or refused).
KINDS = tuple(KIND_BY_CODE.get(i) if i in _KIND_OK else None for i in range(max(_KIND_OK) + 1))
_SIMPLE_KINDS = bytes(1 if i < len(KINDS) and KINDS[i] is not None else 0 for i in range(256))


def decode_records(p: bytes, count: int) -> tuple[list[tuple], list[str]]:
    """(fixed record tuples, names) of a batch's record bytes; ProtocolError if anything lies."""
    fixed_len = RECORD.size * count
    if len(p) < fixed_len:
        raise ProtocolError(f"handoff batch: {len(p)} bytes cannot hold {count} records; the count lies")
    fixed = list(RECORD.iter_unpack(p[:fixed_len]))
    # The common case, checked a whole batch at a time (C loops): every name ASCII, no control
    # character, lengths that add up, known kinds. Anything else goes the record-by-record way
    # below, which also names what is wrong.
    lens = [f[2] for f in fixed]
    blob = p[fixed_len:]
    if (0 not in lens and sum(lens) == len(blob) and blob.isascii()
            and _KIND_OK.issuperset(f[1] for f in fixed)):
        text = blob.decode("ascii")
        if not CONTROL_CHARS.search(text):
            offs = list(accumulate(lens, initial=0))
            return fixed, [text[a:b] for a, b in zip(offs, offs[1:])]
    names: list[str] = []
    off = fixed_len
    end = len(p)
    for i, f in enumerate(fixed):
        nlen = f[2]
        if nlen == 0 or off + nlen > end:
            raise ProtocolError(f"handoff batch: record {i} has a name length of {nlen} that does not fit")
        kind = f[1]
        if kind not in KIND_BY_CODE or kind == Kind.EPOLL:
            raise ProtocolError(f"handoff batch: record {i} (id {f[0]}) has unknown or refused kind {kind}")
        names.append(_name(p[off:off + nlen], i))
        off += nlen
    if off != end:
        raise ProtocolError(f"handoff batch: {end - off} bytes left after {count} records; the count lies")
    return fixed, names


def decode(data: bytes, nfds: int = 0) -> tuple[int, Event]:
    """Decode one frame that arrived with `nfds` fds attached. Returns (version, event).

    ProtocolError on any fault, including a count of fds that does not match the metadata. The
    caller owns (and on error must close) the fds."""
    version, type_, flags, p = frame.unpack(data, MAGIC, MAX_PAYLOAD, "handoff")
    if not MIN_VERSION <= version <= VERSION and type_ != SOURCE_HELLO:
        raise ProtocolError(f"handoff: protocol version {version} is not one this cprd speaks "
                            f"({MIN_VERSION}..{VERSION}); upgrade the older side")
    if flags and version <= VERSION and not (type_ == BATCH and flags == REPLACE):
        raise ProtocolError(f"handoff: frame flags {flags:#06x} set on message type {type_}, which version "
                            f"{version} does not define; is the peer a cprd of a compatible version?")
    expect_fds = 0
    ev: Event
    if type_ == SOURCE_HELLO:
        _need(p, _SOURCE_HELLO.size, "source hello")
        lo, hi, pid, entries, fds, bmax, plen = _SOURCE_HELLO.unpack_from(p)
        _exact(p, _SOURCE_HELLO.size + plen, "source hello")
        try:
            path = str(p[_SOURCE_HELLO.size:], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("handoff source hello: control path is not valid UTF-8") from None
        if lo > hi:
            raise ProtocolError(f"handoff source hello: version range {lo}..{hi} is empty")
        if not 1 <= bmax <= SCM_MAX_FD:
            raise ProtocolError(f"handoff source hello: batch size {bmax} is outside 1..{SCM_MAX_FD}")
        ev = SourceHello(pid, entries, fds, bmax, path, lo, hi)
    elif type_ == TARGET_HELLO:
        _exact(p, _TARGET_HELLO.size, "target hello")
        ev = TargetHello(*_TARGET_HELLO.unpack_from(p))
    elif type_ == BATCH:
        _need(p, _BATCH.size, "batch")
        seq, count = _BATCH.unpack_from(p)
        if count == 0 or count > SCM_MAX_FD:
            raise ProtocolError(f"handoff batch: {count} records, expected 1..{SCM_MAX_FD}")
        raw = bytes(p[_BATCH.size:])
        if _c is not None and _c.simple_records(raw, count, _SIMPLE_KINDS):
            ev = Batch(seq, count, raw, None, None, bool(flags & REPLACE))  # checked; decoded where it is used
        else:
            fixed, names = decode_records(raw, count)
            ev = Batch(seq, count, raw, fixed, names, bool(flags & REPLACE))
        expect_fds = count
    elif type_ == ACK:
        _exact(p, _ACK.size, "ack")
        ev = Ack(*_ACK.unpack_from(p))
    elif type_ == END:
        _exact(p, _END.size, "end")
        ev = End(*_END.unpack_from(p))
    elif type_ == READY:
        _exact(p, _READY.size, "ready")
        ev = Ready(*_READY.unpack_from(p))
    elif type_ == COMMIT:
        _exact(p, _COMMIT.size, "commit")
        (flag,) = _COMMIT.unpack_from(p)
        if flag > 1:
            raise ProtocolError(f"handoff commit: listener flag {flag} is not 0 or 1")
        ev = Commit(bool(flag))
        expect_fds = flag
    elif type_ == CONFIRM:
        _exact(p, _CONFIRM.size, "confirm")
        ev = Confirm(*_CONFIRM.unpack_from(p))
    elif type_ == MANIFEST:
        _need(p, _MANIFEST.size, "manifest")
        (count,) = _MANIFEST.unpack_from(p)
        if count == 0 or count > MANIFEST_CHUNK:
            raise ProtocolError(f"handoff manifest: {count} keys, expected 1..{MANIFEST_CHUNK}")
        raw = bytes(p[_MANIFEST.size:])
        if not count * (_KEY.size + 1) <= len(raw) <= count * (_KEY.size + 255):
            raise ProtocolError(f"handoff manifest: {len(raw)} bytes cannot hold {count} keys")
        ev = Manifest(count, raw)  # the keys are checked when (if ever) they are read: keys()
    elif type_ == DELETE:
        _need(p, _MANIFEST.size, "delete")
        (count,) = _MANIFEST.unpack_from(p)
        if count == 0 or count > MANIFEST_CHUNK:
            raise ProtocolError(f"handoff delete: {count} keys, expected 1..{MANIFEST_CHUNK}")
        ev = Delete(count, bytes(p[_MANIFEST.size:]))
        ev.keys()  # deltas are small: check them now
    elif type_ == RESULTS:
        try:
            obj = json.loads(bytes(p).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError("handoff results: payload is not UTF-8 JSON") from None
        if not isinstance(obj, list) or not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                                                for r in obj):
            raise ProtocolError("handoff results: expected a list of [request id, answer] pairs")
        ev = Results(tuple((r[0], r[1]) for r in obj))
    elif type_ == ABORT:
        _need(p, _ABORT.size, "abort")
        (code,) = _ABORT.unpack_from(p)
        ev = Abort(code, str(p[_ABORT.size:], "utf-8", "replace"))
    else:
        raise ProtocolError(f"handoff: unknown message type {type_}")
    if nfds != expect_fds:
        raise ProtocolError(
            f"handoff {type(ev).__name__}: {nfds} fds arrived but the message accounts for {expect_fds}"
        )
    return version, ev


# -- state machine --------------------------------------------------------------------------
class State(Enum):
    START = "start"
    HELLO = "hello"  # source hello sent
    TRANSFER = "transfer"  # batches flowing
    ENDED = "ended"  # end sent, target verifying
    READY = "ready"  # target has verified everything
    COMMITTED = "committed"  # commit sent: the target owns the table
    DONE = "done"  # target confirmed
    ABORTED = "aborted"


SENDER: dict[type, str] = {
    SourceHello: "source", Batch: "source", End: "source", Commit: "source", Manifest: "source",
    Delete: "source", Results: "source",
    TargetHello: "target", Ack: "target", Ready: "target", Confirm: "target",
}

# (state, event) -> next state. Abort is allowed from every state but DONE and ABORTED.
TRANSITIONS: dict[tuple[State, type], State] = {
    (State.START, SourceHello): State.HELLO,
    (State.HELLO, TargetHello): State.TRANSFER,
    (State.TRANSFER, Batch): State.TRANSFER,
    (State.TRANSFER, Manifest): State.TRANSFER,
    (State.TRANSFER, Delete): State.TRANSFER,
    (State.TRANSFER, Results): State.TRANSFER,
    (State.TRANSFER, Ack): State.TRANSFER,
    (State.TRANSFER, End): State.ENDED,
    (State.ENDED, Ack): State.ENDED,
    (State.ENDED, Ready): State.READY,
    (State.READY, Commit): State.COMMITTED,
    (State.COMMITTED, Confirm): State.DONE,
}


class Handoff:
    """One side's view of one handoff conversation.

    ``send(ev)`` returns the bytes to put on the wire (with the fds the caller attaches);
    ``receive(data, nfds)`` returns the peer's event. Both raise ProtocolError on an event out of
    turn, and keep the counters and digest that End/Ready are checked against.
    """

    def __init__(self, role: str, window: int = 4) -> None:
        assert role in ("source", "target")
        self.role = role
        self.peer = "target" if role == "source" else "source"
        self.state = State.START
        self.version = VERSION
        self.window = window
        self.next_seq = 0  # next batch seq to send / expect
        self.acked = 0  # batches acknowledged (source) / sent acks (target)
        self.records = 0
        self.fds = 0
        self._digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self.manifests: list[Manifest] = []
        self.deltas = 0  # pre-copy delta messages (replace batches and deletes)
        self.end: End | None = None
        self.hello: SourceHello | None = None
        self.peer_hello: TargetHello | None = None
        self.abort: Abort | None = None

    @property
    def digest(self) -> bytes:
        return self._digest.copy().digest()

    @property
    def unacked(self) -> int:
        return self.next_seq - self.acked

    def can_send_batch(self) -> bool:
        return self.state is State.TRANSFER and self.unacked < self.window

    def _step(self, ev: Event, sender: str) -> None:
        if isinstance(ev, Abort):
            if self.state in (State.DONE, State.ABORTED):
                raise ProtocolError(f"handoff: abort from the {sender} after the handoff {self.state.value}")
            self.state = State.ABORTED
            self.abort = ev
            return
        if SENDER[type(ev)] != sender:
            raise ProtocolError(f"handoff: the {sender} sent {type(ev).__name__}, which only the "
                                f"{SENDER[type(ev)]} may send")
        nxt = TRANSITIONS.get((self.state, type(ev)))
        if nxt is None:
            raise ProtocolError(f"handoff: {type(ev).__name__} is not allowed in state {self.state.value}")
        self._account(ev)
        self.state = nxt

    def _account(self, ev: Event) -> None:
        if isinstance(ev, SourceHello):
            if ev.max_version < MIN_VERSION or ev.min_version > VERSION:
                raise ProtocolError(
                    f"handoff: source speaks versions {ev.min_version}..{ev.max_version}, this cprd "
                    f"{MIN_VERSION}..{VERSION}; upgrade the older side")
            if ev.fds != ev.entries:  # version 1: one fd an entry
                raise ProtocolError(f"handoff hello: {ev.entries} entries but {ev.fds} fds; version 1 has one fd "
                                    "an entry")
            self.version = min(ev.max_version, VERSION)
            self.hello = ev
        elif isinstance(ev, TargetHello):
            if self.hello and not self.hello.min_version <= ev.version <= self.hello.max_version:
                raise ProtocolError(f"handoff: target chose version {ev.version}, outside the source's "
                                    f"{self.hello.min_version}..{self.hello.max_version}")
            self.version = ev.version
            self.peer_hello = ev
        elif isinstance(ev, Batch):
            if ev.seq != self.next_seq:
                raise ProtocolError(f"handoff: batch {ev.seq} arrived, expected batch {self.next_seq}")
            if self.unacked >= self.window:
                raise ProtocolError(f"handoff: batch {ev.seq} exceeds the window of {self.window} unacked batches")
            bmax = self.hello.batch_max if self.hello else SCM_MAX_FD
            if ev.count > bmax:
                raise ProtocolError(f"handoff: batch of {ev.count} fds exceeds the agreed {bmax}")
            if ev.replace:
                self.deltas += 1
            elif self.deltas:
                raise ProtocolError(f"handoff: snapshot batch {ev.seq} after a pre-copy delta")
            elif self.hello and self.records + ev.count > self.hello.entries:
                raise ProtocolError(f"handoff: more entries arrived than the {self.hello.entries} announced")
            self.next_seq += 1
            self.records += ev.count
            self.fds += ev.count
            self._digest.update(ev.raw)
        elif isinstance(ev, Delete):
            self.deltas += 1
            self._digest.update(b"D" + ev.raw)
        elif isinstance(ev, Manifest):
            announced = self.hello.entries if self.hello else 0
            if sum(m.count for m in self.manifests) + ev.count > announced:
                raise ProtocolError(f"handoff manifest: more keys than the {announced} entries announced")
            self.manifests.append(ev)
        elif isinstance(ev, Ack):
            if ev.seq != self.acked:
                raise ProtocolError(f"handoff: ack for batch {ev.seq}, expected {self.acked}")
            if ev.seq >= self.next_seq:
                raise ProtocolError(f"handoff: ack for batch {ev.seq}, which was never sent")
            self.acked += 1
        elif isinstance(ev, End):
            # entries = the source's table at the end (deltas may add and delete): the I/O layer,
            # which holds the table, checks it; the stream itself is checked here.
            if ev.fds != self.fds:
                raise ProtocolError(f"handoff end: source says it sent {ev.fds} fds, {self.fds} arrived")
            if not self.deltas and ev.entries != self.records:
                raise ProtocolError(f"handoff end: source says {ev.entries} entries, {self.records} arrived")
            if self.hello and not self.deltas and (ev.entries, ev.fds) != (self.hello.entries, self.hello.fds):
                raise ProtocolError(f"handoff end: {ev.entries} entries/{ev.fds} fds sent, "
                                    f"{self.hello.entries}/{self.hello.fds} announced")
            if ev.digest != self.digest:
                raise ProtocolError("handoff end: digest of the entries does not match what arrived")
            self.end = ev
        elif isinstance(ev, Ready):
            if ev.digest != self.digest or (self.end is not None and ev.entries != self.end.entries):
                raise ProtocolError(f"handoff ready: target holds {ev.entries} entries with another digest "
                                    f"than the {self.end.entries if self.end else self.records} sent")

    def send(self, ev: Event) -> bytes:
        self._step(ev, self.role)
        return encode(ev, self.version)

    def receive(self, data: bytes, nfds: int = 0) -> Event:
        version, ev = decode(data, nfds)
        if isinstance(ev, TargetHello):
            # The target answers in the version it chose; the range check is in _account.
            if version != ev.version:
                raise ProtocolError(f"handoff: target hello framed as version {version} but choosing {ev.version}")
        elif not isinstance(ev, (SourceHello, Abort)) and version != self.version and self.state is not State.START:
            raise ProtocolError(f"handoff: message in version {version}, but version {self.version} was agreed")
        self._step(ev, self.peer)
        return ev
