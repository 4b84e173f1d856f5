"""Build hook: compile the optional C speedup (cprd/_speedups.c) when a C compiler is there.

cprd is pure Python; the extension only makes a handoff's hot loops cheaper (checking, building
and verifying the entries of a batch; encoding them; verifying on a helper thread). If the
compiler or the Python headers are missing, the build goes on without it and cprd uses its
pure-Python loops (same checks, same bytes, slower)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if os.environ.get("CPRD_NO_SPEEDUPS"):
            return
        src = os.path.join(self.root, "cprd", "_speedups.c")
        out = os.path.join(self.root, "cprd", "_speedups" + sysconfig.get_config_var("EXT_SUFFIX"))
        cc = (sysconfig.get_config_var("CC") or "cc").split()
        if not shutil.which(cc[0]):
            cc = ["cc"]
        cmd = [*cc, "-shared", "-fPIC", "-O2", "-Wall", "-pthread", f"-I{sysconfig.get_paths()['include']}", src, "-o", out]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            self.app.display_warning(f"cprd: C speedup not built, using pure Python ({detail.strip()[:300]})")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][out] = f"cprd/{os.path.basename(out)}"
