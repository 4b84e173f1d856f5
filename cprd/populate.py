"""Real fds of every kind, made for `cprd source --populate`, the demo, benchmarks and tests.

``populate(counts, directory)`` creates regular files (each with its own content and offset, in a
directory: a path, or a directory fd the daemon has checked), eventfds (each with its own
counter), memfds (known bytes), pipes and connected UNIX socket pairs (both ends), and
"vfio-like" device bundles modelled on QEMU vfio's device and irq fds. ``parse_spec`` reads the
`--populate` spec. What this module may know: how to make fds; it verifies nothing (the tools'
``proof.check_populated`` reads back what this wrote).
"""

from __future__ import annotations

import os
import socket
import struct

from .errors import UsageError


DEVICE_REGION_ID = 0
DEVICE_CMD_ID = 1
DEVICE_CMD_PEER_ID = 2
DEVICE_IRQ_BASE = 16
DEVICE_IRQS = 2
DEVICE_REGION_SIZE = 64 * 1024
DEVICE_REGION_MAGIC = b"CPRD-VFIO-REGION"
REGION_HEADER = struct.Struct("<16sII")  # magic, device number, region size

POPULATE_KEYS = ("files", "eventfds", "memfds", "pipes", "sockets", "devices")
FDS_PER = {"files": 1, "eventfds": 1, "memfds": 1, "pipes": 2, "sockets": 2, "devices": 3 + DEVICE_IRQS}


def file_content(i: int) -> bytes:
    return (f"cprd file {i}\n".encode() * 8)[:96]


def file_offset(i: int) -> int:
    return i % 89 + 1


def memfd_content(i: int) -> bytes:
    return struct.pack("<Q", i) + bytes((i + j) % 251 for j in range(248))


def _closing_on_error(fd: int, fill) -> int:
    try:
        fill(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_file(directory: str | int, i: int) -> int:
    """A regular file file-NNNNN in directory (a path, or an open directory fd), never through a
    symlink."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    if isinstance(directory, int):
        fd = os.open(f"file-{i:05d}", flags, 0o600, dir_fd=directory)
    else:
        fd = os.open(os.path.join(directory, f"file-{i:05d}"), flags, 0o600)
    return _closing_on_error(fd, lambda fd: (os.write(fd, file_content(i)),
                                             os.lseek(fd, file_offset(i), os.SEEK_SET)))


def make_eventfd(i: int) -> int:
    return os.eventfd(i + 1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def make_memfd(i: int) -> int:
    fd = os.memfd_create(f"cprd-mem-{i}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    return _closing_on_error(fd, lambda fd: os.write(fd, memfd_content(i)))


def make_region(n: int) -> int:
    fd = os.memfd_create(f"cprd-vfio-region-{n}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    return _closing_on_error(fd, lambda fd: (
        os.ftruncate(fd, DEVICE_REGION_SIZE),
        os.pwrite(fd, REGION_HEADER.pack(DEVICE_REGION_MAGIC, n, DEVICE_REGION_SIZE), 0)))


def device_name(n: int) -> str:
    return f"vfio/{n:04d}"


def make_device(n: int) -> list[tuple[str, int, int]]:
    """A vfio-like device: one name, distinct ids: a memfd region (mmap-able, known header), a
    SOCK_SEQPACKET command channel (both ends) and DEVICE_IRQS irq eventfds."""
    name = device_name(n)
    out = [(name, DEVICE_REGION_ID, make_region(n))]
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out.append((name, DEVICE_CMD_ID, a.detach()))
        out.append((name, DEVICE_CMD_PEER_ID, b.detach()))
        for k in range(DEVICE_IRQS):
            out.append((name, DEVICE_IRQ_BASE + k, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)))
    except BaseException:  # a half-made device (EMFILE, say) must not leak its first fds
        for _, _, fd in out:
            os.close(fd)
        raise
    return out


def parse_spec(spec: str) -> dict[str, int]:
    """Parse 'files=500,eventfds=300,...' into counts. UsageError names what is wrong."""
    out = dict.fromkeys(POPULATE_KEYS, 0)
    if not spec.strip():
        return out
    seen: set[str] = set()
    for part in spec.split(","):
        key, eq, val = part.strip().partition("=")
        if key not in out or not eq:
            raise UsageError(
                f"bad populate item {part!r}: expected KIND=COUNT with KIND one of {', '.join(POPULATE_KEYS)}"
                " (example: files=500,eventfds=300,devices=10)"
            )
        if key in seen:
            raise UsageError(f"populate names {key} twice ({spec!r}); give each kind once")
        seen.add(key)
        try:
            n = int(val)
        except ValueError:
            raise UsageError(f"bad count {val!r} for {key}: expected a whole number") from None
        if n < 0:
            raise UsageError(f"count for {key} must not be negative, got {n}")
        out[key] = n
    return out


def spec_fds(counts: dict[str, int]) -> int:
    return sum(FDS_PER[k] * n for k, n in counts.items())


def mixed_spec(total: int) -> dict[str, int]:
    """A mix of every kind with about `total` fds (files 40%, eventfds 25%, the rest spread)."""
    devices = max(1, total // 40)
    pipes = sockets = max(1, total // 20)
    memfds = max(1, total // 20)
    eventfds = max(1, total // 4)
    used = devices * FDS_PER["devices"] + 2 * pipes + 2 * sockets + memfds + eventfds
    return {"files": max(0, total - used), "eventfds": eventfds, "memfds": memfds, "pipes": pipes,
            "sockets": sockets, "devices": devices}


def populate(counts: dict[str, int], directory: str | int) -> list[tuple[str, int, int]]:
    """Create real fds; return (name, id, fd) triples. Regular files go into directory: a path
    (created 0700 if missing), or an open directory fd that the caller has checked. On error,
    closes what it made and re-raises."""
    made: list[tuple[str, int, int]] = []
    try:
        if counts.get("files") and not isinstance(directory, int):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        for i in range(counts.get("files", 0)):
            made.append(("file", i, make_file(directory, i)))
        for i in range(counts.get("eventfds", 0)):
            made.append(("eventfd", i, make_eventfd(i)))
        for i in range(counts.get("memfds", 0)):
            made.append(("memfd", i, make_memfd(i)))
        for i in range(counts.get("pipes", 0)):
            r, w = os.pipe2(os.O_CLOEXEC)
            made += [("pipe", 2 * i, r), ("pipe", 2 * i + 1, w)]
            os.write(w, f"pipe {i}\n".encode())
        for i in range(counts.get("sockets", 0)):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            made += [("socket", 2 * i, a.detach()), ("socket", 2 * i + 1, b.detach())]
        for n in range(counts.get("devices", 0)):
            made += make_device(n)
    except BaseException:
        for _, _, fd in made:
            os.close(fd)
        raise
    return made


def spec_string(counts: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in counts.items() if v)
