"""The main channel's message format (DESIGN §4.5), and the wire constants.

The multifd channels use QEMU's own packet layouts, framed by the Cython
core (``fastmfd._core``). The main channel is fastmfd's own: after the
optional channel header it starts with a 4-byte magic and a version, then
carries messages ``(BE u32 type, BE u32 length, payload)``. Control payloads
are JSON objects — this is not the hot path — except DEVICE_STATE (the old
way's device chunks), whose payload is binary::

    BE u32 device index (position in SETUP's device list)
    12-byte chunk header (version, idx, flags) + chunk data
"""

from __future__ import annotations

import enum
import json
import struct

from .. import _core
from ..errors import ProtocolError

__all__ = [
    "MAIN_MAGIC", "MAIN_VERSION", "MAIN_PREAMBLE", "Msg", "MAX_CONTROL_PAYLOAD",
    "encode_message", "decode_message_header", "decode_control", "encode_preamble",
    "check_preamble",
]

MAIN_MAGIC = 0x464D4644            # "FMFD"; differs from MULTIFD_MAGIC, so channels can be told apart
MAIN_VERSION = 1
MAIN_PREAMBLE = struct.Struct(">II")
MESSAGE_HEADER = struct.Struct(">II")
MAX_CONTROL_PAYLOAD = 16 << 20     # bound on any JSON message a peer can make us read


class Msg(enum.IntEnum):
    """Main-channel message types."""
    SETUP = 1               # source -> destination: every session parameter
    SETUP_ACK = 2           # destination -> source: ready for channels
    ROUND_END = 3           # source -> destination: every RAM channel has its SYNC for round n
    ROUND_ACK = 4           # destination -> source: round n applied on every channel
    DEVICE_STATE = 5        # source -> destination: one device chunk (old way only)
    SWITCHOVER_START = 6    # source -> destination: the source stopped; device state follows
    COMPLETE = 7            # source -> destination: everything sent (totals)
    LOADED = 8              # destination -> source: everything applied and loaded
    ERROR = 9               # either way: the session failed (text)
    RESUMED = 10            # destination -> source: its on_resume ran; the session is over


def encode_preamble() -> bytes:
    return MAIN_PREAMBLE.pack(MAIN_MAGIC, MAIN_VERSION)


def check_preamble(data: bytes) -> None:
    magic, version = MAIN_PREAMBLE.unpack(data)
    if magic != MAIN_MAGIC:
        raise ProtocolError(f"main channel field 'magic': received {magic:#x}, expected "
                            f"{MAIN_MAGIC:#x}", field="magic", received=magic,
                            expected=MAIN_MAGIC)
    if version != MAIN_VERSION:
        raise ProtocolError(f"main channel field 'version': received {version}, expected "
                            f"{MAIN_VERSION}", field="version", received=version,
                            expected=MAIN_VERSION)


def encode_message(kind: Msg, payload: dict | bytes | None = None) -> bytes:
    """A whole message: header plus payload (a dict is sent as JSON)."""
    if isinstance(payload, dict):
        body = json.dumps(payload, separators=(",", ":")).encode()
    else:
        body = payload or b""
    return MESSAGE_HEADER.pack(int(kind), len(body)) + body


def decode_message_header(data: bytes, max_payload: int) -> tuple[Msg, int]:
    """Validate a message header; return ``(type, payload length)``."""
    kind, length = MESSAGE_HEADER.unpack(data)
    try:
        msg = Msg(kind)
    except ValueError:
        raise ProtocolError(f"main channel field 'type': received {kind}, expected one of "
                            f"{[int(m) for m in Msg]}", field="type", received=kind,
                            expected="a message type") from None
    limit = max_payload if msg is Msg.DEVICE_STATE else MAX_CONTROL_PAYLOAD
    if length > limit:
        raise ProtocolError(f"main channel {msg.name} field 'length': received {length}, "
                            f"expected <= {limit}", field="length", received=length,
                            expected=limit)
    return msg, length


def decode_control(kind: Msg, body: bytes) -> dict:
    """The JSON object of a control message."""
    try:
        value = json.loads(body) if body else {}
    except (ValueError, RecursionError) as exc:     # bad UTF-8 or JSON; nesting too deep
        raise ProtocolError(f"main channel {kind.name}: payload is not JSON ({exc})",
                            field="payload", received=body[:40], expected="JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"main channel {kind.name}: payload is not a JSON object",
                            field="payload", received=type(value).__name__, expected="object")
    return value


MESSAGE_HEADER_SIZE = MESSAGE_HEADER.size
CHANNEL_HEADER_SIZE = _core.CHANNEL_HEADER_SIZE
