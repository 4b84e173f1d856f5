"""Run `cprd ARGS...` as another user: `python tests/as_user.py USER ARGS...`.

The interpreter lives where an unprivileged user may not read (a root-only home), so this imports
everything cprd needs while still root, then drops to USER and runs the command line."""

import array  # noqa: F401
import ctypes  # noqa: F401
import grp  # noqa: F401
import hashlib  # noqa: F401
import importlib
import json  # noqa: F401
import os
import pkgutil
import pwd
import resource  # noqa: F401
import select  # noqa: F401
import statistics  # noqa: F401
import tempfile  # noqa: F401
import sys

import psutil  # noqa: F401
import trio  # noqa: F401

import cprd
import cprd.cli

# Every module of cprd, so that a command importing one lazily finds it (the checkout may be unreadable too).
for module in pkgutil.walk_packages(cprd.__path__, "cprd."):
    if module.name != "cprd.__main__":
        try:
            importlib.import_module(module.name)
        except ImportError:  # the optional C module, absent on the pure-Python path
            pass

user, argv = sys.argv[1], sys.argv[2:]
pw = pwd.getpwnam(user)
os.setgroups([])
os.setgid(pw.pw_gid)
os.setuid(pw.pw_uid)
sys.exit(cprd.cli.main(argv))
