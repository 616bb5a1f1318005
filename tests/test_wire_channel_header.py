"""The 12-byte channel header (DESIGN §4.1): BE u64 header_size = 4, BE u32 channel_type."""

import pytest

from fastmfd import _core
from wire_errors import put_u32, put_u64, raises_protocol_error

GOLDEN = {
    _core.CHANNEL_MAIN: "0000000000000004" "00000000",
    _core.CHANNEL_POSTCOPY: "0000000000000004" "00000001",
    _core.CHANNEL_MULTIFD: "0000000000000004" "00000002",
    _core.CHANNEL_DEVICE_STATE: "0000000000000004" "00000003",
}


def test_constants():
    assert _core.CHANNEL_HEADER_SIZE == 12
    assert (_core.CHANNEL_MAIN, _core.CHANNEL_POSTCOPY, _core.CHANNEL_MULTIFD,
            _core.CHANNEL_DEVICE_STATE) == (0, 1, 2, 3)


@pytest.mark.parametrize("channel_type", sorted(GOLDEN))
def test_encode_golden(channel_type):
    out = bytearray(b"\xee" * 16)
    assert _core.encode_channel_header(out, channel_type) == 12
    assert out[:12].hex() == GOLDEN[channel_type]
    assert out[12:] == b"\xee" * 4, "the encoder wrote past the header"


@pytest.mark.parametrize("channel_type", sorted(GOLDEN))
def test_decode_golden(channel_type):
    assert _core.decode_channel_header(bytes.fromhex(GOLDEN[channel_type])) == channel_type


def test_decode_ignores_bytes_after_the_header():
    assert _core.decode_channel_header(bytes.fromhex(GOLDEN[2]) + b"\x11\x22") == 2


@pytest.mark.parametrize("size", [0, 3, 5, 12, 1 << 32, (1 << 64) - 1])
def test_header_size_other_than_4_is_refused(size):
    data = put_u64(bytes.fromhex(GOLDEN[2]), 0, size)
    with raises_protocol_error("header_size", size, "4"):
        _core.decode_channel_header(data)


@pytest.mark.parametrize("kind", [4, 5, 0x80000000, 0xFFFFFFFF])
def test_unknown_channel_type_is_refused(kind):
    data = put_u32(bytes.fromhex(GOLDEN[2]), 8, kind)
    with raises_protocol_error("channel_type", kind, "3 (device state)"):
        _core.decode_channel_header(data)


def test_encode_refuses_unknown_type_and_short_buffer():
    with pytest.raises(ValueError, match="unknown channel type 4"):
        _core.encode_channel_header(bytearray(12), 4)
    with pytest.raises(ValueError, match="needs 12"):
        _core.encode_channel_header(bytearray(11), 2)


@pytest.mark.parametrize("length", [0, 1, 11])
def test_truncated_header_is_refused(length):
    with raises_protocol_error("length", length, "12"):
        _core.decode_channel_header(bytes.fromhex(GOLDEN[2])[:length])
