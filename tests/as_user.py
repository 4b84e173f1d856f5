"""Run `cprd ARGS...` as another user: `python tests/as_user.py USER ARGS...`.

The interpreter lives where an unprivileged user may not read (a root-only home), so this imports
everything cprd needs while still root, then drops to USER and runs the command line."""

import array  # noqa: F401
import ctypes  # noqa: F401
import grp  # noqa: F401
import hashlib  # noqa: F401
import json  # noqa: F401
import os
import pwd
import resource  # noqa: F401
import select  # noqa: F401
import statistics  # noqa: F401
import tempfile  # noqa: F401
import sys

import psutil  # noqa: F401
import trio  # noqa: F401

import cprd.tools.bench  # noqa: F401
import cprd.cli
import cprd.client  # noqa: F401
import cprd.daemon  # noqa: F401
import cprd.handoff  # noqa: F401
import cprd.kinds  # noqa: F401
import cprd.paths  # noqa: F401

user, argv = sys.argv[1], sys.argv[2:]
pw = pwd.getpwnam(user)
os.setgroups([])
os.setgid(pw.pw_gid)
os.setuid(pw.pw_uid)
sys.exit(cprd.cli.main(argv))
