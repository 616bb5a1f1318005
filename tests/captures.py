"""Walking the multifd channels of the real QEMU 7.2 captures, independently of fastmfd.

A 7.2 multifd channel is a 64-byte init packet, then RAM packets: a
1344-byte header, followed by payload only when ``normal_pages > 0`` —
``normal_pages * 4096`` raw bytes, or ``next_packet_size`` compressed bytes
(spec §2.2, §2.5). Only those two header fields are read here, with
``struct``, so the tests compare fastmfd's codec against an independent
reading of the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = 4096
PACKET_PAGES = 128
HEADER_SIZE = 320 + 8 * PACKET_PAGES
INIT_SIZE = 64

PATTERNS = ("pattern-none", "pattern-zlib", "pattern-zstd")
CHANNEL_FILES = ("conn1.bin", "conn2.bin")
UUID = bytes.fromhex("123456789abcdef01122334455667788")

# RAMBlock used_length, as the main channel's setup section announces them.
BLOCKS = {
    "mem": 0x2000000,
    "/rom@etc/acpi/tables": 0x20000,
    "pc.bios": 0x40000,
    "pc.rom": 0x20000,
    "/rom@etc/table-loader": 0x1000,
    "/rom@etc/acpi/rsdp": 0x1000,
}


@dataclass(frozen=True)
class RawPacket:
    """One RAM packet as it sits in a capture file."""
    position: int           # byte offset of the header in the file
    header: bytes
    payload: bytes
    previous: bytes | None  # the previous header on the channel (for stale fields)

    @property
    def normal_pages(self) -> int:
        return struct.unpack_from(">I", self.header, 16)[0]

    @property
    def next_packet_size(self) -> int:
        return struct.unpack_from(">I", self.header, 20)[0]


def read_channel(captures: Path, pattern: str, conn: str) -> tuple[bytes, list[RawPacket]]:
    """The init packet and every RAM packet of one captured multifd channel."""
    data = (captures / pattern / conn).read_bytes()
    compressed = pattern != "pattern-none"
    packets: list[RawPacket] = []
    pos, previous = INIT_SIZE, None
    while pos < len(data):
        header = data[pos:pos + HEADER_SIZE]
        normal, next_size = struct.unpack_from(">II", header, 16)
        size = (next_size if compressed else normal * PAGE_SIZE) if normal else 0
        payload = data[pos + HEADER_SIZE:pos + HEADER_SIZE + size]
        assert len(header) == HEADER_SIZE and len(payload) == size, f"{conn} cut at {pos}"
        packets.append(RawPacket(pos, header, payload, previous))
        previous = header
        pos += HEADER_SIZE + size
    return data[:INIT_SIZE], packets


def pattern_page(index: int) -> bytes:
    """Page ``index`` of block ``mem`` (README: the LE u64 index repeated; i % 4 == 0 is zero)."""
    if index % 4 == 0:
        return bytes(PAGE_SIZE)
    return struct.pack("<Q", index) * (PAGE_SIZE // 8)
