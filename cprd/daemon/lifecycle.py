"""A daemon's lifecycle: the phases it goes through and the only transitions allowed between them.

Theory of operation
-------------------
::

    serving --handoff--> handing-off --committed--> handed-off   (then it exits 0)
       ^                      |
       +------failed----------+
    serving --upgrade--> upgrading --fork+exec--> (the new program, serving once it took over)
       ^                    |      \
       +--nothing forked----+       `--fork--> standing-in (the stand-in) --taken over--> handed-off
                                                   |                                       (it exits 0)
                                                   +--the new program failed--> serving (it keeps the table)

While it hands off or upgrades, the daemon *freezes* mutations for the last moments (a handoff's
last delta and commit; a stand-in's hand-over to the new program): a put or del waits until ``thaw``, and then finds the
daemon serving again (a failed handoff or upgrade: it is applied) or handed off (it is not: its
client retries at the new owner). A stand-in that has sent its last changes freezes every
request, reads too (``freeze(everything=True)``): the new program may already serve, and an old
connection must not read the table as it was. ``committing`` is set when the listening socket is
about to travel with the Commit: from then on the daemon never removes its socket file.

What this module may know: trio events. Nothing of sockets or tables.
"""

from __future__ import annotations

from enum import Enum

import trio


class Phase(Enum):
    SERVING = "serving"
    HANDING_OFF = "handing-off"
    HANDED_OFF = "handed-off"
    UPGRADING = "upgrading"
    STANDING_IN = "standing-in"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.SERVING: frozenset({Phase.HANDING_OFF, Phase.UPGRADING}),
    Phase.HANDING_OFF: frozenset({Phase.SERVING, Phase.HANDED_OFF}),
    # the old program: nothing was forked (SERVING again), or the fork and exec (this program is gone);
    # the stand-in, forked from it: STANDING_IN
    Phase.UPGRADING: frozenset({Phase.SERVING, Phase.STANDING_IN}),
    Phase.STANDING_IN: frozenset({Phase.HANDED_OFF, Phase.SERVING}),  # taken over, or the new program failed
    Phase.HANDED_OFF: frozenset(),
}


class Lifecycle:
    __slots__ = ("phase", "committing", "_frozen", "_everything")

    def __init__(self) -> None:
        self.phase = Phase.SERVING
        self.committing = False  # the listening socket is (about to be) the target's: never unlink its path
        self._frozen: trio.Event | None = None
        self._everything = False

    def to(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"lifecycle: {self.phase.value} -> {phase.value} is not a transition")
        self.phase = phase

    @property
    def handed_off(self) -> bool:
        return self.phase is Phase.HANDED_OFF

    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    @property
    def frozen_for_all(self) -> bool:
        """Every request waits, reads too."""
        return self._frozen is not None and self._everything

    def freeze(self, everything: bool = False) -> None:
        """Mutations wait from now on (until thaw); with `everything`, every request does."""
        if self._frozen is None:
            self._frozen = trio.Event()
        self._everything = self._everything or everything

    def thaw(self) -> None:
        self._everything = False
        if self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            frozen.set()

    async def until_thawed(self) -> None:
        while self._frozen is not None:
            await self._frozen.wait()
