"""What a daemon is made of, built the same way whether it starts as a source, takes a table over
as a target, or is restored by an in-place upgrade.

Theory of operation
-------------------
``DaemonState`` holds the table, the listening control socket and where it lives, the role,
the configuration, the counters that status reports and the answers to recent mutations. Its
three constructors are the only places a daemon comes from: ``source`` (a fresh table),
``received`` (a table from a handoff: the source's answers, a salvage), ``restored`` (the state an
upgrade wrote, whose ``upgrade_state`` is the inverse). Everything a restart must keep goes
through ``upgrade_state``/``restored``.

What this module may know: the table, sockets as objects it holds, the upgrade state's fields.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..paths import file_id, trusted_uids
from ..protocol.upgrade import Deadlines, StateEntry, UpgradeState
from ..table import FdTable
from .replies import ReplyCache


@dataclass(slots=True, frozen=True)
class Config:
    allow_uids: tuple[int, ...] = ()
    idle_timeout: float = 60.0
    max_clients: int = 256
    queue_timeout: float = 5.0  # how long clients wait in the backlog for a free slot before Busy
    upgrade_timeout: float = 30.0  # a new program that has not asked to take over by then is fenced
    answer_timeout: float = 1.0  # a peer of an upgrade that has not answered by then is fenced
    uid_max_entries: int | None = None  # quotas of the other uids (None: access.Quota's defaults)
    uid_max_stores: int | None = None
    reserve: int | None = None
    own_args: tuple[str, ...] = ()  # the command line after `cprd`, to exec again on an upgrade
    standby: bool = False  # keep a standby (daemon/standby.py)

    def describe(self) -> dict[str, Any]:
        """What an upgrade hands on (own_args come from the new program's own command line)."""
        return {"allow_uids": list(self.allow_uids), "idle_timeout": self.idle_timeout,
                "max_clients": self.max_clients, "queue_timeout": self.queue_timeout,
                "upgrade_timeout": self.upgrade_timeout, "answer_timeout": self.answer_timeout,
                "uid_max_entries": self.uid_max_entries, "uid_max_stores": self.uid_max_stores,
                "reserve": self.reserve, "standby": self.standby}

    @classmethod
    def from_state(cls, cfg: dict[str, Any], own_args: tuple[str, ...]) -> Config:
        d = cls()
        return cls(allow_uids=tuple(cfg.get("allow_uids", ())), idle_timeout=cfg.get("idle_timeout", d.idle_timeout),
                   max_clients=cfg.get("max_clients", d.max_clients),
                   queue_timeout=cfg.get("queue_timeout", d.queue_timeout),
                   upgrade_timeout=cfg.get("upgrade_timeout", d.upgrade_timeout),
                   answer_timeout=cfg.get("answer_timeout", d.answer_timeout),
                   uid_max_entries=cfg.get("uid_max_entries"), uid_max_stores=cfg.get("uid_max_stores"),
                   reserve=cfg.get("reserve"), own_args=own_args, standby=bool(cfg.get("standby", False)))


@dataclass(slots=True)
class DaemonState:
    role: str  # "source" or "target"
    table: FdTable
    listener: socket.socket
    control_path: str
    control_fid: tuple[int, int] | None  # our socket file, removed at exit; None: not ours to remove
    config: Config
    handoffs: int = 0  # tables received by handoff (status: handoffs_received)
    upgrades: int = 0
    salvage: dict | None = None
    source_died: bool = False
    replies: ReplyCache = field(default_factory=ReplyCache)
    started: float = field(default_factory=time.time)
    stream: Any = None  # an upgrade's stand-in: its journal to the new program (standin.Stream)

    def answered(self, rid: str, reply: dict[str, Any]) -> None:
        """A mutation was answered (or failed): remember the answer for retries, and in a stand-in
        send it with the change to the new program before the client hears it."""
        self.replies.remember(rid, reply)
        if self.stream is not None:
            self.stream.answer(rid, reply)
            self.stream.flush()

    def flush(self) -> None:
        """In a stand-in: send the table's changes so far to the new program (before anyone is told
        of them). Elsewhere nothing."""
        if self.stream is not None:
            self.stream.flush()

    @property
    def allowed_uids(self) -> set[int]:
        return trusted_uids() | set(self.config.allow_uids)

    # -- the three ways a daemon comes about --------------------------------------------------
    @classmethod
    def source(cls, table: FdTable, listener: socket.socket, control_path: str, config: Config,
               socket_activated: bool = False) -> DaemonState:
        return cls("source", table, listener, control_path, None if socket_activated else file_id(control_path),
                   config)

    @classmethod
    def received(cls, received: Any, listener: socket.socket, config: Config) -> DaemonState:
        """From a handoff (handoff.Received): the source's answers to recent mutations come along, so
        that a client retrying at us gets the source's answer."""
        control = received.hello.control_path
        st = cls("target", received.table, listener, control, file_id(control), config, handoffs=1,
                 salvage=received.salvage.describe() if received.salvage else None,
                 source_died=not received.committed)
        st.replies.take_from(received.results)
        return st

    @classmethod
    def restored(cls, state: UpgradeState, table: FdTable, listener: socket.socket,
                 own_args: tuple[str, ...]) -> DaemonState:
        """From the state an in-place upgrade wrote (see upgrade_state)."""
        st = cls(state.role, table, listener, state.control_path, state.control_fid,
                 Config.from_state(state.config, own_args), handoffs=state.handoffs,
                 upgrades=state.upgrades + (0 if state.rolled_back or state.mode == "standby" else 1),
                 salvage=state.salvage, source_died=state.source_died)
        st.replies.take_from(state.results)
        return st

    def upgrade_state(self, t_freeze_ms: float, requester_fd: int | None, deadlines: Deadlines) -> UpgradeState:
        """What the new program of an in-place upgrade restores from (docs/protocol.md 6.2); the
        upgrade fills in the programs, the stand-in and the guardian."""
        return UpgradeState(
            cprd_state=0, previous=[], env={}, crossing=None, argv_new=[], role=self.role,
            control_path=self.control_path, control_fid=self.control_fid, listener_fd=self.listener.fileno(),
            requester_fd=requester_fd, entries=[StateEntry(e.name, e.id, e.fd, e.ident) for e in self.table],
            results=self.replies.items(), config=self.config.describe(), pid=os.getpid(), t_freeze_ms=t_freeze_ms,
            deadlines=deadlines, handoffs=self.handoffs, upgrades=self.upgrades, salvage=self.salvage,
            source_died=self.source_died)
