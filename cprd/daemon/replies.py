"""The answers a daemon gave to recent mutations, by request id: what makes a retried put or del
apply exactly once, across handoffs and upgrades.

Theory of operation
-------------------
A client gives every mutation a request id (rid) and sends it again, with the same rid, when the
connection broke before the answer came (a handoff, an upgrade). The daemon keeps its answer to
each of the RESULTS_KEPT most recent rids (least recently used goes first) and answers a retry
with it instead of applying the mutation again. The answers travel with the table: in Results
messages of a handoff (``since``: the ones given after a mark, in order) and in the state of an
upgrade (``items``).

What this module may know: plain data. Nothing of sockets, tables or trio.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

RESULTS_KEPT = 4096  # answers to recent mutations, by request id, kept for exactly-once retries


def well_formed(reply: object) -> bool:
    """Whether an answer handed on by another daemon looks like one we could give."""
    return isinstance(reply, dict) and isinstance(reply.get("ok"), bool) and (
        ("result" in reply) if reply["ok"] else isinstance(reply.get("error"), str)
        and isinstance(reply.get("message"), str))


class ReplyCache:
    __slots__ = ("_answers", "_log", "_base")

    def __init__(self) -> None:
        self._answers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._log: list[str] = []  # request ids in the order answered (for handing them on)
        self._base = 0  # position in that order of _log[0]

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, rid: str) -> dict[str, Any] | None:
        """The answer given to rid (now the most recently used), or None."""
        reply = self._answers.get(rid)
        if reply is not None:
            self._answers.move_to_end(rid)
        return reply

    def remember(self, rid: str, reply: dict[str, Any]) -> None:
        if not rid:
            return
        self._answers[rid] = reply
        self._log.append(rid)
        while len(self._answers) > RESULTS_KEPT:
            self._answers.popitem(last=False)
        if len(self._log) > 2 * RESULTS_KEPT:
            drop = len(self._log) - RESULTS_KEPT
            del self._log[:drop]
            self._base += drop

    def since(self, mark: int) -> tuple[list[tuple[str, object]], int]:
        """Answers remembered since `mark` (a position in the log of answers) and the next mark."""
        rids = self._log[max(0, mark - self._base):]
        out = [(rid, self._answers[rid]) for rid in dict.fromkeys(rids) if rid in self._answers]
        return out, self._base + len(self._log)

    def items(self) -> list[list]:
        """Every answer kept, least recently used first: [[rid, answer], ...]."""
        return [[rid, reply] for rid, reply in self._answers.items()]

    def take_from(self, pairs) -> int:
        """Remember what another daemon handed on (well-formed answers only); how many."""
        n = 0
        for rid, reply in pairs:
            if isinstance(rid, str) and well_formed(reply):
                self.remember(rid, reply)
                n += 1
        return n
