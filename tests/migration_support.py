"""Shared by the end-to-end tests: page images, a source/destination pair run
in this process, a TCP proxy that injects faults into one connection, a
workload process, and a source driven by hand.

::

    Migration.run()
      test thread: source.migrate()  ◀─▶  receive thread: destination.receive()
      └── Outcome: both results or both errors, and when each side ended
          (a side still running after the timeout fails the test as a hang)

    Source ──▶ Proxy ──▶ Destination     (optional) one Link per connection; the
                                          client's first bytes say which channel
                                          it is, and that channel's Fault decides
                                          what to forward, hold back, corrupt, cut.
                                          One thread relays all, never blocking on
                                          one: each Link has its own flow control.

    keep_writing()   a workload process: rewrite pages of a Region, mark them dirty
    FakeSource       SETUP and channel bytes written by hand (bad handshakes)

Every wait is bounded; nothing here sleeps to synchronize.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

import fastmfd
from fastmfd.protocol.setup import DeviceSpec, RegionSpec, Setup
from fastmfd import _core
from fastmfd._engine.admission import GREETING_SPARES
from fastmfd._engine.memory_bound import WORKER_BYTES
from fastmfd.protocol.main_channel import MAIN_MAGIC
from fastmfd.protocol.sockets import parse_address

PAGE = 4096
FAILURE_BOUND = 5.0         # seconds: both sides must fail within this after a fault
FORCED_FLUSH_BOUND = 10.0   # seconds a link's reset or cut may wait to forward what it holds


# ---------------------------------------------------------------- images

_WORDS = np.frombuffer(b"the quick brown fox jumps over lazy dog migration page region "
                       b"channel packet device state round sync zero ", dtype=np.uint8)


def fill_pages(array: np.ndarray, seed: int, zero=0.3, text=0.3, page_size=PAGE) -> np.ndarray:
    """Fill ``array`` with a mix of zero, text-like and random pages; returns the page kinds
    (0 zero, 1 text, 2 random). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    npages = len(array) // page_size
    kinds = rng.choice(3, size=npages, p=[zero, text, 1 - zero - text])
    pages = array.reshape(npages, page_size)
    for i, kind in enumerate(kinds):
        if kind == 0:
            pages[i] = 0
        elif kind == 1:
            start = rng.integers(len(_WORDS))
            pages[i] = np.resize(np.roll(_WORDS, -start), page_size)
        else:
            pages[i] = rng.integers(0, 256, page_size, dtype=np.uint8)
    return kinds


def zero_page_count(array: np.ndarray, page_size=PAGE) -> int:
    pages = array.reshape(-1, page_size)
    return int((~pages.any(axis=1)).sum())


def first_difference(a: np.ndarray, b: np.ndarray, page_size=PAGE) -> str:
    """Where two images differ, for assertion messages."""
    diff = np.flatnonzero(a != b)
    if not len(diff):
        return "identical"
    pages = np.unique(diff // page_size)
    return f"{len(pages)} pages differ, first {pages[:8].tolist()}"


# ---------------------------------------------------------------- running a migration

@dataclass
class Outcome:
    """What one migration did on each side."""
    stats: fastmfd.MigrationStats | None
    result: fastmfd.DestinationResult | None
    source_error: BaseException | None
    dest_error: BaseException | None
    started: float              # time.monotonic() when migrate() and receive() were called
    source_end: float           # time.monotonic() when migrate() returned or raised
    dest_end: float             # ... when receive() returned or raised

    def ok(self) -> tuple[fastmfd.MigrationStats, fastmfd.DestinationResult]:
        for side, error in (("source", self.source_error), ("destination", self.dest_error)):
            if error is not None:
                raise AssertionError(f"the {side} failed: {error!r}") from error
        return self.stats, self.result

    def failed_both(self, since: float) -> tuple[fastmfd.MigrationError, fastmfd.MigrationError]:
        """Assert both sides failed with a MigrationError within FAILURE_BOUND of ``since``;
        returns (source error, destination error)."""
        for side, error in (("source", self.source_error), ("destination", self.dest_error)):
            assert isinstance(error, fastmfd.MigrationError), \
                f"the {side} ended with {error!r}, expected a MigrationError"
        for side, end in (("source", self.source_end), ("destination", self.dest_end)):
            assert end - since < FAILURE_BOUND, \
                f"the {side} failed {end - since:.2f} s after the fault (bound {FAILURE_BOUND} s)"
        return self.source_error, self.dest_error


class Migration:
    """A Destination and a Source in this process, optionally joined through a Proxy.

    Enter it, add regions/devices/loaders to ``.source`` / ``.destination``,
    then ``run()``. The destination's regions stay readable until exit.
    """

    def __init__(self, config: fastmfd.MigrationConfig | None = None, *, transport="tcp",
                 proxy: "Proxy | None" = None, **destination_options) -> None:
        self.config = config or fastmfd.MigrationConfig()
        self.transport = transport
        self.proxy = proxy
        self._dst_options = destination_options
        self._tmpdir = None
        self.source: fastmfd.Source | None = None
        self.destination: fastmfd.Destination | None = None

    def __enter__(self) -> "Migration":
        try:
            if self.transport == "unix":
                # Short: a Unix socket path holds at most 107 bytes.
                self._tmpdir = tempfile.mkdtemp(prefix="fmfd-")
                address = f"unix:{self._tmpdir}/dst.sock"
            else:
                address = "tcp:127.0.0.1:0"
            self.destination = fastmfd.Destination(address, **self._dst_options).__enter__()
            address = self.destination.address
            if self.proxy is not None:
                address = self.proxy.start(address)
            self.source = fastmfd.Source(address, self.config).__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for part in (self.source, self.destination, self.proxy):
            if part is not None:
                part.close()
        if self._tmpdir is not None:
            left = os.listdir(self._tmpdir)
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            failing = bool(exc) and exc[0] is not None
            assert failing or not left, f"the destination left {left} behind"

    def run(self, *, live=False, on_stop=None, on_resume=None, dst_on_resume=None,
            dst_on_setup=None, timeout=60.0) -> Outcome:
        """Run ``migrate()`` and ``receive()`` in threads of their own. If either is
        still running after ``timeout`` seconds, the test fails as a hang (both
        sessions are failed first, so they stop and release everything)."""
        ends: dict = {}
        hooks = {"on_setup": dst_on_setup} if dst_on_setup is not None else {}

        def side(name, call):
            try:
                ends[name] = ("ok", call())
            except BaseException as exc:
                ends[name] = ("error", exc)
            ends[name + " end"] = time.monotonic()

        threads = [threading.Thread(target=side, args=args, daemon=True, name=f"test {args[0]}")
                   for args in (("source", lambda: self.source.migrate(
                                    live=live, on_stop=on_stop, on_resume=on_resume)),
                                ("destination", lambda: self.destination.receive(
                                    on_resume=dst_on_resume, **hooks)))]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = started + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            for owner in (self.source, self.destination):
                owner.cancel("the test gave up on a hang")
            for thread in threads:
                thread.join(10)
            raise AssertionError(f"hung: {hung} still running {timeout} s after the start")
        (src_how, src), (dst_how, dst) = ends["source"], ends["destination"]
        return Outcome(src if src_how == "ok" else None, dst if dst_how == "ok" else None,
                       src if src_how == "error" else None, dst if dst_how == "error" else None,
                       started, ends["source end"], ends["destination end"])


    def run_refused(self, within: float = 5.0) -> tuple[BaseException, list]:
        """A source the destination must refuse: ``migrate()`` fails within
        ``within`` seconds, while ``receive()`` goes on waiting for a real source
        (its ``refused`` list says why). Returns (the source's error, the refusals)."""
        ended: list = []
        thread = threading.Thread(target=lambda: ended.append(_outcome(self.destination.receive)),
                                  daemon=True, name="test destination")
        thread.start()
        started = time.monotonic()
        try:
            error = _outcome(lambda: self.source.migrate(live=False))
            assert isinstance(error, fastmfd.MigrationError), \
                f"the source ended with {error!r}, expected a MigrationError"
            assert time.monotonic() - started < within, "the source was not refused in time"
            while not self.destination.refused and time.monotonic() - started < within:
                time.sleep(0.02)
            assert self.destination.refused, "the destination did not refuse the source"
            assert thread.is_alive(), f"the destination stopped waiting: {ended}"
        finally:
            self.destination.cancel("the test is over")
            thread.join(10)
        return error, list(self.destination.refused)


def _outcome(call):
    try:
        return call()
    except BaseException as exc:
        return exc


def stopped_in_setup(stop, config: fastmfd.MigrationConfig | None = None,
                     **destination_options) -> tuple[BaseException | None, BaseException | None]:
    """A source stopped while its destination checks SETUP (on_setup runs): its
    ``migrate()`` runs in this thread; ``stop(source)`` runs in the destination's,
    whose on_setup then waits until ``migrate()`` ended, so the source stops before
    any SETUP_ACK. Returns what migrate() and receive() raised."""
    ended = threading.Event()
    received: dict[str, BaseException] = {}

    def on_setup(setup) -> None:
        stop(m.source)
        ended.wait(20)

    def receive() -> None:
        received["error"] = _outcome(lambda: m.destination.receive(on_setup=on_setup))

    with make_region("ram", 1 << 20, seed=5) as region, \
            Migration(config, **destination_options) as m:
        m.source.add_region(region)
        receiver = threading.Thread(target=receive, daemon=True, name="test destination")
        receiver.start()
        try:
            error = _outcome(lambda: m.source.migrate(live=False))
        finally:
            ended.set()
            receiver.join(20)
    return error, received.get("error")


def receiving(dst: fastmfd.Destination) -> tuple[threading.Thread, dict[str, object]]:
    """``dst.receive()`` in a thread: it, and what it returned ("result") or the
    MigrationError it raised ("error")."""
    got: dict[str, object] = {}

    def receive() -> None:
        try:
            got["result"] = dst.receive()
        except fastmfd.MigrationError as exc:
            got["error"] = exc
    thread = threading.Thread(target=receive)
    thread.start()
    return thread, got


def reporting_destination(before: str = "", setup: str = "") -> str:
    """A script that receives one migration into a Destination on loopback, printing
    its address, then how receive() ended: "failed: <the error>" or "succeeded".
    ``before``: code ahead of it (a loader's class); ``setup``: a line run with the
    Destination ``dst`` before it receives (adding that loader)."""
    return textwrap.dedent(before) + textwrap.dedent(f"""
        import fastmfd
        if __name__ == "__main__":
            with fastmfd.Destination("tcp:127.0.0.1:0", workers=2) as dst:
                {setup}
                print(dst.address, flush=True)
                try:
                    dst.receive()
                except fastmfd.MigrationError as exc:
                    print("failed:", exc, flush=True)
                else:
                    print("succeeded", flush=True)
    """)


@contextlib.contextmanager
def destination_process(script: str, *args: str, **popen: Any
                        ) -> Iterator[tuple[subprocess.Popen, str]]:
    """``script`` (a Destination that prints its address first) in a Python of its
    own: (the process, that address); killed at the end if it still runs."""
    dst = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, **popen)
    try:
        assert dst.stdout is not None
        yield dst, dst.stdout.readline().strip()
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()


def channel_memory(config: fastmfd.MigrationConfig, largest: int, devices: bool) -> int:
    """What Destination(max_memory=...) holds for the receive channels of a session of
    ``config`` whose largest region is ``largest`` bytes (``devices``: it sends device
    state)."""
    return config.channels * _core.receive_channel_bytes(
        config.packet_pages, config.page_size, largest, config.device_chunk_size, devices,
        config.compression)


def worker_memory(config: fastmfd.MigrationConfig, ahead: int = 4, spares: bool = True) -> int:
    """What Destination(max_memory=...) holds for the worker processes of a session of
    ``config``: a receive worker per channel (or the ``ahead`` started with the
    Destination, if more) and the reassembly process, which it needs, and, with
    ``spares``, all of the greeting spares (held only where max_memory has room)."""
    channels = config.channels + config.device_state_channels
    workers = max(channels + GREETING_SPARES * spares, ahead) + 1
    return workers * WORKER_BYTES


def make_region(name: str, size: int, seed: int | None = None, **mix) -> fastmfd.Region:
    region = fastmfd.Region.create(name, size)
    if seed is not None:
        fill_pages(region.array, seed, **mix)
    return region


# ---------------------------------------------------------------- the proxy

class Fault:
    """How a proxied connection forwards the client's bytes (base: unchanged).

    ``data()`` gets each piece the client sent and its offset in the stream
    after the hello (channel header and init packet), and calls ``link.send``
    / ``link.reset`` / ``link.cut``. ``fired_at`` is when the fault struck.
    """

    fired_at: float | None = None

    def fire(self) -> None:
        if self.fired_at is None:
            self.fired_at = time.monotonic()

    def hello(self, link: "Link", data: bytes) -> None:
        link.send(data)

    def data(self, link: "Link", data: bytes, offset: int) -> None:
        link.send(data)


class Record(Fault):
    """Forward everything unchanged, keeping a copy: ``.bytes`` is the connection as the
    source wrote it (hello included), a capture file ``fastmfd inspect`` reads."""

    def __init__(self) -> None:
        self.bytes = bytearray()

    def hello(self, link, data):
        self.bytes += data
        link.send(data)

    def data(self, link, data, offset):
        self.bytes += data
        link.send(data)


class Delay(Fault):
    """Every byte reaches the destination ``seconds`` after the client sent it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def data(self, link, data, offset):
        self.fire()
        link.send(data, delay=self.seconds)


class Corrupt(Fault):
    """XOR the byte at stream offset ``at`` with ``mask``."""

    def __init__(self, at: int, mask: int = 0xFF) -> None:
        self.at, self.mask = at, mask

    def data(self, link, data, offset):
        if offset <= self.at < offset + len(data):
            data = bytearray(data)
            data[self.at - offset] ^= self.mask
            self.fire()
        link.send(bytes(data))


class Reset(Fault):
    """Forward ``after`` bytes, then reset both connections (TCP RST)."""

    def __init__(self, after: int) -> None:
        self.after = after

    def data(self, link, data, offset):
        if offset + len(data) < self.after:
            link.send(data)
            return
        link.send(data[:self.after - offset])
        self.fire()
        link.reset()


class Truncate(Fault):
    """Forward ``after`` bytes, then end the stream to the destination (FIN) and
    swallow whatever the client sends later, so only the destination notices."""

    def __init__(self, after: int) -> None:
        self.after = after

    def data(self, link, data, offset):
        if offset >= self.after:
            return
        link.send(data[:self.after - offset])
        if offset + len(data) >= self.after:
            self.fire()
            link.cut()


class BlackHole(Fault):
    """Forward ``after`` bytes, then nothing more, ever. ``read=False``: stop reading
    from the client too (a path that drops everything: the client's socket fills
    and its writes block); ``read=True``: swallow what it sends."""

    def __init__(self, after: int, *, read: bool = False) -> None:
        self.after, self.read = after, read

    def data(self, link, data, offset):
        if offset < self.after:
            link.send(data[:self.after - offset])
        if offset + len(data) >= self.after and self.fired_at is None:
            self.fire()
            link.stalled = not self.read
            link.holding = True


class Trigger(Fault):
    """Forward unchanged; once ``after`` bytes went through, call ``action()``."""

    def __init__(self, after: int, action) -> None:
        self.after, self.action = after, action

    def data(self, link, data, offset):
        link.send(data)
        if self.fired_at is None and offset + len(data) >= self.after:
            self.fire()
            self.action()


class RewriteHello(Fault):
    """Replace the hello (channel header + init packet) with ``rewrite(hello)``."""

    def __init__(self, rewrite) -> None:
        self.rewrite = rewrite

    def hello(self, link, data):
        self.fire()
        link.send(self.rewrite(bytes(data)))


class AtMessage(Fault):
    """On the main channel: forward whole messages until the first of type ``kind``,
    forward ``keep`` bytes of it, then ``"reset"`` or ``"cut"`` the connection."""

    def __init__(self, kind, then: str, keep: int = 3) -> None:
        self.kind, self.then, self.keep = kind, then, keep
        self.buf = bytearray()
        self.preamble = 8

    def data(self, link, data, offset):
        self.buf += data
        while self.fired_at is None:
            if self.preamble:
                if len(self.buf) < self.preamble:
                    return
                link.send(bytes(self.buf[:self.preamble]))
                del self.buf[:self.preamble]
                self.preamble = 0
            if len(self.buf) < 8:
                return
            kind, length = struct.unpack_from(">II", self.buf)
            if kind == self.kind:
                self._strike(link)
                return
            if len(self.buf) < 8 + length:
                return
            link.send(bytes(self.buf[:8 + length]))
            del self.buf[:8 + length]

    def _strike(self, link) -> None:
        """The message of type ``kind`` is at the front of ``buf``: break the link."""
        link.send(bytes(self.buf[:self.keep]))
        self.fire()
        getattr(link, self.then)()


class EditMessage(AtMessage):
    """On the main channel: the first message of type ``kind`` goes on as ``edit``
    changes it (in place, in ``buf``: the message from its header on; False
    while more of it must come first); every other byte passes as it came."""

    def __init__(self, kind) -> None:
        super().__init__(kind, then="")

    def edit(self, buf: bytearray) -> bool:
        raise NotImplementedError

    def data(self, link, data, offset):
        if self.fired_at is not None:
            link.send(data)
        else:
            super().data(link, data, offset)

    def _strike(self, link) -> None:
        if self.edit(self.buf):
            self.fire()
            link.send(bytes(self.buf))
            self.buf.clear()


class FlipInMessage(EditMessage):
    """Flip ``mask`` in byte ``at`` of the payload of the first ``kind`` message."""

    def __init__(self, kind, at: int, mask: int) -> None:
        super().__init__(kind)
        self.at, self.mask = at, mask

    def edit(self, buf: bytearray) -> bool:
        if len(buf) <= 8 + self.at:
            return False
        buf[8 + self.at] ^= self.mask
        return True


class OnMessage(Fault):
    """On the main channel: call ``action()`` when the first message of type ``kind``
    from the source comes; that message and all after it reach the destination
    ``delay`` seconds late (the others unchanged)."""

    def __init__(self, kind, action, delay: float = 0.0) -> None:
        self.kind, self.action, self.delay = kind, action, delay
        self.buf = bytearray()
        self.skip = 8               # the preamble

    def data(self, link, data, offset):
        if self.fired_at is None:
            self._parse(data)
        link.send(data, delay=self.delay if self.fired_at is not None else 0.0)

    def _parse(self, data) -> None:
        self.buf += data
        while True:
            take = min(self.skip, len(self.buf))
            del self.buf[:take]
            self.skip -= take
            if self.skip or len(self.buf) < 8:
                return
            kind, length = struct.unpack_from(">II", self.buf)
            if kind == self.kind:
                self.fire()
                self.action()
                return
            self.skip = 8 + length


@dataclass
class Packet:
    """One multifd packet as the proxy parsed it."""
    header: bytearray
    payload: bytearray

    @property
    def raw(self) -> bytes:
        """The packet as it came."""
        return bytes(self.header + self.payload)

    @property
    def flags(self) -> int:
        return struct.unpack_from(">I", self.header, 8)[0]

    @property
    def is_device(self) -> bool:
        return bool(self.flags & _core.FLAG_DEVICE_STATE)

    @property
    def device(self) -> tuple[str, int]:
        flags, idstr, instance, size = _core.decode_device_header(self.header,
                                                                  self.flags & 0x3E)
        return idstr, instance

    @property
    def chunk(self) -> tuple[int, int]:
        """(idx, flags) of an uncompressed device chunk."""
        return _core.decode_chunk_header(self.payload)


class Packets(Fault):
    """Parse the channel's packets; ``on_packet(link, packet)`` decides what goes on
    (call ``link.send(...)``, or nothing to drop it). Works for any compression, but
    chunk headers are only readable without."""

    def __init__(self, config: fastmfd.MigrationConfig, on_packet) -> None:
        self.ram_header = _core.RamPacketCodec(config.packet_pages).header_size
        self.page_size = config.page_size
        self.on_packet = on_packet
        self.buf = bytearray()

    def _size(self) -> tuple[int, int] | None:
        """(header, payload) sizes of the packet at the front of the buffer."""
        if len(self.buf) < 12:
            return None
        flags = struct.unpack_from(">I", self.buf, 8)[0]
        if flags & _core.FLAG_DEVICE_STATE:
            header = _core.DEVICE_HEADER_SIZE
            if len(self.buf) < header:
                return None
            return header, struct.unpack_from(">I", self.buf, 272)[0]
        if len(self.buf) < self.ram_header:
            return None
        normal, size = struct.unpack_from(">II", self.buf, 16)
        compressed = flags & (_core.FLAG_ZLIB | _core.FLAG_ZSTD)
        return self.ram_header, (size if compressed else normal * self.page_size) if normal else 0

    def data(self, link, data, offset):
        self.buf += data
        while (sizes := self._size()) is not None and len(self.buf) >= sum(sizes):
            header, payload = sizes
            packet = Packet(self.buf[:header], self.buf[header:header + payload])
            del self.buf[:header + payload]
            self.on_packet(link, packet)


def device_packet(idstr: str, instance: int, idx: int, data: bytes, last=False) -> bytes:
    """An uncompressed device-state packet, built with the core encoders."""
    chunk = bytearray(_core.CHUNK_HEADER_SIZE)
    _core.encode_chunk_header(chunk, idx, _core.CHUNK_FLAG_LAST if last else 0)
    header = bytearray(_core.DEVICE_HEADER_SIZE)
    _core.encode_device_header(header, idstr, instance, len(chunk) + len(data))
    return bytes(header + chunk) + bytes(data)


class Link:
    """One proxied connection: client (source side) and upstream (destination)."""

    def __init__(self, proxy: "Proxy", client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client, self.upstream = client, upstream
        self.name: str | int | None = None      # "main" or the channel id
        self.fault: Fault = Fault()
        self.pending: deque[tuple[float, bytes]] = deque()   # (due, bytes) to upstream
        self.aside: list[tuple[float, bytes]] = []           # held back, others may pass
        self.backlog = bytearray()      # due, but the destination's socket has no room yet
        self.offset = 0
        self.hello = bytearray()
        self.client_eof = False
        self.upstream_eof = False
        self.cut_off = False
        self.stalled = False            # reads nothing more from the client
        self.holding = False            # passes nothing on, not even the client's end
        self.closed = False

    # -- what faults call
    def send(self, data: bytes, delay: float = 0.0, overtakable: bool = False) -> None:
        """Queue ``data`` for the destination in ``delay`` seconds. Pieces go in order —
        a held-back piece holds back what follows it — unless ``overtakable``: then
        what follows goes on, and ``data`` joins the stream when its time comes
        (faults that parse packets only make whole packets overtakable)."""
        if not data or self.cut_off:
            return
        due = time.monotonic() + delay
        if overtakable:
            self.aside.append((due, bytes(data)))
            return
        if self.pending:
            due = max(due, self.pending[-1][0])
        self.pending.append((due, bytes(data)))

    def reset(self) -> None:
        """Abort both connections with a TCP RST."""
        self._flush(force=True)
        for sock in (self.client, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.close()

    def cut(self) -> None:
        """End the stream to the destination here; drop the client's later bytes."""
        self._flush(force=True)
        self.cut_off = True
        try:
            self.upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- the relay
    def _identify(self) -> int | None:
        """Length of the hello once it is complete, naming the link; None until then."""
        h = self.hello
        header = _core.CHANNEL_HEADER_SIZE if self.proxy.channel_header else 0
        if len(h) < header + 4:
            return None
        if header and struct.unpack_from(">I", h, 8)[0] == _core.CHANNEL_MAIN \
                or struct.unpack_from(">I", h, header)[0] == MAIN_MAGIC:
            self.name = "main"
            return header
        if len(h) < header + _core.INIT_PACKET_SIZE:
            return None
        self.name = h[header + 24]
        return header + _core.INIT_PACKET_SIZE

    def from_client(self, data: bytes) -> None:
        if self.name is None:
            self.hello += data
            size = self._identify()
            if size is None:
                return
            self.fault = self.proxy.faults.get(self.name, Fault())
            self.fault.hello(self, bytes(self.hello[:size]))
            data = bytes(self.hello[size:])
        if data and not self.cut_off:
            self.fault.data(self, data, self.offset)
            self.offset += len(data)

    def _flush(self, force=False) -> None:
        """Write the bytes that are due as far as the destination's socket takes them
        without blocking (the rest waits in the backlog for the socket to have room);
        ``force``: all bytes held, due or not, waiting for room (bounded)."""
        now = time.monotonic()
        due_aside = [item for item in self.aside if force or item[0] <= now]
        self.aside = [item for item in self.aside if item not in due_aside]
        for _, data in due_aside:
            self.backlog += data
        while self.pending and (force or self.pending[0][0] <= now):
            self.backlog += self.pending.popleft()[1]
        try:
            if force and self.backlog:
                self.upstream.settimeout(FORCED_FLUSH_BOUND)
                try:
                    self.upstream.sendall(self.backlog)
                finally:
                    self.upstream.setblocking(False)
                self.backlog.clear()
            while self.backlog:
                del self.backlog[:self.upstream.send(self.backlog)]
        except BlockingIOError:
            pass
        except OSError:
            self.pending.clear()
            self.aside.clear()
            self.backlog.clear()

    def next_due(self) -> float | None:
        dues = [due for due, _ in self.aside] + ([self.pending[0][0]] if self.pending else [])
        return min(dues) if dues else None

    def idle(self) -> bool:
        return not self.pending and not self.aside and not self.backlog

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for sock in (self.client, self.upstream):
                try:
                    self.proxy.selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()


class Proxy:
    """A TCP proxy in front of a destination; ``faults`` maps "main" or a channel id
    to the :class:`Fault` its connection gets (the others are relayed unchanged)."""

    def __init__(self, faults: dict | None = None, *, channel_header=True) -> None:
        self.faults = faults or {}
        self.channel_header = channel_header
        self.links: list[Link] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self.selector: selectors.BaseSelector | None = None
        self.error: BaseException | None = None

    def start(self, upstream: str) -> str:
        _, host, port = upstream.split(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._loop, name="test proxy", daemon=True)
        self._thread.start()
        return f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive(), "the proxy thread did not stop"
        for link in self.links:
            link.close()
        if self.selector is not None:
            self.selector.close()
        if self._listener is not None:
            self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.error is not None:
            raise AssertionError(f"the test proxy failed: {self.error!r}") from self.error

    def _loop(self) -> None:
        sel = self.selector = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop:
                dues = [d for link in self.links if not link.closed
                        if (d := link.next_due()) is not None]
                timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
                for key, events in sel.select(timeout):
                    if key.data == "wake":
                        return
                    if key.data == "accept":
                        self._accept(sel)
                    elif events & selectors.EVENT_READ:
                        link, side = key.data
                        self._readable(sel, link, side)
                    # (writable: the destination's socket has room; the flush below uses it)
                for link in self.links:
                    if not link.closed:
                        link._flush()
                        if link.client_eof and link.idle() and not (link.cut_off
                                                                      or link.holding):
                            link.cut()
                        self._watch(sel, link)
        except BaseException as exc:       # a proxy bug must not pass for a fastmfd one
            self.error = exc
            raise

    def _accept(self, sel) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection(self._upstream)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.setblocking(False)     # see _watch
        link = Link(self, client, upstream)
        self.links.append(link)
        sel.register(client, selectors.EVENT_READ, (link, "client"))
        sel.register(upstream, selectors.EVENT_READ, (link, "upstream"))

    def _watch(self, sel, link: Link) -> None:
        """What to wait for on ``link``'s sockets. While bytes wait for room at the
        destination, wait for that room and read nothing more from this client —
        never block the one relay thread on it. Like a network path, each connection
        then has flow control of its own: one the destination does not read (a
        receive worker held at its SYNC until another channel reaches its own) holds
        back that connection's client, and no other connection."""
        if link.closed:
            return
        waiting = bool(link.backlog)
        client = 0 if link.client_eof or waiting or link.stalled else selectors.EVENT_READ
        upstream = ((0 if link.upstream_eof else selectors.EVENT_READ)
                    | (selectors.EVENT_WRITE if waiting else 0))
        for sock, side, events in ((link.client, "client", client),
                                   (link.upstream, "upstream", upstream)):
            try:
                if sel.get_key(sock).events == events:
                    continue
                sel.unregister(sock)
            except KeyError:
                pass
            if events:
                sel.register(sock, events, (link, side))

    def _readable(self, sel, link: Link, side: str) -> None:
        sock = link.client if side == "client" else link.upstream
        try:
            data = sock.recv(1 << 20) if not link.closed else b""
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            try:
                sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            if side == "client":
                link.client_eof = True
            elif not link.closed:
                link.upstream_eof = True
                # The destination ended its side: pass the end (or its reset) on.
                try:
                    link.client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            return
        if side == "client":
            self._from_client(link, data)
        else:
            self._from_upstream(link, data)

    def _from_client(self, link: Link, data: bytes) -> None:
        """The client's bytes: through the link's fault (a subclass may watch them)."""
        link.from_client(data)

    def _from_upstream(self, link: Link, data: bytes) -> None:
        """The destination's bytes: back to the client, unchanged."""
        try:
            link.client.sendall(data)
        except OSError:
            pass


# ---------------------------------------------------------------- a live workload

def keep_writing(handle, stop, running, seed: int, block: int = 16) -> None:
    """A workload in its own process: until ``stop`` is set, rewrite random blocks of
    ``block`` pages of the region (one in ten with zeros, the others with random
    bytes, which no compression shrinks) and mark them dirty. Each write is marked
    after it lands: once this process has exited, every write it made is in the
    dirty bitmap."""
    region = fastmfd.Region.attach(handle)
    pages = region.array.reshape(-1, region.page_size)
    rng = np.random.default_rng(seed)
    size = block * region.page_size
    try:
        while not stop.is_set():
            first = int(rng.integers(len(pages) - block + 1))
            if rng.random() < 0.1:
                pages[first:first + block] = 0
            else:
                pages[first:first + block] = np.frombuffer(rng.bytes(size), np.uint8).reshape(
                    block, region.page_size)
            region.mark_dirty(first * region.page_size, size)
            running.set()
    finally:
        del pages
        region.close()


# ---------------------------------------------------------------- a source driven by hand

def setup_message(config: fastmfd.MigrationConfig, uuid: bytes, regions: dict[str, int],
                  devices: list[tuple[str, int]] = ()) -> dict:
    """The SETUP a real Source would send for ``config``."""
    return Setup(uuid=uuid, **config.session_values(),
                 regions=tuple(RegionSpec(n, s) for n, s in regions.items()),
                 devices=tuple(DeviceSpec(i, n) for i, n in devices)).encode()


def hello(channel_id: int, uuid: bytes, *, channel_type=_core.CHANNEL_MULTIFD,
          magic=_core.MULTIFD_MAGIC, version=1) -> bytes:
    """A multifd channel's channel header and init packet, any field overridable."""
    header = bytearray(_core.CHANNEL_HEADER_SIZE)
    struct.pack_into(">QI", header, 0, 4, channel_type)
    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, uuid, channel_id)
    struct.pack_into(">II", init, 0, magic, version)
    return bytes(header + init)


def ram_packet(config: fastmfd.MigrationConfig, region: str, pages: list[int],
               fill: int) -> bytes:
    """An uncompressed RAM packet writing ``pages`` of ``region`` with byte ``fill``."""
    codec = _core.RamPacketCodec(config.packet_pages, config.page_size)
    header = bytearray(codec.header_size)
    codec.encode(header, ramblock=region, normal=[p * config.page_size for p in pages])
    return bytes(header) + bytes([fill]) * (len(pages) * config.page_size)


class FakeSource:
    """The source side of the protocol, driven by hand: a main channel that sends
    SETUP, and channels that send whatever bytes a test wants."""

    def __init__(self, address: str, setup: dict, *, channel_header=True,
                 auth_key: bytes | None = None) -> None:
        target = parse_address(address).target
        assert isinstance(target, tuple), "a TCP address"
        self.target = target
        self.setup = setup
        self.channel_header = channel_header
        self.auth_key = auth_key
        self.sockets: list[socket.socket] = []
        self.main: socket.socket | None = None

    def connect(self, data: bytes = b"") -> socket.socket:
        sock = socket.create_connection(self.target, timeout=10)
        self.sockets.append(sock)
        if data:
            sock.sendall(data)
        return sock

    def open_main(self) -> tuple:
        """Send the main channel's start and SETUP; returns the reply (type, dict)."""
        from fastmfd.protocol.main_channel import Msg, encode_message, encode_preamble
        header = bytearray(_core.CHANNEL_HEADER_SIZE)
        _core.encode_channel_header(header, _core.CHANNEL_MAIN)
        start = (bytes(header) if self.channel_header else b"") + encode_preamble()
        if self.auth_key is None:
            self.main = self.connect(start + encode_message(Msg.SETUP, self.setup))
            return self.reply()
        from fastmfd.protocol.handshake import open_main_channel
        from fastmfd.protocol.security import ChannelSecurity
        self.main, ack = open_main_channel(self.connect(),
                                           ChannelSecurity(auth_key=self.auth_key),
                                           Setup.decode(self.setup), self.channel_header,
                                           str(self.target))
        return Msg.SETUP_ACK, {"stall_timeout": ack.stall_timeout}

    def reply(self) -> tuple:
        """The next message on the main channel: (Msg, decoded dict)."""
        from fastmfd.protocol.main_channel import read_message
        from fastmfd.protocol.main_channel import decode_control
        kind, body = read_message(self.main, 0)
        return kind, decode_control(kind, body)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
