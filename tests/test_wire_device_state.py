"""The device-state packet header (spec §6.1, DESIGN §4.4): 276 bytes."""

import pytest

from fastmfd import _core
from wire_errors import put_bytes, put_u32, raises_protocol_error

GOLDEN = (
    "11223344"                          # magic
    "00000001"                          # version
    "00000040"                          # flags: DEVICE_STATE (NOCOMP)
    + "nic0".encode().hex() + "00" * 252    # idstr[256]
    + "00000007"                        # instance_id
    "00100000"                          # next_packet_size: 1 MiB
)


def encode(idstr="nic0", instance_id=7, size=1 << 20, flags=0):
    out = bytearray(_core.DEVICE_HEADER_SIZE)
    assert _core.encode_device_header(out, idstr, instance_id, size, flags) == 276
    return out


def test_golden():
    assert _core.DEVICE_HEADER_SIZE == 276
    assert encode().hex() == GOLDEN
    assert _core.decode_device_header(bytes.fromhex(GOLDEN)) == (0x40, "nic0", 7, 1 << 20)


def test_encoder_always_sets_the_device_state_bit():
    assert encode(flags=0x40) == encode(flags=0)


def test_compressed_and_extension_flags_round_trip():
    data = encode(flags=_core.FLAG_ZSTD)
    assert data[8:12].hex() == "00000044"
    assert _core.decode_device_header(data, compression=_core.FLAG_ZSTD)[0] == 0x44
    data = encode(flags=_core.FLAG_STORED)
    assert _core.decode_device_header(data, extensions=_core.FLAG_STORED)[0] == 0x140


def test_longest_idstr():
    name = "d" * 255
    assert _core.decode_device_header(encode(idstr=name))[1] == name


def test_bytes_idstr_and_utf8():
    assert _core.decode_device_header(encode(idstr="vfio-ü"))[1] == "vfio-ü"
    assert _core.decode_device_header(encode(idstr=b"raw"))[1] == "raw"


@pytest.mark.parametrize("idstr", ["x" * 256, "a\0b"])
def test_encoder_refuses_bad_idstr(idstr):
    with pytest.raises(ValueError, match="idstr"):
        encode(idstr=idstr)


def test_bad_magic():
    with raises_protocol_error("magic", "0x0", "0x11223344"):
        _core.decode_device_header(put_u32(encode(), 0, 0))


def test_bad_version():
    with raises_protocol_error("version", 7, "1"):
        _core.decode_device_header(put_u32(encode(), 4, 7))


def test_sync_is_refused():
    with raises_protocol_error("flags", "0x41", "no SYNC bit"):
        _core.decode_device_header(put_u32(encode(), 8, 0x41))


@pytest.mark.parametrize("flags, allowed", [
    (0x00, "0x40 plus only bits 0x0"),       # a RAM packet's flags
    (0x02, "0x40 plus only bits 0x0"),
    (0x80 | 0x40, "0x40 plus only bits 0x0"),
    (0x200 | 0x40, "0x40 plus only bits 0x0"),
    (_core.FLAG_STORED | 0x40, "0x40 plus only bits 0x0"),      # not negotiated
])
def test_missing_device_bit_or_unknown_bits(flags, allowed):
    with raises_protocol_error("flags", hex(flags), allowed):
        _core.decode_device_header(put_u32(encode(), 8, flags))


@pytest.mark.parametrize("session, sent, expected", [
    (0, 0x44, "0x40 plus only bits 0x0"),
    (_core.FLAG_ZLIB, 0x44, "0x40 plus only bits 0x2"),
    (_core.FLAG_ZSTD, 0x42, "0x40 plus only bits 0x4"),
    (_core.FLAG_ZLIB, 0x40, "compression bits 0x2"),    # the session's bit is missing
])
def test_compression_bits_must_match_the_session(session, sent, expected):
    with raises_protocol_error("flags", hex(sent), expected):
        _core.decode_device_header(put_u32(encode(), 8, sent), compression=session)


def test_unterminated_idstr():
    with raises_protocol_error("idstr", "256 bytes without a NUL", "a NUL-terminated idstr"):
        _core.decode_device_header(put_bytes(encode(), 12, b"i" * 256))


def test_empty_payload_is_refused():
    with raises_protocol_error("next_packet_size", 0, "> 0 (an empty device state packet)"):
        _core.decode_device_header(encode(size=0))


def test_payload_bound():
    assert _core.decode_device_header(encode(size=4096), max_payload=4096)[3] == 4096
    with raises_protocol_error("next_packet_size", 4097, "<= 4096"):
        _core.decode_device_header(encode(size=4097), max_payload=4096)


@pytest.mark.parametrize("length", [0, 12, 275])
def test_truncated(length):
    with raises_protocol_error("length", length, "276"):
        _core.decode_device_header(encode()[:length])
