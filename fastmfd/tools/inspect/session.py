"""What the decoders of a capture must know about its session.

The main channel says it (fastmfd's SETUP, QEMU's blocks and page size);
without one, the arguments of :func:`~.capture.read_capture` and what the
multifd channels show themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import _core
from ...protocol.qemu import QEMU_PACKET_BYTES

__all__ = ["Session", "COMPRESSION_FLAGS", "COMPRESSION_NAMES", "default_packet_pages"]

COMPRESSION_FLAGS = {"none": 0, "zlib": _core.FLAG_ZLIB, "zstd": _core.FLAG_ZSTD}
COMPRESSION_NAMES = {flag: name for name, flag in COMPRESSION_FLAGS.items()}


@dataclass
class Session:
    """What the decoders must know, from the main channel or the arguments."""
    packet_pages: int | None                # None: QEMU's, from the page size
    page_size: int
    compression: int | None = None          # wire flag; None: learn it from the packets
    compression_optional: bool = False      # "auto": a packet may also go raw (no bit)
    checksum: bool = False
    uuid: bytes | None = None
    channels: int | None = None
    regions: dict[str, int] | None = None
    devices: list[tuple[str, int]] | None = None
    chunk_size: int | None = None           # largest device chunk's data, from SETUP
    # Whether each multifd channel carries the source's shared-key proof after its init
    # packet (the main channel's AUTH messages say so); None: no main channel says.
    key_proof: bool | None = None


def default_packet_pages(page_size: int) -> int:
    """QEMU's packet size in pages: 512 KiB of target pages (128 of 4 KiB)."""
    return max(1, QEMU_PACKET_BYTES // page_size)
