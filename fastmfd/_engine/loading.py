"""The destination's device-state side: :class:`DeviceLoading`.

::

    Receiving (main process)                        reassembly process
      SETUP with devices -> DeviceLoading:
        the pool (sparse shm), the descriptor pipe ──▶ ReassemblyParams
      receive workers: chunk -> slot -> descriptor ──▶ loaders, in idx order
      DEVICE_STATE (old way): body -> slot -> descriptor ──▶
      PRECOPY_SENT(counts) -> AwaitPrecopy ──────────▶
        ◀── PrecopyLoading: steps towards it, the loaders' deadline meanwhile
        ◀── PrecopyLoaded: SWITCHOVER_ACK to the source
      all RAM in (config_after_ram) -> RamLoaded ────▶ config chunks load
        ◀── DeviceLoaded per device, Drained: totals checked against COMPLETE
        ◀── LoaderBusy: what holds a loader up, for the deadline's error

:mod:`.receiving` owns the session and its deadlines; this module owns what
only sessions with devices have, the loaders' deadline among it.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import _core
from ..devices import CollectLoader, Loader, WriteBudget, device_key
from ..errors import ConfigError, ProtocolError
from ..protocol.control import (AwaitPrecopy, DeviceLoaded, Drained, LoaderBusy, PrecopyLoaded,
                                PrecopyLoading, RamLoaded, ReassemblyParams)
from ..protocol.main_channel import (OLD_WAY_CHECKSUM, OLD_WAY_PREFIX, MainChannel, Msg,
                                     PrecopySent, old_way_checksum)
from ..protocol.setup import Setup
from . import control_pickling
from .admission import DoorWorkers
from .liveness import Progress, first_few, process_stopped, stall_error
from .processes import ChildSet
from .reassembly import plan_pool, pool_bytes
from .session import SessionResources

__all__ = ["DeviceLoading", "old_way_not_here"]


def _collect_budget(max_memory: int | None, left: int) -> WriteBudget | None:
    """What the CollectLoaders made for devices given no loader may keep together:
    under ``max_memory``, what the regions, the receive channels (their buffers and
    worker processes), the device-state buffers and the greeting spares leave."""
    if max_memory is None:
        return None
    return WriteBudget(left, f"{left} bytes, what max_memory ({max_memory}) leaves after the "
                             f"regions, the receive channels (their buffers and worker "
                             f"processes), the device-state buffers and the greeting spares "
                             f"(for all devices given no loader; a smaller max_queued_bytes "
                             f"leaves more)")


def old_way_not_here() -> ProtocolError:
    return ProtocolError("DEVICE_STATE on the main channel, but device state travels on the "
                         "multifd channels in this session", field="type",
                         received="DEVICE_STATE", expected="not here")


class LoadingParts(Protocol):
    """What device loading takes of the destination's parts (receiving's
    DestinationParts): the reassembly process, the loaders, the caps."""
    reassembly: ChildSet
    loaders: dict[tuple[str, int], Loader]
    queued_cap: int | None
    max_memory: int | None
    resources: SessionResources


class DeviceLoading:
    """One session's device streams at the destination: the pool they arrive in,
    the reassembly process that loads them, and what it reported."""

    def __init__(self, setup: Setup, parts: LoadingParts, budget: int, stall: float,
                 door: DoorWorkers) -> None:
        self.setup, self._reassembly = setup, parts.reassembly[0]
        self.results: dict[int, object] = {}
        self.chunks: dict[int, int] = {}
        self.load_seconds: dict[int, float] = {}
        self.busy: dict[int, str] = {}           # device -> what holds its loader (LoaderBusy)
        self.precopy_steps = 0                  # towards SWITCHOVER_ACK (PrecopyLoading)
        self.drained = False                    # the reassembly process found nothing missing
        self.precopy_awaited = False            # PRECOPY_SENT came; SWITCHOVER_ACK not yet sent
        self.precopy_counts: list[int] = []     # PRECOPY_SENT's: chunks each device sent live
        self.old_way_chunks = self.old_way_bytes = 0
        self.stall = stall                      # the session's deadline (Receiving's)
        chunk_size = setup.chunk_size
        assert chunk_size is not None, "a session's SETUP is decoded strictly: it has one"
        cap = setup.max_queued_bytes
        if parts.queued_cap is not None:
            cap = min(cap, parts.queued_cap)
            if cap < chunk_size:
                raise ConfigError(f"this destination's max_queued_bytes ({cap}) cannot hold one "
                                  f"device chunk of the source's device_chunk_size "
                                  f"({setup.chunk_size})")
        slot_size = chunk_size + _core.CHUNK_HEADER_SIZE
        # Sized for the worst case the caps allow, within what is left of the memory
        # budget (a smaller out-of-order cap if need be), and sparse: a slot takes
        # memory when a chunk first arrives in it, and then all of it (populated
        # whole, so that a full /dev/shm is an error rather than a SIGBUS).
        wanted = cap
        cap, nslots = plan_pool(len(setup.devices), cap, chunk_size,
                                setup.total_channels, budget)
        self.pool = parts.resources.own(_core.BufferPool.create(nslots, slot_size,
                                                                tag="dest-pool", sparse=True))
        desc_r, self.desc_w = os.pipe()
        parts.resources.fds.append(self.desc_w)
        # The greeting spares from what the pool leaves (what they hold is the
        # CollectLoaders' no more), then the CollectLoaders from what those leave.
        left = budget - pool_bytes(nslots, chunk_size)
        collect = _collect_budget(parts.max_memory, left - door.fit(left))
        loaders = tuple((device_key(*d.key), parts.loaders[d.key] if d.key in parts.loaders
                         else CollectLoader(collect)) for d in setup.devices)
        try:
            self._reassembly.start_session(
                ReassemblyParams(self.pool.name, cap, loaders, setup.config_after_ram,
                                 self.stall,
                                 cap_cut_from=wanted if cap < wanted else 0), [desc_r])
        except (TypeError, pickle.PicklingError) as exc:
            raise _whose_loader(loaders) or exc
        finally:
            os.close(desc_r)

    # ------------------------------------------------------------ progress
    @property
    def all_loaded(self) -> bool:
        return self.drained and len(self.results) == len(self.setup.devices)

    def check_progress(self, progress: Progress, channels_ended: bool) -> None:
        """Once every channel ended, or while the source waits for SWITCHOVER_ACK,
        the loaders owe progress (Drained says every chunk arrived, not that every
        device is loaded: a load_finish() still running owes its DeviceLoaded), and
        so does a stopped reassembly process."""
        if self.all_loaded:
            return
        pid = self._reassembly.process.pid
        owed = channels_ended or self.precopy_awaited or process_stopped(pid)
        if progress.stalled("reassembly", owed, self.signature()):
            raise stall_error(self._reassembly.name, self.stall, pid, self.stall_detail())

    def stall_detail(self) -> str:
        """Which loaders are held up, by what, for a "no progress" error."""
        held = self.held_up()
        return f" ({held})" if held else ""

    def held_up(self) -> str:
        """The loader calls that reported running long (LoaderBusy), the first few
        named ("" if none)."""
        calls = [f"{device_key(*self.setup.devices[i].key)}: {what}"
                 for i, what in sorted(self.busy.items())]
        return first_few(calls) if calls else ""

    def signature(self) -> object:
        """Changes whenever the loaders make progress: while SWITCHOVER_ACK is owed,
        towards it (PrecopyLoading's steps), not a chunk that arrived (a loader stuck in
        a live chunk while its device kept sending one a round held the switchover
        until the buffers filled: hours, with small chunks); else slots freed, devices
        done."""
        if self.precopy_awaited:
            return self.precopy_steps
        return (len(self.results), self.pool.free_count)

    # ------------------------------------------------------------ events
    def on_report(self, report: Any, main: MainChannel) -> None:
        """A report of the reassembly process."""
        if isinstance(report, DeviceLoaded):
            self.results[report.device] = report.result
            self.load_seconds[report.device] = report.seconds
            self.chunks[report.device] = report.chunks
        elif isinstance(report, Drained):
            self.drained = True
        elif isinstance(report, PrecopyLoading):
            self.precopy_steps = report.steps
        elif isinstance(report, LoaderBusy):
            if report.what is None:
                self.busy.pop(report.device, None)
            else:
                self.busy[report.device] = report.what
        elif isinstance(report, PrecopyLoaded):
            self.precopy_awaited = False
            main.send(Msg.SWITCHOVER_ACK)

    def on_precopy_sent(self, payload: PrecopySent) -> None:
        """switchover_ack: answer once every chunk the source sent live is loaded."""
        self.precopy_awaited = True
        self.precopy_counts = payload.device_chunks
        self._reassembly.send(AwaitPrecopy(tuple(payload.device_chunks)))

    def on_complete(self, counts: list[int]) -> None:
        """COMPLETE's chunk counts against PRECOPY_SENT's: the source stops only once
        SWITCHOVER_ACK came, and sends each device's last chunk only then, so what it
        sent live is fewer chunks than it sent in all (a COMPLETE that broke this was
        taken: the session succeeded, never acked, precopy_loaded() never called)."""
        for i, live in enumerate(self.precopy_counts):
            if live >= counts[i]:       # (one count per device: check_chunk_counts)
                raise ProtocolError(
                    f"device {device_key(*self.setup.devices[i].key)}: PRECOPY_SENT counted "
                    f"{live} chunks sent live, COMPLETE {counts[i]} in all, the last one "
                    f"sent after the switchover", field="device_chunks", received=live,
                    expected=f"< {counts[i]}")
        if self.precopy_awaited:
            raise ProtocolError("main channel: COMPLETE while SWITCHOVER_ACK is owed (the "
                                "chunks PRECOPY_SENT counted are not all loaded): a source "
                                "stops only once acknowledged", field="type",
                                received="COMPLETE", expected="SWITCHOVER_ACK first")

    def ram_loaded(self) -> None:
        """All RAM is in: config chunks may load (config_after_ram)."""
        if self.setup.config_after_ram:
            self._reassembly.send(RamLoaded())

    def on_old_way_chunk(self, body: bytes, main: MainChannel, living: Callable[[], None],
                         poll: float) -> None:
        """A DEVICE_STATE message: its chunk into a slot, its descriptor to the pipe.
        ``living()`` is called every ``poll`` seconds while no slot is free (it raises
        to give up): the session goes on living, and fails rather than wait past the
        deadline. The reassembly process's reports are taken meanwhile (this wait
        holds the loop that reads them): one may say which loader call holds the
        slots, for the error, or that a loader failed."""
        devices = self.setup.devices
        if self.setup.channel_header:
            raise old_way_not_here()
        if len(body) < OLD_WAY_PREFIX.size + _core.CHUNK_HEADER_SIZE:
            raise ProtocolError(f"DEVICE_STATE of {len(body)} bytes is shorter than its "
                                f"headers", field="length", received=len(body),
                                expected=OLD_WAY_PREFIX.size + _core.CHUNK_HEADER_SIZE)
        device = OLD_WAY_PREFIX.unpack_from(body)[0]
        if device >= len(devices):
            raise ProtocolError(f"DEVICE_STATE for device number {device}, the session has "
                                f"{len(devices)}", field="device", received=device,
                                expected=f"< {len(devices)}")
        chunk = memoryview(body)[OLD_WAY_PREFIX.size:]
        if self.setup.checksum:
            chunk, trailer = chunk[:-OLD_WAY_CHECKSUM.size], chunk[-OLD_WAY_CHECKSUM.size:]
            expected = old_way_checksum(body[:OLD_WAY_PREFIX.size], chunk)
            if len(chunk) < _core.CHUNK_HEADER_SIZE or trailer != expected:
                raise ProtocolError(
                    f"DEVICE_STATE field 'checksum': received {bytes(trailer).hex()}, "
                    f"expected {expected.hex()}", field="checksum",
                    received=bytes(trailer).hex(), expected=expected.hex())
        idx, flags = _core.decode_chunk_header(chunk)
        since = time.monotonic()
        while (slot := self.pool.acquire(timeout=poll)) is None:
            living()
            while (report := self._reassembly.next_report()) is not None:
                self.on_report(report, main)
            if not self._reassembly.process.is_alive():
                raise self._reassembly.death_error()
            if time.monotonic() > since + self.stall:
                held = self.held_up()
                detail = f"no device-state buffer came free{'; ' + held if held else ''}"
                raise stall_error(self._reassembly.name, self.stall, self._reassembly.process.pid,
                                  f" ({detail})")
        self.pool.populate(slot)
        with self.pool.view(slot) as view:
            view[:len(chunk)] = chunk
        try:
            os.write(self.desc_w, _core.pack_descriptor(device, idx, flags, slot, len(chunk), 0))
        except BrokenPipeError as exc:      # only the reassembly process reads it: gone
            raise self._reassembly.lost(exc) from None
        self.old_way_chunks += 1
        self.old_way_bytes += len(chunk)

    # ------------------------------------------------------------ results
    def check_totals(self, counts: list[int]) -> None:
        """Each device loaded as many chunks as the source's COMPLETE says it sent."""
        for i, device in enumerate(self.setup.devices):
            theirs = counts[i]          # one per device (check_chunk_counts)
            if theirs != self.chunks.get(i):
                raise ProtocolError(f"device {device_key(*device.key)}: the source sent "
                                    f"{theirs} chunks, {self.chunks.get(i)} were "
                                    f"loaded", field="device_chunks",
                                    received=self.chunks.get(i), expected=theirs)

    # In SETUP's order (the source's add_device order), as the regions are: the order
    # the loaders finished in differed from one run to the next.
    def load_seconds_by_name(self) -> dict[str, float]:
        return {device_key(*self.setup.devices[i].key): self.load_seconds[i]
                for i in sorted(self.load_seconds)}

    def results_by_key(self) -> dict[tuple[str, int], object]:
        return {self.setup.devices[i].key: self.results[i] for i in sorted(self.results)}


def _whose_loader(loaders: tuple[tuple[str, Loader], ...]) -> TypeError | None:
    """The loaders went to the reassembly process in one message, which did not
    pickle: the first loader that does not pickle, named (the pickler's error named
    only what it met, a lock, say), or None if each does on its own."""
    for name, loader in loaders:
        try:
            control_pickling.dumps(loader)
        except (TypeError, pickle.PicklingError) as exc:
            return TypeError(f"the loader of device {name}: {exc}")
    return None


def check_chunk_counts(message: str, counts: list[int], ndevices: int) -> None:
    """A PRECOPY_SENT's or COMPLETE's chunk counts: one per device of the session."""
    if len(counts) != ndevices:
        raise ProtocolError(f"main channel: {message} counts chunks of {len(counts)} "
                            f"devices, the session has {ndevices}", field="device_chunks",
                            received=len(counts), expected=ndevices)
