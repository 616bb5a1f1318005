"""Decode captured multifd channel bytes: fastmfd's own and a real QEMU 7.2's.

One file per captured connection. Each is classified by its first bytes, the
main channel is decoded first (it names the blocks and, for QEMU 7.2, carries
the zero pages), then the multifd channels are decoded round by round, so a
page sent again in a later round overwrites the earlier copy exactly as the
SYNC barriers order them on a real destination (spec §5.3, DESIGN §4.6)::

    FILE... ── first bytes ──┬─ "QEVM" ─────▶ qemu_main.decode_qemu_main ──┐ blocks, ZERO/PAGE
                             │                                             │ records per round
                             ├─ "FMFD" ─────▶ _decode_fastmfd_main ────────┤ SETUP, ROUND_END,
                             │  (channel hdr type 0)                       │ old-way device chunks
                             └─ 0x11223344 ─▶ _open_channels: init packet, id
                                (channel hdr type 2/3)     │
        for round r = 0, 1, ...:                           ▼
            main channel's records of round r, then every channel (by id) up to
            and including its next SYNC packet (one persistent decompressor each)
                                                           ▼
                 _RamImage {block: {offset: page}}     _DeviceChunks (ordered by idx)
                                                           ▼
           Capture: .channels, .blocks, .ram, .devices, .summary()  ──▶  fastmfd inspect

Every fault in any file is one :class:`~fastmfd.errors.ProtocolError` located
as ``"<file> at byte <offset>"`` and naming the field; every length read from
a file is checked against the bytes really there before it is used, and
decompression is bounded by the page count in the header (``_core`` codecs).

A fact two files must agree on (a block name or size, the UUID, the number
of rounds) is reported in the file where the disagreement shows, which is not
always the damaged one: the capture cannot tell which side is wrong.

Limits: QEMU captures are decoded up to the main channel's first device
section (device sections are not decoded, but the stream must end with
QEMU_VM_EOF and the VM description, which QEMU sends in precopy unless the
machine suppresses it); a multifd channel cut exactly at a packet boundary is
only caught when its main channel is in the capture (SYNC count against the
main channel's round ends). A compressed device-state packet is inflated
with a bound — the SETUP's chunk size, or 64 MiB without SETUP — since its
header does not say how large the chunk is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ... import _core
from ...protocol.bytereader import ByteReader
from ...errors import ConfigError, ProtocolError
from ...protocol.qemu import QEVM_MAGIC, QemuMainChannel, decode_qemu_main
from ...protocol.main_channel import (
    MAIN_MAGIC, MESSAGE_HEADER_SIZE, Msg, check_preamble, decode_control,
    decode_message_header,
)

__all__ = ["Capture", "Channel", "FastmfdMainChannel", "PacketRecord", "read_capture",
           "add_arguments", "cli_main"]

LAYOUTS = (_core.LAYOUT_CURRENT, _core.LAYOUT_QEMU72)
COMPRESSION_FLAGS = {"none": 0, "zlib": _core.FLAG_ZLIB, "zstd": _core.FLAG_ZSTD}
COMPRESSION_NAMES = {flag: name for name, flag in COMPRESSION_FLAGS.items()}
DEFAULT_CHUNK_LIMIT = 64 << 20          # device chunk bound when no SETUP says otherwise
# Compression bits of the flags word: 3 bits in 7.2, 5 now (spec §2.4).
COMPRESSION_MASK = {_core.LAYOUT_QEMU72: 0x0E, _core.LAYOUT_CURRENT: 0x3E}
CHANNEL_HEADER_PREFIX = (4).to_bytes(8, "big")    # BE u64 header_size = 4 (DESIGN §4.1)
MULTIFD_MAGIC = _core.MULTIFD_MAGIC.to_bytes(4, "big")
FMFD_MAGIC = MAIN_MAGIC.to_bytes(4, "big")
QEMU_PACKET_BYTES = 512 << 10        # MULTIFD_PACKET_SIZE: 128 pages of 4 KiB (spec §2.1)
DEFAULT_MAX_RAM_BYTES = 1 << 32
MAX_MAIN_DEVICE_MESSAGE = 1 << 30     # bound on an old-way DEVICE_STATE message


# ---------------------------------------------------------------- the result

@dataclass(frozen=True)
class PacketRecord:
    """One packet of a multifd channel.

    ``kind`` is ``"sync"`` for a RAM packet with the SYNC flag (which in 7.2
    may also carry pages), ``"ram"`` for other RAM packets (empty ones
    included) and ``"device"`` for device-state packets, whose ``ramblock``
    is the device idstr.
    """
    offset: int               # byte offset of the packet header in its file
    kind: str
    flags: int
    packet_num: int | None    # None for device-state packets
    ramblock: str             # "" for packets without pages
    normal_pages: int
    zero_pages: int
    wire_bytes: int           # header + payload
    payload_bytes: int        # bytes after the header (compressed size when compressed)
    round: int                # SYNC rounds completed on the channel before this packet


@dataclass
class Channel:
    """One multifd channel of the capture."""
    path: str
    id: int
    uuid: bytes
    kind: str                 # "multifd" or "device-state" (channel header type 3)
    channel_header: bool
    size: int                 # bytes in the file
    compression: str | None = None      # from the first packet with pages
    packets: list[PacketRecord] = field(default_factory=list)

    @property
    def syncs(self) -> int:
        return sum(1 for p in self.packets if p.kind == "sync")

    def summary(self) -> dict:
        ram = [p for p in self.packets if p.kind != "device"]
        repeated = sum(1 for a, b in zip(ram, ram[1:]) if a.packet_num == b.packet_num)
        return {
            "file": self.path, "id": self.id, "uuid": self.uuid.hex(), "kind": self.kind,
            "channel_header": self.channel_header, "compression": self.compression,
            "packets": len(self.packets),
            # QEMU 7.2's follow-up packets (spec §5.3): neither pages nor SYNC.
            "empty_packets": sum(1 for p in ram if p.kind == "ram"
                                 and p.normal_pages + p.zero_pages == 0),
            "device_packets": len(self.packets) - len(ram),
            "syncs": self.syncs,
            "syncs_with_pages": sum(1 for p in ram if p.kind == "sync" and p.normal_pages),
            "repeated_packet_num": repeated,
            "pages": {"normal": sum(p.normal_pages for p in ram),
                      "zero": sum(p.zero_pages for p in ram)},
            "flags": {f"{flags:#x}": n for flags, n in
                      sorted(Counter(p.flags for p in self.packets).items())},
            "bytes": self.size,
            "payload_bytes": sum(p.payload_bytes for p in self.packets),
        }


@dataclass
class FastmfdMainChannel:
    """fastmfd's main channel: SETUP and the message counts."""
    path: str
    size: int
    channel_header: bool
    setup: dict = field(default_factory=dict)
    messages: Counter = field(default_factory=Counter)

    @property
    def round_ends(self) -> int:
        return self.messages[Msg.ROUND_END.name]

    def summary(self) -> dict:
        return {"file": self.path, "format": "fastmfd", "bytes": self.size,
                "channel_header": self.channel_header, "setup": self.setup,
                "messages": dict(self.messages), "round_ends": self.round_ends}


@dataclass
class Capture:
    """A decoded capture: its channels, blocks, RAM image and device state."""
    layout: str
    page_size: int
    packet_pages: int
    main: QemuMainChannel | FastmfdMainChannel | None
    channels: list[Channel]                        # by channel id
    blocks: dict[str, int]                         # name -> size ({} without a main channel)
    ram: dict[str, dict[int, memoryview]]          # block -> {offset: page bytes}
    devices: dict[tuple[str, int], bytes]          # (idstr, instance_id) -> state
    pages_resent: int = 0                          # pages that arrived again
    pages_resent_changed: int = 0                  # ... with different content

    def summary(self) -> dict:
        """Everything the capture shows, as JSON-able data."""
        return {
            "layout": self.layout, "page_size": self.page_size,
            "packet_pages": self.packet_pages,
            "main": self.main.summary() if self.main is not None else None,
            "channels": [c.summary() for c in self.channels],
            # Declared blocks first; without a main channel, the blocks packets named.
            "blocks": {name: {"size": self.blocks.get(name),
                              "pages": len(self.ram.get(name, {})),
                              "pages_expected": self.blocks[name] // self.page_size
                              if name in self.blocks else None}
                       for name in {**self.blocks, **self.ram}},
            "ram": {"blocks": len(self.ram), "pages": sum(map(len, self.ram.values())),
                    "pages_resent": self.pages_resent,
                    "pages_resent_changed": self.pages_resent_changed},
            "devices": {f"{idstr}/{instance}": len(data)
                        for (idstr, instance), data in sorted(self.devices.items())},
        }


# ---------------------------------------------------------------- reading a capture

def read_capture(paths, *, packet_pages: int | None = None, page_size: int = 4096,
                 layout: str | None = None,
                 max_ram_bytes: int = DEFAULT_MAX_RAM_BYTES) -> Capture:
    """Decode the captured channel files ``paths`` (one per connection, any order).

    ``layout`` is ``"qemu-7.2"`` or ``"current"``; by default ``"qemu-7.2"``
    when a QEMU main channel is among the files. ``page_size`` and
    ``packet_pages`` (default: QEMU's 512 KiB of pages, 128 of 4 KiB) are used
    unless the main channel says otherwise (fastmfd's SETUP gives both, QEMU's
    target-page-bits the page size). ``max_ram_bytes`` bounds the distinct
    pages kept, since a small compressed capture can inflate a lot.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    _check_geometry(_default_packet_pages(page_size) if packet_pages is None else packet_pages,
                    page_size, ConfigError)
    readers = [ByteReader(str(path), _read_file(path)) for path in paths]
    if not readers:
        raise ConfigError("no capture files given")
    kinds = [_classify(reader) for reader in readers]
    mains = [(reader, kind) for reader, kind in zip(readers, kinds)
             if kind[0] != "multifd"]
    if len(mains) > 1:
        raise mains[1][0].error("a second main channel in the capture (first: "
                                f"{mains[0][0].path})", field="magic",
                                received="main channel", expected="one main channel", at=0)

    devices = _DeviceChunks()
    session = _Session(packet_pages=packet_pages, page_size=page_size)
    main = _decode_main(*mains[0], session, devices) if mains else None
    if session.packet_pages is None:
        session.packet_pages = _default_packet_pages(session.page_size)
    if layout is None:
        layout = _core.LAYOUT_QEMU72 if isinstance(main, QemuMainChannel) else \
            _core.LAYOUT_CURRENT

    channels = _open_channels([(r, k) for r, k in zip(readers, kinds) if k[0] == "multifd"],
                              session)
    image = _RamImage(session.regions or {}, session.page_size, max_ram_bytes)
    decoders = [_ChannelDecoder(reader, channel, layout, session, image, devices)
                for reader, channel in channels]
    _decode_rounds(main, decoders, image)
    _check_rounds(main, decoders)
    return Capture(
        layout=layout, page_size=session.page_size, packet_pages=session.packet_pages,
        main=main, channels=[channel for _, channel in channels],
        blocks=dict(session.regions or {}), ram=image.pages, devices=devices.finish(),
        pages_resent=image.resent, pages_resent_changed=image.changed)


def _decode_main(reader: ByteReader, kind: tuple[str, int | None], session: "_Session",
                 devices: "_DeviceChunks") -> QemuMainChannel | FastmfdMainChannel:
    """Decode the main channel; what it says about the session goes into ``session``."""
    name, header_type = kind
    if name == "fastmfd-main":
        return _decode_fastmfd_main(reader, header_type is not None, session, devices)
    main = decode_qemu_main(reader.path, reader.raw, session.page_size)
    session.page_size = main.page_size
    session.regions = main.blocks
    session.uuid = main.uuid
    return main


def _decode_rounds(main, decoders: list["_ChannelDecoder"], image: "_RamImage") -> None:
    """Apply the capture's pages in the order the SYNC barriers impose.

    Round r: the main channel's records before its r-th round end, then each
    channel up to and including its r-th SYNC. Within a round QEMU applies the
    sources concurrently (they do not overlap); across rounds the barrier
    orders them, so a later round's copy of a page wins.
    """
    main_rounds = main.rounds if isinstance(main, QemuMainChannel) else []
    r = 0
    while r < len(main_rounds) or any(not d.done for d in decoders):
        for record in main_rounds[r] if r < len(main_rounds) else ():
            image.apply_located(record.block, record.offset, record.page, main.path,
                                record.at)
        for decoder in decoders:
            if not decoder.done:
                decoder.decode_round()
        r += 1


def _default_packet_pages(page_size: int) -> int:
    """QEMU's packet size in pages: 512 KiB of target pages (128 of 4 KiB)."""
    return max(1, QEMU_PACKET_BYTES // page_size)


def _read_file(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None


def _check_geometry(packet_pages, page_size, error) -> None:
    """The packet geometry the core accepts, checked before it is used (error: class)."""
    if not isinstance(page_size, int) or isinstance(page_size, bool) \
            or not 512 <= page_size <= 1 << 21 or page_size & (page_size - 1):
        raise error(f"page_size {page_size!r}: expected a power of two in 512..2097152")
    if not isinstance(packet_pages, int) or isinstance(packet_pages, bool) \
            or not 1 <= packet_pages <= 65536 or packet_pages * page_size > 1 << 30:
        raise error(f"packet_pages {packet_pages!r}: expected 1..65536 and at most 1 GiB "
                    "per packet")


@dataclass
class _Session:
    """What the decoders must know, from the main channel or the arguments."""
    packet_pages: int | None                # None: QEMU's, from the page size
    page_size: int
    compression: int | None = None          # wire flag; None: learn it from the packets
    checksum: bool = False
    uuid: bytes | None = None
    channels: int | None = None
    regions: dict[str, int] | None = None
    devices: list[tuple[str, int]] | None = None
    chunk_size: int | None = None           # largest device chunk's data, from SETUP


def _classify(reader: ByteReader) -> tuple[str, int | None]:
    """``(kind, channel header type or None)``; leaves the reader after the channel header.

    kind: "qemu-main", "fastmfd-main" or "multifd".
    """
    header_type = None
    if reader.peek(8) == CHANNEL_HEADER_PREFIX:
        try:
            header_type = _core.decode_channel_header(reader.take(_core.CHANNEL_HEADER_SIZE,
                                                                  "channel header"))
        except ProtocolError as exc:
            raise reader.locate(exc, 0) from None
    magic = reader.peek(4)
    if header_type is None and magic == QEVM_MAGIC:
        return "qemu-main", None
    if header_type in (None, _core.CHANNEL_MAIN) and magic == FMFD_MAGIC:
        return "fastmfd-main", header_type
    if header_type in (None, _core.CHANNEL_MULTIFD, _core.CHANNEL_DEVICE_STATE) \
            and magic == MULTIFD_MAGIC:
        return "multifd", header_type
    expected = {None: "QEVM, FMFD, 0x11223344 or a channel header",
                _core.CHANNEL_MAIN: "FMFD (channel type 0 is main)",
                _core.CHANNEL_POSTCOPY: "no postcopy channel (type 1 is not supported)"}
    raise reader.error(f"unknown channel: first bytes {magic.hex() or '(none)'}, expected "
                       f"{expected.get(header_type, '0x11223344 (a multifd channel)')}",
                       field="magic", received=magic.hex(),
                       expected=expected.get(header_type, "0x11223344"))


# ---------------------------------------------------------------- fastmfd's main channel

def _decode_fastmfd_main(reader: ByteReader, channel_header: bool, session: _Session,
                         devices: "_DeviceChunks") -> FastmfdMainChannel:
    """Preamble, then messages; SETUP first, COMPLETE or ERROR last (DESIGN §4.5, §5)."""
    out = FastmfdMainChannel(reader.path, reader.size, channel_header)
    at = reader.pos
    try:
        check_preamble(reader.take(8, "preamble"))
    except ProtocolError as exc:
        raise reader.locate(exc, at) from None
    last = None
    while not reader.at_end():
        at = reader.pos
        try:
            kind, length = decode_message_header(reader.take(MESSAGE_HEADER_SIZE,
                                                             "message header"),
                                                 MAX_MAIN_DEVICE_MESSAGE)
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        body = reader.take(length, f"{kind.name} payload")
        if last is None and kind is not Msg.SETUP:
            raise reader.error(f"main channel: {kind.name} before SETUP", field="type",
                               received=kind.name, expected="SETUP first", at=at)
        if kind is Msg.SETUP:
            if last is not None:
                raise reader.error("main channel: a second SETUP", field="type",
                                   received="SETUP", expected="one SETUP", at=at)
            try:
                out.setup = decode_control(kind, bytes(body))
                _apply_setup(out.setup, session)
            except ProtocolError as exc:
                raise reader.locate(exc, at) from None
        elif kind is Msg.DEVICE_STATE:
            _main_device_chunk(reader, body, at + MESSAGE_HEADER_SIZE, session, devices)
        out.messages[kind.name] += 1
        last = kind
    if last not in (Msg.COMPLETE, Msg.ERROR):
        raise reader.error(f"main channel ends after {last.name if last else 'the preamble'}, "
                           "expected COMPLETE or ERROR last (truncated?)", field="type",
                           received=last.name if last else None, expected="COMPLETE",
                           at=reader.size)
    return out


def _main_device_chunk(reader: ByteReader, body: memoryview, at: int, session: _Session,
                       devices: "_DeviceChunks") -> None:
    """An old-way DEVICE_STATE message: BE u32 device index, then a chunk."""
    if len(body) < 4:
        raise reader.error("DEVICE_STATE payload: truncated: needs 4 bytes of device index",
                           field="device index", received=len(body), expected=4, at=at)
    index = int.from_bytes(body[:4], "big")
    if index >= len(session.devices):
        raise reader.error(f"DEVICE_STATE field 'device index': received {index}, expected < "
                           f"{len(session.devices)} (devices in SETUP)", field="device index",
                           received=index, expected=f"< {len(session.devices)}", at=at)
    idstr, instance_id = session.devices[index]
    devices.add(idstr, instance_id, body[4:], reader, at + 4)


_MISSING = object()


def _apply_setup(setup: dict, session: _Session) -> None:
    """Validate SETUP (DESIGN §4.5) and take the session's parameters from it."""
    def get(key, check, expected, default=_MISSING):
        value = setup.get(key, default)
        if value is _MISSING:
            raise ProtocolError(f"SETUP has no field {key!r} (expected {expected})",
                                field=f"SETUP.{key}", received=None, expected=expected)
        if not check(value):
            raise ProtocolError(f"SETUP field {key!r}: received {value!r:.80}, expected "
                                f"{expected}", field=f"SETUP.{key}", received=value,
                                expected=expected)
        return value

    def integer(lo, hi):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def uuid(v):
        try:
            return isinstance(v, str) and len(bytes.fromhex(v)) == 16
        except ValueError:
            return False

    session.uuid = bytes.fromhex(get("uuid", uuid, "32 hex digits"))
    page_size = get("page_size", integer(512, 1 << 21), "a power of two in 512..2097152")
    packet_pages = get("packet_pages", integer(1, 65536), "1..65536")
    try:
        _check_geometry(packet_pages, page_size, ValueError)
    except ValueError as exc:
        raise ProtocolError(f"SETUP: {exc}", field="SETUP.page_size", received=page_size,
                            expected="a valid packet geometry") from None
    session.page_size, session.packet_pages = page_size, packet_pages
    session.compression = COMPRESSION_FLAGS[get("compression", COMPRESSION_FLAGS.__contains__,
                                                "none, zlib or zstd")]
    session.channels = get("channels", integer(1, 256), "1..256")
    get("device_state_channels", integer(0, session.channels), f"0..{session.channels}", 0)
    get("channel_header", lambda v: isinstance(v, bool), "a boolean", True)
    session.checksum = get("checksum", lambda v: isinstance(v, bool), "a boolean", False)
    session.chunk_size = get("chunk_size", integer(1, 1 << 30), "1..1 GiB", None)

    def region(v):
        return (isinstance(v, dict) and _valid_name(v.get("name"))
                and integer(page_size, 1 << 62)(v.get("size")) and v["size"] % page_size == 0)

    regions = get("regions", lambda v: isinstance(v, list) and all(map(region, v)),
                  "a list of {name, size} (size a multiple of page_size)")
    session.regions = {r["name"]: r["size"] for r in regions}
    if len(session.regions) != len(regions):
        raise ProtocolError("SETUP field 'regions': a name is listed twice",
                            field="SETUP.regions", received=[r["name"] for r in regions],
                            expected="unique names")

    def device(v):
        return (isinstance(v, dict) and _valid_name(v.get("idstr"))
                and integer(0, 0xFFFFFFFF)(v.get("instance_id")))

    session.devices = [(d["idstr"], d["instance_id"]) for d in
                       get("devices", lambda v: isinstance(v, list) and all(map(device, v)),
                           "a list of {idstr, instance_id}", [])]


def _valid_name(name) -> bool:
    """A region or device name the wire can carry: 1..255 UTF-8 bytes, no NUL."""
    if not isinstance(name, str) or "\0" in name:
        return False
    try:
        return 0 < len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:      # JSON can carry lone surrogates
        return False


# ---------------------------------------------------------------- multifd channels

def _open_channels(found: list, session: _Session) -> list[tuple[ByteReader, Channel]]:
    """Read each channel's init packet; order the channels by id (not by file)."""
    opened: dict[int, tuple[ByteReader, Channel]] = {}
    first: tuple[str, bytes] | None = None      # (file, uuid) of the first channel read
    for reader, (_, header_type) in found:
        at = reader.pos
        try:
            uuid_seen, channel_id = _core.decode_init_packet(
                reader.take(_core.INIT_PACKET_SIZE, "init packet"),
                expected_uuid=session.uuid, channels=session.channels)
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        # Without a session UUID from the main channel, the channels must agree;
        # which one is wrong the capture cannot say, so name the reference file.
        first = first or (reader.path, uuid_seen)
        if uuid_seen != first[1]:
            raise reader.error(f"init packet field 'uuid': received {uuid_seen.hex()}, "
                               f"expected {first[1].hex()} (the uuid of {first[0]})",
                               field="uuid", received=uuid_seen.hex(),
                               expected=first[1].hex(), at=at + 8)
        if channel_id in opened:
            raise reader.error(f"init packet field 'id': received {channel_id}, already the id "
                               f"of {opened[channel_id][0].path}", field="id",
                               received=channel_id, expected="a channel id not yet seen",
                               at=at + 24)
        kind = "device-state" if header_type == _core.CHANNEL_DEVICE_STATE else "multifd"
        opened[channel_id] = (reader, Channel(reader.path, channel_id, uuid_seen, kind,
                                              header_type is not None, reader.size))
    return [opened[i] for i in sorted(opened)]


class _ChannelDecoder:
    """Decodes one multifd channel in order, a SYNC round at a time.

    The channel's compression is the session's, or else learnt from its first
    packet with pages; from then on one decompressor serves the whole channel,
    fed every packet in order (spec §4.1).
    """

    def __init__(self, reader: ByteReader, channel: Channel, layout: str, session: _Session,
                 image: "_RamImage", devices: "_DeviceChunks") -> None:
        self.reader = reader
        self.channel = channel
        self.layout = layout
        self.session = session
        self.image = image
        self.devices = devices
        self.compression = session.compression
        self.codecs: dict[int, _core.RamPacketCodec] = {}
        self.stream = None            # the channel's decompressor
        self.scratch: memoryview | None = None
        self.round = 0
        self.done = False
        if compression_name := COMPRESSION_NAMES.get(self.compression):
            channel.compression = compression_name

    def decode_round(self) -> None:
        """Decode packets up to and including the next SYNC, or to the end of the file."""
        reader = self.reader
        while not reader.at_end():
            at = reader.pos
            flags = int.from_bytes(reader.peek(12)[8:12], "big")
            if self.layout == _core.LAYOUT_CURRENT and flags & _core.FLAG_DEVICE_STATE:
                self._device_packet(at, flags)
            elif self._ram_packet(at, flags):
                self.round += 1
                return
        self.done = True

    def _codec(self, flags: int) -> _core.RamPacketCodec:
        comp = self.compression
        if comp is None:
            # Not known yet: take the packet's own bits; the codec rejects unknown ones.
            comp = flags & COMPRESSION_MASK[self.layout]
            comp = comp if comp in COMPRESSION_NAMES else 0
        codec = self.codecs.get(comp)
        if codec is None:
            s = self.session
            codec = self.codecs[comp] = _core.RamPacketCodec(
                s.packet_pages, s.page_size, self.layout, comp, s.regions,
                checksum=s.checksum)
        return codec

    def _ram_packet(self, at: int, flags: int) -> bool:
        """Decode a RAM packet and apply its pages; True if it carried SYNC."""
        reader = self.reader
        codec = self._codec(flags)
        header = reader.take(codec.header_size, "RAM packet header")
        try:
            pkt = codec.decode(header)
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        if pkt.normal_pages + pkt.zero_pages and self.compression is None:
            self.compression = pkt.flags & COMPRESSION_MASK[self.layout]
            self.channel.compression = COMPRESSION_NAMES[self.compression]
        payload_at = reader.pos
        payload = reader.take(pkt.payload_size, "payload")
        block = pkt.ramblock
        pages = self._pages(pkt.normal_pages, payload, payload_at)
        for offset, page in zip(pkt.offsets.tolist(), pages):
            self.image.apply_located(block, offset, page, reader.path, at)
        for offset in pkt.zero_offsets.tolist():
            self.image.apply_located(block, offset, self.image.zero_page, reader.path, at)
        self.channel.packets.append(PacketRecord(
            at, "sync" if pkt.is_sync else "ram", pkt.flags, pkt.packet_num, block,
            pkt.normal_pages, pkt.zero_pages, reader.pos - at, pkt.payload_size, self.round))
        return pkt.is_sync

    def _pages(self, count: int, payload: memoryview, at: int) -> list[memoryview]:
        """The ``count`` pages of a packet: slices of the payload, or of its decompression."""
        page_size = self.session.page_size
        if not self.compression:
            return [payload[i * page_size:(i + 1) * page_size] for i in range(count)]
        if not count:
            return []
        if self.stream is None:
            self.stream = _core.make_codec(COMPRESSION_NAMES[self.compression],
                                           compressing=False)
            self.scratch = memoryview(bytearray(self.session.packet_pages * page_size))
        out = self.scratch[:count * page_size]
        try:
            self.stream.decompress_into(payload, out)
        except ProtocolError as exc:
            raise self.reader.locate(exc, at) from None
        # One copy per page: pages outlive the scratch buffer, and a page that
        # survives alone must not keep a whole packet alive (max_ram_bytes).
        return [memoryview(bytes(out[i * page_size:(i + 1) * page_size]))
                for i in range(count)]

    def _inflate_chunk(self, payload: memoryview, at: int) -> memoryview:
        """A compressed device chunk, inflated through the channel's stream."""
        if self.stream is None:
            self.stream = _core.make_codec(COMPRESSION_NAMES[self.compression],
                                           compressing=False)
        limit = (self.session.chunk_size or DEFAULT_CHUNK_LIMIT) + _core.CHUNK_HEADER_SIZE
        out = bytearray(limit)
        try:
            produced = self.stream.decompress_upto(payload, out)
        except ProtocolError as exc:
            raise self.reader.locate(exc, at) from None
        return memoryview(out)[:produced]

    def _device_packet(self, at: int, flags: int) -> None:
        reader = self.reader
        header = reader.take(_core.DEVICE_HEADER_SIZE, "device state header")
        comp = self.compression if self.compression is not None else \
            flags & COMPRESSION_MASK[self.layout]
        try:
            flags, idstr, instance_id, size = _core.decode_device_header(header, comp)
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        known = self.session.devices
        if known is not None and (idstr, instance_id) not in known:
            raise reader.error(f"device state packet: unknown device {idstr!r} instance "
                               f"{instance_id}", field="idstr", received=(idstr, instance_id),
                               expected="a device of SETUP", at=at)
        payload_at = reader.pos
        payload = reader.take(size, "device state payload")
        if flags & COMPRESSION_MASK[self.layout]:
            payload = self._inflate_chunk(payload, payload_at)
        self.devices.add(idstr, instance_id, payload, reader, payload_at)
        self.channel.packets.append(PacketRecord(
            at, "device", flags, None, idstr, 0, 0, reader.pos - at, size, self.round))


def _check_rounds(main, decoders: list[_ChannelDecoder]) -> None:
    """Every RAM channel has one SYNC per round end of the main channel (spec §5.3)."""
    if isinstance(main, QemuMainChannel):
        expected, what = main.eos, "RAM section end (EOS)"
    elif isinstance(main, FastmfdMainChannel):
        expected, what = main.round_ends, "ROUND_END message"
    else:
        return
    for decoder in decoders:
        channel = decoder.channel
        if channel.kind == "multifd" and channel.syncs != expected:
            raise decoder.reader.error(
                f"channel {channel.id} has {channel.syncs} SYNC packets, expected {expected}: "
                f"one per {what} on the main channel "
                "(truncated?)", field="SYNC", received=channel.syncs, expected=expected,
                at=channel.size)


# ---------------------------------------------------------------- RAM image and device state

class _RamImage:
    """``{block: {offset: page}}``; a page applied again replaces the earlier copy."""

    def __init__(self, blocks: dict[str, int], page_size: int, max_bytes: int) -> None:
        self.pages: dict[str, dict[int, memoryview]] = {name: {} for name in blocks}
        self.zero_page = memoryview(bytes(page_size))
        self.page_size = page_size
        self.max_bytes = max_bytes
        self.count = 0
        self.resent = 0
        self.changed = 0

    def apply_located(self, block: str, offset: int, page: memoryview, path: str,
                      at: int) -> None:
        pages = self.pages.setdefault(block, {})
        old = pages.get(offset)
        if old is None:
            self.count += 1
            if self.count * self.page_size > self.max_bytes:
                raise ProtocolError(
                    f"the capture carries more than max_ram_bytes={self.max_bytes} of pages",
                    field="pages", received=self.count * self.page_size,
                    expected=f"<= {self.max_bytes}").at(f"{path} at byte {at}")
        else:
            self.resent += 1
            self.changed += old != page
        pages[offset] = page


class _DeviceChunks:
    """Device-state chunks by device, reassembled in idx order at the end."""

    def __init__(self) -> None:
        # (idstr, instance_id) -> {idx: (data, is_last, where)}
        self.streams: dict[tuple[str, int], dict[int, tuple[memoryview, bool, str]]] = {}

    def add(self, idstr: str, instance_id: int, payload: memoryview, reader: ByteReader,
            at: int) -> None:
        try:
            idx, flags = _core.decode_chunk_header(payload[:_core.CHUNK_HEADER_SIZE])
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        chunks = self.streams.setdefault((idstr, instance_id), {})
        if idx in chunks:
            raise reader.error(f"device {idstr!r} instance {instance_id}: chunk {idx} "
                               f"received twice (first {chunks[idx][2]})", field="idx",
                               received=idx, expected="each idx once", at=at)
        chunks[idx] = (payload[_core.CHUNK_HEADER_SIZE:], bool(flags & _core.CHUNK_FLAG_LAST),
                       reader.where(at))

    def finish(self) -> dict[tuple[str, int], bytes]:
        out = {}
        for (idstr, instance_id), chunks in sorted(self.streams.items()):
            name = f"device {idstr!r} instance {instance_id}"
            top = max(chunks)
            lasts = sorted(idx for idx, chunk in chunks.items() if chunk[1])
            if not lasts or lasts[0] != top:
                where = chunks[lasts[0] if lasts else top][2]
                raise ProtocolError(
                    f"{name}: chunk {top} is the highest, but the last-chunk flag is "
                    f"{'on chunk ' + str(lasts[0]) if lasts else 'on none (truncated?)'}",
                    field="flags", received=lasts[:1], expected=f"last flag on chunk {top}"
                ).at(where)
            missing = next((i for i in range(top) if i not in chunks), None)
            if missing is not None:
                raise ProtocolError(f"{name}: chunk {missing} of 0..{top} is missing",
                                    field="idx", received=sorted(chunks)[:8],
                                    expected=f"0..{top}").at(chunks[top][2])
            out[(idstr, instance_id)] = b"".join(chunks[i][0] for i in range(top + 1))
        return out


# ---------------------------------------------------------------- the command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="captured channel bytes, one file per connection, any order")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--packet-pages", type=int, default=None, metavar="N",
                        help="pages per RAM packet when no fastmfd main channel says "
                             "(default: QEMU's 512 KiB of pages, 128 of 4 KiB)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="RAM packet layout (default: qemu-7.2 with a QEMU main channel, "
                             "else current)")


def cli_main(args: argparse.Namespace) -> int:
    capture = read_capture(args.files, packet_pages=args.packet_pages, layout=args.layout)
    summary = capture.summary()
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    # Not a terminal (a pipe, a test): wide enough that no cell is cut.
    console = Console(width=None if sys.stdout.isatty() else 160)
    files = [ch["file"] for ch in summary["channels"]]
    if summary["main"] is not None:
        files.append(summary["main"]["file"])
    directory = os.path.commonpath([os.path.abspath(f) for f in files]) if files else ""
    if len(files) > 1 and directory:
        console.print(f"files in {directory}")

    def _short(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), directory) if len(files) > 1 else path

    console.print(f"layout {summary['layout']}, page size {summary['page_size']}, "
                  f"{summary['packet_pages']} pages per packet")
    main = summary["main"]
    if main is None:
        console.print("main channel: not in the capture")
    elif main["format"] == "qemu":
        sections = main["ram_sections"]
        console.print(
            f"main channel {_short(main['file'])}: QEMU {main['machine']}, {main['bytes']} bytes; "
            f"RAM sections start/part/end {sections['start']}/{sections['part']}/"
            f"{sections['end']}, {main['eos']} EOS, {main['zero_pages']} zero pages, "
            f"{main['page_records']} page records in the first {main['ram_bytes']} bytes; "
            f"then device sections from {main['first_device_section']!r} "
            f"({main['vm_devices']} devices in the VM description)")
    else:
        messages = ", ".join(f"{name} {n}" for name, n in main["messages"].items())
        console.print(f"main channel {_short(main['file'])}: fastmfd, {main['bytes']} bytes; "
                      f"messages: {messages}")

    table = Table(title="multifd channels")
    for column in ("file", "id", "kind", "compression", "packets", "normal pages",
                   "zero pages", "syncs", "empty", "repeated num", "flags", "bytes"):
        table.add_column(column, justify="left" if column in ("file", "kind", "flags")
                         else "right")
    for ch in summary["channels"]:
        table.add_row(_short(ch["file"]), str(ch["id"]), ch["kind"], ch["compression"] or "-",
                      str(ch["packets"]), str(ch["pages"]["normal"]), str(ch["pages"]["zero"]),
                      str(ch["syncs"]), str(ch["empty_packets"]),
                      str(ch["repeated_packet_num"]),
                      " ".join(f"{flag}:{n}" for flag, n in ch["flags"].items()),
                      str(ch["bytes"]))
    console.print(table)

    blocks = Table(title="RAM")
    for column in ("block", "size", "pages", "of"):
        blocks.add_column(column, justify="left" if column == "block" else "right")
    for name, block in summary["blocks"].items():
        blocks.add_row(name, _text(block["size"]), str(block["pages"]),
                       _text(block["pages_expected"]))
    ram = summary["ram"]
    console.print(blocks)
    console.print(f"{ram['pages']} pages in {ram['blocks']} blocks; "
                  f"{ram['pages_resent']} pages arrived again "
                  f"({ram['pages_resent_changed']} with new content)")
    if summary["devices"]:
        devices = Table(title="device state")
        devices.add_column("device")
        devices.add_column("bytes", justify="right")
        for name, size in summary["devices"].items():
            devices.add_row(name, str(size))
        console.print(devices)


def _text(value) -> str:
    return "?" if value is None else str(value)
