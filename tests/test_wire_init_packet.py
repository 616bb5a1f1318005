"""The 64-byte multifd init packet, MultiFDInit_t (spec §1.2-1.3, DESIGN §4.2)."""

import pytest

from captures import CHANNEL_FILES, PATTERNS, UUID, read_channel
from fastmfd import _core
from wire_errors import put_bytes, put_u32, raises_protocol_error

OTHER_UUID = bytes.fromhex("00000000000000000000000000000001")


@pytest.fixture(params=[(p, c) for p in PATTERNS for c in CHANNEL_FILES],
                ids=lambda pc: f"{pc[0]}/{pc[1]}")
def captured_init(request, qemu72_captures):
    """(init packet bytes, channel id) of one channel of a real 7.2 capture."""
    pattern, conn = request.param
    init, _ = read_channel(qemu72_captures, pattern, conn)
    # The id is byte 24 (README); connect order is not the id, so read it raw.
    return init, init[24]


def test_capture_decodes_field_by_field(captured_init):
    init, channel_id = captured_init
    assert init[:4] == b"\x11\x22\x33\x44" and init[4:8] == b"\x00\x00\x00\x01"
    assert _core.decode_init_packet(init, expected_uuid=UUID, channels=2) == (UUID, channel_id)
    assert init[25:] == bytes(39), "7.2 sends zero padding"


def test_capture_reencodes_byte_exact(captured_init):
    init, channel_id = captured_init
    out = bytearray(64)
    assert _core.encode_init_packet(out, UUID, channel_id) == 64
    assert bytes(out) == init


def test_captures_hold_both_channel_ids(qemu72_captures):
    ids = {read_channel(qemu72_captures, "pattern-none", c)[0][24] for c in CHANNEL_FILES}
    assert ids == {0, 1}


def test_golden_hex():
    out = bytearray(70)
    _core.encode_init_packet(out, bytes(range(16)), 200)
    assert out[:64].hex() == ("11223344" "00000001" "000102030405060708090a0b0c0d0e0f"
                              "c8" + "00" * 39)
    assert out[64:] == bytes(6)


def test_decode_without_checks_returns_uuid_and_id():
    out = bytearray(64)
    _core.encode_init_packet(out, OTHER_UUID, 255)
    assert _core.decode_init_packet(out) == (OTHER_UUID, 255)


@pytest.fixture
def valid():
    out = bytearray(64)
    _core.encode_init_packet(out, UUID, 1)
    return out


def test_bad_magic(valid):
    with raises_protocol_error("magic", "0x44332211", "0x11223344"):
        _core.decode_init_packet(put_u32(valid, 0, 0x44332211))


def test_bad_version(valid):
    with raises_protocol_error("version", 2, "1"):
        _core.decode_init_packet(put_u32(valid, 4, 2))


def test_uuid_of_another_session(valid):
    data = put_bytes(valid, 8, OTHER_UUID)
    with raises_protocol_error("uuid", OTHER_UUID.hex(), UUID.hex()):
        _core.decode_init_packet(data, expected_uuid=UUID)


@pytest.mark.parametrize("channels", [1, 2, 8])
def test_channel_id_must_be_below_the_channel_count(channels):
    # QEMU checks id > channels, so id == channels slips through (spec §1.3).
    out = bytearray(64)
    _core.encode_init_packet(out, UUID, channels - 1)
    assert _core.decode_init_packet(out, channels=channels)[1] == channels - 1
    for bad in (channels, channels + 1, 255):
        _core.encode_init_packet(out, UUID, bad)
        with raises_protocol_error("id", bad, f"< {channels}"):
            _core.decode_init_packet(out, expected_uuid=UUID, channels=channels)


def test_encoder_refuses_bad_arguments():
    with pytest.raises(ValueError, match="16 bytes"):
        _core.encode_init_packet(bytearray(64), bytes(15), 0)
    with pytest.raises(ValueError, match="u8"):
        _core.encode_init_packet(bytearray(64), UUID, 256)
    with pytest.raises(ValueError, match="needs 64"):
        _core.encode_init_packet(bytearray(63), UUID, 0)


@pytest.mark.parametrize("length", [0, 24, 63])
def test_truncated(valid, length):
    with raises_protocol_error("length", length, "64"):
        _core.decode_init_packet(valid[:length])
