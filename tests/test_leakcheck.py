"""The leak check itself (tests/leakcheck.py) tells this run's segments from those
another run on the machine makes meanwhile."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

from fastmfd.shm import SEGMENT_PREFIX, SHM_DIR
from leakcheck import LeakCheck
from proc_scan import RUN_MARK, alive, descends_from, process_group, process_tree

# A segment as SharedMemory.create names it (fastmfd-TAG-PID-RANDOM), made by the
# process that runs this, then left unmapped: as one leaked, or not mapped yet.
MAKE = f"""
import os, secrets, sys, time
name = f"{SEGMENT_PREFIX}another-run-{{os.getpid()}}-{{secrets.token_hex(6)}}"
os.close(os.open(os.path.join("{SHM_DIR}", name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
with open(sys.argv[1], "w") as said:
    said.write(f"{{os.getpid()}} {{name}}")
time.sleep(60)
"""

# MAKE, its segment mapped (a page) while it runs.
MAKE_MAPPED = MAKE.replace("os.close(os.open(", "fd = (os.open(").replace(
    "0o600))", "0o600))\nos.ftruncate(fd, 4096)\nimport mmap\nheld = mmap.mmap(fd, 4096)")


def _made(said, starting) -> tuple[int, str]:
    """(pid, segment) of a process running MAKE, started by ``starting()`` to say them in
    ``said``."""
    starting()
    deadline = time.monotonic() + 30
    while not said.exists() or not said.read_text():
        assert time.monotonic() < deadline, "the segment's maker said nothing"
        time.sleep(0.02)
    pid, name = said.read_text().split()
    return int(pid), name


def _orphaned(said, env, make: str = MAKE) -> tuple[int, str]:
    """``make``'s (pid, segment), run by a shell that exits at once, and made once it
    is reparented (to init): outside this run's tree."""
    orphaned_make = ("import os, sys, time\n"
                     "while os.getppid() == int(sys.argv[2]):\n    time.sleep(0.01)\n" + make)
    return _made(said, lambda: subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -c "$0" "$1" $$ &', orphaned_make, str(said)],
        check=True, env=env))


def _another_runs(said) -> tuple[int, str]:
    """MAKE's (pid, segment), run by another run: outside this run's tree, and
    without its mark (proc_scan.RUN_MARK)."""
    return _orphaned(said, {k: v for k, v in os.environ.items() if k != RUN_MARK})


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.02)


def test_a_segment_another_runs_live_process_makes_is_not_this_tests(tmp_path):
    """Another pytest, a benchmark or a user's demo on the machine makes segments as a
    test runs: one of theirs, unmapped at the check, failed the test as its leak
    (the full suite beside a helper's experiments: 15 tests)."""
    check = LeakCheck()
    pid, theirs = _another_runs(tmp_path / "said")
    ours = f"{SEGMENT_PREFIX}this-test-{os.getpid()}-{secrets.token_hex(6)}"
    os.close(os.open(os.path.join(SHM_DIR, ours), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    try:
        assert check.segments() == {ours}
    finally:
        os.kill(pid, signal.SIGKILL)
        for name in (theirs, ours):
            os.unlink(os.path.join(SHM_DIR, name))


def test_a_segment_another_runs_process_made_then_exited_is_not_this_tests(tmp_path):
    """Another run's segment whose creator is gone by the check (pytest-xdist's
    workers: another worker's short-lived process): counted as this test's, since
    a gone creator was anyone's, it failed a test beside that one's as a leak. Its
    creator is placed as it makes the segment (proc_scan.watch_creators)."""
    check = LeakCheck()
    pid, theirs = _another_runs(tmp_path / "said")
    try:
        assert check.segments() == set()       # (placed now, while it runs)
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        assert check.segments() == set()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.unlink(os.path.join(SHM_DIR, theirs))


def test_a_segment_this_runs_child_made_then_exited_is_this_tests(tmp_path):
    """The leak the check is for: a child that exited leaving its segment."""
    check = LeakCheck()
    said = tmp_path / "said"
    children: list[subprocess.Popen] = []
    _, name = _made(said, lambda: children.append(
        subprocess.Popen([sys.executable, "-c", MAKE, str(said)])))
    try:
        children[0].kill()
        children[0].wait()
        assert check.segments() == {name}
    finally:
        children[0].kill()
        children[0].wait()
        os.unlink(os.path.join(SHM_DIR, name))


@pytest.mark.parametrize("mapped", [False, True], ids=["unmapped", "mapped by it"])
def test_a_segment_this_runs_orphan_makes_is_this_tests(tmp_path, mapped):
    """A process of this run whose parent was killed (a test's command, SIGKILLed) is
    reparented to init: out of this run's tree, its segments were another run's (and
    one it mapped, kept by another run), and a leak of theirs went unreported (a
    review). It carries this run's mark."""
    check = LeakCheck()
    pid, name = _orphaned(tmp_path / "said", None, MAKE_MAPPED if mapped else MAKE)
    try:
        assert check.segments() == {name}      # while it runs
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        assert check.segments() == {name}      # placed as this run's when it made it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.unlink(os.path.join(SHM_DIR, name))


def test_a_process_whose_arguments_are_no_utf8_does_not_break_a_group_scan():
    # process_group reads every process's command line: another run's `fastmfd listen
    # --dir o\xffut` made it raise UnicodeDecodeError in test_stalls (a full run beside it).
    with subprocess.Popen([os.fsencode(sys.executable), b"-c", b"import time; time.sleep(60)",
                           b"o\xffut"], start_new_session=True) as other:
        try:
            assert list(process_group(other.pid).values()) == [
                f"{sys.executable}\0-c\0import time; time.sleep(60)\0o\udcffut\0"]
        finally:
            other.kill()


def test_a_process_whose_name_is_no_utf8_does_not_break_a_scan():
    # /proc/PID/stat holds the process's name, which a program may set to any bytes
    # (prctl, /proc/self/comm): each scan reads it as text.
    with subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                           "open('/proc/self/comm', 'wb').write(b'o\\xffut')\n"
                           "print(flush=True)\ntime.sleep(60)"],
                          stdout=subprocess.PIPE, start_new_session=True) as other:
        try:
            assert other.stdout is not None and other.stdout.readline() == b"\n"
            assert alive(other.pid)
            assert other.pid in process_tree(os.getpid())
            assert list(process_group(other.pid)) == [other.pid]
            assert descends_from(other.pid, os.getpid())
        finally:
            other.kill()
