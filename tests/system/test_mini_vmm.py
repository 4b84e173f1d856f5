"""examples/mini_vmm: a VM-like process's guest memory and devices survive three in-place
upgrades of cprd while a vCPU keeps writing."""

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "examples" / "mini_vmm" / "run.py"


@pytest.mark.slow
def test_mini_vmm_survives_three_in_place_upgrades():
    r = subprocess.run([sys.executable, str(RUN), "--upgrades", "3", "--ram-mib", "1"], capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("same pid") == 3
    assert "lost 0" in r.stdout and "OK, 3 in-place upgrades" in r.stdout
