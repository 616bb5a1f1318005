"""fastmfd's main channel in a capture: preamble, SETUP, messages, old-way device state."""

from __future__ import annotations

from ...errors import ProtocolError
from ...protocol.bytereader import ByteReader
from ...protocol.main_channel import (
    CAPTURE_VERSIONS, MESSAGE_HEADER_SIZE, Msg, check_preamble, decode_control,
    decode_message_header,
)
from .contents import DeviceChunks
from .records import FastmfdMainChannel
from .session import Session
from .setup_rules import apply_setup

__all__ = ["decode_fastmfd_main"]

MAX_MAIN_DEVICE_MESSAGE = 1 << 30     # bound on an old-way DEVICE_STATE message


def decode_fastmfd_main(reader: ByteReader, channel_header: bool, session: Session,
                        devices: DeviceChunks) -> FastmfdMainChannel:
    """Preamble, then messages; SETUP first, COMPLETE or ERROR last (DESIGN §4.5, §5).
    A capture holds what the source wrote: a message only a destination sends
    (SETUP_ACK, LOADED, ...) is refused as such, as the destination would."""
    out = FastmfdMainChannel(reader.path, reader.size, channel_header)
    at = reader.pos
    try:
        check_preamble(reader.take(8, "preamble"), CAPTURE_VERSIONS)
    except ProtocolError as exc:
        raise reader.locate(exc, at) from None
    last: Msg | None = None
    while not reader.at_end():
        at = reader.pos
        try:
            kind, length = decode_message_header(reader.take(MESSAGE_HEADER_SIZE,
                                                             "message header"),
                                                 MAX_MAIN_DEVICE_MESSAGE, sender="source")
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        body = reader.take(length, f"{kind.name} payload")
        if kind is Msg.AUTH and last is None:
            out.messages[kind.name] += 1        # the shared-key proof precedes SETUP
            continue
        if last is None and kind is not Msg.SETUP:
            raise reader.error(f"main channel: {kind.name} before SETUP", field="type",
                               received=kind.name, expected="SETUP first", at=at)
        if kind is Msg.SETUP:
            if last is not None:
                raise reader.error("main channel: a second SETUP", field="type",
                                   received="SETUP", expected="one SETUP", at=at)
            try:
                out.setup = decode_control(kind, bytes(body))
                apply_setup(out.setup, session)
            except ProtocolError as exc:
                raise reader.locate(exc, at) from None
        elif kind is Msg.DEVICE_STATE:
            _main_device_chunk(reader, body, at + MESSAGE_HEADER_SIZE, session, devices)
        out.messages[kind.name] += 1
        if kind is not Msg.KEEPALIVE:       # the source's keep coming until LOADED
            last = kind
    if last not in (Msg.COMPLETE, Msg.ERROR):
        raise reader.error(f"main channel ends after {last.name if last else 'the preamble'}, "
                           "expected COMPLETE or ERROR last (truncated?)", field="type",
                           received=last.name if last else None, expected="COMPLETE",
                           at=reader.size)
    return out


def _main_device_chunk(reader: ByteReader, body: memoryview, at: int, session: Session,
                       devices: DeviceChunks) -> None:
    """An old-way DEVICE_STATE message: BE u32 device index, then a chunk."""
    if len(body) < 4:
        raise reader.error("DEVICE_STATE payload: truncated: needs 4 bytes of device index",
                           field="device index", received=len(body), expected=4, at=at)
    index = int.from_bytes(body[:4], "big")
    known = session.devices
    assert known is not None, "SETUP, which lists them, came first"
    if index >= len(known):
        raise reader.error(f"DEVICE_STATE field 'device index': received {index}, expected < "
                           f"{len(known)} (devices in SETUP)", field="device index",
                           received=index, expected=f"< {len(known)}", at=at)
    idstr, instance_id = known[index]
    devices.add(idstr, instance_id, body[4:], reader, at + 4)
