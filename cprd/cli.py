"""`cprd` command line: source, target, ctl, demo, stress, bench.

Each subcommand parses its arguments (argparse), checks what it can before contacting anything, and
hands on to the daemon (daemon/), the client (client.py) or a tool (tools/). Exit status: 0 on
success, 2 for a usage error (UsageError), 1 for a refused or failed operation.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import sys
import time
from typing import Any

from .errors import CapacityError, CprdError, UsageError

FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR, "a": os.O_WRONLY | os.O_APPEND,
         "ra": os.O_RDWR | os.O_APPEND}


def _uid_list(values: list[str] | None, option: str = "--allow-uid", group: bool = False) -> tuple[int, ...]:
    """Uids (or gids, with `group`) given as numbers or names."""
    import grp
    import pwd

    out = []
    for v in values or []:
        try:
            out.append(int(v))
        except ValueError:
            try:
                out.append(grp.getgrnam(v).gr_gid if group else pwd.getpwnam(v).pw_uid)
            except KeyError:
                raise UsageError(f"{option} {v!r}: no such {'group or gid' if group else 'user or uid'}") from None
    return tuple(out)


def _shown(v: Any) -> str:
    """A value for a terminal: names may hold characters that reorder or hide text (U+202E...),
    shown escaped."""
    text = str(v)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _config(a: argparse.Namespace):
    from .daemon import Config

    if a.idle_timeout <= 0 or a.max_clients < 1 or a.queue_timeout <= 0:
        raise UsageError("--idle-timeout and --queue-timeout must be positive and --max-clients at least 1")
    if not 0 < a.upgrade_timeout <= 3600:
        raise UsageError(f"--upgrade-timeout {a.upgrade_timeout:g} must be more than 0 and at most 3600 seconds")
    if not 0 < a.answer_timeout <= 60:
        raise UsageError(f"--answer-timeout {a.answer_timeout:g} must be more than 0 and at most 60 seconds")
    for opt, v in (("--uid-max-entries", a.uid_max_entries), ("--uid-max-stores", a.uid_max_stores),
                   ("--reserve", a.reserve)):
        if v is not None and not 0 <= v <= 1 << 20:
            raise UsageError(f"{opt} {v} must be 0 or more (at most {1 << 20})")
    return Config(allow_uids=_uid_list(a.allow_uid), idle_timeout=a.idle_timeout, max_clients=a.max_clients,
                  queue_timeout=a.queue_timeout, upgrade_timeout=a.upgrade_timeout, answer_timeout=a.answer_timeout,
                  uid_max_entries=a.uid_max_entries, uid_max_stores=a.uid_max_stores, reserve=a.reserve,
                  own_args=_own_args(), standby=a.standby)


def _print(obj: Any, as_json: bool, human: str) -> None:
    print(json.dumps(obj, indent=None if as_json else 2) if as_json else human)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s cprd[%(process)d] %(levelname)s %(name)s %(message)s")


# -- daemons ---------------------------------------------------------------------------------
def _own_args() -> tuple[str, ...]:
    """This command line after `cprd`, without --restore-fd: what an in-place upgrade execs again."""
    args, out = sys.argv[1:], []
    skip = False
    for x in args:
        if skip:
            skip = False
        elif x == "--restore-fd":
            skip = True
        elif not x.startswith("--restore-fd="):
            out.append(x)
    return tuple(out)


def cmd_source(a: argparse.Namespace) -> int:
    if a.restore_fd is not None:
        from .daemon import restore_main

        return restore_main(a.restore_fd, _own_args())
    import trio

    from .daemon import serve_source
    from .paths import control_path

    return trio.run(lambda: serve_source(control_path(a.control), spec=a.populate, state_dir=a.state_dir,
                                         config=_config(a)))


def cmd_target(a: argparse.Namespace) -> int:
    if a.restore_fd is not None:
        from .daemon import restore_main

        return restore_main(a.restore_fd, _own_args())
    import trio

    from .daemon import serve_target

    return trio.run(lambda: serve_target(os.path.abspath(a.listen), config=_config(a)))


# -- ctl -------------------------------------------------------------------------------------
def _trust(a: argparse.Namespace) -> tuple[int, ...] | None:
    """--trust-uid values, or None to use CPRD_TRUST_UID."""
    from .client import env_trust_uids

    return (*env_trust_uids(), *_uid_list(a.trust_uid, "--trust-uid")) if a.trust_uid else None


def _client(a: argparse.Namespace, **kw: Any):
    from .client import Client

    return Client(a.control, trust_uids=_trust(a), **kw)


def _open_for_put(path: str, flags: str, create: bool) -> int:
    """Open path for `ctl put` without waiting (a FIFO with no writer, a device) and without making
    a file a typo names: only --create creates."""
    mode = FLAGS[flags]
    try:
        fd = os.open(path, mode | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        raise UsageError(f"cannot open {path}: no such file; check the path, or pass --create to create it") from None
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise UsageError(f"cannot open {path} for writing: it is a FIFO that nobody reads; open its read end "
                             "first, or store it with --flags r") from None
        raise UsageError(f"cannot open {path} ({flags}): {e.strerror}") from None
    # O_NONBLOCK only kept the open from waiting; the stored fd behaves as opened normally
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def cmd_put(a: argparse.Namespace) -> int:
    if (a.path is None) == (a.fd is None):
        raise UsageError("ctl put needs exactly one of --path FILE or --fd N")
    if a.path is None and (a.create or a.flags is not None):
        raise UsageError("--create and --flags go with --path; an inherited --fd is stored as it is")
    if a.path is not None:
        if a.create and (a.flags or "rw") == "r":
            raise UsageError("--create makes an empty file: open it for writing (--flags w, rw, a or ra)")
        fd = _open_for_put(a.path, a.flags or "rw", a.create)
    else:
        fd = a.fd
        try:
            os.fstat(fd)
        except OSError:
            raise UsageError(f"--fd {fd} is not an open fd of this process; pass one it inherited") from None
    try:
        with _client(a) as c:
            res = c.put(a.name, a.id, fd, replace=a.replace)
    finally:
        if a.path is not None:
            os.close(fd)
    _print(res, a.json, f"put ({res['name']!r}, {res['id']}) kind={res['kind']} fd={res['fd']}")
    return 0


def cmd_get(a: argparse.Namespace) -> int:
    cmd = None
    if a.exec is not None:
        cmd = a.exec[1:] if a.exec[:1] == ["--"] else a.exec
        if not cmd:
            raise UsageError("--exec needs a command to run with the fd, e.g. ctl get NAME ID --exec cat /dev/fd/3")
    with _client(a) as c:
        info, fd = c.get(a.name, a.id)
    if cmd:
        # Hand the fd over as systemd does: fd 3, LISTEN_FDS=1, LISTEN_FDNAMES, LISTEN_PID=our pid (exec keeps it).
        if fd != 3:
            os.dup2(fd, 3, inheritable=True)
            os.close(fd)
        else:
            os.set_inheritable(3, True)
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES=a.name, LISTEN_PID=str(os.getpid()))
        try:
            os.execvpe(cmd[0], cmd, env)
        except OSError as e:
            raise UsageError(f"cannot run {cmd[0]!r}: {e.strerror}") from None
    os.close(fd)
    _print(info, a.json, "\n".join(f"{k}: {_shown(v)}" for k, v in info.items()))
    return 0


def cmd_del(a: argparse.Namespace) -> int:
    with _client(a) as c:
        res = c.delete(a.name, a.id)
    _print(res, a.json, f"deleted ({a.name!r}, {a.id})")
    return 0


def cmd_share(a: argparse.Namespace) -> int:
    if (a.app is None) == (a.name is None):
        raise UsageError("share: give an entry (NAME ID) or a store (--app APP), not both")
    if a.app is None and a.id is None:
        raise UsageError("share: give the entry's NAME and ID")
    name, id_ = (f"fdstore/{a.app}", -1) if a.app is not None else (a.name, a.id)
    with _client(a) as c:
        res = c.share(name, id_, _uid_list(a.uid, "--uid"), _uid_list(a.gid, "--gid", group=True))
    shared = res.get("shared", {})
    _print(res, a.json, f"({name!r}, {id_}) of uid {res['owner']} may be read by uids {shared.get('uids', [])} "
                        f"and gids {shared.get('gids', [])}" if shared else f"({name!r}, {id_}) is shared with nobody")
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    with _client(a) as c:
        entries = c.ls()
    lines = [f"{'NAME':<24} {'ID':>11} {'KIND':<9} {'FD':>6} {'OWNER':>6}"]
    lines += [f"{_shown(e['name']):<24} {e['id']:>11} {e['kind']:<9} {e['fd']:>6} {e.get('owner', ''):>6}"
              + (" shared" if e.get("shared") else "") for e in entries]
    _print(entries, a.json, "\n".join(lines))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    with _client(a) as c:
        st = c.status()
    human = "\n".join(f"{k}: {v}" for k, v in st.items())
    _print(st, a.json, human)
    return 0


def cmd_handoff(a: argparse.Namespace) -> int:
    to = os.path.abspath(a.to)
    from .limits import unix_path_problem

    if (problem := unix_path_problem(to, "--to")) is not None:
        raise UsageError(f"{problem} (the target's --listen)")
    with _client(a) as c:
        res = c.handoff(to, batch=a.batch, window=a.window)
    human = (f"handed off {res['entries']} entries ({res['fds']} fds) to pid {res['target_pid']} in "
             f"{res['ms']:.1f} ms")
    _print(res, a.json, human)
    return 0


def cmd_upgrade(a: argparse.Namespace) -> int:
    if a.timeout is not None and not 0 < a.timeout <= 3600:
        raise UsageError(f"--timeout {a.timeout:g} must be more than 0 and at most 3600 seconds")
    # the answer comes once the new program took over, or from whoever keeps the table after a failure
    with _client(a, timeout=(a.timeout or 3600) + 60, retry_for=0) as c:
        res = c.upgrade(os.path.abspath(a.program) if a.program else None, a.timeout)
    if res["rolled_back"]:
        human = (f"upgrade did not take: {res['reason']}; pid {res['pid']} serves {res['entries']} entries with the "
                 "previous program")
    else:
        human = (f"upgraded in place: pid {res['pid']} serves {res['entries']} entries; no request served for "
                 f"{res['ms']:.1f} ms")
    _print(res, a.json, human)
    if res["rolled_back"] and not a.json:
        print(f"cprd: error: {human}", file=sys.stderr)
    return 1 if res["rolled_back"] else 0


def cmd_fdstore(a: argparse.Namespace) -> int:
    from .fdstore import check_app

    check_app(a.app)
    if a.clean + a.socket + a.remove > 1:
        raise UsageError("--clean, --remove and --socket do not go together")
    with _client(a) as c:
        if a.socket:
            info = c.fdstore(a.app, "socket")
            _print(info, a.json, info["socket"])
        elif a.clean:
            res = c.fdstore(a.app, "clean")
            _print(res, a.json, f"removed {res['removed']} fds from the store of {a.app}")
        elif a.remove:
            res = c.fdstore(a.app, "remove")
            _print(res, a.json, f"removed the store of {a.app} ({res['removed']} fds, its notify socket and names)")
        else:
            rows = c.fdstore(a.app, "list")
            lines = [f"{'FDNAME':<20} {'TYPE':<8} {'DEVNO':<7} {'INODE':>10} {'RDEVNO':<7} {'PATH':<30} FLAGS"]
            lines += [f"{_shown(r['fdname']):<20} {r['kind']:<8} {r['dev']:<7} {r['ino']:>10} {r['rdev'] or 'n/a':<7} "
                      f"{_shown(r['path']):<30} {r['access']}" for r in rows]
            if not a.json:
                served = c.status().get("fdstore", {}).get(a.app, {}).get("serve")
                lines += _generations(a.app, served)
            _print(rows, a.json, "\n".join(lines))
    return 0


def _generations(app: str, served: dict | None) -> list[str]:
    """The lines that show an app's `cprd serve` and its generations."""
    if not served:
        return []
    state = "serving" if served["alive"] else f"not heard from for {served['heard_s_ago']:.1f} s"
    out = [f"supervisor: cprd serve pid {served['pid']} ({state}), {served['restarts_done']} restarts"]
    for g in served["generations"]:
        age = time.time() - g["started"]
        out.append(f"  generation {g['gen']}: pid {g['pid']}, {g['state']}, started {age:.1f} s ago"
                   + ("" if g["ready"] else ", not ready"))
    return out


def cmd_restart(a: argparse.Namespace) -> int:
    """`cprd ctl restart APP`: ask APP's `cprd serve` for a new generation and wait for the outcome."""
    import uuid

    from .fdstore import check_app

    check_app(a.app)
    if not 0 < a.timeout <= 86400:
        raise UsageError(f"--timeout {a.timeout:g} must be more than 0 and at most 86400 seconds")
    rid = uuid.uuid4().hex[:16]
    deadline = time.monotonic() + a.timeout
    with _client(a) as c:
        asked = c.fdstore_restart(a.app, rid)
        while True:
            served = c.status().get("fdstore", {}).get(a.app, {}).get("serve") or {}
            res = next((r for r in served.get("results", []) if r.get("id") == rid), None)
            if res is not None:
                break
            if time.monotonic() > deadline:
                raise CprdError(f"cprd serve pid {asked['supervisor']} did not report the restart of {a.app} within "
                                f"{a.timeout:g} s (its --ready-timeout may be longer: pass a larger --timeout); "
                                f"`cprd ctl fdstore {a.app}` shows its generations")
            time.sleep(0.02)
    res = {"app": a.app, **res}
    if res["ok"]:
        human = f"restarted {a.app}: generation {res['gen']} (pid {res['pid']}) ready after {res['ms']:.0f} ms" + (
            f"; generation {res['retired']['gen']} (pid {res['retired']['pid']}) stops" if res.get("retired") else "")
    else:
        kept = res.get("serving")
        human = f"restart of {a.app} rolled back: {res['reason']}" + (
            f"; generation {kept['gen']} (pid {kept['pid']}) keeps serving" if kept else "")
    _print(res, a.json, human)
    if not res["ok"] and not a.json:
        print(f"cprd: error: {human}", file=sys.stderr)
    return 0 if res["ok"] else 1


def cmd_serve(a: argparse.Namespace) -> int:
    """`cprd serve --name APP [--listen NAME=SPEC]... -- CMD`: APP's supervisor, in the foreground."""
    import signal

    from . import listeners, serve
    from .fdstore import check_app

    check_app(a.name)
    cmd = _command(a, "serve")
    if not 0 < a.ready_timeout <= 3600 or not 0 <= a.drain <= 3600:
        raise UsageError("--ready-timeout must be in (0, 3600] and --drain in [0, 3600] seconds")
    try:
        sig = signal.Signals[a.stop_signal if a.stop_signal.startswith("SIG") else "SIG" + a.stop_signal.upper()]
    except KeyError:
        raise UsageError(f"--stop-signal {a.stop_signal!r} is not a signal name (TERM, QUIT, INT, ...)") from None
    o = serve.Options(app=a.name, cmd=cmd, listens=listeners.parse_all(a.listen), dialect=a.dialect,
                      replace=a.replace_listeners, fdstore_max=a.fdstore_max, ready=serve.parse_ready(a.ready),
                      ready_timeout=a.ready_timeout, stop_signal=sig, drain=a.drain, control=a.control,
                      trust_uids=_trust(a))
    return serve.main(o)


def _room_for(n: int) -> None:
    """Raise the soft fd limit so that n stored fds fit, as a service manager gives a service with
    a store the limit it needs; never past the hard limit (then: a clear error)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 3 + 64  # stdio, the fds (one more while they move to 3, 4, ...), room for the program
    if need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise CapacityError(f"the app's store holds {n} fds but this process may open at most {hard} (hard "
                            f"RLIMIT_NOFILE; with its own fds it takes {need}): raise it (ulimit -Hn, "
                            "LimitNOFILE=) or remove fds (cprd ctl fdstore APP --clean)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def cmd_run(a: argparse.Namespace) -> int:
    """`cprd run --name APP [--listen NAME=SPEC]... -- CMD`: CMD, in this very process, with APP's
    stored fds (its listeners made first when missing) where its dialect wants them, and the
    environment systemd gives a service with a fd store."""
    from . import launch, listeners
    from .fdstore import check_app

    check_app(a.name)
    cmd = _command(a, "run")
    listens = listeners.parse_all(a.listen)
    with _client(a) as c:
        _room_for(c.fdstore(a.name, "socket", a.fdstore_max)["fds"] + len(listens))
        g = launch.gather(c, a.name, listens, a.replace_listeners, a.fdstore_max)
    try:
        p = launch.plan(g, cmd, a.dialect, listens, dict(os.environ))
    except BaseException:
        g.close()
        raise
    if p.needs_pid:  # LISTEN_PID is ours: exec keeps the pid, so it is the program's
        p.env["LISTEN_PID"] = str(os.getpid())
    launch.place_here(p)
    try:
        os.execvpe(p.cmd[0], p.cmd, p.env)
    except OSError as e:
        if e.errno == errno.E2BIG:
            print(f"cprd: error: cannot run {p.cmd[0]!r}: its arguments and environment are too large "
                  f"(LISTEN_FDNAMES names {len(p.moves)} fds in {len(p.env.get('LISTEN_FDNAMES', ''))} bytes); "
                  "store fewer fds or use shorter FDNAME=s", file=sys.stderr)
        else:
            print(f"cprd: error: cannot run {p.cmd[0]!r}: {e.strerror}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126
    return 0  # not reached


def _command(a: argparse.Namespace, what: str) -> list[str]:
    from .fdstore import MAX_LIMIT

    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        raise UsageError(f"cprd {what} needs a command: cprd {what} --name APP -- CMD [ARG...]")
    if a.fdstore_max is not None and not 0 <= a.fdstore_max <= MAX_LIMIT:
        raise UsageError(f"--fdstore-max {a.fdstore_max} is outside 0..{MAX_LIMIT}")
    return cmd


def cmd_demo(a: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    return run_demo(fds=a.fds, as_json=a.json)


def cmd_stress(a: argparse.Namespace) -> int:
    from .tools import stress

    return stress.main(a)


def cmd_chaos(a: argparse.Namespace) -> int:
    from .tools import chaos

    return chaos.main(a)


def cmd_bench(a: argparse.Namespace) -> int:
    from .tools import bench

    return bench.main(a)


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cprd", description="Hand a live table of open fds from one process to "
                                "another, losing and duplicating none.")
    p.add_argument("--log-level", default=os.environ.get("CPRD_LOG", "info"),
                   help="debug, info, warning, error (default info; env CPRD_LOG)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def control_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--control", metavar="PATH",
                        help="control socket (default $CPRD_CONTROL, else $XDG_RUNTIME_DIR/cprd/control.sock, "
                             "/run/cprd/control.sock for root)")

    def daemon_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--allow-uid", action="append", metavar="UID",
                        help="let this uid (or user name) use the daemon besides its own uid and root (repeatable)")
        sp.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                        help="close a client connection after S seconds without a request (default 60)")
        sp.add_argument("--max-clients", type=int, default=256, metavar="N",
                        help="serve at most N client connections at once; more wait (default 256)")
        sp.add_argument("--queue-timeout", type=float, default=5.0, metavar="S",
                        help="with --max-clients busy, a client waits at most S seconds for one to end before it "
                             "is told Busy (default 5)")
        sp.add_argument("--upgrade-timeout", type=float, default=30.0, metavar="S",
                        help="a new program that has not asked to take over an in-place upgrade after S seconds is "
                             "killed and the stand-in keeps the table (default 30; ctl upgrade --timeout overrides)")
        sp.add_argument("--answer-timeout", type=float, default=1.0, metavar="S",
                        help="during an in-place upgrade, a process (the stand-in, the new program, the guardian) "
                             "that does not answer within S seconds is killed and the others go on without it "
                             "(default 1)")
        sp.add_argument("--uid-max-entries", type=int, metavar="N",
                        help="a uid other than the daemon's own and root may hold at most N entries, its fd stores' "
                             "included (default: an eighth of the table's capacity)")
        sp.add_argument("--uid-max-stores", type=int, metavar="N",
                        help="a uid other than the daemon's own and root may own at most N fd stores (default 16)")
        sp.add_argument("--reserve", type=int, metavar="N",
                        help="N entries of the table's capacity only the daemon's own user and root may use "
                             "(default: a quarter of it)")
        sp.add_argument("--standby", action="store_true",
                        help="keep a second process that holds a copy of every fd, is told of every change before "
                             "its client is answered, and takes over if the daemon dies (docs/standby.md)")
        sp.add_argument("--restore-fd", type=int, metavar="FD",
                        help="(used by an in-place upgrade) restore the daemon from the state in FD")

    s = sub.add_parser("source", help="own fds in a table and serve them on the control socket")
    control_opt(s)
    s.add_argument("--populate", default="", metavar="SPEC",
                   help="create real fds, e.g. files=500,eventfds=300,memfds=50,pipes=50,sockets=50,devices=10")
    s.add_argument("--state-dir", help="where --populate creates its files (default beside the control socket)")
    daemon_opts(s)
    s.set_defaults(func=cmd_source)

    t = sub.add_parser("target", help="wait for one handoff, then own and serve the table")
    t.add_argument("--listen", required=True, metavar="PATH", help="socket to receive the handoff on")
    daemon_opts(t)
    t.set_defaults(func=cmd_target)

    c = sub.add_parser("ctl", help="talk to a running daemon")
    csub = c.add_subparsers(dest="ctl", required=True, metavar="OP")

    def key(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("name")
        sp.add_argument("id", type=int)

    cp_ = csub.add_parser("put", help="store an fd (opened from --path, or inherited --fd)")
    key(cp_)
    cp_.add_argument("--path", help="open this file and store its fd")
    cp_.add_argument("--flags", choices=sorted(FLAGS), help="open mode for --path (default rw)")
    cp_.add_argument("--create", action="store_true", help="create --path (mode 0600) if it does not exist")
    cp_.add_argument("--fd", type=int, help="store this inherited fd")
    cp_.add_argument("--replace", action="store_true", help="replace an existing entry (its old fd is closed)")
    cp_.set_defaults(func=cmd_put)
    cg = csub.add_parser("get", help="show an entry, or run a command with its fd as fd 3 (--exec)")
    key(cg)
    cg.add_argument("--exec", nargs=argparse.REMAINDER, metavar="CMD",
                    help="run CMD with the fd as fd 3 and LISTEN_FDS=1, LISTEN_FDNAMES=NAME, LISTEN_PID")
    cg.set_defaults(func=cmd_get)
    cd = csub.add_parser("del", help="delete an entry (the daemon closes its fd)")
    key(cd)
    cd.set_defaults(func=cmd_del)
    csub.add_parser("ls", help="list entries (another uid sees its own and those shared with it)").set_defaults(
        func=cmd_ls)
    csh = csub.add_parser("share", help="let uids or gids read (get, list; never change) an entry or a store; "
                                        "replaces whom it was shared with (none: shared with nobody)")
    csh.add_argument("name", nargs="?")
    csh.add_argument("id", type=int, nargs="?")
    csh.add_argument("--app", help="share this app's fd store instead of an entry")
    csh.add_argument("--uid", action="append", metavar="UID", help="a uid or user name (repeatable)")
    csh.add_argument("--gid", action="append", metavar="GID", help="a gid or group name (repeatable)")
    csh.set_defaults(func=cmd_share)
    csub.add_parser("status", help="daemon status").set_defaults(func=cmd_status)
    ch = csub.add_parser("handoff", help="hand the whole table to a waiting `cprd target`")
    ch.add_argument("--to", required=True, metavar="PATH", help="the target's --listen socket")
    ch.add_argument("--batch", type=int, default=253, help="fds per message (1..253, default 253)")
    ch.add_argument("--window", type=int, default=4, help="batches in flight before an ack (default 4)")
    ch.set_defaults(func=cmd_handoff)
    cu = csub.add_parser("upgrade", help="replace the daemon's program in place (same PID, every fd kept)")
    cu.add_argument("--program", metavar="PATH",
                    help="the new program (default: the one running, i.e. the cprd now installed); it and its "
                         "directories must be writable only by the daemon's user or root")
    cu.add_argument("--timeout", type=float, metavar="S",
                    help="roll back if the new program has not confirmed after S seconds (default: the daemon's "
                         "--upgrade-timeout, 30)")
    cu.set_defaults(func=cmd_upgrade)
    cr = csub.add_parser("restart", help="ask an app's cprd serve for a new generation; prints whether it took "
                                         "(exit 0) or was rolled back (exit 1), with the reason")
    cr.add_argument("app", help="the app's name (as in cprd serve --name)")
    cr.add_argument("--timeout", type=float, default=300.0, metavar="S",
                    help="wait at most S seconds for the outcome (default 300)")
    cr.set_defaults(func=cmd_restart)
    for sp in csub.choices.values():
        control_opt(sp)
        sp.add_argument("--json", action="store_true", help="print JSON for scripts")
        sp.add_argument("--trust-uid", action="append", metavar="UID",
                        help="talk to a daemon running as this uid too (besides yours and root); repeatable. "
                             "Default: $CPRD_TRUST_UID")

    cf = csub.add_parser("fdstore", help="an app's fd store: list it (the columns of systemd-analyze fdstore), "
                                         "--clean or --remove it, or print its --socket (NOTIFY_SOCKET)")
    cf.add_argument("app", help="the app's name (as in cprd run --name)")
    cf.add_argument("--clean", action="store_true", help="close and remove every fd stored for the app")
    cf.add_argument("--remove", action="store_true",
                    help="remove the app's store altogether: its fds, its notify socket and its names")
    cf.add_argument("--socket", action="store_true",
                    help="print the app's NOTIFY_SOCKET path (made if missing): for a supervisor that starts the "
                         "program itself")
    cf.set_defaults(func=cmd_fdstore)
    control_opt(cf)
    cf.add_argument("--json", action="store_true", help="print JSON for scripts")
    cf.add_argument("--trust-uid", action="append", metavar="UID",
                    help="talk to a daemon running as this uid too (besides yours and root); repeatable")

    def launch_opts(r: argparse.ArgumentParser) -> None:
        r.add_argument("--name", required=True, metavar="APP", help="the app whose store to use (made if missing)")
        r.add_argument("--listen", action="append", default=[], metavar="NAME=SPEC",
                       help="a listener kept in the store under NAME, made (with your rights) if missing: "
                            "tcp:HOST:PORT, tcp:[V6]:PORT, udp:HOST:PORT or unix:/PATH, then options "
                            "backlog=N, reuseport, v6only=0|1, nodelay (tcp), mode=0660, owner=U, group=G; "
                            "repeatable")
        r.add_argument("--replace-listeners", action="store_true",
                       help="a stored listener that does not match its --listen is replaced by a new one "
                            "(default: an error)")
        r.add_argument("--dialect", default="systemd", choices=("systemd", "nginx", "stdin", "fds"),
                       help="how the program is told of its fds: systemd's LISTEN_FDS (default), nginx's "
                            "NGINX=\"3;4;\" (and LISTEN_FDS), the one listener as fd 0 (inetd's wait style), or "
                            "only by {fd:NAME} in its command (fds: no LISTEN_FDS, for a program that would take "
                            "them too, as gunicorn --bind fd://{fd:http} does). In every dialect {fd:NAME} in the "
                            "command becomes the fd number of NAME")
        r.add_argument("--fdstore-max", type=int, metavar="N",
                       help="the most fds the app may store (default 1024, or what it was set to before)")
        control_opt(r)
        r.add_argument("--trust-uid", action="append", metavar="UID",
                       help="talk to a daemon running as this uid too (besides yours and root); repeatable")

    r = sub.add_parser("run", help="run a program with its fd store: NOTIFY_SOCKET, and the fds it stored at 3, 4, "
                                   "... with LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID (systemd's protocol)")
    launch_opts(r)
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                   help="the program to run, in this process")
    r.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="supervise a program in generations over the same listeners: restart it "
                                      "(ctl restart APP, SIGHUP) without refusing a connection")
    launch_opts(sv)
    sv.add_argument("--ready", default="delay:1", metavar="MODE",
                    help="when a new generation is ready: notify (READY=1 from it on NOTIFY_SOCKET), delay:S "
                         "(S seconds after it started and did not exit), check:CMD (a shell command that exits "
                         "0); default delay:1")
    sv.add_argument("--ready-timeout", type=float, default=60.0, metavar="S",
                    help="a new generation not ready after S seconds is killed and the old one keeps serving "
                         "(default 60)")
    sv.add_argument("--stop-signal", default="TERM", metavar="SIG",
                    help="what tells the old generation to stop: TERM (default; gunicorn, uvicorn), QUIT (nginx), "
                         "INT (lighttpd) ...")
    sv.add_argument("--drain", type=float, default=30.0, metavar="S",
                    help="after its stop signal, the old generation has S seconds to finish; then SIGKILL for it "
                         "and all it forked (default 30)")
    sv.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]", help="the program")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="populate a source, hand it to a target, prove every fd survived")
    d.add_argument("--fds", type=int, default=1000, help="about how many fds (default 1000)")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(func=cmd_demo)

    st = sub.add_parser("stress", help="fd churn from concurrent clients across a chain of handoffs and in-place "
                                       "upgrades, model-checked")
    st.add_argument("--fds", type=int, default=1000, help="fds to populate the source with (default 1000)")
    st.add_argument("--rate", type=float, default=500, help="operations per second over all clients (default 500)")
    st.add_argument("--handoffs", type=int, default=3, help="handoffs along a chain of targets (default 3)")
    st.add_argument("--upgrades", type=int, default=0,
                    help="in-place upgrades of the owner, spread among the handoffs (default 0)")
    st.add_argument("--duration", type=float,
                    help="seconds of churn (default: handoffs + 1.5 x upgrades + 1, at least 2)")
    st.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    st.add_argument("--seed", type=int, default=1, help="random seed of the operation mix")
    st.add_argument("--control", metavar="PATH",
                    help="use the daemon running there instead of starting one (only keys stress/... are touched "
                         "and removed at the end; after handoffs the last target started serves the table)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_stress)

    ch = sub.add_parser("chaos", help="rounds of handoffs and in-place upgrades under churn, with random SIGKILLs and "
                                      "SIGSTOPs of every role; every acknowledged entry checked by kcmp")
    ch.add_argument("--rounds", type=int, default=20, help="rounds, each a move with one or two faults (default 20)")
    ch.add_argument("--seed", type=int, help="random seed (default: a new one, printed; reuse it to reproduce)")
    ch.add_argument("--fds", type=int, default=200, help="eventfds the first source holds (default 200)")
    ch.add_argument("--clients", type=int, default=3, help="concurrent clients churning (default 3)")
    ch.add_argument("--rate", type=float, default=100, help="requests per second of each client (default 100)")
    ch.add_argument("--standby", action="store_true",
                    help="instead: a daemon with --standby; each round SIGKILLs or SIGSTOPs the serving daemon and its "
                         "standby at random moments under churn (docs/standby.md)")
    ch.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs (their directory is printed)")
    ch.add_argument("--json", action="store_true", help="print one JSON object")
    ch.set_defaults(func=cmd_chaos)

    b = sub.add_parser("bench", help="benchmarks")
    from .tools import bench

    bench.add_parser(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _setup_logging(a.log_level)
    if a.cmd not in ("source", "target"):
        # demo, stress, bench and ctl start daemons or hold fds: let SIGTERM unwind them like Ctrl-C, so that
        # their cleanup (stopping the daemons they started, removing temporary directories) runs.
        import signal

        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if a.cmd in ("source", "target"):
            from . import fault
            from .fds import install_closer

            fault.check()  # a test's fault spec that names nothing known must not pass unnoticed
            install_closer()  # a daemon never closes what a client handed over on its serving thread
        return a.func(a)
    except UsageError as e:
        print(f"cprd: error: {e}", file=sys.stderr)
        return 2
    except CprdError as e:
        print(f"cprd: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # what the system refused (a file, a socket, a limit): say so, no traceback
        print(f"cprd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
