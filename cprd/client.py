"""The control client: what `cprd ctl`, the demo, the examples and applications use.

    with Client() as c:                 # $CPRD_CONTROL, or the default control path
        c.put("guest-ram", 0, fd)       # the daemon gets its own copy of fd
        info, fd2 = c.get("guest-ram", 0)
        c.status()["entries"]

    async with AsyncClient() as c:      # the same, for trio
        await c.put("guest-ram", 0, fd)

Every method raises the CprdError subclass the daemon reported, with its message.

Retries: once a client has reached a daemon, a request that gets no answer (the connection
closed or broke, the socket refused while a new owner takes over, or no answer within ATTEMPT_S
on this connection) is sent again on a new connection to the same path, for up to `retry_for`
seconds. That is what makes a handoff
invisible to clients: the old owner hangs up on requests it will not apply, the new one answers.
Mutations (put, del) carry a request id (`rid`); a daemon remembers its answers to recent ones
(and hands them on with the table), so a retried mutation is applied exactly once. Handoff and
upgrade requests are never retried. A connect that finds the daemon's listen backlog full
(EAGAIN: a burst of clients, or the moments of an upgrade) is tried again with backoff until
`retry_for` has passed, even for a first connection.

Trust: before anything is sent, the client checks with SO_PEERCRED who serves the socket. It
must run as the client's own user or as root, or as a uid named in `trust_uids` (CLI
``--trust-uid``, environment CPRD_TRUST_UID, comma-separated): an fd handed to a daemon is
handed to whoever runs it.

The status probe (``probe_status``, ``status_over``) is the one way any part of cprd asks a
control socket who serves it: a daemon asks it of its peer's socket during a handoff, and of a
socket it finds in its way at start.

What this module may know: the control protocol, sockets, paths' trust rules. Nothing of tables,
handoffs or the daemon.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from typing import Any

import trio

from . import scm
from .errors import ControlError, CprdError, UntrustedPeer, UsageError, reported_error
from .fds import OwnedFds
from .paths import connect_seqpacket, control_path, lane_of, lane_path, peer_cred, trusted_uids, user_name
from .protocol import control as cp

MUTATIONS = ("put", "del", "share")
RETRY_FOR = 30.0
ATTEMPT_S = 10.0  # a request that may be retried and has no answer by then is sent again on a new connection
ENV_TRUST = "CPRD_TRUST_UID"


def env_trust_uids() -> tuple[int, ...]:
    """The uids CPRD_TRUST_UID names (comma-separated numbers)."""
    out = []
    for v in os.environ.get(ENV_TRUST, "").split(","):
        if v.strip():
            try:
                out.append(int(v))
            except ValueError:
                raise UsageError(f"{ENV_TRUST}={os.environ[ENV_TRUST]!r}: expected comma-separated uids") from None
    return tuple(out)


class _Session:
    """State shared by the sync and async clients: request ids, trust, and the retry policy."""

    def __init__(self, path: str | None, timeout: float | None, retry_for: float,
                 trust_uids: tuple[int, ...] | None) -> None:
        self.path = control_path(path)
        self.addr = lane_of(self.path)  # where to connect: the control socket, or this uid's lane beside it
        self.timeout = timeout
        self.retry_for = retry_for
        self.trusted = trusted_uids() | set(env_trust_uids() if trust_uids is None else trust_uids)
        self._cid = uuid.uuid4().hex[:12]
        self._n = itertools.count(1)
        self._ever = False  # reached a daemon once: from then on, connection failures are retried
        self.retries = 0

    def prepare(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op in MUTATIONS and not args.get("rid"):
            args = {**args, "rid": f"{self._cid}-{next(self._n)}"}
        return args

    def attempt(self, op: str) -> float | None:
        """How long one attempt of `op` waits for its answer. A daemon that stopped answering on this
        connection (a stand-in frozen and fenced, which holds it until it is thawed) is judged by
        that: a request that may be retried goes again on a new connection, where the owner of the
        table answers (its request id makes a mutation apply once). Handoff and upgrade wait the
        whole timeout."""
        if self.timeout is None or op in ("handoff", "upgrade"):
            return self.timeout
        return min(self.timeout, ATTEMPT_S)

    def may_retry(self, op: str, deadline: float) -> bool:
        return op not in ("handoff", "upgrade") and self._ever and time.monotonic() < deadline

    def connect_error(self, e: OSError) -> ControlError:
        if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
            return ControlError(f"no cprd serves {self.path} ({e.strerror}); start one with `cprd source` or point "
                                "--control / CPRD_CONTROL at the right socket")
        if isinstance(e, PermissionError):
            return ControlError(f"cannot connect to {self.path}: permission denied. The control socket is the daemon's "
                                "user's and root's; another user has a socket of its own beside it "
                                f"({lane_path(self.path, os.geteuid())}) if the daemon's operator allows it with "
                                f"--allow-uid {os.geteuid()}")
        if isinstance(e, BlockingIOError):
            return ControlError(f"cannot connect to {self.path}: its listen backlog stayed full for "
                                f"{self.retry_for:g} s; the daemon is overloaded or hung")
        return ControlError(f"cannot connect to {self.path}: {e.strerror or e}")

    def check_peer(self, sock: socket.socket) -> None:
        """Refuse (before anything is sent) a socket served by a user we do not trust."""
        pid, uid, _ = peer_cred(sock)
        if uid not in self.trusted:
            raise UntrustedPeer(
                f"{self.path} is served by {user_name(uid)} (pid {pid}), not by you or root: another user may have "
                f"put a socket there. Nothing was sent. If you trust that user's daemon, pass --trust-uid {uid} "
                f"(or set {ENV_TRUST}={uid})")


RETRYABLE = (scm.Closed, ControlError, ConnectionError)


def _reply_of(reader: cp.ReplyReader, data: bytes, got: OwnedFds, fds_in: OwnedFds) -> dict | None:
    got.fds.extend(fds_in.take())
    return reader.feed(data)


def _result(reply: dict, got: OwnedFds) -> tuple[Any, OwnedFds]:
    if not reply.get("ok"):
        got.close()
        # the daemon's own answer (a full filesystem, a refusal): the user hears it at once, never retried
        raise reported_error(str(reply.get("error")), str(reply.get("message")))
    return reply.get("result"), got


def _request(sock: socket.socket, op: str, fds: list[int], args: dict[str, Any]) -> tuple[Any, OwnedFds]:
    try:
        return _exchange(sock, op, fds, args)
    except TimeoutError:
        raise ControlError(f"control {op}: no answer from the daemon within {sock.gettimeout():.0f} s; is it "
                           "hung? (`cprd ctl status` tells whether it serves at all)") from None


def _exchange(sock: socket.socket, op: str, fds: list[int], args: dict[str, Any]) -> tuple[Any, OwnedFds]:
    reader, got = cp.ReplyReader(), OwnedFds()
    try:
        try:
            scm.send_sync(sock, cp.encode_request(op, **args), fds, f"control {op}")
        except scm.Closed:
            # A daemon that refuses a connection (at its limits, or a uid it does not serve) answers
            # and closes without waiting for the request: its answer may be queued for us.
            got.close()
        while True:
            data, fds_in = scm.recv_sync(sock, cp.MAX_FRAME, scm.SCM_MAX_FD, f"control {op} reply")
            reply = _reply_of(reader, data, got, fds_in)
            if reply is not None:
                return _result(reply, got)
    except BaseException:
        got.close()
        raise


def status_over(sock: socket.socket) -> dict[str, Any]:
    result, fds = _request(sock, "status", [], {})
    fds.close()
    return result


async def probe_status(path: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The status of whoever serves the control socket at path, or None if nobody answers within
    timeout (no retries, no trust check: a daemon asks this of its peer's socket during a handoff,
    where only the pid in the answer matters)."""
    with trio.move_on_after(timeout):
        try:
            sock = await connect_seqpacket(path, timeout)
        except OSError:
            return None
        with sock:
            try:
                await scm.send(sock, cp.encode_request("status"), (), "status")
                reader = cp.ReplyReader()
                while True:
                    data, fds = await scm.recv(sock, cp.MAX_FRAME, 1, "status")
                    fds.close()
                    reply = reader.feed(data)
                    if reply is not None:
                        result = reply.get("result") if reply.get("ok") else None
                        return result if isinstance(result, dict) else None
            except (CprdError, OSError):
                return None
    return None


def describe_daemon(sock: socket.socket) -> str:
    """Who serves a connected control or handoff socket, in words (for a refusal to take its path)."""
    st = status_over(sock)
    return f"cprd pid {st['pid']} ({st.get('role', '?')})"


def _connect_sync(s: _Session) -> socket.socket:
    """A connected, trusted socket; a full backlog (EAGAIN) is retried with backoff until retry_for."""
    deadline, delay = time.monotonic() + s.retry_for, 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(s.timeout)
        try:
            sock.connect(s.addr)
            s.check_peer(sock)
            return sock
        except BlockingIOError as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise s.connect_error(e) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        except OSError as e:
            sock.close()
            raise s.connect_error(e) from None
        except BaseException:
            sock.close()
            raise


async def _connect_async(s: _Session) -> Any:
    """As _connect_sync, for trio."""
    try:
        sock = await connect_seqpacket(s.addr, s.retry_for)
    except OSError as e:
        raise s.connect_error(e) from None
    try:
        s.check_peer(sock)
    except BaseException:
        sock.close()
        raise
    return sock


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = 60.0, retry_for: float = RETRY_FOR,
                 trust_uids: tuple[int, ...] | None = None) -> None:
        self._s = _Session(path, timeout, retry_for, trust_uids)
        self._sock: socket.socket | None = None

    @property
    def path(self) -> str:
        return self._s.path

    @property
    def retries(self) -> int:
        return self._s.retries

    def connect(self) -> Client:
        self._sock = _connect_sync(self._s)
        self._s._ever = True
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, fds: list[int] | None = None, **args: Any) -> tuple[Any, OwnedFds]:
        """Send one request; returns (result, fds that came with the reply, owned by the caller)."""
        args = self._s.prepare(op, args)
        deadline, delay = time.monotonic() + self._s.retry_for, 0.002
        while True:
            try:
                if self._sock is None:
                    self.connect()
                assert self._sock is not None
                self._sock.settimeout(self._s.attempt(op))
                return _request(self._sock, op, list(fds or []), args)
            except RETRYABLE as e:
                self.close()
                if getattr(e, "reported", False) or not self._s.may_retry(op, deadline):
                    raise
                self._s.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _call(self, op: str, **args: Any) -> Any:
        result, fds = self.request(op, **args)
        fds.close()
        return result

    def put(self, name: str, id: int, fd: int, replace: bool = False) -> dict[str, Any]:
        """Store a copy of fd under (name, id). The caller keeps (and still owns) its own fd."""
        result, fds = self.request("put", [fd], name=name, id=id, replace=replace)
        fds.close()
        return result

    def get(self, name: str, id: int) -> tuple[dict[str, Any], int]:
        """The entry and a new fd for it (the caller owns and must close the fd)."""
        result, fds = self.request("get", name=name, id=id)
        return result, _one_fd(fds, name, id)

    def delete(self, name: str, id: int) -> dict[str, Any]:
        return self._call("del", name=name, id=id)

    def ls(self) -> list[dict[str, Any]]:
        return self._call("ls")

    def share(self, name: str, id: int, uids: list[int] = (), gids: list[int] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        """Let these uids and gids read the entry (a store: name "fdstore/APP", id -1), instead of
        those it was shared with; only its owner, the daemon's user and root may."""
        return self._call("share", name=name, id=id, uids=list(uids), gids=list(gids))

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def handoff(self, to: str, batch: int = 253, window: int = 4) -> dict[str, Any]:
        return self._call("handoff", to=to, batch=batch, window=window)

    def upgrade(self, program: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Upgrade the daemon in place (to `program`, an absolute path, or the cprd it runs); the new
        program (or whoever keeps the table: ``rolled_back``) answers. Never retried."""
        return self._call("upgrade", **_upgrade_args(program, timeout))

    def fdstore_open(self, app: str, max_fds: int | None = None) -> tuple[dict[str, Any], list[int]]:
        """The app's fd store (made if missing, with limit max_fds if given): its notify socket and
        limit, and a copy of each stored fd, newest first, with its name in result["fdnames"] (the
        caller owns and must close the fds)."""
        result, fds = self.request("fdstore", app=app, action="open", max=-1 if max_fds is None else max_fds)
        got = fds.take()
        if len(got) != len(result.get("fdnames", ())):
            for fd in got:
                os.close(fd)
            raise ControlError(f"fdstore {app}: the daemon sent {len(got)} fds for {len(result.get('fdnames', ()))} "
                               "names")
        return result, got

    def fdstore(self, app: str, action: str, max_fds: int | None = None) -> Any:
        """Another fd store action: socket (made if missing), list, clean."""
        return self._call("fdstore", app=app, action=action, max=-1 if max_fds is None else max_fds)

    def fdstore_restart(self, app: str, rid: str) -> dict[str, Any]:
        """Ask the app's `cprd serve` for a restart; its outcome shows up, under `rid`, in
        status()["fdstore"][app]["serve"]["results"]."""
        return self._call("fdstore", app=app, action="restart", report=rid)


def _one_fd(fds: OwnedFds, name: str, id: int) -> int:
    got = fds.take()
    if len(got) != 1:
        for fd in got:
            os.close(fd)
        raise ControlError(f"get ({name!r}, {id}): the daemon sent {len(got)} fds, expected 1")
    return got[0]


class AsyncClient:
    """The same client for trio programs (one request at a time per client)."""

    def __init__(self, path: str | None = None, timeout: float | None = 60.0, retry_for: float = RETRY_FOR,
                 trust_uids: tuple[int, ...] | None = None) -> None:
        self._s = _Session(path, timeout, retry_for, trust_uids)
        self._sock: Any = None

    @property
    def path(self) -> str:
        return self._s.path

    @property
    def retries(self) -> int:
        return self._s.retries

    async def connect(self) -> AsyncClient:
        self._sock = await _connect_async(self._s)
        self._s._ever = True
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> AsyncClient:
        return await self.connect() if self._sock is None else self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _once(self, op: str, fds: list[int], args: dict[str, Any]) -> tuple[Any, OwnedFds]:
        if self._sock is None:
            await self.connect()
        reader, got = cp.ReplyReader(), OwnedFds()
        try:
            try:
                await scm.send(self._sock, cp.encode_request(op, **args), fds, f"control {op}")
            except scm.Closed:  # refused at once: the daemon's answer may be queued for us (see _exchange)
                pass
            while True:
                data, fds_in = await scm.recv(self._sock, cp.MAX_FRAME, scm.SCM_MAX_FD, f"control {op} reply")
                reply = _reply_of(reader, data, got, fds_in)
                if reply is not None:
                    return _result(reply, got)
        except BaseException:
            got.close()
            raise

    async def request(self, op: str, fds: list[int] | None = None, **args: Any) -> tuple[Any, OwnedFds]:
        args = self._s.prepare(op, args)
        deadline, delay = time.monotonic() + self._s.retry_for, 0.002
        while True:
            try:
                attempt = self._s.attempt(op)
                if attempt is None:
                    return await self._once(op, list(fds or []), args)
                with trio.move_on_after(attempt):
                    return await self._once(op, list(fds or []), args)
                raise ControlError(f"control {op}: no answer from the daemon within {attempt:g} s; is it hung? "
                                   "(`cprd ctl status` tells whether it serves at all)")
            except RETRYABLE as e:
                self.close()
                if getattr(e, "reported", False) or not self._s.may_retry(op, deadline):
                    raise
                self._s.retries += 1
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
            except BaseException:
                self.close()  # a cancelled request leaves the connection mid-exchange
                raise

    async def _call(self, op: str, **args: Any) -> Any:
        result, fds = await self.request(op, **args)
        fds.close()
        return result

    async def put(self, name: str, id: int, fd: int, replace: bool = False) -> dict[str, Any]:
        result, fds = await self.request("put", [fd], name=name, id=id, replace=replace)
        fds.close()
        return result

    async def get(self, name: str, id: int) -> tuple[dict[str, Any], int]:
        result, fds = await self.request("get", name=name, id=id)
        return result, _one_fd(fds, name, id)

    async def delete(self, name: str, id: int) -> dict[str, Any]:
        return await self._call("del", name=name, id=id)

    async def ls(self) -> list[dict[str, Any]]:
        return await self._call("ls")

    async def share(self, name: str, id: int, uids: list[int] = (), gids: list[int] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        return await self._call("share", name=name, id=id, uids=list(uids), gids=list(gids))

    async def status(self) -> dict[str, Any]:
        return await self._call("status")

    async def handoff(self, to: str, batch: int = 253, window: int = 4) -> dict[str, Any]:
        return await self._call("handoff", to=to, batch=batch, window=window)

    async def upgrade(self, program: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        return await self._call("upgrade", **_upgrade_args(program, timeout))


def _upgrade_args(program: str | None, timeout: float | None) -> dict[str, Any]:
    args: dict[str, Any] = {"program": program or ""}
    if timeout is not None:
        args["timeout"] = timeout
    return args
