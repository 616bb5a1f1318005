"""The live part of benchmarks/fuzz.py: real ``fastmfd.Destination`` s on loopback, fed
by a source driven by hand (``tests/migration_support.py``'s way) that mutates
what it sends.

One Destination per session (a Destination receives one migration); each
session is::

    0..3 strangers before SETUP        mutated greetings (channel header,
                                       preamble), junk, TLS bytes, silence:
                                       each must be refused (Destination.refused)
    SETUP                              mutated in 1 session of 4: the session
                                       must end with a FastMFDError, or go on
                                       if the mutant is still a valid SETUP
    0..2 strangers after SETUP         mutated hellos that fail the greeting:
                                       refused by spare workers
    every channel                      its hello (now and then a mutated one
                                       that passes the greeting), then RAM
                                       packets and device chunks, 1..3
                                       mutations in most streams (field-aware:
                                       counts, sizes, offsets, flags, names)
    main channel                       ROUND_END / DEVICE_STATE / ... (some
                                       mutated), then COMPLETE with totals
                                       that cannot match

so every session must end with ``receive()`` raising a FastMFDError whose root
(``__cause__`` chain, a worker's traceback) is a FastMFDError too, within
``DEADLINE`` seconds of the last socket closing. The user regions (a target
``ram0`` between two guard regions, all pre-filled with a pattern) are checked
after each session: no page changed that no packet could legitimately address
(the sent bytes are decoded again here, as the destination does, up to the
first header it must refuse); for uncompressed sessions each addressed page
holds its old bytes or a prefix of what a packet carried for it. After each
Destination closes, no child process and no new /dev/shm/fastmfd-* segment may
be left.

SETUPs that would make a destination allocate more than ``MAX_SESSION_BYTES``
(regions or the device pool, which is fallocated up front) are not sent: the
machine is shared, and the decoders' part covers them.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np

import fastmfd
from fastmfd import _core
from fastmfd.errors import ConfigError, FastMFDError, ProtocolError
from fastmfd.protocol import main_channel as mc
from fastmfd.protocol.setup import DeviceSpec, RegionSpec, Setup
from fastmfd.shm import list_segments

from _fuzz_mutate import Field, mutate_bytes, mutate_text
from _fuzz_targets import (CHANNEL_HEADER_FIELDS, CHUNK_FIELDS, DEVICE_FIELDS, INIT_FIELDS,
                           MESSAGE_FIELDS, ram_fields)
from inspect_support import ChannelWriter, channel_header
import proc_scan

__all__ = ["run_live", "replay_session", "LiveReport"]

PAGE = 4096
REGIONS = {"guard_lo": 4 * PAGE, "ram0": 64 * PAGE, "guard_hi": 4 * PAGE}
SENT_PAGES = range(8, 56)             # the ram0 pages valid packets address
DEADLINE = 10.0                       # s: a session ends this long after our last socket
SETTLE = 3.0                          # s we wait before closing the main channel ourselves
REFUSAL_WAIT = 5.0                    # s a stranger may take to be refused
IDLE = object()                       # a stranger that sends nothing and stays
MAX_SESSION_BYTES = 64 << 20          # what one mutated SETUP may make the destination take
OK_ROOTS = {"ProtocolError", "MigrationError", "ConfigError", "TLSError", "SecurityError",
            "Aborted", "FastMFDError"}
CONNECTION_ROOTS = {"ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError",
                    "TimeoutError", "ConnectionRefusedError",
                    "ConnectionClosed"}     # fastmfd's own: a peer closed mid-message


# ---------------------------------------------------------------- results

@dataclass
class Row:
    cases: int = 0
    refused: int = 0            # a stranger dropped, the session going on
    failed: int = 0             # the session ended with a FastMFDError rooted in one
    passed: int = 0             # a mutant that is still valid input, taken as such
    crashes: int = 0
    hangs: int = 0
    bad: int = 0


@dataclass
class LiveReport:
    kinds: dict = field(default_factory=dict)           # case kind -> Row
    findings: list = field(default_factory=list)        # (kind, case, detail)
    suspects: dict = field(default_factory=dict)        # segment -> session that left it
    roots: dict = field(default_factory=dict)           # root exception type -> count
    sessions: int = 0
    skipped_setups: int = 0
    wall: float = 0.0
    fds: tuple = (0, 0)

    def row(self, kind: str) -> Row:
        return self.kinds.setdefault(kind, Row())

    @property
    def cases(self) -> int:
        return sum(r.cases for r in self.kinds.values())

    @property
    def failed(self) -> bool:
        return bool(self.findings)

    def find(self, kind: str, case: str, detail: str) -> None:
        self.findings.append((kind, case, detail[:2000]))

    def rows(self) -> list[tuple]:
        """The summary table's rows (fuzz.py's columns; cases/s per wall second)."""
        out = []
        total = Row()
        for name, r in sorted(self.kinds.items()):
            out.append((name, r.cases, r.passed, r.refused + r.failed, r.crashes, r.hangs,
                        r.bad, f"{r.cases / self.wall:.1f}" if self.wall else "-"))
            for k in vars(total):
                setattr(total, k, getattr(total, k) + getattr(r, k))
        out.append(("TOTAL live", total.cases, total.passed, total.refused + total.failed,
                    total.crashes, total.hangs, total.bad,
                    f"{total.cases / self.wall:.1f}" if self.wall else "-"))
        return out

    def print_findings(self) -> None:
        print(f"\n{self.sessions} sessions; what the destinations' errors came from: "
              + ", ".join(f"{k} {v}" for k, v in sorted(self.roots.items(),
                                                        key=lambda kv: -kv[1])))
        print(f"mutated SETUPs not sent (valid, but would allocate > "
              f"{MAX_SESSION_BYTES >> 20} MiB): {self.skipped_setups}; "
              f"open fds before/after: {self.fds[0]}/{self.fds[1]}")
        shown: dict = {}
        for kind, case, detail in self.findings:
            shown[kind] = shown.get(kind, 0) + 1
            if shown[kind] <= 2:
                print(f"\nLIVE {kind} ({case}):\n  {detail}")
        for kind, n in shown.items():
            if n > 2:
                print(f"LIVE {kind}: {n} in all")

    def as_json(self) -> dict:
        return {"rows": {k: vars(v) for k, v in self.kinds.items()},
                "findings": self.findings, "roots": self.roots, "sessions": self.sessions,
                "skipped_setups": self.skipped_setups, "wall": self.wall, "fds": self.fds}


# ---------------------------------------------------------------- the session's bytes

@dataclass
class Plan:
    config: fastmfd.MigrationConfig
    setup: Setup
    devices: list
    streams: list = field(default_factory=list)      # per channel: (bytes, hello length,
    positions: list = field(default_factory=list)    # packet starts)
    main_after: bytes = b""                          # messages after SETUP (old way chunks)


def make_plan(rng: random.Random) -> Plan:
    compression = rng.choice(("none", "none", "none", "zlib", "zstd"))
    way = rng.choice(("ram", "ram", "devices", "dedicated", "main"))
    channels = rng.randint(1, 3)
    config = fastmfd.MigrationConfig(
        channels=channels, compression=compression, packet_pages=rng.choice((8, 16)),
        device_state_channels=1 if way == "dedicated" else 0, channel_header=way != "main",
        device_chunk_size=4096)
    devices = [("nic0", 0), ("blk/1", 7)] if way != "ram" else []
    setup = Setup(uuid=rng.randbytes(16), **config.session_values(),
                  regions=tuple(RegionSpec(n, s) for n, s in REGIONS.items()),
                  devices=tuple(DeviceSpec(i, n) for i, n in devices))
    plan = Plan(config, setup, devices)
    writers = []
    for ch in range(setup.total_channels):
        kind = _core.CHANNEL_MULTIFD if ch < channels else _core.CHANNEL_DEVICE_STATE
        writers.append(ChannelWriter(ch, setup.uuid, packet_pages=config.packet_pages,
                                     compression=compression,
                                     header_type=kind if config.channel_header else None))
    starts: list[list[int]] = [[] for _ in writers]

    def mark(ch):
        starts[ch].append(sum(len(p) for p in writers[ch].parts))

    pages = list(SENT_PAGES)
    rng.shuffle(pages)
    num = 0
    while pages:
        ch = rng.randrange(channels)
        take = [pages.pop() for _ in range(min(len(pages), rng.randint(1, config.packet_pages)))]
        zero = [p * PAGE for p in take if rng.random() < 0.2]
        data = {p * PAGE: _page(p, num) for p in take if p * PAGE not in zero}
        num += 1
        mark(ch)
        writers[ch].ram("ram0", data, zero, packet_num=num)
    main_chunks = []
    for d, (idstr, instance) in enumerate(devices):
        for idx in range(3):
            body = bytes([65 + d, idx]) * rng.randint(1, 2000)
            last = idx == 2
            if way == "main":
                main_chunks.append(mc.encode_message(mc.Msg.DEVICE_STATE,
                                                     _old_way(d, idx, body, last)))
                continue
            ch = channels if way == "dedicated" else rng.randrange(channels)
            mark(ch)
            writers[ch].device(idstr, instance, idx, body, last)
    for ch, writer in enumerate(writers):
        hello_len = (_core.CHANNEL_HEADER_SIZE if config.channel_header else 0) \
            + _core.INIT_PACKET_SIZE
        plan.streams.append(writer.bytes())
        plan.positions.append((hello_len, tuple(starts[ch])))
    plan.main_after = b"".join(main_chunks)
    return plan


def _page(page: int, num: int) -> bytes:
    return bytes([page, num & 0xFF, 0x5A, 0xA5]) * (PAGE // 4)


def _old_way(device: int, idx: int, body: bytes, last: bool) -> bytes:
    chunk = bytearray(_core.CHUNK_HEADER_SIZE)
    _core.encode_chunk_header(chunk, idx, _core.CHUNK_FLAG_LAST if last else 0)
    return device.to_bytes(4, "big") + bytes(chunk) + body


def main_start(with_header: bool) -> bytes:
    """What a source sends first on its main channel."""
    return (channel_header(_core.CHANNEL_MAIN) if with_header else b"") \
        + mc.encode_preamble()


def main_fields(with_header: bool) -> tuple:
    """The fields of a main channel's start and first message header."""
    shift = _core.CHANNEL_HEADER_SIZE if with_header else 0
    return ((CHANNEL_HEADER_FIELDS if with_header else ())
            + (Field(shift, 4, "magic"), Field(shift + 4, 4, "version"),
               Field(shift + 8, 4, "type"), Field(shift + 12, 4, "length")))


# ---------------------------------------------------------------- what the destination does

class _Bytes:
    """A greeting's stream over bytes we would send (then close): EOF is a ProtocolError."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def recv_exact(self, n: int, what: str = "") -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"closed during {what}", field="length")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def main_greeting_passes(data: bytes) -> bool:
    """Whether a destination without TLS or key would take ``data`` as its main channel."""
    from fastmfd.protocol.handshake import read_hello
    if not data:
        return False
    stream = _Bytes(data)
    try:
        hello = read_hello(stream, None, None, None)
        if hello.kind != _core.CHANNEL_MAIN:
            return False
        if struct.unpack(">I", stream.recv_exact(4))[0] != mc.MAIN_VERSION:
            return False
        stream.recv_exact(mc.MESSAGE_HEADER_SIZE)
    except FastMFDError:
        return False
    return True


def channel_greeting_passes(data: bytes, setup: Setup) -> bool:
    from fastmfd.protocol.handshake import read_hello
    if not data or data[0] in (0x16, 0x80):      # a TLS record is refused as such
        return False
    try:
        hello = read_hello(_Bytes(data), setup.channel_header, setup.uuid, None)
    except FastMFDError:
        return False
    return hello.kind != _core.CHANNEL_MAIN


def legit_pages(plan: Plan, stream: bytes, hello_len: int):
    """The pages a receive engine may write from ``stream``: (region, page) -> candidates
    (the bytes a packet carried for it, or zeros), decoding as the engine does up to
    the first header it refuses."""
    setup = plan.setup
    comp = {"none": 0, "zlib": _core.FLAG_ZLIB, "zstd": _core.FLAG_ZSTD}[setup.compression]
    codec = _core.RamPacketCodec(setup.packet_pages, setup.page_size, "current", comp,
                                 {r.name: r.size for r in setup.regions})
    out: dict = {}
    pos = hello_len
    while pos + 12 <= len(stream):
        flags = int.from_bytes(stream[pos + 8:pos + 12], "big")
        if flags & _core.FLAG_DEVICE_STATE:
            try:
                *_, size = _core.decode_device_header(stream[pos:pos + 276], comp, 0,
                                                      0xFFFFFFFF)
            except ProtocolError:
                break
            pos += _core.DEVICE_HEADER_SIZE + size
            continue
        header = stream[pos:pos + codec.header_size]
        try:
            pkt = codec.decode(header)
        except ProtocolError:
            break
        payload = pos + codec.header_size
        for i, off in enumerate(pkt.offsets.tolist()):
            data = stream[payload + i * PAGE:payload + (i + 1) * PAGE] if not comp else None
            out.setdefault((pkt.ramblock, off // PAGE), []).append(data)
        for off in pkt.zero_offsets.tolist():
            out.setdefault((pkt.ramblock, off // PAGE), []).append(bytes(PAGE))
        pos = payload + pkt.payload_size
    return out


def _prefix_of(page: bytes, candidates: list, original: bytes) -> bool:
    """``page`` is ``original``, or a candidate written over original or another candidate
    up to some byte (a read cut short leaves a prefix)."""
    if page == original:
        return True
    bases = [original] + [c for c in candidates if c is not None]
    for cand in candidates:
        if cand is None:
            return True                 # compressed: any bytes
        k = _common_prefix(page, cand)
        if any(page[k:] == base[k:len(page)] for base in bases):
            return True
    return False


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    x = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)
    hits = np.flatnonzero(x)
    return int(hits[0]) if len(hits) else n


def root_of(exc: BaseException) -> tuple[str, str]:
    """The type name and text of what started ``exc`` (a worker's traceback included)."""
    seen = exc
    for _ in range(20):
        if seen.__cause__ is None:
            break
        seen = seen.__cause__
    if type(seen).__name__ == "RemoteTraceback":
        # The last "module.Name: message" line (a message may span lines: hostile
        # names in it carry newlines).
        found = re.findall(r"^((?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|"
                           r"Interrupt|Aborted))): ?(.*)$", seen.text, re.MULTILINE)
        if not found:
            return "unparsed traceback", seen.text[-300:]
        _, name, message = found[-1]
        return name, message
    return type(seen).__name__, str(seen)


# ---------------------------------------------------------------- one Destination

class Session:
    """One Destination, one receive(), the cases ``rng`` draws for it."""

    STRANGERS = ("stranger before SETUP", "stranger after SETUP")

    def __init__(self, report: LiveReport, regions: dict, originals: dict, rng, sid: str):
        self.report, self.regions, self.originals = report, regions, originals
        self.rng, self.sid = rng, sid
        self.sockets: list[socket.socket] = []
        self.outcome: list = []
        self.cases: list[str] = []          # the kinds of the cases this session carries
        self.writes: dict = {}              # (region, page) -> what packets carried for it

    def case(self, kind: str) -> None:
        self.report.row(kind).cases += 1
        self.cases.append(kind)

    def connect(self, address: str, data: bytes, *, close=True) -> socket.socket:
        """A connection that sends ``data`` and (``close``) ends its side."""
        _, host, port = address.split(":")
        sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
        self.sockets.append(sock)
        try:
            if data:
                sock.sendall(data)
            if close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return sock

    def run(self) -> None:
        plan = make_plan(self.rng)
        setup_message = self._setup_message(plan)

        def factory(name, size, page_size):
            if size > 16 << 20:
                raise ConfigError(f"fuzz: region {name!r} of {size} bytes not made")
            return fastmfd.Region.create(name, size, page_size=page_size)

        dst = fastmfd.Destination("tcp:127.0.0.1:0", workers=2, timeout=DEADLINE,
                                  handshake_timeout=2.0, max_queued_bytes=1 << 20,
                                  region_factory=factory)
        with dst:
            for region in self.regions.values():
                dst.add_region(region)
            thread = threading.Thread(target=self._receive, args=(dst,), daemon=True,
                                      name="fuzz receive")
            thread.start()
            try:
                self._drive(dst, plan, setup_message, thread)
            finally:
                self._finish(dst, thread)
        self.report.sessions += 1

    def _setup_message(self, plan: Plan) -> tuple[bytes, str]:
        """The SETUP to send and what it is: "valid", or a mutant ("invalid", "mutant
        but valid"). Mutants a destination would allocate too much for are drawn again."""
        rng = self.rng
        message = mc.encode_message(mc.Msg.SETUP, plan.setup)
        if rng.random() >= 0.25:
            return message, "valid"
        for _ in range(10):
            body = mutate_text(rng, plan.setup.encode()) if rng.random() < 0.7 else \
                mutate_bytes(rng, message[8:])
            mutant = mc.MESSAGE_HEADER.pack(int(mc.Msg.SETUP), len(body)) + body
            if rng.random() < 0.2:
                mutant = mutate_bytes(rng, mutant, MESSAGE_FIELDS, max_ops=1)
            verdict = self._judge_setup(mutant)
            if verdict != "skip":
                return mutant, verdict
            self.report.skipped_setups += 1
        return message, "valid"

    def _receive(self, dst) -> None:
        try:
            dst.receive()
            self.outcome.append(("ok", None))
        except BaseException as exc:            # noqa: BLE001 - judged by _finish
            self.outcome.append(("error", exc))

    def _wait_refused(self, dst, before: int, kind: str, thread) -> bool:
        deadline = time.monotonic() + REFUSAL_WAIT
        while time.monotonic() < deadline:
            if len(dst.refused) > before:
                self.report.row(kind).refused += 1
                return True
            if not thread.is_alive():
                self.report.find("a stranger ended the session", f"{self.sid} {kind}",
                                 repr(self.outcome[-1][1] if self.outcome else None))
                self.report.row(kind).bad += 1
                return False
            time.sleep(0.005)
        self.report.find("stranger not refused", f"{self.sid} {kind}",
                         f"no refusal within {REFUSAL_WAIT} s")
        self.report.row(kind).hangs += 1
        return False

    def _stranger_bytes(self, setup: Setup | None) -> bytes | None:
        """A connection's bytes that must fail its greeting (None: none found)."""
        rng = self.rng
        if rng.random() < 0.01:
            return IDLE                 # connects, says nothing, stays: handshake_timeout
        if rng.random() < 0.08:
            return rng.choice((b"", b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01",
                               b"SSH-2.0-OpenSSH_9.2\r\n", rng.randbytes(rng.randint(1, 300)),
                               bytes(4), bytes(12)))
        for _ in range(20):
            if setup is None:
                with_header = rng.random() < 0.8
                base = main_start(with_header) + mc.encode_message(mc.Msg.SETUP, {})[:8]
                data = mutate_bytes(rng, base, main_fields(with_header), max_ops=2)
                if not main_greeting_passes(data):
                    return data
            else:
                init = bytearray(_core.INIT_PACKET_SIZE)
                _core.encode_init_packet(init, setup.uuid, rng.randrange(setup.total_channels))
                base = (channel_header(_core.CHANNEL_MULTIFD) if setup.channel_header
                        else b"") + bytes(init)
                data = mutate_bytes(rng, base, hello_fields(setup.channel_header), max_ops=2)
                if not channel_greeting_passes(data, setup):
                    return data
        return None

    def _drive(self, dst, plan: Plan, setup_message: tuple[bytes, str], thread) -> None:
        rng, report, setup = self.rng, self.report, plan.setup
        # Strangers before SETUP: each refused while the destination waits on.
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            data = self._stranger_bytes(None)
            if data is None:
                continue
            self.case("stranger before SETUP")
            before = len(dst.refused)
            self.connect(dst.address, b"" if data is IDLE else data, close=data is not IDLE)
            if not self._wait_refused(dst, before, "stranger before SETUP", thread):
                return
        start = main_start(setup.channel_header)
        message, verdict = setup_message
        if not main_greeting_passes(start + message):
            # Cut inside its message header: not a main channel yet, a stranger.
            self.case("stranger before SETUP")
            before = len(dst.refused)
            self.connect(dst.address, start + message)
            if self._wait_refused(dst, before, "stranger before SETUP", thread):
                dst.cancel("fuzz: no source comes")
            return
        if verdict != "valid":
            self.case("SETUP")
            if verdict == "mutant but valid":
                report.row("SETUP").passed += 1
            self.connect(dst.address, start + message)
            return                  # and we close: the session must fail either way
        main = self.connect(dst.address, start + message, close=False)
        main.settimeout(DEADLINE)
        try:
            kind, _ = mc.read_message(main, 0)
        except FastMFDError as exc:
            report.find("no SETUP_ACK", self.sid, repr(exc))
            return
        if kind is not mc.Msg.SETUP_ACK:
            report.find("no SETUP_ACK", self.sid, f"received {kind.name}")
            return
        # Strangers after SETUP: greeted by spare workers, refused.
        for _ in range(rng.choice((0, 0, 0, 1, 2))):
            data = self._stranger_bytes(setup)
            if data is None:
                continue
            self.case("stranger after SETUP")
            before = len(dst.refused)
            self.connect(dst.address, b"" if data is IDLE else data, close=data is not IDLE)
            if not self._wait_refused(dst, before, "stranger after SETUP", thread):
                return
        # The channels: most streams mutated after their hello.
        order = list(range(setup.total_channels))
        rng.shuffle(order)
        mutated = False
        for ch in order:
            stream = plan.streams[ch]
            hello_len, starts = plan.positions[ch]
            if rng.random() < 0.06:
                hello = mutate_bytes(rng, stream[:hello_len], hello_fields(setup.channel_header),
                                     max_ops=1)
                if len(hello) == hello_len and channel_greeting_passes(hello, setup):
                    self.case("hello passing the greeting")
                    stream = hello + stream[hello_len:]
                    mutated = True
            if not mutated and (rng.random() < 0.7 or ch == order[-1]):
                self.case("channel stream")
                stream = stream[:hello_len] + mutate_bytes(
                    rng, stream[hello_len:], STREAM_FIELDS[setup.packet_pages],
                    positions=tuple(s - hello_len for s in starts))
                mutated = True
            for key, cands in legit_pages(plan, stream, hello_len).items():
                self.writes.setdefault(key, []).extend(cands)
            self.connect(dst.address, stream)
        # The main channel: old-way device chunks, now and then mutated messages.
        after = plan.main_after
        if rng.random() < 0.3:
            self.case("main channel messages")
            extra = rng.choice((
                mc.encode_message(mc.Msg.ROUND_END, {"round": 1}),
                mc.encode_message(mc.Msg.SWITCHOVER_START),
                mc.encode_message(mc.Msg.ERROR, {"error": "fuzz"}),
                mc.encode_message(mc.Msg.DEVICE_STATE, _old_way(0, 0, b"x" * 100, True)),
                mc.encode_message(mc.Msg.AUTH, bytes(16)),
                message))
            after = mutate_bytes(rng, after + extra, MAIN_MESSAGE_FIELDS,
                                 positions=message_starts(after + extra))
        bogus = mc.encode_message(mc.Msg.COMPLETE, {"channels": [], "device_chunks": []})
        try:
            main.sendall(after + bogus)
        except OSError:
            pass
        thread.join(SETTLE)

    def _judge_setup(self, message: bytes) -> str:
        """"invalid", "mutant but valid", or "skip" (valid, but more than this
        machine should give)."""
        if len(message) < mc.MESSAGE_HEADER_SIZE:
            return "invalid"
        try:
            kind, length = mc.decode_message_header(message[:8], 0)
            body = message[8:8 + length]
            if kind is not mc.Msg.SETUP or len(body) < length:
                return "invalid"
            setup = mc.decode_payload(kind, body)
        except FastMFDError:
            return "invalid"
        except Exception as exc:        # noqa: BLE001 - the decoders' part reports these
            self.report.find("SETUP decode raised in the harness", self.sid, repr(exc))
            return "invalid"
        regions = sum(r.size for r in setup.regions if r.name not in REGIONS)
        pool = 0
        if setup.devices:
            from fastmfd._engine.reassembly import pool_slots_for
            cap = min(setup.max_queued_bytes, 1 << 20)
            if cap >= setup.chunk_size:
                slots = pool_slots_for(len(setup.devices), cap, setup.chunk_size,
                                       setup.total_channels)
                pool = slots * ((setup.chunk_size + _core.CHUNK_HEADER_SIZE + 63) // 64 * 64)
        if regions + pool > MAX_SESSION_BYTES:
            return "skip"
        return "mutant but valid"

    def _finish(self, dst, thread) -> None:
        report = self.report
        if thread.is_alive():
            for sock in self.sockets:       # the main channel too: it must end now
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            thread.join(DEADLINE)
        for sock in self.sockets:
            sock.close()
        if not self.cases:
            self.case("unmutated session")
        kinds = set(self.cases) - set(self.STRANGERS) or {"unmutated session"}
        if thread.is_alive():
            for kind in kinds:
                report.row(kind).hangs += 1
            report.find("hang", self.sid, f"receive() still running {DEADLINE} s after every "
                        f"socket closed ({self.cases})")
            dst.cancel("fuzz: hang")
            thread.join(DEADLINE)
            return
        how, exc = self.outcome[-1]
        if how == "ok":
            for kind in kinds:
                report.row(kind).bad += 1
            report.find("success", self.sid, "receive() returned although COMPLETE's totals "
                        "cannot match")
        else:
            name, text = root_of(exc)
            report.roots[name] = report.roots.get(name, 0) + 1
            if "killed by" in str(exc):
                for kind in kinds:
                    report.row(kind).crashes += 1
                report.find("crash", self.sid, str(exc))
            elif not isinstance(exc, FastMFDError) or (name not in OK_ROOTS
                                                       and name not in CONNECTION_ROOTS):
                for kind in kinds:
                    report.row(kind).bad += 1
                report.find(f"{name} in the destination", f"{self.sid} {self.cases}",
                            f"{type(exc).__name__}: {exc} <- {text}")
            else:
                for kind in self.cases:
                    if kind not in self.STRANGERS:
                        report.row(kind).failed += 1
        self._check_regions()

    def _check_regions(self) -> None:
        for name, region in self.regions.items():
            original = self.originals[name]
            pages = region.array.reshape(-1, PAGE)
            changed = np.flatnonzero((pages != original.reshape(-1, PAGE)).any(axis=1))
            for page in changed.tolist():
                cands = self.writes.get((name, page))
                old = original[page * PAGE:(page + 1) * PAGE].tobytes()
                if cands is None or not _prefix_of(pages[page].tobytes(), cands, old):
                    self.report.find("a write outside what the packets addressed",
                                     f"{self.sid} {self.cases}",
                                     f"region {name} page {page} changed; addressed by a "
                                     f"packet the destination had to accept: "
                                     f"{cands is not None}")
                    for kind in set(self.cases):
                        self.report.row(kind).bad += 1
                    break
            if len(changed):
                pages[changed] = original.reshape(-1, PAGE)[changed]
            region.dirty.collect()


def hello_fields(with_header: bool) -> tuple:
    shift = _core.CHANNEL_HEADER_SIZE if with_header else 0
    return ((CHANNEL_HEADER_FIELDS if with_header else ())
            + tuple(Field(f.at + shift, f.width, f.name) for f in INIT_FIELDS))


# A stream's packets: RAM header fields, device header fields, and the chunk
# header that follows a device header (uncompressed sessions).
STREAM_FIELDS = {pages: ram_fields(pages) + DEVICE_FIELDS + tuple(
    Field(f.at + _core.DEVICE_HEADER_SIZE, f.width, f.name) for f in CHUNK_FIELDS)
    for pages in (8, 16)}
MAIN_MESSAGE_FIELDS = MESSAGE_FIELDS + tuple(Field(f.at + 12, f.width, f.name)
                                             for f in CHUNK_FIELDS) + (Field(8, 4, "device"),)


def message_starts(data: bytes) -> tuple[int, ...]:
    """Where each main-channel message of ``data`` starts."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        out.append(pos)
        pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "big")
    return tuple(out)


# ---------------------------------------------------------------- leaks

def _children() -> set[int]:
    """This process's children still running, multiprocessing's helpers aside."""
    multiprocessing.active_children()           # reaps the finished ones
    return proc_scan.os_children() - proc_scan.infrastructure_pids()


def check_leaks(report: LiveReport, sid: str, segments_before: set[str]) -> None:
    deadline = time.monotonic() + 5.0
    while True:
        left = _children()
        fresh = set(list_segments()) - segments_before
        if not left and not fresh or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        report.find("leaked process", sid, f"children still running: {sorted(left)}")
        for pid in left:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    for name in fresh:
        report.suspects.setdefault(name, sid)


def judge_suspects(report: LiveReport) -> None:
    """Segments that appeared during a session and outlived its Destination: ours
    unless another process on this shared machine maps them (or they went away)."""
    left = set(report.suspects) & set(list_segments())
    ours = proc_scan.process_tree(os.getpid())
    for name in sorted(left - proc_scan.mapped_outside(left, ours)):
        report.find("leaked segment", report.suspects[name], name)


# ---------------------------------------------------------------- the campaign

def run_live(cases: int, seed: int, seconds: float | None, log) -> LiveReport:
    logging.getLogger("fastmfd").setLevel(logging.CRITICAL)
    report = LiveReport()
    started = time.monotonic()
    gc.collect()
    fds_before = len(os.listdir("/proc/self/fd"))
    regions = {name: fastmfd.Region.create(name, size) for name, size in REGIONS.items()}
    try:
        originals = _fill(regions, seed)
        n = 0
        last_log = started
        while report.cases < cases:
            if seconds is not None and time.monotonic() - started > seconds:
                log(f"live: stopping after {seconds:g} s")
                break
            sid = f"live:{seed}:{n}"
            rng = random.Random(f"{seed}/live/{n}")
            segments = set(list_segments())
            try:
                Session(report, regions, originals, rng, sid).run()
            except Exception as exc:        # noqa: BLE001 - a harness or setup failure
                report.find("harness", sid, f"{type(exc).__name__}: {exc}")
            check_leaks(report, sid, segments)
            n += 1
            if time.monotonic() - last_log > 15:
                last_log = time.monotonic()
                log(f"  live: {report.cases} cases, {n} sessions, "
                    f"{time.monotonic() - started:.0f} s, findings {len(report.findings)}")
    finally:
        for region in regions.values():
            region.close()
    time.sleep(1.0)
    judge_suspects(report)
    gc.collect()
    report.fds = (fds_before, len(os.listdir("/proc/self/fd")))
    report.wall = time.monotonic() - started
    return report


def replay_session(spec: str) -> int:
    """Run live session ``live:SEED:N`` again and print what it found."""
    logging.getLogger("fastmfd").setLevel(logging.CRITICAL)
    _, seed, n = spec.split(":")
    report = LiveReport()
    regions = {name: fastmfd.Region.create(name, size) for name, size in REGIONS.items()}
    try:
        originals = _fill(regions, int(seed))
        Session(report, regions, originals, random.Random(f"{seed}/live/{n}"), spec).run()
    finally:
        for region in regions.values():
            region.close()
    print(f"{spec}: cases {report.cases}, roots {report.roots}")
    for kind, case, detail in report.findings:
        print(f"  {kind} ({case}): {detail}")
    return 1 if report.findings else 0


def _fill(regions: dict, seed: int) -> dict:
    """Fill each region with its pattern; returns copies to check against."""
    originals = {}
    for i, region in enumerate(regions.values()):
        region.array[:] = np.random.default_rng(seed * 7 + i).integers(
            0, 256, region.size, dtype=np.uint8)
        originals[region.name] = region.array.copy()
    return originals

