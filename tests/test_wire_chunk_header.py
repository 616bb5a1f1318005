"""The device-state chunk header (DESIGN §4.4; VFIO's packet, spec §6.1): 12 bytes, BE."""

import pytest

from fastmfd import _core
from wire_errors import put_u32, raises_protocol_error

GOLDEN = "00000000" "00000005" "00000001"      # version 0, idx 5, flags LAST


def test_golden():
    out = bytearray(b"\xee" * 14)
    assert _core.encode_chunk_header(out, 5, _core.CHUNK_FLAG_LAST) == 12
    assert out[:12].hex() == GOLDEN and out[12:] == b"\xee\xee"
    assert _core.decode_chunk_header(bytes.fromhex(GOLDEN)) == (5, _core.CHUNK_FLAG_LAST)


@pytest.mark.parametrize("idx", [0, 1, 0xFFFFFFFE])
def test_round_trip(idx):
    out = bytearray(_core.CHUNK_HEADER_SIZE)
    _core.encode_chunk_header(out, idx)
    assert _core.decode_chunk_header(out) == (idx, 0)


def test_bad_version():
    with raises_protocol_error("version", 1, "0"):
        _core.decode_chunk_header(put_u32(bytes.fromhex(GOLDEN), 0, 1))


def test_invalid_idx():
    with raises_protocol_error("idx", "0xffffffff", "not 0xffffffff"):
        _core.decode_chunk_header(put_u32(bytes.fromhex(GOLDEN), 4, 0xFFFFFFFF))


@pytest.mark.parametrize("flags", [0x2, 0x3, 0x80000000])
def test_unknown_flags(flags):
    with raises_protocol_error("flags", hex(flags), "only bit 0x1 (last)"):
        _core.decode_chunk_header(put_u32(bytes.fromhex(GOLDEN), 8, flags))


def test_encoder_refuses_the_invalid_idx_and_a_short_buffer():
    with pytest.raises(ValueError, match="reserved"):
        _core.encode_chunk_header(bytearray(12), 0xFFFFFFFF)
    with pytest.raises(ValueError, match="needs 12"):
        _core.encode_chunk_header(bytearray(11), 0)


@pytest.mark.parametrize("length", [0, 11])
def test_truncated(length):
    with raises_protocol_error("length", length, "12"):
        _core.decode_chunk_header(bytes.fromhex(GOLDEN)[:length])
