"""fastmfd's zstd streams against an independent implementation: python-zstandard
(its own bundled libzstd, not the system one the core links).

A channel's zstd stream is one frame, flushed after each packet and never
ended (QEMU's ZSTD_e_flush): a standard streaming decoder must get back each
packet whole as its bytes arrive, and fastmfd must decode such a stream made
by someone else, packet by packet, into the pages."""

from __future__ import annotations

import pytest

from fastmfd import _core
from fastmfd.tools.images import english_like_text

zstandard = pytest.importorskip("zstandard")

PACKET = 512 << 10


def _random(size: int, seed: int) -> bytes:
    data = bytearray(size)
    _core.fill_pattern(data, seed, 0)
    return bytes(data)


TEXT = english_like_text(2 * PACKET).tobytes()
RANDOM = _random(PACKET, 5)
PACKETS = [TEXT[:PACKET], RANDOM, bytes(PACKET), TEXT[PACKET:], TEXT[:4096], RANDOM[:100]]


@pytest.mark.parametrize("level", [1, 3, 19])
def test_python_zstandard_decodes_each_packet_as_it_arrives(level):
    encoder = _core.make_codec("zstd", True, level)
    decoder = zstandard.ZstdDecompressor().decompressobj()
    for packet in PACKETS:
        assert decoder.decompress(encoder.compress(packet)) == packet


def test_fastmfd_decodes_a_stream_python_zstandard_flushed_per_packet():
    encoder = zstandard.ZstdCompressor(level=3).compressobj()
    decoder = _core.make_codec("zstd", False)
    for packet in PACKETS:
        payload = encoder.compress(packet) + encoder.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        pages = bytearray(len(packet))
        decoder.decompress_into(payload, pages)
        assert pages == packet
