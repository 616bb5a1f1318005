"""Device state: devices (source), loaders (destination) and the save side.

A *device* produces one ordered state stream, the way a VFIO device's
migration data fd does: ``read_state(buf)`` fills a writable buffer and
returns the bytes written, 0 at the end. It may also have ``save_setup()``
(called first) and ``config_state()`` (bytes sent as the last chunk, flagged
LAST). A *loader* consumes one stream at the destination, strictly in order:
``load_state_buffer(data)`` per chunk, then ``load_finish()``, whose return
value lands in ``DestinationResult.devices``. Loaders run in the
destination's reassembly process, so they must be picklable.

Save side, new way (DESIGN §5.4, the seed's ``save_live_complete_precopy_async``):
one thread per device reads straight into buffer-pool slots (the 12-byte
chunk header goes in front of the data in the same slot), picks an idle
channel with the atomic selector and hands the slot to that channel's send
worker. Old way: device after device, chunks sent on the main channel.
"""

from __future__ import annotations

import os
import struct
import threading
import time

from . import _core
from .errors import Aborted, ConfigError, MigrationError
from .protocol.main_channel import Msg

__all__ = ["BytesDevice", "FileDevice", "SyntheticDevice", "CollectLoader", "FileLoader",
           "VerifyLoader", "DeviceSaver", "save_old_way", "device_key"]

CHUNK_HEADER = _core.CHUNK_HEADER_SIZE
OLD_WAY_PREFIX = struct.Struct(">I")     # device index in front of an old-way chunk


def device_key(idstr: str, instance_id: int) -> str:
    return f"{idstr}/{instance_id}"


def _check_ids(idstr: str, instance_id: int) -> None:
    raw = idstr.encode() if isinstance(idstr, str) else b""
    if not raw or len(raw) > 255 or b"\0" in raw:
        raise ConfigError(f"device idstr {idstr!r} must be 1..255 UTF-8 bytes without NUL")
    if not 0 <= instance_id < 1 << 32:
        raise ConfigError(f"device instance_id {instance_id} does not fit in 32 bits")


class _Paced:
    """Hold a stream to ``rate`` bytes/s, as a device's data fd limits it."""

    def __init__(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ConfigError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.start: float | None = None
        self.done = 0

    def account(self, nbytes: int) -> None:
        if self.rate is None:
            return
        if self.start is None:
            self.start = time.monotonic()
        self.done += nbytes
        delay = self.start + self.done / self.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


# ------------------------------------------------------------------ devices

class BytesDevice:
    """A device whose state is a bytes-like object (and optional config bytes)."""

    def __init__(self, idstr: str, instance_id: int, data, config: bytes = b"") -> None:
        _check_ids(idstr, instance_id)
        self.idstr, self.instance_id = idstr, instance_id
        self._data = memoryview(data).cast("B")
        self._config = bytes(config)
        self._offset = 0

    def read_state(self, buf) -> int:
        n = min(len(buf), len(self._data) - self._offset)
        buf[:n] = self._data[self._offset:self._offset + n]
        self._offset += n
        return n

    def config_state(self) -> bytes:
        return self._config


class FileDevice:
    """A device whose state is read from a file."""

    def __init__(self, idstr: str, instance_id: int, path: str | os.PathLike) -> None:
        _check_ids(idstr, instance_id)
        self.idstr, self.instance_id = idstr, instance_id
        self.path = os.fspath(path)
        self._file = None

    def save_setup(self) -> None:
        self._file = open(self.path, "rb", buffering=0)

    def read_state(self, buf) -> int:
        if self._file is None:
            self.save_setup()
        n = self._file.readinto(buf)
        if n == 0:
            self._file.close()
        return n


class SyntheticDevice:
    """Deterministic state of ``size`` bytes made from ``seed``, produced no
    faster than ``read_rate`` bytes/s (as a VFIO device's data fd limits reads).
    :class:`VerifyLoader` checks it."""

    def __init__(self, idstr: str, instance_id: int, size: int, read_rate: float | None = None,
                 seed: int = 0) -> None:
        _check_ids(idstr, instance_id)
        if size < 0:
            raise ConfigError(f"device size {size} is negative")
        self.idstr, self.instance_id = idstr, instance_id
        self.size, self.seed = size, seed
        self._offset = 0
        self._pace = _Paced(read_rate)

    def read_state(self, buf) -> int:
        n = min(len(buf), self.size - self._offset)
        if n:
            _core.fill_pattern(buf[:n], self.seed, self._offset)
            self._offset += n
            self._pace.account(n)
        return n


# ------------------------------------------------------------------ loaders

class CollectLoader:
    """Keeps the stream in memory; ``load_finish`` returns it as bytes (the default)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def load_state_buffer(self, data) -> None:
        self._data += data

    def load_finish(self) -> bytes:
        return bytes(self._data)


class FileLoader:
    """Writes the stream to ``path``; ``load_finish`` returns the path."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file = None

    def load_state_buffer(self, data) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")
        self._file.write(data)

    def load_finish(self) -> str:
        if self._file is None:
            open(self.path, "wb").close()
        else:
            self._file.close()
        return self.path


class VerifyLoader:
    """Checks a :class:`SyntheticDevice` stream of ``size`` bytes from ``seed``,
    consuming no faster than ``write_rate`` bytes/s (a device's load rate).
    ``load_finish`` returns the bytes verified; any difference raises."""

    def __init__(self, size: int, seed: int = 0, write_rate: float | None = None) -> None:
        self.size, self.seed, self.write_rate = size, seed, write_rate
        self._offset = 0
        self._pace = None

    def load_state_buffer(self, data) -> None:
        if self._pace is None:
            self._pace = _Paced(self.write_rate)
        n = len(data)
        if self._offset + n > self.size:
            raise ValueError(f"stream longer than the expected {self.size} bytes")
        bad = _core.check_pattern(data, self.seed, self._offset)
        if bad >= 0:
            raise ValueError(f"stream differs from the expected content at byte "
                             f"{self._offset + bad}")
        self._offset += n
        self._pace.account(n)

    def load_finish(self) -> int:
        if self._offset != self.size:
            raise ValueError(f"stream ended after {self._offset} of {self.size} bytes")
        return self._offset


# ------------------------------------------------------------------ save side

class DeviceSaver:
    """Runs every device's save in its own thread, chunks out through the channels.

    ``dispatch(ch, device, slot, length)`` hands a filled slot to channel
    ``ch`` (chosen with ``selector``). ``join()`` waits for all devices and
    returns the number of chunks each sent, in device order; ``wait()`` only
    waits (after a failure, which aborts the pool and selector they block on).
    """

    def __init__(self, devices: list, pool, selector, dispatch, failure,
                 chunk_size: int) -> None:
        self._pool, self._selector, self._dispatch = pool, selector, dispatch
        self._failure, self._chunk = failure, chunk_size
        self.chunks = [0] * len(devices)
        self._threads = [
            threading.Thread(target=self._save, args=(i, d), daemon=True,
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

    def _save(self, index: int, device) -> None:
        name = device_key(device.idstr, device.instance_id)
        idx = 0
        try:
            if hasattr(device, "save_setup"):
                device.save_setup()
            while True:
                slot = self._pool.acquire()
                view = self._pool.view(slot)
                try:
                    n = device.read_state(view[CHUNK_HEADER:CHUNK_HEADER + self._chunk])
                finally:
                    view.release()
                if not n:
                    self._pool.release(slot)
                    break
                if not 0 < n <= self._chunk:
                    raise ValueError(f"read_state returned {n} for a {self._chunk}-byte buffer")
                self._send(index, slot, idx, 0, n)
                idx += 1
            config = device.config_state() if hasattr(device, "config_state") else b""
            if len(config) > self._chunk:
                raise ValueError(f"config_state is {len(config)} bytes, more than a chunk "
                                 f"({self._chunk})")
            slot = self._pool.acquire()
            with self._pool.view(slot) as view:
                view[CHUNK_HEADER:CHUNK_HEADER + len(config)] = config
            self._send(index, slot, idx, _core.CHUNK_FLAG_LAST, len(config))
            self.chunks[index] = idx + 1
        except Aborted:
            pass
        except BaseException as exc:
            error = MigrationError(f"saving chunk {idx} failed: {type(exc).__name__}: {exc}",
                                   device=name)
            error.__cause__ = exc
            self._failure.fail(error)

    def _send(self, device: int, slot: int, idx: int, flags: int, n: int) -> None:
        with self._pool.view(slot) as view:
            _core.encode_chunk_header(view, idx, flags)
        ch = self._selector.select(timeout=None)
        self._dispatch(ch, device, slot, CHUNK_HEADER + n)


def save_old_way(devices: list, main, chunk_size: int) -> tuple[list[int], int]:
    """The old way: each device in turn, its chunks as DEVICE_STATE messages.

    Returns the chunks each device sent and the chunk bytes sent in all."""
    chunks = []
    total = 0
    buf = bytearray(CHUNK_HEADER + chunk_size)
    view = memoryview(buf)
    header = view[:CHUNK_HEADER]
    for index, device in enumerate(devices):
        name = device_key(device.idstr, device.instance_id)
        idx = 0
        prefix = OLD_WAY_PREFIX.pack(index)
        try:
            if hasattr(device, "save_setup"):
                device.save_setup()
            while True:
                n = device.read_state(view[CHUNK_HEADER:])
                if not n:
                    break
                if not 0 < n <= chunk_size:
                    raise ValueError(f"read_state returned {n} for a {chunk_size}-byte buffer")
                _core.encode_chunk_header(header, idx, 0)
                main.send_parts(Msg.DEVICE_STATE, [prefix, view[:CHUNK_HEADER + n]])
                total += CHUNK_HEADER + n
                idx += 1
            config = device.config_state() if hasattr(device, "config_state") else b""
            if len(config) > chunk_size:
                raise ValueError(f"config_state is {len(config)} bytes, more than a chunk")
            _core.encode_chunk_header(header, idx, _core.CHUNK_FLAG_LAST)
            main.send_parts(Msg.DEVICE_STATE, [prefix, bytes(header), config])
            total += CHUNK_HEADER + len(config)
        except MigrationError:
            raise
        except BaseException as exc:
            raise MigrationError(f"saving chunk {idx} failed: {type(exc).__name__}: {exc}",
                                 device=name) from exc
        chunks.append(idx + 1)
    return chunks, total

