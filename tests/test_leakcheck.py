"""The leak check itself (tests/leakcheck.py) tells this run's segments from those
another run on the machine makes meanwhile."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

from fastmfd.shm import SEGMENT_PREFIX, SHM_DIR
from leakcheck import LeakCheck

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


def test_a_segment_another_runs_live_process_makes_is_not_this_tests(tmp_path):
    """Another pytest, a benchmark or a user's demo on the machine makes segments as a
    test runs: one of theirs, unmapped at the check, failed the test as its leak
    (the full suite beside a helper's experiments: 15 tests)."""
    check = LeakCheck()
    said = tmp_path / "said"
    # Started through a shell that exits at once: reparented, outside this run's tree.
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" "$1" &', MAKE, str(said)],
                   check=True)
    deadline = time.monotonic() + 30
    while not said.exists() or not said.read_text():
        assert time.monotonic() < deadline, "the other run's process said nothing"
        time.sleep(0.02)
    pid, theirs = said.read_text().split()
    ours = f"{SEGMENT_PREFIX}this-test-{os.getpid()}-{secrets.token_hex(6)}"
    os.close(os.open(os.path.join(SHM_DIR, ours), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    try:
        assert check.segments() == {ours}
    finally:
        os.kill(int(pid), signal.SIGKILL)
        for name in (theirs, ours):
            os.unlink(os.path.join(SHM_DIR, name))
