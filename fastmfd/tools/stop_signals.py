"""SIGTERM and SIGHUP stop a command as Ctrl-C does: :class:`Terminated`, raised by
:func:`on_stop_signal` (the handler ``fastmfd.tools.cli.main`` installs)."""

from __future__ import annotations

import errno
import os
import signal
import termios
import time
from types import FrameType
from typing import Callable

__all__ = ["STOPPED_BY", "Terminated", "on_stop_signal", "SAME_STOP_WITHIN"]

# The signals that stop a command as Ctrl-C does: what the command says, and what
# its peer hears. A hangup is a terminal's, or an ssh connection's, that dropped.
STOPPED_BY: dict[int, tuple[str, str]] = {
    signal.SIGTERM: ("terminated (SIGTERM)", "terminated by SIGTERM"),
    signal.SIGHUP: ("hung up (SIGHUP)", "hung up (SIGHUP)")}

# A SIGTERM this soon after the first is the same stop sent twice: `timeout` signals
# its command, then the command's whole process group, the command again with it.
SAME_STOP_WITHIN = 1.0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C's KeyboardInterrupt is,
    so it does what Ctrl-C does: the session fails on both sides (the peer is told
    "terminated by SIGTERM", "hung up (SIGHUP)"), every process and file the command
    made is cleaned up, and the command exits with 128 + the signal (143, 129; Ctrl-C:
    130)."""

    def __init__(self, signum: int) -> None:
        self.said, told = STOPPED_BY[signum]
        super().__init__(told)
        self.status = 128 + signum


def on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM, while the first one's cleanup runs, ends the process at once,
    # unless it is the first one again: `timeout 2 fastmfd ...` sends two within
    # microseconds, and about one run in ten was killed by the second before its
    # cleanup (no line said, status 143 as a signal's, its socket file, directory and
    # .part files left, its peer told nothing).
    # A hangup comes more than once (the shell passes its own on to its jobs, the
    # kernel signals the foreground group again as the session's leader exits): the
    # next ones are ignored until the process exits (with 129, not killed by one
    # after the cleanup), and the cleanup, whose waits have deadlines, goes on.
    if signum == signal.SIGHUP:
        _leave_a_hung_up_terminal()
        signal.signal(signum, signal.SIG_IGN)
    else:
        signal.signal(signum, _ends_at_once_after(time.monotonic() + SAME_STOP_WITHIN))
    raise Terminated(signum)


def _ends_at_once_after(deadline: float) -> Callable[[int, FrameType | None], None]:
    """The handler of a SIGTERM after the first: the process ends at once (by the
    signal), from ``deadline`` on."""
    def again(signum: int, frame: FrameType | None) -> None:
        if time.monotonic() < deadline:
            return                      # the first stop, sent twice
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return again


def _leave_a_hung_up_terminal() -> None:
    """Point each standard descriptor (0, 1, 2) on a terminal that hung up (closed:
    its window, ``ssh -t``) at /dev/null, as a daemon does. Every write there fails
    with EIO from then on: the progress bar's last redraw replaced the hangup (the
    peer heard "the source failed: Input/output error"), the command's last line
    failed, and it exited 1, not 129. A SIGHUP sent by ``kill``, the terminal still
    there, leaves them be: the line is said."""
    for fd in range(3):
        try:
            termios.tcgetattr(fd)
        except termios.error as exc:
            if exc.args[0] == errno.EIO:        # a hung-up terminal's every call fails so
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, fd)
                os.close(null)
