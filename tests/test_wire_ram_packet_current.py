"""RAM packet headers in the current layout (QEMU >= 9.0, fastmfd's own; spec §2.3).

Golden bytes are written out by hand from the spec's table, field by field.
"""

import numpy as np
import pytest

from fastmfd import _core

RAMBLOCK = "pc.ram"


def hexname(name, width=256):
    return name.encode().hex() + "00" * (width - len(name))


def offsets_hex(*offsets, pages):
    return "".join(f"{o:016x}" for o in offsets) + "0" * 16 * (pages - len(offsets))


# 4-page packets: 320 + 4 * 8 = 352 bytes.
GOLDEN_DATA = (
    "11223344"                  # magic
    "00000001"                  # version
    "00000002"                  # flags: ZLIB
    "00000004"                  # pages_alloc
    "00000002"                  # normal_pages
    "00000123"                  # next_packet_size: compressed bytes
    "0000000000000007"          # packet_num
    "00000001"                  # zero_pages
    "00000000"                  # unused32
    + "00" * 24                 # unused64[3]
    + hexname(RAMBLOCK)
    + offsets_hex(0x1000, 0x3000, 0x8000, pages=4)  # normal pages, then zero pages
)

GOLDEN_SYNC = (
    "11223344" "00000001" "00000001"
    "00000000"                  # pages_alloc: 0 in a pure SYNC (>= 9.0 memsets)
    "00000000" "00000000"
    "ffffffffffffffff"          # packet_num
    + "00" * (352 - 32)
)

GOLDEN_CHECKSUM = (
    "11223344" "00000001" "00000000" "00000004" "00000001" "00001000"
    "0000000000000000" "00000000" "00000000"
    "00000000deadbeef"          # unused64[0]: payload CRC-32 (fastmfd extension)
    + "00" * 16
    + hexname(RAMBLOCK)
    + offsets_hex(0x5000, pages=4)
)


def test_golden_data_packet():
    codec = _core.RamPacketCodec(4, 4096, compression=_core.FLAG_ZLIB,
                                 regions={RAMBLOCK: 1 << 20})
    assert codec.header_size == 352
    out = bytearray(352)
    assert codec.encode(out, flags=_core.FLAG_ZLIB, packet_num=7, ramblock=RAMBLOCK,
                        normal=[0x1000, 0x3000], zero=[0x8000], next_packet_size=0x123) == 352
    assert out.hex() == GOLDEN_DATA
    pkt = codec.decode(bytes.fromhex(GOLDEN_DATA))
    assert (pkt.flags, pkt.pages_alloc, pkt.normal_pages, pkt.zero_pages) == (2, 4, 2, 1)
    assert (pkt.next_packet_size, pkt.packet_num, pkt.ramblock) == (0x123, 7, RAMBLOCK)
    assert pkt.offsets.tolist() == [0x1000, 0x3000]
    assert pkt.zero_offsets.tolist() == [0x8000]
    assert pkt.payload_size == 0x123 and not pkt.is_sync


def test_golden_pure_sync():
    codec = _core.RamPacketCodec(4, 4096)
    out = bytearray(352)
    codec.encode(out, flags=_core.FLAG_SYNC, packet_num=(1 << 64) - 1)
    assert out.hex() == GOLDEN_SYNC
    pkt = codec.decode(bytes.fromhex(GOLDEN_SYNC))
    assert pkt.is_sync and pkt.packet_num == (1 << 64) - 1
    assert (pkt.pages_alloc, pkt.normal_pages, pkt.payload_size, pkt.ramblock) == (0, 0, 0, "")


def test_golden_checksum_extension():
    codec = _core.RamPacketCodec(4, 4096, checksum=True)
    out = bytearray(352)
    codec.encode(out, ramblock=RAMBLOCK, normal=[0x5000], checksum=0xDEADBEEF)
    assert out.hex() == GOLDEN_CHECKSUM
    assert codec.decode(out).checksum == 0xDEADBEEF


def test_checksum_is_not_written_unless_negotiated():
    codec = _core.RamPacketCodec(4, 4096)
    out = bytearray(352)
    codec.encode(out, ramblock=RAMBLOCK, normal=[0x5000], checksum=0xDEADBEEF)
    assert out[40:48] == bytes(8)
    assert codec.decode(out).checksum == 0


def test_stored_extension_flag():
    codec = _core.RamPacketCodec(4, 4096, compression=_core.FLAG_ZSTD,
                                 extensions=_core.FLAG_STORED)
    out = bytearray(352)
    codec.encode(out, flags=_core.FLAG_ZSTD | _core.FLAG_STORED, ramblock=RAMBLOCK,
                 normal=[0, 0x1000])
    assert out[8:12].hex() == "00000104"
    pkt = codec.decode(out)
    assert pkt.stored and pkt.payload_size == pkt.next_packet_size == 2 * 4096


def test_default_header_is_128_pages():
    codec = _core.RamPacketCodec()
    assert (codec.packet_pages, codec.page_size, codec.header_size) == (128, 4096, 1344)


def test_zero_only_packet_has_no_payload():
    codec = _core.RamPacketCodec(4, 4096, compression=_core.FLAG_ZLIB)
    out = bytearray(352)
    codec.encode(out, flags=_core.FLAG_ZLIB, ramblock=RAMBLOCK, zero=[0, 0x2000])
    assert out[12:24].hex() == "00000004" "00000000" "00000000"
    pkt = codec.decode(out)
    assert (pkt.normal_pages, pkt.zero_pages, pkt.payload_size) == (0, 2, 0)
    assert pkt.zero_offsets.tolist() == [0, 0x2000] and pkt.ramblock == RAMBLOCK


def test_full_packet_of_the_largest_size():
    pages = 1024
    codec = _core.RamPacketCodec(pages, 65536, regions={"big": pages * 65536 * 2})
    normal = np.arange(0, pages * 65536 * 2, 2 * 65536, dtype=np.uint64)
    out = bytearray(codec.header_size)
    codec.encode(out, ramblock="big", normal=normal)
    pkt = codec.decode(out)
    assert np.array_equal(pkt.offsets, normal)
    assert pkt.payload_size == pages * 65536


def test_decoded_offsets_do_not_alias_the_input_buffer():
    codec = _core.RamPacketCodec(4, 4096)
    out = bytearray(352)
    codec.encode(out, ramblock=RAMBLOCK, normal=[0x1000])
    pkt = codec.decode(out)
    out[320:328] = bytes(8)
    assert pkt.offsets.tolist() == [0x1000]


@pytest.mark.parametrize("kwargs, message", [
    (dict(normal=range(0, 5 * 4096, 4096)), "do not fit"),
    (dict(normal=[0, 4096], zero=[8192, 12288, 16384]), "do not fit"),
    (dict(ramblock="x" * 256), "at most 255"),
    (dict(ramblock="a\0b"), "no NUL"),
])
def test_encoder_refuses_what_does_not_fit(kwargs, message):
    codec = _core.RamPacketCodec(4, 4096)
    with pytest.raises(ValueError, match=message):
        codec.encode(bytearray(352), **kwargs)


def test_encoder_refuses_a_short_buffer():
    with pytest.raises(ValueError, match="needs 352"):
        _core.RamPacketCodec(4, 4096).encode(bytearray(351))


@pytest.mark.parametrize("kwargs", [
    dict(packet_pages=0), dict(packet_pages=65537), dict(page_size=4095),
    dict(page_size=256), dict(page_size=1 << 22), dict(packet_pages=65536, page_size=1 << 15),
    dict(layout="qemu-10"), dict(compression=0x08), dict(extensions=0x200),
])
def test_codec_refuses_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        _core.RamPacketCodec(**kwargs)
