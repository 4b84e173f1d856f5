"""`cprd bench`: the commands run, their JSON has the fields scripts read, --plot draws or refuses
clearly. Behaviour and counts only: no timing is compared with a threshold (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str, code: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `cprd ARGS` (or `python -c CODE ARGS`) in a fresh process; capture text output."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "cprd", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def json_of(p: subprocess.CompletedProcess) -> list[dict]:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# Runs cprd's CLI with matplotlib made unimportable, as if the plot extra were not installed.
WITHOUT_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None; "
    "from cprd.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_find_json_has_the_fields():
    rows = json_of(run("bench", "find", "--sizes", "50,100", "--reps", "1", "--json"))
    assert [r["fds"] for r in rows] == [50, 100]
    for r in rows:
        assert r["reps"] == 1
        assert isinstance(r["list_ns"], int) and r["list_ns"] > 0
        assert isinstance(r["hash_ns"], int) and r["hash_ns"] > 0
        assert r["ratio"] == pytest.approx(r["list_ns"] / r["hash_ns"], rel=0.01, abs=0.06)
        assert "qemu_ratio" not in r  # QEMU published no figures for these sizes


def test_find_carries_qemu_published_figures_at_their_sizes():
    (r,) = json_of(run("bench", "find", "--sizes", "540", "--reps", "1", "--json"))
    assert (r["qemu_qlist_ns"], r["qemu_ghash_ns"]) == (936_753, 393_358)


def test_memory_json_has_the_fields_and_a_sane_value():
    (r,) = json_of(run("bench", "memory", "--sizes", "100", "--json"))
    assert r["fds"] == r["entries"] == 100
    # An entry holds at least an Entry tuple, an Identity tuple and a dict slot (~200 bytes), and
    # nowhere near 16 KiB.
    assert 150 < r["tracemalloc_bytes_per_entry"] < 16384
    assert isinstance(r["rss_bytes_per_entry"], (int, float))
    assert r["goal_bytes_per_entry"] == 1024
    assert r["within_goal"] == (r["tracemalloc_bytes_per_entry"] <= 1024)


def test_memory_closes_every_fd_it_opened():
    code = (
        "import os, sys; from cprd.tools.bench import bench_memory; "
        "before = len(os.listdir('/proc/self/fd')); bench_memory([60]); "
        "sys.exit(len(os.listdir('/proc/self/fd')) - before)"
    )
    p = run(code=code)
    assert p.returncode == 0, f"{p.returncode} fds left open; {p.stderr}"


def test_memory_skips_a_size_beyond_the_fd_limit():
    p = run("bench", "memory", "--sizes", "100,10000000", "--json")
    rows = json_of(p)
    assert rows[0]["entries"] == 100
    assert rows[1]["fds"] >= 10_000_000 and "fd limit" in rows[1]["skipped"]


@pytest.mark.slow
def test_handoff_json_has_the_fields():
    (r,) = json_of(run("bench", "handoff", "--fds", "300", "--reps", "1", "--json"))
    assert r["fds"] == 300 and r["reps"] == 1 and r["kinds"] == "mixed"
    for k in ("floor_ms", "one_per_message_ms", "handoff_ms", "freeze_ms"):
        assert isinstance(r[k], (int, float)) and r[k] > 0, k
    assert r["phases_ms"]


@pytest.mark.requires("libsystemd")
def test_fdstore_json_has_the_fields():
    row = json_of(run("bench", "fdstore", "--fds", "30", "--senders", "2", "--reps", "1", "--json", timeout=120))
    assert (row["fds_per_sender"], row["senders"], row["reps"]) == (30, 2, 1)
    for k in ("sd_notify_fds_per_s", "put_fds_per_s", "run_ms", "run_empty_ms", "get_ms"):
        assert row[k] > 0, k
    r = run("bench", "fdstore", "--senders", "0")
    assert r.returncode == 2 and "--fds and --senders must be at least 1" in r.stderr


def test_standby_json_has_the_fields_and_a_take_over_lost_nothing():
    r = json_of(run("bench", "standby", "--fds", "50", "--mutations", "100", "--kills", "2", "--json", timeout=180))
    assert [c["standby"] for c in r["cost"]] == [False, True]
    for c in r["cost"]:
        assert 0 < c["put"]["p50_ms"] <= c["put"]["p99_ms"] <= c["put"]["max_ms"], c
    t = r["takeover"]
    assert t["failures"] == 0 and t["served"] == 100 and len(t["kills"]) == 2, t
    assert t["takeover_ms"]["max"] > 0 and t["longest_wait_ms"]["max"] > 0, t
    bad = run("bench", "standby", "--kills", "0")
    assert bad.returncode == 2 and "--kills at least 1" in bad.stderr


def test_upgrade_json_has_the_fields():
    rows = json_of(run("bench", "upgrade", "--sizes", "50", "--reps", "1", "--json", timeout=120))
    assert [r["fds"] for r in rows] == [50]
    r = rows[0]
    assert r["pid_kept"] is True and r["answered_during"] > 0
    assert r["unserved_ms"] > 0 and r["unserved_ms_max"] >= r["unserved_ms"] and r["ms"] > 0


def test_ls_json_has_the_fields():
    row = json_of(run("bench", "ls", "--fds", "200", "--seconds", "0.5", "--json", timeout=120))
    assert row["fds"] == 200
    for phase in ("alone", "with_ls", "with_ls_and_churn"):
        g = row[f"get_{phase}"]
        assert g["n"] > 0 and 0 < g["p50_ms"] <= g["p99_ms"] <= g["max_ms"], (phase, g)
    assert row["ls_per_s_with_ls"] > 0 and row["ls_per_s_with_ls_and_churn"] > 0


@pytest.mark.requires("root")
def test_tenants_json_has_each_phase_and_the_attacks_happened():
    row = json_of(run("bench", "tenants", "--seconds", "0.5", "--json", timeout=120))
    phases = ("alone", "cpu", "connect-flood", "lane-flood", "silent", "datagrams")
    assert all(row[p]["statuses"] > 0 and row[p]["p99_ms"] > 0 for p in phases)
    assert row["connect-flood"]["attacker_ops"] == 0 and row["connect-flood"]["refused_by_kernel"] > 0, \
        "the uid that is not allowed never connects"
    assert row["lane-flood"]["attacker_ops"] > 0 and row["lane-flood"]["refused_by_kernel"] == 0
    assert row["silent"]["attacker_ops"] == 300 and row["datagrams"]["attacker_ops"] > 0


def test_bad_sizes_are_usage_errors():
    for args in (["find", "--sizes", "a,b"], ["memory", "--sizes", "0"], ["find", "--reps", "0"]):
        p = run("bench", *args, "--json")
        assert p.returncode == 2, args
        assert "cprd: error:" in p.stderr and p.stdout == ""


@pytest.mark.requires("plot")
@pytest.mark.parametrize("bench", [
    ["find", "--sizes", "50,100", "--reps", "1"],
    ["handoff", "--fds", "300", "--reps", "1"],
])
def test_plot_writes_a_png(tmp_path, bench):
    out = tmp_path / "figure.png"
    rows = json_of(run("bench", *bench, "--json", "--plot", str(out)))
    assert rows  # the JSON on stdout is unchanged by --plot
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


@pytest.mark.parametrize("bench", [["find", "--sizes", "50"], ["handoff", "--fds", "300"]])
def test_plot_without_matplotlib_exits_2_saying_what_to_install(tmp_path, bench):
    out = tmp_path / "figure.png"
    p = run("bench", *bench, "--reps", "1", "--json", "--plot", str(out), code=WITHOUT_MATPLOTLIB)
    assert p.returncode == 2
    assert "matplotlib" in p.stderr and "pip install 'cprd[plot]'" in p.stderr
    assert p.stdout == ""  # nothing was measured
    assert not out.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shim", [None, WITHOUT_MATPLOTLIB], ids=["as-installed", "without-matplotlib"])
def test_plot_to_a_missing_directory_is_refused_first(tmp_path, shim):
    """The path is checked before the library: the same answer with or without the plot extra."""
    out = tmp_path / "no" / "f.png"
    p = run("bench", "find", "--sizes", "50", "--reps", "1", "--plot", str(out), code=shim)
    assert p.returncode == 2 and p.stdout == ""
    assert "does not exist" in p.stderr and "matplotlib" not in p.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.requires("plot")
def test_plot_to_an_unknown_image_type_is_refused_before_measuring(tmp_path):
    p = run("bench", "find", "--sizes", "50", "--reps", "1", "--plot", str(tmp_path / "f.nope"))
    assert p.returncode == 2 and p.stdout == ""
    assert "image type" in p.stderr and ".png" in p.stderr
    assert os.listdir(tmp_path) == []


def test_importing_cprd_does_not_import_matplotlib():
    p = run(code="import sys, cprd, cprd.cli, cprd.tools.bench; cprd.cli.build_parser(); "
                 "sys.exit('matplotlib' in sys.modules)")
    assert p.returncode == 0
