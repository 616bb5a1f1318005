"""QEMU's return path: what a destination says back to its source on the main
channel's connection, once the source opened it (the command OPEN_RETURN_PATH;
a QEMU source does so with the capability ``return-path``).

Each message is a BE u16 type, a BE u16 length and that many bytes
(migration/migration.c @ 10.0, ``enum mig_rp_message_type``, ``rp_cmd_args``).
A precopy destination sends three: PONG (the value of each PING command),
SWITCHOVER_ACK (QEMU >= 8.1 with the capability ``switchover-ack``) and, last,
SHUT: 0 once it has loaded the whole stream, anything else when it failed. So a
source that saw SHUT 0 knows its migration arrived; one that did not must not
say it did. (A QEMU 7.2 source treats the types it does not know, 7 on, as an
error: a destination sends none it was not asked for.)
"""

from __future__ import annotations

import re
import struct
from typing import NoReturn

from ..errors import ProtocolError

__all__ = ["RP_SHUT", "RP_PONG", "RP_SWITCHOVER_ACK", "encode_rp_pong", "encode_rp_shut",
           "encode_rp_switchover_ack", "knows_switchover_ack", "ReturnPathDecoder"]

RP_SHUT = 1
RP_PONG = 2
RP_SWITCHOVER_ACK = 7
# Every type a QEMU >= 7.2 knows, with the length of its data where it is fixed.
RP_MESSAGES = {1: ("SHUT", 4), 2: ("PONG", 4), 3: ("REQ_PAGES_ID", None),
               4: ("REQ_PAGES", 12), 5: ("RECV_BITMAP", None), 6: ("RESUME_ACK", 4),
               7: ("SWITCHOVER_ACK", 0)}
# What a destination of a precopy migration may say; the rest is postcopy's.
PRECOPY_MESSAGES = (RP_SHUT, RP_PONG, RP_SWITCHOVER_ACK)
_HEADER = struct.Struct(">HH")
_VALUE = struct.Struct(">I")


def encode_rp_pong(value: int) -> bytes:
    """The answer to a PING command of ``value``."""
    return _HEADER.pack(RP_PONG, _VALUE.size) + _VALUE.pack(value)


def encode_rp_switchover_ack() -> bytes:
    """The destination is ready for the switchover (what a source with the
    capability ``switchover-ack`` waits for before it stops its guest)."""
    return _HEADER.pack(RP_SWITCHOVER_ACK, 0)


def knows_switchover_ack(machine: str) -> bool:
    """Whether the source of a stream of this machine type surely knows
    SWITCHOVER_ACK (QEMU >= 8.1): a QEMU makes no machine type newer than itself.
    An older one (``pc-i440fx-7.2``) may come from QEMU 7.2, which fails its
    migration on that message, or from a later QEMU: it cannot be told."""
    version = re.fullmatch(r".*-(\d+)\.(\d+)", machine)
    return version is not None and (int(version[1]), int(version[2])) >= (8, 1)


def encode_rp_shut(failed: bool) -> bytes:
    """The destination's last message: 0 when it has loaded the whole stream."""
    return _HEADER.pack(RP_SHUT, _VALUE.size) + _VALUE.pack(int(failed))


class ReturnPathDecoder:
    """A source's reading of the return path, bytes as they come: every message
    is judged on its header before its data is kept (at most 4 bytes of it); a
    PONG answers a PING sent (``pings``, their values in order), SWITCHOVER_ACK
    comes at most once, and nothing follows SHUT."""

    def __init__(self, where: str, pings: list[int]) -> None:
        self.where = where
        self.pending = b""
        self.unanswered = list(pings)
        self.switchover_acked = False
        self.shut: int | None = None        # SHUT's value, once it came

    def feed(self, data: bytes) -> None:
        """Take ``data``; raise ProtocolError at the first message a precopy
        destination does not send."""
        buf = self.pending + data
        at = 0
        while len(buf) - at >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buf, at)
            name, fixed = RP_MESSAGES.get(kind, (None, None))
            if self.shut is not None:
                self._refuse("a message after SHUT", "type", kind, "nothing")
            if kind not in PRECOPY_MESSAGES:
                self._refuse(f"return path message {name or kind} (a precopy destination "
                             "sends only PONG, SWITCHOVER_ACK and SHUT)", "type", kind,
                             "PONG, SWITCHOVER_ACK or SHUT")
            if length != fixed:
                self._refuse(f"return path message {name} with {length} bytes of data, "
                             f"expected {fixed}", "length", length, fixed)
            if len(buf) - at < _HEADER.size + length:
                break
            value = _VALUE.unpack_from(buf, at + _HEADER.size)[0] if length else 0
            at += _HEADER.size + length
            if kind == RP_PONG:
                if not self.unanswered or value != self.unanswered[0]:
                    self._refuse(f"PONG {value} answers no PING sent", "PONG", value,
                                 self.unanswered[:1] or "no PONG")
                del self.unanswered[0]
            elif kind == RP_SWITCHOVER_ACK:
                if self.switchover_acked:
                    self._refuse("a second SWITCHOVER_ACK", "type", kind, "one")
                self.switchover_acked = True
            else:
                self.shut = value
        self.pending = buf[at:]

    def _refuse(self, what: str, field: str, received: object, expected: object) -> NoReturn:
        raise ProtocolError(what, field=field, received=received,
                            expected=expected, where=self.where)
