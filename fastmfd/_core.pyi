"""Type stubs for fastmfd's Cython core (fastmfd/_core.pyx).

Exactly the module's Python surface. Names marked "test face" are not called
by the library: each exposes one C loop or encoder of the core on its own so
tests pin its bytes and benchmarks time it (see the comment where it is
defined).
"""

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Self, TypeAlias, overload

# @disjoint_base (PEP 800): a cdef class whose instances have C fields of their own; no
# class derives from two of them (their layouts clash), which mypy may rely on.
from typing_extensions import Buffer, disjoint_base

import numpy as np
import numpy.typing as npt

from .shm import SharedMemory

# What the core reads or writes in place (typed memoryviews of bytes): any buffer. numpy's
# stubs give ndarray __buffer__ only from Python 3.12, so arrays are named here too.
_Buffer: TypeAlias = Buffer | npt.NDArray[Any]

# ---------------------------------------------------------------- wire constants
MULTIFD_MAGIC: Final[int]
CHANNEL_HEADER_SIZE: Final[int]
INIT_PACKET_SIZE: Final[int]
PUNCH_MIN_BYTES: Final[int]
DEVICE_HEADER_SIZE: Final[int]
RAM_CHECKSUM_AT: Final[int]
DEVICE_CHECKSUM_SIZE: Final[int]
CHUNK_HEADER_SIZE: Final[int]
FLAG_SYNC: Final[int]           # RamPacketCodec's flag vocabulary (the library sends SYNC in C)
FLAG_ZLIB: Final[int]
FLAG_ZSTD: Final[int]
FLAG_DEVICE_STATE: Final[int]
FLAG_STORED: Final[int]         # test face: the ``extensions`` bit RamPacketCodec checks
CHUNK_FLAG_LAST: Final[int]
CHANNEL_MAIN: Final[int]
CHANNEL_POSTCOPY: Final[int]
CHANNEL_MULTIFD: Final[int]
CHANNEL_DEVICE_STATE: Final[int]
LAYOUT_CURRENT: Final[str]
LAYOUT_QEMU72: Final[str]

def encode_channel_header(out: _Buffer, channel_type: int) -> int: ...
def decode_channel_header(data: _Buffer) -> int: ...
def encode_init_packet(out: _Buffer, uuid: _Buffer, channel_id: int) -> int: ...
def decode_init_packet(data: _Buffer, expected_uuid: bytes | None = ...,
                       channels: int | None = ...) -> tuple[bytes, int]: ...
def encode_device_header(out: _Buffer, idstr: str | bytes, instance_id: int,
                         next_packet_size: int, flags: int = ...) -> int: ...  # test face
def decode_device_header(data: _Buffer, compression: int = ..., extensions: int = ...,
                         max_payload: int = ..., compression_optional: bool = ...
                         ) -> tuple[int, str, int, int]: ...
def encode_chunk_header(out: _Buffer, idx: int, flags: int = ...) -> int: ...
def decode_chunk_header(data: _Buffer) -> tuple[int, int]: ...

@disjoint_base
class RamPacket:
    flags: int
    pages_alloc: int
    normal_pages: int
    zero_pages: int
    next_packet_size: int
    packet_num: int
    checksum: int
    ramblock: str
    offsets: npt.NDArray[np.uint64]
    zero_offsets: npt.NDArray[np.uint64]
    payload_size: int
    @property
    def is_sync(self) -> bool: ...
    @property
    def stored(self) -> bool: ...

@disjoint_base
class RamPacketCodec:
    def __init__(self, packet_pages: int = ..., page_size: int = ..., layout: str = ...,
                 compression: int = ..., regions: Mapping[str, int] | None = ...,
                 extensions: int = ..., checksum: bool = ...,
                 compression_optional: bool = ...) -> None: ...
    @property
    def header_size(self) -> int: ...
    @property
    def packet_pages(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    def decode(self, data: _Buffer) -> RamPacket: ...
    def validate(self, data: _Buffer) -> int: ...        # test face
    def encode(self, out: _Buffer, *, flags: int = ..., packet_num: int = ...,
               ramblock: str | bytes = ..., normal: Iterable[int] = ...,
               zero: Iterable[int] = ..., next_packet_size: int | None = ...,
               checksum: int = ...) -> int: ...        # test face

# ---------------------------------------------------------------- shared structures
@disjoint_base
class _SharedStructure:
    segment: SharedMemory
    @classmethod
    def attach(cls, name: str) -> Self: ...
    @property
    def name(self) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

@disjoint_base
class BufferPool(_SharedStructure):
    @classmethod
    def create(cls, nslots: int, slot_size: int, tag: str = ..., sparse: bool = ...) -> Self: ...
    @property
    def nslots(self) -> int: ...
    @property
    def slot_size(self) -> int: ...
    @property
    def free_count(self) -> int: ...
    @overload
    def acquire(self, timeout: None = ...) -> int: ...         # waits: a slot, or Aborted
    @overload
    def acquire(self, timeout: float) -> int | None: ...
    def release(self, slot: int) -> None: ...
    def is_held(self, slot: int) -> bool: ...
    def populate(self, slot: int) -> None: ...
    def view(self, slot: int) -> memoryview: ...
    def abort(self) -> None: ...

@disjoint_base
class ChannelSelector(_SharedStructure):
    @classmethod
    def create(cls, nchannels: int, tag: str = ...) -> Self: ...
    @property
    def nchannels(self) -> int: ...
    @overload
    def select(self, timeout: None) -> int: ...                # waits: a channel, or Aborted
    @overload
    def select(self, timeout: float = ...) -> int | None: ...
    def release(self, ch: int) -> None: ...
    def is_busy(self, ch: int) -> bool: ...
    def abort(self) -> None: ...

@disjoint_base
class DirtyBitmap(_SharedStructure):
    @classmethod
    def create(cls, npages: int, tag: str = ...) -> Self: ...
    @property
    def npages(self) -> int: ...
    def mark(self, first: int, count: int = ...) -> None: ...
    def test(self, page: int) -> bool: ...
    def marked(self, pages: Iterable[int] | npt.ArrayLike) -> npt.NDArray[np.uint64]: ...
    def mark_pages(self, pages: Iterable[int] | npt.ArrayLike) -> None: ...
    def unmarked(self) -> tuple[int, int]: ...
    def count(self) -> int: ...
    def collect(self) -> npt.NDArray[np.uint64]: ...

@disjoint_base
class Counters(_SharedStructure):
    @classmethod
    def create(cls, nrows: int, tag: str = ...) -> Self: ...
    @property
    def nrows(self) -> int: ...
    def read(self, r: int) -> dict[str, int]: ...
    def total(self, field: str) -> int: ...

# ---------------------------------------------------------------- pages (test face)
def writev_pages(fd: int, header: _Buffer, buffer: _Buffer, offsets: Iterable[int],
                 page_size: int = ...) -> int: ...
def readv_pages(fd: int, header: _Buffer, buffer: _Buffer, offsets: Iterable[int],
                page_size: int = ...) -> int: ...
def populate(memory: _Buffer, what: str) -> None: ...
def clear_pages(buffer: _Buffer, offsets: Any, page_size: int, punch: bool,
                written: DirtyBitmap | None = ..., what: str = ...) -> bool: ...
def placing_available() -> bool: ...
def is_zero(buffer: _Buffer) -> bool: ...
def find_zero_pages(buffer: _Buffer, page_size: int = ...,
                    pages: Iterable[int] | None = ...) -> npt.NDArray[np.uint64]: ...
@disjoint_base
class FileHoles:
    def __init__(self, fd: int, page_cache: bool = ...) -> None: ...
    @property
    def reads_page_cache(self) -> bool: ...
    def zero_pages(self, buffer: _Buffer, page_size: int, first: int,
                   count: int) -> npt.NDArray[np.uint64]: ...
KNOWN_ZERO_PAGE: Final[int]     # a mailbox page index's bit: a zero page, listed unread

# ---------------------------------------------------------------- codecs
COMPRESSION_NAMES: Final[dict[int, str]]
@disjoint_base
class Codec:
    flag: int
    def compress(self, data: _Buffer) -> bytes: ...     # test face
    def decompress_into(self, data: _Buffer, out: _Buffer) -> None: ...
    def decompress_upto(self, data: _Buffer, out: _Buffer) -> int: ...

@disjoint_base
class ZlibCodec(Codec):
    def __init__(self, compressing: bool, level: int = ...) -> None: ...

@disjoint_base
class ZstdCodec(Codec):
    level: int
    def __init__(self, compressing: bool, level: int = ...) -> None: ...
    def set_level(self, level: int) -> int: ...     # the next packet's level (a new frame)

@disjoint_base
class IsalZlibCodec(Codec):
    def __init__(self, compressing: bool, level: int = ...) -> None: ...

def make_codec(method: str, compressing: bool, level: int = ...,
               use_isal: bool = ...) -> Codec | None: ...

@disjoint_base
class AutoModel:        # test face: compression="auto"'s choice, fed given measurements
    def __init__(self, pace_rate: float = ...) -> None: ...
    def pick(self) -> int: ...
    def compressed(self, index: int, raw: int, wire: int, seconds: float) -> None: ...
    def wrote(self, queued_before: int, queued_after: int, wire: int, now: float,
              sndbuf: int) -> None: ...

# ---------------------------------------------------------------- TLS
@disjoint_base
class TLSChannel:
    """One TLS session (OpenSSL, driven from C) on a connected socket it does not own."""
    fd: int
    server: bool
    @staticmethod
    def connect(fd: int, *, cert: str | os.PathLike[str] | None = ...,
                key: str | os.PathLike[str] | None = ...,
                ca: str | os.PathLike[str] | None = ..., hostname: str | None = ...,
                ciphers: str | None = ..., timeout: float = ...) -> TLSChannel: ...
    @staticmethod
    def accept(fd: int, *, cert: str | os.PathLike[str] | None,      # None: ValueError
               key: str | os.PathLike[str] | None,
               ca: str | os.PathLike[str] | None = ..., ciphers: str | None = ...,
               timeout: float = ...) -> TLSChannel: ...
    def send_all(self, data: _Buffer) -> None: ...
    def recv_exact(self, n: int, timeout: float = ...) -> bytes: ...
    def peer_identities(self) -> list[str]: ...
    def close_write(self) -> None: ...
    def relay(self, plain_fd: int, buffer_size: int = ...) -> None: ...
    @property
    def version(self) -> str: ...
    @property
    def cipher(self) -> str: ...

# ---------------------------------------------------------------- channel engines
CMD_RAM: Final[int]
CMD_DEVICE: Final[int]
CMD_SYNC: Final[int]
CMD_QUIT: Final[int]
EVENT_EOF: Final[int]
EVENT_SYNC: Final[int]
DESCRIPTOR_SIZE: Final[int]

def pack_command(kind: int, target: int = ..., count: int = ..., slot: int = ...,
                 round: int = ...) -> bytes: ...
def pack_descriptor(device: int, idx: int, flags: int, slot: int, length: int,
                    channel: int) -> bytes: ...
def unpack_descriptors(data: _Buffer) -> list[tuple[int, int, int, int, int, int]]: ...

@disjoint_base
class _RegionTable:
    # Each of received .. hole_fds is indexed by the region's place in ``regions``.
    def __init__(self, regions: Iterable[Any], received: Sequence[DirtyBitmap] | None = ...,
                 fresh: Sequence[bool] | None = ..., sparse: Sequence[bool] | None = ...,
                 page_size: int = ..., place_fds: Sequence[int] | None = ...,
                 hole_fds: Sequence[int] | None = ...) -> None: ...

@disjoint_base
class _EngineBase:
    channel: int
    buffer_bytes: int

def receive_channel_bytes(packet_pages: int, page_size: int, largest_region: int,
                          chunk_size: int, devices: bool, compression: str,
                          tls: bool = ...) -> int: ...

@disjoint_base
class SendEngine(_EngineBase):
    def __init__(self, fd: int, channel: int, params: dict[str, Any], codec: Codec | None,
                 regions: list[Any], counters: Counters, selector: ChannelSelector,
                 selector_index: int, mailbox: _Buffer, pool: BufferPool | None = ...,
                 devices: list[tuple[str, int]] | None = ...,
                 tls: TLSChannel | None = ...,
                 hole_fds: list[int] | None = ...) -> None: ...
    def run(self, cmd_fd: int) -> None: ...

@disjoint_base
class RecvEngine(_EngineBase):
    rounds: int
    @property
    def compression(self) -> str | None: ...
    def __init__(self, fd: int, channel: int, params: dict[str, Any], codec: Codec | None,
                 regions: list[Any], counters: Counters, received: list[DirtyBitmap],
                 fresh: list[bool], pool: BufferPool | None = ...,
                 devices: list[tuple[str, int]] | None = ..., reassembly_fd: int = ...,
                 ram_allowed: bool = ..., tls: TLSChannel | None = ...,
                 sparse: list[bool] | None = ...,
                 place_fds: list[int] | None = ...,
                 hole_fds: list[int] | None = ...) -> None: ...
    def run(self) -> int: ...      # EVENT_SYNC or EVENT_EOF

# ---------------------------------------------------------------- misc
def fill_pattern(buf: _Buffer, seed: int, offset: int) -> None: ...
def check_pattern(buf: _Buffer, seed: int, offset: int) -> int: ...
def die_with_parent(sig: int = ...) -> None: ...
def note_collection(phase: str, info: dict[str, int]) -> None: ...
def collecting() -> bool: ...
