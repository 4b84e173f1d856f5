"""Shared test configuration.

Hypothesis runs a modest number of examples by default so the whole suite stays fast. For a long
fuzzing run set CPRD_FUZZ_EXAMPLES, for example::

    CPRD_FUZZ_EXAMPLES=20000 python -m pytest tests/unit/test_protocol.py tests/unit/test_table.py

What a test needs from the machine is declared with ``@pytest.mark.requires(FEATURE, ...)``
(FEATURES below: a tool, an optional extra, root). A test whose feature is missing is skipped
with a reason that says how to get it. In CI (the environment variable CI is set, as .ci/run
sets it) nothing may be missing: CI installs everything the tests need, so a missing feature
fails the test instead, and so does any other skip. The one exception is a feature CI leaves out
on purpose in one of its environments, named in CPRD_CI_WITHOUT (comma-separated): .ci/run runs
the suite once without the plot extra (README's install) and once with it but without a C
compiler (the pure-Python path).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable

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


# -- what tests need from the machine --------------------------------------------------------------
import pytest  # noqa: E402


def _speedups() -> bool:
    from cprd import handoff

    return handoff.speedups()


def _kcmp() -> bool:
    from helpers import kcmp_works

    return kcmp_works()


def _libsystemd() -> bool:
    import sd

    return sd.available()


def _python3_systemd() -> bool:
    import subprocess

    try:
        return subprocess.run(["/usr/bin/python3", "-c", "import systemd.daemon"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _freezer():
    from helpers import Freezer

    return Freezer.available()


def _tool(name: str) -> Callable[[], bool]:
    return lambda: shutil.which(name) is not None


APT = "install Debian's {} package (.ci/run does: apt-get install {})"

# feature -> (is it here?, how to get it)
FEATURES: dict[str, tuple[Callable[[], bool], str]] = {
    "plot": (lambda: importlib.util.find_spec("matplotlib") is not None,
             "matplotlib is not installed: pip install -e '.[test,plot]'"),
    "speedups": (_speedups, "the C speedup is not built (there was no C compiler when cprd was installed): "
                            "install gcc and the Python headers, then pip install -e '.[test]' again"),
    "cc": (_tool("cc"), "no C compiler (cc): " + APT.format("gcc", "gcc")),
    "kcmp": (_kcmp, "kcmp(KCMP_FILE) or pidfd_getfd is refused here (a seccomp profile, or no ptrace permission), "
                    "and only kcmp proves the same open file description of every kind: run where it is allowed"),
    "root": (lambda: os.geteuid() == 0, "needs root, to act as another uid (nobody)"),
    "cgroup-freezer": (lambda: _freezer() is not None,
                       "no cgroup freezer this process may use (cgroup v1's freezer or cgroup v2's cgroup.freeze, as "
                       "root): a frozen process is the fault it plays"),
    "wrk": (_tool("wrk"), "wrk is missing: " + APT.format("wrk", "wrk")),
    "nginx": (lambda: shutil.which("nginx") is not None or os.path.exists("/usr/sbin/nginx"),
              "nginx is missing: " + APT.format("nginx-light", "nginx-light")),
    "lighttpd": (lambda: shutil.which("lighttpd") is not None or os.path.exists("/usr/sbin/lighttpd"),
                 "lighttpd is missing: " + APT.format("lighttpd", "lighttpd")),
    "gunicorn": (lambda: importlib.util.find_spec("gunicorn") is not None,
                 "gunicorn is not installed: pip install -e '.[test]'"),
    "uvicorn": (lambda: importlib.util.find_spec("uvicorn") is not None,
                "uvicorn is not installed: pip install -e '.[test]'"),
    "strace": (_tool("strace"), "strace is missing: " + APT.format("strace", "strace")),
    "systemd-analyze": (_tool("systemd-analyze"), "systemd-analyze is missing: " + APT.format("systemd", "systemd")),
    "systemd-socket-activate": (_tool("systemd-socket-activate"),
                                "systemd-socket-activate is missing: " + APT.format("systemd", "systemd")),
    "systemd-notify": (_tool("systemd-notify"), "systemd-notify is missing: " + APT.format("systemd", "systemd")),
    "libsystemd": (_libsystemd, "libsystemd is missing: " + APT.format("libsystemd0", "libsystemd0")),
    "python3-systemd": (_python3_systemd, "python3-systemd (for /usr/bin/python3) is missing: "
                                          + APT.format("python3-systemd", "python3-systemd")),
}


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def ci_without() -> set[str]:
    """Features that this CI environment leaves out on purpose."""
    return {f.strip() for f in os.environ.get("CPRD_CI_WITHOUT", "").split(",") if f.strip()}


def has(feature: str) -> bool:
    return FEATURES[feature][0]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*features): what the test needs from the machine; one of "
                            + ", ".join(FEATURES))
    config.addinivalue_line("markers", "slow: a long stress- or benchmark-shaped test; `pytest -m 'not slow'` "
                            "leaves them out for a quick loop (CI runs everything)")
    unknown = ci_without() - set(FEATURES)
    if unknown:
        raise pytest.UsageError(f"CPRD_CI_WITHOUT names unknown features {sorted(unknown)}; known: "
                                f"{', '.join(FEATURES)}")


LEFT_OUT = pytest.StashKey[str]()  # the feature this environment leaves out that a test was skipped for


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        for feature in mark.args:
            if feature not in FEATURES:
                raise pytest.UsageError(f"{item.nodeid}: unknown feature {feature!r} in requires()")
            if has(feature):
                continue
            why = FEATURES[feature][1]
            if in_ci() and feature not in ci_without():
                pytest.fail(f"CI must provide {feature!r}: {why}", pytrace=False)
            item.stash[LEFT_OUT] = feature
            pytest.skip(why)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI a skip is a failure, unless it is the skip for a feature this environment leaves out
    (made by pytest_runtest_setup, for that feature): a skip from inside a test, for any other
    reason, fails even where some feature is left out."""
    outcome = yield
    rep = outcome.get_result()
    if not (in_ci() and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    allowed = rep.when == "setup" and item.stash.get(LEFT_OUT, None) in ci_without()
    if not allowed:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (f"skipped in CI ({reason}); CI installs everything the tests need, so a skip there "
                        "hides a missing step or a weaker proof")


# -- real daemons ---------------------------------------------------------------------------------
from helpers import FIRED, Cluster  # noqa: E402


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, when the whole suite ran, every fault point of cprd/fault.py must have fired in some
    test (the daemons log each one): a fault point no test reaches proves nothing."""
    from cprd.fault import STEPS

    o = session.config.option
    narrowed = any(getattr(o, k, None) for k in ("keyword", "markexpr", "lf", "exitfirst", "deselect"))
    whole = session.config.args in ([], ["tests"], [str(session.config.rootpath / "tests")]) and not narrowed
    if not (in_ci() and whole and session.testsfailed == 0 and session.testscollected):
        return
    missing = sorted({(side, step) for side, steps in STEPS.items() for step in steps} - FIRED)
    if missing:
        session.config.get_terminal_writer().line(f"fault points no test fired: {missing}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
