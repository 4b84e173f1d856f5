"""The control client: what `cprd ctl`, the demo, the examples and applications use.

    with Client() as c:                 # $CPRD_CONTROL, or the default control path
        c.put("guest-ram", 0, fd)       # the daemon gets its own copy of fd
        info, fd2 = c.get("guest-ram", 0)
        c.status()["entries"]

Every method raises the CprdError subclass the daemon reported, with its message.
"""

from __future__ import annotations

import socket
from typing import Any

from . import scm
from .errors import ControlError, error_from_code
from .fds import OwnedFds
from .paths import control_path
from .protocol import control as cp


def _request(sock: socket.socket, op: str, fds: list[int], args: dict[str, Any]) -> tuple[Any, OwnedFds]:
    scm.send_sync(sock, cp.encode_request(op, **args), fds, f"control {op}")
    reader = cp.ReplyReader()
    got = OwnedFds()
    try:
        while True:
            data, fds_in = scm.recv_sync(sock, cp.MAX_FRAME, 1, f"control {op} reply")
            got.fds.extend(fds_in.take())
            reply = reader.feed(data)
            if reply is not None:
                break
    except BaseException:
        got.close()
        raise
    if not reply.get("ok"):
        got.close()
        raise error_from_code(str(reply.get("error")), str(reply.get("message")))
    return reply.get("result"), got


def status_over(sock: socket.socket) -> dict[str, Any]:
    result, fds = _request(sock, "status", [], {})
    fds.close()
    return result


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = 60.0) -> None:
        self.path = control_path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def connect(self) -> Client:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise ControlError(f"no cprd serves {self.path} ({e.strerror}); start one with `cprd source` or point "
                               "--control / CPRD_CONTROL at the right socket") from None
        except OSError as e:
            s.close()
            raise ControlError(f"cannot connect to {self.path}: {e.strerror}") from None
        self._sock = s
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
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        return _request(self._sock, op, list(fds or []), args)

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
        got = fds.take()
        if len(got) != 1:
            for fd in got:
                import os

                os.close(fd)
            raise ControlError(f"get ({name!r}, {id}): the daemon sent {len(got)} fds, expected 1")
        return result, got[0]

    def delete(self, name: str, id: int) -> dict[str, Any]:
        return self._call("del", name=name, id=id)

    def ls(self) -> list[dict[str, Any]]:
        return self._call("ls")

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def handoff(self, to: str, batch: int = 253, window: int = 4) -> dict[str, Any]:
        return self._call("handoff", to=to, batch=batch, window=window)
