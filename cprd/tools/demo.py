"""`cprd demo`: populate a source with real fds of every kind, hand it to a target, and prove that
every entry the target serves is the same open file description the source had."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter

from ..client import Client
from ..kinds import Kind
from ..populate import mixed_spec, spec_fds, spec_string
from .proof import check_populated, same_open_file
from .procs import spawn, stop, wait_for_socket


def run_demo(fds: int = 1000, as_json: bool = False) -> int:
    counts = mixed_spec(max(fds, 40))
    with tempfile.TemporaryDirectory(prefix="cprd-demo-") as d:
        os.chmod(d, 0o700)
        control, handoff = os.path.join(d, "control.sock"), os.path.join(d, "handoff.sock")
        say = (lambda *a: None) if as_json else print
        say(f"cprd demo: a source with {spec_fds(counts)} real fds ({spec_string(counts)})")
        t0 = time.perf_counter()
        src = spawn(["source", "--control", control, "--populate", spec_string(counts),
                     "--state-dir", os.path.join(d, "state")])
        tgt = spawn(["target", "--listen", handoff])
        copies: dict[tuple[str, int], tuple[int, Kind]] = {}
        try:
            wait_for_socket(control, src)
            wait_for_socket(handoff, tgt)
            with Client(control) as c:
                before = c.status()
                entries = c.ls()
                # Hold our own reference to every entry, as the source has it.
                for e in entries:
                    _, fd = c.get(e["name"], e["id"])
                    copies[(e["name"], e["id"])] = (fd, Kind.from_label(e["kind"]))
            say(f"  source pid {before['pid']}: {before['entries']} entries {before['by_kind']}"
                f" (ready in {(time.perf_counter() - t0) * 1e3:.0f} ms)")
            with Client(control) as c:
                res = c.handoff(handoff)
            src_code = src.wait(30)
            say(f"  handoff to pid {res['target_pid']}: {res['entries']} entries, {res['fds']} fds in "
                f"{res['ms']:.1f} ms ({', '.join(f'{k} {v:.1f}' for k, v in res['phases_ms'].items())} ms);"
                f" source exited {src_code}")
            proven, methods, failures = 0, Counter(), []
            with Client(control) as c:
                after = c.status()
                for (name, id_), (mine, kind) in copies.items():
                    _, theirs = c.get(name, id_)
                    try:
                        ok, method = same_open_file(mine, theirs, kind)
                        bad = check_populated(name, id_, theirs)
                    finally:
                        os.close(theirs)
                    if ok and bad is None:
                        proven += 1
                        methods[method] += 1
                    else:
                        failures.append(f"({name!r}, {id_}): {'not the same open file' if not ok else bad}")
            say(f"  target pid {after['pid']} serves {after['entries']} entries on the same control socket")
            say(f"  proven the same open file description: {proven}/{len(copies)}")
            for m, n in methods.most_common():
                say(f"    {n:6d} by {m}")
            for f in failures[:10]:
                say(f"  FAILED {f}")
            ok = (not failures and proven == len(copies) == after["entries"] == before["entries"]
                  and src_code == 0 and after["pid"] == res["target_pid"])
            summary = {"ok": ok, "entries": before["entries"], "by_kind": before["by_kind"], "proven": proven,
                       "methods": dict(methods), "failures": failures, "handoff": res, "source_exit": src_code,
                       "source_pid": before["pid"], "target_pid": after["pid"]}
            if as_json:
                print(json.dumps(summary))
            else:
                print("cprd demo: " + ("OK, nothing lost, nothing duplicated" if ok else "FAILED"))
            return 0 if ok else 1
        finally:
            for fd, _ in copies.values():
                os.close(fd)
            stop(src)
            stop(tgt)
