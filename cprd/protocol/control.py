"""The control protocol (version 1): requests and replies as frames, with no I/O.

Theory of operation
-------------------
A client connects to the daemon's SOCK_SEQPACKET control socket and sends one request frame at a
time; the daemon answers each with one reply, which may span several frames (flag MORE on all
but the last). Frames use the common 12-byte header (frame.py) with magic b"CPRC"; the payload
is a UTF-8 JSON object. At most MAX_FRAME bytes a frame, checked before anything is parsed.

    request  {"op": OP, ...arguments}            type REQUEST
    reply    {"ok": true, "result": ...}         type REPLY
             {"ok": false, "error": CODE, "message": TEXT}

fds ride with SCM_RIGHTS: exactly one on a `put` request and on a `get` reply, the stored fds on an
`fdstore` open reply (at most 253 a frame, in order), none elsewhere.
Control traffic is small and rare, so JSON is fine here; the handoff protocol is binary.

The request schemas live in OPS; ``parse_request`` checks one and names what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import CprdError, ProtocolError, UsageError
from . import frame

MAGIC = b"CPRC"
VERSION = 1
MAX_FRAME = 64 * 1024
MAX_PAYLOAD = MAX_FRAME - frame.HEADER_SIZE
CHUNK = 60 * 1024
REQUEST, REPLY = 1, 2
MORE = 1

# op -> (required args with types, optional args with types and defaults, fds on the request)
OPS: dict[str, tuple[dict[str, type], dict[str, tuple[type, Any]], int]] = {
    "put": ({"name": str, "id": int}, {"replace": (bool, False), "rid": (str, "")}, 1),
    "get": ({"name": str, "id": int}, {}, 0),
    "del": ({"name": str, "id": int}, {"rid": (str, "")}, 0),
    "ls": ({}, {}, 0),
    "status": ({}, {}, 0),
    "handoff": ({"to": str}, {"batch": (int, 253), "window": (int, 4)}, 0),
    "upgrade": ({}, {"program": (str, ""), "timeout": (float, 0.0)}, 0),
    # an app's fd store (systemd's protocol): action open (made if missing; its fds come with the
    # reply, newest first), socket (made if missing), list, clean, remove; max: its limit (-1: as it is);
    # serve (a `cprd serve` supervisor's heartbeat, with its report), restart (asks the supervisor)
    "fdstore": ({"app": str, "action": str}, {"max": (int, -1), "report": (str, "")}, 0),
    # let these uids and gids read an entry (or a store: its notify socket's entry, id -1); replaces the list
    "share": ({"name": str, "id": int}, {"uids": (list, []), "gids": (list, []), "rid": (str, "")}, 0),
}


@dataclass(slots=True, frozen=True)
class Request:
    op: str
    args: dict[str, Any]


def encode_request(op: str, **args: Any) -> bytes:
    payload = json.dumps({"op": op, **args}, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        raise UsageError(f"request of {len(payload)} bytes is over the limit of {MAX_PAYLOAD}")
    return frame.pack(MAGIC, VERSION, REQUEST, payload)


def _decode_json(payload: memoryview | bytes, what: str) -> Any:
    try:
        return json.loads(bytes(payload).decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(f"control {what}: payload is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"control {what}: payload is not JSON ({e.msg} at byte {e.pos})") from None
    except (ValueError, RecursionError) as e:  # an over-long integer literal, or nesting too deep
        raise ProtocolError(f"control {what}: payload cannot be parsed ({type(e).__name__})") from None


def decode_request(data: bytes, nfds: int) -> Request:
    """Check one request frame that arrived with nfds fds. ProtocolError/UsageError say what is wrong;
    the caller owns (and on error closes) the fds."""
    version, type_, flags, payload = frame.unpack(data, MAGIC, MAX_PAYLOAD, "control request")
    if version != VERSION:
        raise ProtocolError(f"control request: version {version}, this daemon speaks {VERSION}; "
                            "use a cprd client of the same version")
    if type_ != REQUEST or flags:
        raise ProtocolError(f"control request: frame type {type_} flags {flags}, expected a request")
    obj = _decode_json(payload, "request")
    if not isinstance(obj, dict):
        raise ProtocolError("control request: payload must be a JSON object")
    return parse_request(obj, nfds)


def parse_request(obj: dict[str, Any], nfds: int) -> Request:
    op = obj.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise UsageError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
    required, optional, want_fds = OPS[op]
    args: dict[str, Any] = {}
    for key, typ in required.items():
        if key not in obj:
            raise UsageError(f"{op}: missing argument {key!r}")
        args[key] = _typed(op, key, obj[key], typ)
    for key, (typ, default) in optional.items():
        args[key] = _typed(op, key, obj[key], typ) if key in obj else default
    if len(args.get("rid", "")) > 128:
        raise UsageError(f"{op}: request id of {len(args['rid'])} characters, at most 128")
    extra = set(obj) - set(required) - set(optional) - {"op"}
    if extra:
        raise UsageError(f"{op}: unknown argument(s) {', '.join(sorted(extra))}")
    if nfds != want_fds:
        raise UsageError(f"{op}: {nfds} fds arrived with the request, expected {want_fds}")
    return Request(op, args)


def _typed(op: str, key: str, value: Any, typ: type) -> Any:
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{op}: argument {key!r} must be an integer, got {value!r}")
    if typ is list:
        if not isinstance(value, list) or len(value) > 64 or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 - 1 for x in value):
            raise UsageError(f"{op}: argument {key!r} must be a list of at most 64 uids or gids, got {value!r:.80}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UsageError(f"{op}: argument {key!r} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, typ):
        raise UsageError(f"{op}: argument {key!r} must be a {typ.__name__}, got {value!r}")
    return value


def encode_reply(result: Any, min_frames: int = 1) -> list[bytes]:
    """The frames of a successful reply; at least `min_frames` of them (a reply whose fds need more
    than one frame: at most SCM_MAX_FD fds ride on each, in order)."""
    return _chunks({"ok": True, "result": result}, min_frames)


def encode_error(err: CprdError) -> list[bytes]:
    return _chunks({"ok": False, "error": err.code, "message": str(err)})


def encode_reply_items(items: Iterable[Any]) -> list[bytes]:
    """The frames of a reply whose result is the list `items`, as encode_reply gives them."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    return encode_reply_parts(dumps(item).encode() for item in items)


def encode_reply_parts(parts: Iterable[bytes]) -> list[bytes]:
    """The frames of a reply whose result is a list of items already encoded as JSON (each item's
    bytes, e.g. cached because the item never changes): the same bytes on the wire as
    encode_reply of the decoded list, without decoding or re-encoding anything."""
    data = b'{"ok":true,"result":[' + b",".join(parts) + b"]}"
    last = max(0, (len(data) - 1) // CHUNK)
    return [frame.pack(MAGIC, VERSION, REPLY, data[i * CHUNK:(i + 1) * CHUNK], MORE if i < last else 0)
            for i in range(last + 1)]


def _chunks(obj: Any, min_frames: int = 1) -> list[bytes]:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if min_frames > 1:
        payload += b" " * max(0, min_frames - len(payload))  # JSON may end in blanks: a byte for each frame
        n = max(min_frames, -(-len(payload) // CHUNK))
        bounds = [i * len(payload) // n for i in range(n + 1)]
        parts = [payload[bounds[i]:bounds[i + 1]] for i in range(n)]
    else:
        parts = [payload[i:i + CHUNK] for i in range(0, len(payload), CHUNK)] or [b""]
    return [frame.pack(MAGIC, VERSION, REPLY, p, MORE if i < len(parts) - 1 else 0) for i, p in enumerate(parts)]


class ReplyReader:
    """Reassemble one reply from its frames: feed() each frame; it returns the decoded reply dict
    when the last frame has arrived, else None."""

    MAX_REPLY = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> dict[str, Any] | None:
        version, type_, flags, payload = frame.unpack(data, MAGIC, MAX_PAYLOAD, "control reply")
        if type_ != REPLY:
            raise ProtocolError(f"control reply: frame type {type_}, expected a reply")
        self._size += len(payload)
        if self._size > self.MAX_REPLY:
            raise ProtocolError(f"control reply: over {self.MAX_REPLY} bytes")
        self._parts.append(bytes(payload))
        if flags & MORE:
            return None
        obj = _decode_json(b"".join(self._parts), "reply")
        self._parts, self._size = [], 0
        if not isinstance(obj, dict) or "ok" not in obj:
            raise ProtocolError("control reply: not a reply object")
        return obj
