"""At the process limit (cgroup pids.max, RLIMIT_NPROC): what cannot start a
process or a thread fails once, naming the limit, and frees what it held.

The CLI tests run ``fastmfd`` for real in a child cgroup with a low pids.max
(root and a writable pids controller, cgroup v1 or v2; skipped otherwise). The
thread tests make one named thread's start raise what CPython raises at the
limit, RuntimeError("can't start new thread"), as the limit does in a real run
at whichever thread comes first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from listen_support import REPO


def _pids_cgroup_parent() -> Path | None:
    """Where a child cgroup with a pids.max can be made here, None if nowhere."""
    root = Path("/sys/fs/cgroup")
    v2 = root / "cgroup.controllers"
    if v2.exists():
        return root if "pids" in v2.read_text().split() else None
    return root / "pids" if (root / "pids" / "pids.max").exists() or \
        (root / "pids" / "cgroup.procs").exists() else None


@pytest.fixture
def pids_limited():
    """``run(limit, *args)``: ``python -m fastmfd ARGS`` in a child cgroup of
    pids.max ``limit`` (every process and thread counts); the cgroup is removed
    once its processes are gone."""
    parent = _pids_cgroup_parent()
    if os.geteuid() != 0 or parent is None or not os.access(parent, os.W_OK):
        pytest.skip("needs root and a writable cgroup pids controller (v1 or v2)")
    made: list[Path] = []

    def run(limit: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        group = parent / f"fastmfd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        made.append(group)
        (group / "pids.max").write_text(str(limit))
        procs = str(group / "cgroup.procs")

        def enter() -> None:        # in the child, before it runs Python
            with open(procs, "w") as f:
                f.write("0")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-m", "fastmfd", *args], env=env,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=enter)
    yield run
    for group in made:
        for _ in range(200):        # its processes' exits are reaped a little later
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"{group}: processes left in it")


def test_listen_forever_ends_on_a_failure_before_any_source(pids_limited, tmp_path):
    """Its workers cannot start (the reassembly's thread, here): there is no
    source, so it is no session; retried, it failed again at once, hundreds of
    times a second, forever."""
    done = pids_limited(14, "listen", f"unix:{tmp_path}/sock", "--dir", str(tmp_path / "out"),
                        "--forever", timeout=30)
    assert done.returncode == 1, done.stderr
    assert "session failed" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fastmfd listen: "), done.stderr
