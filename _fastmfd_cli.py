"""The ``fastmfd`` command's entry point, before anything of fastmfd is imported.

Importing fastmfd (numpy, the compiled core: 0.2 s, more on a busy host) comes
before the command's own handling of Ctrl-C (``fastmfd.tools.cli.main``): a
Ctrl-C then printed Python's traceback. From this module's first lines until
``main()`` takes over (:func:`hand_over`), a Ctrl-C ends the command at once,
as ``main()`` would: one line, status 130. Nothing needs cleaning up then: no
process or file is made before ``main()`` runs.

The console script calls :func:`main`; ``python -m fastmfd`` imports the
package first, which calls :func:`install` then (``fastmfd/__init__.py``).
This module lives outside the package: importing it cannot import fastmfd.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

INTERRUPTED = 130           # 128 + SIGINT: the command's status after a Ctrl-C

# fastmfd uses no BLAS, yet numpy's import starts OpenBLAS's threads, one per extra
# core, here and again in the forkserver (which inherits this environment, and so its
# workers). Where the process limit (cgroup pids.max, RLIMIT_NPROC) leaves no room for
# them, OpenBLAS raises SIGINT: the command ended "fastmfd: interrupted", 130, as if
# after a Ctrl-C. One thread, which it does not start; set before numpy is imported
# (this module comes first: the console script's entry, and fastmfd/__init__.py for
# python -m), unless the user chose a number. A program using fastmfd keeps its own.
for _threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # Written to the descriptor: os._exit flushes no buffer.
    os.write(2, b"fastmfd: interrupted\n")
    os._exit(INTERRUPTED)


# Whether this process runs the command (install() ran), which exits once it returns.
installed = False


def install() -> None:
    """A Ctrl-C ends the process until :func:`hand_over`. Only in place of
    Python's own handler: a SIGINT ignored (a background job's) stays so.
    The standard files are opened first (:func:`_open_the_standard_files`)."""
    global installed
    installed = True
    _open_the_standard_files()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def _open_the_standard_files() -> None:
    """Give each standard descriptor (0, 1, 2) the command was started without
    (``>&-``, a wrapper that closes them) /dev/null, as a daemon does. Python
    makes its ``sys.stdout`` None then: ``listen --json`` printed a traceback and
    exited 1 after a session received and committed; and the first file the
    command opened took the descriptor, where anything written to it landed."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free descriptor is this one (the ones below are open by now).
            os.open(os.devnull, os.O_RDWR)
            os.set_inheritable(fd, True)        # a standard file, as for what it runs
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def hand_over() -> None:
    """The command handles Ctrl-C from here on, as KeyboardInterrupt."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> int:
    install()
    from fastmfd.tools.cli import main as command
    return command()
