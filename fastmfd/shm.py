"""Named POSIX shared-memory segments with one owner.

Every segment fastmfd creates is a file ``/dev/shm/fastmfd-*`` so a leak is
easy to find. The process that creates a segment owns it: only the owner
unlinks it. Other processes *attach* by name and only ever close their
mapping (CPython's ``SharedMemory`` registers attachers with the resource
tracker too, which can unlink a segment another process still uses —
python/cpython#82300 — so it is not used here).

The owner registers each segment with multiprocessing's resource tracker, a
separate process that outlives its clients: if the owner dies without
unlinking (SIGKILL, a crash), the tracker unlinks the segment once every
process of the tree has exited. So no segment outlives its owner's process
tree, whatever way it ends.

Creating a segment allocates its memory up front (``posix_fallocate``): a
full ``/dev/shm`` is then a clean ``ConfigError`` at creation rather than a
SIGBUS in whichever process first touches a page that tmpfs cannot back.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
from multiprocessing import resource_tracker

from .errors import ConfigError

__all__ = ["SharedMemory", "SHM_DIR", "SEGMENT_PREFIX", "list_segments"]

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "fastmfd-"


def list_segments() -> list[str]:
    """Names of the fastmfd segments that exist now (for leak checks).

    Only regular files are segments: a directory someone made there with the
    same prefix (a scratch dir, say) is not.
    """
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries
                  if e.name.startswith(SEGMENT_PREFIX) and e.is_file(follow_symlinks=False))


class SharedMemory:
    """A mapped shared-memory segment: ``create`` it (owner) or ``attach`` to it."""

    __slots__ = ("name", "size", "owner", "_mmap", "_buf", "__weakref__")

    def __init__(self, name: str, size: int, mapping: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._mmap: mmap.mmap | None = mapping
        self._buf: memoryview | None = memoryview(mapping)

    @classmethod
    def create(cls, size: int, *, tag: str = "seg", allocate: bool = True) -> "SharedMemory":
        """Create and map a new segment of ``size`` bytes, filled with zeros."""
        if size <= 0:
            # A mapping cannot be empty (mmap refuses a zero-length file).
            raise ConfigError(f"segment size {size}: a segment holds at least 1 byte")
        # ASCII only: the resource tracker speaks ASCII, and a name it cannot
        # register is a segment nobody would clean up.
        tag = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_"
                      for c in tag)[:40]
        while True:
            name = f"{SEGMENT_PREFIX}{tag}-{secrets.token_hex(6)}"
            path = os.path.join(SHM_DIR, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
        registered = False
        try:
            try:
                resource_tracker.register("/" + name, "shared_memory")
                registered = True
                os.ftruncate(fd, size)
                if allocate:
                    os.posix_fallocate(fd, 0, size)
                mapping = mmap.mmap(fd, size)
            except BaseException:
                os.unlink(path)
                if registered:
                    resource_tracker.unregister("/" + name, "shared_memory")
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise ConfigError(
                    f"cannot allocate {size} bytes of shared memory in {SHM_DIR}: "
                    f"{exc.strerror}") from None
            raise
        finally:
            os.close(fd)
        return cls(name, size, mapping, owner=True)

    @classmethod
    def attach(cls, name: str, size: int | None = None) -> "SharedMemory":
        """Map an existing segment. Attachers close; they never unlink."""
        if not name.startswith(SEGMENT_PREFIX) or "/" in name:
            raise ConfigError(f"{name!r} is not a fastmfd segment name")
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(f"shared memory segment {name!r} does not exist") from None
        try:
            actual = os.fstat(fd).st_size
            if size is not None and actual != size:
                raise ConfigError(f"segment {name!r} has {actual} bytes, expected {size}")
            if actual == 0:
                raise ConfigError(f"segment {name!r} is empty")
            mapping = mmap.mmap(fd, actual)
        finally:
            os.close(fd)
        return cls(name, actual, mapping, owner=False)

    @property
    def buf(self) -> memoryview:
        if self._buf is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._buf

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap; the owner first unlinks the name.

        Unmapping fails with BufferError while views of the memory are
        exported; the name is gone by then, so nothing leaks in /dev/shm and
        the memory is freed with the last view.
        """
        if self.owner:
            self.unlink()
        if self._mmap is None:
            return
        self._buf.release()
        try:
            self._mmap.close()
        except BufferError:
            self._buf = memoryview(self._mmap)
            raise
        self._mmap = None
        self._buf = None

    def unlink(self) -> None:
        """Remove the name (owner only). The memory lives until the last unmap."""
        if not self.owner:
            raise ValueError(f"segment {self.name} is attached, not owned: only its owner unlinks")
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        resource_tracker.unregister("/" + self.name, "shared_memory")
        self.owner = False

    def __repr__(self) -> str:
        state = "owner" if self.owner else "attached"
        return f"<SharedMemory {self.name} {self.size} bytes, {state}>"
