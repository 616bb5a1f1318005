"""Regions: named, page-aligned blocks of memory that several processes map.

A region is what QEMU calls a RAMBlock: pages addressed by byte offset
inside it. Its bytes live in a shared-memory segment (:meth:`Region.create`)
or in a file mapped ``MAP_SHARED`` (:meth:`Region.from_file`), so send and
receive workers read and write them in place. Each region also carries a
dirty bitmap, one bit per page, that a workload in any process marks
(:meth:`Region.mark_dirty`) and the source collects between rounds.

Another process attaches with ``Region.attach(region.handle)``; attachers
only ever unmap. The creating process owns the segments and unlinks them in
:meth:`Region.close` (or, if it dies first, the resource tracker at the exit of
its process tree, or another process's sweep once no process is attached to them:
:mod:`fastmfd.shm_owners`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from ._core import DirtyBitmap
from .arguments import BOOL, INT, PATH, STR, check_types, instance_of, optional, type_error
from .errors import ConfigError, MigrationError
from .protocol.control import RegionHandle
from .protocol.setup import Invalid, check_name
from .huge_pages import advise_huge_pages, why_no_huge_pages
from .shm import (SHM_DIR, SharedMemory, check_room, file_identity, limit_hint, map_file,
                  mapped_view)
from .units import format_bytes

__all__ = ["Region", "RegionHandle", "validate_region_name", "check_huge_pages", "region_to_add"]

FLUSH_SLICE = 64 << 20      # bytes a file-backed region's flush() writes back at a time


def validate_region_name(name: str) -> str:
    try:
        return check_name(name, "region name")
    except Invalid as exc:
        raise ConfigError(f"region name {name!r} must be {exc.expected}", parameter="name",
                          problem=f"must be {exc.expected}") from None


def check_huge_pages(directory: str) -> None:
    """ConfigError, saying why and what would allow them, unless regions in files
    under ``directory`` can get transparent huge pages."""
    reason = why_no_huge_pages(directory)
    if reason is not None:
        raise ConfigError(f"huge pages are not available: {reason}")


def _validate_size(name: str, size: int, page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1):
        raise ConfigError(f"page size {page_size} is not a power of two",
                          parameter="page_size", problem="must be a power of two")
    if size <= 0 or size % page_size:
        problem = f"must be a positive multiple of the page size {page_size}"
        raise ConfigError(f"region {name!r}: size {size} is not a positive multiple of the "
                          f"page size {page_size}", parameter="size", problem=problem,
                          involves=("page_size",))


def _open_region_file(path: str, size: int, file_id: tuple[int, int],
                      read_only: bool = False) -> int:
    """Open a region's file read-write, by the resolved path its creator
    recorded: a link there now was put by someone else, and is not followed;
    another file put there since (``file_id`` is the creator's) is refused,
    as a file shorter than the region is (mapping it would SIGBUS)."""
    fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
                 | os.O_NOFOLLOW | os.O_NONBLOCK)      # a FIFO put there: no wait, refused
    try:
        _check_identity(file_identity(fd), file_id, f"region file {path}")
        if os.fstat(fd).st_size < size:
            raise ConfigError(f"region file {path} shrank below {size} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_identity(found: tuple[int, int], file_id: tuple[int, int], what: str) -> None:
    """The file found (its device and inode) is the one the region's creator mapped:
    one renamed over its path since would split a migration between two files."""
    if found != file_id:
        raise ConfigError(f"{what} was replaced by another file since the region was "
                          f"made (device and inode {found}, expected {file_id})")


def region_to_add(region: object, what: str = "add_region(region)") -> "Region":
    """``add_region``'s argument (or ``what`` else gives a region), checked: a Region
    (TypeError) that is open (ConfigError: a closed region's memory may be gone, and
    its segments are)."""
    if not isinstance(region, Region):
        raise type_error(what, "a fastmfd.Region", region)
    if region.closed:
        raise ConfigError(f"{what}: region {region.name!r} is closed")
    return region


def first_file_changed(regions: list["Region"]) -> str | None:
    """What befell the first of ``regions`` whose file changed (Region.file_changed)."""
    return next(filter(None, (region.file_changed() for region in regions)), None)


@contextlib.contextmanager
def closed_regions_named(regions: Sequence["Region"]) -> Iterator[None]:
    """A session's use of ``regions``: one closed meanwhile (by another thread)
    fails it naming the region, not with the ValueError of its dirty bitmap (a
    structure the user never made), and the peer is told that."""
    try:
        yield
    except ValueError as exc:
        closed = next((region for region in regions if region.closed), None)
        if closed is None:
            raise
        raise MigrationError(f"region {closed.name!r} was closed during the migration") from exc


class Region:
    """A named block of ``size`` bytes (a multiple of ``page_size``) shared by processes.

    ``name``: 1..255 UTF-8 bytes, no control characters; SETUP carries it, and the
    destination receives the region by it (``result.regions[name]``, ``add_region``).
    Made by :meth:`create`, :meth:`from_file`, :meth:`from_fd` or :meth:`attach`."""

    def __init__(self, name: str, size: int, page_size: int, kind: str, location: str,
                 file_id: tuple[int, int], mapping: mmap.mmap | SharedMemory,
                 dirty: DirtyBitmap, owner: bool, huge_pages: bool = False,
                 read_only: bool = False) -> None:
        self.name, self.size, self.page_size, self.owner = name, size, page_size, owner
        self._kind, self._location, self._file_id = kind, location, file_id
        self._mapping: mmap.mmap | SharedMemory | None = mapping    # None once closed
        self._dirty = dirty
        self.read_only = read_only
        """Mapped from a file opened for reading (a source's image it may not, or
        need not, write): ``buffer`` and ``array`` are read-only, no process maps
        it writable, and a destination refuses it."""
        self._buffer: memoryview | None = None     # (a repr of one whose mapping failed)
        view = mapping.buf if isinstance(mapping, SharedMemory) else mapped_view(mapping, size)
        self._buffer = view.toreadonly() if read_only else view
        self._array: npt.NDArray[np.uint8] | None = None
        self.huge_pages = huge_pages
        """Pages are faulted in as huge pages where the system allows (see
        :mod:`fastmfd.huge_pages`): every process that maps it asks."""
        if huge_pages:
            advise_huge_pages(mapping if isinstance(mapping, mmap.mmap) else mapping.mapping)
        self.faulted_in = False
        """Every page is allocated already (a destination's prealloc did it, or the
        region came warm): a later prealloc skips it."""
        self.zero_filled = False
        """Every byte is zero: new memory that nothing has written. A destination
        takes a region its ``region_factory`` returns with this set as it takes
        its own new memory: it writes no zero page into it and places pages into
        it. Set it only on a region nothing has written (a file just created)."""

    # ------------------------------------------------------------ construction
    @classmethod
    def create(cls, name: str, size: int, *, page_size: int = 4096,
               huge_pages: bool = False) -> "Region":
        """A new zero-filled region in shared memory, owned by this process.

        The memory is allocated as pages are first written (a destination's
        receive workers place them, or populate each run they write, failing
        cleanly when ``/dev/shm`` is full); the region must fit in what ``/dev/shm`` has
        free now (ConfigError otherwise). Each page written counts against this
        process's memory cgroup too, which is not checked here (a zero page is
        never written, so a region larger than the cgroup's room may well fit):
        past the cgroup's limit the kernel's out-of-memory killer ends the
        process. ``huge_pages``: ask for transparent huge pages (ConfigError,
        saying why, where the system gives none)."""
        name, size, page_size, huge_pages = check_types(
            "Region.create", name=(name, STR), size=(size, INT), page_size=(page_size, INT),
            huge_pages=(huge_pages, BOOL))
        if huge_pages:
            check_huge_pages(SHM_DIR)
        validate_region_name(name)
        _validate_size(name, size, page_size)
        check_room(size, f"region {name!r}")
        data = SharedMemory.create(size, tag=f"region-{name}", allocate=False,
                                   huge_aligned=huge_pages)
        return cls._holding(data, lambda: DirtyBitmap.create(size // page_size,
                                                             tag=f"dirty-{name}"),
                            name, size, page_size, "shm", data.name, data.file_id, owner=True,
                            huge_pages=huge_pages)

    @classmethod
    def _holding(cls, mapping: mmap.mmap | SharedMemory,
                 dirty_bitmap: Callable[[], DirtyBitmap], name: str, size: int,
                 page_size: int, kind: str, location: str, file_id: tuple[int, int], *,
                 owner: bool, huge_pages: bool, read_only: bool = False) -> "Region":
        """The Region of ``mapping`` and of the bitmap ``dirty_bitmap()`` makes or
        attaches; when that or the Region fails (huge pages refused, a mapping's view, a
        signal), both are closed, a segment made here removed: from_file and attach left
        them mapped, the bitmap's segment in /dev/shm until the process ended."""
        try:
            dirty = dirty_bitmap()
            try:
                return cls(name, size, page_size, kind, location, file_id, mapping, dirty,
                           owner=owner, huge_pages=huge_pages, read_only=read_only)
            except BaseException:
                dirty.close()
                raise
        except BaseException:
            mapping.close()
            raise

    @classmethod
    def from_file(cls, name: str, path: str | os.PathLike[str], *, size: int | None = None,
                  page_size: int = 4096, exclusive: bool = False,
                  dir_fd: int | None = None, huge_pages: bool = False,
                  read_only: bool = False) -> "Region":
        """Map a file ``MAP_SHARED``; writes go to the file.

        Without ``size`` the file's size is the region's. With ``size`` a
        missing file is created and a shorter one extended (with zeros).
        ``exclusive`` (with ``size``): create a new file, failing if anything
        exists at ``path`` — a symbolic link included, which is never
        followed. ``dir_fd``: ``path`` is relative to that open directory.
        ``huge_pages``: ask for transparent huge pages (the caller checks
        first that the file's file system gives them:
        :func:`fastmfd.huge_pages.why_no_huge_pages` says why not, None if it does).
        ``read_only``: open the file for reading only (a source's image: it needs
        no write access, and nothing can write it through the region).
        """
        name, path, size, page_size, exclusive, dir_fd, huge_pages, read_only = check_types(
            "Region.from_file", name=(name, STR), path=(path, PATH), size=(size, optional(INT)),
            page_size=(page_size, INT), exclusive=(exclusive, BOOL),
            dir_fd=(dir_fd, optional(INT)), huge_pages=(huge_pages, BOOL),
            read_only=(read_only, BOOL))
        validate_region_name(name)
        if read_only and size is not None:
            raise ConfigError(f"region {name!r}: a read-only file is taken as it is (no size)")
        if size is not None:
            _validate_size(name, size, page_size)     # before O_CREAT: refuse, create nothing
        elif exclusive:
            raise ConfigError(f"region {name!r}: an exclusive file needs a size")
        path = os.fspath(path)
        # O_NONBLOCK: a FIFO at ``path`` is refused below (not a regular file), not
        # waited on for a writer, for ever (`fastmfd send FIFO` hung); mapping a regular
        # file ignores it.
        flags = ((os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
                 | (os.O_CREAT if size is not None else 0))
        if exclusive:
            flags |= os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600, dir_fd=dir_fd)     # memory is private
        except OSError as exc:
            raise ConfigError(f"region {name!r}: cannot open {path}: {exc.strerror}") from None
        try:
            return cls.from_fd(name, fd, size=size, page_size=page_size, huge_pages=huge_pages)
        except BaseException:
            if exclusive:           # the file is the one this call created: none is left
                os.unlink(path, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)

    @classmethod
    def from_fd(cls, name: str, fd: int, *, size: int | None = None, page_size: int = 4096,
                huge_pages: bool = False) -> "Region":
        """Map the open file ``fd`` ``MAP_SHARED`` (the caller keeps and closes ``fd``),
        as :meth:`from_file` does: one opened by whoever checked what it is."""
        name, fd, size, page_size, huge_pages = check_types(
            "Region.from_fd", name=(name, STR), fd=(fd, INT), size=(size, optional(INT)),
            page_size=(page_size, INT), huge_pages=(huge_pages, BOOL))
        validate_region_name(name)
        location = os.readlink(f"/proc/self/fd/{fd}")   # what was opened, links resolved
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            what = "a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file"
            raise ConfigError(f"region {name!r}: {location} is {what}: a region maps a file")
        file_id = file_identity(fd)
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        actual = status.st_size
        if size is None:
            size = actual
        _validate_size(name, size, page_size)
        if actual < size:
            if read_only:
                raise ConfigError(f"region {name!r}: {location} has {actual} bytes, fewer "
                                  f"than {size}, and is open for reading only")
        doing = f"extend {location} to {format_bytes(size)}"
        try:
            if actual < size:
                os.ftruncate(fd, size)
            doing = f"map {location} ({format_bytes(size)})"
            mapping = map_file(fd, size, huge_aligned=huge_pages, writable=not read_only)
        except OSError as exc:
            # The bare errno text ("File too large") named neither the file nor the limit
            raise ConfigError(f"region {name!r}: cannot {doing}: {os.strerror(exc.errno or 0)}"
                              f"{limit_hint(exc.errno, size)}") from None
        return cls._holding(mapping, lambda: DirtyBitmap.create(size // page_size,
                                                                tag=f"dirty-{name}"),
                            name, size, page_size, "file", location, file_id, owner=True,
                            huge_pages=huge_pages, read_only=read_only)

    @classmethod
    def attach(cls, handle: RegionHandle) -> "Region":
        """Map a region another process created."""
        check_types("Region.attach",
                    handle=(handle, instance_of(RegionHandle, "a RegionHandle (region.handle)")))
        mapping: mmap.mmap | SharedMemory
        if handle.kind == "shm":
            mapping = SharedMemory.attach(handle.location, handle.size,
                                          huge_aligned=handle.huge_pages)
            try:
                _check_identity(mapping.file_id, handle.file_id,
                                f"shared memory segment {handle.location}")
            except ConfigError:
                mapping.close()
                raise
        else:
            try:
                fd = _open_region_file(handle.location, handle.size, handle.file_id,
                                       handle.read_only)
            except OSError as exc:      # (gone: a ConfigError, as a segment gone is)
                if exc.errno not in (errno.ENOENT, errno.ELOOP):
                    raise               # (EMFILE, ENOMEM: this host's, said as a child's)
                why = ("a symbolic link was put there, which is never followed"
                       if exc.errno == errno.ELOOP else exc.strerror or str(exc))
                raise ConfigError(f"region {handle.name!r}: cannot open {handle.location}: "
                                  f"{why}") from None
            try:
                mapping = map_file(fd, handle.size, huge_aligned=handle.huge_pages,
                                   writable=not handle.read_only)
            finally:
                os.close(fd)
        return cls._holding(mapping, lambda: DirtyBitmap.attach(handle.dirty), handle.name,
                            handle.size, handle.page_size, handle.kind, handle.location,
                            handle.file_id, owner=False, huge_pages=handle.huge_pages,
                            read_only=handle.read_only)

    def open_file(self) -> io.FileIO:
        """The region's file opened anew (a destination's receive workers map it
        a second time to place pages into fresh memory). The caller closes it.
        Like :meth:`attach`, follows no link put where the file was."""
        path = (os.path.join(SHM_DIR, self._location) if self._kind == "shm"
                else self._location)
        return io.FileIO(_open_region_file(path, self.size, self._file_id, self.read_only),
                         "r" if self.read_only else "r+", closefd=True)

    def file_changed(self) -> str | None:
        """What befell the region's file since it was mapped (another put at its
        path, or cut shorter than the region: a read of the lost part is a
        SIGBUS), or None."""
        try:
            self.open_file().close()
        except (ConfigError, OSError) as exc:
            return str(exc)
        return None

    # ------------------------------------------------------------ access
    @property
    def handle(self) -> RegionHandle:
        """What another process attaches the region by."""
        self._check_open()
        return RegionHandle(self.name, self.size, self.page_size, self._kind, self._location,
                            self._file_id, self._dirty.name, self.huge_pages, self.read_only)

    @property
    def buffer(self) -> memoryview:
        """The region's bytes, without a copy (writable, unless the region is read-only)."""
        return self._check_open()

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """A numpy ``uint8`` view of the region (shares memory; writable, unless the
        region is read-only)."""
        if self._array is None:
            self._array = np.frombuffer(self.buffer, dtype=np.uint8)
        return self._array

    @property
    def npages(self) -> int:
        """The region's size in pages."""
        return self.size // self.page_size

    @property
    def dirty(self) -> DirtyBitmap:
        """The region's dirty bitmap (one bit per page)."""
        return self._dirty

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record that bytes ``offset .. offset+length`` changed (call after writing).
        A range outside the region, or of a negative length, is a ConfigError; a
        closed region, a ValueError (as its ``buffer``)."""
        self._check_open()      # (its bitmap's own error names no region)
        if type(offset) is not int or type(length) is not int:     # cheap: called often
            offset, length = check_types("mark_dirty", offset=(offset, INT),
                                         length=(length, INT))
        if length <= 0:
            if length < 0:
                raise ConfigError(f"mark_dirty(length) {length}: no range of region "
                                  f"{self.name!r} has a negative length", parameter="length",
                                  problem="must be >= 0")
            return
        if offset < 0 or offset + length > self.size:
            raise ConfigError(f"mark_dirty({offset}, {length}): bytes {offset}.."
                              f"{offset + length} outside region {self.name!r} of "
                              f"{self.size} bytes", parameter="offset", involves=("length",),
                              problem=f"must start a range within the region's {self.size} "
                                      f"bytes")
        first = offset // self.page_size
        last = (offset + length - 1) // self.page_size
        self._dirty.mark(first, last - first + 1)

    def flush(self, between: Callable[[], object] | None = None) -> None:
        """Make a file-backed region's bytes durable: write its dirty pages to the
        file and wait for the disk (``msync``); nothing for shared memory.
        Raises OSError (a full disk: ENOSPC, EIO). ``between()`` is called before
        each FLUSH_SLICE bytes, and may raise (a cancel: on a slow disk, the
        msync of a large file outlasts what a close() waits for)."""
        self._check_open()
        if not isinstance(self._mapping, mmap.mmap):    # not a file's mapping (kind "file")
            return
        for offset in range(0, self.size, FLUSH_SLICE):
            if between is not None:
                between()
            self._mapping.flush(offset, min(FLUSH_SLICE, self.size - offset))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (its bytes are then out of reach)."""
        return self._buffer is None

    def _check_open(self) -> memoryview:
        """The region's bytes; ValueError once it is closed."""
        if self._buffer is None:
            raise ValueError(f"region {self.name!r} is closed")
        return self._buffer

    def close(self) -> None:
        """Close the region; the owner also removes its shared-memory segments.

        The memory is unmapped at once or, while views handed out (``array``,
        ``buffer`` slices) are alive, when the last of them is dropped: they hold
        the mapping, as a numpy.memmap's arrays hold theirs, and stay usable until
        then. The region is closed either way: its ``buffer``, ``array`` and
        ``handle`` raise ValueError, and a Source or Destination refuses it.
        """
        if self._buffer is None:
            return
        for segment in self._owned_segments():
            segment.unlink()
        self._array = self._buffer = None
        self._dirty.close()
        mapping, self._mapping = self._mapping, None
        assert mapping is not None, "mapped while open"
        try:
            mapping.close()
        except BufferError:
            pass            # a view holds the mapping: it goes with the last one

    def _owned_segments(self) -> list[SharedMemory]:
        segments = [self._dirty.segment]
        if isinstance(self._mapping, SharedMemory):     # kind "shm"
            segments.append(self._mapping)
        return [s for s in segments if s.owner]

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "shm" if self._kind == "shm" else self._location
        state = ", read-only" if self.read_only else ""
        if self.closed:         # (its bytes out of reach: result.regions after the Destination)
            state += ", closed"
        return f"<Region {self.name!r} {self.size} bytes ({where}{state})>"
