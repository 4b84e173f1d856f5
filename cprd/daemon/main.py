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
from ..errors import CapacityError, CprdError
from ..handoff import fd_capacity, table_limit
from ..kinds import classify
from ..paths import unlink_if_same
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
        listener = bind_listener(control, "control", shared=bool(config.allow_uids), describe=describe_daemon)
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
        return await Daemon(st).run()
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
        inc = await accept_handoff(trio.socket.from_stdlib_socket(hs), {os.geteuid(), 0})
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
            listener = bind_listener(received.hello.control_path, "control", shared=bool(config.allow_uids),
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
            await confirm(inc.sock, received)
        inc.close()

    return await Daemon(st).run(on_serving, stores_after=True)


# -- the new program of an in-place upgrade ------------------------------------------------------
def restore_main(state_fd: int, own_args: tuple[str, ...]) -> int:
    """`cprd ... --restore-fd N`: rebuild the daemon from the state an upgrade left in fd N and serve.
    When it cannot, run the previous program again with the same state (a rollback)."""
    from .. import upgrade

    try:
        state = upgrade.read_state(state_fd, check_version=False)
    except (CprdError, OSError) as e:
        # Without a readable state there is nothing to roll back with; exiting lets the guardian restore.
        print(f"cprd: error: cannot read the upgrade state in fd {state_fd}: {e}", file=sys.stderr)
        return 1
    try:
        upgrade.check_state_version(state)  # a version this program does not know: roll back (below)
        if fault.armed("restore", "raise"):
            log.warning("event=fault_fired side=restore step=raise n=None action=raise")
            raise RuntimeError("test fault: restore raises")
        t0 = time.perf_counter()
        table, listener = _rebuild(state, state_fd)
        log.info("event=restored entries=%d ms=%.1f", len(table), (time.perf_counter() - t0) * 1e3)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the previous program takes over again
        if state.get("rolled_back"):  # we are the previous program and cannot restore either
            print(f"cprd: error: the rollback cannot restore either: {e}", file=sys.stderr)
            return 1
        try:
            upgrade.rollback(state_fd, state, f"the new program could not restore: {type(e).__name__}: {e}")
        except OSError as e2:
            print(f"cprd: error: cannot run the previous program: {e2}", file=sys.stderr)
        return 1
    try:
        return trio.run(_serve_restored, state, state_fd, table, listener, own_args)
    except upgrade.UpgradeError as e:  # the stand-in's journal has a hole: we must not take over
        print(f"cprd: error: cannot take over from the stand-in: {e}; the stand-in keeps serving the table "
              "(or, if it is gone, the guardian restores it)", file=sys.stderr)
        return 1


def _rebuild(state: dict[str, Any], state_fd: int) -> tuple[FdTable, socket.socket]:
    """The table and listener the state describes, every fd verified and close-on-exec again."""
    from .. import upgrade
    from ..kinds import KIND_BY_CODE, Identity, verify

    for fd in upgrade.crossing_fds(state, state_fd):
        os.set_inheritable(fd, False)
    table = FdTable()
    for name, id_, fd, kind, mode, dev, ino, flags in state["entries"]:
        ident = Identity(KIND_BY_CODE[kind], mode, dev, ino, flags)
        bad = verify(fd, ident)
        if bad is not None:
            table.forget_all()  # the fds are not ours to close: the rollback takes them all back
            raise upgrade.UpgradeError(f"entry ({name!r}, {id_}) fd {fd} does not verify: {bad}")
        table.insert_unchecked_entry(name, id_, fd, ident)
    table.by_kind()  # counted now, while the stand-in serves, not by the first status after the take-over
    return table, socket.socket(fileno=state["listener_fd"])


async def _serve_restored(state: dict[str, Any], state_fd: int, table: FdTable, listener: socket.socket,
                          own_args: tuple[str, ...]) -> int:
    from .. import upgrade
    from .standin import take_over

    standin = state.get("standin") or {}
    took: dict[str, Any] = {}
    if standin.get("journal_fd") is not None:  # the stand-in served meanwhile: take its changes and the table over
        took = await take_over(table, standin["journal_fd"], standin.get("pid"),
                               float(state.get("deadline_s") or upgrade.DEFAULT_TIMEOUT),
                               strict=not state.get("rolled_back"))
    if state.get("nice") is not None:  # the old program lowered our priority while the stand-in served
        try:
            os.setpriority(os.PRIO_PROCESS, 0, int(state["nice"]))
        except (OSError, ValueError):
            log.warning("event=priority_not_restored nice=%r", state["nice"])
    st = DaemonState.restored(state, table, listener, own_args)
    st.replies.take_from(took.get("answers", []))
    d = Daemon(st)

    async def on_serving() -> None:
        gw, gpid, cpid = state.get("guardian_fd"), state.get("guardian_pid"), standin.get("pid")
        ms = ((trio.current_time() - took["t_asked"]) * 1e3 if "t_asked" in took
              else upgrade.now_ms() - state["t_freeze_ms"])
        if gw is not None:
            try:
                os.write(gw, upgrade.CONFIRM)
            except OSError:
                pass
            os.close(gw)
            await _reap(gpid)
        await _reap(cpid)  # the stand-in exits once it knows we took over
        strays = upgrade.kill_strays({gpid, cpid}, state_fd)
        if strays:
            log.warning("event=upgrade_strays_killed pids=%s note=the-new-program-forked-before-it-became-cprd;"
                        "they-held-copies-of-the-table", strays)
        os.close(state_fd)
        result = {"pid": os.getpid(), "entries": len(st.table), "ms": round(ms, 3),
                  "rolled_back": bool(state.get("rolled_back")), "reason": state.get("rolled_back"),
                  "program": (state.get("failed_program") if state.get("rolled_back") else state.get("argv_new")),
                  "previous_pid": state.get("pid"), "standin_pid": cpid,
                  "standin_journal": took.get("messages", 0), "standin_handed_over": took.get("handed_over")}
        log.info("event=upgraded pid=%d entries=%d ms=%.1f rolled_back=%s standin=%s journal_messages=%s",
                 os.getpid(), len(st.table), ms, result["rolled_back"], cpid, took.get("messages"))
        if os.getpid() != state.get("pid"):
            sdnotify.mainpid(os.getpid())
        sdnotify.ready(d.status_line())
        if state.get("requester_fd") is not None:
            conn = trio.socket.from_stdlib_socket(socket.socket(fileno=state["requester_fd"]))
            with conn:
                await d.endpoint.reply(conn, cp.encode_reply(result), [])

    return await d.run(on_serving)


async def _reap(pid: int | None) -> None:
    """Collect the guardian once it has exited (it does as soon as it reads the confirmation)."""
    if not pid:
        return
    for _ in range(200):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        await trio.sleep(0.005)
