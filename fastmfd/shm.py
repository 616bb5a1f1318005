"""Named POSIX shared-memory segments with one owner.

Every segment fastmfd creates is a file ``/dev/shm/fastmfd-*`` so a leak is
easy to find, named ``fastmfd-TAG-PID-RANDOM`` after the process that created
it (:func:`creator_pid`): which run a segment is from, on a machine where
several run at once; RANDOM starts with the token of its owner's lock file
``fastmfd-owner-PID-TOKEN``. The process that creates a segment owns it: only the owner
unlinks it. Other processes *attach* by name and only ever close their
mapping (CPython's ``SharedMemory`` registers attachers with the resource
tracker too, which can unlink a segment another process still uses —
python/cpython#82300 — so it is not used here).

The owner registers each segment with multiprocessing's resource tracker, a
separate process that outlives its clients: if the owner dies without unlinking
(SIGKILL, a crash), the tracker unlinks the segment once every process of the
tree has exited, or a sweep does sooner, once no process is attached to it
(:mod:`fastmfd.shm_owners`). The tracker is in the tree's process group and
cgroup, though: a kill of the whole (``kill -9 -PGID``, systemd's final SIGKILL
of a service, ``docker kill``, an OOM kill of the group) kills it too, and its
segments stay until the next fastmfd process of this user creates its first
segment and sweeps those of owners dead by their lock, with no process attached
to them (:mod:`fastmfd.shm_owners`). That unlinking is the tracker's job, not a
leak: fastmfd starts the tracker (:func:`start_tracker`) told not to print that
it found "leaked shared_memory objects" — said on the terminal of a killed
``fastmfd send``, it told the user segments leaked when none did — and deaf to a
hangup: multiprocessing's ignores SIGINT and SIGTERM, and a terminal's hangup
(an ssh connection dropped) signals its whole process group, the tracker with
the owner, which left every segment of an owner that died of it. A tracker
someone else started first (the program used multiprocessing before fastmfd) is
theirs, and still says it and dies of it.

Creating a segment allocates its memory up front (``posix_fallocate``) unless
the creator says otherwise: a full ``/dev/shm`` is then a clean ``ConfigError``
at creation rather than a SIGBUS in whichever process first touches a page
that tmpfs cannot back. Large segments written only as data arrives (a
destination's regions, its device-state pool) are created sparse instead,
after a check that ``/dev/shm`` has room (:func:`check_room`); their writers
populate each run of pages before writing it and fail cleanly when that fails.
Their pages count against this process's memory cgroup too, as they are
written (:func:`cgroup_room`): past its limit the kernel's OOM killer ends a
process, which no check of the segments' sizes can foresee, since a zero page
is never written; only memory that will be written whole (a destination's
prealloc) is refused up front.

A mapping keeps no file descriptor open (:func:`map_file`): CPython's
``mmap`` keeps a duplicate of the descriptor for as long as the mapping
lives, two per region, and a few hundred regions would reach the usual limit
of 1024 open files in every process that maps them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import resource
import secrets
import signal
import stat
import sys
from multiprocessing import resource_tracker

from .errors import ConfigError
from .safe_path import safe_import_path
from .shm_owners import (RANDOM_CHARS, SEGMENT_PREFIX, SHM_DIR, hold_owner, is_owner_file,
                         let_go_of_owner, owner_lives, owner_of, owner_token)
from .units import format_bytes

__all__ = ["SharedMemory", "SHM_DIR", "SEGMENT_PREFIX", "HUGE_PAGE", "list_segments",
           "new_name", "creator_pid", "start_tracker", "map_file", "mapped_view",
           "free_bytes", "check_room", "check_usable", "limit_hint", "proc_kib",
           "memory_cgroup", "cgroup_room", "NO_LIMIT", "SHM_LEFT"]

# Where no max_memory bounds a destination's device-state pool (session_regions).
SHM_LEFT = f"what {SHM_DIR} has free, within what this process's memory cgroup has left"
HUGE_PAGE = 2 << 20     # a transparent huge page (x86-64, arm64 with 4 KiB pages)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _aligned_offset(mapping: mmap.mmap, size: int) -> int:
    """Where in ``mapping`` the file's ``size`` bytes start: 0, or past the
    slack map_file reserved to align them (to HUGE_PAGE)."""
    if len(mapping) == size:
        return 0
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return -ctypes.addressof(anchor) % HUGE_PAGE
    finally:
        del anchor          # an exported buffer: the mapping cannot close while it lives


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)    # Linux's; Python 3.11 lacks the name


def map_file(fd: int, size: int, *, huge_aligned: bool = False,
             writable: bool = True) -> mmap.mmap:
    """Map the first ``size`` bytes of ``fd`` shared (and ``writable``), keeping no
    descriptor; a mapping that is not writable is read through a read-only view.

    An anonymous ``mmap`` reserves the address range (and owns it: closing it
    unmaps, and it refuses to close while views are exported, like any
    mmap); the file is then mapped over that same range with ``MAP_FIXED``.
    The caller may close ``fd`` at once. ``huge_aligned``: the file starts at
    a multiple of HUGE_PAGE (without it no huge page can map it), inside a
    reservation HUGE_PAGE longer; :func:`mapped_view` finds it."""
    slack = HUGE_PAGE if huge_aligned else 0
    # MAP_NORESERVE: the reservation is never written (the file is mapped over it),
    # so it must not be charged against the commit limit, which refuses a writable
    # shared mapping larger than RAM and swap: a sparse segment that /dev/shm has
    # room for could not be mapped.
    mapping = mmap.mmap(-1, size + slack, flags=mmap.MAP_SHARED | _MAP_NORESERVE)
    address = _aligned_offset(mapping, size)
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        address += ctypes.addressof(anchor)
        got = _libc.mmap(address, size, mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0),
                         mmap.MAP_SHARED | 0x10, fd, 0)        # 0x10: MAP_FIXED
        err = ctypes.get_errno()
    finally:
        del anchor
    if got is None or got == _MAP_FAILED or got != address:
        mapping.close()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return mapping


def mapped_view(mapping: mmap.mmap, size: int) -> memoryview:
    """The file's ``size`` bytes in a mapping :func:`map_file` made, writable."""
    offset = _aligned_offset(mapping, size)
    view = memoryview(mapping)
    return view if offset == 0 and len(mapping) == size else view[offset:offset + size]


# The limit of this process an errno may come from: ENOMEM of a mapping (a
# region's address space), EFBIG of a file grown past it.
_LIMITS = {errno.ENOMEM: (resource.RLIMIT_AS, "address-space limit", "RLIMIT_AS, ulimit -v"),
           errno.EFBIG: (resource.RLIMIT_FSIZE, "file-size limit", "RLIMIT_FSIZE, ulimit -f")}


def limit_hint(error: int | None, size: int | None = None) -> str:
    """" (this process's ... limit is N ...)" when the errno ``error`` can come from a
    limit this process has set: an EFBIG of a file of ``size`` bytes past its file-size
    limit, an ENOMEM of ``size`` more bytes of address space past its address-space
    limit (``size`` unknown: when over half of it is in use); "" otherwise. The bare
    errno text named nothing to raise; a limit that cannot be the cause is not named
    (a memory cgroup's ENOMEM beside a 64 GiB address-space limit)."""
    if error not in _LIMITS:
        return ""
    which, what, how = _LIMITS[error]
    limit = resource.getrlimit(which)[0]
    if limit == resource.RLIM_INFINITY:
        return ""
    if which == resource.RLIMIT_FSIZE:
        return f" (this process's {what} is {format_bytes(limit)}: {how})" \
            if size is None or size > limit else ""
    in_use = proc_kib("/proc/self/status", "VmSize")     # this process's address space
    if in_use is None or (in_use + size <= limit if size is not None else in_use <= limit // 2):
        return ""
    return (f" (this process's {what} is {format_bytes(limit)}, {format_bytes(in_use)} of it "
            f"in use: {how})")


def proc_kib(path: str, field: str) -> int | None:
    """A ``FIELD:  N kB`` line's value in bytes, of a /proc file that has such lines
    (``/proc/meminfo``'s MemAvailable, ``/proc/self/status``' VmSize); None where
    there is no such line."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def file_identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of the open file ``fd``: which file it is, whatever its path
    now names (the worker processes that open it again check they got this one)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def free_bytes(directory: str = SHM_DIR) -> int:
    """Bytes an unprivileged writer can still allocate in ``directory``'s file system."""
    try:
        st = os.statvfs(directory)
    except OSError:
        if directory == SHM_DIR:
            check_usable()      # what is wrong with it, and what to do: not a bare errno
        raise
    return st.f_bavail * st.f_frsize


def check_room(size: int, what: str) -> None:
    """ConfigError unless ``/dev/shm`` has room for ``size`` more bytes of ``what``."""
    free = free_bytes()
    if size > free:
        raise ConfigError(f"{what} needs {format_bytes(size)} of shared memory and {SHM_DIR} "
                          f"has {format_bytes(free)} free: free some, or give it more (a "
                          f"container's is 64 MiB unless started with a larger one, e.g. "
                          f"docker run --shm-size=4g)")


# The cgroup roots (v1: a directory per controller); v1's "no limit" is about 2**63
# rounded to pages, v2's is "max".
_CGROUP_ROOT = "/sys/fs/cgroup"
NO_LIMIT = 1 << 62


def memory_cgroup() -> tuple[str, str, str] | None:
    """(directory, events file, limit file) of this process's memory cgroup."""
    try:
        with open("/proc/self/cgroup") as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return None
    for entry in entries:
        if len(entry) == 3 and "memory" in entry[1].split(","):       # v1
            return (f"{_CGROUP_ROOT}/memory{entry[2]}", "memory.oom_control",
                    "memory.limit_in_bytes")
    for entry in entries:
        if len(entry) == 3 and entry[0] == "0" and entry[1] == "":     # v2
            return f"{_CGROUP_ROOT}{entry[2]}", "memory.events", "memory.max"
    return None


# What of a memory cgroup's memory.stat (its children's included) the kernel cannot
# reclaim to make room, swap aside: anonymous memory and tmpfs pages, and on v2 the
# kernel memory it cannot free. Not the page cache of files, nor reclaimable slab
# (dentries, inodes: a find or a build leaves 100 MB of them, which
# memory.usage_in_bytes and memory.current count; a review). v1's memory.stat does
# not split its kernel memory, so none of it is counted there: what a process holds
# of it (its stacks, page tables) is small beside a region, and a bound slightly
# too high never refuses what would fit. Each: (the keys that must be there, those
# counted where they are: small, and younger than some kernels).
_NOT_RECLAIMABLE = {
    "memory.limit_in_bytes": (("total_rss", "total_shmem"), ()),
    "memory.max": (("anon", "shmem"), ("kernel_stack", "pagetables", "percpu", "sock",
                                       "vmalloc", "slab_unreclaimable")),
}
# Where a key that must be there is not (v1 kernels whose memory.stat had no shmem
# line: every tmpfs page, a previous session's regions among them, was counted free;
# a review), what is used less the file pages (the LRUs; tmpfs pages are on the
# anonymous ones) is held.
_FILE_PAGES = {"memory.limit_in_bytes": ("total_inactive_file", "total_active_file"),
               "memory.max": ("inactive_file", "active_file")}


def cgroup_room() -> tuple[int, str] | None:
    """What this process's memory cgroups let it charge still, the least of its own and
    its parents' (a container's limit may be a parent's), with that limit said; None
    where none has a limit. Each: its limit less what is in use and cannot be
    reclaimed (_NOT_RECLAIMABLE), or, where memory.stat does not say, less all it
    uses."""
    cgroup = memory_cgroup()
    if cgroup is None:
        return None
    directory, _, limit_file = cgroup
    top = f"{_CGROUP_ROOT}/memory" if limit_file == "memory.limit_in_bytes" else _CGROUP_ROOT
    tightest: tuple[int, str] | None = None
    while directory.startswith(top):
        limit = _cgroup_value(f"{directory}/{limit_file}")
        held = _not_reclaimable(directory, limit_file)
        if limit is not None and limit < NO_LIMIT and held is not None:
            left = max(limit - held, 0)
            if tightest is None or left < tightest[0]:
                tightest = left, (f"{directory}/{limit_file} is {format_bytes(limit)}, about "
                                  f"{format_bytes(held)} of it not reclaimable")
        if directory == top:
            break
        directory = os.path.dirname(directory)
    return tightest


def _not_reclaimable(directory: str, limit_file: str) -> int | None:
    """What the memory cgroup ``directory`` holds that cannot be reclaimed
    (_NOT_RECLAIMABLE); where its memory.stat lacks a key that must be there, all it
    uses (memory.usage_in_bytes, memory.current) less its file pages (_FILE_PAGES);
    None where neither is known."""
    needed, where_there = _NOT_RECLAIMABLE[limit_file]
    stat = _cgroup_stat(directory)
    if all(key in stat for key in needed):
        return sum(stat.get(key, 0) for key in needed + where_there)
    usage = "memory.usage_in_bytes" if limit_file == "memory.limit_in_bytes" else "memory.current"
    used = _cgroup_value(f"{directory}/{usage}")
    if used is None:
        return None
    return max(used - sum(stat.get(key, 0) for key in _FILE_PAGES[limit_file]), 0)


def _cgroup_value(path: str) -> int | None:
    """A cgroup file's number; None where there is none (no such file, "max")."""
    try:
        with open(path) as file:
            text = file.read()
    except OSError:
        return None
    return int(text) if text.strip().isdigit() else None


def _cgroup_stat(directory: str) -> dict[str, int]:
    """The memory cgroup ``directory``'s memory.stat: its "key value" lines, read at
    once; empty where there is none."""
    try:
        with open(f"{directory}/memory.stat") as file:
            lines = [line.split() for line in file]
    except OSError:
        return {}
    return {line[0]: int(line[1]) for line in lines if len(line) == 2 and line[1].isdigit()}


def check_usable() -> None:
    """ConfigError unless this user can create files in ``/dev/shm``: where it is
    absent or read-only (a container started with --ipc=none, a sandbox), every
    session fails at its first segment, a listener's only at its source's SETUP."""
    try:
        st = os.stat(SHM_DIR)
    except OSError as exc:
        problem = "no such directory" if exc.errno == errno.ENOENT else exc.strerror
    else:
        if not stat.S_ISDIR(st.st_mode):
            problem = "not a directory"
        elif os.statvfs(SHM_DIR).f_flag & os.ST_RDONLY:
            problem = "a read-only file system"
        elif not os.access(SHM_DIR, os.W_OK | os.X_OK):
            problem = "not writable by this user"
        else:
            return
    raise ConfigError(unusable(problem))


def unusable(problem: str | None) -> str:
    """The error of a ``/dev/shm`` this user cannot create files in, for ``problem``."""
    return (f"{SHM_DIR}: {problem}: fastmfd keeps its shared memory there; mount a writable "
            f"tmpfs there (a container: one started without --ipc=none, e.g. docker run "
            f"--shm-size=4g)")


# A -W option for the tracker's process only: the UserWarnings its module prints there
# are its report of the segments it unlinked after their owner died.
_QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


def start_tracker() -> None:
    """Start multiprocessing's resource tracker unless it runs, with its warnings off
    and SIGHUP blocked.

    Its process takes its warning options from ``sys.warnoptions`` when it
    starts (multiprocessing.util._args_from_interpreter_flags); the option is
    there only for that moment. It inherits this thread's blocked signals, and
    unblocks only the two it ignores (SIGINT, SIGTERM): a hangup stays blocked
    for its whole life. Blocked here rather than ignored by this process, where
    a hangup meanwhile would be lost. Call it before anything starts the
    tracker: creating a segment, starting the forkserver."""
    sys.warnoptions.append(_QUIET_TRACKER)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        with safe_import_path():
            resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        sys.warnoptions.remove(_QUIET_TRACKER)


def list_segments() -> list[str]:
    """Names of the fastmfd segments that exist now (for leak checks), and of owner
    files whose process is gone (:mod:`fastmfd.shm_owners`: left, they are leaks
    too); a live process's owner file is its for its life, no leak, not listed.

    Only regular files are segments: a directory someone made there with the
    same prefix (a scratch dir, say) is not.
    """
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries
                  if e.name.startswith(SEGMENT_PREFIX) and e.is_file(follow_symlinks=False)
                  and not (is_owner_file(e.name) and owner_lives(e.name)))


def new_name(tag: str, owner: str = "") -> str:
    """A fresh ``fastmfd-TAG-PID-RANDOM`` name: which process made a segment (or a
    scratch directory) beside it, whoever else's share the directory. A segment's
    RANDOM starts with its ``owner``'s token (:mod:`fastmfd.shm_owners`)."""
    # ASCII only: the resource tracker speaks ASCII, and a name it cannot
    # register is a segment nobody would clean up.
    tag = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_"
                  for c in tag)[:40]
    random = owner + secrets.token_hex((RANDOM_CHARS - len(owner)) // 2)
    return f"{SEGMENT_PREFIX}{tag}-{os.getpid()}-{random}"


def creator_pid(name: str) -> int | None:
    """The pid of the process that created segment ``name`` (:meth:`SharedMemory.create`
    names it ``fastmfd-TAG-PID-RANDOM``), or owner file ``name``
    (:mod:`fastmfd.shm_owners`); None for a name it did not make."""
    owner = owner_of(name)
    return owner[0] if owner is not None else None


def _new_file(tag: str) -> tuple[int, str]:
    """A new segment file of this process's owner (:func:`owner_token`), open; its name.
    Registered with multiprocessing's resource tracker before it is made: a signal that
    lands between the two, as the CLI's SIGTERM raises, left one in /dev/shm that no
    one would remove (the demo's); registered, the tracker removes it as this ends."""
    owner = owner_token()
    while True:
        name = new_name(tag, owner)
        path = os.path.join(SHM_DIR, name)
        resource_tracker.register("/" + name, "shared_memory")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            return fd, name
        except FileExistsError:         # another's: not to be removed
            resource_tracker.unregister("/" + name, "shared_memory")
        except BaseException:           # (made, perhaps, as a signal came)
            with contextlib.suppress(OSError):
                os.unlink(path)
            resource_tracker.unregister("/" + name, "shared_memory")
            raise


class SharedMemory:
    """A mapped shared-memory segment: ``create`` it (owner) or ``attach`` to it."""

    __slots__ = ("name", "size", "owner", "file_id", "_mmap", "_buf", "__weakref__")

    def __init__(self, name: str, size: int, mapping: mmap.mmap, owner: bool,
                 file_id: tuple[int, int]) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self.file_id = file_id      # (st_dev, st_ino) of the file mapped: file_identity
        self._mmap: mmap.mmap | None = mapping
        self._buf: memoryview | None = mapped_view(mapping, size)

    @classmethod
    def create(cls, size: int, *, tag: str = "seg", allocate: bool | int = True,
               huge_aligned: bool = False) -> "SharedMemory":
        """Create and map a new segment of ``size`` bytes, filled with zeros.

        ``allocate``: True allocates it all now; False leaves it sparse (nothing is
        allocated until written: check the room first, and populate before
        writing, see the module doc); a number allocates that many first bytes.
        ``huge_aligned``: mapped where huge pages can map it (:func:`map_file`)."""
        if size <= 0:
            # A mapping cannot be empty (mmap refuses a zero-length file).
            raise ConfigError(f"segment size {size}: a segment holds at least 1 byte")
        start_tracker()         # before the owner file: the tracker removes it too
        try:
            fd, name = _new_file(tag)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EROFS, errno.EACCES, errno.ENOTDIR):
                # /dev/shm itself (absent, read-only, not ours): said as such
                raise ConfigError(unusable(exc.strerror)) from None
            raise
        path = os.path.join(SHM_DIR, name)
        try:
            try:
                os.ftruncate(fd, size)
                if allocate:
                    os.posix_fallocate(fd, 0, size if allocate is True else min(allocate, size))
                mapping = map_file(fd, size, huge_aligned=huge_aligned)
                file_id = file_identity(fd)
            except BaseException:
                os.unlink(path)
                resource_tracker.unregister("/" + name, "shared_memory")
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise ConfigError(
                    f"cannot allocate {size} bytes of shared memory in {SHM_DIR}: "
                    f"{exc.strerror}{limit_hint(exc.errno, size)}") from None
            raise
        finally:
            os.close(fd)
        return cls(name, size, mapping, owner=True, file_id=file_id)

    @classmethod
    def attach(cls, name: str, size: int | None = None, *, huge_aligned: bool = False
               ) -> "SharedMemory":
        """Map an existing segment. Attachers close; they never unlink.

        Only a segment of this user is mapped, never through a link: once its owner
        unlinked a name (a failed session), another user could put a file of theirs
        under it (names are listed in /dev/shm) for a late attacher to write into."""
        if not name.startswith(SEGMENT_PREFIX) or "/" in name:
            raise ConfigError(f"{name!r} is not a fastmfd segment name")
        hold_owner(name)        # its name stays while this is attached, its owner dead or not
        try:
            return cls._map_attached(name, size, huge_aligned)
        except BaseException:
            let_go_of_owner(name)
            raise

    @classmethod
    def _map_attached(cls, name: str, size: int | None, huge_aligned: bool) -> "SharedMemory":
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(f"shared memory segment {name!r} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"shared memory segment {name!r}: cannot open it: "
                              f"{exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise ConfigError(f"shared memory segment {name!r} belongs to another user "
                                  f"(uid {st.st_uid}): not mapping it")
            actual = st.st_size
            if size is not None and actual != size:
                raise ConfigError(f"segment {name!r} has {actual} bytes, expected {size}")
            if actual == 0:
                raise ConfigError(f"segment {name!r} is empty")
            mapping = map_file(fd, actual, huge_aligned=huge_aligned)
            file_id = file_identity(fd)
        finally:
            os.close(fd)
        return cls(name, actual, mapping, owner=False, file_id=file_id)

    @property
    def buf(self) -> memoryview:
        if self._buf is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._buf

    @property
    def mapping(self) -> mmap.mmap:
        """The mmap object of the segment's memory (for madvise)."""
        if self._mmap is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._mmap

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap; the owner first unlinks the name.

        Unmapping fails with BufferError while views of the memory are
        exported; the name is gone by then, so nothing leaks in /dev/shm and
        the memory is freed with the last view.
        """
        attached = not self.owner       # read before unlink(), which clears it
        if self.owner:
            self.unlink()
        if self._mmap is None:
            return
        self.buf.release()          # mapped: the view is there
        try:
            self._mmap.close()
        except BufferError:
            self._buf = mapped_view(self._mmap, self.size)
            raise
        self._mmap = None
        self._buf = None
        if attached:
            let_go_of_owner(self.name)

    def unlink(self) -> None:
        """Remove the name (owner only). The memory lives until the last unmap."""
        if not self.owner:
            raise ValueError(f"segment {self.name} is attached, not owned: only its owner unlinks")
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        self.owner = False
        try:
            resource_tracker.unregister("/" + self.name, "shared_memory")
        except OSError:
            # The tracker is gone (killed, or it could not start: a BrokenPipe).
            # The name is removed already; raising would leave the caller's
            # other segments (a region's dirty bitmap) linked.
            pass

    def __repr__(self) -> str:
        state = "owner" if self.owner else "attached"
        return f"<SharedMemory {self.name} {self.size} bytes, {state}>"
