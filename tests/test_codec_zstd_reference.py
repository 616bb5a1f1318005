"""fastmfd's zstd streams against an independent implementation: python-zstandard
(its own bundled libzstd, not the system one the core links).

A channel's zstd stream is one frame, flushed after each packet and never
ended (QEMU's ZSTD_e_flush): a standard streaming decoder must get back each
packet whole as its bytes arrive, and fastmfd must decode such a stream made
by someone else, packet by packet, into the pages."""

from __future__ import annotations

import pytest

from fastmfd import _core
from fastmfd.errors import ProtocolError
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


@pytest.mark.parametrize("window_log, decodes", [(25, True), (26, False), (27, False)])
def test_a_receiving_channel_takes_no_larger_window_than_level_20_makes(window_log, decodes):
    """Each receiving channel allocates the window a frame declares: zstd's own
    limit (2^27, 128 MiB) is four times what the highest level QEMU or fastmfd
    sends, 20, streams with (2^25), and a source may open 255 channels."""
    assert zstandard.get_frame_parameters(
        _core.make_codec("zstd", True, 20).compress(TEXT)).window_size == 1 << 25
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=window_log)
    packer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    payload = packer.compress(TEXT) + packer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    pages = bytearray(len(TEXT))
    if decodes:
        _core.make_codec("zstd", False).decompress_into(payload, pages)
        assert pages == TEXT
    else:
        with pytest.raises(ProtocolError, match="Frame requires too much memory"):
            _core.make_codec("zstd", False).decompress_into(payload, pages)
