"""Exec-style in-place upgrade (QEMU's cpr-exec for cprd itself): same PID, new program.

Theory of operation
-------------------
The running daemon freezes mutations and stops accepting (connections wait in the kernel's
backlog of the listening socket, which survives the exec), then:

1. writes its state (every entry with its fd number and identity, the listening socket, the
   answers to recent mutations, its configuration, the argv to run the *previous* program again)
   as JSON into a memfd;
2. forks a **guardian**: a child, in a process group of its own, that keeps a copy of every fd
   and of the state, and waits for one of three things, with a deadline (``ctl upgrade
   --timeout``, default 30 s). "C" (confirmed) or "A" (aborted) on a pipe make it exit. The
   daemon's pid exiting (its pidfd) or the pipe's end (the write end was inherited only by the
   new program) mean the new program died before it confirmed. The deadline passing means it
   hangs. In those two cases the guardian kills the new program's whole process group and runs
   the previous program from its copies, in its own PID, so nothing is lost. A pipe alone would
   not do: a child the new program forked keeps the write end open after the program dies;
3. makes the daemon the leader of a process group of its own (it already is under systemd),
   so that the new program and anything it forks before it confirms can be killed together
   without touching the process that started cprd;
4. clears close-on-exec on exactly the fds that must cross (table, listener, state, pipe, and
   the connection of the client that asked) only now, so no other fork ever inherits them, and
   execs the new program with the daemon's own arguments plus ``--restore-fd N``.

The fds cross exec into the new program only, but a new program that is a wrapper (a shell
script) and forks before it execs cprd hands copies of them to its children. Those children
cannot keep the table alive: on a rollback the guardian kills the process group they are in, and
once cprd has restored it kills every process the wrapper left behind (its own children, the
members of its process group other than the guardian) and logs it, since a table has exactly
one owner. A child that left both (setsid and a double fork) still holds the state memfd, which
exists for this upgrade only: both the guardian and the restored cprd kill whatever holds it.
A rollback runs this interpreter's cprd module again, never a program an earlier upgrade named.

If exec itself fails (missing file, not executable, bad interpreter) nothing happened: close-on-
exec is restored, the guardian told to abort, and the daemon goes on serving.

The new program (``restore``) reads the state, verifies every fd (fstat: type, inode, flags),
sets close-on-exec again, and serves on the inherited listening socket; then it tells the
guardian "C", answers the client that asked (pid, entries, ms, rolled_back) and, under systemd,
sends READY=1. If it cannot restore (an exception, a state version it does not know, an fd that
does not verify) it execs the previous program with the same state, marked rolled back.

This module knows fds, the state format, fork and exec. It imports no trio (the restore path
must start fast: the daemon imports trio once it serves).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from .errors import UpgradeError

log = logging.getLogger("cprd.upgrade")

STATE_VERSION = 2  # 2: an upgrade with a stand-in (its journal must be taken over: version 1 programs cannot)
CONFIRM, ABORT = b"C", b"A"
DEFAULT_TIMEOUT = 30.0  # seconds a new program has to confirm before the guardian rolls back


def max_state_version() -> int:
    """The newest state version this program reads (tests lower it to play an older program)."""
    return int(os.environ.get("CPRD_TEST_STATE_VERSION", STATE_VERSION))


# -- state -------------------------------------------------------------------------------------
def write_state(state: dict[str, Any]) -> int:
    """A memfd (close-on-exec for now) holding state as JSON, offset 0."""
    fd = os.memfd_create("cprd-state", os.MFD_CLOEXEC)
    try:
        data = json.dumps(state, separators=(",", ":")).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int, check_version: bool = True) -> dict[str, Any]:
    chunks, off = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, off)
        if not chunk:
            break
        chunks.append(chunk)
        off += len(chunk)
    try:
        state = json.loads(b"".join(chunks))
    except ValueError as e:
        raise UpgradeError(f"the upgrade state in fd {fd} is not JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("cprd_state"), int):
        raise UpgradeError(f"fd {fd} holds no cprd upgrade state")
    if check_version:
        check_state_version(state)
    return state


def check_state_version(state: dict[str, Any]) -> None:
    if state["cprd_state"] > max_state_version():
        raise UpgradeError(f"upgrade state version {state['cprd_state']} is newer than this program reads "
                           f"({max_state_version()}); it cannot restore it")


def mark_rolled_back(fd: int, state: dict[str, Any], reason: str) -> None:
    """Rewrite the state in place (the guardian shares this memfd) with the reason of a rollback."""
    state = {**state, "rolled_back": reason, "failed_program": state.get("argv_new")}
    data = json.dumps(state, separators=(",", ":")).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def crossing_fds(state: dict[str, Any], state_fd: int) -> list[int]:
    """Every fd the state names, which must survive an exec. The envelope every state version keeps
    (cprd_state, previous, env, crossing) is what lets a program that cannot read the rest still
    hand everything back to the previous program."""
    if "crossing" in state:
        return [*state["crossing"], state_fd]
    fds = [e[2] for e in state["entries"]] + [state["listener_fd"], state_fd]
    for key in ("guardian_fd", "requester_fd"):
        if state.get(key) is not None:
            fds.append(state[key])
    if (state.get("standin") or {}).get("journal_fd") is not None:
        fds.append(state["standin"]["journal_fd"])
    return fds


def exec_with(argv: list[str], fds: list[int], state_fd: int, env: dict[str, str] | None = None) -> None:
    """Exec argv + --restore-fd state_fd with fds inheritable; returns only if exec failed (then
    every fd is close-on-exec again and OSError is raised)."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        os.execve(argv[0], [*argv, "--restore-fd", str(state_fd)], os.environ if env is None else env)
    except OSError:
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        raise


def rollback(state_fd: int, state: dict[str, Any], reason: str) -> None:
    """The new program cannot restore: run the previous one again with the same state. Returns
    only if that exec fails too (then the caller exits and the guardian restores)."""
    log.error("event=upgrade_rollback reason=%r previous=%r", reason, state.get("previous"))
    mark_rolled_back(state_fd, state, reason)
    # The previous program runs as it ran before: with its own environment, not the new one's.
    exec_with(state["previous"], crossing_fds(state, state_fd), state_fd, state.get("env"))


# -- the stand-in's journal ------------------------------------------------------------------------
# The stand-in (a fork of the old program that serves while the new one starts: daemon/standin.py)
# sends every change it makes to the table, and the answers to mutations, on a SOCK_SEQPACKET pair
# whose other end crosses the exec; a message's fds travel in it (SCM_RIGHTS), so what the stand-in
# acknowledged lives in the socket's queue even if the stand-in dies. It sends each message twice:
# to the new program, which reads (and so consumes) them, and to the guardian, which reads them only
# if it must restore (state["standin"]["guardian_journal_fd"]). Messages, by their first byte:
#   J + JSON {"ops": [["S", name, id, kind, mode, dev, ino, flags] | ["R", name, id], ...],
#             "answers": [[rid, answer], ...]}   fds: one for each "S" op, in order (stand-in -> new)
#   T  take over: stop changing the table and tell me when you have         (new program -> stand-in)
#   D  done: the journal is complete, I change nothing more                 (stand-in -> new program)
#   K  taken: go; the new program serves from now on                        (new program -> stand-in)
JOURNAL, TAKE_OVER, DONE, TAKEN = b"J", b"T", b"D", b"K"
STANDIN_OWNS = b"O"  # the stand-in to the guardian (a pipe): I keep the table (else TAKEN: I handed it over)
JOURNAL_MAX = 1 << 20  # bytes of one journal message (at most 253 "S" ops: far below)


def encode_journal(ops: list[list], answers: list[list]) -> bytes:
    return JOURNAL + json.dumps({"ops": ops, "answers": answers}, separators=(",", ":")).encode()


def apply_journal(table: Any, data: bytes, fds: list[int]) -> list[list]:
    """Apply one J message to `table` (which takes the fds of its "S" ops; the caller closes what is
    left in `fds` after a failure); returns its answers. UpgradeError if it is malformed."""
    from .kinds import KIND_BY_CODE, Identity, verify

    try:
        msg = json.loads(data[1:])
        ops, answers = msg["ops"], msg["answers"]
        n_saves = sum(1 for op in ops if op[0] == "S")
    except (ValueError, KeyError, TypeError, IndexError):
        raise UpgradeError("the stand-in's journal holds a malformed message") from None
    if n_saves != len(fds):
        raise UpgradeError(f"a journal message names {n_saves} fds but {len(fds)} came with it")
    for op in ops:
        if op[0] == "S":
            fd = fds.pop(0)
            try:
                name, id_, kind, mode, dev, ino, flags = op[1:]
                ident = Identity(KIND_BY_CODE[kind], mode, dev, ino, flags)
            except (ValueError, KeyError, TypeError):
                os.close(fd)
                raise UpgradeError(f"the stand-in's journal holds a malformed op {op!r:.200}") from None
            bad = verify(fd, ident)
            if bad is not None:
                os.close(fd)
                raise UpgradeError(f"journal entry ({name!r}, {id_}) does not verify: {bad}")
            table.save(name, id_, fd, ident, replace=True)
        elif op[0] == "R":
            if table.find(op[1], op[2]) is not None:
                table.delete(op[1], op[2])
    return answers


# -- the guardian --------------------------------------------------------------------------------
def spawn_guardian(state: dict[str, Any], state_fd: int) -> tuple[int, int]:
    """Fork the guardian; returns (its pid, the write end of its pipe, still close-on-exec)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    daemon_pid = os.getpid()
    watch = os.pidfd_open(daemon_pid)  # the guardian's view of the daemon's pid (its parent)
    standin_info = state.get("standin") or {}
    standin = standin_info.get("pid")
    keep = set(crossing_fds(state, state_fd)) | {r, watch}
    for key in ("guardian_journal_fd", "guardian_signal_fd"):  # its copy of the journal; the stand-in's word
        if standin_info.get(key) is not None:
            keep.add(standin_info[key])
    try:
        pid = os.fork()
    except BaseException:
        for fd in (r, w, watch):
            os.close(fd)
        raise
    if pid == 0:  # the guardian: no trio, no logging handlers that might lock; only fds and exec
        code = 1
        try:
            os.setpgid(0, 0)  # out of the daemon's group, which it may kill
            os.close(w)
            _close_all_but(keep)
            for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = _guard(r, watch, daemon_pid, state, state_fd, standin)
        finally:
            os._exit(code)
    os.close(r)
    os.close(watch)
    try:
        os.setpgid(pid, pid)  # the same from this side, so that it holds before either one runs on
    except OSError:
        pass
    return pid, w


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def alive(pid: int | None) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def lowest_priority() -> None:
    """Run only when nothing else wants the CPU (SCHED_IDLE, else nice 19): for a process about to
    exit whose teardown (thousands of fds, a large copy-on-write memory) would otherwise take CPU
    from the daemon that serves."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except OSError:
            pass


def _standin_keeps_it(signal_fd: int | None, standin: int) -> bool:
    """Once the new program is gone: whether the stand-in keeps the table. It says so on its pipe:
    "O" (it owns the table again) or "K" (it had handed it over to the new program, which is gone:
    restore); its end closing without a word means it died (restore). It always speaks at once
    when the new program's pid goes, so the wait is bounded; if it is stopped, it keeps the table."""
    if signal_fd is None:
        return alive(standin)
    poller = select.poll()
    poller.register(signal_fd, select.POLLIN)
    deadline = time.monotonic() + 30
    while (left := deadline - time.monotonic()) > 0:
        try:
            if not poller.poll(left * 1000):
                break
            word = os.read(signal_fd, 1)
        except InterruptedError:
            continue
        return word == STANDIN_OWNS
    return alive(standin)


def _guard(r: int, watch: int, daemon_pid: int, state: dict[str, Any], state_fd: int,
           standin: int | None = None) -> int:
    deadline = time.monotonic() + float(state.get("deadline_s") or DEFAULT_TIMEOUT)
    poller = select.poll()
    poller.register(r, select.POLLIN)
    poller.register(watch, select.POLLIN)
    why = ""
    while not why:
        left = deadline - time.monotonic()
        if left <= 0:
            why = (f"the new program did not confirm within {float(state.get('deadline_s') or DEFAULT_TIMEOUT):g} s; "
                   "the guardian killed its process group and")
            break
        try:
            ready = {fd for fd, _ in poller.poll(left * 1000)}
        except InterruptedError:
            continue
        if r in ready:
            try:
                word = os.read(r, 1)
            except InterruptedError:
                continue
            if word in (CONFIRM, ABORT):
                lowest_priority()  # our exit (a large process's teardown) must not slow the new program
                return 0
            why = "the new program died before it confirmed; the guardian"
        elif watch in ready:
            why = "the new program died before it confirmed; the guardian"
    # The new program is dead or hung: kill it (through its pidfd: it may have left its process
    # group) and whatever it forked in its group (which may hold copies of the table), wait until
    # its pid is gone, then restore from our own copies.
    try:
        signal.pidfd_send_signal(watch, signal.SIGKILL)
    except OSError:
        pass
    try:
        os.killpg(daemon_pid, signal.SIGKILL)
    except OSError:
        pass
    poller.unregister(r)
    poller.poll(10_000)
    st = os.fstat(state_fd)
    kill_holders((st.st_dev, st.st_ino), {os.getpid(), standin or 0})  # what escaped the group
    os.close(r)
    os.close(watch)
    if standin and _standin_keeps_it(state["standin"].get("guardian_signal_fd"), standin):
        return 0  # the stand-in serves the table and keeps it: nothing for us to restore
    state = {**state, "guardian_fd": None, "guardian_pid": None}
    if state.get("standin"):  # the restored program reads our copy of the journal: all of it
        state["standin"] = {**state["standin"], "journal_fd": state["standin"].get("guardian_journal_fd"),
                            "guardian_journal_fd": None, "guardian_signal_fd": None}
        state.pop("crossing", None)
    try:
        rollback(state_fd, state, f"{why} restored the previous program in pid {os.getpid()}")
    except OSError as e:
        print(f"cprd guardian: cannot run the previous program: {e}", file=sys.stderr)
    return 1


def _holds(pid: str, ident: tuple[int, int]) -> bool:
    """Whether process `pid` has an fd open on the inode `ident` (st_dev, st_ino)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for n in names:
        try:
            st = os.stat(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            return True
    return False


def kill_strays(keep: set[int | None], state_fd: int) -> list[int]:
    """Kill what a new program forked before it became cprd (see the module docstring): our own
    children other than those in `keep` (the guardian, the stand-in), the members of our process
    group, and any other process that holds the state memfd of this upgrade (made for it,
    inherited only through the exec: a process that escaped both by setsid and a double fork still
    holds it). Returns their pids."""
    me, strays = os.getpid(), []
    st = os.fstat(state_fd)
    state = (st.st_dev, st.st_ino)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me or int(name) in keep:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, pgrp = int(fields[1]), int(fields[2])
        if ppid == me or pgrp == me or _holds(name, state):
            strays.append(int(name))
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in strays:  # our children must be reaped; others are reaped by their parents
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return strays


def kill_holders(ident: tuple[int, int], exclude: set[int]) -> None:
    """SIGKILL every process but `exclude` that holds the inode `ident` (the guardian, before it
    restores: whatever the new program started that still holds the state)."""
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in exclude and _holds(name, ident):
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


# -- the old program's side ---------------------------------------------------------------------
@dataclass(slots=True)
class Prepared:
    state: dict[str, Any]
    state_fd: int
    argv: list[str]
    guardian_pid: int | None = None
    guardian_w: int | None = None

    def guard(self, standin_pid: int | None) -> None:
        """Fork the guardian (once the stand-in, if any, is forked: the guardian must know it) and
        write the state again with both. Without a guardian (it could not be forked) the upgrade
        goes on: the stand-in keeps the table if the new program fails."""
        state = {**self.state, "standin": ({**self.state["standin"], "pid": standin_pid}
                                           if self.state.get("standin") else None)}
        try:
            gpid, gw = spawn_guardian(state, self.state_fd)
        except OSError as e:
            log.warning("event=guardian_not_started error=%r", str(e))
            gpid, gw = None, None
        state = {**state, "guardian_fd": gw, "guardian_pid": gpid}
        state["crossing"] = [fd for fd in crossing_fds(state, self.state_fd) if fd != self.state_fd]
        self.state, self.guardian_pid, self.guardian_w = state, gpid, gw
        os.ftruncate(self.state_fd, 0)
        os.pwrite(self.state_fd, json.dumps(state, separators=(",", ":")).encode(), 0)

    def abort(self) -> None:
        """Nothing will be exec'd: let the guardian go and forget the state."""
        if self.guardian_w is not None:
            try:
                os.write(self.guardian_w, ABORT)
            except OSError:
                pass
            os.close(self.guardian_w)
            try:
                os.waitpid(self.guardian_pid, 0)
            except ChildProcessError:
                pass
        os.close(self.state_fd)

    def exec(self) -> None:
        exec_with(self.argv, crossing_fds(self.state, self.state_fd), self.state_fd)


DEFAULT_PROGRAM = [sys.executable, "-m", "cprd"]


def prepare(state: dict[str, Any], program: str | None, own_args: list[str],
            timeout: float = DEFAULT_TIMEOUT) -> Prepared:
    """Write the state: everything but the guardian (Prepared.guard) and the exec. `program` (checked
    by the caller, a real path) or, when None, this interpreter with -m cprd is the new program; a
    rollback runs this interpreter with -m cprd again, never a program an earlier upgrade named (a
    wrapper would run again, unchecked, with every fd). The new program has `timeout` seconds to
    confirm."""
    argv = new_argv(program, own_args)
    new = argv[:len(argv) - len(own_args)]
    prev = DEFAULT_PROGRAM
    state = {**state, "cprd_state": STATE_VERSION, "argv_new": argv, "program_new": new,
             "previous": [*prev, *own_args], "program_previous": prev, "env": dict(os.environ),
             "rolled_back": None, "deadline_s": timeout, "guardian_fd": None, "guardian_pid": None}
    if os.getpgid(0) != os.getpid():  # lead a process group of our own (see the module docstring)
        os.setpgid(0, 0)
    state_fd = write_state(state)
    return Prepared(state, state_fd, argv)


def new_argv(program: str | None, own_args: list[str]) -> list[str]:
    """The command line of the new program; UpgradeError if the program is missing."""
    new = DEFAULT_PROGRAM if program is None else [os.path.abspath(program)]
    if program is not None and not os.path.exists(new[0]):
        raise UpgradeError(f"cannot run {program}: no such file; the running daemon goes on serving")
    return [*new, *own_args]


def now_ms() -> float:
    return time.monotonic() * 1e3
