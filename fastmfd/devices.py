"""Device state: devices (source) and loaders (destination).

A *device* produces one ordered state stream, the way a VFIO device's
migration data fd does: ``read_state(buf)`` fills a writable buffer and
returns the bytes written, 0 at the end. It may also have ``save_setup()``
(called first) and ``config_state()`` (bytes sent as the last chunk, flagged
LAST). A device that sends part of its state while the workload still runs
(QEMU's ``save_live_iterate`` / ``state_pending_estimate``, a VFIO device's
precopy) also has ``state_pending() -> int`` (bytes it still wants to send
now) and ``save_live_iterate(buf) -> int`` (like ``read_state``, 0 when it has
nothing right now); after the stop, ``read_state`` gives everything left.

A *loader* consumes one stream at the destination, strictly in order, live
chunks and stop-copy chunks alike (one idx space): ``load_state_buffer(data)``
per chunk, then the LAST chunk's config bytes to ``load_config(data)`` if it
has one (else to ``load_state_buffer``, when not empty), then
``load_finish()``, whose return value lands in ``DestinationResult.devices``.
It may have ``precopy_loaded()``: called once every chunk the source sent
before asking for switchover-ack is loaded (QEMU's
``qemu_loadvm_approve_switchover``). Loaders run in the destination's
reassembly process, so they must be picklable.

The save side (how a device's stream is cut into chunks and sent) is
:mod:`fastmfd._engine.saving`.
"""

from __future__ import annotations

import io
import operator
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, runtime_checkable

from . import _core
from .arguments import (BOOL, BUFFER, INT, PATH, POSITIVE, SEED, STR, UNSIGNED, check_types,
                        optional)
from .errors import ConfigError, MigrationError
from .protocol.setup import Invalid, check_name
from .reprs import short_repr
from .shm import file_identity

# A public signature's name at run time too: typing.get_type_hints() and
# inspect.signature(eval_str=True) read BytesDevice's (a NameError when imported for
# type checkers only). typing_extensions is not a dependency of fastmfd.
if sys.version_info >= (3, 12):
    from collections.abc import Buffer
elif TYPE_CHECKING:
    from typing_extensions import Buffer
else:
    try:
        from typing_extensions import Buffer
    except ImportError:
        Buffer = Any

__all__ = ["Device", "Loader", "BytesDevice", "FileDevice", "SyntheticDevice", "CollectLoader",
           "WriteBudget",
           "FileLoader", "VerifyLoader", "device_key", "check_device_ids", "wire_ids",
           "PrecopyDevice",
           "has_precopy"]

CHUNK_HEADER = _core.CHUNK_HEADER_SIZE


def device_key(idstr: str, instance_id: int) -> str:
    return f"{idstr}/{instance_id}"


def check_device_ids(call: str, idstr: str, instance_id: int, of: str = "") -> tuple[str, int]:
    """The device ``call`` names, its instance_id a Python int: a TypeError for a
    wrong type, a ConfigError for an idstr or instance_id the wire cannot carry.
    ``of`` prefixes the names in errors (``device.``: attributes, not parameters)."""
    idstr, instance_id = check_types(call, **{f"{of}idstr": (idstr, STR),
                                              f"{of}instance_id": (instance_id, INT)})
    try:
        check_name(idstr, "device idstr")
    except Invalid as exc:
        raise ConfigError(f"device idstr {idstr!r} must be {exc.expected}",
                          parameter=f"{of}idstr", problem=f"must be {exc.expected}") from None
    if not 0 <= instance_id < 1 << 32:
        raise ConfigError(f"device instance_id {instance_id} does not fit in 32 bits",
                          parameter=f"{of}instance_id", problem="must be in 0..4294967295")
    return idstr, instance_id


def wire_ids(device: Device) -> tuple[str, int]:
    """``device``'s (idstr, instance_id) as SETUP carries them: Python's str and int
    (Source.add_device takes any str and integer, numpy's too)."""
    return str(device.idstr), operator.index(device.instance_id)


def _precopy_error(what: str, precopy_size: int, size: int) -> ConfigError:
    problem = f"must be in 0..size ({size})"
    return ConfigError(f"{what} precopy_size {precopy_size} is not in 0..size ({size})",
                       parameter="precopy_size", problem=problem, involves=("size",))


class _Paced:
    """Hold a stream to ``rate`` bytes/s (checked: finite, > 0), as a device's data fd
    limits it."""

    def __init__(self, rate: float | None) -> None:
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


# ------------------------------------------------------------------ what they are

@runtime_checkable
class Device(Protocol):
    """What :meth:`Source.add_device` takes: one ordered state stream.

    ``save_setup()`` (called first) and ``config_state() -> bytes`` (sent as the
    last chunk) are optional and so not part of the protocol.

    ``idstr`` (QEMU's name of the device) and ``instance_id`` (0..2**32-1) are only
    read: plain attributes, properties and a frozen dataclass's fields all do. To
    type checkers they are read-only properties, which a settable attribute
    satisfies too (a subclass of this protocol declares them, ``idstr: str``); at
    run time, plain annotations, so that a subclass may assign them."""

    if TYPE_CHECKING:
        @property
        def idstr(self) -> str: ...

        @property
        def instance_id(self) -> int: ...
    else:
        idstr: str
        instance_id: int

    def read_state(self, buf: memoryview, /) -> int:
        """Fill the writable ``buf``; return the bytes written, 0 at the end."""
        ...


class PrecopyDevice(Device, Protocol):
    """A :class:`Device` that also offers state while the workload runs (as a VFIO
    device in PRE_COPY): the source calls these when a device has both."""

    def state_pending(self) -> int:
        """Bytes it still wants to send while running."""
        ...

    def save_live_iterate(self, buf: memoryview, /) -> int:
        """Fill ``buf`` with live state; return the bytes written, 0 for none now."""
        ...


def has_precopy(device: Device) -> TypeGuard[PrecopyDevice]:
    return hasattr(device, "save_live_iterate") and hasattr(device, "state_pending")


@runtime_checkable
class Loader(Protocol):
    """What :meth:`Destination.add_loader` takes: consumes one stream in order,
    in the destination's reassembly process (so it must be picklable). Its methods
    are called with positional arguments (as a Device's): name them as you like."""

    def load_state_buffer(self, data: memoryview, /) -> None:
        """Take the next chunk. ``data`` (as ``load_config``'s) is lent for the call
        only: its memory holds other chunks next. Copy what you keep
        (``bytes(data)``, ``bytearray += data``): a view kept raises ValueError
        once the call returns, and a buffer still held of it (``numpy.frombuffer``)
        fails the session."""
        ...

    def load_finish(self) -> object:
        """All chunks are in; what it returns lands in ``DestinationResult.devices``."""
        ...


# ------------------------------------------------------------------ devices

class BytesDevice:
    """A device whose state is a bytes-like object (and optional config bytes: any
    bytes-like object, copied)."""

    def __init__(self, idstr: str, instance_id: int, data: Buffer, config: Buffer = b"") -> None:
        idstr, instance_id = check_device_ids("BytesDevice", idstr, instance_id)
        check_types("BytesDevice", data=(data, BUFFER), config=(config, BUFFER))
        self.idstr, self.instance_id = idstr, instance_id
        self._data = memoryview(data).cast("B")
        self._config = bytes(config)
        self._offset = 0

    def read_state(self, buf: memoryview) -> int:
        """Copy the next bytes of ``data`` into ``buf``; the bytes copied, 0 at its end."""
        n = min(len(buf), len(self._data) - self._offset)
        buf[:n] = self._data[self._offset:self._offset + n]
        self._offset += n
        return n

    def config_state(self) -> bytes:
        """The ``config`` bytes, sent as the stream's last chunk."""
        return self._config

    def __repr__(self) -> str:      # (its state said by its size: it may be GiBs)
        data = self._data
        shown = short_repr(bytes(data)) if data.nbytes <= 32 else f"<{data.nbytes} bytes>"
        return (f"BytesDevice({self.idstr!r}, {self.instance_id}, {shown}, "
                f"config={short_repr(self._config)})")


class FileDevice:
    """A device whose state is read from a file. The file is opened here, so one
    that cannot be read is refused (ConfigError) before any migration starts."""

    def __init__(self, idstr: str, instance_id: int, path: str | os.PathLike[str]) -> None:
        idstr, instance_id = check_device_ids("FileDevice", idstr, instance_id)
        check_types("FileDevice", path=(path, PATH))
        self.idstr, self.instance_id = idstr, instance_id
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise ConfigError(f"device {idstr!r}: cannot read state file {self.path}: "
                              f"{exc.strerror or exc}") from None

    def read_state(self, buf: memoryview) -> int:
        """Read the file's next bytes into ``buf``; the bytes read, 0 at its end (which
        closes it)."""
        n = self._file.readinto(buf)
        if n == 0:
            self._file.close()
        return n

    def close(self) -> None:
        """Close the file (reading it to the end does too)."""
        self._file.close()

    def __repr__(self) -> str:
        return f"FileDevice({self.idstr!r}, {self.instance_id}, {self.path!r})"


class SyntheticDevice:
    """Deterministic state of ``size`` bytes made from ``seed``, produced no
    faster than ``read_rate`` bytes/s (as a VFIO device's data fd limits reads).
    :class:`VerifyLoader` checks it.

    ``precopy_size``: the first that many bytes are the device's initial data,
    offered while the workload runs (``state_pending`` /
    ``save_live_iterate``, as a VFIO device in its PRE_COPY state); what a
    live phase did not take, and the rest, is read after the stop."""

    def __init__(self, idstr: str, instance_id: int, size: int, read_rate: float | None = None,
                 seed: int = 0, precopy_size: int = 0) -> None:
        idstr, instance_id = check_device_ids("SyntheticDevice", idstr, instance_id)
        size, read_rate, seed, precopy_size = check_types(
            "SyntheticDevice", size=(size, UNSIGNED), read_rate=(read_rate, optional(POSITIVE)),
            seed=(seed, SEED), precopy_size=(precopy_size, INT))
        if not 0 <= precopy_size <= size:
            raise _precopy_error("device", precopy_size, size)
        self.idstr, self.instance_id = idstr, instance_id
        self.size, self.seed, self.precopy_size = size, seed, precopy_size
        self._offset = 0
        self._pace = _Paced(read_rate)

    def state_pending(self) -> int:
        """Bytes of the initial data (``precopy_size``) not read yet."""
        return max(0, self.precopy_size - self._offset)

    def save_live_iterate(self, buf: memoryview) -> int:
        """Fill ``buf`` with the next bytes of the initial data; 0 once it is all read."""
        return self._produce(buf, self.precopy_size)

    def read_state(self, buf: memoryview) -> int:
        """Fill ``buf`` with the next bytes of the state (``size`` in all, the initial
        data no live round took included), no faster than ``read_rate``; the bytes
        written, 0 at the end."""
        return self._produce(buf, self.size)

    def __repr__(self) -> str:
        return (f"SyntheticDevice({self.idstr!r}, {self.instance_id}, size={self.size}, "
                f"read_rate={self._pace.rate!r}, seed={self.seed}, "
                f"precopy_size={self.precopy_size})")

    def _produce(self, buf: memoryview, end: int) -> int:
        n = max(0, min(len(buf), end - self._offset))
        if n:
            _core.fill_pattern(buf[:n], self.seed, self._offset)
            self._offset += n
            self._pace.account(n)
        return n


# ------------------------------------------------------------------ loaders

class WriteBudget:
    """Bytes that the loaders given it may write or keep together (``what`` names
    the bound): the device files of one save (what ``listen --max-size`` leaves
    after its regions, whose room is checked at SETUP; a device's stream has no
    size until it ends), or what CollectLoaders keep. A session's loaders go to
    its reassembly process in one piece, as its threads: they share it there."""

    def __init__(self, limit: int, what: str) -> None:
        self.left, self.what = limit, what
        self._lock = threading.Lock()

    def spend(self, size: int, spender: str) -> None:
        """Take ``size`` bytes for ``spender`` (a file's path, a loader): a
        MigrationError naming it and the bound when fewer are left."""
        with self._lock:
            if size > self.left:
                raise MigrationError(f"{spender}: the device state goes past {self.what}")
            self.left -= size

    def __repr__(self) -> str:
        return f"<WriteBudget for {self.what}: {self.left} bytes left>"

    def __getstate__(self) -> dict[str, Any]:
        return {"left": self.left, "what": self.what}   # (a lock does not pickle)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CollectLoader:
    """Keeps the stream in memory; ``load_finish`` returns it as bytes (the default
    loader). ``limit``: the most bytes it keeps, or a :class:`WriteBudget` it
    shares with other loaders (a Destination with ``max_memory`` gives the ones it
    makes one); a stream going past it fails the session."""

    def __init__(self, limit: int | WriteBudget | None = None) -> None:
        if not isinstance(limit, WriteBudget):
            size, = check_types("CollectLoader", limit=(limit, optional(UNSIGNED)))
            self._made_with: int | WriteBudget | None = size
            limit = None if size is None else WriteBudget(size, f"its limit ({size} bytes)")
        else:
            self._made_with = limit
        self.budget = limit
        self._data = io.BytesIO()

    def load_state_buffer(self, data: memoryview) -> None:
        """Keep a copy of ``data`` (a MigrationError past ``limit``)."""
        if self.budget is not None:
            self.budget.spend(memoryview(data).nbytes, "CollectLoader")
        self._data.write(data)

    def load_finish(self) -> bytes:
        """The whole stream, as bytes."""
        collected, self._data = self._data, io.BytesIO()
        return collected.getvalue()     # the BytesIO's own bytes (it is dropped): no copy

    def __repr__(self) -> str:
        # What it was made with: its budget's bytes left were shown as its limit, which a
        # budget shared with other loaders (max_memory's) is not.
        return f"CollectLoader(limit={self._made_with!r})"


class FileLoader:
    """Writes the stream to ``path``, chunk after chunk in order; ``load_finish``
    fsyncs the file (the destination sends LOADED only after it returned) and
    returns the path. The file is created or truncated — ``exclusive``: created,
    failing if anything exists there — and a symbolic link at ``path`` is never
    followed. A write that fails (a full disk) fails the migration, and so does
    one past ``budget``."""

    def __init__(self, path: str | os.PathLike[str], *, exclusive: bool = False,
                 file_id: tuple[int, int] | None = None,
                 budget: WriteBudget | None = None) -> None:
        check_types("FileLoader", path=(path, PATH), exclusive=(exclusive, BOOL))
        self.path = os.fspath(path)
        self.exclusive = exclusive
        self.budget = budget
        self.file_id = file_id
        """(st_dev, st_ino) of an empty file made for it at ``path`` (by a process
        that made it safely, e.g. in a directory it holds open): written as it
        is, neither created nor truncated, and another file found there refused."""
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            if self.file_id is not None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                if file_identity(self._fd) != self.file_id:
                    os.close(self._fd)
                    self._fd = None
                    raise MigrationError(f"{self.path} is not the file made for this "
                                         f"device's state: it was replaced, or its "
                                         f"directory moved")
                return self._fd
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self.path, flags | (os.O_EXCL if self.exclusive
                                                   else os.O_TRUNC), 0o600)
        return self._fd

    def load_state_buffer(self, data: memoryview) -> None:
        """Write ``data`` at the file's end (the file opened at the first chunk); an
        OSError naming the file if a write fails."""
        fd, view = self._open(), memoryview(data).cast("B")
        if self.budget is not None:
            self.budget.spend(len(view), self.path)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise self._naming_the_file(exc) from None

    def load_finish(self) -> str:
        """fsync the file and close it; returns its path."""
        fd = self._open()
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._naming_the_file(exc) from None
        finally:
            self._fd = None
            os.close(fd)
        return self.path

    def _naming_the_file(self, exc: OSError) -> OSError:
        """``exc`` with the file's name: "No space left on device" alone does not say
        which of the destination's files the disk filled up with."""
        return OSError(exc.errno, exc.strerror, self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}   # a descriptor means nothing elsewhere

    def __repr__(self) -> str:
        return f"FileLoader({self.path!r}, exclusive={self.exclusive})"


class VerifyLoader:
    """Checks a :class:`SyntheticDevice` stream of ``size`` bytes from ``seed``,
    consuming no faster than ``write_rate`` bytes/s (a device's load rate).
    ``load_finish`` returns the bytes verified; any difference raises.

    ``precopy_size``: the device's initial data (its SyntheticDevice's
    ``precopy_size``). With switchover-ack the destination approves the
    switchover once the chunks sent live are loaded (``precopy_loaded``); a
    source that asked before all the initial data was sent fails the check
    there, as a VFIO device would refuse to resume without it."""

    def __init__(self, size: int, seed: int = 0, write_rate: float | None = None,
                 precopy_size: int = 0) -> None:
        size, seed, write_rate, precopy_size = check_types(
            "VerifyLoader", size=(size, UNSIGNED), seed=(seed, SEED),
            write_rate=(write_rate, optional(POSITIVE)), precopy_size=(precopy_size, INT))
        if not 0 <= precopy_size <= size:
            raise _precopy_error("loader", precopy_size, size)
        self.size, self.seed, self.write_rate = size, seed, write_rate
        self.precopy_size = precopy_size
        self._offset = 0
        self._pace: _Paced | None = None

    def precopy_loaded(self) -> None:
        """ValueError unless all ``precopy_size`` bytes of initial data are loaded."""
        if self._offset < self.precopy_size:
            raise ValueError(f"switchover approved after {self._offset} of the "
                             f"{self.precopy_size} bytes of initial data")

    def load_state_buffer(self, data: memoryview) -> None:
        """Check ``data`` against the expected stream (ValueError at the first byte that
        differs, or past ``size``), at ``write_rate``."""
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

    def __repr__(self) -> str:
        return (f"VerifyLoader(size={self.size}, seed={self.seed}, "
                f"write_rate={self.write_rate!r}, precopy_size={self.precopy_size})")

    def load_finish(self) -> int:
        """The bytes verified: ``size`` (ValueError if the stream ended before)."""
        if self._offset != self.size:
            raise ValueError(f"stream ended after {self._offset} of {self.size} bytes")
        return self._offset
