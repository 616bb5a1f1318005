"""``fastmfd inspect`` decodes every capture fastmfd itself produces.

Real sessions (a Destination and a Source, through the test proxy, which
records each connection as the source wrote it): every compression method,
with and without devices, with device state on the RAM channels, on a
dedicated device-state channel, or on the main channel (the old way). And,
built byte by byte, the case a real session only produces by chance: a
compressed channel whose first packet is a device chunk, RAM pages after it.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import fastmfd
from fastmfd import _core
from fastmfd.tools.inspect.capture import read_capture
from inspect_support import (PACKET_PAGES, REGIONS, ROUND_ENDS, SESSION_UUID, Session,
                             write_files)
from migration_support import PAGE, Migration, Proxy, Record, make_region

DEVICE_SIZE = 150_000


def _image(capture, name: str, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.uint8)
    for offset, data in capture.ram[name].items():
        out[offset:offset + PAGE] = np.frombuffer(data, dtype=np.uint8)
    return out


CASES = [(compression, devices, "dedicated" if dedicated else "multifd")
         for compression, devices, dedicated in itertools.product(
             ("none", "zlib", "zstd"), (0, 2), (False, True))]
CASES += [(compression, 2, "main") for compression in ("none", "zstd")]


@pytest.mark.parametrize("compression, devices, way", CASES,
                         ids=[f"{c}-{d}dev-{w}" for c, d, w in CASES])
def test_inspect_decodes_a_real_session(tmp_path, compression, devices, way):
    config = fastmfd.MigrationConfig(channels=2, compression=compression, packet_pages=16,
                                     device_state_channels=1 if way == "dedicated" else 0,
                                     channel_header=way != "main",
                                     device_chunk_size=64 << 10)
    records = {"main": Record(), **{ch: Record() for ch in range(config.channels
                                                                  + (way == "dedicated"))}}
    region = make_region("ram", 96 * PAGE, seed=3)
    try:
        with Migration(config, proxy=Proxy(records, channel_header=config.channel_header)) as m:
            m.source.add_region(region)
            for i in range(devices):
                m.source.add_device(fastmfd.SyntheticDevice(f"dev/{i}", i, DEVICE_SIZE, seed=i))
            _, result = m.run().ok()
        paths = write_files(tmp_path, {f"{name}.bin": bytes(record.bytes)
                                       for name, record in records.items()})
        capture = read_capture(paths)
        assert len(capture.ram["ram"]) == region.npages
        assert (_image(capture, "ram", region.size) == region.array).all()
        assert capture.devices == result.devices
        assert len(capture.devices) == devices
        if way != "main":           # the multifd channels alone decode as well
            alone = read_capture(paths[1:], packet_pages=config.packet_pages)
            assert alone.devices == result.devices
            assert (_image(alone, "ram", region.size) == region.array).all()
    finally:
        region.close()


def _files_in(path, files: dict[str, bytes]):
    path.mkdir()
    return write_files(path, files)


def test_inspect_checks_the_checksums_of_a_real_session(tmp_path):
    """A checksummed session decodes; a flipped byte in a device payload or a RAM
    header, or two packets swapped, fails at the packet, named as a checksum mismatch."""
    config = fastmfd.MigrationConfig(channels=1, compression="zstd", packet_pages=16,
                                     device_state_channels=1, checksum=True)
    records = {"main": Record(), 0: Record(), 1: Record()}
    region = make_region("ram", 96 * PAGE, seed=3)
    try:
        with Migration(config, proxy=Proxy(records)) as m:
            m.source.add_region(region)
            m.source.add_device(fastmfd.SyntheticDevice("dev", 0, DEVICE_SIZE, seed=1))
            _, result = m.run().ok()
        files = {f"{name}.bin": bytes(record.bytes) for name, record in records.items()}
    finally:
        region.close()
    capture = read_capture(_files_in(tmp_path / "intact", files))
    assert capture.devices == result.devices
    alone = read_capture(_files_in(tmp_path / "alone", {"0.bin": files["0.bin"],
                                                          "1.bin": files["1.bin"]}),
                         packet_pages=16, checksum=True)
    assert alone.devices == result.devices
    greeting = _core.CHANNEL_HEADER_SIZE + _core.INIT_PACKET_SIZE
    for name, at in [("1.bin", greeting + _core.DEVICE_HEADER_SIZE + 10),   # device payload
                     ("0.bin", greeting + 24)]:                           # packet_num
        broken = dict(files)
        flipped = bytearray(files[name])
        flipped[at] ^= 0x04
        broken[name] = bytes(flipped)
        with pytest.raises(fastmfd.ProtocolError,
                           match=re.escape(name) + r" at byte \d+: .* field 'checksum'"):
            read_capture(_files_in(tmp_path / name, broken))
    # The CRCs chain through a channel: two intact packets of its one zstd stream
    # swapped fail too (they would inflate into wrong pages without an error).
    channel = next(c for c in capture.channels if c.path.endswith("0.bin"))
    first, second = [p for p in channel.packets if p.normal_pages][:2]
    assert first.offset + first.wire_bytes == second.offset
    data = files["0.bin"]
    swapped = (data[:first.offset] + data[second.offset:second.offset + second.wire_bytes]
               + data[first.offset:second.offset] + data[second.offset + second.wire_bytes:])
    with pytest.raises(fastmfd.ProtocolError,
                       match=r"0\.bin at byte \d+: RAM packet field 'checksum': .* chained"):
        read_capture(_files_in(tmp_path / "swapped", {**files, "0.bin": swapped}))


@pytest.mark.parametrize("packet_pages, hint", [
    (128, ": with fastmfd's checksum it decodes (a checksummed fastmfd session's channel? "
          "`inspect --checksum`)"),
    (16, ": fastmfd's checksum sets those bytes (a checksummed fastmfd session's channel? "
         "`inspect --checksum` with its --packet-pages)")])
def test_a_lone_checksummed_channel_without_checksum_is_told_to_try_it(tmp_path, packet_pages,
                                                                        hint):
    """A checksummed session's multifd channel alone, inspected without --checksum (no
    SETUP says it): the failure names the checksum, which decodes it (128 pages a packet,
    inspect's default; else with the session's). It named QEMU 7.2's layout, which decodes
    the packets too, their CRC taken for unused bytes (or said nothing: "as layout qemu-7.2
    it fails too")."""
    config = fastmfd.MigrationConfig(channels=1, checksum=True, packet_pages=packet_pages)
    region = make_region("ram", 300 * PAGE, seed=3)
    try:
        records = _recorded(config, region)
        paths = write_files(tmp_path, {"0.bin": bytes(records[0].bytes)})
        with pytest.raises(fastmfd.ProtocolError) as failed:
            read_capture(paths)
        assert failed.value.field == "unused"
        assert str(failed.value).endswith(hint)
        decoded = read_capture(paths, checksum=True, packet_pages=packet_pages)
        assert (_image(decoded, "ram", region.size) == region.array).all()
    finally:
        region.close()


def _recorded(config: fastmfd.MigrationConfig, region: fastmfd.Region) -> dict:
    """The bytes of a one-channel session of ``config`` migrating ``region``, recorded
    through a proxy: its main channel's and multifd channel 0's."""
    records = {"main": Record(), 0: Record()}
    with Migration(config, proxy=Proxy(records)) as m:
        m.source.add_region(region)
        m.run().ok()
    return records


@pytest.mark.parametrize("options, said", [
    (dict(checksum=True), "its checksum"),
    (dict(compression="auto"), "compression auto (packets sent raw)")])
def test_layout_qemu72_on_a_session_whose_setup_has_fastmfds_extensions(tmp_path, options,
                                                                        said):
    """--layout qemu-7.2 with a fastmfd main channel whose SETUP says checksum or
    compression auto: the layout's RamPacketCodec raised ValueError ('the QEMU 7.2 layout
    has no fastmfd extensions'), a traceback out of inspect (found by fuzzing lone and
    whole checksummed sessions); now one line, exit 2."""
    from listen_support import run_cli
    region = make_region("ram", 300 * PAGE, seed=3)
    try:
        records = _recorded(fastmfd.MigrationConfig(channels=1, **options), region)
    finally:
        region.close()
    write_files(tmp_path, {f"{name}.bin": bytes(r.bytes) for name, r in records.items()})
    done = run_cli("inspect", "--layout", "qemu-7.2", str(tmp_path), timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == (f"fastmfd inspect: layout qemu-7.2: this session's SETUP says "
                           f"{said}, which QEMU's layout has no room for: inspect it without "
                           f"--layout\n"), done.stderr
    assert run_cli("inspect", str(tmp_path), timeout=60).returncode == 0


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("main", [True, False], ids=["with-main", "channels-only"])
def test_compressed_channel_starting_with_a_device_chunk(tmp_path, compression, main):
    session = Session(compression)
    ch0, ch1 = session.channels
    ch0.device("nic0", 0, 0, b"first " * 100)
    ch1.device("nic0", 0, 1, b"second " * 100, last=True)
    for first in range(0, 48, 16):
        session.send(first // 16 % 2, "ram0", range(first, first + 16), tag=0, zero_every=3)
    session.send(1, "vga", range(0, 4), tag=0)
    session.sync_all()
    files = session.files([ROUND_ENDS[0], ROUND_ENDS[-1]], devices=[("nic0", 0)])
    if not main:
        del files["main.bin"]
    capture = read_capture(write_files(tmp_path, files), packet_pages=PACKET_PAGES)
    assert capture.devices == {("nic0", 0): b"first " * 100 + b"second " * 100}
    assert {name: {off: bytes(p) for off, p in pages.items()}
            for name, pages in capture.ram.items()} == session.expected
    assert [c.compression for c in capture.channels] == [compression] * 2
    assert set(REGIONS) == set(capture.ram)
    assert SESSION_UUID == capture.channels[0].uuid


def test_inspect_checks_the_old_way_checksums_of_a_real_session(tmp_path):
    """The old way with checksums: each DEVICE_STATE carries its CRC after the chunk,
    which is checked and is no part of the device's state; a flipped byte of a chunk
    fails at its message, named as a checksum mismatch."""
    config = fastmfd.MigrationConfig(channels=1, packet_pages=16, channel_header=False,
                                     checksum=True, device_chunk_size=64 << 10)
    records = {"main": Record(), 0: Record()}
    region = make_region("ram", 32 * PAGE, seed=3)
    try:
        with Migration(config, proxy=Proxy(records, channel_header=False)) as m:
            m.source.add_region(region)
            m.source.add_device(fastmfd.BytesDevice("dev", 0, b"\x07" * 5000, config=b"cfg"))
            _, result = m.run().ok()
        files = {f"{name}.bin": bytes(record.bytes) for name, record in records.items()}
    finally:
        region.close()
    capture = read_capture(_files_in(tmp_path / "intact", files))
    assert capture.devices == result.devices == {("dev", 0): b"\x07" * 5000 + b"cfg"}
    flipped = bytearray(files["main.bin"])
    at = flipped.index(b"\x07" * 5000) + 10
    flipped[at] ^= 0x04
    with pytest.raises(fastmfd.ProtocolError,
                       match=r"main\.bin at byte \d+: DEVICE_STATE field 'checksum'"):
        read_capture(_files_in(tmp_path / "flipped", {**files, "main.bin": bytes(flipped)}))


def test_inspect_reads_a_session_with_a_shared_key(tmp_path):
    """With an auth_key, the source writes its proof on every connection: AUTH messages
    on the main channel, its nonce and proof after each channel's init packet. Both are
    passed over, with the main channel and without it (then the bytes tell)."""
    key = b"k" * 32
    config = fastmfd.MigrationConfig(channels=2, packet_pages=16, device_state_channels=1,
                                     auth_key=key, device_chunk_size=64 << 10)
    records = {"main": Record(), **{ch: Record() for ch in range(3)}}
    region = make_region("ram", 96 * PAGE, seed=3)
    try:
        with Migration(config, proxy=Proxy(records), auth_key=key) as m:
            m.source.add_region(region)
            m.source.add_device(fastmfd.SyntheticDevice("dev", 0, DEVICE_SIZE, seed=1))
            _, result = m.run().ok()
        paths = write_files(tmp_path, {f"{name}.bin": bytes(record.bytes)
                                       for name, record in records.items()})
        for files in (paths, paths[1:]):
            capture = read_capture(files, packet_pages=16)
            assert capture.devices == result.devices
            assert (_image(capture, "ram", region.size) == region.array).all()
    finally:
        region.close()
