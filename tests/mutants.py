"""Deliberate breaks of cprd, each run against the tests that name its promise: are they caught?

    python tests/mutants.py            run every mutant (exit 1 if one survives)
    python tests/mutants.py --list     name each mutant, its promise and its tests
    python tests/mutants.py NAME ...   run these only

Each mutant replaces one exact piece of cprd's source (it must occur exactly once, or the mutant is
reported as stale: the code moved and the mutant must follow) in a copy of the checkout, made in a
temporary directory, and runs its tests there with pytest, from that directory, so that the daemons
the tests start (`python -m cprd`) run the broken copy too. A mutant is caught when a test fails.
A break that compiles nowhere proves nothing: the mutated file is compiled first.

What this file may know: the repository's layout, pytest's command line. Not cprd's internals
beyond the text it replaces. docs/testing.md lists the mutants and what each breaks.
"""

from __future__ import annotations

import argparse
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str
    file: str  # relative to the checkout
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or -k expressions after "::"


MUTANTS = [
    Mutant("dedupe-leaks", "a duplicate of a stored fd is closed, not kept (fdstore rule: same open file once)",
           "cprd/daemon/notify.py",
           '                log.debug("event=fdstore_duplicate app=%s", a.app)\n                continue',
           '                log.debug("event=fdstore_duplicate app=%s", a.app)\n                fds.fds.remove(fd)\n'
           '                continue',
           ("tests/system/test_fdstore.py::test_same_open_file_is_stored_once_and_keeps_its_first_name",)),
    Mutant("guardian-queue-full-ignored", "a change the stand-in cannot journal to the guardian stops the upgrade",
           "cprd/daemon/standin.py",
           "                    except BlockingIOError:\n                        raise OSError(",
           "                    except BlockingIOError:\n                        if role is Role.GUARDIAN:\n"
           "                            continue\n                        raise OSError(",
           ("tests/system/test_standin.py::test_a_journal_the_kernel_refuses_makes_the_stand_in_keep_the_table",)),
    Mutant("close-on-serving-thread", "a close that blocks never holds up the other clients (closer thread)",
           "cprd/fds.py",
           "    if _closer is not None:\n        _closer.close(fd)\n        return\n",
           "",
           ("tests/system/test_liveness.py::test_an_fd_whose_close_blocks_never_holds_up_the_other_clients",)),
    Mutant("reloads-not-blocked-before-exec", "a reload during an upgrade waits, never kills the new program",
           "cprd/daemon/core.py",
           "            mask = signal.pthread_sigmask(signal.SIG_BLOCK, RELOAD_SIGNALS)",
           "            mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])",
           ("tests/system/test_liveness.py::test_reloads_in_a_burst_leave_the_daemon_serving_in_its_own_pid",)),
    Mutant("guardian-deadline-too-short", "the deadlines are ordered: a healthy new program is never fenced",
           "cprd/protocol/upgrade.py",
           "        return self.start_s + 4 * (self.answer_s + self.fence_s)",
           "        return self.start_s + 0.5 * (self.answer_s + self.fence_s)",
           ("tests/unit/test_upgrade_rules.py",)),
    Mutant("anyone-may-change", "another uid changes nothing of what root made",
           "cprd/access.py",
           "        return self.trusted(who.uid) or who.uid == self.grant(key).owner",
           "        return True",
           ("tests/system/test_tenants.py::test_an_allowed_uid_cannot_change_what_root_made",)),
    Mutant("no-entry-quota", "another uid stops at its quota; root keeps its reserve",
           "cprd/daemon/owners.py",
           "        return max(0, min(quota.entries - owned, capacity - quota.reserve - self.others()))",
           "        return 1 << 30",
           ("tests/system/test_tenants.py::test_an_allowed_uid_cannot_fill_the_table",)),
    Mutant("no-store-quota", "another uid makes at most --uid-max-stores stores",
           "cprd/access.py",
           "        if new_store and stores + 1 > quota.stores:",
           "        if new_store and False:",
           ("tests/system/test_tenants.py::test_an_allowed_uid_cannot_make_stores_without_end",)),
    Mutant("names-too-long-for-exec", "a store keeps its program startable",
           "cprd/daemon/notify.py",
           "            if a.names_bytes + len(name) + 1 > fs.FDNAMES_MAX:",
           "            if False:",
           ("tests/system/test_tenants.py::test_a_store_keeps_its_program_startable",)),
    Mutant("reported-errors-retried", "the daemon's own errors reach the user at once",
           "cprd/client.py",
           '                if getattr(e, "reported", False) or not self._s.may_retry(op, deadline):\n'
           '                    raise\n                self._s.retries += 1\n                time.sleep(delay)',
           '                if not self._s.may_retry(op, deadline):\n'
           '                    raise\n                self._s.retries += 1\n                time.sleep(delay)',
           ("tests/system/test_tenants.py::test_a_daemon_error_reaches_the_user_at_once",)),
    Mutant("fdstore-names-put", "names of the stores and of the daemon cannot be put",
           "cprd/daemon/handlers.py",
           "        if app is not None or name.startswith(FS_PREFIX):",
           "        if app is not None:",
           ("tests/system/test_tenants.py::test_names_of_the_stores_and_of_the_daemon_cannot_be_put",)),
    Mutant("replace-keeps-the-owner", "a name another uid made first never catches root's fd",
           "cprd/daemon/owners.py",
           "        if g.owner != who.uid:\n            g = Grant(who.uid)\n",
           "",
           ("tests/system/test_tenants.py::test_a_name_another_uid_made_first_never_catches_roots_fds",)),
    Mutant("remove-loses-to-store", "FDSTOREREMOVE=1 takes precedence over FDSTORE=1 (fdstore rule)",
           "cprd/fdstore.py",
           '    if n.has("FDSTOREREMOVE=1"):',
           '    if n.has("FDSTOREREMOVE=1") and not n.has("FDSTORE=1"):',
           ("tests/system/test_fdstore.py::test_remove_takes_precedence_and_closes_every_fd_of_that_name",)),
    Mutant("fdpoll-ignored", "FDPOLL=0 keeps an fd unwatched (fdstore rule)",
           "cprd/fdstore.py",
           'not n.has("FDPOLL=0")',
           "True",
           ("tests/system/test_fdstore.py::test_a_polled_fd_that_hangs_up_is_removed_unless_fdpoll_0",)),
    Mutant("store-limit-ignored", "over the store's limit the extra fds are closed (fdstore rule)",
           "cprd/daemon/notify.py",
           "            if a.stored() >= a.meta.max:",
           "            if False:",
           ("tests/system/test_fdstore.py::test_over_the_limit_the_extra_fds_are_closed",)),
    Mutant("forged-owners-log-believed", "a log of owners another uid forged in an older cprd's table is not believed",
           "cprd/daemon/owners.py",
           "        if token is None or head != _HEADER + token:",
           "        if False:",
           ("tests/system/test_tenants.py::test_a_forged_owners_log_or_lane_from_an_older_table_is_not_believed",)),
    Mutant("ls-shows-everything", "another uid sees only what it owns or what is shared with it",
           "cprd/daemon/handlers.py",
           "        if self.owners.grants.trusted(who.uid):\n            return await self.ls_frames(), []",
           "        if True:\n            return await self.ls_frames(), []",
           ("tests/system/test_tenants.py::test_each_uid_owns_what_it_made_and_sees_only_that",)),
    Mutant("busy-at-once", "a client beyond --max-clients waits for a slot, Busy only after --queue-timeout",
           "cprd/daemon/endpoint.py",
           "        with trio.move_on_after(self.config.queue_timeout):\n            while self._full(lane):",
           "        with trio.move_on_after(0):\n            while self._full(lane):",
           ("tests/system/test_hostile.py::test_a_client_beyond_max_clients_waits_for_a_slot_and_is_served",)),
    Mutant("lost-confirm-gives-back", "only a proven death gives the table back to the source",
           "cprd/protocol/session.py",
           '        if fate == "dead":',
           '        if fate in ("dead", "serving"):',
           ("tests/system/test_faults.py::test_connection_broken_after_commit_leaves_the_target_owning",)),
]


def _copy() -> Path:
    """A copy of the checkout's code and tests in a new temporary directory."""
    d = Path(tempfile.mkdtemp(prefix="cprd-mutant-"))
    for part in ("cprd", "tests", "pyproject.toml", "conftest.py"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, d / part, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, d / part)
    for so in (ROOT / "cprd").glob("*.so"):  # the built C speedup, as installed
        shutil.copy2(so, d / "cprd" / so.name)
    return d


def _pytest(d: Path, tests: tuple[str, ...] | list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=d, capture_output=True, text=True, timeout=1800,
                          env={**_env(), "PYTHONPATH": str(d), "CPRD_HISTORY": str(ROOT)})


def baseline(chosen: list[Mutant]) -> str | None:
    """None if every chosen mutant's tests pass on an unbroken copy (so that a failure under a
    mutant is the mutant's doing), else pytest's last lines."""
    d = _copy()
    try:
        r = _pytest(d, sorted({t for m in chosen for t in m.tests}))
        return None if r.returncode == 0 else "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(m: Mutant, keep: bool = False) -> tuple[str, float, str]:
    """('caught' | 'survived' | 'stale', seconds, the tail of pytest's output)."""
    t0 = time.monotonic()
    text = (ROOT / m.file).read_text()
    if text.count(m.old) != 1:
        return "stale", 0.0, f"{m.file}: the text to replace occurs {text.count(m.old)} times, not once"
    d = _copy()
    try:
        target = d / m.file
        target.write_text(text.replace(m.old, m.new))
        py_compile.compile(str(target), doraise=True)
        r = _pytest(d, m.tests)
        out = (r.stdout + r.stderr).strip().splitlines()
        summary = out[-1] if out else ""
        if r.returncode == 0:
            verdict = "survived"
        elif r.returncode == 1 and " failed" in summary and " error" not in summary:
            verdict = "caught"  # a test failed (an error in a fixture proves nothing)
        else:
            verdict = "stale"  # no test ran, or the tests could not run: the mutant must be looked at
        return verdict, time.monotonic() - t0, summary
    finally:
        if keep:
            print(f"          kept: {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--keep", action="store_true", help="keep each mutated copy (its directory is printed)")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.names or m.name in a.names]
    if a.names and len(chosen) != len(set(a.names)):
        print(f"unknown mutant(s): {sorted(set(a.names) - {m.name for m in MUTANTS})}", file=sys.stderr)
        return 2
    if a.list:
        for m in chosen:
            print(f"{m.name}: {m.promise}\n    {m.file}; tests: {' '.join(m.tests)}")
        return 0
    bad, t0 = 0, time.monotonic()
    why = baseline(chosen)
    if why is not None:
        print(f"the mutants' tests fail on an unbroken copy, so a failure would prove nothing:\n{why}", file=sys.stderr)
        return 2
    print(f"baseline: every mutant's tests pass on an unbroken copy ({time.monotonic() - t0:.0f} s)", flush=True)
    for m in chosen:
        verdict, secs, tail = run(m, a.keep)
        bad += verdict != "caught"
        print(f"{verdict:<9} {secs:6.1f} s  {m.name}: {m.promise}" + (f"\n          {tail}" if verdict != "caught"
                                                                       else ""), flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants caught in {time.monotonic() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
