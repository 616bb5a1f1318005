"""Truncated and corrupted captures: always one located ProtocolError, never another error.

Built on the zlib capture (small, and its compressed payloads exercise the
bounded decompressor). Truncation points are every kind of place a file can
end: inside and exactly at packet and record boundaries, inside the main
channel's device sections and its VM description.
"""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastmfd.errors import ProtocolError
from fastmfd.protocol.qemu import decode_qemu_main
from fastmfd.tools.inspect.capture import read_capture
from inspect_support import capture_files

FILES = capture_files("zlib")
ORIGINAL = [path.read_bytes() for path in FILES]
LOCATED = re.compile(r"^(?P<file>.+?) at byte (?P<offset>\d+)[:,]")


@pytest.fixture(scope="module")
def clean():
    return read_capture(FILES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("corrupt")


def decode_with(workdir, index: int, data: bytes):
    """Decode the capture with file ``index`` replaced by ``data``; returns its path."""
    path = workdir / FILES[index].name
    path.write_bytes(data)
    paths = list(FILES)
    paths[index] = path
    return path, paths, read_capture_or_error(paths)


def read_capture_or_error(paths):
    try:
        return read_capture(paths)
    except ProtocolError as exc:
        return exc


def location(exc: ProtocolError) -> tuple[str, int]:
    match = LOCATED.match(str(exc))
    assert match, f"not located: {exc}"
    return match["file"], int(match["offset"])


def main_channel_records(data: bytes) -> list[int]:
    """Where the ZERO and PAGE records of a QEMU main channel stand."""
    ats: list[int] = []
    decode_qemu_main("conn0.bin", data, on_page=lambda *page: ats.append(page[3]))
    return ats


def truncation_points(clean) -> list[tuple[int, int]]:
    rnd = random.Random(2024)
    main = clean.main
    size = len(ORIGINAL[0])
    records = main_channel_records(ORIGINAL[0])
    ends = {0, 1, 3, 4, 7, 8, 9, 30, main.ram_bytes - 1, main.ram_bytes, main.ram_bytes + 1,
            size - 1, size - 7, size - 6}
    ends |= set(rnd.sample(records, 12)) | {r + 1 for r in rnd.sample(records, 6)}
    ends |= set(rnd.sample(range(main.ram_bytes, size), 12))     # device sections, vmdesc
    points = [(0, end) for end in ends]
    for channel in clean.channels:
        index = FILES.index(type(FILES[0])(channel.path))
        starts = [p.offset for p in channel.packets]
        ends = {0, 10, 63, 64, 65, channel.size - 1}
        for start in rnd.sample(starts, 8) + starts[-2:]:
            ends |= {start, start + 1, start + 1343, start + 1344, start + 1345}
        ends |= set(rnd.sample(range(channel.size), 10))
        points += [(index, end) for end in ends if end < channel.size]
    return sorted(points)


def test_truncation_anywhere_is_one_located_error(clean, workdir):
    points = truncation_points(clean)
    assert len(points) > 100
    for index, end in points:
        path, _, result = decode_with(workdir, index, ORIGINAL[index][:end])
        assert isinstance(result, ProtocolError), f"{FILES[index].name} cut at {end} decoded"
        where, offset = location(result)
        assert where == str(path), (end, str(result))
        assert offset <= end and result.field, (end, str(result))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.sampled_from([0, 1, 2]), position=st.integers(0, 20_000),
       value=st.integers(0, 255))
def test_byte_flips_in_a_prefix(workdir, index, position, value):
    # conn0's first 20000 bytes hold its whole RAM part; conn1/conn2's the init
    # packet, the first SYNC and the first compressed data packet.
    data = ORIGINAL[index]
    assume(position < len(data) and data[position] != value)
    path, paths, result = decode_with(workdir, index,
                                      data[:position] + bytes([value]) + data[position + 1:])
    if isinstance(result, ProtocolError):
        where, offset = location(result)
        assert result.field
        # A fact two files must agree on is reported where they disagree: a
        # flipped block name or size in conn0 shows in the packet that uses the
        # block, a flipped UUID in the channel compared with it, an extra EOS
        # in a channel's SYNC count.
        cross_file = {"ramblock", "offset", "uuid", "SYNC"}
        assert where == str(path) or result.field in cross_file, str(result)
        assert where in map(str, paths)
    else:
        assert set(result.ram) == set(result.blocks)


def test_every_packet_magic_is_checked(clean, workdir):
    for channel in clean.channels:
        index = FILES.index(type(FILES[0])(channel.path))
        for packet in channel.packets[::3]:
            data = bytearray(ORIGINAL[index])
            data[packet.offset] ^= 0xFF
            path, _, result = decode_with(workdir, index, bytes(data))
            assert isinstance(result, ProtocolError)
            assert location(result) == (str(path), packet.offset)
            assert result.field == "magic"


def test_every_main_channel_ram_record_is_checked(clean, workdir):
    # Turning a ZERO record (flags 0x02/0x22) into an unknown flag combination.
    records = main_channel_records(ORIGINAL[0])
    for at in records[::97]:
        data = bytearray(ORIGINAL[0])
        data[at + 7] |= 0x01
        path, _, result = decode_with(workdir, 0, bytes(data))
        assert isinstance(result, ProtocolError)
        assert location(result) == (str(path), at)
        assert result.field == "flags"


def test_compressed_payload_faults_are_located_at_the_payload(clean, workdir):
    channel = clean.channels[0]
    index = FILES.index(type(FILES[0])(channel.path))
    packet = next(p for p in channel.packets if p.normal_pages == 128)
    payload_at = packet.offset + 1344
    data = bytearray(ORIGINAL[index])
    data[payload_at:payload_at + 8] = b"\xff" * 8          # not a deflate block
    path, _, result = decode_with(workdir, index, bytes(data))
    assert isinstance(result, ProtocolError)
    assert location(result) == (str(path), payload_at)
    assert result.field == "payload"
