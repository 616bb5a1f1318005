"""Warm region files for a long-running ``fastmfd listen --prealloc``: :class:`WarmFiles`.

``listen`` writes each region into a file of its own (``DIR/<uuid>/<region>.img``),
which the user keeps: the memory of one session cannot be reused by the next.
What can be done ahead is the faulting in. Between sessions, a thread makes one
new file per region of the last session's geometry in a hidden directory of
DIR and faults it in (every page allocated: blocks and page cache, or tmpfs
pages); the next session of that geometry renames it to its ``.part`` name
instead of creating an empty one, so it lands in memory that is there, and
its prealloc skips it::

    listen_sessions      after a session: refill(its regions' sizes)   (returns at once)
    refill thread        per size not held: DIR/.fastmfd-warm-*/N.filling, created O_EXCL,
                         faulted in a slice at a time (close() stops it between two
                         slices), then renamed N: ready
    OutputDir.plan()     stop_refill(): a refill still running stops, its file removed;
                         keep(its sizes): the files of other sizes removed (counted as free
                         room by its check: the session cannot use them)
    OutputDir.region()   take(size, page_size): a warm file, renamed to NAME.img.part
    close()              stops the thread, removes the hidden directory and what is in it
    (a listener killed)  its directory, named with its pid, is removed by the next one
                         in DIR that finds the pid gone

A warm file is new: it holds zeros, never another session's bytes. The files
held are bounded by ``max_bytes`` (``--max-memory``) and are at most one of
each size of the last session: a session of another geometry frees them before
its regions are made.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable

from .. import _core
from ..errors import FastMFDError
from ..regions import Region
from ..threads import start_thread

__all__ = ["WarmFiles", "SLICE", "FILLING"]

log = logging.getLogger("fastmfd")

SLICE = 64 << 20        # bytes faulted in between two looks at close()
PREFIX = ".fastmfd-warm-"       # then the listener's pid, "-" and mkdtemp's letters
FILLING = ".filling"    # the name's suffix until the file is all faulted in

Size = tuple[int, int]  # bytes, page size


class WarmFiles:
    """Faulted-in spare region files in a hidden directory of ``directory``."""

    def __init__(self, directory: str, max_bytes: int | None = None,
                 huge_pages: bool = False) -> None:
        os.makedirs(directory, exist_ok=True)
        _remove_orphans(directory)
        self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=directory)
        self.max_bytes = max_bytes
        self.huge_pages = huge_pages    # faulted in as the region files will map them
        self._lock = threading.Lock()
        self._ready: dict[Size, str] = {}           # one faulted-in file per size
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._stopping = threading.Event()          # a session began: the refill stops
        self._count = 0

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._ready)

    def keep(self, sizes: Iterable[Size]) -> None:
        """Remove the held files of sizes not in ``sizes``: a session whose regions
        are ``sizes`` cannot use them, and needs their room."""
        with self._lock:
            self._keep(set(sizes))

    def _keep(self, sizes: set[Size]) -> None:
        for size in [s for s in self._ready if s not in sizes]:
            os.unlink(self._ready.pop(size))

    def stop_refill(self) -> None:
        """A session begins: a refill still running stops between two slices and
        removes the file it was faulting in. Left running, that file was held
        through the session unseen: its room not counted free by the session's
        check (a session that fitted was refused), and, done, a file of the last
        session's size kept beside the new one's regions."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping.set()
        thread.join()
        self._stopping.clear()

    def _stopped(self) -> bool:
        return self._closing.is_set() or self._stopping.is_set()

    def take(self, size: int, page_size: int) -> str | None:
        """The path of a faulted-in file of ``size`` bytes (now the caller's to
        rename), or None: none is ready (never waits for one)."""
        with self._lock:
            return self._ready.pop((size, page_size), None)

    def refill(self, sizes: Iterable[Size]) -> None:
        """In the background, fault in one file of each of ``sizes`` not held yet;
        files of other sizes are removed. Does nothing while a refill runs."""
        wanted = list(dict.fromkeys(sizes))
        with self._lock:
            if self._closing.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._keep(set(wanted))
            missing = [s for s in wanted if s not in self._ready]
            total = sum(size for size, _ in wanted)
            if not missing or (self.max_bytes is not None and total > self.max_bytes):
                return
            thread = threading.Thread(target=self._fill, args=(missing,), daemon=True,
                                      name="fastmfd warm files")
            try:
                self._thread = start_thread(thread)
            except FastMFDError as exc:     # the thread limit: no warm file, as a full disk
                log.warning("could not prepare warm region files: %s", exc)

    def wait(self) -> None:
        """Return once a refill running is done (its files ready, unless it failed
        or was stopped: :attr:`held_bytes` tells)."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def _fill(self, sizes: list[Size]) -> None:
        for size, page_size in sizes:
            if self._stopped():
                return
            self._count += 1
            path = os.path.join(self.path, str(self._count))
            filling = path + FILLING
            try:
                done = self._fault_in(filling, size, page_size)
            except (OSError, FastMFDError) as exc:      # a full disk: no warm file, that is all
                log.warning("could not prepare a warm region file of %d bytes: %s", size, exc)
                done = False
            with self._lock:
                if done and not self._stopped():
                    os.rename(filling, path)
                    self._ready[(size, page_size)] = path
                    continue
            if os.path.exists(filling):
                os.unlink(filling)

    def _fault_in(self, path: str, size: int, page_size: int) -> bool:
        """Create ``path`` and fault every page in; False if stopped meanwhile."""
        with Region.from_file("warm", path, size=size, page_size=page_size,
                              exclusive=True, huge_pages=self.huge_pages) as region:
            for start in range(0, size, SLICE):
                if self._stopped():
                    return False
                with region.buffer[start:start + SLICE] as part:
                    _core.populate(part, f"warm region file {path}")
        return True

    def close(self) -> None:
        """Stop faulting in, remove every file held (idempotent)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._ready.clear()
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "WarmFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_orphans(directory: str) -> None:
    """Remove the warm files of listeners that were killed (their close() never ran):
    up to ``--max-memory`` of faulted-in memory or disk each, which no one else
    would. Only directories of this user whose pid is gone (a live process of that
    pid, a listener or not, keeps its own)."""
    for name in os.listdir(directory):
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not name.startswith(PREFIX) or not pid.isdigit():
            continue
        path = os.path.join(directory, name)
        try:
            st = os.stat(path, follow_symlinks=False)
            if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s: the warm files of a listener that was killed", path)
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue                # gone meanwhile, or a process of another user: alive

