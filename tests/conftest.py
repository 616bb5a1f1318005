"""What every test shares.

- ``leakcheck`` (loaded as a plugin): after every test, no child process,
  ``/dev/shm/fastmfd-*`` segment or socket it started may be left.
- ``alone`` (a plugin): ``@pytest.mark.alone(why)``, a test no other runs beside
  in pytest-xdist's workers.
- ``mp_context`` (the start method the product uses) and ``processes``
  (starts children, kills and joins them at the end whatever happened).
- ``qemu72_captures``, ``qemu10_captures``: the real QEMU 7.2 and 10.0 captures
  shared by the project (tests that need them skip, saying why, where they are
  absent); ``captures``: each capture set in turn, QEMU 10.0's own stream too.
- Every test runs from a directory of its own (``away_from_the_source_tree``).
- ``tmpfs_path``: a private directory on tmpfs, where reading a hole of a file
  through a mapping allocates it (a test can tell whether holes were read);
  ``small_disk``: one on a 1 MiB tmpfs of its own, to fill up.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hypothesis
import pytest

pytest.register_assert_rewrite("leakcheck")
pytest_plugins = ["leakcheck", "alone"]

from inspect_support import NATIVE_CAPTURES, captures_dir  # noqa: E402
from leakcheck import GRACE_SECONDS  # noqa: E402  (after the rewrite is registered)

# A run started in the background of a shell without job control (`pytest &` in a
# script, as a CI runner may) inherits SIGINT ignored, and Python leaves it so: the
# tests of Ctrl-C would meet no KeyboardInterrupt, here or in the Pythons they start
# (a handler, unlike SIG_IGN, is not inherited). They test fastmfd's handling of a
# Ctrl-C, so the run gets Python's own.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Timings on a shared 2-core machine vary wildly: no per-example deadline.
hypothesis.settings.register_profile("fastmfd", deadline=None, max_examples=200)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastmfd"))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session", autouse=True)
def away_from_the_source_tree(tmp_path_factory):
    """The tests run from a directory of their own, not from the checkout or the
    unpacked sdist: a Python they start (``-c``, ``-m fastmfd``, ``-``) puts its
    current directory first on its path, which in an unpacked sdist holds
    fastmfd's unbuilt source, not the package installed from it."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


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
def ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test's duration.

    Python installs it only when SIGINT is not ignored at its start; a process
    started as a background job of a non-interactive shell (``pytest ... &`` in a
    CI script) inherits SIGINT ignored and keeps it so: there a Ctrl-C — like the
    SIGINT a test sends — does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def exits_on_sigterm():
    """A service's usual SIGTERM handler, ``sys.exit(143)``, for the test's duration."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def tmpfs_path():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="test-tmpfs-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 1 MiB file system of its own (a tmpfs: mounting takes root)."""
    directory = tmp_path / "small"
    directory.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "fastmfd-test",
                            str(directory)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture
def processes(mp_context):
    procs = Processes(mp_context)
    yield procs
    procs.close()


@pytest.fixture(scope="session")
def qemu72_captures() -> Path:
    """The real QEMU 7.2 captures shared by the project (read only); skips without them."""
    return captures_dir()


@pytest.fixture(scope="session")
def qemu10_captures() -> Path:
    """The real QEMU 10.0 captures shared by the project (read only); skips without them."""
    return captures_dir("10.0")


@pytest.fixture(params=["7.2", "10.0", "10.0-native"])
def captures(request) -> tuple[str, Path]:
    """A capture set, (name, directory): QEMU 7.2's, QEMU 10.0's with machine
    pc-i440fx-7.2 (both shared/data), QEMU 10.0's with its own pc (in the
    repository, compressed)."""
    if request.param == "10.0-native":
        return request.param, NATIVE_CAPTURES
    fixture = {"7.2": "qemu72_captures", "10.0": "qemu10_captures"}[request.param]
    return request.param, request.getfixturevalue(fixture)
