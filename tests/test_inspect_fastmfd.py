"""read_capture on fastmfd-format streams built from the ``_core`` encoders.

Two RAM rounds over two channels with zero pages (``inspect_support.two_rounds``),
uncompressed and with one zlib/zstd stream per channel; device-state chunks out
of order across channels and on the main channel; and the faults a fastmfd
capture can have.
"""

from __future__ import annotations

import os
import re
import tracemalloc

import pytest

from fastmfd import _core
from fastmfd.errors import ConfigError, ProtocolError
from fastmfd.tools.inspect.capture import read_capture
from fastmfd.protocol.main_channel import MAIN_MAGIC, Msg
from inspect_support import (
    PACKET_PAGES, PAGE, REGIONS, ROUND_ENDS, SESSION_UUID, ChannelWriter, Session, chunk,
    device_message, main_channel, sparse_setup_message, two_rounds, write_files,
)

@pytest.mark.parametrize("compression", ["none", "zlib", "zstd", "auto"])
def test_two_rounds_with_zero_pages(tmp_path, compression):
    session = two_rounds(compression)
    paths = write_files(tmp_path, session.files(ROUND_ENDS))
    capture = read_capture(list(reversed(paths)))
    assert capture.layout == "current"
    assert capture.packet_pages == PACKET_PAGES
    assert capture.blocks == REGIONS
    assert {name: {off: bytes(p) for off, p in pages.items()}
            for name, pages in capture.ram.items()} == session.expected
    assert capture.pages_resent == capture.pages_resent_changed == 2
    assert [c.compression for c in capture.channels] == [compression] * 2
    summaries = [c.summary() for c in capture.channels]
    assert sum(s["pages"]["zero"] for s in summaries) == session.zero_listed
    assert [s["syncs"] for s in summaries] == [2, 2]
    assert [c.channel_header for c in capture.channels] == [True, True]
    assert capture.main.summary()["messages"] == {"SETUP": 1, "ROUND_END": 2, "COMPLETE": 1}
    for channel in capture.channels:
        header = 320 + 8 * PACKET_PAGES
        assert all(p.wire_bytes == header + p.payload_bytes for p in channel.packets)


def test_without_main_channel_packet_pages_come_from_the_argument(tmp_path):
    session = two_rounds("zstd")
    files = session.files(ROUND_ENDS)
    del files["main.bin"]
    paths = write_files(tmp_path, files)
    capture = read_capture(paths, packet_pages=PACKET_PAGES)
    assert capture.main is None and capture.blocks == {}
    assert {name: {off: bytes(p) for off, p in pages.items()}
            for name, pages in capture.ram.items()} == session.expected
    # With QEMU's default the 1344-byte header does not fit these packets.
    with pytest.raises(ProtocolError):
        read_capture(paths)


def test_device_state_out_of_order_across_two_channels(tmp_path):
    nic = [os.urandom(1000 + 37 * i) for i in range(5)]
    blk = b"block device state"
    session = Session()
    ch0, ch1 = session.channels
    ch1.device("nic0", 0, 3, nic[3])
    ch0.device("nic0", 0, 4, nic[4], last=True)
    session.send(0, "vga", range(0, 4), tag=0)     # RAM interleaved with device state
    ch1.device("nic0", 0, 0, nic[0])
    ch0.device("blk", 1, 0, blk, last=True)
    ch0.device("nic0", 0, 2, nic[2])
    ch1.device("nic0", 0, 1, nic[1])
    session.sync_all()
    paths = write_files(tmp_path, session.files(
        [(Msg.ROUND_END, {"round": 1}), (Msg.COMPLETE, {})],
        devices=[("nic0", 0), ("blk", 1)]))
    capture = read_capture(paths)
    assert capture.devices == {("nic0", 0): b"".join(nic), ("blk", 1): blk}
    kinds = [[p.kind for p in c.packets] for c in capture.channels]
    assert kinds == [["device", "ram", "device", "device", "sync"],
                     ["device", "device", "device", "sync"]]
    assert capture.channels[0].packets[0].ramblock == "nic0"
    assert capture.summary()["devices"] == {"blk/1": len(blk), "nic0/0": sum(map(len, nic))}


def test_dedicated_device_state_channel_takes_no_part_in_syncs(tmp_path):
    session = Session()
    session.send(0, "vga", range(0, 4), tag=0)
    session.channels[0].sync(session.next_num())
    session.channels[1] = ChannelWriter(1, SESSION_UUID, packet_pages=PACKET_PAGES,
                                        header_type=_core.CHANNEL_DEVICE_STATE)
    session.channels[1].device("nic0", 0, 0, b"only chunk", last=True)
    paths = write_files(tmp_path, session.files(
        [(Msg.ROUND_END, {"round": 1}), (Msg.COMPLETE, {})], devices=[("nic0", 0)]))
    capture = read_capture(paths)
    assert [c.kind for c in capture.channels] == ["multifd", "device-state"]
    assert [c.syncs for c in capture.channels] == [1, 0]
    assert capture.devices == {("nic0", 0): b"only chunk"}


def test_old_way_device_state_on_the_main_channel(tmp_path):
    session = Session()
    session.send(0, "vga", range(0, 4), tag=0)
    session.sync_all()
    messages = [(Msg.DEVICE_STATE, device_message(1, 1, b"tail", last=True)),
                (Msg.ROUND_END, {"round": 1}), (Msg.SWITCHOVER_START, {}),
                (Msg.DEVICE_STATE, device_message(1, 0, b"head ")),
                (Msg.DEVICE_STATE, device_message(0, 0, b"cpu", last=True)),
                (Msg.COMPLETE, {})]
    paths = write_files(tmp_path, session.files(messages, devices=[("cpu", 0), ("nic", 2)]))
    capture = read_capture(paths)
    assert capture.devices == {("cpu", 0): b"cpu", ("nic", 2): b"head tail"}


# ---------------------------------------------------------------- faults

def located(exc: ProtocolError, path) -> int:
    """The byte offset ``exc`` names in ``path``."""
    prefix = f"{path} at byte "
    assert str(exc).startswith(prefix), str(exc)
    return int(str(exc)[len(prefix):].split(":")[0].split(",")[0])


def device_session(chunks_ch0, chunks_ch1) -> dict[str, bytes]:
    session = Session()
    for writer, chunks in zip(session.channels, (chunks_ch0, chunks_ch1)):
        for idx, last in chunks:
            writer.device("nic0", 0, idx, b"x" * (idx + 1), last=last)
    session.sync_all()
    return session.files([(Msg.ROUND_END, {}), (Msg.COMPLETE, {})], devices=[("nic0", 0)])


@pytest.mark.parametrize("chunks, field", [
    (([(0, False), (2, True)], []), "idx"),                 # chunk 1 missing
    (([(0, False), (1, False)], [(2, False)]), "flags"),    # no last chunk: truncated
    (([(0, False), (1, True)], [(2, False)]), "flags"),     # a chunk after the last
    (([(0, False), (1, True)], [(1, False)]), "idx"),       # idx received twice
])
def test_device_chunk_faults(tmp_path, chunks, field):
    paths = write_files(tmp_path, device_session(*chunks))
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    assert info.value.field == field
    assert any(str(info.value).startswith(f"{p} at byte ") for p in paths[1:])


def test_a_channel_missing_its_last_sync_is_caught(tmp_path):
    session = two_rounds()
    files = session.files(ROUND_ENDS)
    cut = len(files["ch1.bin"]) - (320 + 8 * PACKET_PAGES)
    files["ch1.bin"] = files["ch1.bin"][:cut]     # exactly at a packet boundary
    paths = write_files(tmp_path, files)
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    assert info.value.field == "SYNC"
    assert (info.value.received, info.value.expected) == (1, 2)
    assert located(info.value, paths[2]) == cut


def test_main_channel_must_end_with_complete(tmp_path):
    files = two_rounds().files(ROUND_ENDS[:-1])
    paths = write_files(tmp_path, files)
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    assert located(info.value, paths[0]) == len(files["main.bin"])


@pytest.mark.parametrize("kind", [Msg.SETUP_ACK, Msg.LOADED, Msg.SWITCHOVER_ACK])
def test_a_message_only_a_destination_sends_is_refused(tmp_path, kind):
    """A capture is what the source wrote: a destination's message in it is named
    as such, where it stands (it was judged by its length, or passed)."""
    before = two_rounds().files(ROUND_ENDS[:1])["main.bin"]
    files = two_rounds().files(ROUND_ENDS[:1] + [(kind, {})] + ROUND_ENDS[1:])
    paths = write_files(tmp_path, files)
    with pytest.raises(ProtocolError, match=f"received {kind.name}, which a source does "
                                            f"not send") as info:
        read_capture(paths)
    assert located(info.value, paths[0]) == len(before)


def test_keepalives_after_complete_are_part_of_a_whole_capture(tmp_path):
    # A source keeps the main channel alive (KEEPALIVE) until LOADED arrives.
    keepalive = (Msg.KEEPALIVE, {})
    messages = ROUND_ENDS[:1] + [keepalive] + ROUND_ENDS[1:] + [keepalive, keepalive]
    capture = read_capture(write_files(tmp_path, two_rounds().files(messages)))
    assert capture.main.messages["KEEPALIVE"] == 3


MISSING = object()


@pytest.mark.parametrize("key, value", [
    ("page_size", 1000), ("packet_pages", 0), ("compression", "lz4"), ("uuid", "12"),
    ("regions", [{"name": "a", "size": 100}]), ("channels", True),
    ("devices", [{"idstr": "x\u0000", "instance_id": 0}]), ("regions", MISSING),
])
def test_bad_setup_fields(tmp_path, key, value):
    setup = sparse_setup_message(SESSION_UUID, REGIONS)
    setup[key] = value
    if value is MISSING:
        del setup[key]
    paths = write_files(tmp_path, {"main.bin": main_channel(setup, [(Msg.COMPLETE, {})])})
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    # An item's fault names the item: SETUP.regions[0].size
    assert re.fullmatch(rf"SETUP\.{key}(\[\d+\]\.\w+)?", info.value.field), info.value.field
    assert located(info.value, paths[0]) == 12 + 8       # channel header, preamble


@pytest.mark.parametrize("uuid, channel_id, field", [
    (bytes(16), 0, "uuid"),         # not the session's
    (SESSION_UUID, 2, "id"),                # SETUP says 2 channels
])
def test_init_packet_checked_against_setup(tmp_path, uuid, channel_id, field):
    files = two_rounds().files(ROUND_ENDS)
    files["ch1.bin"] = ChannelWriter(channel_id, uuid, packet_pages=PACKET_PAGES).bytes()
    paths = write_files(tmp_path, files)
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    assert info.value.field == field
    assert located(info.value, paths[2]) == 12            # after the channel header


def test_two_channels_with_one_id(tmp_path):
    files = two_rounds().files(ROUND_ENDS)
    files["ch1.bin"] = ChannelWriter(0, SESSION_UUID, packet_pages=PACKET_PAGES).bytes()
    paths = write_files(tmp_path, files)
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    assert info.value.field == "id"
    assert located(info.value, paths[2]) == 12 + 24


@pytest.mark.parametrize("compression", ["zlib", "zstd", "auto"])
def test_compressed_device_state_shares_the_channel_stream(tmp_path, compression):
    session = two_rounds(compression)
    data = bytes(range(256)) * 64
    session.channels[0].device("nic0", 0, 1, data[:5000], last=True)
    session.channels[1].device("nic0", 0, 0, data)
    paths = write_files(tmp_path, session.files(ROUND_ENDS, devices=[("nic0", 0)]))
    capture = read_capture(paths)
    assert capture.devices[("nic0", 0)] == data + data[:5000]


@pytest.mark.parametrize("bits", [_core.FLAG_ZLIB | _core.FLAG_ZSTD, 12])
def test_a_device_packet_naming_no_method_is_refused_before_the_method_is_known(tmp_path,
                                                                                bits):
    """Channel files read without their main channel (no SETUP): a channel's
    method is learnt from its first compressed payload. A device packet first,
    its bits naming no method, is a ProtocolError on its flags (it was a
    KeyError: found by fuzzing)."""
    session = Session()
    header = bytearray(_core.DEVICE_HEADER_SIZE)
    body = chunk(0, b"state", last=True)
    _core.encode_device_header(header, "nic0", 0, len(body), flags=bits)
    session.channels[0].parts += [bytes(header), body]
    session.sync_all()
    files = session.files([(Msg.ROUND_END, {}), (Msg.COMPLETE, {})], devices=[("nic0", 0)])
    del files["main.bin"]
    paths = write_files(tmp_path, files)
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    assert info.value.field == "flags", info.value
    assert str(info.value).startswith(f"{paths[0]} at byte "), info.value


def test_compressed_device_chunk_over_the_chunk_size_is_refused(tmp_path):
    session = two_rounds("zstd")
    session.channels[0].device("nic0", 0, 0, bytes(5000), last=True)
    files = session.files(ROUND_ENDS, devices=[("nic0", 0)], chunk_size=4096)
    paths = write_files(tmp_path, files)
    with pytest.raises(ProtocolError) as info:
        read_capture(paths)
    assert info.value.field == "payload" and "more than a chunk" in str(info.value)


def test_distinct_pages_are_bounded(tmp_path):
    paths = write_files(tmp_path, two_rounds("zstd").files(ROUND_ENDS))
    with pytest.raises(ProtocolError) as info:
        read_capture(paths, max_ram_bytes=10 * PAGE)
    assert info.value.field == "pages"


@pytest.mark.parametrize("kwargs", [{"layout": "qemu-8"}, {"packet_pages": 0},
                                    {"page_size": 1000}])
def test_bad_arguments(tmp_path, kwargs):
    paths = write_files(tmp_path, two_rounds().files(ROUND_ENDS))
    with pytest.raises(ConfigError):
        read_capture(paths, **kwargs)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.bin"):
        read_capture([tmp_path / "nope.bin"])


@pytest.mark.parametrize("version, readable",
                         [(2, True), (3, True), (4, True), (5, True), (1, False), (6, False)])
def test_captures_of_main_channel_versions_2_to_5_are_read(tmp_path, version, readable):
    """Version 3 added LOADING, a destination's message, and bounded each message;
    version 4 has LOADING while SWITCHOVER_ACK is owed too, and in version 5
    SETUP_ACK says the destination's stall_timeout: a source's side of the
    main channel is as it was in version 2, whose captures inspect still reads."""
    files = two_rounds().files(ROUND_ENDS)
    main = files["main.bin"]
    at = main.index(MAIN_MAGIC.to_bytes(4, "big")) + 4       # (after the channel header)
    assert main[at:at + 4] == (5).to_bytes(4, "big")
    files["main.bin"] = main[:at] + version.to_bytes(4, "big") + main[at + 4:]
    paths = write_files(tmp_path, files)
    if readable:
        assert read_capture(paths).blocks == REGIONS
    else:
        with pytest.raises(ProtocolError,
                           match=f"'version': received {version}, expected 2, 3, 4 or 5"):
            read_capture(paths)


def _tiny_device_chunks(tmp_path, count: int, data: bytes, channels: int = 1) -> list:
    """``channels`` zlib channel files, no main channel (so no SETUP bounds a chunk:
    64 MiB), carrying ``count`` compressed device chunks of ``data`` between them."""
    files = {}
    for ch in range(channels):
        writer = ChannelWriter(ch, bytes(range(16)), compression="zlib")
        for idx in range(ch, count, channels):
            writer.device("nic", 0, idx, data, last=idx == count - 1)
        files[f"ch{ch}.bin"] = writer.bytes()
    return write_files(tmp_path, files)


@pytest.mark.parametrize("channels", [1, 6])
def test_compressed_device_chunks_keep_only_what_they_inflate_to(tmp_path, channels):
    # Each 10-byte chunk kept a view of its own 64 MiB buffer: 30 of them, 1.9 GB held
    # (a bare MemoryError under a 1 GiB address-space limit) to print 300 bytes; then a
    # buffer per channel file (a reread): 30 files of a chunk each, the same.
    paths = _tiny_device_chunks(tmp_path, 30, b"0123456789", channels)
    tracemalloc.start()
    try:
        capture = read_capture(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert capture.devices == {("nic", 0): b"0123456789" * 30}
    assert peak < 2 * (64 << 20), peak          # one chunk buffer for the capture


def test_inflated_device_state_is_bounded(tmp_path):
    paths = _tiny_device_chunks(tmp_path, 3, bytes(5000))
    with pytest.raises(ProtocolError) as info:
        read_capture(paths, max_ram_bytes=12000)
    assert info.value.field == "device state" and "max_ram_bytes=12000" in str(info.value)
    assert "ch0.bin at byte" in str(info.value)
