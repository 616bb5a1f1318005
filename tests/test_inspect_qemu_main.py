"""QEMU main channels the shared captures do not show, built byte by byte.

The layout follows migration/savevm.c and ram.c @ 7.2 (spec §4.4, §4.5):
configuration subsections, commands, PAGE records, fill bytes other than 0,
x-ignore-shared block addresses, 8 KiB target pages, streams without section
footers, how the main channel's records and a multifd channel's pages are
ordered by the SYNC barriers, and each thing the decoder must refuse.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastmfd import _core
from fastmfd.errors import ProtocolError
from fastmfd.protocol.qemu import stream_end_at
from fastmfd.tools.inspect.capture import read_capture
from listen_support import run_cli

UUID = bytes.fromhex("00112233445566778899aabbccddeeff")
PAGE = 8192                                  # target-page-bits 13
BLOCKS = {"a": 4 * PAGE, "b": 2 * PAGE}
ZERO, MEM_SIZE, PAGE_RECORD, EOS, CONTINUE, XBZRLE = 0x02, 0x04, 0x08, 0x10, 0x20, 0x40


def be(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


def name(text: str) -> bytes:
    return be(len(text), 1) + text.encode()


class Qevm:
    """A QEVM stream, section by section; ``footers`` as machine types >= 2.4 send them."""

    def __init__(self, *, footers: bool = True, caps=("x-ignore-shared",),
                 page_bits: int = 13) -> None:
        self.footers = footers
        self.ignore_shared = "x-ignore-shared" in caps
        subsections = (b"\x05" + name("configuration/target-page-bits") + be(1, 4)
                       + be(page_bits, 4))
        if caps:
            subsections += (b"\x05" + name("configuration/capabilities") + be(1, 4)
                            + be(len(caps), 4) + b"".join(name(c) for c in caps))
        subsections += b"\x05" + name("configuration/uuid") + be(1, 4) + UUID
        machine = b"pc-i440fx-7.2"
        self.out = (b"QEVM" + be(3, 4) + b"\x07" + be(len(machine), 4) + machine
                    + subsections)

    def command(self, cmd: int, data: bytes = b"") -> "Qevm":
        self.out += b"\x08" + be(cmd, 2) + be(len(data), 2) + data
        return self

    def ram_setup(self, blocks=BLOCKS, total=None) -> "Qevm":
        body = be((sum(blocks.values()) if total is None else total) | MEM_SIZE, 8)
        for block, size in blocks.items():
            body += name(block) + be(size, 8) + (be(0xFEED0000, 8) if self.ignore_shared
                                                 else b"")
        return self.section(0x01, 2, body + be(EOS, 8), header=name("ram") + be(0, 4) + be(4, 4))

    def ram(self, kind: int, *records: bytes) -> "Qevm":
        return self.section(kind, 2, b"".join(records) + be(EOS, 8))

    def section(self, kind: int, section_id: int, body: bytes, header: bytes = b"") -> "Qevm":
        self.out += bytes([kind]) + be(section_id, 4) + header + body
        if self.footers:
            self.out += b"\x7e" + be(section_id, 4)
        return self

    def end(self, page_size: int = PAGE) -> bytes:
        """A device section, QEMU_VM_EOF and the VM description."""
        device = b"\x04" + be(3, 4) + name("timer") + be(0, 4) + be(2, 4) + bytes(24)
        desc = json.dumps({"page_size": page_size, "devices": [{"name": "timer"}]}).encode()
        return self.out + device + b"\x00\x06" + be(len(desc), 4) + desc


def record(block: str | None, offset: int, flags: int, payload: bytes = b"") -> bytes:
    return (be(offset | flags | (CONTINUE if block is None else 0), 8)
            + (name(block) if block is not None else b"") + payload)


def channel(*packets) -> bytes:
    """A 7.2 multifd channel of 8 KiB pages (QEMU's 64 per packet); packets are
    ``(block, {offset: data}, sync)``."""
    codec = _core.RamPacketCodec(64, PAGE, "qemu-7.2")
    init = bytearray(64)
    _core.encode_init_packet(init, UUID, 0)
    out = bytes(init)
    for num, (block, pages, sync) in enumerate(packets):
        header = bytearray(codec.header_size)
        codec.encode(header, flags=1 if sync else 0, packet_num=num, ramblock=block,
                     normal=np.array(list(pages), dtype=np.uint64))
        out += bytes(header) + b"".join(pages.values())
    return out


def fill(byte: int) -> bytes:
    return bytes([byte]) * PAGE


def decode(tmp_path, main: bytes, *channels: bytes, **kwargs):
    paths = [tmp_path / "main.bin"]
    paths[0].write_bytes(main)
    for i, data in enumerate(channels):
        paths.append(tmp_path / f"ch{i}.bin")
        paths[-1].write_bytes(data)
    return paths, read_capture(paths, **kwargs)


@pytest.mark.parametrize("footers", [True, False])
def test_configuration_commands_page_records_and_fill_bytes(tmp_path, footers):
    main = (Qevm(footers=footers).command(1).command(2, be(7, 4)).ram_setup()
            .ram(0x02, record("a", 0, PAGE_RECORD, fill(0x11)), record(None, PAGE, ZERO, b"\0"),
                 record("b", 0, ZERO, b"\x5a"))
            .ram(0x03, record("a", 2 * PAGE, PAGE_RECORD, fill(0x22)))
            .end())
    ch = channel(("", {}, True), ("a", {3 * PAGE: fill(0x33)}, False),
                 ("b", {PAGE: fill(0x44)}, True), ("", {}, True))
    _, capture = decode(tmp_path, main, ch)
    assert (capture.page_size, capture.packet_pages) == (PAGE, 64)
    assert capture.blocks == BLOCKS
    assert {b: {o: bytes(p) for o, p in pages.items()} for b, pages in capture.ram.items()} == {
        "a": {0: fill(0x11), PAGE: fill(0), 2 * PAGE: fill(0x22), 3 * PAGE: fill(0x33)},
        "b": {0: fill(0x5a), PAGE: fill(0x44)}}
    main = capture.main
    assert (main.capabilities, main.uuid, main.commands) == (["x-ignore-shared"], UUID, 2)
    assert (main.zero_pages, main.data_pages, main.ram_section_ends) == (2, 2, 3)
    assert (main.first_device_section, main.vm_devices) == ("timer", 1)


def test_rounds_order_main_channel_records_and_multifd_pages(tmp_path):
    # Round 1: main zeroes a@0, the channel sends a@PAGE. Round 2: the other
    # way round. Applying one source entirely before the other gets one wrong.
    main = (Qevm().ram_setup()
            .ram(0x02, record("a", 0, ZERO, b"\0"))
            .ram(0x03, record("a", PAGE, ZERO, b"\0")).end())
    ch = channel(("", {}, True), ("a", {PAGE: fill(1)}, True), ("a", {0: fill(2)}, True))
    _, capture = decode(tmp_path, main, ch)
    assert {o: bytes(p) for o, p in capture.ram["a"].items()} == {0: fill(2), PAGE: fill(0)}
    assert (capture.pages_resent, capture.pages_resent_changed) == (2, 2)


def wrong_footer() -> bytes:
    q = Qevm(footers=False).ram_setup()
    q.out += b"\x7e" + be(2, 4) + b"\x03" + be(2, 4) + be(EOS, 8) + b"\x7e" + be(9, 4)
    return q.end()


def commands(n: int) -> bytes:
    """``n`` ENABLE_COLO commands (each kept, as any but OPEN_RETURN_PATH and PING)."""
    q = Qevm()
    for _ in range(n):
        q.command(8)
    return q.ram_setup().ram(0x03).end()


def test_16_commands_are_kept_and_more_refused(tmp_path):
    """Each COMMAND section is kept for a replay: a few (QEMU sends few), not without
    bound (a stream of 5-byte commands held 20x its size)."""
    assert decode(tmp_path, commands(16))[1].main.commands == 16
    with pytest.raises(ProtocolError, match=r"main.bin at byte \d+: main channel: more than 16 "
                                            r"COMMAND sections"):
        decode(tmp_path, commands(17))


def ram_with(*records: bytes) -> bytes:
    return Qevm().ram_setup().ram(0x02, *records).ram(0x03).end()


CASES = {   # name: (the stream, the field the error names)
    "postcopy": (lambda: Qevm().command(3, bytes(16)).ram_setup().end(), "command"),
    "xbzrle": (lambda: ram_with(record("a", 0, XBZRLE)), "flags"),
    "zero and page": (lambda: ram_with(record("a", 0, ZERO | PAGE_RECORD)), "flags"),
    "continue first": (lambda: ram_with(record(None, 0, ZERO, b"\0")), "flags"),
    "unknown block": (lambda: ram_with(record("c", 0, ZERO, b"\0")), "block name"),
    "offset": (lambda: ram_with(record("b", 2 * PAGE, ZERO, b"\0")), "offset"),
    "device first": (lambda: Qevm().ram_setup().end(), "section"),
    "sizes over total": (lambda: Qevm().ram_setup(total=5 * PAGE).ram(0x03).end(),
                         "block size"),
    "unaligned block": (lambda: Qevm().ram_setup({"a": PAGE + 512, "b": PAGE - 512})
                        .ram(0x03).end(),
                        "block size"),
    "footer id": (wrong_footer, "footer"),
    "page bits": (lambda: Qevm(page_bits=30).ram_setup().ram(0x03).end(), "target_page_bits"),
    "vmdesc page size": (lambda: Qevm().ram_setup().ram(0x03).end(page_size=4096),
                         "vmdescription"),
    "no vmdesc": (lambda: Qevm().ram_setup().ram(0x03).end()[:-3], "QEMU_VM_EOF"),
    "version": (lambda: Qevm().ram_setup().ram(0x03).end().replace(b"QEVM\0\0\0\3",
                                                                   b"QEVM\0\0\0\2"),
                "version"),
}


@pytest.mark.parametrize("case", CASES)
def test_faults_are_located_in_the_main_channel(tmp_path, case):
    stream, field = CASES[case]
    with pytest.raises(ProtocolError) as info:
        decode(tmp_path, stream())
    assert info.value.field == field
    assert str(info.value).startswith(f"{tmp_path / 'main.bin'} at byte ")


def test_a_stream_ends_at_its_vm_description_and_at_no_shorter_length():
    """Where listen --qemu completes, QEMU's connections still open: after the VM
    description, whose length the 4 bytes before it give; at no other length,
    though the device section holds NULs and the description ends in '}'
    several times over."""
    stream = Qevm().ram_setup().end()
    marker = stream.rindex(b"\x00\x06")
    assert stream_end_at(stream, 0, len(stream)) == marker
    assert [n for n in range(len(stream) - 1) if stream_end_at(stream, 0, n) is not None] == []
    assert stream_end_at(stream + b"}", 0, len(stream) + 1) is None


@pytest.mark.parametrize("kind", ["zero runs", "named records, fill 1"])
def test_millions_of_records_take_memory_by_page_not_by_record(tmp_path, kind):
    """A main channel of a million ZERO records, all for one page: 9 MB of runs
    (a 7.2 stream's one record per zero page, each CONTINUE) or 11 MB of records
    naming their block. Kept as an object each until every channel was read,
    such a stream took 19 times its size (a review: 85 MB, 1.6 GiB), a
    MemoryError under 160 MiB; now the image holds each page once, with its
    round."""
    count = 1_000_000
    first = record("a", 0, ZERO, b"\0")
    records = first + (record(None, 0, ZERO, b"\0") * count if kind == "zero runs"
                       else record("a", 0, ZERO, b"\1") * count)
    path = tmp_path / "main.bin"
    path.write_bytes(Qevm().ram_setup().ram(0x02, records).ram(0x03).end())
    done = run_cli("inspect", str(path), "--json", timeout=240, max_data=160 << 20)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["main"]["zero_pages"] == count + 1
    assert summary["ram"]["pages_resent"] == count
