"""Shared by the ``test_inspect_*`` files: where the real QEMU captures are,
builders of fastmfd-format capture files, and a two-round fastmfd session with
the RAM image it must decode to (the captures' RAM pattern and UUID are
:mod:`captures`').

The fastmfd streams are built from the ``_core`` encoders, not recorded from a
Source, so that a test chooses every byte inspect reads (which channel carries
a page, where each SYNC falls), byte for byte as DESIGN §4 lays them out: the
main channel (channel header type 0, FMFD preamble, messages) and multifd
channels (channel header type 2 or 3, init packet, RAM and device-state
packets, one compression stream per channel).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fastmfd import _core
from fastmfd.protocol.main_channel import Msg, encode_message, encode_preamble


# QEMU 10.0's own stream (machine pc-i440fx-10.0), zstd-compressed: in the repository.
NATIVE_CAPTURES = Path(__file__).parent / "data" / "qemu-10.0-native"
CAPTURE_ENV = {"7.2": "FASTMFD_QEMU72_CAPTURES", "10.0": "FASTMFD_QEMU10_CAPTURES"}


def captures_dir(version: str = "7.2") -> Path:
    """``../shared/data/qemu-<version>`` beside the repository, or the directory
    $FASTMFD_QEMU72_CAPTURES / $FASTMFD_QEMU10_CAPTURES names (then only there).

    The captures are the project's, not the package's (an sdist has none): where
    they are absent, whatever needs them is skipped, saying why — a test, or a
    whole module that reads them as it is collected."""
    env = CAPTURE_ENV[version]
    if env in os.environ:
        candidates = [Path(os.environ[env])]
    else:
        candidates = [Path(__file__).resolve().parents[2] / f"shared/data/qemu-{version}"]
    for path in candidates:
        if (path / "pattern-none" / "conn1.bin").is_file():
            return path
    pytest.skip(f"the QEMU {version} captures are not in "
                f"{', '.join(str(p) for p in candidates)} (they come with the project's "
                f"shared/data, not the package; set {env} to their directory)",
                allow_module_level=True)


def capture_files(compression: str) -> list[Path]:
    """conn0 (main), conn1, conn2 of ``pattern-<compression>``."""
    return [captures_dir() / f"pattern-{compression}" / f"conn{i}.bin" for i in range(3)]


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


def sparse_setup_message(uuid: bytes, regions: dict[str, int], *, channels: int = 2,
                         packet_pages: int = 128, page_size: int = 4096,
                         compression: str = "none", devices: list[tuple[str, int]] = (),
                         chunk_size: int = 1 << 20) -> dict:
    """A SETUP payload of a few fields only: inspect decodes it leniently (the others
    default), a destination would refuse it, missing fields (a whole one, as a Source
    sends: :func:`migration_support.setup_message`)."""
    return {"uuid": uuid.hex(), "page_size": page_size, "packet_pages": packet_pages,
            "compression": compression, "channels": channels, "device_state_channels": 0,
            "channel_header": True, "chunk_size": chunk_size,
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
    """Builds one fastmfd multifd channel's bytes, packet by packet.

    With ``compression="auto"`` payloads alternate: raw, zstd (level 1, then -5:
    a new frame), raw, ... as an auto sender may send them."""

    def __init__(self, channel_id: int, uuid: bytes, *, packet_pages: int = 128,
                 page_size: int = 4096, compression: str = "none",
                 header_type: int | None = _core.CHANNEL_MULTIFD) -> None:
        self.page_size = page_size
        self.auto = compression == "auto"
        self.codec = _core.RamPacketCodec(packet_pages, page_size, "current",
                                          {"none": 0, "zlib": _core.FLAG_ZLIB,
                                           "zstd": _core.FLAG_ZSTD,
                                           "auto": _core.FLAG_ZSTD}[compression],
                                          compression_optional=self.auto)
        self.compressor = _core.make_codec(compression, compressing=True)
        self.payloads = 0
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
        if pages and self._compress_next():
            payload = self.compressor.compress(raw)
            flags |= self.compressor.flag
        elif self.compressor is not None and zero and not self.auto:
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
        flags = 0
        if self._compress_next():           # the channel's one stream, as RAM packets use
            body = self.compressor.compress(body)
            flags = self.compressor.flag
        header = bytearray(_core.DEVICE_HEADER_SIZE)
        _core.encode_device_header(header, idstr, instance_id, len(body), flags=flags)
        self.parts += [bytes(header), body]
        return self

    def _compress_next(self) -> bool:
        """Whether the next payload goes compressed."""
        if self.compressor is None:
            return False
        self.payloads += 1
        if not self.auto:
            return True
        if self.payloads % 4 == 0:
            self.compressor.set_level(-5)
        return self.payloads % 2 == 0

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def write_files(directory: Path, files: dict[str, bytes]) -> list[Path]:
    paths = []
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- a fastmfd session

SESSION_UUID = bytes(range(16))    # the fastmfd session's
PAGE = 4096
PACKET_PAGES = 16                   # not QEMU's 128: SETUP must be what counts
REGIONS = {"ram0": 48 * PAGE, "vga": 4 * PAGE}


def page(tag: int, index: int) -> bytes:
    """Distinct content per (tag, page index); never all zero."""
    return bytes([tag + 1, index % 256]) * (PAGE // 2)


class Session:
    """A two-round session and the RAM image it must decode to.

    Round 0 sends every page (every third one of ram0 as a listed zero page).
    Round 1 re-sends two pages with new content, each on the *other* channel
    than its first copy, so only barrier order (not channel order) gets the
    newer copy right.
    """

    def __init__(self, compression: str = "none") -> None:
        self.compression = compression
        self.expected: dict[str, dict[int, bytes]] = {name: {} for name in REGIONS}
        self.channels = [ChannelWriter(i, SESSION_UUID, packet_pages=PACKET_PAGES,
                                       compression=compression) for i in range(2)]
        self.num = 0
        self.zero_listed = 0

    def send(self, channel: int, block: str, indexes: range, tag: int, *,
             zero_every: int = 0, sync: bool = False) -> None:
        data = {}
        zero = []
        for i in indexes:
            if zero_every and i % zero_every == 0:
                zero.append(i * PAGE)
                self.expected[block][i * PAGE] = bytes(PAGE)
            else:
                data[i * PAGE] = self.expected[block][i * PAGE] = page(tag, i)
        self.zero_listed += len(zero)
        self.channels[channel].ram(block, data, zero, packet_num=self.next_num(), sync=sync)

    def sync_all(self) -> None:
        for writer in self.channels:
            writer.sync(self.next_num())

    def next_num(self) -> int:
        self.num += 1
        return self.num

    def files(self, messages_after_setup: list, devices=(),
              chunk_size: int = 1 << 20) -> dict[str, bytes]:
        setup = sparse_setup_message(SESSION_UUID, REGIONS, packet_pages=PACKET_PAGES,
                                     compression=self.compression, devices=list(devices),
                                     chunk_size=chunk_size)
        return {"main.bin": main_channel(setup, messages_after_setup),
                **{f"ch{i}.bin": w.bytes() for i, w in enumerate(self.channels)}}


def two_rounds(compression: str = "none") -> Session:
    s = Session(compression)
    s.send(0, "ram0", range(0, 16), tag=0, zero_every=3)
    s.send(1, "ram0", range(16, 32), tag=0, zero_every=3)
    s.send(0, "ram0", range(32, 48), tag=0, zero_every=3)
    s.send(1, "vga", range(0, 4), tag=0)
    s.sync_all()
    s.send(1, "ram0", range(5, 6), tag=1)          # first copy went on channel 0
    s.send(0, "ram0", range(20, 21), tag=1)        # first copy went on channel 1
    s.sync_all()
    return s


ROUND_ENDS = [(Msg.ROUND_END, {"round": 1}), (Msg.ROUND_END, {"round": 2}),
              (Msg.COMPLETE, {})]
