"""`cprd chaos` in CI: a short campaign of handoffs and upgrades under churn with random SIGKILLs and
SIGSTOPs of every role finds no violation; and its checks are not vacuous: a table changed behind
the model's back is reported. A long campaign's figures are in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.requires("kcmp")]


def _chaos(*args: str, env: dict | None = None, timeout: float = 600) -> tuple[int, dict, str]:
    r = subprocess.run([sys.executable, "-m", "cprd", "chaos", "--json", *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    assert r.stdout.strip(), r.stderr[-3000:]
    return r.returncode, json.loads(r.stdout), r.stderr


def test_a_short_chaos_campaign_finds_no_violation():
    seed = random.SystemRandom().randrange(1 << 30)  # a new one each run: CI explores; the seed reproduces
    code, res, err = _chaos("--rounds", "12", "--seed", str(seed))
    assert code == 0 and res["violations"] == 0, (seed, res["violation_details"], err[-2000:])
    assert res["rounds"] == 12 and res["faults_fired"] >= 8, res
    assert res["ops"] > 1000, "the clients churned all along"
    assert res["moves"] == {"handoff": 6, "upgrade": 6}, res["moves"]
    aimed = {k.split(":")[0] for k in res["by_role"]} | set(res["missed"])
    assert aimed == {"source", "target", "daemon", "stand-in", "guardian"}, (seed, res["by_role"], res["missed"])
    fired = {k.split(":")[0] for k in res["by_role"]}
    assert {"source", "target", "daemon"} <= fired, (seed, res["by_role"], res["missed"])


def test_a_short_standby_campaign_finds_no_violation():
    """--standby: SIGKILLs and SIGSTOPs of the serving daemon and of its standby under churn; no
    acknowledged change lost, no request failed, never two holders serving."""
    seed = random.SystemRandom().randrange(1 << 30)
    code, res, err = _chaos("--standby", "--rounds", "6", "--seed", str(seed))
    assert code == 0 and res["violations"] == 0, (seed, res["violation_details"], err[-2000:])
    assert res["moves"] == {"standby": 6} and res["ops"] > 500, res
    fired = {k.split(":")[0] for k in res["by_role"]}
    assert fired == {"daemon", "standby"}, (seed, res["by_role"], res["missed"])
    if res["by_role"].get("daemon:kill"):
        assert res["by_outcome"].get("standby", 0) >= 1, ("a killed daemon's standby took over", seed, res)


def test_the_campaigns_checks_catch_a_table_changed_behind_the_models_back():
    code, res, err = _chaos("--rounds", "1", "--seed", "7", env={"CPRD_CHAOS_TAMPER": "1"})
    found = " | ".join(v["what"] for v in res["violation_details"])
    assert code == 1 and "reproduce with `cprd chaos --seed 7" in err, err[-2000:]
    assert "is missing" in found and "not the open file description put (kcmp)" in found, found
