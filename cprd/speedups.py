"""Whether the optional C module (cprd/_speedups.c) is used: decided here, once, for every module.

``C`` is the module, or None: when the build found no compiler, or CPRD_NO_SPEEDUPS is set (to
compare with, or test, the pure-Python loops, which give the same answers and bytes). What it may
know: nothing but the import."""

from __future__ import annotations

import os
from types import ModuleType

C: ModuleType | None
try:
    if os.environ.get("CPRD_NO_SPEEDUPS"):
        raise ImportError
    from . import _speedups as C
except ImportError:
    C = None
