"""The save side of device state: each device's stream, cut into chunks.

QEMU calls a VFIO device the same way whatever carries its state:
``save_setup()``; while the workload runs, ``save_live_iterate()`` as long
as ``state_pending()`` says it has data (precopy: :func:`save_live`, once per
live round, taking at most what was pending when the round began, so a
device that keeps dirtying cannot hold a round forever); after the stop,
``read_state()`` until it returns 0, then ``config_state()`` as the LAST chunk
(:func:`save_stream`). Both phases number their chunks in one idx space per
device (:class:`DeviceStream`), so the loader gets them in one order.
Where the chunks go is a *sink*:

- new way (DESIGN §5.4, the seed's ``save_live_complete_precopy_async``):
  :class:`DeviceSaver` saves up to ``SAVE_THREADS`` devices at once, each in a
  thread of the phase's pool, reading straight into buffer-pool slots (the
  12-byte chunk header in front of the data in the same slot) and handing each
  slot to an idle channel's send worker;
- old way: :class:`OldWaySaver`, device after device, each chunk a
  DEVICE_STATE message on the main channel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Callable, Protocol

from .. import _core
from ..config import MigrationConfig
from ..devices import Device, device_key, has_precopy
from ..errors import Aborted, MigrationError
from ..protocol.main_channel import OLD_WAY_PREFIX, MainChannel, Msg, old_way_checksum
from ..threads import start_thread
from .session import SessionFailure

Reader = Callable[[memoryview], int]
"""A device's read: fills the buffer, returns the bytes written (0: nothing more)."""
Dispatch = Callable[[int, int, int, int], None]
"""Hands a filled pool slot to a channel: ``dispatch(ch, device, slot, length)``."""

__all__ = ["DeviceSaver", "DeviceStream", "OldWaySaver", "make_saver", "save_live",
           "save_stream"]

CHUNK_HEADER = _core.CHUNK_HEADER_SIZE
LEFT_BEHIND_AFTER = 1.0     # seconds a failed session waits for a device's read to return
# Devices saved at once (new way): a thread each was 4096 threads at MAX_DEVICES, and
# where a process may not start that many (ulimit -u, -v) the session failed with
# a bare "can't start new thread". A device past these waits for one to finish (and
# where fewer threads may start, those that did take every device).
SAVE_THREADS = 64

log = logging.getLogger("fastmfd")


class ChunkSink(Protocol):
    def fill(self, reader: Reader) -> int:
        """Let ``reader`` fill the next chunk's data area; returns what it wrote."""

    def discard(self) -> None:
        """The chunk just filled is empty and will not be sent."""

    def send(self, idx: int, flags: int, length: int) -> None:
        """Send the chunk just filled: ``length`` bytes of data."""


class DeviceStream:
    """One device's stream across the phases: the next chunk idx, whether its
    ``save_setup`` ran, the chunk bytes it sent live, what ``state_pending()`` said
    after its last live round, and the call of the device under way."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.name = device_key(device.idstr, device.instance_id)
        self.next_idx = 0
        self.set_up = False
        self.live_bytes = 0
        self.still_pending = 0
        self.calling: tuple[str, float] | None = None   # (hook, since): for the deadline

    def call(self, hook: str, *args: Any) -> Any:
        """The device's ``hook``, timed: one that does not return within the
        deadline fails the session (:meth:`DeviceSaver.wait`)."""
        self.calling = (hook, time.monotonic())
        try:
            return getattr(self.device, hook)(*args)
        finally:
            self.calling = None

    @property
    def has_precopy(self) -> bool:
        return has_precopy(self.device)

    def pending(self) -> int:
        """Bytes the device still wants to send while running (0 without precopy)."""
        if not self.has_precopy:
            return 0
        with self.device_calls():
            return byte_count("state_pending", self.call("state_pending"))

    @contextlib.contextmanager
    def device_calls(self) -> Iterator[None]:
        """Around every call of the device: its ``save_setup()`` first (once, whichever
        phase comes first), and a device that fails raises MigrationError naming the
        device and the chunk."""
        try:
            if not self.set_up:
                self.set_up = True
                if hasattr(self.device, "save_setup"):
                    self.call("save_setup")
            yield
        except (Aborted, MigrationError):
            raise
        except BaseException as exc:
            raise MigrationError(f"saving chunk {self.next_idx} failed: "
                                 f"{type(exc).__name__}: {exc}", device=self.name) from exc

    def send_all(self, hook: str, chunk_size: int, sink: ChunkSink, budget: float) -> int:
        """Chunks from the device's ``hook`` (``read_state``, ``save_live_iterate``)
        until it returns 0 or ``budget`` bytes of data went; returns the chunk bytes
        sent (headers included)."""
        sent = chunks = 0
        while sent < budget:
            n = byte_count(hook, sink.fill(lambda buf: self.call(hook, buf)), chunk_size)
            if n == 0:
                sink.discard()
                break
            sink.send(self.next_idx, 0, n)
            self.next_idx += 1
            sent += n
            chunks += 1
        return sent + chunks * CHUNK_HEADER


def byte_count(hook: str, value: object, most: int | None = None) -> int:
    """What a device's ``hook`` returned, as a byte count (at most ``most``): any
    integer, numpy's too. Anything else is refused: a float went on as a truncated
    length, its chunk silently shorter than the device said it wrote; a bool (True
    for "wrote something") as one byte of the buffer."""
    try:
        n = -1 if isinstance(value, bool) else operator.index(value)   # type: ignore[arg-type]
    except TypeError:
        n = -1
    if n < 0 or most is not None and n > most:
        limit = "" if most is None else f" for a {most}-byte buffer"
        raise ValueError(f"{hook} returned {value!r}{limit}, not a byte count")
    return n


def save_live(stream: DeviceStream, chunk_size: int, sink: ChunkSink) -> None:
    """One live round of a device's precopy: ``save_live_iterate`` chunks, at most
    what ``state_pending()`` said when the round began; then what it says is left
    (``still_pending``, for the convergence test: asked here, in the saver's
    thread, so that no device's code runs in the caller's)."""
    if not stream.has_precopy:
        return
    budget = stream.pending()
    with stream.device_calls():
        if budget:
            stream.live_bytes += stream.send_all("save_live_iterate", chunk_size, sink, budget)
    stream.still_pending = stream.pending()


def save_stream(stream: DeviceStream, chunk_size: int, sink: ChunkSink) -> int:
    """The stop-copy: the rest of the stream and the LAST (config) chunk; returns
    the chunks the device sent in all."""
    with stream.device_calls():
        stream.send_all("read_state", chunk_size, sink, float("inf"))
        stream.still_pending = 0
        config = (stream.call("config_state") if hasattr(stream.device, "config_state")
                  else b"")
        if len(config) > chunk_size:
            raise ValueError(f"config_state is {len(config)} bytes, more than a chunk "
                             f"({chunk_size})")
        sink.send(stream.next_idx, _core.CHUNK_FLAG_LAST,
                  sink.fill(lambda data: _copy(data, config)))
        stream.next_idx += 1
    return stream.next_idx


Phase = Callable[[DeviceStream, int, ChunkSink], object]
"""A device's phase: :func:`save_live` or :func:`save_stream`."""


def _copy(data: memoryview, config: bytes) -> int:
    data[:len(config)] = config
    return len(config)


class _PoolSink:
    """Chunks in buffer-pool slots, each handed to a channel picked by the selector."""

    def __init__(self, pool: _core.BufferPool, selector: _core.ChannelSelector,
                 dispatch: Dispatch, device: int, chunk_size: int) -> None:
        self._pool, self._selector, self._dispatch = pool, selector, dispatch
        self._device, self._chunk = device, chunk_size
        self._slot = -1

    def fill(self, reader: Reader) -> int:
        self._slot = self._pool.acquire()
        self._pool.populate(self._slot)             # a sparse pool: memory, or a clean error
        with self._pool.view(self._slot) as view:
            return reader(view[CHUNK_HEADER:CHUNK_HEADER + self._chunk])

    def discard(self) -> None:
        self._pool.release(self._slot)

    def send(self, idx: int, flags: int, length: int) -> None:
        with self._pool.view(self._slot) as view:
            _core.encode_chunk_header(view, idx, flags)
        ch = self._selector.select(timeout=None)
        self._dispatch(ch, self._device, self._slot, CHUNK_HEADER + length)


class _Saver:
    """What both ways share: a phase runs in threads of its own, never in the
    caller's, and :meth:`wait` holds every call of a device to the deadline.

    A device's hooks are the device's own code: one that takes longer than
    ``stall_timeout`` fails the session, naming the device and the hook; after a
    failure (which aborts what the threads block on) a thread still inside a
    device's call is left behind after ``LEFT_BEHIND_AFTER`` seconds, so no wait
    here is unbounded. (A pool slot's memory stays mapped while its view is out:
    see SessionResources.release.)"""

    def __init__(self, streams: list[DeviceStream], failure: SessionFailure,
                 stall_timeout: float) -> None:
        self.streams = streams
        self._failure, self._stall = failure, stall_timeout
        self._threads: list[tuple[threading.Thread, list[DeviceStream]]] = []
        self._failed_at: float | None = None         # when wait() first saw the failure

    def _run(self, name: str, streams: list[DeviceStream], work: Callable[[], object]) -> None:
        """Run ``work`` (the calls of ``streams``' devices) in a thread of its own."""
        thread = threading.Thread(target=self._guarded, args=(work,), daemon=True, name=name)
        self._threads.append((start_thread(thread), streams))

    def _guarded(self, work: Callable[[], object]) -> None:
        try:
            work()
        except Aborted:
            pass                # the session failed elsewhere: that is its error
        except BaseException as exc:
            self._failure.fail(exc)

    def wait(self) -> None:
        """Wait until every thread of the phase has ended (see the class doc)."""
        for thread, streams in self._threads:
            while thread.is_alive():
                now = time.monotonic()
                if self._failure.error is None:
                    self._check_calls(streams, now)
                    thread.join(min(0.5, self._stall / 4))
                    continue
                self._failed_at = self._failed_at or now       # one grace per session
                if now - self._failed_at > LEFT_BEHIND_AFTER:
                    # (Not always inside a device's call: the old way's may be
                    # sending on the main channel.)
                    calls = [f"{s.name}: {calling[0]}()" for s in streams
                             if (calling := s.calling) is not None]
                    log.warning("%s did not end after the session failed (%s); it is left "
                                "behind", thread.name,
                                "; ".join(calls) or "in no device's call")
                    break
                thread.join(0.1)

    def _check_calls(self, streams: list[DeviceStream], now: float) -> None:
        for stream in streams:
            calling = stream.calling
            if calling is not None and now - calling[1] > self._stall:
                self._failure.fail(MigrationError(
                    f"{calling[0]}() made no progress for {self._stall:g} s (stall "
                    f"timeout)", device=stream.name))

    def join(self) -> None:
        self.wait()
        self._failure.check()


class DeviceSaver(_Saver):
    """The new way: each phase in a pool of up to ``SAVE_THREADS`` threads, each
    taking the next device until none is left; chunks out through the channels.

    ``dispatch(ch, device, slot, length)`` hands a filled slot to channel
    ``ch`` (chosen with ``selector``). :meth:`start` begins a phase — ``live``:
    one precopy round, or the stop-copy — on every device; ``join()`` waits for
    them and raises the session's failure; ``wait()`` only waits (after a
    failure, which aborts the pool and selector they block on).
    """

    def __init__(self, streams: list[DeviceStream], pool: _core.BufferPool,
                 selector: _core.ChannelSelector, dispatch: Dispatch, failure: SessionFailure,
                 chunk_size: int, stall_timeout: float) -> None:
        super().__init__(streams, failure, stall_timeout)
        self._chunk = chunk_size
        self._sinks = [_PoolSink(pool, selector, dispatch, i, chunk_size)
                       for i in range(len(streams))]

    def start(self, live: bool) -> None:
        self.wait()
        phase = save_live if live else save_stream
        self._threads = []
        todo = deque((stream, sink) for stream, sink in zip(self.streams, self._sinks)
                     if not live or stream.has_precopy)
        for i in range(min(SAVE_THREADS, len(todo))):
            saving: list[DeviceStream] = []     # the device the thread is on: for wait()
            try:
                self._run(f"fastmfd save {i}", saving,
                          functools.partial(self._save_from, todo, phase, saving))
            except MigrationError as exc:       # the thread limit
                if not self._threads:
                    raise MigrationError(f"not one thread to save the devices in: {exc}") \
                        from exc
                break       # the threads started take every device, a few at a time

    def _save_from(self, todo: deque[tuple[DeviceStream, _PoolSink]], phase: Phase,
                   saving: list[DeviceStream]) -> None:
        """A pool thread: the phase of the next device in ``todo`` until none is left,
        or the session failed (no device is called after that)."""
        while todo and self._failure.error is None:
            try:
                stream, sink = todo.popleft()
            except IndexError:      # another thread took the last one
                return
            saving[:] = [stream]
            phase(stream, self._chunk, sink)
        saving.clear()


class _MainChannelSink:
    """Chunks as DEVICE_STATE messages: device index, chunk header, data (and
    with ``checksum``, its CRC-32). ``buf`` (a chunk and its header) is shared by
    every device's sink: the old way saves one device at a time."""

    def __init__(self, main: MainChannel, device: int, buf: memoryview,
                 checksum: bool) -> None:
        self._main = main
        self._checksum = checksum
        self._prefix = OLD_WAY_PREFIX.pack(device)
        self._buf = buf
        self.bytes_sent = 0

    def fill(self, reader: Reader) -> int:
        return reader(self._buf[CHUNK_HEADER:])

    def discard(self) -> None:
        pass

    def send(self, idx: int, flags: int, length: int) -> None:
        _core.encode_chunk_header(self._buf[:CHUNK_HEADER], idx, flags)
        parts: list[bytes | memoryview] = [self._prefix, self._buf[:CHUNK_HEADER + length]]
        if self._checksum:
            parts.append(old_way_checksum(*parts))
        self._main.send_parts(Msg.DEVICE_STATE, parts)
        self.bytes_sent += CHUNK_HEADER + length


class OldWaySaver(_Saver):
    """The old way: each device in turn, its chunks as DEVICE_STATE messages (same
    interface as :class:`DeviceSaver`). A phase runs when it is joined: after the
    round's RAM jobs are handed to the channels, as QEMU saves RAM before the
    devices; in one thread, which the caller waits for under the deadline."""

    def __init__(self, streams: list[DeviceStream], main: MainChannel, chunk_size: int,
                 checksum: bool, failure: SessionFailure, stall_timeout: float) -> None:
        super().__init__(streams, failure, stall_timeout)
        self._chunk = chunk_size
        # One buffer for all: one per device cost 4 GiB before a byte was sent
        # for 4096 devices (MAX_DEVICES) of the default 1 MiB chunk.
        buf = memoryview(bytearray(CHUNK_HEADER + chunk_size))
        self._sinks = [_MainChannelSink(main, i, buf, checksum) for i in range(len(streams))]
        self._phase: Phase | None = None

    def start(self, live: bool) -> None:
        self._phase = save_live if live else save_stream

    def join(self) -> None:
        phase, self._phase = self._phase, None
        if phase is not None:
            self._threads = []
            self._run("fastmfd save (old way)", self.streams,
                      functools.partial(self._save_each, phase))
        super().join()

    def _save_each(self, phase: Phase) -> None:
        for stream, sink in zip(self.streams, self._sinks):
            phase(stream, self._chunk, sink)

    @property
    def bytes_sent(self) -> int:
        """Chunk bytes sent on the main channel."""
        return sum(sink.bytes_sent for sink in self._sinks)


def make_saver(streams: list[DeviceStream], config: MigrationConfig, main: MainChannel,
               selector: _core.ChannelSelector, dispatch: Dispatch, failure: SessionFailure,
               own: Callable[[_core.BufferPool], _core.BufferPool]
               ) -> tuple[DeviceSaver | OldWaySaver | None, _core.BufferPool | None]:
    """The saver of a session's ``streams`` (none without devices): the new way's,
    with its pool of chunk slots (made sparse, given to ``own``), or the old way's."""
    if not streams:
        return None, None
    chunk, stall = config.device_chunk_size, config.stall_timeout
    if not config.channel_header:
        return OldWaySaver(streams, main, chunk, config.checksum, failure, stall), None
    pool = own(_core.BufferPool.create(max(4, 2 * len(streams) + config.total_channels),
                                       chunk + CHUNK_HEADER, tag="source-pool", sparse=True))
    return DeviceSaver(streams, pool, selector, dispatch, failure, chunk, stall), pool
