"""Nothing an end-to-end test starts may outlive it: processes, shared memory, sockets.

Test modules opt in with ``from leakcheck import leaks  # noqa: F401`` (an
autouse fixture). It yields a :class:`LeakCheck`; failure tests call
``leaks.assert_clean()`` right after the session failed and the Source and
Destination were closed, and the fixture checks again after every test.

What counts as a leak, and why it is attributed this way:

- a child process of this test process still running, except multiprocessing's
  forkserver and resource tracker (started once, shared by every later test);
- a ``/dev/shm/fastmfd-*`` segment that *this process* created during the test
  and that still exists. The machine is shared with other sessions creating
  segments of their own, so a plain before/after listing of ``/dev/shm`` would
  blame them on us: creations are recorded by wrapping ``SharedMemory.create``
  (every owner — regions, pools, counters, selectors, mailboxes — goes through
  it, and owners live in the test process);
- a socket file descriptor of this process opened during the test and still
  open (a listener, a channel, a worker's control pipe).

Leftovers get a short grace period (a worker still exiting), then the test
fails and they are killed / unlinked / closed so one leak does not cascade.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing import forkserver, resource_tracker

import pytest

from fastmfd import shm
from fastmfd.shm import SHM_DIR, SharedMemory, list_segments

GRACE_SECONDS = 5.0


def _infrastructure_pids() -> set[int]:
    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    pids.discard(None)
    return pids


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


class LeakCheck:
    def __init__(self) -> None:
        self.created: set[str] = set()
        self._sockets_before = _socket_fds()

    # ------------------------------------------------------------ probes
    def processes(self) -> list:
        infra = _infrastructure_pids()
        return [p for p in multiprocessing.active_children() if p.pid not in infra]

    def segments(self, keep=()) -> set[str]:
        kept = {name for region in keep for name in (region.handle.location, region.handle.dirty)}
        return (self.created - kept) & set(list_segments())

    def sockets(self) -> dict[int, str]:
        now = _socket_fds()
        return {fd: t for fd, t in now.items() if self._sockets_before.get(fd) != t}

    # ------------------------------------------------------------ the check
    def problems(self, grace: float = GRACE_SECONDS, keep=()) -> list[str]:
        deadline = time.monotonic() + grace
        while True:
            found = {"child processes": self.processes(), "shared-memory segments":
                     sorted(self.segments(keep)), "open sockets": self.sockets()}
            if not any(found.values()) or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return [f"{what} outlived the test: {left}" for what, left in found.items() if left]

    def assert_clean(self, grace: float = GRACE_SECONDS, keep=()) -> None:
        """Fail if anything is left; ``keep``: regions the test still holds open."""
        problems = self.problems(grace, keep)
        if problems:
            self.clean_up(keep)
            pytest.fail("; ".join(problems), pytrace=False)

    def clean_up(self, keep=()) -> None:
        for proc in self.processes():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.join(GRACE_SECONDS)
        for name in self.segments(keep):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
        for fd in self.sockets():
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture(autouse=True)
def leaks(monkeypatch):
    """Record what the test creates; fail it if anything is left at the end."""
    check = LeakCheck()
    create = SharedMemory.create.__func__

    def recording_create(cls, *args, **kwargs):
        segment = create(cls, *args, **kwargs)
        check.created.add(segment.name)
        return segment

    monkeypatch.setattr(shm.SharedMemory, "create", classmethod(recording_create))
    yield check
    check.assert_clean()
