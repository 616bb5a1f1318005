"""The save side of device state: each device's stream, cut into chunks.

QEMU calls a VFIO device the same way whatever carries its state:
``save_setup()``, then ``read_state()`` until it returns 0, then
``config_state()`` as the LAST chunk. :func:`save_stream` is that sequence,
once; where the chunks go is a *sink*:

- new way (DESIGN §5.4, the seed's ``save_live_complete_precopy_async``):
  :class:`DeviceSaver` runs one thread per device, reading straight into
  buffer-pool slots (the 12-byte chunk header in front of the data in the same
  slot) and handing each slot to an idle channel's send worker;
- old way: :func:`save_old_way`, device after device, each chunk a
  DEVICE_STATE message on the main channel.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from .. import _core
from ..devices import device_key
from ..errors import Aborted, MigrationError
from ..protocol.main_channel import OLD_WAY_PREFIX, Msg

__all__ = ["DeviceSaver", "save_old_way", "save_stream"]

CHUNK_HEADER = _core.CHUNK_HEADER_SIZE


class ChunkSink(Protocol):
    def fill(self, reader: Callable[[memoryview], int]) -> int:
        """Let ``reader`` fill the next chunk's data area; returns what it wrote."""

    def discard(self) -> None:
        """The chunk just filled is empty and will not be sent."""

    def send(self, idx: int, flags: int, length: int) -> None:
        """Send the chunk just filled: ``length`` bytes of data."""


def save_stream(device, chunk_size: int, sink: ChunkSink) -> int:
    """Save one device into ``sink``; returns the chunks sent. A device that fails
    raises MigrationError naming the device and the chunk."""
    idx = 0
    try:
        if hasattr(device, "save_setup"):
            device.save_setup()
        while n := sink.fill(device.read_state):
            if not 0 < n <= chunk_size:
                raise ValueError(f"read_state returned {n} for a {chunk_size}-byte buffer")
            sink.send(idx, 0, n)
            idx += 1
        sink.discard()
        config = device.config_state() if hasattr(device, "config_state") else b""
        if len(config) > chunk_size:
            raise ValueError(f"config_state is {len(config)} bytes, more than a chunk "
                             f"({chunk_size})")
        sink.send(idx, _core.CHUNK_FLAG_LAST, sink.fill(lambda data: _copy(data, config)))
    except (Aborted, MigrationError, KeyboardInterrupt):
        raise       # (Ctrl-C or the CLI's SIGTERM, in the old way's main thread: no device's fault)
    except BaseException as exc:
        raise MigrationError(f"saving chunk {idx} failed: {type(exc).__name__}: {exc}",
                             device=device_key(device.idstr, device.instance_id)) from exc
    return idx + 1


def _copy(data: memoryview, config: bytes) -> int:
    data[:len(config)] = config
    return len(config)


class _PoolSink:
    """Chunks in buffer-pool slots, each handed to a channel picked by the selector."""

    def __init__(self, pool, selector, dispatch, device: int, chunk_size: int) -> None:
        self._pool, self._selector, self._dispatch = pool, selector, dispatch
        self._device, self._chunk = device, chunk_size
        self._slot = -1

    def fill(self, reader) -> int:
        self._slot = self._pool.acquire()
        self._pool.populate(self._slot)             # a sparse pool: memory, or a clean error
        view = self._pool.view(self._slot)
        try:
            return reader(view[CHUNK_HEADER:CHUNK_HEADER + self._chunk])
        finally:
            view.release()

    def discard(self) -> None:
        self._pool.release(self._slot)

    def send(self, idx: int, flags: int, length: int) -> None:
        with self._pool.view(self._slot) as view:
            _core.encode_chunk_header(view, idx, flags)
        ch = self._selector.select(timeout=None)
        self._dispatch(ch, self._device, self._slot, CHUNK_HEADER + length)


class DeviceSaver:
    """Runs every device's save in its own thread, chunks out through the channels.

    ``dispatch(ch, device, slot, length)`` hands a filled slot to channel
    ``ch`` (chosen with ``selector``). ``join()`` waits for all devices and
    returns the number of chunks each sent, in device order; ``wait()`` only
    waits (after a failure, which aborts the pool and selector they block on).
    """

    def __init__(self, devices: list, pool, selector, dispatch, failure,
                 chunk_size: int) -> None:
        self._failure = failure
        self.chunks = [0] * len(devices)
        self._threads = [
            threading.Thread(target=self._save, daemon=True,
                             args=(i, d, chunk_size, _PoolSink(pool, selector, dispatch, i,
                                                               chunk_size)),
                             name=f"fastmfd save {device_key(d.idstr, d.instance_id)}")
            for i, d in enumerate(devices)]
        for thread in self._threads:
            thread.start()

    def wait(self) -> None:
        """Wait until every save thread has ended."""
        for thread in self._threads:
            while thread.is_alive():
                thread.join(0.5)

    def join(self) -> list[int]:
        self.wait()
        self._failure.check()
        return self.chunks

    def _save(self, index: int, device, chunk_size: int, sink: _PoolSink) -> None:
        try:
            self.chunks[index] = save_stream(device, chunk_size, sink)
        except Aborted:
            pass                # the session failed elsewhere: that is its error
        except BaseException as exc:
            self._failure.fail(exc)


class _MainChannelSink:
    """Chunks as DEVICE_STATE messages: device index, chunk header, data."""

    def __init__(self, main, device: int, chunk_size: int) -> None:
        self._main = main
        self._prefix = OLD_WAY_PREFIX.pack(device)
        self._buf = memoryview(bytearray(CHUNK_HEADER + chunk_size))
        self.bytes_sent = 0

    def fill(self, reader) -> int:
        return reader(self._buf[CHUNK_HEADER:])

    def discard(self) -> None:
        pass

    def send(self, idx: int, flags: int, length: int) -> None:
        _core.encode_chunk_header(self._buf[:CHUNK_HEADER], idx, flags)
        self._main.send_parts(Msg.DEVICE_STATE, [self._prefix, self._buf[:CHUNK_HEADER + length]])
        self.bytes_sent += CHUNK_HEADER + length


def save_old_way(devices: list, main, chunk_size: int) -> tuple[list[int], int]:
    """The old way: each device in turn, its chunks as DEVICE_STATE messages.

    Returns the chunks each device sent and the chunk bytes sent in all."""
    chunks, total = [], 0
    for index, device in enumerate(devices):
        sink = _MainChannelSink(main, index, chunk_size)
        chunks.append(save_stream(device, chunk_size, sink))
        total += sink.bytes_sent
    return chunks, total
