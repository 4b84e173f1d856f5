"""How fast can a handoff written in Python be, if it does only what every verified handoff must?

cprd's per-fd work, and nothing else, between two processes: the source encodes each batch's
records (in C) and sends them with 253 fds (SCM_RIGHTS), at most 4 batches unacknowledged; the
target builds the entries and inserts them into an FdTable (in C), verifies every fd (fstat and
F_GETFL) on the Verifier's helper thread, and acknowledges each batch in order once verified.
Left out, on purpose: trio, the protocol's framing and state checks, the digest, the manifest,
the hello, the two-phase commit, the pre-copy. The clock runs from the first batch sent to the
target's "all verified". Beside it, the floor of `cprd bench handoff` (N eventfds, 253 a message,
nothing verified), measured the same way in the same run.

    python docs/lean_pipeline.py --fds 7530 --reps 9 [--no-verify]

Needs cprd installed with its C module (`pip install -e .` with a C compiler). docs/benchmarks.md
has the figures and what they say about cprd's goals.
"""

from __future__ import annotations

import argparse
import array
import gc
import os
import resource
import select
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time

from cprd import handoff, speedups
from cprd.tools.bench import fd_budget, raw_transfer
from cprd.kinds import Identity, classify
from cprd.populate import mixed_spec, populate
from cprd.protocol import handoff as hp
from cprd.table import Entry, FdTable

HDR = struct.Struct("<II")  # seq, count (the target answers with seq, 0)
WINDOW = 4


def _receive(sock: socket.socket, n: int, verify: bool) -> None:
    """The target: runs in a forked child until the source says END."""
    c = speedups.C
    handoff.grow_fd_table(sock.fileno(), n + 100)
    gc.disable()
    table = FdTable()
    v = c.Verifier(handoff.FLAGS_MASK32) if verify else None
    checking: set[int] = set()
    readable = select.poll()
    readable.register(sock.fileno(), select.POLLIN)

    def ack(block: bool) -> None:
        for seq, bad in v.completed(block):
            assert bad < 0, f"batch {seq}: fd {bad} does not match its record"
            checking.discard(seq)
            sock.send(HDR.pack(seq, 0))

    sock.send(b"r")
    anc = socket.CMSG_SPACE(hp.SCM_MAX_FD * 4)
    while True:
        if checking:
            ack(False)
            if checking and (len(checking) >= WINDOW or not readable.poll(0)):
                ack(True)
                continue
        data, ancdata, _flags, _ = sock.recvmsg(hp.MAX_PAYLOAD, anc, socket.MSG_CMSG_CLOEXEC)
        if data == b"END":
            while checking:
                ack(True)
            break
        seq, count = HDR.unpack_from(data)
        fds = array.array("i")
        fds.frombytes(ancdata[0][2])
        fds = fds.tolist()
        raw = data[HDR.size:]
        r = c.absorb(raw, count, fds, table.bulk_dict(), handoff.FLAGS_MASK32, hp.KINDS, Identity, Entry,
                     handoff.NAMES, False)
        assert r == -1, f"absorb returned {r}"
        if v is None:
            sock.send(HDR.pack(seq, 0))
        else:
            v.submit(raw, count, fds, seq)
            checking.add(seq)
    if v is not None:
        v.close()
    assert len(table) == n
    sock.send(b"DONE")


def lean_handoff(entries: list[Entry], verify: bool) -> float:
    """ms to move entries to a forked child, cprd's per-fd work only."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            keep = b.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            _receive(b, len(entries), verify)
            code = 0
        finally:
            os._exit(code)
    b.close()
    try:
        if a.recv(1) != b"r":
            raise RuntimeError("the receiving child did not start")
        t0 = time.perf_counter()
        unacked = seq = 0
        for i in range(0, len(entries), hp.SCM_MAX_FD):
            while unacked >= WINDOW:
                a.recv(64)
                unacked -= 1
            chunk = entries[i:i + hp.SCM_MAX_FD]
            a.sendmsg([HDR.pack(seq, len(chunk)) + hp.encode_records(chunk)],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [e.fd for e in chunk]))])
            seq += 1
            unacked += 1
        a.send(b"END")
        while (msg := a.recv(64)) != b"DONE":
            if not msg:
                raise RuntimeError("the receiving child failed")
        return (time.perf_counter() - t0) * 1e3
    finally:
        a.close()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the receiving child exited with status {status}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fds", type=int, default=7530)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-verify", action="store_true", help="leave out the verification (and its thread)")
    args = ap.parse_args()
    if not handoff.speedups():
        print("lean_pipeline: cprd's C module is not built; reinstall cprd with a C compiler", file=sys.stderr)
        return 2
    if args.fds < 1 or args.reps < 1:
        print("lean_pipeline: --fds and --reps must be at least 1", file=sys.stderr)
        return 2
    budget = fd_budget()
    counts = mixed_spec(args.fds)
    if args.fds > budget:
        print(f"lean_pipeline: {args.fds} fds do not fit this process's fd limit ({budget} usable)", file=sys.stderr)
        return 2
    evs = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(args.fds)]
    try:
        floor = [raw_transfer(evs, hp.SCM_MAX_FD) for _ in range(args.reps)]
    finally:
        for fd in evs:
            os.close(fd)
    d = tempfile.mkdtemp(prefix="cprd-lean-")
    made = populate(counts, d)
    try:
        entries = [Entry(name, id_, fd, classify(fd)) for name, id_, fd in made]
        lean = [lean_handoff(entries, not args.no_verify) for _ in range(args.reps)]
    finally:
        for _, _, fd in made:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
    fm, lm = statistics.median(floor), statistics.median(lean)
    what = "unverified" if args.no_verify else "verified"
    print(f"N={len(entries)} floor {fm:.2f} ms (min {min(floor):.2f}); lean {what} {lm:.2f} ms (min {min(lean):.2f}); "
          f"lean / floor {lm / fm:.1f}x (medians of {args.reps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
