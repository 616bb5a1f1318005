"""RAM packet headers in the QEMU 7.2 layout, pinned by real 7.2 captures (spec §2.2-2.6).

Every header of every captured multifd channel is decoded field by field
against an independent ``struct`` reading and re-encoded. 7.2's sender is
deterministic except for what it leaves stale (spec §2.2): in a packet
without pages, ``next_packet_size``, ``ramblock`` and the offsets are the
previous packet's; in any packet, offsets past ``normal_pages`` are. Those
bytes are the only ones a re-encoding may differ in, and the decoder must
ignore them.
"""

import struct

import numpy as np
import pytest

from captures import (
    BLOCKS, CHANNEL_FILES, HEADER_SIZE, PACKET_PAGES, PAGE_SIZE, PATTERNS, pattern_page,
    read_channel,
)
from fastmfd import _core
from wire_errors import put_bytes, put_u64

COMPRESSION = {"pattern-none": 0, "pattern-zlib": _core.FLAG_ZLIB,
               "pattern-zstd": _core.FLAG_ZSTD}


def codec_for(pattern, regions=BLOCKS):
    return _core.RamPacketCodec(PACKET_PAGES, PAGE_SIZE, "qemu-7.2",
                                compression=COMPRESSION[pattern], regions=regions)


def raw_fields(header):
    """(flags, pages_alloc, normal_pages, next_packet_size, packet_num, ramblock, offsets)."""
    flags, alloc, normal, next_size, num = struct.unpack_from(">IIIIQ", header, 8)
    ramblock = header[64:320].split(b"\0")[0].decode()
    offsets = struct.unpack_from(f">{PACKET_PAGES}Q", header, 320)
    return flags, alloc, normal, next_size, num, ramblock, offsets


@pytest.fixture(params=[(p, c) for p in PATTERNS for c in CHANNEL_FILES],
                ids=lambda pc: f"{pc[0]}/{pc[1]}")
def channel(request, qemu72_captures):
    """(pattern, list of RawPacket) for one captured multifd channel."""
    pattern, conn = request.param
    return pattern, read_channel(qemu72_captures, pattern, conn)[1]


def test_every_header_decodes_field_by_field(channel):
    pattern, packets = channel
    codec = codec_for(pattern)
    assert codec.header_size == HEADER_SIZE == 1344
    for raw in packets:
        flags, alloc, normal, next_size, num, ramblock, offsets = raw_fields(raw.header)
        pkt = codec.decode(raw.header)
        assert (pkt.flags, pkt.pages_alloc, pkt.normal_pages, pkt.packet_num) == \
            (flags, alloc, normal, num)
        assert pkt.zero_pages == 0 and len(pkt.zero_offsets) == 0
        assert pkt.is_sync == bool(flags & 1)
        assert pkt.checksum == 0 and not pkt.stored
        if normal:
            assert pkt.ramblock == ramblock
            assert pkt.offsets.dtype == np.uint64
            assert pkt.offsets.tolist() == list(offsets[:normal])
            assert pkt.next_packet_size == next_size
            assert pkt.payload_size == len(raw.payload)
        else:
            # Stale values from the previous packet are not reported (§2.2).
            assert (pkt.ramblock, len(pkt.offsets), pkt.payload_size) == ("", 0, 0)


def test_every_header_reencodes_except_stale_bytes(channel):
    pattern, packets = channel
    codec = codec_for(pattern)
    out = bytearray(HEADER_SIZE)
    for raw in packets:
        pkt = codec.decode(raw.header)
        codec.encode(out, flags=pkt.flags, packet_num=pkt.packet_num, ramblock=pkt.ramblock,
                     normal=pkt.offsets, next_packet_size=pkt.next_packet_size)
        if pkt.normal_pages:
            meaningful = 320 + 8 * pkt.normal_pages
            assert out[:meaningful] == raw.header[:meaningful], f"packet at {raw.position}"
            assert out[meaningful:] == bytes(HEADER_SIZE - meaningful)
        else:
            # Only magic, version, flags, pages_alloc, normal_pages, packet_num
            # and the (unused) zeros are the 7.2 sender's own for this packet.
            for start, end in ((0, 20), (24, 64)):
                assert out[start:end] == raw.header[start:end], f"packet at {raw.position}"


def test_deterministic_headers_reencode_byte_exact(channel):
    """Full data packets and each channel's first SYNC carry nothing stale."""
    pattern, packets = channel
    codec = codec_for(pattern)
    exact = [packets[0]] + [p for p in packets if p.normal_pages == PACKET_PAGES]
    assert len(exact) > 10
    out = bytearray(HEADER_SIZE)
    for raw in exact:
        pkt = codec.decode(raw.header)
        codec.encode(out, flags=pkt.flags, packet_num=pkt.packet_num, ramblock=pkt.ramblock,
                     normal=pkt.offsets, next_packet_size=pkt.next_packet_size)
        assert bytes(out) == raw.header, f"packet at {raw.position}"


def test_first_sync_packet(qemu72_captures):
    """pattern-none/conn1.bin at byte 64: the setup SYNC, all zero but the header words."""
    _, packets = read_channel(qemu72_captures, "pattern-none", "conn1.bin")
    raw = packets[0]
    assert raw.position == 64
    assert raw.header.hex() == ("11223344" "00000001" "00000001" "00000080"
                                + "00" * (HEADER_SIZE - 16))
    pkt = codec_for("pattern-none").decode(raw.header)
    assert pkt.is_sync and pkt.flags == _core.FLAG_SYNC
    assert (pkt.pages_alloc, pkt.normal_pages, pkt.packet_num, pkt.payload_size) == (128, 0, 0, 0)


def test_first_data_packet_and_its_pages(qemu72_captures):
    """pattern-none/conn1.bin at byte 1408: 128 pages of block mem, raw after the header."""
    _, packets = read_channel(qemu72_captures, "pattern-none", "conn1.bin")
    raw = packets[1]
    assert raw.position == 64 + HEADER_SIZE
    pkt = codec_for("pattern-none").decode(raw.header)
    assert (pkt.flags, pkt.normal_pages, pkt.next_packet_size, pkt.packet_num) == \
        (0, 128, 128 * PAGE_SIZE, 2)
    assert pkt.ramblock == "mem"
    assert pkt.offsets[:3].tolist() == [0x1000, 0x2000, 0x3000]
    # The offsets say where each payload page goes: check against the pattern.
    for k, offset in enumerate(pkt.offsets.tolist()):
        page = raw.payload[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
        assert page == pattern_page(offset // PAGE_SIZE)
        assert offset // PAGE_SIZE % 4, "zero pages travel on the main channel in 7.2"


@pytest.mark.parametrize("pattern, flags", [("pattern-zlib", 0x2), ("pattern-zstd", 0x4)])
def test_compressed_data_packet(qemu72_captures, pattern, flags):
    _, packets = read_channel(qemu72_captures, pattern, "conn1.bin")
    raw = packets[1]
    pkt = codec_for(pattern).decode(raw.header)
    assert pkt.flags == flags and pkt.normal_pages == 128 and pkt.ramblock == "mem"
    assert pkt.payload_size == pkt.next_packet_size == len(raw.payload)
    assert 0 < pkt.payload_size < 128 * PAGE_SIZE


def empty_packets_after_data(packets):
    return [p for p in packets if p.normal_pages == 0 and p.previous is not None
            and struct.unpack_from(">I", p.previous, 16)[0] > 0]


def test_stale_fields_of_empty_packets_are_ignored(qemu72_captures):
    """The empty follow-up of a data+SYNC packet repeats next_size, ramblock and offsets."""
    _, packets = read_channel(qemu72_captures, "pattern-none", "conn1.bin")
    data_sync, empty = packets[-3], packets[-2]
    assert data_sync.header[8:12] == b"\0\0\0\1" and data_sync.normal_pages == 1
    assert empty.header[8:12] == b"\0\0\0\0" and empty.normal_pages == 0
    assert empty.next_packet_size == 4096, "the capture holds a stale next_packet_size"
    assert empty.header[64:320] == data_sync.header[64:320] != bytes(256)
    assert empty.header[24:32] == data_sync.header[24:32], "packet_num repeats"
    pkt = codec_for("pattern-none", regions={"mem": BLOCKS["mem"]}).decode(empty.header)
    assert (pkt.flags, pkt.normal_pages, pkt.payload_size, pkt.ramblock) == (0, 0, 0, "")


def test_every_captured_empty_packet_with_stale_fields_decodes(qemu72_captures):
    seen = 0
    for pattern in PATTERNS:
        # A region table without the stale block's name: the name is not looked up.
        codec = codec_for(pattern, regions={"pc.rom": BLOCKS["pc.rom"]})
        for conn in CHANNEL_FILES:
            for raw in empty_packets_after_data(read_channel(qemu72_captures, pattern, conn)[1]):
                assert raw.header[64:320] != bytes(256)
                pkt = codec.decode(raw.header)
                assert (pkt.normal_pages, pkt.payload_size, pkt.ramblock) == (0, 0, "")
                seen += 1
    assert seen >= 6


@pytest.fixture
def stale_empty_packet(qemu72_captures):
    _, packets = read_channel(qemu72_captures, "pattern-none", "conn1.bin")
    return packets[-2].header


@pytest.mark.parametrize("garbage", [
    pytest.param(lambda h: put_bytes(h, 64, b"x" * 256), id="unterminated-ramblock"),
    pytest.param(lambda h: put_u64(h, 320, 0x1234), id="unaligned-offset"),
    pytest.param(lambda h: put_u64(h, 328, 1 << 62), id="offset-past-every-region"),
    pytest.param(lambda h: put_bytes(h, 20, b"\xff\xff\xff\xff"), id="huge-next-packet-size"),
])
def test_anything_stale_is_ignored_in_an_empty_packet(stale_empty_packet, garbage):
    pkt = codec_for("pattern-none").decode(garbage(stale_empty_packet))
    assert (pkt.normal_pages, pkt.payload_size, pkt.ramblock) == (0, 0, "")


def test_stale_offsets_past_normal_pages_are_ignored(qemu72_captures):
    """pc.bios: 46 pages; the 82 offsets after them are mem offsets from earlier packets."""
    _, packets = read_channel(qemu72_captures, "pattern-none", "conn1.bin")
    raw = next(p for p in packets if b"pc.bios" in p.header[64:320])
    stale = struct.unpack_from(">82Q", raw.header, 320 + 8 * 46)
    assert max(stale) >= BLOCKS["pc.bios"], "the capture holds out-of-block stale offsets"
    pkt = codec_for("pattern-none", regions={"pc.bios": BLOCKS["pc.bios"]}).decode(raw.header)
    assert pkt.normal_pages == 46 and len(pkt.offsets) == 46


def test_unterminated_ramblock_is_cut_at_255_bytes_like_7_2():
    """7.2 forces byte 255 of ramblock to NUL before the lookup (spec §3.1 #7)."""
    codec = _core.RamPacketCodec(PACKET_PAGES, PAGE_SIZE, "qemu-7.2")
    out = bytearray(HEADER_SIZE)
    codec.encode(out, ramblock="r" * 255, normal=[0])
    out[64 + 255] = ord("r")
    assert codec.decode(out).ramblock == "r" * 255


def test_layout_has_no_zero_pages_and_no_extensions():
    codec = _core.RamPacketCodec(PACKET_PAGES, PAGE_SIZE, "qemu-7.2")
    with pytest.raises(ValueError, match="zero pages"):
        codec.encode(bytearray(HEADER_SIZE), ramblock="mem", zero=[0])
    with pytest.raises(ValueError, match="no fastmfd extensions"):
        _core.RamPacketCodec(PACKET_PAGES, PAGE_SIZE, "qemu-7.2", checksum=True)
    with pytest.raises(ValueError, match="no fastmfd extensions"):
        _core.RamPacketCodec(PACKET_PAGES, PAGE_SIZE, "qemu-7.2", extensions=_core.FLAG_STORED)
