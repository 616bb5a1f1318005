"""Shared by the ``test_inspect_*`` files: the real QEMU 7.2 captures, their RAM
pattern, and builders of fastmfd-format capture files.

The fastmfd engine that writes such streams does not exist yet, so the tests
build them from the ``_core`` encoders, byte for byte as DESIGN §4 lays them
out: the main channel (channel header type 0, FMFD preamble, messages) and
multifd channels (channel header type 2 or 3, init packet, RAM and
device-state packets, one compression stream per channel).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from fastmfd import _core
from fastmfd.wire import Msg, encode_message, encode_preamble

QEMU_UUID = bytes.fromhex("123456789abcdef01122334455667788")   # the captures' -uuid


def captures_dir() -> Path:
    """``../shared/data/qemu-7.2`` beside the repository (or $FASTMFD_QEMU72_CAPTURES)."""
    candidates = [Path(__file__).resolve().parents[2] / "shared/data/qemu-7.2",
                  Path("/work/shared/data/qemu-7.2")]
    if "FASTMFD_QEMU72_CAPTURES" in os.environ:
        candidates.insert(0, Path(os.environ["FASTMFD_QEMU72_CAPTURES"]))
    for path in candidates:
        if (path / "pattern-none" / "conn1.bin").is_file():
            return path
    raise FileNotFoundError(f"QEMU 7.2 captures not found in {[str(p) for p in candidates]}; "
                            "set FASTMFD_QEMU72_CAPTURES")


def capture_files(compression: str) -> list[Path]:
    """conn0 (main), conn1, conn2 of ``pattern-<compression>``."""
    return [captures_dir() / f"pattern-{compression}" / f"conn{i}.bin" for i in range(3)]


def pattern_page(i: int) -> bytes:
    """Page i of block ``mem`` (README): LE u64 i repeated 512 times; zero if i % 4 == 0."""
    return bytes(4096) if i % 4 == 0 else struct.pack("<Q", i) * 512


# ---------------------------------------------------------------- fastmfd streams

def channel_header(channel_type: int) -> bytes:
    out = bytearray(_core.CHANNEL_HEADER_SIZE)
    _core.encode_channel_header(out, channel_type)
    return bytes(out)


def main_channel(setup: dict, messages: list[tuple[Msg, object]], *,
                 header: bool = True) -> bytes:
    """A fastmfd main channel: [channel header], preamble, SETUP, ``messages``."""
    out = channel_header(_core.CHANNEL_MAIN) if header else b""
    out += encode_preamble() + encode_message(Msg.SETUP, setup)
    return out + b"".join(encode_message(kind, payload) for kind, payload in messages)


def setup_message(uuid: bytes, regions: dict[str, int], *, channels: int = 2,
                  packet_pages: int = 128, page_size: int = 4096, compression: str = "none",
                  devices: list[tuple[str, int]] = ()) -> dict:
    return {"uuid": uuid.hex(), "page_size": page_size, "packet_pages": packet_pages,
            "compression": compression, "channels": channels, "device_state_channels": 0,
            "channel_header": True,
            "regions": [{"name": n, "size": s} for n, s in regions.items()],
            "devices": [{"idstr": i, "instance_id": n} for i, n in devices]}


def device_message(index: int, idx: int, data: bytes, last: bool = False) -> bytes:
    """An old-way DEVICE_STATE payload: BE u32 device index, chunk header, data."""
    return index.to_bytes(4, "big") + chunk(idx, data, last)


def chunk(idx: int, data: bytes, last: bool = False) -> bytes:
    out = bytearray(_core.CHUNK_HEADER_SIZE)
    _core.encode_chunk_header(out, idx, _core.CHUNK_FLAG_LAST if last else 0)
    return bytes(out) + data


class ChannelWriter:
    """Builds one fastmfd multifd channel's bytes, packet by packet."""

    def __init__(self, channel_id: int, uuid: bytes, *, packet_pages: int = 128,
                 page_size: int = 4096, compression: str = "none",
                 header_type: int | None = _core.CHANNEL_MULTIFD) -> None:
        self.page_size = page_size
        self.codec = _core.RamPacketCodec(packet_pages, page_size, "current",
                                          {"none": 0, "zlib": _core.FLAG_ZLIB,
                                           "zstd": _core.FLAG_ZSTD}[compression])
        self.compressor = _core.make_codec(compression, compressing=True)
        self.parts = [channel_header(header_type)] if header_type is not None else []
        init = bytearray(_core.INIT_PACKET_SIZE)
        _core.encode_init_packet(init, uuid, channel_id)
        self.parts.append(bytes(init))

    def ram(self, block: str, pages: dict[int, bytes], zero: list[int] = (), *,
            packet_num: int, sync: bool = False) -> "ChannelWriter":
        """A RAM packet: ``pages`` {offset: bytes} sent as data, ``zero`` listed only."""
        raw = b"".join(pages.values())
        flags = _core.FLAG_SYNC if sync else 0
        payload = raw
        if self.compressor is not None and pages:
            payload = self.compressor.compress(raw)
            flags |= self.compressor.flag
        elif self.compressor is not None and zero:
            flags |= self.compressor.flag       # the method's bit, even without data
        header = bytearray(self.codec.header_size)
        self.codec.encode(header, flags=flags, packet_num=packet_num, ramblock=block,
                          normal=np.array(list(pages), dtype=np.uint64),
                          zero=np.array(list(zero), dtype=np.uint64),
                          next_packet_size=len(payload))
        self.parts += [bytes(header), payload]
        return self

    def sync(self, packet_num: int) -> "ChannelWriter":
        return self.ram("", {}, packet_num=packet_num, sync=True)

    def device(self, idstr: str, instance_id: int, idx: int, data: bytes,
               last: bool = False) -> "ChannelWriter":
        body = chunk(idx, data, last)
        header = bytearray(_core.DEVICE_HEADER_SIZE)
        _core.encode_device_header(header, idstr, instance_id, len(body))
        self.parts += [bytes(header), body]
        return self

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def write_files(directory: Path, files: dict[str, bytes]) -> list[Path]:
    paths = []
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths
