"""Every check RamPacketCodec.decode makes (spec §3.1-3.2 plus what QEMU forgets).

Each test starts from a valid header, breaks exactly one field and expects a
ProtocolError naming that field with the value received and the one
expected. The unbroken header is decoded first, so a test cannot pass
because its starting point was already invalid.
"""

import pytest

from fastmfd import _core
from wire_errors import put_bytes, put_u32, put_u64, raises_protocol_error

REGIONS = {"pc.ram": 1 << 20, "small": 10000}    # 256 pages; 2 whole pages + a bit
PAGES = 128
HEADER = _core.RamPacketCodec(PAGES).header_size
ZLIB, ZSTD, SYNC = _core.FLAG_ZLIB, _core.FLAG_ZSTD, _core.FLAG_SYNC


def make_codec(layout="current", compression=0, **kwargs):
    kwargs.setdefault("regions", REGIONS)
    return _core.RamPacketCodec(PAGES, 4096, layout, compression=compression, **kwargs)


def valid_packet(codec, compression=0, **fields):
    """A header ``codec`` accepts: by default 2 normal pages of pc.ram."""
    fields.setdefault("ramblock", "pc.ram")
    fields.setdefault("normal", [0x1000, 0x2000])
    if compression:
        fields.setdefault("flags", compression)
        fields.setdefault("next_packet_size", 100)
    out = bytearray(codec.header_size)
    codec.encode(out, **fields)
    codec.decode(out)
    return out


LAYOUTS = pytest.mark.parametrize("layout", ["current", "qemu-7.2"])


# ---------------------------------------------------------------- header words

@LAYOUTS
def test_magic(layout):
    codec = make_codec(layout)
    with raises_protocol_error("magic", "0x11223345", "0x11223344"):
        codec.decode(put_u32(valid_packet(codec), 0, 0x11223345))


@LAYOUTS
@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_version(layout, version):
    codec = make_codec(layout)
    with raises_protocol_error("version", version, "1"):
        codec.decode(put_u32(valid_packet(codec), 4, version))


@LAYOUTS
def test_pages_alloc_above_packet_pages(layout):
    codec = make_codec(layout)
    codec.decode(put_u32(valid_packet(codec), 12, PAGES))
    with raises_protocol_error("pages_alloc", PAGES + 1, f"<= {PAGES} (packet_pages)"):
        codec.decode(put_u32(valid_packet(codec), 12, PAGES + 1))


@LAYOUTS
def test_normal_pages_above_pages_alloc(layout):
    codec = make_codec(layout)
    packet = put_u32(valid_packet(codec), 12, 2)       # pages_alloc 2, normal_pages 2
    codec.decode(packet)
    with raises_protocol_error("normal_pages", 3, "<= 2 (pages_alloc)"):
        codec.decode(put_u32(packet, 16, 3))


def test_zero_pages_above_what_is_left_of_pages_alloc():
    codec = make_codec()
    packet = valid_packet(codec, zero=[0x3000])
    codec.decode(put_u32(packet, 32, PAGES - 2))
    with raises_protocol_error("zero_pages", PAGES - 1, f"<= {PAGES - 2} (pages_alloc - normal"):
        codec.decode(put_u32(packet, 32, PAGES - 1))


# ---------------------------------------------------------------- next_packet_size

@LAYOUTS
@pytest.mark.parametrize("size", [0, 8191, 8193, 0xFFFFFFFF])
def test_raw_payload_size_must_be_the_pages(layout, size):
    codec = make_codec(layout)
    with raises_protocol_error("next_packet_size", size, "8192 (normal_pages * page_size)"):
        codec.decode(put_u32(valid_packet(codec), 20, size))


@LAYOUTS
@pytest.mark.parametrize("compression", [ZLIB, ZSTD])
def test_compressed_payload_size_is_bounded(layout, compression):
    codec = make_codec(layout, compression)
    packet = valid_packet(codec, compression)
    bound = 1 << 20     # a 512 KiB packet never needs more than QEMU's 1 MiB buffer
    codec.decode(put_u32(packet, 20, 1))
    codec.decode(put_u32(packet, 20, bound))
    for size in (0, bound + 1, 0xFFFFFFFF):
        with raises_protocol_error("next_packet_size", size, f"1..{bound} compressed bytes"):
            codec.decode(put_u32(packet, 20, size))


def test_stored_payload_size_must_be_the_pages():
    codec = make_codec(compression=ZLIB, extensions=_core.FLAG_STORED)
    packet = valid_packet(codec, ZLIB, flags=ZLIB | _core.FLAG_STORED, next_packet_size=8192)
    with raises_protocol_error("next_packet_size", 100, "8192 (normal_pages * page_size)"):
        codec.decode(put_u32(packet, 20, 100))


def test_zero_pages_only_packet_has_no_payload():
    codec = make_codec()
    packet = valid_packet(codec, normal=[], zero=[0x1000])
    with raises_protocol_error("next_packet_size", 4096, "0 in a zero-pages-only packet"):
        codec.decode(put_u32(packet, 20, 4096))


@pytest.mark.parametrize("flags", [0, SYNC])
def test_packet_without_pages_has_no_payload(flags):
    codec = make_codec()
    packet = valid_packet(codec, flags=flags, ramblock="", normal=[])
    with raises_protocol_error("next_packet_size", 1, "0 in a packet without pages"):
        codec.decode(put_u32(packet, 20, 1))


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("layout, bit, allowed", [
    ("current", 0x80, "0x3f"), ("current", 0x200, "0x3f"), ("current", 0x80000000, "0x3f"),
    ("current", _core.FLAG_STORED, "0x3f"),     # not negotiated
    ("qemu-7.2", 0x10, "0xf"), ("qemu-7.2", 0x20, "0xf"), ("qemu-7.2", _core.FLAG_STORED, "0xf"),
])
def test_unknown_flag_bits(layout, bit, allowed):
    codec = make_codec(layout)
    with raises_protocol_error("flags", hex(bit), f"only bits {allowed}"):
        codec.decode(put_u32(valid_packet(codec), 8, bit))


def test_negotiated_extension_bit_is_accepted():
    codec = make_codec(extensions=_core.FLAG_STORED)
    assert codec.decode(put_u32(valid_packet(codec), 8, _core.FLAG_STORED)).stored


@LAYOUTS
def test_device_state_bit_in_a_ram_packet(layout):
    codec = make_codec(layout)
    with raises_protocol_error("flags", "0x40", "no DEVICE_STATE bit (0x40)"):
        codec.decode(put_u32(valid_packet(codec), 8, 0x40))


@LAYOUTS
@pytest.mark.parametrize("session, sent", [
    (0, ZLIB), (0, ZSTD), (0, 0x08), (ZLIB, 0), (ZLIB, ZSTD), (ZLIB, ZLIB | ZSTD), (ZSTD, ZLIB),
])
def test_compression_bits_must_match_the_session(layout, session, sent):
    codec = make_codec(layout, session)
    packet = put_u32(valid_packet(codec, session), 8, sent | SYNC)
    with raises_protocol_error("flags", hex(sent | SYNC), f"compression bits {hex(session)}"):
        codec.decode(packet)


def test_zero_only_packet_carries_the_compression_bit():
    """>= 9.0 sets the method's bit on a zero-pages-only packet too (spec §2.4)."""
    codec = make_codec(compression=ZLIB)
    packet = valid_packet(codec, ZLIB, normal=[], zero=[0], next_packet_size=0)
    with raises_protocol_error("flags", "0x0", "compression bits 0x2"):
        codec.decode(put_u32(packet, 8, 0))


@pytest.mark.parametrize("flags", [0, SYNC])
def test_7_2_empty_packets_carry_no_compression_bit(flags):
    """7.2 skips send_prepare for empty packets: 0x0 / 0x1 on a zlib channel (spec §2.4)."""
    codec = make_codec("qemu-7.2", ZLIB)
    out = bytearray(HEADER)
    codec.encode(out, flags=flags)
    assert codec.decode(out).flags == flags


@pytest.mark.parametrize("layout, session, sent", [
    ("current", 0, ZLIB), ("current", 0, 0x08), ("current", 0, 0x20),
    ("current", ZLIB, ZSTD), ("current", ZSTD, ZLIB | ZSTD),
    ("qemu-7.2", 0, ZLIB), ("qemu-7.2", 0, 0x08), ("qemu-7.2", ZLIB, ZSTD),
])
@pytest.mark.parametrize("sync", [0, SYNC])
def test_packet_without_pages_carries_no_other_method_bit(layout, session, sent, sync):
    """An empty or SYNC packet may leave out the session's compression bit, nothing more."""
    codec = make_codec(layout, session)
    empty = valid_packet(codec, flags=sync, ramblock="", normal=[])
    codec.decode(put_u32(empty, 8, sync | session))
    with raises_protocol_error("flags", hex(sync | sent), f"compression bits {hex(session)} or"):
        codec.decode(put_u32(empty, 8, sync | sent))


# ---------------------------------------------------------------- ramblock

def test_unterminated_ramblock():
    codec = make_codec()
    with raises_protocol_error("ramblock", "256 bytes without a NUL", "a NUL-terminated name"):
        codec.decode(put_bytes(valid_packet(codec), 64, b"p" * 256))


@LAYOUTS
def test_unknown_region(layout):
    codec = make_codec(layout)
    with raises_protocol_error("ramblock", "pc.rom", "a region of the session"):
        codec.decode(valid_packet(make_codec(layout, regions=None), ramblock="pc.rom"))


def test_a_peers_name_reaches_the_message_escaped():
    """A ramblock of escape sequences must not reach a terminal as such."""
    codec = make_codec()
    with raises_protocol_error("ramblock", "pc\\x1b[2J\\x9b", "a region of the session"):
        codec.decode(valid_packet(make_codec(regions=None), ramblock="pc\x1b[2J\x9b"))


def test_region_lookup_follows_each_packet():
    """The lookup caches the last region: a change of region must not reuse it."""
    codec = make_codec()
    assert codec.decode(valid_packet(codec, normal=[0x2000])).ramblock == "pc.ram"
    with raises_protocol_error("offset", "0x2000", "size of region 'small'"):
        codec.decode(valid_packet(make_codec(regions=None), ramblock="small", normal=[0x2000]))
    assert codec.decode(valid_packet(codec, normal=[0x3000])).ramblock == "pc.ram"


# ---------------------------------------------------------------- offsets

@LAYOUTS
@pytest.mark.parametrize("regions", [REGIONS, None], ids=["regions", "no-regions"])
@pytest.mark.parametrize("offset", [0x1001, 0x800, 0xFFF, (1 << 64) - 1])
def test_unaligned_offset(layout, regions, offset):
    codec = make_codec(layout, regions=regions)
    with raises_protocol_error("offset", hex(offset), "a multiple of the page size 4096"):
        codec.decode(put_u64(valid_packet(codec), 320 + 8, offset))


def test_unaligned_zero_page_offset():
    codec = make_codec()
    packet = valid_packet(codec, zero=[0x5000])
    with raises_protocol_error("offset", "0x5008", "a multiple of the page size 4096"):
        codec.decode(put_u64(packet, 320 + 16, 0x5008))


@LAYOUTS
@pytest.mark.parametrize("offset", [0x100000, 0x101000, 0xFFFFFFFFFFFFF000])
def test_offset_past_the_region_end(layout, offset):
    codec = make_codec(layout)
    codec.decode(put_u64(valid_packet(codec), 320, 0xFF000))     # the last page fits
    with raises_protocol_error("offset", hex(offset), "< 0x100000 (size of region 'pc.ram')"):
        codec.decode(put_u64(valid_packet(codec), 320, offset))


def test_zero_page_offset_past_the_region_end():
    codec = make_codec()
    packet = valid_packet(codec, zero=[0xFF000])
    with raises_protocol_error("offset", "0x100000", "size of region 'pc.ram'"):
        codec.decode(put_u64(packet, 320 + 16, 0x100000))


def test_partial_last_page_of_a_region_does_not_fit():
    codec = make_codec()
    codec.decode(valid_packet(codec, ramblock="small", normal=[0, 0x1000]))
    with raises_protocol_error("offset", "0x2000", "< 0x2710 (size of region 'small')"):
        codec.decode(valid_packet(make_codec(regions=None), ramblock="small", normal=[0x2000]))


def test_region_smaller_than_a_page_takes_no_page():
    codec = make_codec(regions={"tiny": 100})
    with raises_protocol_error("offset", "0x0", "< 0x64 (size of region 'tiny')"):
        codec.decode(valid_packet(make_codec(regions=None), ramblock="tiny", normal=[0]))


@LAYOUTS
def test_a_packet_lists_no_more_pages_than_its_region_has(layout):
    """Page 0 listed again and again made a packet of a one-page region fill a receive
    channel's 128 MiB buffers (review rev-res): as many pages as the region has pass."""
    codec = make_codec(layout)
    codec.decode(valid_packet(codec, ramblock="small", normal=[0, 0]))
    with raises_protocol_error("normal_pages", 3, "<= 2 (pages of region 'small')"):
        codec.decode(valid_packet(make_codec(layout, regions=None), ramblock="small",
                                  normal=[0, 0, 0]))


def test_zero_pages_count_towards_the_pages_of_the_region():
    codec = make_codec()
    codec.decode(valid_packet(codec, ramblock="small", normal=[0], zero=[0x1000]))
    with raises_protocol_error("zero_pages", 2, "<= 1 (pages of region 'small' - normal_pages)"):
        codec.decode(valid_packet(make_codec(regions=None), ramblock="small", normal=[0],
                                  zero=[0x1000, 0x1000]))


def test_offset_error_quotes_a_long_region_name_whole():
    name = "r" * 200
    codec = make_codec(regions={name: 4096})
    with raises_protocol_error("offset", "0x1000", f"< 0x1000 (size of region '{name}')"):
        codec.decode(valid_packet(make_codec(regions=None), ramblock=name, normal=[0x1000]))


# ---------------------------------------------------------------- unused fields

@pytest.mark.parametrize("offset", [36, 39, 40, 47, 48, 56, 63])
def test_current_layout_unused_fields_must_be_zero(offset):
    codec = make_codec()
    with raises_protocol_error("unused", "nonzero bytes", "all zero"):
        codec.decode(put_bytes(valid_packet(codec), offset, b"\x01"))


@pytest.mark.parametrize("offset", [36, 48, 56, 63])
def test_checksum_extension_claims_only_unused64_0(offset):
    codec = make_codec(checksum=True)
    assert codec.decode(put_bytes(valid_packet(codec), 40, b"\xff" * 8)).checksum == (1 << 64) - 1
    with raises_protocol_error("unused", "nonzero bytes", "all zero"):
        codec.decode(put_bytes(valid_packet(codec), offset, b"\x01"))


@pytest.mark.parametrize("offset", [36, 40, 63])
def test_7_2_ignores_its_unused_words(offset):
    codec = make_codec("qemu-7.2")
    assert codec.decode(put_bytes(valid_packet(codec), offset, b"\x01")).zero_pages == 0


def test_7_2_layout_reads_the_zero_pages_of_later_qemus():
    """Bytes 32..35 are 7.2's unused[0], always zero there; QEMU >= 9.0 counts its
    zero pages in them (listed after the normal ones), whatever its machine type:
    the layout that reads every QEMU source reads them, and bounds them."""
    codec = make_codec("qemu-7.2")
    packet = put_bytes(valid_packet(codec), 32, (1).to_bytes(4, "big"))
    packet = put_bytes(packet, 320 + 16, (0x5000).to_bytes(8, "big"))
    decoded = codec.decode(packet)
    assert (decoded.normal_pages, decoded.zero_pages) == (2, 1)
    assert decoded.zero_offsets.tolist() == [0x5000]
    with raises_protocol_error("zero_pages", PAGES - 1, f"<= {PAGES - 2}"):
        codec.decode(put_bytes(packet, 32, (PAGES - 1).to_bytes(4, "big")))


# ---------------------------------------------------------------- length

@LAYOUTS
@pytest.mark.parametrize("length", [0, 12, HEADER - 1])
def test_truncated_header(layout, length):
    codec = make_codec(layout)
    with raises_protocol_error("length", length, str(HEADER)):
        codec.decode(valid_packet(codec)[:length])
