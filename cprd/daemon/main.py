"""The three ways a daemon starts: `cprd source`, `cprd target`, and the new program of an in-place
upgrade (`--restore-fd N`). Each builds a DaemonState (state.py) and serves it with a Daemon.

What this module may know: the command's arguments, paths, the handoff driver, the upgrade state.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any

import trio

from .. import fault, sdnotify
from ..errors import CapacityError, CprdError, UpgradeError
from ..handoff import fd_capacity, table_limit
from ..kinds import classify
from ..paths import trusted_uids, unlink_if_same
from ..protocol import control as cp
from ..table import FdTable
from .core import Daemon
from .state import Config, DaemonState

log = logging.getLogger("cprd.daemon")


def populate_table(table: FdTable, triples: list[tuple[str, int, int]]) -> None:
    """Move freshly made (name, id, fd) triples into table (closing them all on any error)."""
    it = iter(triples)
    try:
        for name, id_, fd in it:
            try:
                table.save(name, id_, fd, classify(fd))
            except BaseException:
                os.close(fd)
                raise
    except BaseException:
        for _, _, fd in it:
            os.close(fd)
        raise


async def serve_source(control: str, *, spec: str = "", state_dir: str | None = None,
                       config: Config = Config()) -> int:
    """`cprd source`: create the control socket, populate the table, serve until handed off or stopped."""
    from ..client import describe_daemon
    from ..handoff import raise_nofile
    from ..paths import bind_listener, open_dir
    from ..populate import parse_spec, populate, spec_fds

    raise_nofile()
    counts = parse_spec(spec)
    need = spec_fds(counts)
    soft, n_open, capacity = fd_capacity()
    most = table_limit(soft)
    if need > min(capacity, most):
        raise CapacityError(f"--populate asks for {need} fds but this process can open {capacity} more and a target "
                            f"with the same fd limit could take over at most {most} (RLIMIT_NOFILE {soft}, {n_open} "
                            "open); ask for fewer or raise the limit")
    listener = sdnotify.control_listener_from_env(control)  # socket activation (cprd.socket)
    activated = listener is not None
    if listener is not None:
        log.info("event=socket_activated fd=%d", listener.fileno())
    else:
        listener = bind_listener(control, "control", describe=describe_daemon)
    st = DaemonState.source(FdTable(), listener, control, config, socket_activated=activated)
    try:
        if need:
            t0 = time.perf_counter()
            directory = state_dir or os.path.join(os.path.dirname(control), f"state-{os.getpid()}")
            try:
                if counts["files"]:  # regular files go into a checked private directory, opened relative to it
                    with open_dir(os.path.abspath(directory), what="state directory", create=True,
                                  private=True) as sd:
                        populate_table(st.table, populate(counts, sd.fd))
                else:
                    populate_table(st.table, populate(counts, directory))
            except OSError as e:
                raise CprdError(f"cannot create the --populate fds ({e.filename or 'in ' + directory}): "
                                f"{e.strerror or e}; a state file is never opened through a symlink") from None
            log.info("event=populated entries=%d ms=%.1f state_dir=%s", len(st.table),
                     (time.perf_counter() - t0) * 1e3, directory)
        async def on_serving() -> None:
            log.info("event=sole_owner pid=%d role=source", os.getpid())

        return await Daemon(st).run(on_serving)
    except BaseException:
        unlink_if_same(control, st.control_fid)
        st.table.close_all()
        listener.close()
        raise


async def serve_target(listen: str, *, config: Config = Config()) -> int:
    """`cprd target`: wait for one handoff on `listen`, then serve the received table on the source's
    control socket (which arrives with the Commit; if the source died before sending it, the target
    binds the control path itself)."""
    from ..client import describe_daemon
    from ..handoff import accept_handoff, confirm, raise_nofile, receive_table
    from ..paths import bind_listener, file_id

    raise_nofile()
    # Only a source of our own user or root may hand us a table: it hands us its listening control
    # socket too, which another user could still hold a copy of (and accept our clients on).
    hs = bind_listener(listen, "handoff", describe=describe_daemon)
    fid = file_id(listen)
    log.info("event=waiting listen=%s pid=%d", listen, os.getpid())
    sdnotify.ready(f"waiting for a handoff on {listen}")
    try:
        inc = await accept_handoff(trio.socket.from_stdlib_socket(hs), trusted_uids())
    finally:
        unlink_if_same(listen, fid)
        hs.close()
    try:
        received = await receive_table(inc)
    except BaseException:
        inc.close()
        raise
    lfds = received.listener.take()
    try:
        if lfds:
            listener = socket.socket(fileno=lfds[0])
        else:  # the source died before its Commit: its listening socket died with it
            listener = bind_listener(received.hello.control_path, "control",
                                     describe=describe_daemon)
    except BaseException:
        received.table.close_all()
        inc.close()
        raise
    st = DaemonState.received(received, listener, config)
    if received.salvage:
        s = received.salvage
        print(f"cprd: SALVAGE: the source (pid {s.source_pid}) died mid-handoff; serving the {s.received} of "
              f"{s.announced} entries that arrived; {s.lost} lost with it: "
              f"{', '.join(f'({n!r}, {i})' for n, i in s.lost_keys[:10])}"
              f"{' ...' if len(s.lost_keys) > 10 else ''}"
              f"{f' and {s.unnamed} the source never named' if s.unnamed else ''}", file=sys.stderr)

    async def on_serving() -> None:
        if received.committed:
            # once the source reads it, it exits: from then on the table is ours alone (a death
            # before it is sent gives the table back to the source, which learns of it)
            log.info("event=confirming pid=%d role=target", os.getpid())
            await confirm(inc.sock, received)
        inc.close()
        log.info("event=sole_owner pid=%d role=target", os.getpid())

    return await Daemon(st).run(on_serving, stores_after=True)


# -- the new program of an in-place upgrade ------------------------------------------------------
def restore_main(state_fd: int, own_args: tuple[str, ...]) -> int:
    """`cprd ... --restore-fd N`: rebuild the daemon from the state an upgrade left in fd N and serve.
    When it cannot, run the previous program again with the same state (a rollback)."""
    from .. import statefd
    from ..protocol import upgrade as pu

    try:
        raw = statefd.read_raw(state_fd)
        env = pu.envelope(raw)
    except (CprdError, OSError) as e:
        # Without a readable state there is nothing to roll back with: the stand-in, seeing us gone,
        # keeps the table (or the guardian restores it).
        print(f"cprd: error: cannot read the upgrade state in fd {state_fd}: {e}", file=sys.stderr)
        return 1
    state = None
    try:
        state = pu.UpgradeState.from_json(raw, statefd.max_state_version())
        if fault.armed("restore", "raise"):
            log.warning("event=fault_fired side=restore step=raise n=None action=raise")
            raise RuntimeError("test fault: restore raises")
        t0 = time.perf_counter()
        table, listener = _rebuild(state, state_fd)
        log.info("event=restored entries=%d ms=%.1f", len(table), (time.perf_counter() - t0) * 1e3)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the previous program takes over again
        if state is not None and state.mode == "standby":  # nothing to roll back: the daemon forks another
            print(f"cprd: error: the standby cannot restore the table: {e}", file=sys.stderr)
            return 1
        if env.get("rolled_back"):  # we are the previous program and cannot restore either
            print(f"cprd: error: the rollback cannot restore either: {e}", file=sys.stderr)
            return 1
        reason = f"the new program could not restore: {type(e).__name__}: {e}"
        try:
            if state is not None:
                statefd.rollback(state_fd, state, reason)
            else:  # a state this program cannot read: what every version keeps is enough to hand it back
                statefd.rollback_raw(state_fd, reason)
        except (OSError, CprdError) as e2:
            print(f"cprd: error: cannot run the previous program: {e2}", file=sys.stderr)
        return 1
    try:
        return trio.run(_serve_restored, state, state_fd, table, listener, own_args)
    except UpgradeError as e:  # the stand-in's journal has a hole: we must not take over
        print(f"cprd: error: cannot take over from the stand-in: {e}; the stand-in keeps serving the table "
              "(or, if it is gone, the guardian restores it)", file=sys.stderr)
        return 1


def _rebuild(state: Any, state_fd: int) -> tuple[FdTable, socket.socket]:
    """The table and listener the state describes, every fd verified and close-on-exec again."""
    from ..kinds import verify

    for fd in state.crossing_fds(state_fd):
        os.set_inheritable(fd, False)
    table = FdTable()
    for e in state.entries:
        bad = verify(e.fd, e.ident)
        if bad is not None:
            table.forget_all()  # the fds are not ours to close: the rollback takes them all back
            raise UpgradeError(f"entry ({e.name!r}, {e.id}) fd {e.fd} does not verify: {bad}")
        table.insert_unchecked_entry(e.name, e.id, e.fd, e.ident)
    table.by_kind()  # counted now, while the stand-in serves, not by the first status after the take-over
    return table, socket.socket(fileno=state.listener_fd)


async def _serve_restored(state: Any, state_fd: int, table: FdTable, listener: socket.socket,
                          own_args: tuple[str, ...]) -> int:
    from .. import upgrade
    from .standby import stand_by
    from .takeover import reap, take_over

    if state.mode == "standby":  # serve only once the daemon died
        took = await stand_by(table, state)
        if took is None:
            return 0
    else:
        took = await take_over(table, state, strict=not state.rolled_back)  # answers nobody before it returns
    if state.nice is not None:  # the old program lowered our priority while the stand-in served
        try:
            os.setpriority(os.PRIO_PROCESS, 0, int(state.nice))
        except (OSError, ValueError):
            log.warning("event=priority_not_restored nice=%r", state.nice)
    st = DaemonState.restored(state, table, listener, own_args)
    st.replies.take_from(took.answers)
    d = Daemon(st)

    async def on_serving() -> None:
        ms = ((trio.current_time() - took.t_asked) * 1e3 if took.t_asked is not None
              else upgrade.now_ms() - state.t_freeze_ms)
        # The stand-in and the guardian exit now (a stopped one is fenced): when the requester hears
        # of the upgrade, no other process holds the table.
        async with trio.open_nursery() as n:
            for pid, pidfd in took.children:
                n.start_soon(reap, pid, pidfd, state.deadlines.answer_s, state.deadlines.fence_s, d.nursery)
        strays = upgrade.kill_strays({pid for pid, _ in took.children}, state_fd, state.group)
        if strays:
            log.warning("event=upgrade_strays_killed pids=%s note=the-new-program-forked-before-it-became-cprd;"
                        "they-held-copies-of-the-table", [pid for pid, _ in strays])
            async with trio.open_nursery() as n:  # (a frozen one is collected later, by the daemon)
                for pid, pidfd in strays:
                    n.start_soon(reap, pid, pidfd, 0.0, state.deadlines.fence_s, d.nursery)
        os.close(state_fd)
        cpid = state.standin.pid if state.standin else None
        result = {"pid": os.getpid(), "entries": len(st.table), "ms": round(ms, 3),
                  "rolled_back": bool(state.rolled_back), "reason": state.rolled_back,
                  "program": state.failed_program if state.rolled_back else state.argv_new,
                  "previous_pid": state.pid, "standin_pid": cpid, "standin_journal": took.messages,
                  "standin_handed_over": took.handed_over, "fenced": took.fenced, "phases_ms": took.phases_ms}
        if state.mode == "standby":
            log.warning("event=took_over pid=%d from_pid=%d entries=%d ms=%.1f note=the-daemon-died-its-standby-serves",
                        os.getpid(), state.pid, len(st.table), ms)
        else:
            log.info("event=upgraded pid=%d entries=%d ms=%.1f rolled_back=%s standin=%s journal_messages=%s "
                     "fenced=%s phases_ms=%s", os.getpid(), len(st.table), ms, result["rolled_back"], cpid,
                     took.messages, took.fenced, took.phases_ms)
        sdnotify.ready(d.status_line())
        if state.requester_fd is not None:
            conn = trio.socket.from_stdlib_socket(socket.socket(fileno=state.requester_fd))
            with conn:
                await d.endpoint.reply(conn, cp.encode_reply(result), [])

    # another pid than the daemon's (a guardian's restore, a standby): MAINPID= before the first READY=1
    return await d.run(on_serving, new_main_pid=os.getpid() != state.pid)
