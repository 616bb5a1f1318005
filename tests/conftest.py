"""What every test shares: nothing a test starts may outlive it.

After each test, the autouse ``no_leaks`` fixture checks that

- every ``/dev/shm/fastmfd-*`` segment the test created is gone, and
- every child process it started has exited and been reaped,

waiting a few seconds for stragglers (a worker still shutting down) before it
fails the test, kills what is left and unlinks what leaked, so one leak does
not cascade into the next test. Resources must therefore belong to the test
(function-scoped fixtures, ``with`` blocks), never to a module or session.

Only two processes are allowed to outlive a test, because multiprocessing
starts them once and shares them with every later test: its forkserver and
its resource tracker.

The machine is shared: other sessions create ``fastmfd-*`` segments of their
own at any time. A new segment counts as this run's only if no process
outside this run's process tree maps it. (A segment another session leaks,
unmapped, while a test runs is indistinguishable from this run's own leak.)

Fixtures for tests that start processes: ``mp_context`` (the start method the
product uses) and ``processes`` (starts children, kills and joins them at the
end whatever happened).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing import forkserver, resource_tracker
from pathlib import Path

import hypothesis
import pytest

from fastmfd.shm import SHM_DIR, list_segments

GRACE_SECONDS = 5.0     # how long a leftover may take to go away on its own
POLL_SECONDS = 0.02

# Timings on a shared 2-core machine vary wildly: no per-example deadline.
hypothesis.settings.register_profile("fastmfd", deadline=None, max_examples=200)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastmfd"))


# ---------------------------------------------------------------- processes

def _infrastructure_pids() -> set[int]:
    """multiprocessing's shared helpers, started once and kept for the whole run."""
    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    pids.discard(None)
    return pids


def _os_children() -> set[int]:
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


def _leftover_processes() -> dict[int, object]:
    """pid -> what is left: a multiprocessing.Process, or None for a plain child."""
    # active_children() also sees forkserver children, which are not ours in
    # the OS sense; it reaps the finished ones as a side effect.
    left: dict[int, object] = {p.pid: p for p in multiprocessing.active_children()}
    for pid in _os_children() - _infrastructure_pids():
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

def _process_tree(root: int) -> set[int]:
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


def _mapped_elsewhere(names: set[str]) -> set[str]:
    """The segments among ``names`` that a process outside this run maps."""
    ours = _process_tree(os.getpid())
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


def _leftover_segments(before: set[str]) -> set[str]:
    new = set(list_segments()) - before
    return new - _mapped_elsewhere(new) if new else new


def _unlink(names: set[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- the guard

def _after_grace(probe):
    """What ``probe()`` still reports after waiting up to GRACE_SECONDS for it to empty."""
    deadline = time.monotonic() + GRACE_SECONDS
    left = probe()
    while left and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        left = probe()
    return left


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a segment or a child process behind (then clean up)."""
    segments_before = set(list_segments())
    yield
    problems = []
    processes = _after_grace(_leftover_processes)
    if processes:
        _kill(processes)
        problems.append(f"child processes outlived the test: {sorted(processes)}")
    segments = _after_grace(lambda: _leftover_segments(segments_before))
    if segments:
        _unlink(segments)
        problems.append(f"shared-memory segments outlived the test: {sorted(segments)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def mp_context():
    """The start method fastmfd's workers use (forkserver), with the core preloaded.

    Preloading makes a child start in milliseconds instead of re-importing
    numpy and the extension (and pytest, which test modules import) each time.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fastmfd._core", "fastmfd.regions", "pytest"])
    return ctx


class Processes:
    """Starts children for one test; kills and joins whatever is left at its end."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.started: list = []

    def start(self, target, *args, name: str | None = None):
        proc = self.ctx.Process(target=target, args=args, name=name, daemon=True)
        proc.start()
        self.started.append(proc)
        return proc

    def join(self, *procs, timeout: float = 60.0) -> None:
        """Join ``procs`` (default: all) and assert that each exited with status 0."""
        deadline = time.monotonic() + timeout
        for proc in procs or self.started:
            proc.join(max(0.0, deadline - time.monotonic()))
            assert proc.exitcode is not None, f"{proc.name} still running after {timeout} s"
            assert proc.exitcode == 0, f"{proc.name} exited with status {proc.exitcode}"

    def close(self) -> None:
        for proc in self.started:
            if proc.is_alive():
                proc.kill()
            proc.join(GRACE_SECONDS)


@pytest.fixture
def processes(mp_context):
    procs = Processes(mp_context)
    yield procs
    procs.close()


@pytest.fixture(scope="session")
def qemu72_captures() -> Path:
    """The real QEMU 7.2 captures shared by the project (read only).

    ``FASTMFD_QEMU72_CAPTURES`` overrides; otherwise ``../shared/data/qemu-7.2``
    next to the repository, then ``/work/shared/data/qemu-7.2``.
    """
    candidates = [Path(__file__).resolve().parents[2] / "shared/data/qemu-7.2",
                  Path("/work/shared/data/qemu-7.2")]
    if "FASTMFD_QEMU72_CAPTURES" in os.environ:
        candidates.insert(0, Path(os.environ["FASTMFD_QEMU72_CAPTURES"]))
    for path in candidates:
        if (path / "pattern-none" / "conn1.bin").is_file():
            return path
    pytest.fail(f"QEMU 7.2 captures not found in any of {[str(p) for p in candidates]}; "
                "set FASTMFD_QEMU72_CAPTURES")
