"""In-process fuzz targets of benchmarks/fuzz.py: fastmfd's decoders fed mutated inputs.

Each :class:`Target` builds its seeds once per process (valid inputs: encoder
output, headers cut from the real QEMU captures, captures fastmfd's encoders
make), then makes cases from a ``random.Random`` and runs them. A case passes
when the decoder returns or raises a :class:`~fastmfd.errors.FastMFDError`;
some targets add an oracle (``Broken``, an AssertionError, when it fails):

- RAM headers: ``validate()`` and ``decode()`` agree, and a header that decodes
  obeys what the receive engine relies on (offsets aligned, inside the named
  region, counts within ``pages_alloc <= packet_pages``, payload size);
- device, chunk, init, channel and message headers: the decoded values are
  in range;
- SETUP: what decodes re-encodes to itself;
- codecs: the packets before the mutated one decompress to the right pages.

Anything else raised (TypeError, KeyError, RecursionError...) is a finding.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fastmfd  # noqa: E402
from fastmfd import _core  # noqa: E402
from fastmfd.errors import ProtocolError  # noqa: E402
from fastmfd.protocol import main_channel as mc  # noqa: E402
from fastmfd.protocol.qemu import decode_qemu_main  # noqa: E402
from fastmfd.protocol.setup import (MAX_REGION_BYTES, DeviceSpec, RegionSpec,  # noqa: E402
                                    Setup)

from _fuzz_mutate import Field, mutate_bytes, mutate_text  # noqa: E402

__all__ = ["Target", "Broken", "TARGETS", "DATA_DIR"]

# Read only: the real QEMU captures, in the project's shared/data beside the checkout.
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
COMPRESSION_MASK = {_core.LAYOUT_CURRENT: 0x3E, _core.LAYOUT_QEMU72: 0x0E}
QEMU_BLOCKS = {"mem": 0x2000000, "/rom@etc/acpi/tables": 0x20000, "pc.bios": 0x40000,
               "pc.rom": 0x20000, "/rom@etc/table-loader": 0x1000, "/rom@etc/acpi/rsdp": 0x1000}


class Broken(AssertionError):
    """An oracle failed: the decoder accepted what it must not, or two decoders disagree."""


@dataclass
class Target:
    name: str
    group: str                                  # "packets" or "setups"
    weight: float                               # share of its group's cases
    build: Callable[[], Any]                    # -> state (seeds), once per process
    make: Callable[[random.Random, Any], Any]   # -> one case
    run: Callable[[Any, Any], None]             # decode the case (raises)
    batch: int = 2000                           # cases per batch


# ---------------------------------------------------------------- fields

CHANNEL_HEADER_FIELDS = (Field(0, 8, "header_size"), Field(8, 4, "channel_type"))
INIT_FIELDS = (Field(0, 4, "magic"), Field(4, 4, "version"), Field(8, 8, "uuid"),
               Field(16, 8, "uuid"), Field(24, 1, "id"), Field(25, 1, "pad"),
               Field(56, 8, "pad"))
DEVICE_FIELDS = (Field(0, 4, "magic"), Field(4, 4, "version"), Field(8, 4, "flags"),
                 Field(12, 8, "idstr"), Field(267, 1, "idstr end"),
                 Field(268, 4, "instance_id"), Field(272, 4, "next_packet_size"))
CHUNK_FIELDS = (Field(0, 4, "version"), Field(4, 4, "idx"), Field(8, 4, "flags"))
MESSAGE_FIELDS = (Field(0, 4, "type"), Field(4, 4, "length"))


def ram_fields(packet_pages: int) -> tuple[Field, ...]:
    base = (Field(0, 4, "magic"), Field(4, 4, "version"), Field(8, 4, "flags"),
            Field(12, 4, "pages_alloc"), Field(16, 4, "normal_pages"),
            Field(20, 4, "next_packet_size"), Field(24, 8, "packet_num"),
            Field(32, 4, "zero_pages"), Field(36, 4, "unused"), Field(40, 8, "checksum"),
            Field(48, 8, "unused"), Field(56, 8, "unused"), Field(64, 8, "ramblock"),
            Field(319, 1, "ramblock end"))
    offsets = {0, 1, 2, 3, packet_pages - 1, packet_pages // 2}
    return base + tuple(Field(320 + 8 * i, 8, f"offset[{i}]") for i in sorted(offsets)
                        if 0 <= i < packet_pages)


# ---------------------------------------------------------------- RAM packets

@dataclass
class RamConfig:
    name: str
    params: dict
    seeds: Callable[["RamConfig", _core.RamPacketCodec], list[bytes]]


def _encoded_seeds(cfg: RamConfig, codec: _core.RamPacketCodec) -> list[bytes]:
    """Valid headers from the encoder: data, zero-only, mixed, SYNC, empty, full."""
    p = cfg.params
    page, pages = p.get("page_size", 4096), p["packet_pages"]
    comp = p.get("compression", 0)
    regions = p.get("regions") or {"pc.ram": 1 << 20}
    name, size = next(iter(regions.items()))
    last = size - page
    qemu72 = p.get("layout") == _core.LAYOUT_QEMU72
    out = []
    layouts = [dict(normal=[0, page, 3 * page]), dict(normal=[last]),
               dict(normal=[page * i for i in range(min(pages, size // page))]),
               dict(flags=_core.FLAG_SYNC)]
    if not qemu72:
        layouts += [dict(zero=[0, 2 * page]), dict(normal=[page], zero=[last]),
                    dict(zero=[last], flags=comp)]
    for fields in layouts:
        fields = dict(fields)
        if fields.get("normal"):
            fields.setdefault("flags", 0)
            fields["flags"] |= comp
            if comp:
                stored = p.get("extensions", 0) and len(out) % 2
                fields["flags"] |= _core.FLAG_STORED if stored else 0
                fields["next_packet_size"] = None if stored else 77
        if fields.get("normal") or fields.get("zero"):
            fields["ramblock"] = name
            if not qemu72:
                fields["flags"] = fields.get("flags", 0) | comp
        if p.get("checksum"):
            fields["checksum"] = 0xDEADBEEF
        header = bytearray(codec.header_size)
        codec.encode(header, **fields)
        try:
            codec.validate(header)
        except ProtocolError:
            continue            # offsets past a small region: not a valid seed here
        out.append(bytes(header))
    assert len(out) >= 3, f"{cfg.name}: only {len(out)} valid seeds"
    return out


def _capture_headers(version: str, compression: str, header_size: int, limit: int = 64):
    """Up to ``limit`` RAM packet headers of a real QEMU capture's multifd channels."""
    out = []
    for conn in ("conn1.bin", "conn2.bin"):
        path = DATA_DIR / version / f"pattern-{compression}" / conn
        if not path.is_file():
            continue
        data = path.read_bytes()
        pos = _core.INIT_PACKET_SIZE
        while pos + header_size <= len(data) and len(out) < limit * 2:
            header = data[pos:pos + header_size]
            normal, next_size = struct.unpack_from(">II", header, 16)
            size = 0
            if normal:
                size = next_size if compression != "none" else normal * 4096
            out.append(header)
            pos += header_size + size
    return out[::max(1, len(out) // limit)][:limit]


def _capture_seeds(version: str, compression: str):
    def seeds(cfg: RamConfig, codec: _core.RamPacketCodec) -> list[bytes]:
        found = []
        for header in _capture_headers(version, compression, codec.header_size):
            try:
                codec.validate(header)
                found.append(header)
            except ProtocolError:
                pass                  # 7.2's stale empty packets under the current layout
        return found + _encoded_seeds(cfg, codec)
    return seeds


RAM_CONFIGS = [
    RamConfig("current", dict(packet_pages=8, layout="current",
                              regions={"pc.ram": 1 << 16}), _encoded_seeds),
    RamConfig("current-zlib-ext", dict(packet_pages=8, layout="current",
                                       compression=_core.FLAG_ZLIB,
                                       extensions=_core.FLAG_STORED, checksum=True,
                                       regions={"pc.ram": 1 << 16}), _encoded_seeds),
    RamConfig("current-no-regions", dict(packet_pages=8, layout="current",
                                         compression=_core.FLAG_ZSTD), _encoded_seeds),
    RamConfig("qemu-7.2", dict(packet_pages=8, layout="qemu-7.2",
                               regions={"pc.ram": 1 << 16}), _encoded_seeds),
    RamConfig("current-64k-pages", dict(packet_pages=4, page_size=65536, layout="current",
                                        regions={"big": MAX_REGION_BYTES,
                                                 "one": 65536}), _encoded_seeds),
    RamConfig("current-1-page-region", dict(packet_pages=16, layout="current",
                                            regions={"r": 4096, "s": 8192}), _encoded_seeds),
    RamConfig("qemu-7.2 capture zlib", dict(packet_pages=128, layout="qemu-7.2",
                                            compression=_core.FLAG_ZLIB, regions=QEMU_BLOCKS),
              _capture_seeds("qemu-7.2", "zlib")),
    RamConfig("qemu-7.2 capture none", dict(packet_pages=128, layout="qemu-7.2",
                                            regions=QEMU_BLOCKS),
              _capture_seeds("qemu-7.2", "none")),
    RamConfig("qemu-10 capture zstd", dict(packet_pages=128, layout="current",
                                           compression=_core.FLAG_ZSTD, regions=QEMU_BLOCKS),
              _capture_seeds("qemu-10.0", "zstd")),
    RamConfig("qemu-10 capture none", dict(packet_pages=128, layout="current",
                                           regions=QEMU_BLOCKS),
              _capture_seeds("qemu-10.0", "none")),
]


def _ram_target(cfg: RamConfig, weight: float) -> Target:
    def build():
        codec = _core.RamPacketCodec(**cfg.params)
        seeds = tuple(cfg.seeds(cfg, codec))
        return codec, seeds, ram_fields(cfg.params["packet_pages"])

    def make(rng, state):
        _, seeds, fields = state
        return mutate_bytes(rng, rng.choice(seeds), fields, seeds)

    def run(state, data):
        codec = state[0]
        check_ram(codec, cfg.params, data)

    return Target(f"RAM header {cfg.name}", "packets", weight, build, make, run)


def check_ram(codec: _core.RamPacketCodec, params: dict, data: bytes) -> None:
    """decode() and validate() agree; a header that decodes is one the engine can trust."""
    try:
        count = codec.validate(data)
    except ProtocolError as err:
        try:
            codec.decode(data)
        except ProtocolError as again:
            if (again.field, again.received, again.expected) != \
                    (err.field, err.received, err.expected):
                raise Broken(f"validate() and decode() refuse differently: {err} / {again}")
            raise
        raise Broken(f"validate() refused ({err}), decode() accepted")
    pkt = codec.decode(data)
    page = params.get("page_size", 4096)
    pages = params["packet_pages"]
    layout = params.get("layout", "current")
    comp = params.get("compression", 0)
    regions = params.get("regions")
    n = pkt.normal_pages + pkt.zero_pages
    if n != count:
        raise Broken(f"validate() counts {count} pages, decode() {n}")
    if pkt.pages_alloc > pages or n > pkt.pages_alloc:
        raise Broken(f"counts out of range: {pkt!r}, pages_alloc {pkt.pages_alloc}")
    if pkt.flags & _core.FLAG_DEVICE_STATE:
        raise Broken(f"a RAM packet with the DEVICE_STATE bit: {pkt!r}")
    if len(pkt.offsets) != pkt.normal_pages or len(pkt.zero_offsets) != pkt.zero_pages:
        raise Broken("offset arrays do not match the counts")
    if n:
        if regions is not None and pkt.ramblock not in regions:
            raise Broken(f"ramblock {pkt.ramblock!r} is not a region")
        limit = regions[pkt.ramblock] if regions is not None else None
        for off in (*pkt.offsets.tolist(), *pkt.zero_offsets.tolist()):
            if off % page or (limit is not None and off + page > limit):
                raise Broken(f"offset {off:#x} outside region {pkt.ramblock!r} ({limit})")
        if pkt.flags & COMPRESSION_MASK[layout] != comp and (layout == "current"
                                                              or pkt.normal_pages):
            raise Broken(f"compression bits {pkt.flags:#x} accepted, session has {comp:#x}")
    expected_payload = 0 if not pkt.normal_pages else (
        pkt.normal_pages * page if not comp else pkt.next_packet_size)
    if pkt.payload_size != expected_payload:
        raise Broken(f"payload_size {pkt.payload_size}, expected {expected_payload}")
    if pkt.normal_pages and comp and not (pkt.flags & _core.FLAG_STORED):
        raw = pkt.normal_pages * page
        if not 0 < pkt.next_packet_size <= max(1 << 20, raw + raw // 8 + 65536):
            raise Broken(f"compressed size {pkt.next_packet_size} accepted")
    if pkt.normal_pages and (not comp or pkt.flags & _core.FLAG_STORED) and \
            pkt.next_packet_size != pkt.normal_pages * page:
        raise Broken(f"next_packet_size {pkt.next_packet_size} for raw pages accepted")


# ---------------------------------------------------------------- small headers

def _simple(name, weight, seeds, fields, run, batch=2000) -> Target:
    def build():
        return tuple(seeds()), fields

    def make(rng, state):
        found, flds = state
        return mutate_bytes(rng, rng.choice(found), flds, found)

    return Target(name, "packets", weight, build, make, lambda state, data: run(data), batch)


def _channel_header_seeds():
    out = []
    for kind in range(4):
        buf = bytearray(_core.CHANNEL_HEADER_SIZE)
        _core.encode_channel_header(buf, kind)
        out.append(bytes(buf))
    return out


def _run_channel_header(data):
    kind = _core.decode_channel_header(data)
    if not 0 <= kind <= 3 or len(data) < 12:
        raise Broken(f"channel type {kind}")


UUID = bytes.fromhex("123456789abcdef01122334455667788")


def _init_seeds():
    out = []
    for channel in (0, 1, 3, 254, 255):
        buf = bytearray(_core.INIT_PACKET_SIZE)
        _core.encode_init_packet(buf, UUID, channel)
        out.append(bytes(buf))
    return out


def _run_init(data):
    for expected, channels in ((UUID, 4), (None, None), (UUID, 255), (bytes(16), 1)):
        try:
            uuid, channel = _core.decode_init_packet(data, expected_uuid=expected,
                                                     channels=channels)
        except ProtocolError:
            continue
        if expected is not None and uuid != expected:
            raise Broken(f"uuid {uuid.hex()} accepted, expected {expected.hex()}")
        if channels is not None and channel >= channels:
            raise Broken(f"channel id {channel} accepted with {channels} channels")
        if tuple(struct.unpack_from(">II", data)) != (_core.MULTIFD_MAGIC, 1):
            raise Broken("magic or version accepted")
    _core.decode_init_packet(data, expected_uuid=UUID, channels=4)


def _device_seeds():
    out = []
    for idstr, instance, size, flags in (("nic0", 1, 100, _core.FLAG_ZLIB),
                                         ("0000:00:02.0/vfio", 0, 1 << 20, 0),
                                         ("x" * 255, 0xFFFFFFFF, 1, _core.FLAG_ZSTD),
                                         ("cpu", 0, 12, 0)):
        buf = bytearray(_core.DEVICE_HEADER_SIZE)
        _core.encode_device_header(buf, idstr, instance, size, flags)
        out.append(bytes(buf))
    return out


def _run_device(data):
    for comp, ext, cap in ((_core.FLAG_ZLIB, 0, 1 << 30), (0, 0, 1 << 20),
                           (_core.FLAG_ZSTD, 0, 0xFFFFFFFF), (0, _core.FLAG_STORED, 12)):
        try:
            flags, idstr, instance, size = _core.decode_device_header(data, comp, ext, cap)
        except ProtocolError:
            continue
        if not flags & _core.FLAG_DEVICE_STATE or flags & _core.FLAG_SYNC or \
                (flags & 0x3E) != comp or flags & ~(0x40 | comp | ext):
            raise Broken(f"device flags {flags:#x} accepted (compression {comp:#x})")
        if not 0 < size <= cap:
            raise Broken(f"device payload {size} accepted (bound {cap})")
        if "\0" in idstr or not idstr and data[12] != 0:
            raise Broken(f"idstr {idstr!r}")
    _core.decode_device_header(data, _core.FLAG_ZLIB)


def _chunk_seeds():
    out = []
    for idx, flags in ((0, 0), (9, 1), (0xFFFFFFFE, 1)):
        buf = bytearray(_core.CHUNK_HEADER_SIZE)
        _core.encode_chunk_header(buf, idx, flags)
        out.append(bytes(buf))
    return out


def _run_chunk(data):
    idx, flags = _core.decode_chunk_header(data)
    if idx == 0xFFFFFFFF or flags & ~_core.CHUNK_FLAG_LAST or data[:4] != bytes(4):
        raise Broken(f"chunk idx {idx:#x} flags {flags:#x} accepted")


def _message_header_seeds():
    return [mc.MESSAGE_HEADER.pack(int(kind), length) for kind in mc.Msg
            for length in (0, 12, 1 << 20)]


def _run_message_header(data):
    head = data[:mc.MESSAGE_HEADER_SIZE]
    if len(head) < mc.MESSAGE_HEADER_SIZE:
        return                      # the reader never decodes a short header
    for limit in (0, 1 << 20, 1 << 30):
        try:
            kind, length = mc.decode_message_header(head, limit)
        except ProtocolError:
            continue
        bound = {mc.Msg.DEVICE_STATE: limit, mc.Msg.AUTH: mc.MAX_AUTH_PAYLOAD}.get(
            kind, mc.MAX_CONTROL_PAYLOAD)
        if length > bound:
            raise Broken(f"{kind.name} of {length} bytes accepted (bound {bound})")
    mc.decode_message_header(head, 1 << 20)


# ---------------------------------------------------------------- compressed payloads

def _codec_seeds(compression: str):
    """The first data packets of each real capture channel (payload, pages it inflates to)."""
    streams = []
    for version in ("qemu-7.2", "qemu-10.0"):
        for conn in ("conn1.bin", "conn2.bin"):
            path = DATA_DIR / version / f"pattern-{compression}" / conn
            if not path.is_file():
                continue
            data = path.read_bytes()
            pos, packets = _core.INIT_PACKET_SIZE, []
            while pos + 1344 <= len(data) and len(packets) < 5:
                normal, next_size = struct.unpack_from(">II", data, pos + 16)
                pos += 1344
                if normal:
                    packets.append((data[pos:pos + next_size], normal * 4096))
                    pos += next_size
            streams.append(packets)
    # fastmfd's own compressor: text-like pages, zero pages, random pages, device chunks.
    rng = random.Random(7)
    codec = _core.make_codec(compression, compressing=True)
    pages = [b"the quick brown fox " * 204 + b"1234" + bytes(1), bytes(4096), rng.randbytes(4096)]
    packets = []
    for i in range(4):
        raw = b"".join(rng.choice(pages)[:4096] for _ in range(1 + i * 3))
        packets.append((codec.compress(raw), len(raw)))
    streams.append(packets)
    expected = []
    for packets in streams:
        inflater = _core.make_codec(compression, compressing=False)
        outs = []
        for payload, size in packets:
            out = bytearray(size)
            inflater.decompress_into(payload, out)
            outs.append(bytes(out))
        expected.append(outs)
    return streams, expected


def _codec_target(compression: str, weight: float) -> Target:
    def build():
        return _codec_seeds(compression)

    def make(rng, state):
        streams, _ = state
        s = rng.randrange(len(streams))
        count = rng.randint(1, len(streams[s]))
        bad = rng.randrange(count)
        payload = streams[s][bad][0]
        mutated = mutate_bytes(rng, payload, donors=tuple(p for p, _ in streams[s]))
        upto = rng.random() < 0.3
        return s, count, bad, mutated, upto

    def run(state, case):
        streams, expected = state
        s, count, bad, mutated, upto = case
        inflater = _core.make_codec(compression, compressing=False)
        for i in range(count):
            payload, size = streams[s][i]
            out = bytearray(size)
            if i == bad:
                if upto:
                    inflater.decompress_upto(mutated, out)
                else:
                    inflater.decompress_into(mutated, out)
                continue
            inflater.decompress_into(payload, out)
            if i < bad and bytes(out) != expected[s][i]:
                raise Broken(f"packet {i} before the mutated one inflated wrong")

    return Target(f"{compression} payload stream", "packets", weight, build, make, run, 200)


# ---------------------------------------------------------------- the QEMU main channel

def _qemu_main_seeds():
    seeds = []
    for version in ("qemu-7.2", "qemu-10.0"):
        path = DATA_DIR / version / "pattern-zlib" / "conn0.bin"
        data = path.read_bytes()
        positions = list(range(0, 200, 1)) + [len(data) - i for i in range(1, 400, 7)]
        try:
            records: list[int] = []
            main = decode_qemu_main(str(path), data,
                                    on_page=lambda *page: records.append(page[3]))
            positions += random.Random(1).sample(records, min(300, len(records)))
            positions += [main.ram_bytes + i for i in range(0, 64)]
        except ProtocolError:
            pass
        seeds.append((path.name, data, tuple(p for p in positions if 0 <= p < len(data))))
    return seeds


QEMU_FIELDS = (Field(0, 8, "record"), Field(0, 1, "type/len"), Field(0, 4, "be32"),
               Field(1, 4, "be32"), Field(5, 4, "be32"))


def _qemu_main_target(weight: float) -> Target:
    def make(rng, seeds):
        name, data, positions = rng.choice(seeds)
        return name, mutate_bytes(rng, data, QEMU_FIELDS, positions=positions)

    def run(seeds, case):
        name, data = case
        main = decode_qemu_main(name, data)
        json.dumps(main.summary())

    return Target("QEMU main channel stream", "packets", weight, _qemu_main_seeds, make,
                  run, 50)


# ---------------------------------------------------------------- inspect captures

_IN_MEMORY: dict[str, bytes] = {}


@contextlib.contextmanager
def _in_memory(capture, files: dict[str, bytes]):
    """Every read of ``capture`` goes to ``files``' bytes, not to the disk, for the
    block only: patched for good, a test that ran the target (in an xdist worker) left
    every later inspect test of that worker reading this dict (KeyError). (It once
    patched _read_file, which 007fbf5 replaced by _map_file: every case was "No such
    file", a ConfigError counted as refused, and no capture was decoded.)"""
    _IN_MEMORY.clear()
    _IN_MEMORY.update(files)
    real = capture._map_file
    capture._map_file = lambda path: _IN_MEMORY[str(path)]
    try:
        yield
    finally:
        capture._map_file = real


def _capture_sets():
    """(name, {file: bytes}, read_capture kwargs, positions per file) of valid captures."""
    import fastmfd.tools.inspect.capture as capture
    from inspect_support import (ROUND_ENDS, ChannelWriter, PACKET_PAGES, SESSION_UUID,
                                 Session, device_message, two_rounds)
    Msg = mc.Msg
    sets = []
    for version in ("qemu-7.2", "qemu-10.0"):
        for comp in ("none", "zlib", "zstd"):
            d = DATA_DIR / version / f"pattern-{comp}"
            files = {f"{version}-{comp}/conn{i}.bin": (d / f"conn{i}.bin").read_bytes()
                     for i in range(3)}
            sets.append((f"{version} {comp}", files, {}))
            channels = {k: v for k, v in files.items() if not k.endswith("conn0.bin")}
            sets.append((f"{version} {comp} channels", channels,
                         {"layout": "qemu-7.2"} if version == "qemu-7.2" else {}))
    for comp in ("none", "zlib", "zstd"):
        sets.append((f"fastmfd {comp} two rounds", two_rounds(comp).files(ROUND_ENDS), {}))
        s = Session(comp)
        ch0, ch1 = s.channels
        ch1.device("nic0", 0, 1, b"n" * 700)
        s.send(0, "vga", range(0, 4), tag=0)
        ch0.device("nic0", 0, 0, b"m" * 300)
        ch0.device("blk", 1, 0, b"block", last=True)
        ch1.device("nic0", 0, 2, b"end", last=True)
        s.sync_all()
        sets.append((f"fastmfd {comp} devices", s.files(
            [(Msg.ROUND_END, {"round": 1}), (Msg.COMPLETE, {})],
            devices=[("nic0", 0), ("blk", 1)]), {}))
        s = Session(comp)
        s.send(0, "vga", range(0, 4), tag=0)
        s.channels[0].sync(s.next_num())
        s.channels[1] = ChannelWriter(1, SESSION_UUID, packet_pages=PACKET_PAGES,
                                      compression=comp,
                                      header_type=_core.CHANNEL_DEVICE_STATE)
        s.channels[1].device("nic0", 0, 0, b"only chunk", last=True)
        sets.append((f"fastmfd {comp} device channel", s.files(
            [(Msg.ROUND_END, {"round": 1}), (Msg.COMPLETE, {})], devices=[("nic0", 0)]), {}))
    s = Session()
    s.send(0, "vga", range(0, 4), tag=0)
    s.sync_all()
    sets.append(("fastmfd old way", s.files(
        [(Msg.DEVICE_STATE, device_message(1, 1, b"tail", last=True)),
         (Msg.ROUND_END, {"round": 1}), (Msg.SWITCHOVER_START, {}),
         (Msg.DEVICE_STATE, device_message(1, 0, b"head ")),
         (Msg.DEVICE_STATE, device_message(0, 0, b"cpu", last=True)), (Msg.COMPLETE, {})],
        devices=[("cpu", 0), ("nic", 2)]), {}))
    # The same fastmfd sessions without their main channel (what a capture of the
    # channels alone gives: compression and geometry learnt from the packets).
    for name, files, _ in list(sets):
        if name.startswith("fastmfd") and "old way" not in name:
            sets.append((f"{name} channels", {k: v for k, v in files.items()
                                               if k != "main.bin"}, {"packet_pages": 16}))
    sets += _recorded_sessions()
    out = []
    for name, files, kwargs in sets:
        files = {(k if "/" in k else f"{name.replace(' ', '-')}/{k}"): v
                 for k, v in files.items()}
        positions = {k: [0, 12, 64, 76, 128, 140] for k in files}     # 128: a key proof's end
        try:
            with _in_memory(capture, files):
                cap = capture.read_capture(list(files), **kwargs)
            for ch in cap.channels:
                positions[ch.path] += [p.offset for p in ch.packets]
            if cap.main is not None and hasattr(cap.main, "rounds"):
                positions[cap.main.path] += [r.at for rnd in cap.main.rounds for r in rnd]
            ok = True
        except Exception as exc:
            # Every seed decodes: when none did (a stale patch above), the target
            # fuzzed nothing and said nothing.
            raise RuntimeError(f"the seed {name!r} does not decode: {exc}") from exc
        positions = {k: tuple(random.Random(3).sample(v, min(len(v), 400)))
                     for k, v in positions.items()}
        out.append((name, files, kwargs, positions, ok))
    return capture, out


def _recorded_sessions() -> list[tuple[str, dict[str, bytes], dict]]:
    """Real sessions (_fuzz_sessions.py, recorded in a child: a fuzz worker is daemonic):
    a shared key, the old way with checksums; each with and without its main channel."""
    import shutil
    import subprocess
    import tempfile
    out = tempfile.mkdtemp(prefix="fastmfd-fuzz-sessions-")
    try:
        subprocess.run([sys.executable, str(Path(__file__).with_name("_fuzz_sessions.py")),
                        out], check=True, timeout=300, stdout=subprocess.DEVNULL)
        sessions = json.loads((Path(out) / "sessions.json").read_text())
        sets = []
        for name, kwargs in sessions.items():
            directory = Path(out) / name.removesuffix(" channels").replace(" ", "-")
            files = {f"real {name}/{p.name}": p.read_bytes()
                     for p in sorted(directory.glob("*.bin"))
                     if not (name.endswith(" channels") and p.name == "main.bin")}
            sets.append((f"real {name}", files, kwargs))
        return sets
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _capture_target(weight: float) -> Target:
    def make(rng, state):
        _, sets = state
        index = rng.randrange(len(sets))
        name, files, kwargs, positions, _ = sets[index]
        keys = list(files)
        mutated = {}
        for _ in range(1 if rng.random() < 0.85 else 2):
            key = rng.choice(keys)
            data = mutated.get(key, files[key])
            fields = (ram_fields(128) + DEVICE_FIELDS + CHUNK_FIELDS + MESSAGE_FIELDS
                      + INIT_FIELDS)
            mutated[key] = mutate_bytes(rng, data, fields, positions=positions[key])
        order = keys[:]
        rng.shuffle(order)
        options = dict(kwargs)
        if rng.random() < 0.3:
            # What the user may say, wrong or right (--layout qemu-7.2 on a session whose
            # SETUP says checksum raised ValueError; a lone channel read without its
            # checksum, or with another packet size, takes _channels_alone's other paths).
            for option, values in (("checksum", (False, True)),
                                   ("packet_pages", (None, 16, 128, 512, 3)),
                                   ("layout", (None, "current", "qemu-7.2"))):
                if rng.random() < 0.5:
                    options[option] = rng.choice(values)
        return index, mutated, order, options

    def run(state, case):
        capture, sets = state
        index, mutated, order, kwargs = case
        name, files, _, _, _ = sets[index]
        with _in_memory(capture, {**files, **mutated}):
            result = capture.read_capture(order, **kwargs)
        json.dumps(result.summary())

    return Target("inspect captures", "packets", weight, _capture_sets, make, run, 20)


# ---------------------------------------------------------------- SETUP and payloads

def _setup_seeds():
    # Every field a real Source sends (the defaults: fields added to SETUP later
    # come with them), then the variants below.
    base = Setup(uuid=UUID, **fastmfd.MigrationConfig(packet_pages=128).session_values(),
                 regions=(RegionSpec("pc.ram", 1 << 30), RegionSpec("vga", 4096)),
                 devices=(DeviceSpec("nic0", 0), DeviceSpec("cpu", 1))).encode()
    seeds = [base]
    seeds.append({**base, "compression": "zstd", "compression_level": 3, "checksum": True,
                  "device_state_channels": 2, "page_size": 65536, "packet_pages": 2048,
                  "regions": [{"name": "pc.ram", "size": 1 << 30}]})
    seeds.append({**base, "compression": "zlib", "channel_header": False, "devices": [],
                  "regions": [{"name": "x" * 255, "size": MAX_REGION_BYTES}]})
    seeds.append({**base, "channels": 255, "device_state_channels": 0, "chunk_size": 4096,
                  "max_queued_bytes": 4096, "packet_pages": 65536, "page_size": 2048})
    for seed in seeds:
        Setup.decode(seed)          # every seed is valid
    return seeds


def _run_setup(strict: bool):
    def run(seeds, body):
        value = mc.decode_control(mc.Msg.SETUP, body)
        setup = Setup.decode(value) if strict else Setup.decode_lenient(value)
        again = Setup.decode_lenient(setup.encode())
        if again != setup:
            raise Broken(f"SETUP does not round-trip: {setup} -> {again}")
        if strict:
            if Setup.decode(setup.encode()) != setup:
                raise Broken("strict SETUP does not round-trip")
    return run


def _payload_seeds():
    seeds = [(kind, {}) for kind in mc.Msg]
    seeds += [(mc.Msg.ROUND_END, {"round": 1}), (mc.Msg.ROUND_ACK, {"round": 7}),
              (mc.Msg.COMPLETE, {"channels": [{"packets": 3, "normal_pages": 5, "zero_pages": 0,
                                               "device_packets": 0}],
                                 "device_chunks": [1, 2]}),
              (mc.Msg.LOADED, {"rounds": 2, "load_seconds": {"nic0/0": 0.5}}),
              (mc.Msg.ERROR, {"error": "the source failed"}),
              (mc.Msg.SETUP, _setup_seeds()[0])]
    return seeds


def _make_payload(rng, seeds):
    kind, value = rng.choice(seeds)
    if rng.random() < 0.1:
        kind = rng.choice(list(mc.Msg))
    return int(kind), mutate_text(rng, value)


def _run_payload(seeds, case):
    kind, body = case
    payload = mc.decode_payload(mc.Msg(kind), body)
    typed = {mc.Msg.ROUND_END: mc.RoundEnd, mc.Msg.ROUND_ACK: mc.RoundAck,
             mc.Msg.PRECOPY_SENT: mc.PrecopySent, mc.Msg.COMPLETE: mc.Complete,
             mc.Msg.LOADED: mc.Loaded, mc.Msg.ERROR: mc.Error, mc.Msg.SETUP: Setup}
    want = typed.get(mc.Msg(kind))
    if want is None and payload is not None or want is not None and not isinstance(payload,
                                                                                      want):
        raise Broken(f"{mc.Msg(kind).name} decoded as {type(payload).__name__}")
    if isinstance(payload, (mc.RoundEnd, mc.RoundAck)) and not (
            type(payload.round) is int and 0 <= payload.round < 2**63):
        raise Broken(f"round {payload.round!r} accepted")


# ---------------------------------------------------------------- bench links, reprs

LINK_SEEDS = ("1gbit", "10gbit/1ms", "500mbit/200us", "2.5Gbit/0.5ms", "1000000bit/1s",
              "27gbit/27.42ms", "100gbit", "1mbit/0us", "2.3mbit", "1Mbit/0.1ms")


def _make_link(rng, seeds) -> str:
    """A link text: a seed mutated as bytes, or numbers of any size and precision in
    tc's units (400 nines were float()'s infinity, 27.42ms a delay not 27420us)."""
    r = rng.random()
    if r < 0.4:
        return mutate_bytes(rng, rng.choice(seeds).encode()).decode("utf-8", "replace")

    def number(digits: int) -> str:
        whole = str(rng.randrange(10 ** rng.randrange(1, digits)))
        if rng.random() < 0.5:
            return whole
        return f"{whole}.{rng.randrange(10 ** rng.randrange(1, 9)):0{rng.randrange(1, 9)}d}"

    rate = number(16) if rng.random() < 0.95 else "9" * rng.choice((40, 41, 400, 5000))
    delay = rng.choice(("", f"/{number(8)}{rng.choice(('us', 'ms', 's', 'MS'))}"))
    text = f"{rate}{rng.choice(('', 'k', 'm', 'g', 'K', 'M', 'G'))}bit{delay}"
    text = rng.choice(("", " ", "\t")) + text + rng.choice(("", "", "\n", "/", "bit"))
    if rng.random() < 0.1:      # a letter or digit of another script that Unicode rules
        at = rng.randrange(len(text))   # match ('\u017f' for s: a KeyError once)
        text = text[:at] + rng.choice(("\u017f", "\u0131", "\u212a", "\u0661", "\uff11")) + \
            text[at + 1:]
    return text


def _run_link(_, text: str) -> None:
    """parse_link refuses with a ConfigError only; what it takes, LinkSpec.same spells
    as one link of the same rate and delay, exactly, and same_link agrees."""
    from fastmfd.errors import ConfigError
    from fastmfd.tools.bench.link import parse_link, same_link
    try:
        spec = parse_link(text)
    except ConfigError:
        if same_link(text) != text:
            raise Broken(f"same_link({text!r}) changed a link parse_link refuses") from None
        raise
    again = parse_link(spec.same)
    if (again.rate_bits, again.delay_s, again.same) != (spec.rate_bits, spec.delay_s,
                                                         spec.same):
        raise Broken(f"{text!r} is {spec}, its spelling {spec.same!r} is {again}")
    if same_link(text) != spec.same:
        raise Broken(f"same_link({text!r}) is {same_link(text)!r}, not {spec.same!r}")


REPR_BOUND = 600_000        # characters: 9 entries a level, 4 levels, leaves of <= 131


def _repr_state():
    """A closed Region (its repr must not read its memory) for the cases to hold."""
    region = fastmfd.Region.create("fuzz", 1 << 16)
    region.close()
    return region


def _value(rng, closed, depth: int = 0):
    """A value of any kind a loader may return or a result may hold, nested."""
    r = rng.random()
    if depth < 5 and r < 0.3 / (depth + 1):
        items = [_value(rng, closed, depth + 1) for _ in range(rng.choice((0, 1, 3, 9, 20)))]
        kind = rng.choice(("list", "tuple", "dict"))
        if kind == "dict":
            made = {rng.choice((str(i), i, bytes([i % 256]) * rng.randrange(40), (i, "x"))): v
                    for i, v in enumerate(items)}
            return made if rng.random() < 0.8 else collections.OrderedDict(made)
        if rng.random() < 0.2:      # a loader's own kind of list or tuple
            return collections.deque(items) if kind == "list" else \
                collections.namedtuple("State", [f"f{i}" for i in range(len(items))])(*items)
        return items if kind == "list" else tuple(items)
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice((None, True, False, 0, -1, float("nan"), float("inf"), 1e308))
    if kind == 1:
        return rng.getrandbits(rng.choice((8, 64, 256, 257, 1000, 20000))) * rng.choice((1, -1))
    if kind == 2:
        return "".join(chr(rng.randrange(0x110000) if rng.random() < 0.1 else
                           rng.randrange(32, 127)) for _ in range(rng.choice((0, 5, 80, 81, 300))))
    if kind in (3, 4, 5):
        data = rng.randbytes(rng.choice((0, 1, 32, 33, 1000)))
        view = memoryview(bytearray(data))
        if kind == 5 and rng.random() < 0.5:
            view.release()
        return (data, bytearray(data), view)[kind - 3]
    if kind == 6:
        values = {rng.getrandbits(16) for _ in range(rng.choice((0, 3, 9, 500)))}
        return values if rng.random() < 0.5 else frozenset(values)
    if kind == 7:
        return closed
    if kind == 8:
        return rng.randbytes(rng.choice((16, 40))).hex()
    return rng.random()


def _make_repr(rng, closed):
    from fastmfd.stats import ChannelStats, MigrationStats, ReceiveStats
    value = _value(rng, closed)
    which = rng.randrange(4)
    if which == 0:
        return value
    stats = ReceiveStats(*[_value(rng, closed) for _ in range(8)],
                         channels=tuple(ChannelStats(i, "ram", *[rng.getrandbits(20)] * 8)
                                        for i in range(rng.choice((0, 2, 255)))))
    if which == 1:
        return stats
    if which == 2:
        return fastmfd.DestinationResult(regions={"ram": closed, "x": value},
                                         devices={("d", i): _value(rng, closed)
                                                  for i in range(rng.choice((1, 9, 100)))},
                                         stats=stats, setup={"v": value})
    return MigrationStats(*[_value(rng, closed) for _ in range(13)], destination={"v": value})


def _run_repr(_, value) -> None:
    """repr of a result, its stats or any value: never raises, bounded (reprs.py)."""
    from fastmfd.reprs import short_repr
    text = repr(value) if dataclasses_is(value) else short_repr(value)
    if len(text) > REPR_BOUND:
        raise Broken(f"a repr of {len(text)} characters: {text[:200]}")


def dataclasses_is(value) -> bool:
    import dataclasses
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


# ---------------------------------------------------------------- the registry

def _targets() -> list[Target]:
    out = [
        _simple("channel header", 0.05, _channel_header_seeds, CHANNEL_HEADER_FIELDS,
                _run_channel_header),
        _simple("init packet", 0.06, _init_seeds, INIT_FIELDS, _run_init),
        _simple("device state header", 0.08, _device_seeds, DEVICE_FIELDS, _run_device),
        _simple("device chunk header", 0.05, _chunk_seeds, CHUNK_FIELDS, _run_chunk),
        _simple("main channel message header", 0.05, _message_header_seeds, MESSAGE_FIELDS,
                _run_message_header),
    ]
    out += [_ram_target(cfg, 0.66 / len(RAM_CONFIGS)) for cfg in RAM_CONFIGS]
    out += [_codec_target("zlib", 0.012), _codec_target("zstd", 0.012)]
    out.append(_qemu_main_target(0.004))
    out.append(_capture_target(0.002))

    def setup_make(rng, seeds):
        return mutate_text(rng, rng.choice(seeds))

    out += [Target("SETUP strict", "setups", 0.4, _setup_seeds, setup_make, _run_setup(True)),
            Target("SETUP lenient", "setups", 0.25, _setup_seeds, setup_make,
                   _run_setup(False)),
            Target("main channel payloads", "setups", 0.35, _payload_seeds, _make_payload,
                   _run_payload),
            Target("bench link text", "setups", 0.03, lambda: LINK_SEEDS, _make_link,
                   _run_link),
            Target("bounded reprs", "setups", 0.01, _repr_state, _make_repr, _run_repr, 200)]
    return out


TARGETS = {t.name: t for t in _targets()}
