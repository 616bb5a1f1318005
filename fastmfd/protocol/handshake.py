"""The channel handshake: how every connection of a session opens (DESIGN §4.1, §4.2).

::

    main channel:     [channel header, type 0] FMFD magic, version, messages...
    multifd channel:  [channel header, type 2 or 3] 64-byte init packet, packets...

The channel header is present unless the session runs the "old way"
(``channel_header=False``); then the destination tells the kinds apart by
their first four bytes (the FMFD magic or the multifd magic). A connection
that breaks any rule here is refused before a byte of it reaches a region.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .. import _core
from ..errors import ProtocolError
from .main_channel import MAIN, MAIN_MAGIC, MAIN_VERSION, encode_preamble
from .setup import Setup
from .sockets import recv_exact

__all__ = ["ChannelHello", "read_hello", "main_channel_start", "channel_start",
           "accept_main_channel", "accept_channel"]


def _channel_header(kind: int) -> bytes:
    header = bytearray(_core.CHANNEL_HEADER_SIZE)
    _core.encode_channel_header(header, kind)
    return bytes(header)


def main_channel_start(channel_header: bool) -> bytes:
    """What a source sends first on its main channel."""
    return (_channel_header(_core.CHANNEL_MAIN) if channel_header else b"") + encode_preamble()


def channel_start(setup: Setup, channel_id: int) -> bytes:
    """What a source sends first on channel ``channel_id``: its header and init packet."""
    kind = _core.CHANNEL_MULTIFD if channel_id < setup.channels else _core.CHANNEL_DEVICE_STATE
    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, setup.uuid, channel_id)
    return (_channel_header(kind) if setup.channel_header else b"") + bytes(init)


@dataclass(frozen=True)
class ChannelHello:
    """What the first bytes of an accepted connection said."""
    kind: int                       # CHANNEL_MAIN / CHANNEL_MULTIFD / CHANNEL_DEVICE_STATE
    uuid: bytes | None = None       # multifd channels
    channel_id: int | None = None


def read_hello(sock: socket.socket, with_header: bool, expected_uuid: bytes | None,
               nchannels: int | None) -> ChannelHello:
    """Read and check a new connection's channel header and init packet.

    ``with_header`` None means "not known yet" (the first connection of a
    session): a channel header is recognised by its first 8 bytes.
    """
    first = recv_exact(sock, 4, "channel start")
    kind = None
    if with_header is None:
        with_header = first == b"\0\0\0\0"     # BE u64 header_size 4 starts with zeros
    if with_header:
        kind = _core.decode_channel_header(first + recv_exact(sock, 8, "channel header"))
        if kind == _core.CHANNEL_POSTCOPY:
            raise ProtocolError("channel header field 'channel_type': received 1 (postcopy "
                                "preempt), expected 0, 2 or 3: fastmfd has no postcopy",
                                field="channel_type", received=1, expected="0, 2 or 3")
        first = recv_exact(sock, 4, "channel start")
    magic = struct.unpack(">I", first)[0]
    if magic == MAIN_MAGIC and kind in (None, _core.CHANNEL_MAIN):
        return ChannelHello(_core.CHANNEL_MAIN)
    if magic == _core.MULTIFD_MAGIC and kind != _core.CHANNEL_MAIN:
        uuid, channel_id = _core.decode_init_packet(
            first + recv_exact(sock, _core.INIT_PACKET_SIZE - 4, "init packet"),
            expected_uuid, nchannels)
        return ChannelHello(kind if kind is not None else _core.CHANNEL_MULTIFD, uuid,
                            channel_id)
    expected = "the main channel magic" if kind == _core.CHANNEL_MAIN else (
        "the multifd magic 0x11223344" if kind is not None else
        f"the main channel magic {MAIN_MAGIC:#x} or the multifd magic 0x11223344")
    raise ProtocolError(f"new connection: first word {magic:#010x}, expected {expected}",
                        field="magic", received=hex(magic), expected=expected)


def accept_main_channel(sock: socket.socket) -> None:
    """Check the first connection of a session: the main channel, this version."""
    hello = read_hello(sock, None, None, None)
    if hello.kind != _core.CHANNEL_MAIN:
        raise ProtocolError("the first connection is a multifd channel, expected the "
                            "main channel", field="channel_type",
                            received=hello.kind, expected=_core.CHANNEL_MAIN)
    version = struct.unpack(">I", recv_exact(sock, 4, "version", MAIN))[0]
    if version != MAIN_VERSION:
        raise ProtocolError(f"main channel field 'version': received {version}, "
                            f"expected {MAIN_VERSION}", field="version",
                            received=version, expected=MAIN_VERSION)


def accept_channel(sock: socket.socket, setup: Setup, taken) -> int:
    """Check a multifd channel of the session ``setup``; returns its id.

    ``taken``: the ids already set up (a second connection for one is refused)."""
    hello = read_hello(sock, setup.channel_header, setup.uuid, setup.total_channels)
    ch = hello.channel_id
    if hello.kind == _core.CHANNEL_MAIN:
        raise ProtocolError("a second main channel connected", field="channel_type",
                            received=0, expected="2 (multifd) or 3 (device state)")
    if ch in taken:
        raise ProtocolError(f"init packet field 'id': received {ch}, which is already "
                            f"set up", field="id", received=ch, expected="an unused id")
    expected_kind = _core.CHANNEL_MULTIFD if ch < setup.channels else _core.CHANNEL_DEVICE_STATE
    if setup.channel_header and hello.kind != expected_kind:
        raise ProtocolError(f"channel {ch}: channel header type {hello.kind}, expected "
                            f"{expected_kind}", field="channel_type", received=hello.kind,
                            expected=expected_kind)
    return ch
