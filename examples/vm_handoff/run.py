"""A VM's memory and devices survive a change of VMM process and a change of cprd process.

    python examples/vm_handoff/run.py [--devices 2] [--ram-mb 16] [--ticks 2000]

1. A `cprd source` starts in a private temporary directory.
2. vmm.py boot: creates guest RAM (a memfd) and vfio-like devices (region memfd, command channel,
   irq eventfds), stores all their fds in cprd under (name, id), runs the guest (a counter in guest
   RAM, one irq per tick), posts a command on each device's channel, pauses and exits. From now on
   the guest exists only as fds held by cprd.
3. vmm.py resume: a NEW VMM process starts and waits.
4. A `cprd target` takes over the whole table from the source (handoff); the source exits.
5. The new VMM finds every fd by (name, id) with cprd.client.Client.get (its connection to the
   old cprd broke: the client retries at the new one), maps the same guest RAM, checks the headers,
   the counter, the RAM contents, the pending irqs and the queued commands, and continues the
   guest's counter where it stopped.
6. The runner checks, with its own copies of the fds from cprd, the final counter and irqs.

It prints the counter before and after, the irq counts, and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from cprd.client import Client
from cprd.errors import CprdError
from cprd.populate import DEVICE_IRQ_BASE, DEVICE_IRQS
from cprd.tools.proof import fdinfo
from cprd.tools.procs import spawn, stop, wait_for_socket

HERE = os.path.dirname(os.path.abspath(__file__))
VMM = os.path.join(HERE, "vmm.py")


class Mismatch(Exception):
    """What the new VMM (or the runner) found differs from what the old VMM left."""


class Vmm:
    """A vmm.py child and the JSON lines it prints."""

    def __init__(self, mode: str, control: str, a: argparse.Namespace) -> None:
        argv = [sys.executable, VMM, mode, "--control", control, "--devices", str(a.devices),
                "--ticks", str(a.ticks), "--tick-us", str(a.tick_us)]
        if mode == "boot":
            argv += ["--ram-mb", str(a.ram_mb)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                print(f"  vmm {self.pid}: {line.rstrip()}", file=sys.stderr)
        self.lines.put({"event": "eof"})

    def expect(self, event: str, timeout: float = 60.0) -> dict:
        try:
            ev = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise Mismatch(f"vmm pid {self.pid} did not report {event!r} within {timeout:.0f} s") from None
        if ev.get("event") != event:
            code = self.proc.wait(30) if ev.get("event") == "eof" else None
            raise Mismatch(f"vmm pid {self.pid} reported {ev} (exit code {code}) where {event!r} was "
                           "expected")
        return ev

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        if code != 0:
            raise Mismatch(f"vmm pid {self.pid} exited with code {code}")
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            stop(self.proc, timeout=5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def same(what: str, got: object, want: object, problems: list[str]) -> str:
    if got != want:
        problems.append(f"{what}: {got} != expected {want}")
        return f"{got}  MISMATCH (expected {want})"
    return f"{got} (as expected)"


def run(a: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="cprd-vm-handoff-")
    os.chmod(work, 0o700)
    control = os.path.join(work, "control.sock")
    daemons: list[subprocess.Popen] = []
    vmms: list[Vmm] = []
    problems: list[str] = []

    def daemon(*args: str) -> subprocess.Popen:
        with open(os.path.join(work, f"cprd-{len(daemons)}.log"), "wb") as log:
            p = spawn(list(args), stderr=log)
        daemons.append(p)
        return p

    try:
        src = daemon("source", "--control", control)
        wait_for_socket(control, src)
        print(f"cprd source: pid {src.pid}, control socket {control}")

        old = Vmm("boot", control, a)
        vmms.append(old)
        booted = old.expect("booted")
        print(f"vmm 1 (pid {old.pid}): booted a guest with {booted['ram_bytes'] >> 20} MiB RAM and devices "
              f"{', '.join(booted['devices'])}; {booted['fds_stored']} fds stored in cprd pid "
              f"{booted['cprd_pid']}")
        paused = old.expect("paused")
        old.wait()
        print(f"vmm 1: guest ran {a.ticks} ticks, counter {paused['counter']}, irqs signalled "
              f"{paused['irqs']}; paused and exited 0")

        new = Vmm("resume", control, a)
        vmms.append(new)
        new.expect("waiting")
        print(f"vmm 2 (pid {new.pid}): started, waiting for its guest")

        listen = os.path.join(work, "handoff.sock")
        tgt = daemon("target", "--listen", listen)
        wait_for_socket(listen, tgt)
        with Client(control, timeout=60, retry_for=0) as c:
            h = c.handoff(listen)
        code = src.wait(30)
        if code != 0:
            problems.append(f"the old cprd pid {src.pid} exited with code {code}, not 0")
        print(f"cprd handoff: pid {src.pid} -> pid {h['target_pid']}, {h['entries']} entries, "
              f"{h['ms']:.1f} ms; the old cprd exited {code}")

        new.send("go")
        found = new.expect("resumed")
        print(f"vmm 2: found {found['fds_found']} fds by (name, id) at cprd pid "
              f"{same('cprd pid', found['cprd_pid'], tgt.pid, problems)}")
        print(f"  counter before: {paused['counter']}, found: "
              f"{same('counter found', found['counter'], paused['counter'], problems)}")
        digest = same("RAM digest", found["ram_digest"], paused["ram_digest"], problems)
        print(f"  guest RAM contents: {digest}")
        for name, dev in sorted(found["devices"].items()):
            irqs = same(f"{name} irqs", dev["irqs"], paused["irqs"][name], problems)
            cmd = same(f"{name} command", repr(dev["command"]), repr(paused["commands"][name]), problems)
            print(f"  {name}: region header {dev['region']}, irqs pending {irqs}, queued command {cmd}")
        stopped = new.expect("stopped")
        new.wait()
        want = paused["counter"] + a.ticks
        after = same("counter after", stopped["counter"], want, problems)
        print(f"vmm 2: guest ran {a.ticks} more ticks, counter after: {after}; "
              f"irqs signalled {stopped['irqs']}")

        # The runner's own look, through its own copies of the fds: the guest lives on in cprd.
        with Client(control) as c:
            _, ram = c.get("guest-ram", 0)
            try:
                counter = int.from_bytes(os.pread(ram, 8, 0), "little")
            finally:
                os.close(ram)
            pending = {}
            for name in found["devices"]:
                pending[name] = []
                for k in range(DEVICE_IRQS):
                    _, fd = c.get(name, DEVICE_IRQ_BASE + k)
                    try:
                        pending[name].append(int(fdinfo(fd).get("eventfd-count", "0"), 16))
                    finally:
                        os.close(fd)
        print(f"runner, through cprd: counter {same('counter in cprd', counter, want, problems)}, "
              f"irqs pending {same('irqs in cprd', pending, stopped['irqs'], problems)}")
    except (Mismatch, CprdError, subprocess.TimeoutExpired) as e:
        problems.append(str(e))
    finally:
        for v in vmms:
            v.kill()
        for p in reversed(daemons):
            stop(p)
        if problems:
            for name in sorted(os.listdir(work)):
                if name.endswith(".log"):
                    with open(os.path.join(work, name), errors="replace") as f:
                        text = f.read().strip()
                    if text:
                        print(f"--- {name}\n{text}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        print(f"vm-handoff: FAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"vm-handoff: OK: counter {paused['counter']} -> {stopped['counter']}, every fd found by "
          "(name, id) after the VMM and cprd both changed process")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="Hand a VM's guest memory and devices from one VMM process to "
                                "a new one while cprd itself is handed off; exit 1 on any mismatch.")
    p.add_argument("--devices", type=int, default=2, help="vfio-like devices (default 2)")
    p.add_argument("--ram-mb", type=int, default=16, help="guest RAM in MiB (default 16)")
    p.add_argument("--ticks", type=int, default=2000, help="guest loop ticks for each VMM (default 2000)")
    p.add_argument("--tick-us", type=int, default=200, help="microseconds between ticks (default 200)")
    a = p.parse_args()
    if a.devices < 1 or a.ram_mb < 1 or a.ticks < 1 or a.tick_us < 0:
        p.error("--devices, --ram-mb and --ticks must be >= 1, --tick-us >= 0")

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally block, which stops every child

    signal.signal(signal.SIGTERM, terminate)
    try:
        return run(a)
    except KeyboardInterrupt:
        print("vm-handoff: interrupted; stopped every process it started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
