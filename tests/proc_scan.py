"""What /proc says about this run's processes and shared memory, for every leak
check: the tests' (``leakcheck``) and the soak's and fuzz campaign's
(``benchmarks/``). No pytest here: the benchmark harnesses import it as is."""

from __future__ import annotations

import ctypes
import os
import secrets
import select
import struct
import threading
import time
from multiprocessing import forkserver, resource_tracker

from fastmfd.shm import SEGMENT_PREFIX, SHM_DIR, creator_pid, list_segments

__all__ = ["alive", "infrastructure_pids", "os_children", "process_tree", "process_group",
           "left_by", "mapped_outside", "made_by_this_run", "watch_creators", "RUN_MARK",
           "carries_this_runs_mark"]

# Set in a run's environment by watch_creators, so inherited by every process it starts,
# and theirs: an orphan reparented to init is out of the run's tree, not out of its run.
RUN_MARK = "FASTMFD_TEST_RUN"


def alive(pid: int) -> bool:
    """Process ``pid`` exists and is no zombie (one orphaned to an init that
    does not reap stays a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", errors="surrogateescape") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def infrastructure_pids() -> set[int]:
    """multiprocessing's shared helpers, started once and kept for the whole run."""
    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    pids.discard(None)
    return pids


def os_children() -> set[int]:
    """Direct children of this process (any thread's), zombies included."""
    me = os.getpid()
    children: set[int] = set()
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children", errors="surrogateescape") as f:
                children.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:       # the thread ended meanwhile
            pass
    return children


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants, from /proc."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", errors="surrogateescape") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after it.
        parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent_of.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def process_group(pgid: int) -> dict[int, str]:
    """The processes of process group ``pgid``, zombies left out, by pid: their
    command lines (NUL-separated, as /proc has them)."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", errors="surrogateescape") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", errors="surrogateescape") as f:
                command = f.read()
        except OSError:         # its process ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found[int(entry)] = command
    return found


def left_by(pids: set[int], bound: float) -> tuple[set[int], set[str]]:
    """Of processes ``pids``, those still running and the segments they made that are
    still there, once both are gone or ``bound`` seconds on."""
    deadline = time.monotonic() + bound
    while True:
        running = {pid for pid in pids if alive(pid)}
        segments = {name for name in list_segments() if creator_pid(name) in pids}
        if not (running or segments) or time.monotonic() > deadline:
            return running, segments
        time.sleep(0.05)


def carries_this_runs_mark(pid: int) -> bool:
    """Whether process ``pid`` was started within this run (its parent gone or not):
    it carries the mark :func:`watch_creators` put in this process's environment."""
    mark = os.environ.get(RUN_MARK, "")
    if not mark.startswith(f"{os.getpid()}-"):
        return False            # not marked by this process (a benchmark harness, say)
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{RUN_MARK}={mark}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def mapped_outside(names: set[str], ours: set[int]) -> set[str]:
    """The segments among ``names`` that a process not in ``ours`` (nor of this run:
    an orphan of it) maps: the machine is shared with other sessions making segments
    of their own."""
    foreign: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps", errors="surrogateescape") as f:
                maps = f.read()
        except OSError:
            continue
        mapped = {n for n in names if f"{SHM_DIR}/{n}" in maps}
        if mapped and not carries_this_runs_mark(int(entry)):
            foreign |= mapped
    return foreign


def made_by_this_run(names: set[str]) -> set[str]:
    """The segments among ``names`` that this process or one of its descendants made
    (an orphan of them too, reparented to init: :func:`carries_this_runs_mark`): each
    name carries its creator's pid (shm.creator_pid). A creator gone by now is
    judged by what :func:`watch_creators` saw as it made the segment; one it could not
    place (not watching, or gone before it looked) counts as ours (a child that exited
    leaving its segment). A name without a pid is another version's, since every
    segment this code makes is named by SharedMemory.create."""
    watch = _watch if _watch is not None and _watch.root == os.getpid() else None
    if watch is not None:
        watch.place_queued()    # what it has not read yet was made before this call
    ours = process_tree(os.getpid())
    made = set()
    for name in names:
        pid = creator_pid(name)
        if pid is None:
            continue
        if pid in ours or carries_this_runs_mark(pid) or (
                not alive(pid) and (watch is None or watch.placed(name) is not False)):
            made.add(name)
    return made


# ---------------------------------------------------------------- who made a segment

def descends_from(pid: int, root: int) -> bool | None:
    """Whether process ``pid`` is ``root`` or one of its descendants now; None when
    that cannot be told (it, or a parent on the way up, is gone)."""
    for _ in range(64):     # (deeper than any tree of a test)
        if pid == root:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", errors="surrogateescape") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            return None
    return None


_IN_CREATE, _IN_MOVED_TO = 0x100, 0x80
_EVENT = struct.Struct("iIII")      # struct inotify_event: wd, mask, cookie, len; then the name
_KEPT = 20000                       # places remembered, before those of segments gone are dropped


class _CreatorWatch:
    """A thread that places each fastmfd segment as it appears in SHM_DIR (inotify):
    made by ``root``'s tree or not, while its creator still runs. Where several runs
    share the machine (other sessions, or pytest-xdist's workers, each a run of its
    own), a creator gone by the check could otherwise be any run's."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._placed: dict[str, bool | None] = {}
        self._lock = threading.Lock()
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self._fd, SHM_DIR.encode(), _IN_CREATE | _IN_MOVED_TO) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {SHM_DIR}")
        threading.Thread(target=self._run, name="segment creator watch", daemon=True).start()

    def placed(self, name: str) -> bool | None:
        """Whether ``root``'s tree made ``name``, as placed when it appeared; None if
        not placed (its creator was gone by then, or the watch started after)."""
        return self._placed.get(name)

    def _run(self) -> None:
        while True:
            select.select([self._fd], [], [])
            self.place_queued()

    def place_queued(self) -> None:
        """Place the segments whose events wait to be read."""
        with self._lock:
            while True:
                try:
                    data = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    return
                self._place(data)

    def _place(self, events: bytes) -> None:
        offset = 0
        while offset < len(events):
            _, _, _, size = _EVENT.unpack_from(events, offset)
            offset += _EVENT.size
            name = events[offset:offset + size].rstrip(b"\0").decode(errors="replace")
            offset += size
            pid = creator_pid(name) if name.startswith(SEGMENT_PREFIX) else None
            if pid is not None:
                placed = descends_from(pid, self.root)
                # Its parent died before this read (a test killed it): reparented to init,
                # out of the tree, and still this run's.
                if placed is not True and carries_this_runs_mark(pid):
                    placed = True
                self._placed[name] = placed
        if len(self._placed) > _KEPT:
            present = set(os.listdir(SHM_DIR))
            self._placed = {n: p for n, p in self._placed.items() if n in present}


_watch: _CreatorWatch | None = None


def watch_creators() -> None:
    """Start placing every segment's creator as it is made (see made_by_this_run),
    once per process; where inotify is unavailable, creators gone stay unplaced. Marks
    this process's environment (RUN_MARK) for the processes it starts from now on."""
    global _watch
    if _watch is None or _watch.root != os.getpid():
        os.environ[RUN_MARK] = f"{os.getpid()}-{secrets.token_hex(6)}"
        try:
            _watch = _CreatorWatch(os.getpid())
        except OSError:
            _watch = None
