"""What RamPacketCodec accepts as buffers and offsets, and the lean validate() path.

encode() and validate() take their buffers through the buffer protocol and
use a numpy uint64 array of offsets in place; anything else is converted.
These tests pin that every accepted form gives the same bytes, that the
conversions keep values exact, and that validate() agrees with decode().
"""

import numpy as np
import pytest

from fastmfd import _core
from fastmfd.errors import ProtocolError

OFFSETS = [0x3000, 0x1000, 0xFF000]


@pytest.fixture
def codec():
    return _core.RamPacketCodec(4, 4096, regions={"pc.ram": 1 << 20, "other": 1 << 20})


def encoded(codec, **fields):
    out = bytearray(codec.header_size)
    codec.encode(out, **fields)
    return bytes(out)


@pytest.mark.parametrize("offsets", [
    pytest.param(OFFSETS, id="list"),
    pytest.param(tuple(OFFSETS), id="tuple"),
    pytest.param(np.array(OFFSETS, dtype=np.uint64), id="uint64"),
    pytest.param(np.array(OFFSETS, dtype=np.int64), id="int64"),
    pytest.param(np.array(OFFSETS, dtype=">u8"), id="big-endian"),
    pytest.param(np.array(OFFSETS, dtype=np.uint32), id="uint32"),
    pytest.param(np.array([x for o in OFFSETS for x in (o, 7)], dtype=np.uint64)[::2],
                 id="strided"),
    pytest.param(memoryview(np.array(OFFSETS, dtype=np.uint64)), id="memoryview"),
])
def test_every_form_of_offsets_encodes_the_same(codec, offsets):
    expected = encoded(codec, ramblock="pc.ram", normal=OFFSETS)
    assert encoded(codec, ramblock="pc.ram", normal=offsets) == expected
    assert encoded(codec, ramblock="pc.ram", zero=offsets)[320:] == expected[320:]
    assert codec.decode(expected).offsets.tolist() == OFFSETS


@pytest.mark.parametrize("offsets", [[], (), np.empty(0, dtype=np.uint64), range(0)])
def test_empty_offsets(codec, offsets):
    assert codec.decode(encoded(codec, ramblock="pc.ram", normal=offsets)).normal_pages == 0


def test_two_dimensional_offsets_are_refused(codec):
    with pytest.raises(ValueError, match="one-dimensional"):
        encoded(codec, normal=np.zeros((2, 2), dtype=np.uint64))


def test_offsets_array_is_not_modified(codec):
    offsets = np.array(OFFSETS, dtype=np.uint64)
    encoded(codec, ramblock="pc.ram", normal=offsets)
    assert offsets.tolist() == OFFSETS and offsets.flags.writeable


@pytest.mark.parametrize("make_out", [
    pytest.param(lambda n: bytearray(n), id="bytearray"),
    pytest.param(lambda n: np.zeros(n, dtype=np.uint8), id="numpy"),
    pytest.param(lambda n: memoryview(bytearray(n + 10))[5:], id="memoryview-slice"),
])
def test_output_buffers(codec, make_out):
    out = make_out(codec.header_size)
    codec.encode(out, ramblock="pc.ram", normal=OFFSETS)
    assert bytes(out)[:codec.header_size] == encoded(codec, ramblock="pc.ram", normal=OFFSETS)


def test_read_only_output_is_refused(codec):
    with pytest.raises(ValueError, match="RAM packet header"):
        codec.encode(bytes(codec.header_size), ramblock="pc.ram")


@pytest.mark.parametrize("convert", [bytes, bytearray, memoryview,
                                     lambda b: np.frombuffer(b, dtype=np.uint8)])
def test_decode_and_validate_read_any_bytes_like(codec, convert):
    data = convert(encoded(codec, ramblock="pc.ram", normal=OFFSETS, zero=[0]))
    assert codec.validate(data) == 4
    assert codec.decode(data).offsets.tolist() == OFFSETS


def test_names_change_from_packet_to_packet(codec):
    """encode() remembers the last name's encoding: a new name must not reuse it."""
    for name in ("pc.ram", "other", b"other", "pc.ram"):
        assert codec.decode(encoded(codec, ramblock=name, normal=[0])).ramblock == \
            (name.decode() if isinstance(name, bytes) else name)


def test_a_mutable_name_is_read_anew_each_time(codec):
    name = bytearray(b"pc.ram")
    assert codec.decode(encoded(codec, ramblock=name, normal=[0])).ramblock == "pc.ram"
    name[:] = b"other"
    assert codec.decode(encoded(codec, ramblock=name, normal=[0])).ramblock == "other"


def test_validate_counts_normal_and_zero_pages(codec):
    assert codec.validate(encoded(codec, ramblock="pc.ram", normal=[0], zero=[4096, 8192])) == 3
    assert codec.validate(encoded(codec, flags=_core.FLAG_SYNC)) == 0


def test_validate_refuses_what_decode_refuses(codec):
    bad = bytearray(encoded(codec, ramblock="pc.ram", normal=[0x1000]))
    bad[320 + 7] = 0x01             # offset 0x1001: not page aligned
    for check in (codec.validate, codec.decode):
        with pytest.raises(ProtocolError) as info:
            check(bad)
        assert (info.value.field, info.value.received) == ("offset", "0x1001")
    with pytest.raises(ProtocolError, match="'length'"):
        codec.validate(bad[:-1])
