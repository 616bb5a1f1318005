"""How much faster is the Cython RAM-header codec than the same work in struct?

One round = encode a full 128-page data packet header (current layout) into
a preallocated buffer, then validate it the way a receiver must: every
field of spec §3 plus fastmfd's extra checks. The struct baseline below does
exactly that work in pure Python, as fast as plain Python goes (precompiled
Structs, a dict lookup for the region). Target: Cython >= 20x the baseline.

Compared: ``cython-validate`` (RamPacketCodec.validate, the lean path),
``cython-decode`` (RamPacketCodec.decode, which also builds a RamPacket with
numpy offset arrays) and ``struct``.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fastmfd import _core
from fastmfd.errors import ProtocolError

PAGES = 128
PAGE_SIZE = 4096
REGION = "pc.ram"
REGION_SIZE = 1 << 30
FLAGS = _core.FLAG_ZLIB
NEXT_SIZE = 100_000
PACKET_NUM = 123456789


class StructRamCodec:
    """The current-layout RAM header codec in pure Python (struct), for comparison.

    Same encode, same checks in the same order as RamPacketCodec with
    compression ZLIB, no extensions, no checksum.
    """

    WORDS = struct.Struct(">IIIIIIQIIQQQ")      # the 64 bytes before ramblock
    SIZE = 320 + 8 * PAGES
    MAX_PAYLOAD = 1 << 20
    ALLOWED = _core.FLAG_SYNC | 0x3E            # SYNC | compression mask

    def __init__(self, regions: dict[str, int]) -> None:
        self.regions = {name.encode(): size for name, size in regions.items()}
        self.offsets = [struct.Struct(f">{n}Q") for n in range(PAGES + 1)]
        self.blank = bytes(self.SIZE)

    def encode(self, out, flags, packet_num, ramblock, normal, zero, next_size):
        name = ramblock.encode()
        if len(name) > 255 or b"\0" in name or len(normal) + len(zero) > PAGES:
            raise ValueError("does not fit")
        out[:self.SIZE] = self.blank
        self.WORDS.pack_into(out, 0, _core.MULTIFD_MAGIC, 1, flags, PAGES, len(normal),
                             next_size, packet_num, len(zero), 0, 0, 0, 0)
        out[64:64 + len(name)] = name
        self.offsets[len(normal) + len(zero)].pack_into(out, 320, *normal, *zero)

    def validate(self, buf) -> int:
        if len(buf) < self.SIZE:
            raise ProtocolError("truncated", field="length")
        (magic, version, flags, alloc, normal, next_size, _num, zero,
         unused32, unused0, unused1, unused2) = self.WORDS.unpack_from(buf)
        if magic != _core.MULTIFD_MAGIC:
            raise ProtocolError(f"magic {magic:#x}", field="magic")
        if version != 1:
            raise ProtocolError(f"version {version}", field="version")
        if flags & _core.FLAG_DEVICE_STATE or flags & ~self.ALLOWED:
            raise ProtocolError(f"flags {flags:#x}", field="flags")
        if alloc > PAGES:
            raise ProtocolError(f"pages_alloc {alloc}", field="pages_alloc")
        if normal > alloc:
            raise ProtocolError(f"normal_pages {normal}", field="normal_pages")
        if zero > alloc - normal:
            raise ProtocolError(f"zero_pages {zero}", field="zero_pages")
        if unused32 or unused0 or unused1 or unused2:
            raise ProtocolError("unused", field="unused")
        npages = normal + zero
        if npages == 0:
            if flags & 0x3E not in (0, FLAGS) or next_size:
                raise ProtocolError("empty packet", field="flags")
            return 0
        if flags & 0x3E != FLAGS:
            raise ProtocolError(f"flags {flags:#x}", field="flags")
        nul = buf.find(b"\0", 64, 320) if isinstance(buf, bytes) else bytes(buf[64:320]).find(b"\0")
        if nul < 0:
            raise ProtocolError("ramblock", field="ramblock")
        name = bytes(buf[64:nul if isinstance(buf, bytes) else 64 + nul])
        if normal == 0:
            if next_size:
                raise ProtocolError(f"next_packet_size {next_size}", field="next_packet_size")
        elif not 0 < next_size <= self.MAX_PAYLOAD:
            raise ProtocolError(f"next_packet_size {next_size}", field="next_packet_size")
        limit = self.regions.get(name)
        if limit is None:
            raise ProtocolError(f"ramblock {name!r}", field="ramblock")
        last = limit - PAGE_SIZE
        for offset in self.offsets[npages].unpack_from(buf, 320):
            if offset % PAGE_SIZE or offset > last:
                raise ProtocolError(f"offset {offset:#x}", field="offset")
        return npages


@pytest.fixture(scope="module")
def offsets():
    # Every other page: a realistic dirty pattern, no two offsets alike.
    return np.arange(0, 2 * PAGES * PAGE_SIZE, 2 * PAGE_SIZE, dtype=np.uint64)


@pytest.fixture(scope="module")
def cython_codec():
    return _core.RamPacketCodec(PAGES, PAGE_SIZE, compression=FLAGS,
                                regions={REGION: REGION_SIZE})


def cython_validate_round(codec, out, offsets):
    codec.encode(out, flags=FLAGS, packet_num=PACKET_NUM, ramblock=REGION, normal=offsets,
                 next_packet_size=NEXT_SIZE)
    return codec.validate(out)


def cython_decode_round(codec, out, offsets):
    codec.encode(out, flags=FLAGS, packet_num=PACKET_NUM, ramblock=REGION, normal=offsets,
                 next_packet_size=NEXT_SIZE)
    return codec.decode(out).normal_pages


def struct_round(codec, out, offsets):
    codec.encode(out, FLAGS, PACKET_NUM, REGION, offsets, (), NEXT_SIZE)
    return codec.validate(out)


@pytest.mark.benchmark(group="ram-header encode+validate (128 pages)")
@pytest.mark.parametrize("implementation", ["cython-validate", "cython-decode", "struct"])
def test_ram_header_encode_validate(benchmark, cython_codec, offsets, implementation):
    out = bytearray(cython_codec.header_size)
    if implementation == "struct":
        codec, args, round_ = StructRamCodec({REGION: REGION_SIZE}), offsets.tolist(), struct_round
    else:
        codec, args = cython_codec, offsets
        round_ = cython_validate_round if implementation == "cython-validate" \
            else cython_decode_round
    # Correct first: both implementations produce the same bytes, and each
    # refuses what the other refuses.
    assert round_(codec, out, args) == PAGES
    reference = bytearray(cython_codec.header_size)
    cython_validate_round(cython_codec, reference, offsets)
    assert out == reference
    for implementation_codec in (cython_codec, StructRamCodec({REGION: REGION_SIZE})):
        bad = bytearray(reference)
        struct.pack_into(">Q", bad, 320 + 8 * 5, REGION_SIZE)       # past the region end
        with pytest.raises(ProtocolError) as info:
            implementation_codec.validate(bad)
        assert info.value.field == "offset"
    benchmark.extra_info["header_bytes"] = len(out)
    # Many calls per timed round: one call is too short for the timer alone.
    assert benchmark.pedantic(round_, args=(codec, out, args), iterations=100, rounds=300,
                              warmup_rounds=20) == PAGES
