"""Devices, loaders and packet rewriters for the device-state tests.

Loaders run in the destination's reassembly process, so they live here, in a
module that process can import cheaply (no pytest), not in a test module.
"""

from __future__ import annotations

import pickle
import signal
import struct
import threading
import time

import numpy as np

import fastmfd
from fastmfd import _core
from migration_support import Migration, Packets, device_packet, make_region


def migrate_devices(config: fastmfd.MigrationConfig, devices, loaders=None, *, proxy=None,
                    live=False, on_stop=None):
    """Migrate a 1 MiB region and ``devices`` (``loaders`` by (idstr, instance)), check
    the region arrived whole, and return (source stats, destination result)."""
    region = make_region("ram", 1 << 20, seed=3)
    try:
        with Migration(config, proxy=proxy) as m:
            m.source.add_region(region)
            for device in devices:
                m.source.add_device(device)
            for (idstr, instance), loader in (loaders or {}).items():
                m.destination.add_loader(idstr, instance, loader)
            stats, result = m.run(live=live, on_stop=on_stop).ok()
            assert np.array_equal(result.regions["ram"].array, region.array)
            return stats, result
    finally:
        region.close()


class OddDevice:
    """``data`` read back in pieces of the sizes in ``sizes``, taken in turn (and
    cut to the buffer), the way a device's data fd returns what it has."""

    def __init__(self, idstr: str, instance_id: int, data: bytes, sizes: list[int]) -> None:
        self.idstr, self.instance_id = idstr, instance_id
        self.data, self.sizes = memoryview(data), sizes
        self.offset = self.turn = 0

    def read_state(self, buf) -> int:
        n = min(self.sizes[self.turn % len(self.sizes)], len(buf), len(self.data) - self.offset)
        buf[:n] = self.data[self.offset:self.offset + n]
        self.offset += n
        self.turn += 1
        return n


class BrokenDevice:
    """Gives ``good`` chunks of 100 bytes, then raises."""

    def __init__(self, idstr: str, instance_id: int, good: int) -> None:
        self.idstr, self.instance_id, self.good = idstr, instance_id, good
        self.raised_at: float | None = None

    def read_state(self, buf) -> int:
        if self.good == 0:
            self.raised_at = time.monotonic()
            raise OSError("the device's data fd failed")
        self.good -= 1
        buf[:100] = b"d" * 100
        return 100


class StallingDevice:
    """Gives ``chunks`` chunks of 100 bytes; the second read takes ``stall`` seconds,
    as a device's data fd does when the device is slow to produce its state."""

    def __init__(self, idstr: str, instance_id: int, chunks: int, stall: float) -> None:
        self.idstr, self.instance_id = idstr, instance_id
        self.chunks, self.stall, self.reads = chunks, stall, 0

    def read_state(self, buf) -> int:
        self.reads += 1
        if self.reads == 2:
            time.sleep(self.stall)
        if self.reads > self.chunks:
            return 0
        buf[:100] = b"s" * 100
        return 100


class BlockedDevice:
    """Gives one chunk, then blocks in read_state() until ``release`` is set, as a
    device whose data fd never answers (a FIFO nobody writes)."""

    def __init__(self, idstr: str, instance_id: int) -> None:
        self.idstr, self.instance_id = idstr, instance_id
        self.release = threading.Event()
        self.blocked_at: float | None = None
        self.reads = 0

    def read_state(self, buf) -> int:
        self.reads += 1
        if self.reads == 1:
            buf[:100] = b"b" * 100
            return 100
        self.blocked_at = time.monotonic()
        self.release.wait()
        return 0


class BrokenLoader:
    """Accepts ``good`` chunks, then raises on the next one."""

    def __init__(self, good: int) -> None:
        self.good = good

    def load_state_buffer(self, data) -> None:
        if self.good == 0:
            raise ValueError("the device rejected its state")
        self.good -= 1

    def load_finish(self):
        return None


class KeepingLoader:
    """Keeps what it is given instead of copying it: each chunk's ``data`` itself,
    or (``export``) a buffer of it, as ``numpy.frombuffer(data)`` would hold;
    ``load_finish`` joins what it kept."""

    def __init__(self, export: bool = False) -> None:
        self.export = export
        self.kept: list = []

    def load_state_buffer(self, data) -> None:
        self.kept.append(pickle.PickleBuffer(data) if self.export else data)

    def load_finish(self) -> bytes:
        return b"".join(bytes(kept) for kept in self.kept)


class ChunkRewriter(Packets):
    """Pass a channel's packets through ``rewrite(packet) -> bytes | None`` when they
    carry a chunk of ``device`` (uncompressed only); everything else goes on as is.
    ``rewrite`` returns the bytes to send instead (``None`` drops the packet)."""

    def __init__(self, config, device: tuple[str, int], rewrite) -> None:
        super().__init__(config, self._on_packet)
        self.device = device
        self.rewrite = rewrite

    def _on_packet(self, link, packet):
        if not (packet.is_device and packet.device == self.device):
            link.send(packet.raw)
            return
        replacement = self.rewrite(packet)
        if replacement != packet.raw:
            self.fire()
        if replacement is not None:
            link.send(replacement)


def rebuild(packet, *, idx: int | None = None, flags: int | None = None,
            data: bytes | None = None, idstr: str | None = None) -> bytes:
    """The device packet with some of its chunk fields replaced, re-encoded."""
    old_idx, old_flags = packet.chunk
    name, instance = packet.device
    return device_packet(idstr if idstr is not None else name, instance,
                         old_idx if idx is None else idx,
                         bytes(packet.payload[_core.CHUNK_HEADER_SIZE:]) if data is None
                         else data,
                         last=bool((old_flags if flags is None else flags)
                                   & _core.CHUNK_FLAG_LAST))


def chunk_idx(packet) -> int:
    return struct.unpack_from(">I", packet.payload, 4)[0]


def at_idx(which: int, **changes):
    """A ``ChunkRewriter`` rewrite: chunk ``which`` re-encoded with ``changes`` (see
    :func:`rebuild`), every other chunk unchanged."""
    return lambda packet: rebuild(packet, **changes) if chunk_idx(packet) == which \
        else packet.raw


class HoldFirstChunks(Packets):
    """Hold back every device's chunk idx 0 by ``seconds`` while the packets behind
    it (on this channel and the others) go on, so the chunks after it arrive
    first. Each chunk seen is logged as (channel, idstr, idx, released) in ``log``,
    ``released`` being the ``time.monotonic()`` at which it is passed on."""

    def __init__(self, config, seconds: float, channel: int, log: list) -> None:
        super().__init__(config, self._on_packet)
        self.seconds, self.channel, self.log = seconds, channel, log

    def _on_packet(self, link, packet):
        delay = 0.0
        if packet.is_device:
            idx = chunk_idx(packet)
            delay = self.seconds if idx == 0 else 0.0
            self.log.append((self.channel, packet.device[0], idx, time.monotonic() + delay))
        if delay:
            self.fire()
        link.send(packet.raw, delay=delay, overtakable=bool(delay))


class BigResultLoader:
    """A loader whose ``load_finish`` waits for a byte on the FIFO at ``gate``, then
    returns ``size`` bytes: its ("loaded", ...) report is long to write, and starts
    when the test says so."""

    def __init__(self, gate: str, size: int) -> None:
        self.gate, self.size = gate, size

    def load_state_buffer(self, data) -> None:
        pass

    def load_finish(self) -> bytes:
        with open(self.gate, "rb") as fifo:
            fifo.read(1)
        return bytes(self.size)


class StopsHalfwayThroughItsReport:
    """A loader whose process stops itself (SIGSTOP) once it has written the first
    bytes of its next long report: its ("loaded", ...) report, carrying the
    ``size`` bytes ``load_finish`` returns, whose length multiprocessing writes
    on its own before the body.

    The stop is sent to the calling thread, not the process: a process-directed
    SIGSTOP is taken by whichever thread the kernel wakes for it (the main thread,
    asleep in a read), and until that thread ran, this one went on and wrote the
    body, so now and then the report arrived whole and both sides succeeded."""

    def __init__(self, size: int) -> None:
        self.size = size

    def load_state_buffer(self, data) -> None:
        pass

    def load_finish(self) -> bytes:
        from multiprocessing import connection
        real = connection.Connection._send

        def send(conn, buf, *args):
            real(conn, buf, *args)
            if len(buf) == 4:           # the length of a long message: its body follows
                connection.Connection._send = real
                signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        connection.Connection._send = send
        return bytes(self.size)


class StuckLoader:
    """A loader whose ``load_finish`` never returns (a flush to a disk that hangs)."""

    def load_state_buffer(self, data) -> None:
        pass

    def load_finish(self) -> bytes:
        time.sleep(3600)
        return b""


class PacedLoader(fastmfd.CollectLoader):
    """Takes ``pause`` seconds over each chunk (a device that is slow to load)."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    def load_state_buffer(self, data) -> None:
        time.sleep(self.pause)
        super().load_state_buffer(data)


class ChurningDevice:
    """A device that always says it has ``claimed`` bytes to send live but gives one
    small chunk per live round (it dirties its state as fast as it sends it, as a
    busy device does); nothing is left at the stop. Its stream: the chunks in order."""

    def __init__(self, idstr: str, instance_id: int, claimed: int) -> None:
        self.idstr, self.instance_id, self.claimed = idstr, instance_id, claimed
        self.sent = 0
        self.gave_this_round = False

    def state_pending(self) -> int:
        return self.claimed

    def save_live_iterate(self, buf) -> int:
        if self.gave_this_round:        # the next call is in the next round
            self.gave_this_round = False
            return 0
        self.gave_this_round = True
        data = b"chunk %d;" % self.sent
        buf[:len(data)] = data
        self.sent += 1
        return len(data)

    def read_state(self, buf) -> int:
        return 0


class StampingLoader(fastmfd.VerifyLoader):
    """A VerifyLoader that appends ``event monotonic-time`` lines to the file
    ``log``: "initial" when its first ``precopy_size`` bytes are loaded, "approved"
    when the destination approves the switchover (``precopy_loaded``), "config"
    and "finish". CLOCK_MONOTONIC is one clock for every process of the machine,
    so the test can order these against the source's own events."""

    def __init__(self, log: str, size: int, *, write_rate=None, precopy_size=0,
                 region=None, source_region=None) -> None:
        super().__init__(size, write_rate=write_rate, precopy_size=precopy_size)
        self.log = log
        self.region, self.source_region = region, source_region

    def _stamp(self, event: str) -> None:
        with open(self.log, "a") as out:
            out.write(f"{event} {time.monotonic()!r}\n")

    def load_state_buffer(self, data) -> None:
        before = self._offset
        super().load_state_buffer(data)
        if before < self.precopy_size <= self._offset:
            self._stamp("initial")

    def precopy_loaded(self) -> None:
        super().precopy_loaded()
        self._stamp("approved")

    def load_config(self, data) -> None:
        if self.region is not None:
            # Whether all RAM was in when the config came: the destination's region
            # against the source's, both attached here.
            mine, theirs = (fastmfd.Region.attach(h) for h in (self.region, self.source_region))
            try:
                whole = bool((mine.array == theirs.array).all())
            finally:
                mine.close()
                theirs.close()
            self._stamp(f"config-ram-{'whole' if whole else 'partial'}")
        else:
            self._stamp("config")

    def load_finish(self) -> int:
        self._stamp("finish")
        return super().load_finish()


def read_stamps(log: str) -> dict[str, float]:
    """The events of a StampingLoader's log: event -> time (each once)."""
    stamps: dict[str, float] = {}
    with open(log) as lines:
        for line in lines:
            event, when = line.split()
            assert event not in stamps, f"{event} logged twice"
            stamps[event] = float(when)
    return stamps


class ConfigRecorder:
    """Records the calls it gets; ``load_finish`` returns them:
    ("data", bytes) per chunk, ("config", bytes), ("finish",)."""

    def __init__(self) -> None:
        self.calls: list = []

    def load_state_buffer(self, data) -> None:
        self.calls.append(("data", bytes(data)))

    def load_config(self, data) -> None:
        self.calls.append(("config", bytes(data)))

    def load_finish(self) -> list:
        self.calls.append(("finish",))
        return self.calls


class MiscountingDevice:
    """Writes 10 bytes once and returns ``count`` for them (something other than an
    int, say), then 0 — with ``precopy``, state_pending() says ``pending`` and the
    10 bytes go live instead."""

    def __init__(self, idstr: str, instance_id: int, count, pending=None) -> None:
        self.idstr, self.instance_id, self.count = idstr, instance_id, count
        self.pending, self.done = pending, False
        if pending is not None:
            self.state_pending = lambda: 0 if self.done else self.pending
            self.save_live_iterate = self.read_state

    def read_state(self, buf) -> int:
        if self.done:
            return 0
        self.done = True
        buf[:10] = b"0123456789"
        return self.count


class FinishingLoader:
    """A loader whose ``load_finish`` raises (``result`` None) or returns ``result``
    (which may not pickle)."""

    def __init__(self, result=None) -> None:
        self.result = result

    def load_state_buffer(self, data) -> None:
        pass

    def load_finish(self):
        if self.result is None:
            raise OSError("the device would not resume")
        return self.result()


class HangingDevice:
    """A precopy device (state_pending, save_live_iterate) with save_setup and
    config_state, whose ``hook`` blocks once called (at its second call for
    state_pending, so the first live round begins) until ``release`` is set."""

    def __init__(self, idstr: str, instance_id: int, hook: str) -> None:
        self.idstr, self.instance_id, self.hook = idstr, instance_id, hook
        self.release = threading.Event()
        self.blocked_at: float | None = None
        self.calls = {"state_pending": 0}
        self.live, self.left = 2, 10_000

    def _maybe_hang(self, hook: str) -> None:
        self.calls[hook] = self.calls.get(hook, 0) + 1
        if hook == self.hook and (hook != "state_pending" or self.calls[hook] > 1):
            self.blocked_at = time.monotonic()
            self.release.wait()

    def save_setup(self) -> None:
        self._maybe_hang("save_setup")

    def state_pending(self) -> int:
        self._maybe_hang("state_pending")
        return 100 if self.live else 0

    def save_live_iterate(self, buf) -> int:
        self._maybe_hang("save_live_iterate")
        if not self.live:
            return 0
        self.live -= 1
        buf[:10] = b"L" * 10
        return 10

    def read_state(self, buf) -> int:
        self._maybe_hang("read_state")
        n = min(len(buf), self.left)
        buf[:n] = b"x" * n
        self.left -= n
        return n

    def config_state(self) -> bytes:
        self._maybe_hang("config_state")
        return b"c"


class HangingLoader:
    """A loader whose ``hook`` (load_state_buffer: at its third chunk) never returns."""

    def __init__(self, hook: str) -> None:
        self.hook, self.chunks = hook, 0

    def _maybe_hang(self, hook: str) -> None:
        if hook == self.hook:
            time.sleep(3600)

    def load_state_buffer(self, data) -> None:
        self.chunks += 1
        if self.chunks == 3:
            self._maybe_hang("load_state_buffer")

    def load_config(self, data) -> None:
        self._maybe_hang("load_config")

    def precopy_loaded(self) -> None:
        self._maybe_hang("precopy_loaded")

    def load_finish(self) -> None:
        self._maybe_hang("load_finish")


class LockedLoader(fastmfd.CollectLoader):
    """A loader holding a lock: it does not pickle, so cannot reach the reassembly
    process."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
