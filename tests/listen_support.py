"""A ``fastmfd listen`` in a real process of its own, for the file-safety tests."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fastmfd

# Where the fastmfd these tests import lives (a checkout, or site-packages for an sdist's
# tests): what a child must import too.
REPO = Path(fastmfd.__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120,
            max_data: int | None = None) -> subprocess.CompletedProcess:
    """``python -m fastmfd ARGS`` in a fresh interpreter, as a user runs it, this
    tree's fastmfd first on its path; ``max_data``: its RLIMIT_DATA (what it may
    allocate, not what it may map read-only)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (max_data, max_data))

    return subprocess.run([sys.executable, "-m", "fastmfd", *args], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=None if max_data is None else limit)


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    """Wait until ``predicate()`` holds, at most ``timeout`` seconds (an AssertionError
    naming ``what`` then)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def listens_at(path: str | os.PathLike[str]) -> bool:
    """Whether a Unix socket listens at ``path`` (``/proc/net/unix``: flag
    __SO_ACCEPTCON). Its file exists from bind(), but a connect is refused until
    listen(), and fastmfd makes the file 0600 between the two: a test that took the
    file for a listener connected too early at times (ConnectionRefusedError)."""
    suffix = " " + os.fspath(path)
    with open("/proc/net/unix") as table:
        next(table)                                     # the column names
        return any(line.split()[3] == "00010000" and line.rstrip("\n").endswith(suffix)
                   for line in table)


class Listener:
    """``python -m fastmfd listen unix:… --dir DIRECTORY ARGS…``; entering waits until
    it listens. ``finish()`` waits for its end: (exit status, stderr); its stdout
    is then ``out``."""

    def __init__(self, directory, *args: str, preexec_fn=None,
                 program: tuple[str, ...] = ("-m", "fastmfd")) -> None:
        # Short: a Unix socket path holds at most 107 bytes.
        self._tmp = tempfile.mkdtemp(prefix="fmfd-listen-")
        self.address = f"unix:{self._tmp}/sock"
        self.args = ["listen", self.address, "--dir", str(directory), "--timeout", "60", *args]
        self.preexec_fn = preexec_fn
        self.program = program          # what runs the command: python PROGRAM... ARGS...
        self.proc: subprocess.Popen | None = None
        self.out = ""

    def __enter__(self) -> "Listener":
        self.proc = subprocess.Popen([sys.executable, *self.program, *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + 30
        while not listens_at(self.address[5:]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"the listener did not start: {self.finish()}")
            time.sleep(0.02)
        return self

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        self.out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.communicate()
        shutil.rmtree(self._tmp, ignore_errors=True)


def slow_send(listener: Listener, directory: Path, pages: int,
              **popen: Any) -> tuple[subprocess.Popen, int]:
    """``fastmfd send`` into ``listener`` of a random image of ``pages`` 4 KiB pages and a
    device's state read from a FIFO (files in ``directory``), started with ``popen``'s
    options: (the sender, the FIFO's write end), open once the sender opened the FIFO.
    The sender waits mid-transfer for what the caller writes there, or closes."""
    image, fifo = directory / "ram.img", directory / "state"
    image.write_bytes(os.urandom(pages * 4096))
    os.mkfifo(fifo)
    sender = subprocess.Popen([sys.executable, "-m", "fastmfd", "send", listener.address,
                               str(image), "--state", f"slow={fifo}", "--quiet"], **popen)
    return sender, os.open(fifo, os.O_WRONLY)
