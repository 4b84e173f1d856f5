"""A VM-like process ("virtual machine monitor") whose guest memory and devices are fds in cprd.

    python examples/vm_handoff/vmm.py boot   --control PATH [--devices 2] [--ram-mb 16] [--ticks 2000]
    python examples/vm_handoff/vmm.py resume --control PATH [--devices 2] [--ticks 2000]

boot: creates the guest's RAM (a memfd, mmapped, filled with a deterministic pattern and a header)
and vfio-like devices (cprd.kinds.make_device: a region memfd with a known header, a SOCK_SEQPACKET
command channel, irq eventfds), stores every fd in cprd under (name, id), runs the guest loop for
--ticks ticks (each tick increments the counter at offset 0 of guest RAM and signals one irq
eventfd), posts a command on each device's command channel, pauses the guest and exits.

resume: the new VMM (QEMU's -incoming). It connects to cprd, says it is waiting, and reads one
line from stdin (the runner sends it once cprd has been handed off). Then it finds each fd by
(name, id) with Client.get, maps the same guest RAM, checks the RAM header and contents, each
device's region header, the irqs pending on each eventfd and the command queued on each
channel, and continues the guest loop for --ticks ticks from the counter where it stopped.

Each step is reported as one JSON line on stdout; any failure exits 1 with a message on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import socket
import struct
import sys
import time

from cprd.client import Client
from cprd.errors import CprdError
from cprd.populate import (DEVICE_CMD_ID, DEVICE_CMD_PEER_ID, DEVICE_IRQ_BASE, DEVICE_IRQS, DEVICE_REGION_ID,
                           DEVICE_REGION_MAGIC, DEVICE_REGION_SIZE, REGION_HEADER, device_name, make_device)

RAM_KEY = ("guest-ram", 0)
COUNTER = struct.Struct("<Q")  # guest RAM offset 0: the guest's counter
RAM_MAGIC = b"CPRD-GUEST-RAM\0\0"  # at offset 8, then the RAM size (u64)
RAM_HEADER = struct.Struct("<16sQ")
RAM_DATA = 64  # the guest's "data" starts here: a deterministic pattern written at boot


class VmmError(Exception):
    """Something the new VMM found is not what the old one left."""


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class Guest:
    """Guest RAM (mmapped memfd) and the devices' fds, by (name, id)."""

    def __init__(self, ram_fd: int, devices: dict[str, dict[int, int]]) -> None:
        self.ram_fd = ram_fd
        self.ram_size = os.fstat(ram_fd).st_size
        self.ram = mmap.mmap(ram_fd, self.ram_size)
        self.devices = devices
        self.irqs_signalled = {name: [0] * DEVICE_IRQS for name in devices}

    @property
    def counter(self) -> int:
        return COUNTER.unpack_from(self.ram, 0)[0]

    def contents_digest(self) -> str:
        return hashlib.sha256(self.ram[RAM_DATA:]).hexdigest()[:16]

    def run(self, ticks: int, tick_s: float) -> None:
        """The guest loop: each tick bumps the counter in guest RAM and raises one irq."""
        names = sorted(self.devices)
        n = self.counter
        for t in range(ticks):
            n += 1
            COUNTER.pack_into(self.ram, 0, n)
            name = names[t % len(names)]
            k = (t // len(names)) % DEVICE_IRQS
            os.eventfd_write(self.devices[name][DEVICE_IRQ_BASE + k], 1)
            self.irqs_signalled[name][k] += 1
            if tick_s:
                time.sleep(tick_s)

    def close(self) -> None:
        self.ram.close()
        os.close(self.ram_fd)
        for fds in self.devices.values():
            for fd in fds.values():
                os.close(fd)


def device_ids() -> list[int]:
    irqs = [DEVICE_IRQ_BASE + k for k in range(DEVICE_IRQS)]
    return [DEVICE_REGION_ID, DEVICE_CMD_ID, DEVICE_CMD_PEER_ID, *irqs]


# -- boot ------------------------------------------------------------------------------------------
def new_ram(size: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, RAM_HEADER.pack(RAM_MAGIC, size), COUNTER.size)
        pattern = hashlib.sha256(b"guest").digest() * 64  # 2 KiB of "guest data"
        for off in range(RAM_DATA, size, 1 << 16):
            os.pwrite(fd, pattern[: min(len(pattern), size - off)], off)
    except BaseException:
        os.close(fd)
        raise
    return fd


def boot(c: Client, a: argparse.Namespace) -> Guest:
    ram_fd = new_ram(a.ram_mb << 20)
    devices: dict[str, dict[int, int]] = {}
    try:
        for n in range(a.devices):
            devices[device_name(n)] = {id_: fd for _, id_, fd in make_device(n)}
    except BaseException:
        os.close(ram_fd)
        for fds in devices.values():
            for fd in fds.values():
                os.close(fd)
        raise
    guest = Guest(ram_fd, devices)
    try:
        c.put(*RAM_KEY, ram_fd)  # cprd keeps its own copy of every fd: they outlive this process
        for name, fds in devices.items():
            for id_, fd in fds.items():
                c.put(name, id_, fd)
    except BaseException:
        guest.close()
        raise
    return guest


def post_commands(guest: Guest) -> dict[str, str]:
    """One command on each device's channel that the device has not read yet when we pause."""
    posted = {}
    for name, fds in guest.devices.items():
        cmd = f"sync counter={guest.counter}"
        os.write(fds[DEVICE_CMD_ID], cmd.encode())
        posted[name] = cmd
    return posted


def cmd_boot(a: argparse.Namespace) -> int:
    with Client(a.control) as c:
        guest = boot(c, a)
        try:
            emit(event="booted", pid=os.getpid(), ram_bytes=guest.ram_size, devices=sorted(guest.devices),
                 fds_stored=1 + sum(len(f) for f in guest.devices.values()), cprd_pid=c.status()["pid"])
            guest.run(a.ticks, a.tick_us / 1e6)
            posted = post_commands(guest)
            emit(event="paused", pid=os.getpid(), counter=guest.counter, irqs=guest.irqs_signalled,
                 commands=posted, ram_digest=guest.contents_digest())
        finally:
            guest.close()  # ours only: cprd still holds the guest
    return 0


# -- resume ----------------------------------------------------------------------------------------
def find(c: Client, n_devices: int) -> Guest:
    """Every fd of the guest, found by (name, id), as QEMU's cpr_find_fd finds them."""
    got: list[int] = []
    try:
        _, ram_fd = c.get(*RAM_KEY)
        got.append(ram_fd)
        devices: dict[str, dict[int, int]] = {}
        for n in range(n_devices):
            name = device_name(n)
            devices[name] = {}
            for id_ in device_ids():
                _, fd = c.get(name, id_)
                got.append(fd)
                devices[name][id_] = fd
        return Guest(ram_fd, devices)
    except BaseException:
        for fd in got:
            os.close(fd)
        raise


def check(guest: Guest) -> dict:
    """What the new VMM finds: RAM header, counter, contents, and per device the region header, the
    pending irqs (acknowledged now, as a guest would) and the queued command."""
    magic, size = RAM_HEADER.unpack_from(guest.ram, COUNTER.size)
    if magic != RAM_MAGIC or size != guest.ram_size:
        raise VmmError(f"guest RAM header is {magic!r} size {size}, expected {RAM_MAGIC!r} size "
                       f"{guest.ram_size}")
    found: dict = {"counter": guest.counter, "ram_digest": guest.contents_digest(), "devices": {}}
    for name, fds in sorted(guest.devices.items()):
        region = mmap.mmap(fds[DEVICE_REGION_ID], DEVICE_REGION_SIZE)
        try:
            rmagic, number, rsize = REGION_HEADER.unpack_from(region, 0)
        finally:
            region.close()
        if rmagic != DEVICE_REGION_MAGIC or device_name(number) != name or rsize != DEVICE_REGION_SIZE:
            raise VmmError(f"{name}: region header is {rmagic!r} device {number} size {rsize}")
        irqs = []
        for k in range(DEVICE_IRQS):
            fd = fds[DEVICE_IRQ_BASE + k]
            try:
                irqs.append(os.eventfd_read(fd))  # the guest acknowledges what is pending
            except BlockingIOError:
                irqs.append(0)
        peer = socket.socket(fileno=os.dup(fds[DEVICE_CMD_PEER_ID]))
        try:
            cmd = peer.recv(4096, socket.MSG_DONTWAIT).decode()  # the device's end of the channel
        except BlockingIOError:
            cmd = ""
        finally:
            peer.close()
        found["devices"][name] = {"region": "ok", "irqs": irqs, "command": cmd}
    return found


def cmd_resume(a: argparse.Namespace) -> int:
    with Client(a.control) as c:
        emit(event="waiting", pid=os.getpid())
        if sys.stdin.readline().strip() != "go":
            print("vmm: error: no 'go' on stdin; not resuming", file=sys.stderr)
            return 1
        guest = find(c, a.devices)  # the old owner hung up on this connection: the client retries
        try:
            found = check(guest)
            emit(event="resumed", pid=os.getpid(), cprd_pid=c.status()["pid"],
                 fds_found=1 + sum(len(f) for f in guest.devices.values()), **found)
            guest.irqs_signalled = {name: [0] * DEVICE_IRQS for name in guest.devices}
            guest.run(a.ticks, a.tick_us / 1e6)
            emit(event="stopped", pid=os.getpid(), counter=guest.counter, irqs=guest.irqs_signalled)
        finally:
            guest.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="A VM-like process whose guest RAM and devices live in cprd.")
    p.add_argument("mode", choices=("boot", "resume"))
    p.add_argument("--control", help="cprd control socket (default $CPRD_CONTROL or cprd's default)")
    p.add_argument("--devices", type=int, default=2, help="vfio-like devices (default 2)")
    p.add_argument("--ram-mb", type=int, default=16, help="guest RAM in MiB (boot; default 16)")
    p.add_argument("--ticks", type=int, default=2000, help="guest loop ticks to run (default 2000)")
    p.add_argument("--tick-us", type=int, default=200, help="microseconds between ticks (default 200)")
    a = p.parse_args()
    if a.devices < 1 or a.ram_mb < 1 or a.ticks < 0 or a.tick_us < 0:
        p.error("--devices and --ram-mb must be >= 1, --ticks and --tick-us >= 0")
    try:
        return cmd_boot(a) if a.mode == "boot" else cmd_resume(a)
    except (CprdError, VmmError) as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
