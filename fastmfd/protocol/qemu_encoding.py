"""QEMU's main migration channel written: as much of it as a replay of saved RAM
needs (``fastmfd.qemu.send``): the stream's start, the RAM section's start
(block list), its ZERO records, its MULTIFD_FLUSH records and its ends, and the
commands that open a return path. The format, and its decoder, are :mod:`.qemu`'s.
"""

from __future__ import annotations

import struct

import numpy as np

from .qemu import (COMMAND, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, QEVM_MAGIC,
                   QEVM_VERSION, RAM_CONTINUE, RAM_EOS, RAM_MEM_SIZE, RAM_MULTIFD_FLUSH,
                   RAM_SECTION_VERSION, RAM_ZERO, SECTION_END, SECTION_FOOTER, SECTION_START,
                   ZERO_RECORD)

__all__ = ["encode_stream_start", "encode_ram_start", "encode_ram_end_start",
           "encode_zero_records", "encode_multifd_flush", "encode_ram_eos",
           "encode_open_return_path"]


def _name_bytes(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not raw or len(raw) > 255:
        raise ValueError(f"name {name!r}: 1..255 bytes of UTF-8 expected")
    return bytes([len(raw)]) + raw


def encode_stream_start(configuration: bytes) -> bytes:
    """``QEVM``, the version, then the CONFIGURATION section as a source sent it."""
    return QEVM_MAGIC + struct.pack(">I", QEVM_VERSION) + configuration


def encode_ram_start(section_id: int, blocks: dict[str, int]) -> bytes:
    """The RAM section's START header and the block list (MEM_SIZE record): what
    comes before the setup SYNC on every multifd channel."""
    out = [struct.pack(">BI", SECTION_START, section_id), _name_bytes("ram"),
           struct.pack(">IIQ", 0, RAM_SECTION_VERSION, sum(blocks.values()) | RAM_MEM_SIZE)]
    for name, size in blocks.items():
        out += [_name_bytes(name), struct.pack(">Q", size)]
    return b"".join(out)


def encode_ram_end_start(section_id: int) -> bytes:
    """The header of the RAM section's END (the completion section)."""
    return struct.pack(">BI", SECTION_END, section_id)


def encode_zero_records(block: str, offsets: np.ndarray) -> bytes:
    """ZERO records (fill byte 0) for the pages at byte ``offsets`` of ``block``:
    the first names the block, the others CONTINUE it (built without a Python
    loop: a block may have millions)."""
    if len(offsets) == 0:
        return b""
    records = np.empty(len(offsets), dtype=ZERO_RECORD)
    records["header"] = np.asarray(offsets, dtype=np.uint64) | (RAM_ZERO | RAM_CONTINUE)
    records["fill"] = 0
    first = struct.pack(">Q", int(offsets[0]) | RAM_ZERO) + _name_bytes(block) + b"\0"
    return first + records[1:].tobytes()


def encode_multifd_flush() -> bytes:
    """The MULTIFD_FLUSH record: a per-round stream's SYNC barrier."""
    return struct.pack(">Q", RAM_MULTIFD_FLUSH)


def encode_ram_eos(section_id: int, footer: bool) -> bytes:
    """A RAM section's end: EOS, then (when the stream uses them) its footer."""
    eos = struct.pack(">Q", RAM_EOS)
    return eos + (struct.pack(">BI", SECTION_FOOTER, section_id) if footer else b"")


def encode_open_return_path(ping: int) -> bytes:
    """The commands a QEMU source sends after the configuration when it wants
    answers (migration_thread): OPEN_RETURN_PATH, then a PING of ``ping``, which
    the destination's PONG answers at once."""
    return (struct.pack(">BHH", COMMAND, MIG_CMD_OPEN_RETURN_PATH, 0)
            + struct.pack(">BHHI", COMMAND, MIG_CMD_PING, 4, ping))
