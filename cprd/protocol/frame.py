"""The frame header shared by both protocols.

Every message (one SOCK_SEQPACKET record) starts with a 12-byte header::

    magic   4s   b"CPRH" (handoff) or b"CPRC" (control)
    version u8   protocol version of this message
    type    u8   message type
    flags   u16  per type; 0 unless stated
    length  u32  bytes of payload that follow; must equal what arrived

Limits are checked before anything is allocated from a length field.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError

HEADER = struct.Struct("<4sBBHI")
HEADER_SIZE = HEADER.size  # 12


def pack(magic: bytes, version: int, type_: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(magic, version, type_, flags, len(payload)) + payload


def unpack(data: bytes, magic: bytes, max_payload: int, what: str) -> tuple[int, int, int, memoryview]:
    """Check the header; return (version, type, flags, payload view). ProtocolError names the fault."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(
            f"{what}: truncated frame of {len(data)} bytes (a frame starts with a {HEADER_SIZE}-byte header);"
            " is the peer a cprd of a compatible version?"
        )
    got_magic, version, type_, flags, length = HEADER.unpack_from(data)
    if got_magic != magic:
        raise ProtocolError(
            f"{what}: wrong magic {bytes(got_magic)!r} (expected {magic!r}); the peer does not speak this protocol"
        )
    if length > max_payload:
        raise ProtocolError(f"{what}: frame announces {length} bytes of payload, over the limit of {max_payload}")
    if length != len(data) - HEADER_SIZE:
        raise ProtocolError(
            f"{what}: frame announces {length} bytes of payload but {len(data) - HEADER_SIZE} arrived"
        )
    return version, type_, flags, memoryview(data)[HEADER_SIZE:]
