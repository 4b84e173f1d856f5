"""`--listen NAME=SPEC`, a listener's match against its spec, and what each dialect hands a program:
in-process, with real sockets."""

from __future__ import annotations

import os
import socket

import pytest

from cprd import launch, listeners
from cprd.errors import UsageError
from cprd.serve import parse_ready


def test_specs_parse_into_what_they_say():
    li = listeners.parse("http=tcp:127.0.0.1:8080,backlog=128,reuseport")
    assert (li.name, li.kind, li.host, li.port, li.backlog, li.reuseport) == ("http", "tcp", "127.0.0.1", 8080, 128,
                                                                              True)
    assert li.family == socket.AF_INET and li.spec == "tcp:127.0.0.1:8080"
    v6 = listeners.parse("h6=tcp:[::]:8443,v6only=0")
    assert (v6.host, v6.port, v6.v6only, v6.family) == ("::", 8443, False, socket.AF_INET6)
    assert v6.spec == "tcp:[::]:8443"
    u = listeners.parse("sock=unix:/run/app//http.sock,mode=0660,owner=root,group=0")
    assert (u.path, u.mode, u.owner, u.group) == ("/run/app/http.sock", 0o660, "root", "0")
    assert listeners.parse("dns=udp:0.0.0.0:5353").kind == "udp"


@pytest.mark.parametrize("text, says", [
    ("http", "NAME=SPEC"),
    ("http=", "NAME=SPEC"),
    ("a:b=tcp:127.0.0.1:1", "NAME"),
    ("http=sctp:127.0.0.1:1", "must be tcp:HOST:PORT"),
    ("http=tcp:localhost:80", "not an IP address"),
    ("http=tcp:127.0.0.1:70000", "over 65535"),
    ("http=tcp:127.0.0.1", "HOST:PORT"),
    ("http=tcp:::1:80", "HOST:PORT"),
    ("http=unix:relative.sock", "absolute"),
    ("http=unix:/" + "x" * 120, "107 bytes"),
    ("http=tcp:127.0.0.1:80,backlog=0", "backlog=N"),
    ("http=tcp:127.0.0.1:80,mode=0600", "not one of"),
    ("http=unix:/tmp/x.sock,v6only=1", "not one of"),
    ("dns=udp:127.0.0.1:53,backlog=5", "no backlog"),
])
def test_a_bad_spec_says_what_is_wrong(text, says):
    with pytest.raises(UsageError, match=says.replace("(", r"\(")):
        listeners.parse(text)


def test_one_name_twice_is_refused():
    with pytest.raises(UsageError, match="twice: http"):
        listeners.parse_all(["http=tcp:127.0.0.1:1", "http=tcp:127.0.0.1:2"])


def test_a_socket_made_matches_its_spec_and_no_other(tmp_path):
    li = listeners.parse("http=tcp:127.0.0.1:0")
    s = listeners.make(li)
    try:
        port = s.getsockname()[1]
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert listeners.mismatch(s.fileno(), li) is None  # port 0: any port matches
        assert listeners.mismatch(s.fileno(), listeners.parse(f"http=tcp:127.0.0.1:{port}")) is None
        assert "bound to" in listeners.mismatch(s.fileno(), listeners.parse(f"http=tcp:127.0.0.1:{port + 1}"))
        assert "reuseport" in listeners.mismatch(s.fileno(), listeners.parse(f"http=tcp:127.0.0.1:{port},reuseport"))
        assert "SOCK_STREAM" in listeners.mismatch(s.fileno(), listeners.parse(f"http=udp:127.0.0.1:{port}"))
    finally:
        s.close()
    path = str(tmp_path / "u.sock")
    u = listeners.make(listeners.parse(f"u=unix:{path},mode=0640"))
    try:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
        assert listeners.mismatch(u.fileno(), listeners.parse(f"u=unix:{path}")) is None
        os.unlink(path)
        assert "was removed" in listeners.mismatch(u.fileno(), listeners.parse(f"u=unix:{path}"))
    finally:
        u.close()
    r, w = os.pipe()
    try:
        assert "not a socket" in listeners.mismatch(r, listeners.parse("p=tcp:127.0.0.1:0"))
    finally:
        os.close(r)
        os.close(w)


def test_a_stale_socket_file_is_replaced_and_a_live_one_or_another_file_is_not(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a crash's leftover
    s = listeners.make(listeners.parse(f"s=unix:{path}"))
    try:
        with pytest.raises(UsageError, match="already listens"):
            listeners.make(listeners.parse(f"s=unix:{path}"))
    finally:
        s.close()
    other = tmp_path / "f"
    other.write_text("data")
    with pytest.raises(UsageError, match="not a socket"):
        listeners.make(listeners.parse(f"f=unix:{other}"))
    assert other.read_text() == "data"
    link = tmp_path / "l.sock"
    link.symlink_to(other)
    with pytest.raises(UsageError, match="not a socket"):
        listeners.make(listeners.parse(f"l=unix:{link}"))
    assert other.read_text() == "data" and link.is_symlink()


@pytest.mark.requires("root")
def test_a_unix_path_a_server_removed_is_made_again_from_its_second_name_and_only_from_ours(tmp_path):
    path = str(tmp_path / "s.sock")
    li = listeners.parse(f"s=unix:{path}")
    keep = listeners.kept_path(li)
    assert keep == str(tmp_path / ".s.sock.cprd")
    s = listeners.make(li)
    try:
        assert os.stat(keep).st_ino == os.stat(path).st_ino
        assert not listeners.restore(li), "nothing to do while the path is there"
        os.unlink(path)  # as nginx and gunicorn --bind fd:// do when they stop
        assert listeners.restore(li)
        assert os.stat(path).st_ino == os.stat(keep).st_ino
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(path)  # the very socket: it lands in its backlog
            conn, _ = s.accept()
            conn.close()
        # a second name that is not a socket file of ours is never linked at the path
        os.unlink(path)
        os.chown(keep, 65534, 65534)  # another user's
        assert not listeners.restore(li) and not os.path.lexists(path)
        os.chown(keep, os.geteuid(), os.getegid())
        os.rename(keep, keep + ".real")
        os.symlink(keep + ".real", keep)
        assert not listeners.restore(li) and not os.path.lexists(path)
    finally:
        s.close()
    # a new listener at the path gets a new second name: the old one's is replaced
    os.unlink(keep)
    os.rename(keep + ".real", keep)
    s = listeners.make(li)
    try:
        assert os.stat(keep).st_ino == os.stat(path).st_ino
    finally:
        s.close()


def test_an_address_in_use_says_so():
    li = listeners.parse("a=tcp:127.0.0.1:0")
    s = listeners.make(li)
    try:
        with pytest.raises(UsageError, match="in use"):
            listeners.make(listeners.parse(f"a=tcp:127.0.0.1:{s.getsockname()[1]}"))
    finally:
        s.close()


def _gathered(names: list[str]) -> launch.Gathered:
    socks = [listeners.make(listeners.parse(f"{n}=tcp:127.0.0.1:0")) if n.startswith("l") else None for n in names]
    fds = [s.detach() if s is not None else os.eventfd(0) for s in socks]
    return launch.Gathered({"socket": "/run/x/fdstore/app.sock", "max": 1024, "fdnames": names}, fds, list(names))


def test_each_dialect_hands_the_fds_and_variables_it_promises():
    g = _gathered(["state", "l1", "l2"])
    try:
        base = {"PATH": "/bin", "LISTEN_FDS": "9", "NGINX": "9;"}
        ls = [listeners.parse("l1=tcp:127.0.0.1:0"), listeners.parse("l2=tcp:127.0.0.1:0")]
        p = launch.plan(g, ["srv", "--fd", "{fd:l2}", "x{fd:state}y"], "systemd", ls, base)
        assert [n for _, n in p.moves] == [3, 4, 5] and [fd for fd, _ in p.moves] == g.fds
        assert p.cmd == ["srv", "--fd", "5", "x3y"] and p.needs_pid
        assert (p.env["LISTEN_FDS"], p.env["LISTEN_FDNAMES"], p.env["NOTIFY_SOCKET"], p.env["FDSTORE"]) == (
            "3", "state:l1:l2", "/run/x/fdstore/app.sock", "1024")
        assert "NGINX" not in p.env and p.env["PATH"] == "/bin"
        n = launch.plan(g, ["nginx"], "nginx", ls, base)
        assert n.env["NGINX"] == "4;5;" and n.env["LISTEN_FDS"] == "3"
        n = launch.plan(g, ["nginx"], "nginx", [], base)  # no --listen: every listening socket stored
        assert n.env["NGINX"] == "4;5;"
        f = launch.plan(g, ["gunicorn", "--bind", "fd://{fd:l1}"], "fds", ls, base)
        assert f.cmd[-1] == "fd://4" and [n for _, n in f.moves] == [3, 4, 5] and not f.needs_pid
        assert not {"LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"} & set(f.env), "told once, by its command"
        with pytest.raises(UsageError, match="exactly one"):
            launch.plan(g, ["inetd-prog"], "stdin", ls, base)
        s = launch.plan(g, ["inetd-prog", "{fd:l1}"], "stdin", ls[:1], base)
        assert s.moves == [(g.fds[1], 0)] and s.cmd == ["inetd-prog", "0"] and not s.needs_pid
        assert "LISTEN_FDS" not in s.env
        with pytest.raises(UsageError, match="names no stored fd.*add --listen nope"):
            launch.plan(g, ["srv", "{fd:nope}"], "systemd", ls, base)
        with pytest.raises(UsageError, match="not one of"):
            launch.plan(g, ["srv"], "inetd", ls, base)
    finally:
        g.close()


def test_a_name_stored_twice_cannot_be_substituted():
    g = _gathered(["l1", "l1"])
    try:
        with pytest.raises(UsageError, match="several stored fds"):
            launch.plan(g, ["srv", "{fd:l1}"], "systemd", [], {})
    finally:
        g.close()


def test_placing_moves_every_fd_where_it_goes_whatever_its_number():
    """place_here's algorithm (fds already sitting on each other's places) in a child, by /proc."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports by exit status)
        try:
            want = []
            a, b = os.pipe()  # whatever numbers they get, 3 and 4 are among the ones in use
            c = os.eventfd(0)
            fds = [c, b, a]
            idents = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
            p = launch.Plan([(fd, 3 + i) for i, fd in enumerate(fds)], {}, [], False)
            launch.place_here(p)
            want = [os.readlink(f"/proc/self/fd/{3 + i}") for i in range(3)]
            left = sorted(int(x) for x in os.listdir("/proc/self/fd"))
            ok = want == idents and [x for x in left if x > 2][:3] == [3, 4, 5] and all(
                os.get_inheritable(3 + i) for i in range(3))
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0


def test_readiness_modes_parse_and_a_bad_one_says_what_is_allowed():
    assert str(parse_ready("notify")) == "notify"
    assert parse_ready("delay:1.5").delay == 1.5
    assert parse_ready("check:curl -sf http://127.0.0.1:8080/health").check.startswith("curl")
    for bad in ("notify:1", "delay:x", "delay:-1", "delay:nan", "check:", "soon"):
        with pytest.raises(UsageError, match="notify .*delay:SECONDS.*check:COMMAND"):
            parse_ready(bad)


def test_nodelay_is_set_on_the_listener_and_applied_again_on_every_start():
    li = listeners.parse("http=tcp:127.0.0.1:0,nodelay")
    plain = listeners.make(listeners.parse("http=tcp:127.0.0.1:0"))
    try:
        assert not plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        listeners.relisten(plain.fileno(), li)  # a stored socket gets it at the next start, no new socket
        assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        plain.close()
    with pytest.raises(UsageError):
        listeners.parse("s=unix:/tmp/x.sock,nodelay")
