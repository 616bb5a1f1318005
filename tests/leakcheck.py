"""Nothing a test starts may outlive it: processes, shared memory, sockets.

``conftest.py`` loads this module as a plugin, so every test runs under the
autouse ``leaks`` fixture. It yields a :class:`LeakCheck`; failure tests call
``leaks.assert_clean(keep=[...])`` right after the session failed and the
Source and Destination closed, and the fixture checks again after the test.

What counts as a leak, and why it is attributed this way:

- a child process still running (or unreaped), except multiprocessing's
  forkserver and resource tracker, started once and shared by every test;
- a ``/dev/shm/fastmfd-*`` segment that appeared during the test and still
  exists, made by a process of this run's tree (its name says who made it:
  ``shm.creator_pid``; one gone by now was placed as it made the segment,
  ``proc_scan.watch_creators``), unless a process outside the tree maps it:
  the machine is shared with other sessions creating segments of their own,
  and pytest-xdist's workers are runs of their own;
- a socket of this process opened during the test and still open (a
  listener, a channel, a worker's control pipe).

Leftovers get a short grace period (a worker still exiting); then the test
fails and they are killed, unlinked or closed so one leak does not cascade
into the next test. Resources must therefore belong to the test (function
fixtures, ``with`` blocks), never to a module or the session.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from fastmfd.shm import SHM_DIR, list_segments
from proc_scan import (infrastructure_pids, made_by_this_run, mapped_outside, os_children,
                       process_tree, watch_creators)

GRACE_SECONDS = 5.0     # how long a leftover may take to go away on its own
POLL_SECONDS = 0.02


# ---------------------------------------------------------------- processes

def _leftover_processes() -> dict[int, object]:
    """pid -> what is left: a multiprocessing.Process, or None for a plain child."""
    # active_children() also sees forkserver children, which are not ours in
    # the OS sense; it reaps the finished ones as a side effect.
    infra = infrastructure_pids()
    left: dict[int, object] = {p.pid: p for p in multiprocessing.active_children()
                               if p.pid not in infra}
    for pid in os_children() - infra:
        left.setdefault(pid, None)
    return left


def _kill(leftovers: dict[int, object]) -> None:
    for pid, proc in leftovers.items():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc is not None:
            proc.join(GRACE_SECONDS)
        else:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


# ---------------------------------------------------------------- segments

def _mapped_elsewhere(names: set[str]) -> set[str]:
    """The segments among ``names`` that a process outside this run maps."""
    return mapped_outside(names, process_tree(os.getpid()))


# ---------------------------------------------------------------- sockets

def _socket_fds() -> dict[int, str]:
    """fd -> link target, for every socket this process has open."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:             # closed meanwhile (the listing's own fd, too)
            continue
        if target.startswith("socket:"):
            fds[int(name)] = target
    return fds


# ---------------------------------------------------------------- the check

class LeakCheck:
    """What existed when the test began, and the probes for what it left."""

    def __init__(self) -> None:
        watch_creators()
        self._segments_before = set(list_segments())
        self._sockets_before = _socket_fds()

    def segments(self, keep=()) -> set[str]:
        kept = {name for region in keep
                for name in (region.handle.location, region.handle.dirty)}
        new = made_by_this_run(set(list_segments()) - self._segments_before - kept)
        return new - _mapped_elsewhere(new) if new else new

    def sockets(self) -> dict[int, str]:
        return {fd: t for fd, t in _socket_fds().items() if self._sockets_before.get(fd) != t}

    def problems(self, keep=()) -> dict[str, object]:
        """What is still left after waiting up to GRACE_SECONDS for it to go."""
        deadline = time.monotonic() + GRACE_SECONDS
        while True:
            found = {"child processes": _leftover_processes(),
                     "shared-memory segments": self.segments(keep),
                     "open sockets": self.sockets()}
            if not any(found.values()) or time.monotonic() >= deadline:
                return {what: left for what, left in found.items() if left}
            time.sleep(POLL_SECONDS)

    def assert_clean(self, keep=()) -> None:
        """Fail if anything is left; ``keep``: regions the test still holds open."""
        problems = self.problems(keep)
        if not problems:
            return
        _kill(problems.get("child processes", {}))
        for name in problems.get("shared-memory segments", ()):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
        for fd in problems.get("open sockets", {}):
            try:
                os.close(fd)
            except OSError:
                pass
        pytest.fail("; ".join(f"{what} outlived the test: {sorted(left)}"
                              for what, left in problems.items()), pytrace=False)


@pytest.fixture(autouse=True)
def leaks():
    """Fail a test that leaves a process, segment or socket behind (then clean up)."""
    check = LeakCheck()
    yield check
    check.assert_clean()
