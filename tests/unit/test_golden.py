"""Golden bytes of the handoff protocol, version 1.

tests/unit/golden/handoff_v1.json holds the exact frames of every v1 message, built once from the fixed
example values below. A cprd that changes one byte of them no longer speaks version 1 with the
cprds already deployed: bump the protocol version (and keep decoding v1) instead of regenerating
the fixture. The test only reads the fixture. Writing it is a deliberate act:

    python tests/unit/test_golden.py --write      # refuses to overwrite an existing fixture
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import pytest

from cprd.kinds import Identity, Kind
from cprd.protocol import handoff as h
from cprd.protocol.handoff import (
    Abort,
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

FIXTURE = pathlib.Path(__file__).parent / "golden" / "handoff_v1.json"

# Fixed example values: literals only, so that a change in the code cannot move them.
RECORDS = [
    Record("net/tap0", 0, Identity(Kind.CHARDEV, 0o20666, 6, 1234, 0o2)),
    Record("vfio/0000", 16, Identity(Kind.EVENTFD, 0o600, 15, 1038, 0o2)),
    Record("ключ-é", -7, Identity(Kind.MEMFD, 0o100777, 1, 2**40 + 4242, 0o100002)),
]
DIGEST = bytes.fromhex("622f113eb4ae90cf60a10944a65ebd0a")  # BLAKE2b-128 of the batch's record bytes

# message name -> (event, fds that ride with it), in conversation order
EXAMPLES: dict[str, tuple[object, int]] = {
    "source_hello": (SourceHello(pid=4242, entries=3, fds=3, batch_max=253, control_path="/run/cprd/new.sock",
                                 min_version=1, max_version=1), 0),
    "target_hello": (TargetHello(version=1, pid=4343, fd_limit=1048576, open_fds=12, capacity=1048564), 0),
    "batch": (Batch.of(0, RECORDS), 3),
    "ack": (Ack(seq=0, verified=3), 0),
    "end": (End(entries=3, fds=3, digest=DIGEST), 0),
    "ready": (Ready(entries=3, digest=DIGEST), 0),
    "commit_listener": (Commit(True), 1),
    "commit_plain": (Commit(False), 0),
    "confirm": (Confirm(pid=4343), 0),
    "abort": (Abort(code=2, message="target has room for 2 fds, 3 needed; raise RLIMIT_NOFILE"), 0),
    "batch_replace": (Batch(5, 1, bytes.fromhex("10000000040980010000020000000f000000000000000e04000000000000")
                            + b"vfio/0000", replace=True), 1),
    "delete": (h.Delete(1, bytes.fromhex("f9ffffff0b") + "ключ-é".encode()), 0),
    "results": (h.Results((("client-1", {"ok": True, "result": {"deleted": True}}),)), 0),
    "manifest": (h.Manifest(3, bytes.fromhex("0000000008") + b"net/tap0" + bytes.fromhex("1000000009") + b"vfio/0000"
                            + bytes.fromhex("f9ffffff0b") + "ключ-é".encode()), 0),
}


def load() -> dict[str, bytes]:
    doc = json.loads(FIXTURE.read_text())
    assert doc["protocol"] == "cprd handoff" and doc["version"] == 1
    return {name: bytes.fromhex(hx) for name, hx in doc["messages"].items()}


@pytest.fixture(scope="module")
def golden() -> dict[str, bytes]:
    return load()


def test_fixture_covers_every_message_type(golden):
    assert set(golden) == set(EXAMPLES)
    assert {golden[name][5] for name in golden} == set(range(1, 13)), "one golden frame per v1 message type"


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_encode_matches_golden(golden, name):
    ev, _ = EXAMPLES[name]
    assert encode(ev).hex() == golden[name].hex()


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_decode_golden(golden, name):
    ev, nfds = EXAMPLES[name]
    version, got = decode(golden[name], nfds)
    assert version == 1
    assert type(got) is type(ev)
    if isinstance(ev, Batch) and not ev.replace:
        assert (got.seq, got.count) == (0, 3)
        assert got.records() == RECORDS  # field by field, not only the raw bytes
    elif isinstance(ev, Batch):
        assert got.replace and got.records() == RECORDS[1:2]
    else:
        assert got == ev


def test_golden_digest_is_blake2b_128_of_the_record_bytes(golden):
    _, batch = decode(golden["batch"], 3)
    assert hashlib.blake2b(batch.raw, digest_size=16).digest() == DIGEST
    assert batch.raw == golden["batch"][12 + 6:]


def test_v1_constants():
    """Numbers that travel on the wire in version 1."""
    assert (h.MAGIC, h.VERSION, h.MIN_VERSION) == (b"CPRH", 1, 1)
    assert (h.SOURCE_HELLO, h.TARGET_HELLO, h.BATCH, h.ACK, h.END, h.READY, h.COMMIT, h.CONFIRM, h.ABORT,
            h.MANIFEST, h.DELETE, h.RESULTS) == tuple(range(1, 13))
    assert h.REPLACE == 1
    a = h.AbortCode
    assert (a.GENERIC, a.CAPACITY, a.VERSION, a.VERIFY, a.PROTOCOL, a.BUSY, a.CANCELLED) == tuple(range(1, 8))
    assert {k.label: int(k) for k in Kind} == {
        "file": 1, "dir": 2, "memfd": 3, "eventfd": 4, "pipe": 5, "socket": 6, "chardev": 7, "blockdev": 8,
        "timerfd": 9, "signalfd": 10, "pidfd": 11, "inotify": 12, "anon": 13, "epoll": 14}


def test_golden_conversation_passes_both_machines(golden):
    """A v1 conversation made of golden frames: each machine sends exactly the golden bytes and
    accepts the peer's golden bytes."""
    src, tgt = Handoff("source"), Handoff("target")

    def source_says(name: str) -> None:
        ev, nfds = EXAMPLES[name]
        assert src.send(ev) == golden[name]
        tgt.receive(golden[name], nfds)

    def target_says(name: str) -> None:
        ev, nfds = EXAMPLES[name]
        assert tgt.send(ev) == golden[name]
        src.receive(golden[name], nfds)

    source_says("source_hello")
    target_says("target_hello")
    source_says("batch")
    source_says("manifest")
    target_says("ack")
    source_says("end")
    target_says("ready")
    source_says("commit_listener")
    target_says("confirm")
    assert src.state is tgt.state is State.DONE
    assert src.digest == tgt.digest == DIGEST

    src, tgt = Handoff("source"), Handoff("target")
    source_says("source_hello")
    target_says("abort")
    assert src.state is tgt.state is State.ABORTED


def _write() -> None:
    if FIXTURE.exists():
        sys.exit(f"{FIXTURE} exists; version 1 is frozen. A new version gets a new fixture file.")
    doc = {
        "protocol": "cprd handoff",
        "version": 1,
        "note": "exact frames of each v1 message, built from the examples in tests/unit/test_golden.py;"
                " frozen: never regenerate",
        "messages": {name: encode(ev).hex() for name, (ev, _) in EXAMPLES.items()},
    }
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(doc, indent=2, ensure_ascii=True) + "\n")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        _write()
    else:
        sys.exit(__doc__)
