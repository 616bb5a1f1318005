"""The multifd channels of a capture: init packets, then RAM and device packets by round."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from ... import _core
from ...errors import ProtocolError
from ...protocol.bytereader import ByteReader
from ...protocol.qemu import SYNC_PER_ROUND, QemuMainChannel
from ...protocol.security import NONCE_SIZE, PROOF_SIZE
from .contents import DeviceChunks, RamImage
from .records import Channel, FastmfdMainChannel, PacketRecord
from .session import COMPRESSION_NAMES, Session

if TYPE_CHECKING:
    from typing_extensions import Buffer     # collections.abc.Buffer from Python 3.12

__all__ = ["open_channels", "InflateBuffers", "ChannelDecoder", "check_rounds"]

DEFAULT_CHUNK_LIMIT = 64 << 20          # device chunk bound when no SETUP says otherwise
# Compression bits of the flags word: 3 bits in 7.2, 5 now (spec §2.4).
COMPRESSION_MASK = {_core.LAYOUT_QEMU72: 0x0E, _core.LAYOUT_CURRENT: 0x3E}
# What a source with an auth_key writes after a channel's init packet: its nonce, then
# (once the destination answered) its proof.
KEY_PROOF_SIZE = NONCE_SIZE + PROOF_SIZE
MULTIFD_MAGIC = _core.MULTIFD_MAGIC.to_bytes(4, "big")


def open_channels(found: list[tuple[ByteReader, tuple[str, int | None]]], session: Session) -> list[tuple[ByteReader, Channel]]:
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
        if _key_proof_follows(reader, session.key_proof):
            reader.take(KEY_PROOF_SIZE, "shared-key proof")
    return [opened[i] for i in sorted(opened)]


def _key_proof_follows(reader: ByteReader, said: bool | None) -> bool:
    """Whether the source's shared-key proof follows the init packet at the reader:
    as the main channel ``said``, or, with none, as the bytes show: a packet's magic
    not next but after the proof's bytes (or the file ending there)."""
    if said is not None:
        return said
    if reader.peek(4) == MULTIFD_MAGIC or reader.available() < KEY_PROOF_SIZE:
        return False
    return reader.peek(KEY_PROOF_SIZE + 4)[KEY_PROOF_SIZE:] in (b"", MULTIFD_MAGIC)


class InflateBuffers:
    """Where compressed payloads are inflated: one buffer for a packet's pages, one
    for a device chunk, for the whole capture. Decoding is sequential and what is
    kept is copied out of them, so every channel uses the same two: a buffer per
    channel file let 30 files of one 10-byte chunk each take 1.9 GB (a review)."""

    def __init__(self) -> None:
        self._buffers: dict[str, memoryview] = {}

    def get(self, kind: str, size: int) -> memoryview:
        """``size`` bytes of the ``kind`` buffer ("pages" or "chunk")."""
        buffer = self._buffers.get(kind)
        if buffer is None or len(buffer) < size:
            buffer = self._buffers[kind] = memoryview(bytearray(size))
        return buffer[:size]


class ChannelDecoder:
    """Decodes one multifd channel in order, a SYNC round at a time.

    The channel's compression is the session's, or else learnt from its first
    packet with pages; from then on one decompressor serves the whole channel,
    fed every packet in order (spec §4.1).
    """

    def __init__(self, reader: ByteReader, channel: Channel, layout: str, session: Session,
                 image: RamImage, devices: DeviceChunks, buffers: InflateBuffers) -> None:
        self.reader = reader
        self.channel = channel
        self.layout = layout
        self.session = session
        self.image = image
        self.zero_page = memoryview(bytes(session.page_size))
        self.devices = devices
        self.compression = session.compression
        self.codecs: dict[int, _core.RamPacketCodec] = {}
        self.stream: _core.Codec | None = None     # the channel's decompressor
        self.buffers = buffers
        self.round = 0
        self.done = False
        self.crc_chain = 0      # the checksum extension chains each CRC to the one before
        if self.compression is not None and (
                compression_name := COMPRESSION_NAMES.get(self.compression)):
            channel.compression = "auto" if session.compression_optional else compression_name

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

    def _method_of(self, flags: int) -> int:
        """The channel's compression; not known yet, the packet's own bits, or 0
        for bits that name no method (the decoder then refuses them)."""
        if self.compression is not None:
            return self.compression
        comp = flags & COMPRESSION_MASK[self.layout]
        return comp if comp in COMPRESSION_NAMES else 0

    def _codec(self, flags: int) -> _core.RamPacketCodec:
        comp = self._method_of(flags)
        codec = self.codecs.get(comp)
        if codec is None:
            s = self.session
            assert s.packet_pages is not None, "read_capture sets it before decoding"
            codec = self.codecs[comp] = _core.RamPacketCodec(
                s.packet_pages, s.page_size, self.layout, comp, s.regions,
                checksum=s.checksum, compression_optional=s.compression_optional and comp != 0)
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
            self._learn_compression(pkt.flags)
        payload_at = reader.pos
        payload = reader.take(pkt.payload_size, "payload")
        if self.session.checksum:
            self._check_crc("RAM packet", header, _core.RAM_CHECKSUM_AT, payload, pkt.checksum,
                            at)
        block = pkt.ramblock
        pages = self._pages(pkt.normal_pages, payload, payload_at,
                            bool(pkt.flags & (self.compression or 0)))
        for offset, page in zip(pkt.offsets.tolist(), pages):
            self.image.apply_located(block, offset, page, reader.path, at, self.round)
        for offset in pkt.zero_offsets.tolist():
            self.image.apply_located(block, offset, self.zero_page, reader.path, at, self.round)
        self.channel.packets.append(PacketRecord(
            at, "sync" if pkt.is_sync else "ram", pkt.flags, pkt.packet_num, block,
            pkt.normal_pages, pkt.zero_pages, reader.pos - at, pkt.payload_size, self.round))
        return pkt.is_sync

    def _pages(self, count: int, payload: memoryview, at: int,
               compressed: bool) -> list[memoryview]:
        """The ``count`` pages of a packet: slices of the payload, or of its decompression."""
        page_size = self.session.page_size
        if not compressed:
            return [payload[i * page_size:(i + 1) * page_size] for i in range(count)]
        if not count:
            return []
        out = self.buffers.get("pages", count * page_size)
        try:
            self._stream().decompress_into(payload, out)
        except ProtocolError as exc:
            raise self.reader.locate(exc, at) from None
        # One copy per page: pages outlive the shared buffer, and a page that
        # survives alone must not keep a whole packet alive (max_ram_bytes).
        return [memoryview(bytes(out[i * page_size:(i + 1) * page_size]))
                for i in range(count)]

    def _learn_compression(self, flags: int) -> None:
        """The channel's method, from the first packet that shows it (no SETUP said)."""
        self.compression = flags & COMPRESSION_MASK[self.layout]
        self.channel.compression = COMPRESSION_NAMES[self.compression]

    def _stream(self) -> _core.Codec:
        """The channel's one decompressor, RAM pages and device chunks alike (made by
        whichever comes first)."""
        if self.stream is None:
            assert self.compression, "called once the channel's compression is known"
            self.stream = _core.make_codec(COMPRESSION_NAMES[self.compression],
                                           compressing=False)
            assert self.stream is not None, "a method other than none has a codec"
        return self.stream

    def _inflate_chunk(self, payload: memoryview, at: int) -> memoryview:
        """A compressed device chunk, inflated through the channel's stream and copied
        out: a view of a buffer per chunk kept all of it alive (64 MiB for each 10-byte
        chunk of a capture without SETUP)."""
        limit = (self.session.chunk_size or DEFAULT_CHUNK_LIMIT) + _core.CHUNK_HEADER_SIZE
        out = self.buffers.get("chunk", limit)
        try:
            produced = self._stream().decompress_upto(payload, out)
        except ProtocolError as exc:
            raise self.reader.locate(exc, at) from None
        self.image.charge(produced, "device state", self.reader.path, at)
        return memoryview(bytes(out[:produced]))

    def _device_packet(self, at: int, flags: int) -> None:
        reader = self.reader
        header = reader.take(_core.DEVICE_HEADER_SIZE, "device state header")
        try:
            flags, idstr, instance_id, size = _core.decode_device_header(
                header, self._method_of(flags),
                compression_optional=self.session.compression_optional)
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        known = self.session.devices
        if known is not None and (idstr, instance_id) not in known:
            raise reader.error(f"device state packet: unknown device {idstr!r} instance "
                               f"{instance_id}", field="idstr", received=(idstr, instance_id),
                               expected="a device of SETUP", at=at)
        payload_at = reader.pos
        payload = reader.take(size, "device state payload")
        if self.session.checksum:
            trailer = reader.take(_core.DEVICE_CHECKSUM_SIZE, "device state checksum")
            self._check_crc("device state packet", header, None, payload,
                            int.from_bytes(trailer, "big"), at)
        if flags & COMPRESSION_MASK[self.layout]:
            if self.compression is None:
                self._learn_compression(flags)
            payload = self._inflate_chunk(payload, payload_at)
        self.devices.add(idstr, instance_id, payload, reader, payload_at)
        self.channel.packets.append(PacketRecord(
            at, "device", flags, None, idstr, 0, 0, reader.pos - at, size, self.round))

    def _check_crc(self, what: str, header: Buffer, checksum_at: int | None,
                   payload: memoryview, expected: int, at: int) -> None:
        """The checksum extension: CRC-32 of the header (its checksum field, if it
        has one, zero) and the payload as sent, continuing the CRC of the channel's
        packets before it (so that their order is checked too)."""
        header = bytearray(header)
        if checksum_at is not None:
            header[checksum_at:checksum_at + 8] = bytes(8)
        crc = zlib.crc32(payload, zlib.crc32(header, self.crc_chain))
        if crc != expected:
            raise self.reader.error(f"{what} field 'checksum': received {expected:#x}, "
                                    f"expected {crc:#x} (CRC-32 of the header and payload, "
                                    f"chained through the channel's packets)",
                                    field="checksum", received=expected, expected=crc, at=at)
        self.crc_chain = crc


def check_rounds(main: QemuMainChannel | FastmfdMainChannel | None, decoders: list[ChannelDecoder]) -> None:
    """Every RAM channel has one SYNC per round end of the main channel (spec §5.3)."""
    if isinstance(main, QemuMainChannel):
        expected = main.syncs
        what = ("MULTIFD_FLUSH record" if main.multifd_sync == SYNC_PER_ROUND
                else "RAM section end (EOS)")
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
