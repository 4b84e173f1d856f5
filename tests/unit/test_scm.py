"""scm.py with real sockets and real fds: what the kernel does at the edges of a connection."""

from __future__ import annotations

import os
import socket

import psutil
import pytest
import trio

from cprd import scm


def _peer_died_with_our_message_unread() -> socket.socket:
    """A connection whose peer queued three messages (an eventfd with each), then closed while a
    message of ours sat unread in its queue: the kernel reports ECONNRESET once, ahead of them."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for i in range(3):
        fd = os.eventfd(i)
        try:
            scm.send_sync(a, b"m%d" % i, [fd])
        finally:
            os.close(fd)
    scm.send_sync(b, b"ack")  # never read by a
    a.close()
    return b



def test_messages_queued_before_a_reset_are_still_received():
    b = _peer_died_with_our_message_unread()
    before = psutil.Process().num_fds()
    got = []
    with b:
        b.settimeout(5)
        with pytest.raises(scm.Closed):
            while True:
                data, fds = scm.recv_sync(b, 100, 1)
                got.append((data, fds.take()))
    assert [d for d, _ in got] == [b"m0", b"m1", b"m2"]
    for _, fds in got:
        assert len(fds) == 1
        os.close(fds[0])
    assert psutil.Process().num_fds() == before - 1  # only b itself is gone


async def test_messages_queued_before_a_reset_are_still_received_with_trio():
    b = trio.socket.from_stdlib_socket(_peer_died_with_our_message_unread())
    got = []
    with b:
        with trio.fail_after(5), pytest.raises(scm.Closed):
            while True:
                data, fds = await scm.recv(b, 100, 1)
                got.append(data)
                fds.close()
    assert got == [b"m0", b"m1", b"m2"]
