"""Shared test configuration.

Hypothesis runs a modest number of examples by default so the whole suite stays fast. For a long
fuzzing run set CPRD_FUZZ_EXAMPLES, for example::

    CPRD_FUZZ_EXAMPLES=20000 python -m pytest tests/test_protocol.py tests/test_table.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_DEFAULT_EXAMPLES = 200

settings.register_profile(
    "cprd",
    max_examples=_DEFAULT_EXAMPLES,
    deadline=None,  # a shared machine makes per-example timing meaningless
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "cprd-fuzz",
    parent=settings.get_profile("cprd"),
    max_examples=int(os.environ.get("CPRD_FUZZ_EXAMPLES") or _DEFAULT_EXAMPLES),
)
settings.load_profile("cprd-fuzz" if os.environ.get("CPRD_FUZZ_EXAMPLES") else "cprd")


# -- real daemons ---------------------------------------------------------------------------------
import pytest  # noqa: E402

from helpers import Cluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    """Start daemons with cluster.source()/cluster.target(); all are stopped at teardown, and no
    child process may outlive the test."""
    import psutil

    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
        left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"child processes left behind: {left}"
