"""The two reference programs that docs/benchmarks.md draws its argument from still build and run.

They are measurements, so nothing here checks a time: only that each one moves the fds it was
asked to move and says so in the form the docs quote."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.requires("cc")
@pytest.mark.parametrize("verify,per", [(0, 253), (2, 253), (0, 1)])
def test_verify_floor_builds_and_moves_every_fd(tmp_path, verify, per):
    exe = tmp_path / "verify_floor"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(DOCS / "verify_floor.c")], check=True)
    r = subprocess.run([str(exe), "600", str(verify), str(per)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    runs = re.findall(rf"^N=600 verify={verify} per_message={per}: [0-9.]+ ms$", r.stdout, re.M)
    assert len(runs) == 5, r.stdout
    assert not list(tmp_path.glob("vf-*"))  # its regular files are removed


@pytest.mark.requires("speedups")  # the lean pipeline uses cprd's C module
@pytest.mark.parametrize("extra", [[], ["--no-verify"]])
def test_lean_pipeline_runs(extra):
    r = subprocess.run([sys.executable, str(DOCS / "lean_pipeline.py"), "--fds", "600", "--reps", "2", *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    what = "unverified" if extra else "verified"
    assert re.fullmatch(rf"N=\d+ floor [0-9.]+ ms \(min [0-9.]+\); lean {what} [0-9.]+ ms \(min [0-9.]+\); "
                        rf"lean / floor [0-9.]+x \(medians of 2\)\n", r.stdout), r.stdout
