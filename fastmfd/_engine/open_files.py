"""Open files at scale: what a session's processes hold against RLIMIT_NOFILE.

::

    main process (either side)            channel worker (one per channel)
      per channel: its data socket,         its own (socket, pipes, structures)
      command pipe, the worker's control    and one per region: the source reads
      pipe and sentinel                     its holes, the destination places
      (SOURCE_/DESTINATION_PER_CHANNEL)     pages

At the limits SETUP allows (255 channels, 4096 regions) both go past the usual
``ulimit -n`` of 1024, and the session died halfway with a bare 'Too many open
files'; so did 4096 regions (the most SETUP allows) in every channel worker. A
worker is fastmfd's own process: it raises its soft limit as far as the hard one
lets it. The caller's process is only checked, never changed. A session that
cannot fit is refused before it starts, naming the limit.

The process limit (cgroup pids.max, RLIMIT_NPROC) is not checked ahead (others'
processes count too): a worker process that cannot start fails the session naming
it (:data:`PROCESS_LIMIT`; a thread: :mod:`fastmfd.threads`), where "the worker
process exited with status 1" was said.
"""

from __future__ import annotations

import os
import resource

from ..errors import ConfigError, MigrationError

__all__ = ["check_session_files", "check_worker_files", "allow_worker_files",
           "check_room_for_child", "SOURCE_PER_CHANNEL", "DESTINATION_PER_CHANNEL",
           "PROCESS_LIMIT", "FORK_FAILED"]

# Files the main process opens per channel (counted with 255 channels): the
# source, checked as it is entered, before it starts its workers: each worker's
# control pipe, sentinel and process pipe, the data socket and its command pipe;
# the destination, checked at SETUP with its first workers started: a worker's
# control pipe and sentinel, the data socket and a descriptor passed on.
SOURCE_PER_CHANNEL = 5
DESTINATION_PER_CHANNEL = 4
SPARE = 32              # the main channel, shared structures, the reassembly process
WORKER_OWN = 64         # a channel worker's files besides its regions' (~20 counted)
# What starting a child takes in this process: its control pipe and sentinel, and
# the forkserver's connection and the descriptors passed over it while it starts.
CHILD_START = 8


def _limits() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    return (soft if soft != unlimited else 1 << 62), (hard if hard != unlimited else 1 << 62)


def _open_now() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_session_files(channels: int, per_channel: int, where: str) -> None:
    """ConfigError, before the session starts, if ``channels`` need more open files
    than this process (``where``: "the source", "this destination") may have."""
    soft, _ = _limits()
    open_now = _open_now()
    need = open_now + SPARE + per_channel * channels
    if need > soft:
        raise ConfigError(f"{channels} channels need about {need} open files in {where}'s "
                          f"process ({open_now} open now); its limit (RLIMIT_NOFILE, "
                          f"ulimit -n) is {soft}")


def check_worker_files(regions: int, where: str) -> None:
    """ConfigError, before the session starts, if a channel worker could not hold
    one file per region even at its hard limit (it inherits this process's)."""
    _, hard = _limits()
    need = WORKER_OWN + regions
    if need > hard:
        raise ConfigError(f"{regions} regions need about {need} open files in each of "
                          f"{where}'s channel workers (one per region); their hard limit "
                          f"(RLIMIT_NOFILE, ulimit -Hn) is {hard}")


def allow_worker_files(regions: int) -> None:
    """In a channel worker, before it opens the regions' files: its soft limit
    raised to hold them (within the hard limit, which :func:`check_worker_files`
    checked; ConfigError if it is lower)."""
    soft, hard = _limits()
    need = _open_now() + SPARE + regions
    if need <= soft:
        return
    if need > hard:
        raise ConfigError(f"{regions} regions need about {need} open files in a channel "
                          f"worker (one per region); its hard limit (RLIMIT_NOFILE, "
                          f"ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (need, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def check_room_for_child(name: str) -> None:
    """MigrationError unless this process has the files to start the child ``name``:
    ``listen --qemu`` starts a worker per channel as QEMU's connect (up to 255, which
    the usual ``ulimit -n`` of 1024 does not hold), and the forkserver, given the
    start of a child this process could not finish, died with a traceback of its own
    and took every worker with it; the session failed with 'Too many open files'."""
    soft, _ = _limits()
    open_now = _open_now()
    if open_now + CHILD_START > soft:
        raise MigrationError(f"cannot start the process: this process has {open_now} open "
                             f"files, and its limit (RLIMIT_NOFILE, ulimit -n) is {soft}: "
                             f"raise it, or use fewer channels", channel=name)


PROCESS_LIMIT = ("the process limit (cgroup pids.max, or RLIMIT_NPROC: ulimit -u) is reached: "
                 "raise it, or use fewer channels")
# The forkserver's exit status when a fork failed for want of a process (EAGAIN):
# see forkserver_exit. 75 is EX_TEMPFAIL (sysexits.h); Python's own failure is 1.
FORK_FAILED = 75

