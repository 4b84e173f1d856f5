"""The test-only fault injector itself: a spec it does not know is refused, never ignored (a test
whose fault silently never fires proves nothing); several specs act in order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cprd import fault
from cprd.errors import UsageError


@pytest.mark.parametrize("spec,message", [
    ("target:bogus", "unknown step 'bogus' for target"),
    ("source:freez", "unknown step 'freez'"),
    ("target:freeze", "unknown step 'freeze' for target"),  # only a source freezes
    ("middle:hello", "unknown side 'middle'"),
    ("target:batch:x", "N must be a number"),
    ("target:batch:1:explode", "unknown action 'explode'"),
    ("target:batch:1:rlimit=lots", "unknown action"),
    ("source:ready::sndbuf=4096", "sndbuf=N (standin:forked only)"),  # only the stand-in's journal has one
    ("target", "expected SIDE:STEP"),
    ("target:hello,source:nope", "unknown step 'nope'"),
])
def test_a_daemon_refuses_a_fault_spec_it_does_not_know(tmp_path, spec, message):
    r = subprocess.run([sys.executable, "-m", "cprd", "target", "--listen", str(tmp_path / "h.sock")],
                       capture_output=True, text=True, timeout=30, env={**os.environ, "CPRD_FAULT": spec})
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
    assert not (tmp_path / "h.sock").exists()


def test_specs_match_their_point_and_act_in_order(monkeypatch):
    monkeypatch.setattr(fault, "_SPEC", "source:ready::sleep=0.5,source:ready::shutdown,target:batch:last,"
                                        "source:batch:2:rlimit=40")
    assert fault.armed("source", "ready") == ["sleep=0.5", "shutdown"]
    assert fault.armed("target", "ready") == []
    assert fault.armed("target", "batch", 3, last=3) == ["kill"]
    assert fault.armed("target", "batch", 2, last=3) == []
    assert fault.armed("source", "batch", 2) == ["rlimit=40"] and fault.armed("source", "batch", 1) == []
    monkeypatch.setattr(fault, "_SPEC", "target:hello:x")
    with pytest.raises(UsageError):
        fault.armed("target", "hello")
