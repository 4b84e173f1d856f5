"""Sockets whose last close blocks, for `cprd bench close` and the tests: a loopback TCP connection
with unsent data, a peer that never reads, and SO_LINGER {1, linger}: close() of the last reference
waits until the data is sent or linger seconds pass. Closing the peer ends the wait."""

from __future__ import annotations

import socket
import struct


class Lingering:
    """Makes such sockets; holds their peers until closed (``close``)."""

    def __init__(self, backlog: int = 64) -> None:
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the peers' windows stay small
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(backlog)
        self.peers: list[socket.socket] = []

    def make(self, linger_s: int) -> int:
        """A new such socket's fd (the caller owns it)."""
        s = socket.create_connection(self.srv.getsockname())
        self.peers.append(self.srv.accept()[0])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, linger_s))
        s.setblocking(False)
        try:
            while True:
                s.send(b"x" * 65536)
        except BlockingIOError:
            pass
        return s.detach()

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.peers = []
        self.srv.close()
