"""The optional C verification loop must give exactly the pure-Python loop's answers."""

from __future__ import annotations

import os
import random

import pytest

from cprd import handoff
from cprd.kinds import classify, populate, parse_spec
from cprd.protocol import handoff as hp


def test_speedup_is_built_in_ci():
    if os.environ.get("CI"):
        assert handoff.speedups(), "CI has a compiler: the C speedup must have been built by the install"


@pytest.mark.skipif(not handoff.speedups(), reason="C speedup not built (no compiler at install time)")
def test_c_and_python_verifiers_agree(tmp_path):
    made = populate(parse_spec("files=30,eventfds=30,memfds=10,pipes=10,sockets=10,devices=3"), str(tmp_path))
    try:
        records = [hp.Record(n, i, classify(fd)) for n, i, fd in made]
        fds = [fd for _, _, fd in made]
        rng = random.Random(7)
        for trial in range(200):
            k = rng.randrange(1, min(len(made), 253))
            start = rng.randrange(0, len(made) - k + 1)
            recs, batch_fds = records[start:start + k], list(fds[start:start + k])
            if trial % 2:  # swap two fds so their identities no longer match, somewhere in the batch
                i, j = rng.randrange(k), rng.randrange(k)
                batch_fds[i], batch_fds[j] = batch_fds[j], batch_fds[i]
            if trial % 7 == 0:
                batch_fds[rng.randrange(k)] = 99999  # not an open fd
            ev = hp.Batch.of(0, recs)
            _, dec = hp.decode(hp.encode(ev), k)
            c = handoff._c_verify(dec.raw, dec.count, batch_fds, handoff._MASK32)
            py = handoff._py_verify(dec.fixed, batch_fds)
            assert c == py, (trial, c, py)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(not handoff.speedups(), reason="C speedup not built")
def test_c_verifier_rejects_inconsistent_arguments():
    with pytest.raises(ValueError):
        handoff._c_verify(b"\0" * 29, 1, [0], 0)
    with pytest.raises(ValueError):
        handoff._c_verify(b"\0" * 30, 1, [], 0)
    with pytest.raises(TypeError):
        handoff._c_verify(b"\0" * 30, 1, (0,), 0)
