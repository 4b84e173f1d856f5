"""Deliberate breaks of cprd, each run against the tests that name its promise: are they caught?

    python tests/mutants.py            run every mutant (exit 1 if one survives)
    python tests/mutants.py --list     name each mutant, its promise and its tests
    python tests/mutants.py NAME ...   run these only
    python tests/mutants.py --jobs 2   two at a time (CI)

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
from concurrent.futures import ThreadPoolExecutor, as_completed
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
    Mutant("regular-file-sent-reopened", "every entry a target serves is the same open file description the source had",
           "cprd/protocol/session.py",
           '            yield Send(ev, [e.fd for e in part], (("batch", ev.seq, last),))',
           '            import fcntl\n            import os\n'
           '            fds = [os.open("/proc/self/fd/{e.fd}", fcntl.fcntl(e.fd, fcntl.F_GETFL) | os.O_CLOEXEC)\n'
           '                   if e.ident.kind.label == "file" else e.fd for e in part]  # the same file, opened anew\n'
           '            yield Send(ev, fds, (("batch", ev.seq, last),))',
           ("tests/system/test_handoff_e2e.py::test_each_kind_is_handed_off_as_the_same_open_file[files-python-verify]",)),  # noqa: E501
    Mutant("last-partial-batch-lost", "7530 mixed fds move whole",
           "cprd/protocol/session.py",
           "        for i in range(0, n, self.batch):",
           "        for i in range(0, n - n % self.batch, self.batch):",
           ("tests/system/test_handoff_e2e.py::test_7530_mixed_fds[python-verify]",)),
    Mutant("target-fd-table-probe-leaks", "7530 mixed fds move whole: no fd left over in the target",
           "cprd/handoff.py",
           "        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(0, slots)))",
           "        fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(0, slots))",
           ("tests/system/test_handoff_e2e.py::test_7530_mixed_fds[python-verify]",)),
    Mutant("handed-off-source-exits-nonzero", "the old owner exits 0 once the target confirmed",
           "cprd/daemon/core.py",
           '        if op == "handoff" and self.life.handed_off:\n            self.stop(0)',
           '        if op == "handoff" and self.life.handed_off:\n            self.stop(3)',
           ("tests/system/test_handoff_e2e.py::test_chain_of_three_handoffs",)),
    Mutant("target-capacity-unchecked", "a target that cannot hold the table refuses before any fd moves",
           "cprd/protocol/session.py",
           "        if self.hello.fds + 1 > capacity:",
           "        if False:",
           ("tests/system/test_handoff_e2e.py::test_target_with_too_small_fd_limit_refuses_and_source_keeps_everything",)),  # noqa: E501
    Mutant("manifests-after-snapshot", "a target whose source died before End names every key lost",
           "cprd/handoff.py",
           '        for m in s.manifests():\n            await self.send(m, "handoff manifest")\n'
           '        clock.mark("hello")\n        for b in s.snapshot():\n            await self.send(b)\n',
           '        clock.mark("hello")\n        for b in s.snapshot():\n            await self.send(b)\n'
           '        for m in s.manifests():  # the keys after the fds: the first fd moves sooner\n'
           '            await self.send(m, "handoff manifest")\n',
           ("tests/system/test_faults.py::test_source_killed[batch:first]",)),
    Mutant("retry-not-deduplicated", "a retried mutation applies once, also across a handoff",
           "cprd/daemon/handlers.py",
           "        cached = self.st.replies.get(rid) if rid else None",
           "        cached = None",
           ("tests/system/test_churn.py::test_a_retried_mutation_applies_once_even_across_a_handoff",)),
    Mutant("answers-stay-with-the-source", "a mutation retried at the target gets the source's answer",
           "cprd/daemon/state.py",
           "        st.replies.take_from(received.results)\n        return st",
           "        return st",
           ("tests/system/test_churn.py::test_a_retried_mutation_applies_once_even_across_a_handoff",)),
    Mutant("failed-handoff-stays-frozen", "a source whose target died before it confirmed serves mutations again",
           "cprd/daemon/core.py",
           "            st.table.stop_journal()\n            life.thaw()\n",
           "            st.table.stop_journal()\n",
           ("tests/system/test_faults.py::test_target_killed[ready]",)),
    Mutant("source-leaks-target-pidfd", "a source whose target died keeps its fd count",
           "cprd/handoff.py",
           "        finally:\n            _close_pidfd(pidfd)\n\n\nclass _SourceDriver",
           "        finally:\n            pass\n\n\nclass _SourceDriver",
           ("tests/system/test_faults.py::test_target_killed[batch:first]",)),
    Mutant("failed-handoff-keeps-journal", "a source whose target died hands off again",
           "cprd/daemon/core.py",
           "            life.committing = False\n            st.table.stop_journal()\n",
           "            life.committing = False\n",
           ("tests/system/test_faults.py::test_target_killed[batch:first]",)),
    Mutant("failed-target-exits-0", "a target whose connection broke while its source lives exits non-zero",
           "cprd/daemon/main.py",
           "    try:\n        received = await receive_table(inc)\n    except BaseException:\n",
           "    try:\n        received = await receive_table(inc)\n"
           "    except CprdError as e:  # the source keeps its table: nothing for us to serve, nothing went wrong\n"
           "        inc.close()\n        log.warning(\"event=handoff_not_taken error=%r\", str(e))\n        return 0\n"
           "    except BaseException:\n",
           ("tests/system/test_faults.py::test_connection_broken_while_both_live[source-batch:middle]",)),
    Mutant("failed-handoff-leaks-dropped-fds", "a handoff aborted in pre-copy leaves the source with every mutation",
           "cprd/table.py",
           "        close_all_later(journal.graveyard if journal is not None else ())",
           "        pass  # what mutations dropped during a handoff: a source exits after it anyway",
           ("tests/system/test_churn.py::test_target_killed_mid_precopy_leaves_every_mutation_at_the_source[delta]",)),
    Mutant("standin-journal-drops-deletes", "handoffs and upgrades mixed under churn: no violation of the model",
           "cprd/daemon/standin.py",
           "            self.ops.append(pu.remove_op(*op.key))",
           "            pass  # a delete carries no fd: nothing for the new program to take",
           ("tests/system/test_churn.py::test_stress_model_check_across_handoffs_and_upgrades",)),
    Mutant("upgrade-loses-an-entry-at-exec", "an in-place upgrade keeps every fd",
           "cprd/protocol/upgrade.py",
           "        fds = [e.fd for e in self.entries] + [self.listener_fd]",
           "        fds = [e.fd for e in self.entries[1:]] + [self.listener_fd]",
           ("tests/system/test_upgrade.py::test_upgrade_in_place_keeps_pid_fds_and_clients",)),
    Mutant("upgrade-state-left-open", "an in-place upgrade keeps every fd, and only those",
           "cprd/daemon/main.py", "        os.close(state_fd)\n        cpid = ", "        cpid = ",
           ("tests/system/test_upgrade.py::test_upgrade_in_place_keeps_pid_fds_and_clients",)),
    Mutant("journal-deletes-skipped", "each change the stand-in made reaches the new program",
           "cprd/daemon/takeover.py",
           "            elif self.table.find(name, id_) is not None:\n                self.table.delete(name, id_)",
           "            elif False:\n                self.table.delete(name, id_)",
           ("tests/system/test_standin.py::test_mutations_during_the_upgrade_reach_the_new_program_and_the_stand_in_exits",)),  # noqa: E501
    Mutant("journal-answers-not-taken-over", "a change journaled but not answered is applied once",
           "cprd/daemon/main.py", "    st.replies.take_from(took.answers)\n", "",
           ("tests/system/test_standin.py::test_a_stand_in_killed_between_journaling_a_change_and_answering_it",)),
    Mutant("listener-made-again-each-run", "later runs hand the very same listener", "cprd/launch.py",
           "            if at and why is None:\n", "            if at and why is None and not at:\n",
           ("tests/system/test_serve.py::test_run_makes_a_listener_once_and_hands_the_same_socket_to_every_run",)),
    Mutant("nginx-told-of-no-listener", "each dialect hands the listener as its server expects", "cprd/launch.py",
           '        env["NGINX"] = "".join(f"{n};" for n in socks)\n', "",
           ("tests/system/test_serve.py::test_each_dialect_hands_the_listener_as_the_server_expects",)),
    Mutant("fds-dialect-tells-twice", "each dialect hands the listener as its server expects (fds: LISTEN_FDS "
           "unset, or gunicorn --bind fd:// takes fd 3 twice)", "cprd/launch.py",
           '    if g.fds and dialect != "fds":\n', "    if g.fds:\n",
           ("tests/unit/test_listeners.py::test_each_dialect_hands_the_fds_and_variables_it_promises",)),
    Mutant("unix-path-left-removed", "a unix listener's path that a stopping server removed is made again",
           "cprd/serve.py", "                for li in unix:\n                    listeners.restore(li)\n",
           "                pass\n",
           ("tests/system/test_servers.py::test_a_unix_listener_keeps_its_path_when_a_stopping_server_removes_it",)),
    Mutant("unix-path-from-anyones-file", "a unix listener's path is made again only from a socket file of the "
           "listener's owner", "cprd/listeners.py", "    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != owner:\n",
           "    if not stat.S_ISSOCK(st.st_mode):\n",
           ("tests/unit/test_listeners.py::test_a_unix_path_a_server_removed_is_made_again_from_its_second_name_and_"
            "only_from_ours",)),
    Mutant("serve-record-not-kept", "a killed cprd serve's generations are taken over after cprd moved",
           "cprd/daemon/notify.py", "            self._append(a, fs.Log.line_serve(durable))\n", "            pass\n",
           ("tests/system/test_serve.py::test_a_killed_serve_s_generation_is_taken_over_after_cprd_was_upgraded_and_"
            "handed_off",)),
    Mutant("adopt-any-named-process", "a process that is no generation of the app gets no signal from cprd serve",
           "cprd/serve.py", '            if not proc.holds_any(d["pid"], idents):\n', "            if False:\n",
           ("tests/system/test_serve.py::test_a_record_naming_a_process_that_is_no_generation_of_the_app_gets_it_"
            "no_signal",)),
    Mutant("check-not-told-generation", "a readiness check is told which generation it checks",
           "cprd/serve.py", '"CPRD_GENERATION_PID": str(g.pid), ', "",
           ("tests/system/test_serve.py::test_a_check_is_told_the_new_generation_and_the_restart_waits_for_it",)),
    Mutant("standby-told-too-late", "a mutation is answered only once the standby has it",
           "cprd/daemon/standby.py", "        st.table.stream, st.stream = self.stream.op, self.stream\n",
           "        st.table.stream = self.stream.op\n",
           ("tests/system/test_standby.py::test_each_sigkill_of_the_daemon_under_churn_loses_no_acknowledged_change",)),
    Mutant("standby-not-retired-on-stop", "a stopped daemon's standby takes nothing over", "cprd/daemon/core.py",
           '            self.standby.retire("the daemon stops")\n', "            pass\n",
           ("tests/system/test_standby.py::test_a_standby_that_dies_or_stops_reading_is_replaced_and_a_stop_"
            "retires_it",)),
    Mutant("stopped-standby-kept", "a standby that stops reading is fenced and replaced", "cprd/daemon/standby.py",
           "            if now - progress > limit:\n", "            if False:\n",
           ("tests/system/test_standby.py::test_a_standby_that_dies_or_stops_reading_is_replaced_and_a_stop_"
            "retires_it",)),
    Mutant("silent-daemon-left-serving", "a daemon that stops answering is killed by its standby, which serves",
           "cprd/daemon/standby.py", "                n.start_soon(_probe, state, pidfd, journal.sock, words, n.cancel_scope)\n",
           "                pass\n",
           ("tests/system/test_standby.py::test_a_stopped_daemon_is_killed_by_its_standby_which_serves",)),
    Mutant("retired-standby-takes-over", "a stopped daemon's standby takes nothing over, even one still starting",
           "cprd/daemon/standby.py",
           "        words.drain()  # all the daemon ever wrote: a deliberate end said R first\n", "",
           ("tests/system/test_standby.py::test_a_daemon_stopped_before_its_standby_started_is_not_taken_over",)),
    Mutant("ready-without-ready", "a new generation that never says READY=1 is not taken as ready", "cprd/serve.py",
           "                await g.ready_event.wait()\n", "                pass\n",
           ("tests/system/test_serve.py::test_a_new_generation_that_fails_is_killed_and_the_old_one_keeps_serving",)),
    Mutant("dead-generation-left-dead", "a generation that dies is started again", "cprd/serve.py",
           '            elif ev[0] == "exited" and ev[1] is self.current and not self.stop.is_set():',
           '            elif ev[0] == "exited" and ev[1] is self.current and self.stop.is_set():',
           ("tests/system/test_serve.py::test_a_generation_that_dies_is_started_again_and_connections_wait_meanwhile",)),
    Mutant("guardian-restores-at-low-priority", "the guardian restores at the daemon's priority, not the +10 the "
           "old program took for the new one's start", "cprd/guardian.py",
           "                    os.setpriority(os.PRIO_PROCESS, 0, int(state.nice))\n",
           "                    pass\n",
           ("tests/system/test_standin.py::test_a_guardian_killed_during_the_upgrade_leaves_one_owner_with_every_entry",)),
    Mutant("guardian-restores-without-the-journal", "the guardian restores every acknowledged change",
           "cprd/daemon/takeover.py",
           "            journal.strict = False\n            journal.read()\n", "            journal.strict = False\n",
           ("tests/system/test_standin.py::test_a_failure_at_each_step_leaves_one_owner_with_every_acknowledged_entry"
           "[new-program-killed-after-released]",)),
    Mutant("new-program-waits-start-s-for-the-stand-in",
           "a stand-in that stops answering is fenced after --answer-timeout",
           "cprd/daemon/takeover.py",
           "            deadline = trio.current_time() + self.d.answer_s\n",
           "            deadline = trio.current_time() + self.d.start_s\n",
           ("tests/system/test_liveness.py::test_a_stand_in_that_stops_answering_is_fenced_and_the_new_program_takes_over"  # noqa: E501
            "[sigstop]",)),
    Mutant("fence-kills-only-the-pid", "a new program that hangs is killed with its process group",
           "cprd/proc.py",
           "    if group:\n        try:\n            os.killpg(group, signal.SIGKILL)",
           "    if False:\n        try:\n            os.killpg(group, signal.SIGKILL)",
           ("tests/system/test_upgrade.py::test_new_program_that_never_confirms_is_killed_with_what_it_forked_and_rolled_back",)),  # noqa: E501
    Mutant("chaos-identity-weakened", "the chaos campaign's checks catch a table changed behind their back",
           "cprd/tools/chaos.py",
           "            if proc.kcmp_file(owner, entries[key], me, mine) == 0:\n                continue",
           "            if proc.kcmp_file(owner, entries[key], me, mine) >= 0:\n                continue",
           ("tests/system/test_chaos.py::test_the_campaigns_checks_catch_a_table_changed_behind_the_models_back",)),
    Mutant("done-count-checked-one-way", "a journal that arrives with a hole is never taken over from",
           "cprd/daemon/takeover.py",
           "                    if n != self.out.messages:", "                    if n < self.out.messages:",
           ("tests/system/test_standin.py::test_a_journal_with_a_hole_is_never_taken_over_from",)),
    Mutant("exec-failure-not-rolled-back", "a failed exec: the table survives in the daemon's pid, the client is told",
           "cprd/daemon/core.py",
           "                statefd.rollback(prep.state_fd, prep.state, reason)\n", "                pass\n",
           ("tests/system/test_upgrade.py::test_exec_failure_leaves_the_old_program_serving[not-a-program]",)),
    Mutant("queued-messages-not-drained", "a program started next gets every fd the last one sent before it died",
           "cprd/daemon/core.py",
           "            self.stores.drain(app)  # what the app's previous run sent before it died is stored first\n",
           "",
           ("tests/system/test_fdstore.py::test_a_program_started_next_gets_every_fd_the_last_one_sent_before_it_died",)),  # noqa: E501
    Mutant("listen-pid-not-the-program", "LISTEN_PID names the program started, as sd_listen_fds() requires",
           "cprd/cli.py",
           '        p.env["LISTEN_PID"] = str(os.getpid())',
           '        p.env["LISTEN_PID"] = str(os.getppid())',
           ("tests/system/test_fdstore.py::test_a_program_stores_fds_with_libsystemd_and_gets_them_back_named_newest_first",)),  # noqa: E501
    Mutant("cprd-fds-reach-the-program", "the program gets its stored fds and no other fd of cprd's",
           "cprd/launch.py",
           "    os.closerange(3 + len(fds), 1 << 20)\n",
           "",
           ("tests/system/test_fdstore.py::test_a_program_stores_fds_with_libsystemd_and_gets_them_back_named_newest_first",)),  # noqa: E501
    Mutant("fdnames-out-of-order", "each fd handed to the program under its own name",
           "cprd/launch.py",
           'LISTEN_FDNAMES=":".join(g.names))',
           'LISTEN_FDNAMES=":".join(reversed(g.names)))',
           ("tests/system/test_examples.py::test_fdstore_server_keeps_every_keep_alive_connection_across_kill_9",)),
    Mutant("barrier-with-other-tags-obeyed", "BARRIER=1 with other tags is refused whole (fdstore rule)",
           "cprd/fdstore.py",
           '    if n.has("BARRIER=1"):\n        d = Decision(barrier=True)',
           '    if n.has("BARRIER=1") and len(n.tags) == 1:\n        d = Decision(barrier=True)',
           ("tests/system/test_fdstore.py::test_barrier_closes_its_fd_and_a_malformed_barrier_is_refused_whole",)),
    Mutant("dropped-datagram-fds-kept", "a datagram that is dropped has every fd closed (fdstore rule)",
           "cprd/daemon/notify.py",
           '            self.quiet.warn("fdstore_dropped", a.app, "reason=%r fds=%d", notice, len(fds), kind=notice)\n'
           '            return',
           '            self.quiet.warn("fdstore_dropped", a.app, "reason=%r fds=%d", notice, len(fds), kind=notice)\n'
           '            fds.fds.clear()\n            return',
           ("tests/system/test_fdstore.py::test_garbage_junk_fds_bad_names_and_a_flood_are_dropped_without_a_leak",)),
    Mutant("any-sender-stores", "only the store's owner, the daemon's user and root may store",
           "cprd/daemon/notify.py",
           "        if uid not in self.st.allowed_uids or not self.owners.grants.may_change(Peer(uid), "
           "self.key(a.app)):",
           "        if False:",
           ("tests/system/test_fdstore.py::test_a_sender_of_an_unlisted_uid_is_refused_and_its_fds_closed",)),
    Mutant("names-lost-on-take-up", "names and FDPOLL choices travel with the table",
           "cprd/fdstore.py",
           '                        meta.names[int(id_)] = (name, poll == "1")',
           '                        meta.names[int(id_)] = ("stored", True)',
           ("tests/system/test_fdstore.py::test_names_and_poll_choices_survive_handoff_and_upgrade",)),
    Mutant("store-socket-not-taken-up", "the same notify socket keeps receiving across a handoff and an upgrade",
           "cprd/daemon/core.py",
           "        self.stores.load()  # the fd stores a handoff or an upgrade brought along\n",
           "",
           ("tests/system/test_fdstore.py::test_the_same_socket_keeps_receiving_across_a_handoff_or_an_upgrade_and_nothing_is_lost",)),  # noqa: E501
    Mutant("error-does-not-remove", "a polled fd that reports an error is removed, as one that hangs up (fdstore "
           "rule)", "cprd/daemon/notify.py",
           "                hit = self._polled.get(fd)\n                if hit is None:\n"
           "                    continue\n",
           "                hit = self._polled.get(fd)\n"
           "                if hit is None or not events & select.EPOLLHUP:\n                    continue\n",
           ("tests/system/test_fdstore.py::test_a_polled_fd_that_reports_an_error_is_removed",)),
    Mutant("epoll-fd-stored", "an epoll fd is never stored (its interest list means nothing elsewhere)",
           "cprd/kinds.py",
           "    if kind is Kind.EPOLL:\n        raise BadFd(",
           "    if False:\n        raise BadFd(",
           ("tests/system/test_fdstore.py::test_an_epoll_fd_is_refused_and_closed_and_the_rest_of_its_message_stored",)),  # noqa: E501
    Mutant('peer-cred-ignored', 'another uid is refused (SO_PEERCRED) unless allowed',
           'cprd/daemon/endpoint.py',
           '        if uid not in self.allowed_uids or (lane is not None and uid != lane and uid not in own):',
           '        if lane is not None and uid != lane and uid not in own:',
           ('tests/system/test_hostile.py::test_peer_with_another_uid_is_refused_unless_allowed',)),
    Mutant('idle-timeout-ignored', 'a silent client is dropped after --idle-timeout',
           'cprd/daemon/endpoint.py',
           '                    with trio.move_on_after(self.config.idle_timeout) as cs:\n                        try:',
           '                    with trio.move_on_after(float("inf")) as cs:\n                        try:',
           ('tests/system/test_hostile.py::test_silent_client_is_closed_after_the_idle_timeout',)),
    Mutant('target-takes-one-at-a-time', 'a silent connection cannot hold up a target',
           'cprd/handoff.py',
           '            nursery.start_soon(one, conn, pid, uid, _open_pidfd(pid) if uid in allowed_uids else None)',
           '            await one(conn, pid, uid, _open_pidfd(pid) if uid in allowed_uids else None)',
           ('tests/system/test_hostile.py::test_a_silent_connection_does_not_hold_up_a_target',)),
    Mutant('sockets-open-to-every-uid', 'a uid that is not allowed cannot even connect (the kernel refuses it)',
           'cprd/paths.py',
           '                os.chmod(tmp, 0o600, dir_fd=d.fd, follow_symlinks=False)',
           '                os.chmod(tmp, 0o666, dir_fd=d.fd, follow_symlinks=False)',
           ('tests/system/test_tenants.py::test_a_uid_that_is_not_allowed_cannot_even_connect',)),
    Mutant('live-socket-stolen', 'a live control socket is never stolen',
           'cprd/paths.py',
           '                refusal = live(d.at(name))',
           '                refusal = None',
           ('tests/system/test_control.py::test_control_socket_is_private_and_never_stolen',)),
    Mutant('stale-socket-kept', 'a stale control socket is replaced',
           'cprd/paths.py',
           '        except (ConnectionRefusedError, FileNotFoundError):\n            return None\n        except BlockingIOError:',  # noqa: E501
           '        except (ConnectionRefusedError, FileNotFoundError):\n            return "a process that left it"\n        except BlockingIOError:',  # noqa: E501
           ('tests/system/test_control.py::test_stale_socket_is_replaced_and_new_dirs_are_private',)),
    Mutant('new-dirs-follow-the-umask', 'missing directories are 0700 whatever the umask',
           'cprd/paths.py',
           '                os.fchmod(nfd, 0o700)  # whatever the umask\n',
           '',
           ('tests/system/test_trust.py::test_missing_directories_are_created_private_whatever_the_umask',)),
    Mutant('writable-by-others-allowed', 'a directory writable by others is refused',
           'cprd/paths.py',
           '    if mode & 0o022 and (private or not mode & stat.S_ISVTX):',
           '    if False:',
           ('tests/system/test_trust.py::test_writable_by_others_is_refused_unless_sticky_and_above',)),
    Mutant('sticky-dir-holds-the-socket', 'a sticky directory may be on the way, never where the socket lives',
           'cprd/paths.py',
           '    if mode & 0o022 and (private or not mode & stat.S_ISVTX):',
           '    if mode & 0o022 and not mode & stat.S_ISVTX:',
           ('tests/system/test_trust.py::test_writable_by_others_is_refused_unless_sticky_and_above',)),
    Mutant('others-symlink-followed', 'a symlink another user made is not followed',
           'cprd/paths.py',
           '                if st.st_uid not in trusted_uids() | {dst.st_uid}:',
           '                if False:',
           ('tests/system/test_trust.py::test_a_symlink_another_user_made_is_not_followed',)),
    Mutant('others-directory-trusted', 'a directory another user owns is refused',
           'cprd/paths.py',
           '    if st.st_uid not in trusted_uids():\n        raise UnsafePath(',
           '    if False:\n        raise UnsafePath(',
           ('tests/system/test_trust.py::test_a_directory_another_user_owns_is_refused',)),
    Mutant('state-file-through-symlink', 'a state file is never opened through a symlink',
           'cprd/populate.py',
           '    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC',
           '    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC',
           ('tests/system/test_trust.py::test_state_directory_is_checked_and_never_followed_out',)),
    Mutant('client-talks-to-any-daemon', 'the client sends nothing to a daemon another user runs',
           'cprd/client.py',
           '        if uid not in self.trusted:',
           '        if False:',
           ('tests/system/test_trust.py::test_client_sends_nothing_to_a_daemon_another_user_runs',)),
    Mutant('source-hands-to-any-target', 'a source refuses a target another user runs; it keeps everything',
           'cprd/handoff.py',
           '        if allowed_uids is not None and target_uid not in allowed_uids:',
           '        if False:',
           ('tests/system/test_trust.py::test_source_refuses_a_target_another_user_runs',)),
    Mutant('target-takes-from-allowed-uids', 'a target takes a table only from its own user or root',
           'cprd/daemon/main.py',
           '        inc = await accept_handoff(trio.socket.from_stdlib_socket(hs), trusted_uids())',
           '        inc = await accept_handoff(trio.socket.from_stdlib_socket(hs), trusted_uids() | set(config.allow_uids))',  # noqa: E501
           ('tests/system/test_trust.py::test_a_target_takes_a_table_only_from_its_own_user_or_root',)),
    Mutant('allowed-uid-may-hand-off', 'an allowed other uid may use the table but not hand it off or upgrade',
           'cprd/daemon/endpoint.py',
           '                            if req.op in ADMIN_OPS and uid not in trusted_uids():',
           '                            if False:',
           ('tests/system/test_trust.py::test_an_allowed_user_may_use_the_table_but_not_hand_it_off_or_upgrade',)),
    Mutant('others-share-unbounded', "an allowed other uid cannot crowd out the daemon's own user",
           'cprd/daemon/endpoint.py',
           '        return others >= most // 2 or self.by_uid[lane] >= max(1, most // 4)',
           '        return False',
           ('tests/system/test_trust.py::test_an_allowed_user_cannot_crowd_out_the_daemons_own_user',)),
    Mutant('refusal-resets-a-peer-that-spoke', 'a refused peer that speaks first still reads why',
           'cprd/daemon/endpoint.py',
           '            raw.detach()\n        scm.drop_queued(conn.fileno())',
           '            raw.detach()',
           ('tests/system/test_trust.py::test_a_refused_peer_that_speaks_first_reads_why[control]',)),
    Mutant('interpreter-unchecked', 'an upgrade program whose #! interpreter another user could change is refused',
           'cprd/paths.py',
           '        check_program(interpreter, f"interpreter of {what} {path}", _hops + 1)\n',
           '',
           ('tests/system/test_trust.py::test_an_upgrade_program_another_user_could_change_is_refused',)),
    Mutant('small-backlog', 'a full listen backlog is as large as the system allows',
           'cprd/daemon/endpoint.py',
           '            listener.listen(max_backlog())\n        except OSError:\n            pass\n        self._tlistener',  # noqa: E501
           '            listener.listen(16)\n        except OSError:\n            pass\n        self._tlistener',
           ('tests/system/test_hostile.py::test_a_full_backlog_makes_clients_wait_not_fail',)),
    Mutant('full-backlog-fails-at-once', 'a full listen backlog makes clients wait, not fail',
           'cprd/client.py',
           '            if time.monotonic() >= deadline:\n                raise s.connect_error(e) from None',
           '            if True:\n                raise s.connect_error(e) from None',
           ('tests/system/test_hostile.py::test_a_full_backlog_makes_clients_wait_not_fail',)),
    Mutant('ls-reply-built-per-client', '250 clients that never read an ls cost no copy of it',
           'cprd/daemon/handlers.py',
           '        if self._ls_cache is not None and self._ls_cache[0] == version:',
           '        if False:',
           ('tests/system/test_hostile.py::test_clients_that_never_read_their_ls_cost_no_memory_and_are_dropped',)),
    Mutant('unread-reply-never-dropped', 'a client that never reads its reply is dropped after --idle-timeout',
           'cprd/daemon/endpoint.py',
           '            with trio.move_on_after(self.config.idle_timeout) as cs:\n                for i, f in enumerate(frames):',  # noqa: E501
           '            with trio.move_on_after(float("inf")) as cs:\n                for i, f in enumerate(frames):',
           ('tests/system/test_hostile.py::test_clients_that_never_read_their_ls_cost_no_memory_and_are_dropped',)),
    Mutant('target-refusal-resets-a-source-that-spoke', 'a refused peer that speaks first still reads why (handoff)',
           'cprd/handoff.py',
           '                scm.drop_queued(conn.fileno())  # a hello it sent first must not reset the connection\n',
           '',
           ('tests/system/test_trust.py::test_a_refused_peer_that_speaks_first_reads_why[handoff]',)),
    Mutant('table-limit-forgets-the-targets-own-fds', 'the table never grows past what a target with the same fd limit can take',  # noqa: E501
           'cprd/handoff.py',
           '    return max(0, soft - RESERVE_FDS - TARGET_OWN_FDS - 1)',
           '    return max(0, soft - RESERVE_FDS)',
           ('tests/system/test_hostile.py::test_daemon_at_its_fd_limit_refuses_puts_clearly',)),
    Mutant('put-past-the-table-limit', 'put refuses an entry a target with the same fd limit could not take',
           'cprd/daemon/handlers.py',
           '        if n >= most:\n            raise CapacityError(f"the table holds',
           '        if False:\n            raise CapacityError(f"the table holds',
           ('tests/system/test_hostile.py::test_daemon_at_its_fd_limit_refuses_puts_clearly',)),
    Mutant('populate-past-the-table-limit', '--populate is checked against what a target with the same fd limit can take',  # noqa: E501
           'cprd/daemon/main.py',
           '    if need > min(capacity, most):',
           '    if need > capacity:',
           ('tests/system/test_control.py::test_populate_is_checked_before_anything_is_made',)),
    Mutant('no-answer-at-the-fd-limit', 'at the fd limit every client is answered at once',
           'cprd/daemon/endpoint.py',
           '                        await self._refuse_at_limit(raw)\n                        continue',
           '                        await trio.sleep(0.05)\n                        continue',
           ('tests/system/test_hostile.py::test_daemon_at_its_fd_limit_refuses_puts_clearly',)),
    Mutant('ctrunc-ignored', 'a target out of fds mid-batch (MSG_CTRUNC) fails cleanly',
           'cprd/scm.py',
           '    if flags & socket.MSG_CTRUNC:',
           '    if False:',
           ('tests/system/test_hostile.py::test_target_out_of_fds_mid_batch_fails_cleanly',)),
    Mutant('no-flow-control', 'an unprivileged source whose limit is below its table hands off (ETOOMANYREFS)',
           'cprd/handoff.py',
           '    if _exempt_from_inflight_limit():\n        return batch, window',
           '    if True:\n        return batch, window',
           ('tests/system/test_hostile.py::test_unprivileged_source_with_a_low_limit_hands_off',)),
    Mutant('truncated-frame-fds-kept', 'no fd that arrived with a bad frame stays open',
           'cprd/scm.py',
           '    if flags & socket.MSG_TRUNC:\n        fds.close()',
           '    if flags & socket.MSG_TRUNC:\n        fds.take()',
           ('tests/system/test_control.py::test_garbage_on_the_control_socket[1]',)),
    Mutant('bad-handoff-message-fds-kept', 'no fd that arrived with a bad handoff message stays open',
           'cprd/handoff.py',
           '    except BaseException:\n        fds.close()\n        raise\n    return ev, fds',
           '    except BaseException:\n        fds.take()\n        raise\n    return ev, fds',
           ('tests/unit/test_fuzz_live.py::test_target_receiving_side_fuzz',)),
    Mutant('short-frame-unchecked', 'codecs never raise anything but a CprdError',
           'cprd/protocol/frame.py',
           '    if len(data) < HEADER_SIZE:',
           '    if not data:',
           ('tests/unit/test_protocol.py::test_random_bytes_only_raise_protocol_error',)),
    Mutant('deep-json-unhandled', 'codecs never raise anything but a CprdError',
           'cprd/protocol/control.py',
           '    except (ValueError, RecursionError) as e:  # an over-long',
           '    except ValueError as e:  # an over-long',
           ('tests/unit/test_protocol.py',)),
    Mutant('typo-creates-a-file', 'a typo makes no file: only --create creates',
           'cprd/cli.py',
           '(os.O_CREAT if create else 0)',
           'os.O_CREAT',
           ('tests/system/test_control.py::test_user_errors_are_clear_and_change_nothing',)),
    Mutant('hidden-characters-accepted', 'names that hide text are refused',
           'cprd/table.py',
           '_HIDDEN = ("Cf", "Zl", "Zp")',
           '_HIDDEN = ("Zl", "Zp")',
           ('tests/system/test_control.py::test_user_errors_are_clear_and_change_nothing',)),
    Mutant('hidden-names-shown-raw', 'names that hide text are shown escaped',
           'cprd/cli.py',
           '    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")',
           '    return text',
           ('tests/system/test_control.py::test_names_that_hide_text_are_shown_escaped',)),
    Mutant('fifo-open-waits', 'no hang on a FIFO',
           'cprd/cli.py',
           'os.O_NOCTTY | os.O_NONBLOCK | (',
           'os.O_NOCTTY | (',
           ('tests/system/test_control.py::test_put_opens_without_waiting_and_creates_only_when_asked',)),
    Mutant('same-fd-fallback-ignores-flags', 'same_fd by inode alone tells apart opens with other flags',
           'cprd/fdstore.py',
           '    return fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)',
           '    return True',
           ('tests/unit/test_same_fd.py',)),
    Mutant('same-fd-fallback-judges-devices', 'same_fd never judges a device by its inode',
           'cprd/fdstore.py',
           '    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino) or stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):',  # noqa: E501
           '    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):',
           ('tests/unit/test_same_fd.py',)),
    Mutant('same-fd-refused-kcmp-taken-as-an-answer', 'a refused kcmp is no answer: same_fd falls back',
           'cprd/fdstore.py',
           '    r = _kcmp_file(a, b)\n    if r >= 0:\n        return r == 0',
           '    r = _kcmp_file(a, b)\n    if r >= -1:\n        return r == 0',
           ('tests/unit/test_same_fd.py',)),
    Mutant('same-fd-any-fcntl-error-is-kcmp', 'same_fd falls back to kcmp when F_DUPFD_QUERY is unknown',
           'cprd/fdstore.py',
           '        return fcntl.fcntl(a, _F_DUPFD_QUERY, b) == 1\n    except OSError as e:\n        if e.errno not in (errno.EINVAL, errno.ENOSYS):\n            raise',  # noqa: E501
           '        return fcntl.fcntl(a, _F_DUPFD_QUERY, b) == 1\n    except OSError as e:\n        if e.errno not in (errno.EINVAL, errno.ENOSYS):\n            raise\n        return False',  # noqa: E501
           ('tests/unit/test_same_fd.py',)),
    Mutant('bisect-fallback-says-new', 'where kcmp stops ordering, the store compares with each stored fd',
           'cprd/daemon/notify.py',
           '                    a.ordered.discard(k)  # kcmp stopped ordering: compare with each, as below\n                    break',  # noqa: E501
           '                    a.ordered.discard(k)  # kcmp stopped ordering: compare with each, as below\n                    return False, None',  # noqa: E501
           ('tests/unit/test_same_fd.py',)),
]


def _copy() -> Path:
    """A copy of the checkout's code and tests in a new temporary directory."""
    d = Path(tempfile.mkdtemp(prefix="cprd-mutant-"))
    for part in ("cprd", "tests", "examples", "docs", "README.md", "pyproject.toml", "conftest.py"):
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


def baseline(chosen: list[Mutant], jobs: int = 1) -> str | None:
    """None if every chosen mutant's tests pass on an unbroken copy (so that a failure under a
    mutant is the mutant's doing), else pytest's last lines. `jobs` copies run at once, each a share
    of the tests."""
    tests = sorted({t for m in chosen for t in m.tests})
    shares = [tests[i::jobs] for i in range(jobs) if tests[i::jobs]]

    def one(share: list[str]) -> str | None:
        d = _copy()
        try:
            r = _pytest(d, share)
            return None if r.returncode == 0 else "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        finally:
            shutil.rmtree(d, ignore_errors=True)

    with ThreadPoolExecutor(len(shares) or 1) as pool:
        whys = [w for w in pool.map(one, shares) if w is not None]
    return "\n".join(whys) or None


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
    p.add_argument("--markdown", action="store_true", help="list them as docs/testing.md's table and exit")
    p.add_argument("--keep", action="store_true", help="keep each mutated copy (its directory is printed)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N mutants at once, each in its own copy (their tests must pass on a busy machine)")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.names or m.name in a.names]
    if a.names and len(chosen) != len(set(a.names)):
        print(f"unknown mutant(s): {sorted(set(a.names) - {m.name for m in MUTANTS})}", file=sys.stderr)
        return 2
    if a.markdown:
        print("| mutant | the promise it breaks | file | caught by |\n|---|---|---|---|")
        for m in chosen:
            tests = ", ".join(f"`{Path(n.partition('::')[0]).name}::{n.partition('::')[2]}`".replace("::`", "`")
                              for n in m.tests)
            print(f"| {m.name} | {m.promise} | `{m.file}` | {tests} |")
        return 0
    if a.list:
        for m in chosen:
            print(f"{m.name}: {m.promise}\n    {m.file}; tests: {' '.join(m.tests)}")
        return 0
    bad, t0 = 0, time.monotonic()
    why = baseline(chosen, a.jobs)
    if why is not None:
        print(f"the mutants' tests fail on an unbroken copy, so a failure would prove nothing:\n{why}", file=sys.stderr)
        return 2
    print(f"baseline: every mutant's tests pass on an unbroken copy ({time.monotonic() - t0:.0f} s)", flush=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        running = {pool.submit(run, m, a.keep): m for m in chosen}
        for done in as_completed(running):
            m, (verdict, secs, tail) = running[done], done.result()
            bad += verdict != "caught"
            print(f"{verdict:<9} {secs:6.1f} s  {m.name}: {m.promise}" + (f"\n          {tail}" if verdict != "caught"
                                                                           else ""), flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants caught in {time.monotonic() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
