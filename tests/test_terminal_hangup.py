"""A real hangup: the command's terminal goes away (its window closed, ``ssh -t``
dropped: the pty's master closes) while the command runs on it as its controlling
terminal. The command is sent SIGHUP, and every write to the terminal fails with EIO
from then on: the progress bar's last redraw, the command's last line. The session
fails on both sides with "hung up (SIGHUP)", nothing is left, and it exits 129.
Real ptys, real processes."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import textwrap
import time

import pytest

import fastmfd
from listen_support import REPO, Listener
from migration_support import make_region
from proc_scan import left_by, process_group

PAGE = 4096
HUNG_UP = 128 + signal.SIGHUP
BOUND = 10.0        # seconds for a hung-up command's processes and segments to go


def _controlling_terminal() -> None:        # in the child: the pty on 0-2 is its terminal
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def on_a_terminal(*args: str) -> tuple[subprocess.Popen, int]:
    """``python -m fastmfd ARGS…`` on a new pty, its controlling terminal: (the
    process, the pty's master)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fastmfd", *args], stdin=slave,
                                stdout=slave, stderr=slave,
                                preexec_fn=_controlling_terminal)
    finally:
        os.close(slave)
    return proc, master


def wait_for_output(master: int, text: bytes, timeout: float = 30) -> None:
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([master], [], [], left)[0], seen[-500:]
        seen += os.read(master, 1 << 16)


def stopped(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_hangup_of_send_with_its_progress_bar(tmp_path):
    """The bar's last redraw, as the hangup's Terminated unwound migrate(), failed
    with EIO, which replaced it: the listener heard "the source failed: Input/output
    error", and send exited 1."""
    image = tmp_path / "ram.img"
    image.write_bytes(os.urandom(32 << 20))
    with Listener(tmp_path / "out") as listener:
        sender, master = on_a_terminal("send", listener.address, str(image),
                                       "--max-bandwidth", "4M", "--channels", "1")
        try:
            wait_for_output(master, b"round 1")         # the bar is drawn: mid-transfer
            group = set(process_group(sender.pid))
        finally:
            os.close(master)                # the hangup
        status = stopped(sender)
        listener_status, err = listener.finish()
    assert status == HUNG_UP
    assert listener_status == 1 and "the source failed: hung up (SIGHUP)" in err, err
    assert left_by(group, BOUND) == (set(), set())


def test_a_hangup_of_listen(tmp_path):
    """Its last line, "fastmfd listen: hung up (SIGHUP)", failed with EIO: the OSError
    ended the command with status 1 (Python's own report of it failed too)."""
    sock, out = tmp_path / "sock", tmp_path / "out"
    listener, master = on_a_terminal("listen", f"unix:{sock}", "--dir", str(out),
                                     "--timeout", "60")
    region = make_region("ram", 64 * PAGE, seed=9)
    group: set[int] = set()

    def hang_up() -> None:      # after SETUP, before any page went
        group.update(process_group(listener.pid))
        os.close(master)

    try:
        wait_for_output(master, b"listening on")
        with fastmfd.Source(f"unix:{sock}") as source:
            source.add_region(region)
            source.add_device(fastmfd.SyntheticDevice("nic0", 0, 4 << 20, read_rate=4 << 20))
            with pytest.raises(fastmfd.MigrationError, match=r"failed: hung up \(SIGHUP\)"):
                source.migrate(live=False, on_stop=hang_up)
        assert stopped(listener) == HUNG_UP
    finally:
        region.close()
        if not group:
            os.close(master)
        stopped(listener)
    assert not out.exists()
    assert left_by(group, BOUND) == (set(), set())


_BAR_ON_A_TERMINAL_THAT_GOES = textwrap.dedent("""
    import os, sys
    from fastmfd._engine.progress import RoundProgress
    # Written to the descriptor: rich's bar takes sys.stdout over while it is drawn.
    try:
        with RoundProgress(enabled=True, regions=[], pages_done=lambda: 0) as bar:
            bar.start_round(1, 10, live=True)
            os.write(1, b"drawing\\n")
            sys.stdin.readline()            # the terminal is gone by then
            raise RuntimeError("the session's own failure")
    except BaseException as exc:
        os.write(1, f"{type(exc).__name__} {exc}\\n".encode())
""")


def test_the_progress_bar_never_replaces_the_exception_in_flight():
    """The bar on a terminal that went away, no signal said so (it is not the
    program's controlling terminal): its last redraw's EIO replaced the failure."""
    master, slave = os.openpty()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _BAR_ON_A_TERMINAL_THAT_GOES], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave,
                            text=True)
    os.close(slave)
    try:
        assert proc.stdout.readline() == "drawing\n"
        os.close(master)
        said, _ = proc.communicate("go on\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert said == "RuntimeError the session's own failure\n"
