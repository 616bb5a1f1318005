"""read_capture on the three real QEMU 7.2 captures (none, zlib, zstd).

Each capture is decoded once per module. What is checked comes from the
captures' README and meta.json (the RAM pattern, the block list, QEMU's own
page counts) and from the spec (§2.2 stale fields, §5.3 SYNC per RAM section
end, data packets carrying SYNC followed by an empty packet with the same
packet_num).
"""

from __future__ import annotations

import json

import pytest

from fastmfd.errors import ProtocolError
from fastmfd.tools.inspect.capture import read_capture
from captures import UUID, pattern_page
from inspect_support import capture_files

COMPRESSIONS = ["none", "zlib", "zstd"]
PAGE = 4096


@pytest.fixture(scope="module", params=COMPRESSIONS)
def decoded(request):
    """(compression, Capture, meta.json) — files given in a shuffled order."""
    conn0, conn1, conn2 = capture_files(request.param)
    meta = json.loads((conn0.parent / "meta.json").read_text())
    return request.param, read_capture([conn2, conn0, conn1]), meta


def test_every_page_of_mem_matches_the_pattern(decoded):
    _, capture, meta = decoded
    mem = capture.ram["mem"]
    pages = meta["mem_mib"] << 20 >> 12
    assert sorted(mem) == [i * PAGE for i in range(pages)]
    wrong = [i for i in range(pages) if mem[i * PAGE] != pattern_page(i)]
    assert wrong == []


def test_every_page_of_every_block_is_present(decoded):
    _, capture, meta = decoded
    assert set(capture.blocks) == {"mem", "/rom@etc/acpi/tables", "pc.bios", "pc.rom",
                                   "/rom@etc/table-loader", "/rom@etc/acpi/rsdp"}
    assert capture.blocks["mem"] == meta["mem_mib"] << 20
    # MEM_SIZE carries QEMU's RAM total; query-migrate reports the same.
    assert sum(capture.blocks.values()) == meta["query_migrate"]["ram"]["total"]
    for name, size in capture.blocks.items():
        assert sorted(capture.ram[name]) == list(range(0, size, PAGE)), name
        assert all(len(page) == PAGE for page in capture.ram[name].values())


def test_page_counts_agree_with_qemu(decoded):
    _, capture, meta = decoded
    stats = meta["query_migrate"]["ram"]
    assert capture.main.zero_pages == stats["duplicate"]    # ZERO records, main channel
    sent = sum(c.summary()["pages"]["normal"] for c in capture.channels)
    # QEMU counts a page sent twice once in "normal"; the capture sees both copies.
    assert sent == stats["normal"] + capture.pages_resent
    assert capture.pages_resent_changed == 0               # the guest was paused


def test_channels_are_identified_by_the_init_packet_id(decoded):
    compression, capture, _ = decoded
    assert [c.id for c in capture.channels] == [0, 1]
    for channel in capture.channels:
        with open(channel.path, "rb") as f:
            head = f.read(64)
        assert head[24] == channel.id
        assert channel.uuid == UUID
        assert channel.compression == compression
        assert channel.kind == "multifd" and not channel.channel_header


def test_one_sync_per_channel_for_each_ram_section_end(decoded):
    _, capture, _ = decoded
    assert capture.layout == "qemu-7.2"
    # setup, one iterate, complete; a SYNC before each EOS (7.2 syncs per section)
    assert capture.main.ram_section_ends == capture.main.syncs == 3
    assert capture.main.multifd_sync == "per-section"
    assert dict(capture.main.ram_sections) == {"start": 1, "part": 1, "end": 1}
    for channel in capture.channels:
        assert channel.syncs == 3
        first, last = channel.packets[0], channel.packets[-1]
        assert first.kind == last.kind == "sync"
        assert first.normal_pages == last.normal_pages == 0
        assert [p.round for p in channel.packets if p.kind == "sync"] == [0, 1, 2]


def test_data_with_sync_is_followed_by_an_empty_packet_with_the_same_number(decoded):
    compression, capture, _ = decoded
    comp_flag = {"none": 0, "zlib": 2, "zstd": 4}[compression]
    seen = 0
    for channel in capture.channels:
        for pkt, after in zip(channel.packets, channel.packets[1:]):
            if pkt.kind == "sync" and pkt.normal_pages:
                assert pkt.flags == comp_flag | 1
                assert (after.kind, after.flags, after.normal_pages) == ("ram", 0, 0)
                assert after.packet_num == pkt.packet_num
                seen += 1
        assert channel.summary()["repeated_packet_num"] == channel.summary()["empty_packets"]
    assert seen >= 1                                        # spec §5.3, in every capture


def test_stale_fields_of_empty_packets_are_ignored(decoded):
    _, capture, _ = decoded
    stale = 0
    for channel in capture.channels:
        with open(channel.path, "rb") as f:
            data = f.read()
        for pkt in channel.packets:
            if pkt.normal_pages == 0:
                assert pkt.ramblock == "" and pkt.payload_bytes == 0
                assert pkt.wire_bytes == 320 + 8 * 128
                # What the header really says: the previous packet's values (§2.2).
                next_size = int.from_bytes(data[pkt.offset + 20:pkt.offset + 24], "big")
                stale += next_size != 0 and data[pkt.offset + 64] != 0
    assert stale >= 1


def test_compression_bits_only_on_packets_with_pages(decoded):
    compression, capture, _ = decoded
    comp_flag = {"none": 0, "zlib": 2, "zstd": 4}[compression]
    for channel in capture.channels:
        for pkt in channel.packets:
            assert pkt.flags & 0x0E == (comp_flag if pkt.normal_pages else 0)
        assert channel.summary()["bytes"] == channel.size == sum(
            p.wire_bytes for p in channel.packets) + 64


def test_main_channel_facts(decoded):
    _, capture, meta = decoded
    main = capture.main
    assert main.machine in meta["qemu_cmd"]                 # -machine pc-i440fx-7.2,...
    assert main.first_device_section and main.vm_devices > 0
    assert 0 < main.ram_bytes < main.size
    summary = main.summary()
    assert summary["device_bytes"] == main.size - main.ram_bytes
    assert summary["eos"] == 3 and summary["format"] == "qemu"


def test_without_the_main_channel_only_data_pages_are_known():
    _, conn1, conn2 = capture_files("zlib")
    capture = read_capture([conn1, conn2], layout="qemu-7.2")
    assert capture.main is None and capture.blocks == {}
    mem = capture.ram["mem"]
    # Zero pages travel on the main channel in 7.2: exactly those are missing.
    assert sorted(mem) == [i * PAGE for i in range(8192) if i % 4]
    assert all(mem[i * PAGE] == pattern_page(i) for i in range(8192) if i % 4)


def test_qemu_channels_alone_need_the_qemu_layout():
    _, conn1, conn2 = capture_files("zstd")
    # "current" refuses the stale next_packet_size of 7.2's empty packets.
    with pytest.raises(ProtocolError) as info:
        read_capture([conn1, conn2])
    assert info.value.field == "next_packet_size"
    assert str(info.value).startswith(f"{conn2} at byte ") or \
        str(info.value).startswith(f"{conn1} at byte ")
    # Valid bytes were reported as corrupt, with no word of the layout (a review).
    assert str(info.value).endswith(
        "; decoded as layout current, since no main channel says which: as layout qemu-7.2 it "
        "decodes (a QEMU 7.2 capture? `inspect --layout qemu-7.2`)"), str(info.value)


def test_lone_channels_that_fail_in_every_layout_say_both_were_tried(tmp_path):
    _, conn1, _ = capture_files("zstd")
    cut = tmp_path / "conn1.bin"
    cut.write_bytes(conn1.read_bytes()[:-100])      # a packet cut short: no layout decodes it
    with pytest.raises(ProtocolError) as info:
        read_capture([cut])
    assert info.value.field == "next_packet_size"   # the error of the layout assumed
    assert str(info.value).endswith("; decoded as layout current, since no main channel says "
                                    "which (as layout qemu-7.2 it fails too)"), str(info.value)


def test_decompressed_pages_do_not_pin_their_packet(decoded):
    compression, capture, _ = decoded
    sizes = {len(page.obj) for pages in capture.ram.values() for page in pages.values()}
    if compression == "none":
        # Zero-copy: data pages are slices of the files' bytes.
        assert max(sizes) == max(channel.size for channel in capture.channels)
    else:
        # One buffer per page, so max_ram_bytes bounds the memory really held.
        assert sizes == {PAGE}
