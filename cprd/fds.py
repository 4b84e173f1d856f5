"""Ownership of raw fds that are in flight (not yet in a table).

An ``OwnedFds`` holds fds that nobody else will close. Leaving its ``with`` block closes every fd
it still holds; ``take()`` hands them on (to a table, or to a caller) and empties it. Every
place that receives fds from the kernel wraps them in one at once, so every error path closes
what it must.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class OwnedFds:
    __slots__ = ("fds",)

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self.fds: list[int] = list(fds)

    def __len__(self) -> int:
        return len(self.fds)

    def take(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        for fd in self.take():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> OwnedFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; every code path should close or take explicitly
        if self.fds:
            self.close()
