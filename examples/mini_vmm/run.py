#!/usr/bin/env python3
"""A VM-like process whose guest memory and vfio-like devices live in cprd, while cprd itself is
upgraded in place three times in a row.

    python examples/mini_vmm/run.py [--upgrades 3] [--devices 2] [--ram-mib 4]

1. A `cprd source` starts (in a temporary directory).
2. The "VMM" creates guest RAM (a memfd) and vfio-like devices (region memfd, command channel,
   irq eventfds), deposits every fd in cprd under (name, id), and keeps only what a running guest
   needs: the RAM mapping and the irq eventfd of device 0.
3. A vCPU thread keeps writing: counter n goes to RAM offset 0 and to slot n of a ring in RAM, and
   each write signals the irq eventfd.
4. Meanwhile cprd is upgraded in place (`cprd ctl upgrade`) three times. After each one a fresh
   "device model" asks cprd for the fds by (name, id), as a restarted VMM would, maps the same RAM,
   and checks the counter only ever went up and the region headers are intact.
5. At the end: the counter in RAM (read through cprd's fd) equals the number of writes the vCPU
   made, every ring slot holds its own number (no write lost), and the irq eventfd (read through
   cprd's fd) counted every signal. Exit status 0 only if all of that holds.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time

from cprd.client import Client
from cprd.populate import (DEVICE_CMD_ID, DEVICE_CMD_PEER_ID, DEVICE_IRQ_BASE, DEVICE_REGION_ID, DEVICE_REGION_MAGIC,
                           REGION_HEADER, device_name, make_device)
from cprd.tools.procs import spawn, stop, wait_for_socket

RING = 4096  # ring slots after the counter; slot n % RING holds n
U64 = struct.Struct("<Q")


def fail(msg: str) -> int:
    print(f"mini_vmm: FAILED: {msg}", file=sys.stderr)
    return 1


class VCpu(threading.Thread):
    """Writes counter n to RAM[0] and to ring slot n, then signals the irq eventfd."""

    def __init__(self, ram: mmap.mmap, irq: int) -> None:
        super().__init__(daemon=True)
        self.ram, self.irq, self.writes, self.stop = ram, irq, 0, threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            U64.pack_into(self.ram, 8 + 8 * (n % RING), n)
            U64.pack_into(self.ram, 0, n)
            os.eventfd_write(self.irq, 1)
            self.writes = n
            if n % 64 == 0:
                time.sleep(0.0005)


def device_model_check(c: Client, devices: int, last: int) -> int:
    """What a restarted VMM does: find every fd by (name, id), map RAM, check it. Returns the counter."""
    _, ram_fd = c.get("guest-ram", 0)
    try:
        with mmap.mmap(ram_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ) as ram:
            counter = U64.unpack_from(ram, 0)[0]
    finally:
        os.close(ram_fd)
    if counter < last:
        raise AssertionError(f"the guest counter went back from {last} to {counter}")
    for n in range(devices):
        _, region = c.get(device_name(n), DEVICE_REGION_ID)
        try:
            magic, num, _ = REGION_HEADER.unpack(os.pread(region, REGION_HEADER.size, 0))
        finally:
            os.close(region)
        if magic != DEVICE_REGION_MAGIC or num != n:
            raise AssertionError(f"device {n}: region header {magic!r} {num}")
    return counter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upgrades", type=int, default=3)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--ram-mib", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cprd-mini-vmm-") as d:
        os.chmod(d, 0o700)
        control = os.path.join(d, "control.sock")
        cprd = spawn(["source", "--control", control])
        try:
            wait_for_socket(control, cprd)
            return run(control, cprd, a)
        finally:
            stop(cprd)


def run(control: str, cprd: subprocess.Popen, a: argparse.Namespace) -> int:
    # The VMM: guest RAM and devices, every fd deposited in cprd.
    ram_fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram_fd, a.ram_mib << 20)
    owned = [("guest-ram", 0, ram_fd)]
    for n in range(a.devices):
        owned += make_device(n)
    with Client(control) as c:
        for name, id_, fd in owned:
            c.put(name, id_, fd)
        pid = c.status()["pid"]
    # The running guest keeps only its RAM mapping and one irq eventfd (both also in cprd).
    ram = mmap.mmap(ram_fd, a.ram_mib << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    irq = next(fd for name, id_, fd in owned if name == device_name(0) and id_ == DEVICE_IRQ_BASE)
    for _, _, fd in owned:
        if fd not in (ram_fd, irq):
            os.close(fd)
    print(f"mini_vmm: guest with {a.ram_mib} MiB RAM and {a.devices} devices; {len(owned)} fds in cprd pid {pid}")
    vcpu = VCpu(ram, irq)
    vcpu.start()
    try:
        last = 0
        with Client(control) as c:
            for i in range(a.upgrades):
                time.sleep(0.2)
                r = subprocess.run([sys.executable, "-m", "cprd", "ctl", "upgrade", "--json", "--control", control],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    return fail(f"upgrade {i + 1}: {r.stderr.strip()}")
                res = json.loads(r.stdout)
                if res["pid"] != pid or res["rolled_back"]:
                    return fail(f"upgrade {i + 1}: {res}")
                last = device_model_check(c, a.devices, last)
                print(f"  upgrade {i + 1}: same pid {res['pid']}, {res['entries']} entries, no request served for "
                      f"{res['ms']:.0f} ms; guest counter {last} (writes continue)")
            time.sleep(0.1)
            vcpu.stop.set()
            vcpu.join()
            # Everything read back through the fds cprd holds now.
            _, ram2 = c.get("guest-ram", 0)
            with mmap.mmap(ram2, a.ram_mib << 20, mmap.MAP_SHARED, mmap.PROT_READ) as view:
                counter = U64.unpack_from(view, 0)[0]
                first = max(1, vcpu.writes - RING + 1)
                lost = [n for n in range(first, vcpu.writes + 1) if U64.unpack_from(view, 8 + 8 * (n % RING))[0] != n]
            os.close(ram2)
            _, irq2 = c.get(device_name(0), DEVICE_IRQ_BASE)
            irqs = os.eventfd_read(irq2)
            os.close(irq2)
            _, cmd = c.get(device_name(0), DEVICE_CMD_ID)
            _, peer = c.get(device_name(0), DEVICE_CMD_PEER_ID)
            os.write(cmd, b"RESET")
            echoed = os.read(peer, 64)
            os.close(cmd)
            os.close(peer)
            if c.status()["pid"] != pid:
                return fail("cprd changed pid")
    finally:
        vcpu.stop.set()
        ram.close()
        os.close(ram_fd)
        os.close(irq)
    print(f"mini_vmm: vCPU made {vcpu.writes} writes; guest counter {counter}; irq count {irqs}; "
          f"last {min(RING, vcpu.writes)} ring slots checked, lost {len(lost)}; command channel echoed {echoed!r}")
    if counter != vcpu.writes or lost or irqs != vcpu.writes or echoed != b"RESET":
        return fail("memory, irq counts or the command channel did not survive")
    print(f"mini_vmm: OK, {a.upgrades} in-place upgrades of cprd, nothing lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
