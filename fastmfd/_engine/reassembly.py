"""The reassembly process: device chunks, in order, to their loaders.

::

    receive workers (any channel)          reassembly process
      chunk -> pool slot                     reader (main thread): descriptors from the pipe,
      descriptor -> pipe ───────────────▶      per device: duplicates, order, LAST, the
      (24 bytes, atomic)                       out-of-order cap; wakes the loader thread
    destination main                         loader thread per device: chunk idx 0, 1, 2, ...
                                               load_state_buffer(view of the slot), release it
      AwaitPrecopy(counts) ─── conn ──▶        (switchover_ack) once every device loaded
                          ◀── conn ────          its count: precopy_loaded(), PrecopyLoaded
      RamLoaded           ─── conn ──▶         (config_after_ram) the LAST chunks may load
                          ◀── conn ────        LAST chunk: load_config(), load_finish()
                                               -> DeviceLoaded
      Drained             ─── conn ───▶      every channel ended: read what is left in the
                          ◀── conn ────        pipe, check no chunk is missing, Drained
                          ◀── conn ────      Failed(text, traceback) on any failure

Chunks arrive in any order on any channel; each device's loader sees them
strictly by idx, in its own thread, so devices load in parallel. A chunk is
*out of order* while some lower idx of its device has not arrived. What those
chunks hold is capped per device (``max_queued_bytes``) and going over fails
the session — memory stays bounded and the buffer pool can never fill up with
chunks nobody can consume (the pool is sized above the caps), so nothing
deadlocks. A queued chunk holds a whole pool slot however few bytes it
carries, so each counts as a full chunk (``device_chunk_size``, what a slot
holds): counting chunk bytes, a stream of tiny chunks would take every slot
while far under the cap, and the receive worker bringing the missing chunk
would wait for a slot forever.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from multiprocessing import connection
from multiprocessing.connection import Connection

from .. import _core
from ..devices import Loader
from ..errors import ConfigError, MigrationError
from ..protocol.control import (AwaitPrecopy, DeviceLoaded, Drained, LoaderBusy, PrecopyLoaded,
                                PrecopyLoading, RamLoaded, ReassemblyParams, Stop)
from ..shm import SHM_LEFT
from ..threads import start_thread
from .processes import ChildPipe, run_child
from .session import Closable

__all__ = ["reassembly_main", "pool_slots_for", "plan_pool", "pool_bytes"]

CHUNK_HEADER = _core.CHUNK_HEADER_SIZE
# A loader waiting for its next chunk is woken by that chunk or by the stop
# (_Reassembler.stop_loading); this is only the deadline of its wait. Polling
# every 0.5 s instead cost 4096 idle loaders 0.4 CPU-s a second.
IDLE_WAKE = 10.0


_SLOT_BOOKKEEPING = 8          # a pool's next_free and held flag per slot (_shared.pxi)
_POOL_HEADER = 2 * 4096         # its header, and the rounding of its bookkeeping to a page


def pool_slots_for(ndevices: int, max_queued_bytes: int, chunk_size: int,
                   nchannels: int) -> int:
    """Slots the destination pool needs so out-of-order chunks can never fill it:
    every device's cap (a chunk counts ``chunk_size`` against it), plus two
    in-flight slots per channel and per loader."""
    per_device = max_queued_bytes // chunk_size + 1
    return ndevices * per_device + 2 * (nchannels + ndevices) + 2


def plan_pool(ndevices: int, max_queued_bytes: int, chunk_size: int, nchannels: int,
              budget: int) -> tuple[int, int]:
    """(out-of-order cap per device, slots) for a pool of at most ``budget`` bytes:
    the session's cap when it fits, else the largest cap that does. A slot
    holds a chunk and its header (rounded as the pool lays slots out), and
    takes 8 bytes of the pool's bookkeeping, which with the pool's header
    (a page, rounded up to pages) made a pool planned to the byte larger than
    ``budget``: by 48 MB for 6 million slots of 4 KiB chunks.
    ConfigError when not even one out-of-order chunk per device fits."""
    stride = _slot_stride(chunk_size)
    fits = max(0, budget - _POOL_HEADER) // stride
    cap = max_queued_bytes
    if pool_slots_for(ndevices, cap, chunk_size, nchannels) > fits:
        in_flight = pool_slots_for(ndevices, 0, chunk_size, nchannels) - ndevices
        cap = ((fits - in_flight) // ndevices - 1) * chunk_size
        if cap < chunk_size:
            need = pool_slots_for(ndevices, chunk_size, chunk_size, nchannels) * stride
            raise ConfigError(f"the device-state buffers of {ndevices} device(s) need at "
                              f"least {need} bytes of shared memory; {budget} are left "
                              f"(max_memory, or {SHM_LEFT})")
    return cap, pool_slots_for(ndevices, cap, chunk_size, nchannels)


def pool_bytes(slots: int, chunk_size: int) -> int:
    """The memory plan_pool counts a pool of ``slots`` takes."""
    return _POOL_HEADER + slots * _slot_stride(chunk_size)


def _slot_stride(chunk_size: int) -> int:
    return -(-(chunk_size + CHUNK_HEADER) // 64) * 64 + _SLOT_BOOKKEEPING


class _DeviceStream:
    """One device's chunks between arrival and loading."""

    def __init__(self, index: int, name: str, loader: Loader, cap: int, chunk_size: int,
                 cap_cut_from: int = 0) -> None:
        self.index, self.name, self.loader, self.cap = index, name, loader, cap
        self.cap_cut_from = cap_cut_from    # max_queued_bytes before the pool's room cut it
        self.chunk_size = chunk_size    # what a queued chunk counts against the cap
        self.pending: dict[int, tuple[int, int, int]] = {}   # idx -> (slot, length, flags)
        self.contiguous = 0         # every idx below this has arrived
        self.out_of_order = 0       # chunk_size per pending chunk at idx > contiguous
        self.last: int | None = None
        self.loaded_upto = 0        # next idx the loader takes
        self.loaded = 0             # chunks the loader has finished with
        self.loaded_at = 0.0        # when it last finished one
        self.finished = False
        self.cond = threading.Condition()
        self.calls = threading.Lock()  # one call into the loader at a time (precopy_loaded
                                        # comes from another thread than the chunks)
        self.calling: tuple[str, float] | None = None   # the loader's call under way, since
        self.reported: str | None = None                # what holds it, reported (LoaderBusy)

    def _cap_said(self) -> str:
        if not self.cap_cut_from:
            return str(self.cap)
        # Not the number the user gave, nor the default: where it came from.
        return (f"{self.cap}, cut from {self.cap_cut_from} to what the memory left for "
                f"device-state buffers holds: max_memory, or {SHM_LEFT}")

    def call(self, what: str, hook: str, *args: object) -> object:
        """The loader's ``hook``, timed (``what`` names it: "load_finish()", ...), so a
        slow one can be reported."""
        self.calling = (what, time.monotonic())
        try:
            return getattr(self.loader, hook)(*args)
        finally:
            self.calling = None

    def add(self, idx: int, flags: int, slot: int, length: int) -> None:
        """Queue a chunk (reader thread); raises on any rule it breaks, before taking
        it (the caller keeps the slot then)."""
        if length == CHUNK_HEADER and not flags & _core.CHUNK_FLAG_LAST:
            raise ValueError(f"empty chunk idx {idx}: only the last chunk may carry no data")
        with self.cond:
            if idx < self.contiguous or idx in self.pending:
                raise ValueError(f"duplicate chunk idx {idx}")
            if self.last is not None and idx > self.last:
                raise ValueError(f"chunk idx {idx} after the last chunk (idx {self.last})")
            if flags & _core.CHUNK_FLAG_LAST:
                beyond = [i for i in self.pending if i > idx]
                if beyond:
                    raise ValueError(f"chunk idx {min(beyond)} after the last chunk (idx {idx})")
            in_order = idx == self.contiguous
            if not in_order and self.out_of_order + self.chunk_size > self.cap:
                held = self.out_of_order // self.chunk_size + 1
                raise ValueError(f"{held} chunks queued out of order would hold "
                                 f"{self.out_of_order + self.chunk_size} bytes of buffer, more "
                                 f"than max_queued_bytes ({self._cap_said()}); waiting for chunk "
                                 f"idx {self.contiguous}")
            if flags & _core.CHUNK_FLAG_LAST:
                self.last = idx
            self.pending[idx] = (slot, length, flags)
            if in_order:
                while self.contiguous in self.pending:
                    if self.contiguous != idx:
                        self.out_of_order -= self.chunk_size
                    self.contiguous += 1
            else:
                self.out_of_order += self.chunk_size
            self.cond.notify()

    def wake(self) -> None:
        """Wake the loader waiting in :meth:`take` (to see that the session stops)."""
        with self.cond:
            self.cond.notify()

    def check_drained(self) -> None:
        """Every channel has ended: whatever has not arrived never will."""
        with self.cond:
            if self.last is None or self.contiguous <= self.last:
                missing = self.contiguous
                raise ValueError(f"missing chunk idx {missing}"
                                 + ("" if self.last is not None else " (no last chunk arrived)"))

    def take(self, stop: threading.Event) -> tuple[int, int, int] | None:
        """The next chunk in idx order (loader thread), or None when stopping."""
        with self.cond:
            while self.loaded_upto not in self.pending:
                if stop.is_set():
                    return None
                self.cond.wait(IDLE_WAKE)
            entry = self.pending.pop(self.loaded_upto)
            self.loaded_upto += 1
            return entry


def _end_loan(data: memoryview, what: str, device: str) -> None:
    """``data`` was lent to a loader's ``what`` for the call only: its slot is
    released and holds other chunks next, so a view the loader kept raises
    ValueError from now on rather than read them (its stream silently wrong).
    A buffer it still holds of ``data`` (``numpy.frombuffer(data)``) cannot be
    taken back: the session fails."""
    try:
        data.release()
    except BufferError:
        raise MigrationError(f"{what} kept a buffer of its data, which is valid only during "
                             f"the call (its memory holds other chunks next): a loader must "
                             f"copy what it keeps, e.g. bytes(data)", device=device) from None


class _Reassembler:
    def __init__(self, pipe: ChildPipe, params: ReassemblyParams, desc_fd: int) -> None:
        self.pipe = pipe
        self.desc_fd = desc_fd
        self.pool = _core.BufferPool.attach(params.pool)
        chunk_size = self.pool.slot_size - CHUNK_HEADER
        self.devices = [_DeviceStream(i, name, loader, params.max_queued_bytes, chunk_size,
                                      params.cap_cut_from)
                        for i, (name, loader) in enumerate(params.loaders)]
        self.stop = threading.Event()
        self.config_after_ram = params.config_after_ram
        self.ram_loaded = threading.Event()
        self.precopy_lock = threading.Lock()
        self.precopy_counts: tuple[int, ...] | None = None  # AwaitPrecopy's, until reported
        self.approving = False                              # precopy_loaded() calls began
        self.approved = 0                                   # ... and returned
        self.precopy_said = 0                               # PrecopyLoading's last steps
        self.precopy_since = 0.0                            # when AwaitPrecopy came
        self.results: dict[int, object] = {}
        self.threads = [threading.Thread(target=self._load, args=(d,), daemon=True)
                        for d in self.devices]
        self.slow_after = params.stall_timeout / 2

    def run(self) -> None:
        for started, thread in enumerate(self.threads):
            try:
                start_thread(thread)
            except MigrationError as exc:       # the thread limit
                del self.threads[started:]      # (close() joins those that started)
                raise MigrationError(f"a loader thread for each of the {len(self.devices)} "
                                     f"devices, {started} started: {exc}") from exc
        # Its own thread: a loader's call may run in this one (precopy_loaded(),
        # when AwaitPrecopy comes after the chunks it names are loaded).
        start_thread(threading.Thread(target=self._watch_loaders, daemon=True,
                                      name="fastmfd loader watch"))
        while not self.stop.is_set():
            for ready in connection.wait([self.pipe.conn, self.desc_fd], 0.5):
                if ready is self.pipe.conn:
                    self._on_message(self.pipe.recv())
                else:
                    self._read_descriptors(block=True)

    def _watch_loaders(self) -> None:
        """Tell the main process how far the loaders got towards PrecopyLoaded (its
        measure of their progress while it is owed), and of a loader's call that has
        run for half the deadline, or of a loader that long waiting for a chunk
        PRECOPY_SENT counted (and when that ends): the reassembly process is alive and
        well while one of its loaders hangs or starves, and the main process, which
        sees only that no progress is made, can then say which loader, in which call
        or waiting for which chunk."""
        while not self.stop.wait(min(0.5, self.slow_after / 4)):
            try:
                self._report_loaders()
            except OSError:
                return      # the main process is gone: the main loop ends on its pipe

    def _report_loaders(self) -> None:
        now = time.monotonic()
        counts = self.precopy_counts
        if counts is not None:
            # Past a device's count, its chunks are no step: another device's loader
            # loading on while one hangs masked it, SWITCHOVER_ACK owed for ever.
            steps = self.approved + sum(min(stream.loaded, count)
                                        for stream, count in zip(self.devices, counts))
            if steps != self.precopy_said:
                self.precopy_said = steps
                self.pipe.send(PrecopyLoading(steps))
        for stream in self.devices:
            calling, owed = stream.calling, counts[stream.index] if counts is not None else 0
            held = None
            if calling and now - calling[1] >= self.slow_after:
                held = f"{calling[0]} has not returned"
            # Idle, short of what PRECOPY_SENT counted: the switchover waits on chunks
            # the source says it sent (a channel stalled, or a source that lied).
            elif (not calling and stream.loaded < owed
                  and now - max(stream.loaded_at, self.precopy_since) >= self.slow_after):
                held = f"waiting for chunk {stream.loaded} of the {owed} PRECOPY_SENT counted"
            if held != stream.reported:
                stream.reported = held
                self.pipe.send(LoaderBusy(stream.index, held))

    def _read_descriptors(self, block: bool) -> None:
        """Handle the descriptors in the pipe; without ``block``, all of them."""
        size = _core.DESCRIPTOR_SIZE
        while True:
            try:
                data = os.read(self.desc_fd, 256 * size)
            except BlockingIOError:
                return
            if not data:
                raise EOFError("the descriptor pipe closed")
            # Writes of one descriptor are atomic, so reads are whole descriptors.
            for desc in _core.unpack_descriptors(data):
                self._on_chunk(*desc)
            if block:
                return

    def _on_message(self, message: object) -> None:
        if isinstance(message, Stop):
            self.stop_loading()
        elif isinstance(message, AwaitPrecopy):
            if len(message.device_chunks) != len(self.devices):
                raise MigrationError(f"PRECOPY_SENT counts {len(message.device_chunks)} "
                                     f"devices, the session has {len(self.devices)}")
            for stream, live in zip(self.devices, message.device_chunks):
                if stream.last is not None:     # (sent before the stop, a last chunk after)
                    raise MigrationError(f"PRECOPY_SENT (counting {live} chunks sent live) came "
                                         f"after the last chunk, idx {stream.last}",
                                         device=stream.name)
            self.precopy_since = time.monotonic()
            with self.precopy_lock:
                self.precopy_counts = message.device_chunks
            self._check_precopy()
        elif isinstance(message, RamLoaded):
            self.ram_loaded.set()
        elif isinstance(message, Drained):
            # Every channel has ended, after writing its descriptors: take
            # what is left in the pipe, then nothing more can arrive.
            os.set_blocking(self.desc_fd, False)
            self._read_descriptors(block=False)
            for stream in self.devices:
                if stream.index not in self.results:
                    try:
                        stream.check_drained()
                    except ValueError as exc:
                        raise MigrationError(str(exc), device=stream.name) from None
            self.pipe.send(Drained())

    def _on_chunk(self, device: int, idx: int, flags: int, slot: int, length: int,
                  channel: int) -> None:
        if device >= len(self.devices):
            self.pool.release(slot)
            raise MigrationError(f"descriptor for unknown device number {device}")
        stream = self.devices[device]
        counts = self.precopy_counts
        try:
            if flags & _core.CHUNK_FLAG_LAST and counts is not None:
                # The source stops, and sends a device's last chunk, only once acked.
                raise ValueError(f"last chunk idx {idx} while SWITCHOVER_ACK is owed "
                                 f"(PRECOPY_SENT counted {counts[device]} chunks sent live)")
            stream.add(idx, flags, slot, length)
        except ValueError as exc:
            self.pool.release(slot)
            raise MigrationError(f"{exc} (from channel {channel})", device=stream.name) from None

    def _check_precopy(self) -> None:
        """Once every device has loaded the chunks AwaitPrecopy named: each loader's
        ``precopy_loaded()`` (it may refuse by raising), then PrecopyLoaded, once.
        The counts stay until then: each call returned is a step towards it."""
        with self.precopy_lock:
            counts = self.precopy_counts
            if counts is None or self.approving or any(
                    stream.loaded < count for stream, count in zip(self.devices, counts)):
                return
            self.approving = True
        for stream in self.devices:
            if hasattr(stream.loader, "precopy_loaded"):
                try:
                    with stream.calls:
                        stream.call("precopy_loaded()", "precopy_loaded")
                except Exception as exc:
                    raise MigrationError(f"approving the switchover failed: "
                                         f"{type(exc).__name__}: {exc}",
                                         device=stream.name) from exc
                self.approved += 1
        self.precopy_counts = None
        self.pipe.send(PrecopyLoaded())

    def _load(self, stream: _DeviceStream) -> None:
        started = None
        idx = 0
        try:
            while True:
                entry = stream.take(self.stop)
                if entry is None:
                    return
                slot, length, flags = entry
                if started is None:
                    started = time.monotonic()
                last = flags & _core.CHUNK_FLAG_LAST
                if last and self.config_after_ram and not self._wait_for_ram():
                    self.pool.release(slot)
                    return
                try:
                    with stream.calls, self.pool.view(slot) as view:
                        data = view[CHUNK_HEADER:length]
                        hook = "load_state_buffer"
                        if last and hasattr(stream.loader, "load_config"):
                            hook = "load_config"
                        what = f"{hook}() of chunk {idx}"
                        if hook == "load_config" or len(data) or not last:
                            # (a loader that knows no config gets it as data, if any)
                            stream.call(what, hook, data)
                        _end_loan(data, what, stream.name)
                finally:
                    self.pool.release(slot)
                with stream.cond:
                    stream.loaded += 1
                    stream.loaded_at = time.monotonic()
                self._check_precopy()
                if last:
                    break
                idx += 1
            self._finish(stream, idx + 1, time.monotonic() - (started or time.monotonic()))
        except BaseException as exc:
            if not isinstance(exc, MigrationError):     # (one from _check_precopy names itself)
                exc = MigrationError(f"loading chunk {idx} failed: {type(exc).__name__}: {exc}",
                                     device=stream.name)
            elif type(exc) is MigrationError and not (exc.device or exc.channel):
                exc = MigrationError(exc.cause, device=stream.name)     # a loader's (its budget)
            # Reported before the stop, which ends the process: in the other
            # order, a loader's failure was now and then missing at the
            # destination, which said only that the process had exited (status 0).
            self.pipe.report_failure(exc)
            self.stop_loading()

    def _finish(self, stream: _DeviceStream, chunks: int, seconds: float) -> None:
        """``load_finish()``, its result to the main process: what fails here is named
        as such, not as the last chunk's load."""
        try:
            result = stream.call("load_finish()", "load_finish")
        except Exception as exc:
            raise MigrationError(f"load_finish() failed: {type(exc).__name__}: {exc}",
                                 device=stream.name) from exc
        self.results[stream.index] = result
        try:
            self.pipe.send(DeviceLoaded(stream.index, result, seconds, chunks))
        except (TypeError, pickle.PicklingError) as exc:   # (the pickler's is the cause)
            raise MigrationError(f"load_finish() returned {type(result).__name__!r}, which "
                                 f"cannot be pickled to the destination's main process: "
                                 f"{exc.__cause__ or exc}", device=stream.name) from exc

    def _wait_for_ram(self) -> bool:
        """Hold a config chunk until all RAM is in; False when stopping instead."""
        while not self.ram_loaded.wait(0.5):
            if self.stop.is_set():
                return False
        return True

    def stop_loading(self) -> None:
        """The session stops: every loader waiting for a chunk is woken to see it."""
        self.stop.set()
        for stream in self.devices:
            stream.wake()

    def close(self) -> None:
        self.stop_loading()
        for thread in self.threads:
            thread.join(timeout=5)
        for stream in self.devices:
            for slot, _, _ in stream.pending.values():
                self.pool.release(slot)
        self.pool.close()


def _reassemble(pipe: ChildPipe, params: ReassemblyParams, stack: list[Closable]) -> None:
    reassembler = _Reassembler(pipe, params, pipe.recv_fd())
    stack.append(reassembler)
    reassembler.run()


def reassembly_main(conn: Connection) -> None:
    """The reassembly process: one session's device streams, then exit."""
    run_child(conn, _reassemble)
