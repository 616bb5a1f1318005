"""IsalZlibCodec: ISA-L zlib streams both ways, stored blocks where deflate does not pay."""

from __future__ import annotations

import zlib

import pytest

from fastmfd import _core
from fastmfd.errors import ProtocolError
from fastmfd.tools.images import english_like_text

isal_zlib = pytest.importorskip("isal.isal_zlib")

PACKET = 512 << 10


def _random(size: int, seed: int) -> bytes:
    data = bytearray(size)
    _core.fill_pattern(data, seed, 0)
    return bytes(data)


TEXT = english_like_text(3 * PACKET).tobytes()
RANDOM = _random(2 * PACKET, 9)
# Random first (stored, after the zlib header), then text that deflates, random
# again between texts, an empty packet and small ones of either kind.
PACKETS = [RANDOM[:PACKET], TEXT[:PACKET], RANDOM[PACKET:], TEXT[PACKET:2 * PACKET], b"",
           TEXT[2 * PACKET:2 * PACKET + 4096], RANDOM[:100]]


def _stream() -> list[bytes]:
    codec = _core.make_codec("zlib", True, 1)
    assert isinstance(codec, _core.IsalZlibCodec)
    return [codec.compress(p) for p in PACKETS]


def test_incompressible_packets_go_as_stored_blocks():
    wire = _stream()
    # header + one 5-byte header per stored block of at most 65535 bytes
    assert len(wire[0]) == 2 + PACKET + 5 * (PACKET // 65535 + 1)
    assert len(wire[2]) == PACKET + 5 * (PACKET // 65535 + 1)
    assert len(wire[1]) < PACKET // 2 and len(wire[3]) < PACKET // 2
    assert len(wire[6]) == 105


@pytest.mark.parametrize("inflater", [zlib.decompressobj, isal_zlib.decompressobj])
def test_the_stream_is_standard_zlib(inflater):
    stream = inflater()
    assert [stream.decompress(w) for w in _stream()] == PACKETS


@pytest.mark.parametrize("use_isal", [True, False])
def test_channel_decoders_fill_the_pages(use_isal):
    decoder = _core.make_codec("zlib", False, use_isal=use_isal)
    assert isinstance(decoder, _core.IsalZlibCodec if use_isal else _core.ZlibCodec)
    for packet, payload in zip(PACKETS, _stream()):
        if not packet:
            assert decoder.decompress_upto(payload, bytearray(16)) == 0
            continue
        out = bytearray(len(packet))
        decoder.decompress_into(payload, out)
        assert out == packet


def _one(data: bytes) -> bytes:
    return _core.make_codec("zlib", True, 1).compress(data)


@pytest.mark.parametrize("payload, pages, message", [
    (_one(TEXT[:8192]), 4096, "inflates to more than its pages: produced 4097 bytes"),
    (_one(TEXT[:4096]), 8192, "inflated too few bytes: produced 4096 bytes, expected 8192"),
    (b"\x78\x01 not deflate at all", 4096, "inflate failed"),
    (zlib.compress(TEXT[:4096]), 4096, "the zlib stream ended"),
])
def test_bad_payloads_are_protocol_errors(payload, pages, message):
    decoder = _core.IsalZlibCodec(False)
    with pytest.raises(ProtocolError, match=message):
        decoder.decompress_into(payload, bytearray(pages))


def test_a_chunk_larger_than_its_bound_is_refused():
    decoder = _core.IsalZlibCodec(False)
    with pytest.raises(ProtocolError, match="inflates to more than a chunk may hold"):
        decoder.decompress_upto(_one(TEXT[:5000]), bytearray(4096))
