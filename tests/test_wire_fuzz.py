"""Hypothesis: decoders never crash on hostile bytes; encode -> decode round-trips.

"Never crash" means: a decoder either returns or raises ProtocolError —
no other exception, no segfault (which would kill the test run), whatever
the bytes. Random bytes mostly fail at the magic, so the deeper checks are
reached by mutating valid headers a few bytes at a time.
"""

import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fastmfd import _core
from fastmfd.errors import ProtocolError

U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)
MAGIC_VERSION = struct.pack(">II", _core.MULTIFD_MAGIC, 1)
# Names as QEMU idstrs are: UTF-8 without NUL, at most 255 bytes.
NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                min_size=1, max_size=64).filter(lambda s: len(s.encode()) <= 255)

RAM_CODECS = {
    "current": dict(packet_pages=8, layout="current", regions={"pc.ram": 1 << 16}),
    "current-zlib-ext": dict(packet_pages=8, layout="current", compression=_core.FLAG_ZLIB,
                             extensions=_core.FLAG_STORED, checksum=True,
                             regions={"pc.ram": 1 << 16}),
    "current-no-regions": dict(packet_pages=8, layout="current", compression=_core.FLAG_ZSTD),
    "qemu-7.2": dict(packet_pages=8, layout="qemu-7.2", regions={"pc.ram": 1 << 16}),
    "qemu-7.2-zlib": dict(packet_pages=8, layout="qemu-7.2", compression=_core.FLAG_ZLIB),
}


def ram_decoder(name):
    """decode(), checked against the lean validate(): same count or the same error."""
    codec = _core.RamPacketCodec(**RAM_CODECS[name])

    def decode(data):
        try:
            count = codec.validate(data)
        except ProtocolError as err:
            with pytest.raises(ProtocolError) as info:
                codec.decode(data)
            assert (info.value.field, info.value.received, info.value.expected) == \
                (err.field, err.received, err.expected)
            raise
        packet = codec.decode(data)
        assert count == packet.normal_pages + packet.zero_pages
    return decode


DECODERS = {
    "channel header": (_core.decode_channel_header, _core.CHANNEL_HEADER_SIZE),
    "init packet": (lambda b: _core.decode_init_packet(b, expected_uuid=bytes(16), channels=4),
                    _core.INIT_PACKET_SIZE),
    "device header": (lambda b: _core.decode_device_header(b, _core.FLAG_ZLIB), 276),
    "chunk header": (_core.decode_chunk_header, _core.CHUNK_HEADER_SIZE),
    **{f"RAM {name}": (ram_decoder(name), _core.RamPacketCodec(8).header_size) for name in RAM_CODECS},
}


def decodes_or_refuses(decode, data):
    try:
        decode(bytes(data))
    except ProtocolError:
        pass


def valid_headers():
    """One or more valid encodings per decoder, as mutation seeds."""
    seeds = {}
    out = bytearray(12)
    _core.encode_channel_header(out, 2)
    seeds["channel header"] = [bytes(out)]
    out = bytearray(64)
    _core.encode_init_packet(out, bytes(16), 3)
    seeds["init packet"] = [bytes(out)]
    out = bytearray(276)
    _core.encode_device_header(out, "nic0", 1, 100, _core.FLAG_ZLIB)
    seeds["device header"] = [bytes(out)]
    out = bytearray(12)
    _core.encode_chunk_header(out, 9, 1)
    seeds["chunk header"] = [bytes(out)]
    for name, params in RAM_CODECS.items():
        codec = _core.RamPacketCodec(**params)
        comp = params.get("compression", 0)
        out = bytearray(codec.header_size)
        packets = []
        for fields in (dict(normal=[0, 0x1000, 0x3000]), dict(flags=_core.FLAG_SYNC)):
            if "normal" in fields:
                fields.update(ramblock="pc.ram", flags=comp,
                              next_packet_size=77 if comp else None)
            codec.encode(out, **fields)
            codec.decode(out)
            packets.append(bytes(out))
        seeds[f"RAM {name}"] = packets
    return seeds


SEEDS = valid_headers()


@given(st.sampled_from(sorted(DECODERS)), st.sampled_from([b"", MAGIC_VERSION]), st.binary())
def test_random_bytes(name, prefix, body):
    decodes_or_refuses(DECODERS[name][0], prefix + body)


@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_random_bytes_of_exactly_the_header_size(name, data):
    decode, size = DECODERS[name]
    prefix = data.draw(st.sampled_from([b"", MAGIC_VERSION]))
    decodes_or_refuses(decode, prefix + data.draw(st.binary(min_size=size, max_size=size)))


@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_mutated_valid_headers(name, data):
    decode, _ = DECODERS[name]
    header = bytearray(data.draw(st.sampled_from(SEEDS[name])))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(header) - 1))
        header[position] = data.draw(st.integers(0, 255))
    decodes_or_refuses(decode, header)


# ---------------------------------------------------------------- round trips

@st.composite
def ram_packets(draw):
    """(codec parameters, encode arguments) for an arbitrary valid RAM packet."""
    pages = draw(st.integers(1, 1024))
    page_size = draw(st.sampled_from([4096, 65536]))
    layout = draw(st.sampled_from(["current", "qemu-7.2"]))
    compression = draw(st.sampled_from([0, _core.FLAG_ZLIB, _core.FLAG_ZSTD]))
    extended = layout == "current" and draw(st.booleans())
    region_pages = draw(st.integers(1, 4096))
    ramblock = draw(NAMES)
    codec = dict(packet_pages=pages, page_size=page_size, layout=layout, compression=compression,
                 extensions=_core.FLAG_STORED if extended else 0, checksum=extended,
                 regions={ramblock: region_pages * page_size, "other": page_size})
    npages = draw(st.integers(0, min(pages, region_pages)))   # no more than the region has
    offsets = draw(st.lists(st.integers(0, region_pages - 1), min_size=npages, max_size=npages))
    nzero = draw(st.integers(0, npages)) if layout == "current" else 0
    normal = [o * page_size for o in offsets[:npages - nzero]]
    zero = [o * page_size for o in offsets[npages - nzero:]]
    flags = _core.FLAG_SYNC if draw(st.booleans()) else 0
    stored = extended and compression and draw(st.booleans())
    if normal and compression and not stored:
        next_size = draw(st.integers(1, 1 << 20))
    else:
        next_size = len(normal) * page_size
    if npages:
        flags |= compression | (_core.FLAG_STORED if stored else 0)
    args = dict(flags=flags, packet_num=draw(U64), ramblock=ramblock if npages else "",
                normal=normal, zero=zero, next_packet_size=next_size,
                checksum=draw(U64) if extended else 0)
    return codec, args


@given(ram_packets())
def test_ram_packet_round_trip(packet):
    params, args = packet
    codec = _core.RamPacketCodec(**params)
    out = bytearray(codec.header_size + 8)
    out[-8:] = b"\xa5" * 8
    assert codec.encode(out, **args) == codec.header_size
    assert out[-8:] == b"\xa5" * 8, "the encoder wrote past the header"
    pkt = codec.decode(out)
    npages = len(args["normal"]) + len(args["zero"])
    pure_sync = npages == 0 and params["layout"] == "current"
    assert pkt.flags == args["flags"]
    assert pkt.pages_alloc == (0 if pure_sync else params["packet_pages"])
    assert (pkt.normal_pages, pkt.zero_pages) == (len(args["normal"]), len(args["zero"]))
    assert pkt.offsets.tolist() == args["normal"]
    assert pkt.zero_offsets.tolist() == args["zero"]
    assert pkt.packet_num == args["packet_num"]
    assert pkt.ramblock == args["ramblock"]
    assert pkt.checksum == args["checksum"]
    assert pkt.next_packet_size == args["next_packet_size"]
    assert pkt.payload_size == (args["next_packet_size"] if args["normal"] else 0)
    assert pkt.is_sync == bool(args["flags"] & _core.FLAG_SYNC)


@given(NAMES, U32, st.integers(1, 0xFFFFFFFF),
       st.sampled_from([0, _core.FLAG_ZLIB, _core.FLAG_ZSTD]))
def test_device_header_round_trip(idstr, instance_id, size, compression):
    out = bytearray(_core.DEVICE_HEADER_SIZE)
    _core.encode_device_header(out, idstr, instance_id, size, compression)
    assert _core.decode_device_header(out, compression, max_payload=0xFFFFFFFF) == \
        (0x40 | compression, idstr, instance_id, size)


@given(st.integers(0, 0xFFFFFFFE), st.sampled_from([0, _core.CHUNK_FLAG_LAST]))
def test_chunk_header_round_trip(idx, flags):
    out = bytearray(_core.CHUNK_HEADER_SIZE)
    _core.encode_chunk_header(out, idx, flags)
    assert _core.decode_chunk_header(out) == (idx, flags)


@given(st.binary(min_size=16, max_size=16), st.integers(0, 255), st.integers(1, 256))
def test_init_packet_round_trip(uuid, channel_id, extra):
    out = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(out, uuid, channel_id)
    assert _core.decode_init_packet(out, expected_uuid=uuid, channels=channel_id + extra) == \
        (uuid, channel_id)


@given(st.integers(0, 3))
def test_channel_header_round_trip(kind):
    out = bytearray(_core.CHANNEL_HEADER_SIZE)
    _core.encode_channel_header(out, kind)
    assert _core.decode_channel_header(out) == kind


def test_round_trip_accepts_numpy_offsets():
    codec = _core.RamPacketCodec(4, 4096)
    out = bytearray(codec.header_size)
    offsets = np.array([0, 4096], dtype=np.uint64)
    codec.encode(out, ramblock="r", normal=offsets)
    assert np.array_equal(codec.decode(out).offsets, offsets)
