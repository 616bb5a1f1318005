"""What /proc says about this run's processes and shared memory, for every leak
check: the tests' (``leakcheck``) and the soak's and fuzz campaign's
(``benchmarks/``). No pytest here: the benchmark harnesses import it as is."""

from __future__ import annotations

import os
import time
from multiprocessing import forkserver, resource_tracker

from fastmfd.shm import SHM_DIR, creator_pid, list_segments

__all__ = ["alive", "infrastructure_pids", "os_children", "process_tree", "process_group",
           "left_by", "mapped_outside", "made_by_this_run"]


def alive(pid: int) -> bool:
    """Process ``pid`` exists and is no zombie (one orphaned to an init that
    does not reap stays a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
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
            with open(f"/proc/{me}/task/{task}/children") as f:
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
            with open(f"/proc/{entry}/stat") as f:
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
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline") as f:
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


def mapped_outside(names: set[str], ours: set[int]) -> set[str]:
    """The segments among ``names`` that a process not in ``ours`` maps: the machine
    is shared with other sessions making segments of their own."""
    foreign: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        foreign.update(n for n in names if f"{SHM_DIR}/{n}" in maps)
    return foreign


def made_by_this_run(names: set[str]) -> set[str]:
    """The segments among ``names`` that this process or one of its descendants made:
    each name carries its creator's pid (shm.creator_pid). A creator gone by now counts
    too (a child that exited leaving its segment); a name without a pid is another
    version's, since every segment this code makes is named by SharedMemory.create."""
    ours = process_tree(os.getpid())
    made = set()
    for name in names:
        pid = creator_pid(name)
        if pid is not None and (pid in ours or not alive(pid)):
            made.add(name)
    return made
