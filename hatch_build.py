"""Build hook: compile the optional C speedup (cprd/_speedups.c) when a C compiler is there.

cprd is pure Python; the extension only makes a handoff's hot loops cheaper (checking, building
and verifying the entries of a batch; encoding them; verifying on a helper thread). If the
compiler or the Python headers are missing, the build goes on without it and cprd uses its
pure-Python loops (same checks, same bytes, slower).

The compiler is $CC when set (as with any C build), else the one Python was built with, else
`cc`. CPRD_NO_SPEEDUPS=1 skips the build. Whenever the module is not built, a copy left in the
source tree by an earlier build is removed, so that an editable install never imports a module
compiled from another version of _speedups.c."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC", "")) or (sysconfig.get_config_var("CC") or "cc").split()
    if "CC" not in os.environ and not shutil.which(cc[0]):
        cc = ["cc"]
    return cc


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        src = os.path.join(self.root, "cprd", "_speedups.c")
        out = os.path.join(self.root, "cprd", "_speedups" + sysconfig.get_config_var("EXT_SUFFIX"))
        if os.environ.get("CPRD_NO_SPEEDUPS"):
            self._forget(out)
            return
        cmd = [*_compiler(), "-shared", "-fPIC", "-O2", "-Wall", "-pthread",
               f"-I{sysconfig.get_paths()['include']}", src, "-o", out]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            self._forget(out)
            self.app.display_warning(f"cprd: C speedup not built, using pure Python ({detail.strip()[:300]})")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][out] = f"cprd/{os.path.basename(out)}"

    @staticmethod
    def _forget(out: str) -> None:
        try:
            os.unlink(out)
        except FileNotFoundError:
            pass
