"""fd churn across a chain of handoffs, in a few readable lines.

    python examples/fd_churn/run.py [--fds 2000] [--rate 500] [--handoffs 3] [--clients 4] [--duration S]

Runs `cprd stress --fds 2000 --rate 500 --handoffs 3 --json`: a source populated with about 2000 real
fds of every kind, clients that put, replace, delete and get fds at 500 operations a second, and
the whole table handed along a chain of 3 new `cprd target` processes while they do. cprd stress
checks every answer and the final table against a model of every acknowledged operation, and
counts the fds of the survivor. This script prints that result as a summary; its exit code is
cprd stress's (0: no failed request, no violation).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys


def summary(r: dict) -> list[str]:
    by_op = ", ".join(f"{op} {n}" for op, n in sorted(r["by_op"].items()))
    lines = [
        (f"fd churn: {r['fds']} fds populated, {r['clients']} clients at {r['rate']:g} ops/s "
         f"for {r['duration_s']} s"),
        f"  ops: {r['ops']} ({by_op}), {r['ops_per_s']}/s, {r['retries']} transparent retries",
        f"  failed: {r['failed']}   violations: {r['violations']}   entries at the end: {r['entries']}",
        f"  handoffs: {len(r['handoffs'])}",
    ]
    for i, h in enumerate(r["handoffs"], 1):
        lines.append(f"    {i}. to pid {h['target_pid']}: {h['entries']} entries in {h['ms']:.1f} ms, "
                     f"freeze {h['freeze_ms']:.1f} ms ({h['rounds']} pre-copy rounds, "
                     f"{h['delta_ops']} delta ops)")
    lines.append(f"  client stall ms: p50 {r['stall_ms_p50']}, p99 {r['stall_ms_p99']}, "
                 f"max {r['stall_ms_max']}")
    for detail in r["failures"][:5] + r["violation_details"][:10]:
        lines.append(f"    ! {detail}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description="Run `cprd stress` and print a readable summary; "
                                "exit with its code.")
    p.add_argument("--fds", type=int, default=2000, help="fds to populate the source with (default 2000)")
    p.add_argument("--rate", type=float, default=500,
                   help="operations per second over all clients (default 500)")
    p.add_argument("--handoffs", type=int, default=3, help="handoffs along a chain of targets (default 3)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--duration", type=float, help="seconds of churn (default: cprd stress's, handoffs + 1)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the operation mix (default 1)")
    a = p.parse_args()

    cmd = [sys.executable, "-m", "cprd", "--log-level", "warning", "stress", "--fds", str(a.fds),
           "--rate", str(a.rate), "--handoffs", str(a.handoffs), "--clients", str(a.clients),
           "--seed", str(a.seed), "--json"]
    if a.duration is not None:
        cmd += ["--duration", str(a.duration)]
    print("$ cprd " + " ".join(cmd[cmd.index("stress"):]), flush=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        out, _ = proc.communicate()
    except KeyboardInterrupt:
        # SIGINT, not SIGTERM: cprd stress unwinds on KeyboardInterrupt, stopping the daemons it started
        # and removing its directory; SIGTERM would end it at once and leave its daemons running.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print("fd churn: interrupted", file=sys.stderr)
        return 130
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"fd churn: error: cprd stress exited with code {proc.returncode} without a JSON result "
              "(its error is above)", file=sys.stderr)
        return proc.returncode or 1
    print("\n".join(summary(result)))
    verdict = "OK" if proc.returncode == 0 else f"FAILED (cprd stress exit code {proc.returncode})"
    print(f"  result: {verdict}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
