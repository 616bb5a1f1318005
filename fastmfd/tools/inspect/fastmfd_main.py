"""fastmfd's main channel in a capture: preamble, SETUP, messages, old-way device state."""

from __future__ import annotations

from ...errors import ProtocolError
from ...protocol.bytereader import ByteReader
from ...protocol.main_channel import (
    CAPTURE_VERSIONS, MESSAGE_HEADER_SIZE, OLD_WAY_CHECKSUM, OLD_WAY_PREFIX, Msg,
    check_preamble, decode_control, decode_message_header, old_way_checksum,
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
    """An old-way DEVICE_STATE message: BE u32 device index, then a chunk and, with
    SETUP's checksum, its CRC trailer (checked, and not part of the device's state)."""
    trailer = OLD_WAY_CHECKSUM.size if session.checksum else 0
    if len(body) < OLD_WAY_PREFIX.size + trailer:
        raise reader.error(f"DEVICE_STATE payload: truncated: needs "
                           f"{OLD_WAY_PREFIX.size + trailer} bytes of device index"
                           f"{' and checksum' if trailer else ''}", field="device index",
                           received=len(body), expected=OLD_WAY_PREFIX.size + trailer, at=at)
    if trailer:
        chunk_end = len(body) - trailer
        expected = old_way_checksum(body[:chunk_end])
        if body[chunk_end:] != expected:
            raise reader.error(f"DEVICE_STATE field 'checksum': received "
                               f"{bytes(body[chunk_end:]).hex()}, expected {expected.hex()}",
                               field="checksum", received=bytes(body[chunk_end:]).hex(),
                               expected=expected.hex(), at=at + chunk_end)
        body = body[:chunk_end]
    index = OLD_WAY_PREFIX.unpack_from(body)[0]
    known = session.devices
    assert known is not None, "SETUP, which lists them, came first"
    if index >= len(known):
        raise reader.error(f"DEVICE_STATE field 'device index': received {index}, expected < "
                           f"{len(known)} (devices in SETUP)", field="device index",
                           received=index, expected=f"< {len(known)}", at=at)
    idstr, instance_id = known[index]
    devices.add(idstr, instance_id, body[OLD_WAY_PREFIX.size:], reader,
                at + OLD_WAY_PREFIX.size)
