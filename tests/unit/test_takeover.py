"""The new program's take-over driver (cprd/daemon/takeover.py) against a scripted stand-in and
guardian on real socket pairs, in-process: journal messages in separate wake-ups, a Done with the
wrong count, a stand-in or guardian that never answers (fenced: here, no process to kill, so the
driver goes on at its deadline)."""

from __future__ import annotations

import os
import socket

import trio

from cprd.daemon.takeover import take_over
from cprd.kinds import classify
from cprd.protocol import upgrade as pu
from cprd.protocol.upgrade import Deadlines, Msg, Standin, UpgradeState
from cprd.table import FdTable

import pytest


def _state(journal_fd: int, link_fd: int | None) -> UpgradeState:
    return UpgradeState(cprd_state=3, previous=[], env={}, crossing=None, argv_new=[], role="source",
                        control_path="/nonexistent", control_fid=None, listener_fd=-1, requester_fd=None,
                        entries=[], results=[], config={}, pid=os.getpid(), t_freeze_ms=0.0,
                        deadlines=Deadlines(start_s=5, answer_s=0.3, fence_s=0.1),
                        standin=Standin(0, journal_fd), guardian_fd=link_fd, guardian_pid=None)


def _save(name: str, i: int) -> tuple[bytes, int]:
    fd = os.eventfd(i)
    return pu.encode_journal([pu.save_op(name, i, classify(fd))], [[f"rid-{i}", {"ok": True}]]), fd


def _send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(__import__("array").array("i", fds))))] if fds \
        else []
    sock.sendmsg([data], anc)


async def _standin(sock: socket.socket, script: str) -> list[bytes]:
    """Plays the stand-in: waits for T, sends J messages one by one (each in a wake-up of its own),
    then D (with a count from the script), waits for K and sends B (unless told to go silent)."""
    got = []
    sock.setblocking(False)
    ts = trio.socket.from_stdlib_socket(sock)
    got.append(await ts.recv(16))  # T
    n = 1  # the one queued before the new program started
    for i in range(3):
        data, fd = _save("late", i)
        _send(sock, data, [fd])
        os.close(fd)
        n += 1
        await trio.sleep(0.02)
    if script == "silent-after-T":
        await trio.sleep(10)
        return got
    _send(sock, pu.encode_done(n + (1 if script == "hole" else 0)))
    with trio.move_on_after(2):
        got.append(await ts.recv(16))  # K
    if script == "silent-after-K":
        await trio.sleep(10)
        return got
    _send(sock, Msg.RELEASED.value)
    return got


async def _guardian(sock: socket.socket, answer: bool) -> None:
    sock.setblocking(False)
    ts = trio.socket.from_stdlib_socket(sock)
    with trio.move_on_after(5):
        if await ts.recv(16) == Msg.CONFIRM and answer:
            await ts.send(Msg.CONFIRMED.value)
        await trio.sleep(10)


@pytest.mark.parametrize("script", ["normal", "silent-after-T", "silent-after-K", "hole", "silent-guardian"])
async def test_the_new_program_takes_over_whatever_its_peers_do(script):
    jp, jc = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lp, lg = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    first, fd = _save("early", 0)  # queued before the new program starts
    _send(jc, first, [fd])
    os.close(fd)
    table = FdTable()
    try:
        async with trio.open_nursery() as n:
            n.start_soon(_standin, jc, script)
            n.start_soon(_guardian, lg, script != "silent-guardian")
            if script == "hole":
                with pytest.raises(pu.UpgradeError, match="hole"):
                    await take_over(table, _state(jp.detach(), lp.detach()))
            else:
                t0 = trio.current_time()
                took = await take_over(table, _state(jp.detach(), lp.detach()))
                assert trio.current_time() - t0 < 2, "every wait had its deadline"
                assert sorted((e.name, e.id) for e in table) == [("early", 0), ("late", 0), ("late", 1), ("late", 2)]
                assert took.messages == 4 and len(took.answers) == 4
                assert took.handed_over is (script != "silent-after-T")
            n.cancel_scope.cancel()
    finally:
        table.close_all()
        for s in (jc, lg):
            s.close()
