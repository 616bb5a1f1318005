"""Imported first by fastmfd's forkserver: its import path becomes its parent's.

Python 3.11 starts multiprocessing's forkserver with ``python -c``, so the
current directory comes first on its import path, and it ignores the path the
parent passes along (``sys_path``; CPython applies it from 3.12.8 and 3.13.1,
gh-117378). Run from a directory that holds fastmfd's source tree (a checkout
not built in place, an unpacked sdist), the forkserver preloaded that tree's
``fastmfd``, whose core is not compiled, and every worker forked from it failed
to import fastmfd.

This module lives outside the package: importing it cannot import the wrong
``fastmfd``. It takes the path from the forkserver's ``main`` (the caller of
the preload) before anything of fastmfd is imported.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing import process, util

# A Ctrl-C at the terminal reaches the forkserver too (it is in the command's process
# group). multiprocessing has it ignore SIGINT once its preloads are imported; while it
# imported them (numpy, the compiled core: 0.2 s or more) a Ctrl-C printed its traceback
# beside the command's one line. So does a hangup (the terminal closed, the ssh
# connection dropped), which multiprocessing leaves fatal: the forkserver and the
# workers died of it before the main process, which handles it (or dies of it: then
# they die with it), could stop the session and clean up. It starts with both blocked
# (fastmfd's mp_context): ignored from here, one that came meanwhile is dropped with
# it, and every child it forks starts with both ignored, as each sets them anyway
# (processes.child_setup). The program's own children get back what it started with
# (_the_programs_own_settings).
_STARTED_WITH = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP)}
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGHUP})


def _parent_sys_path() -> list[str] | None:
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "main"
                and frame.f_globals.get("__name__") == "multiprocessing.forkserver"):
            path = frame.f_locals.get("sys_path")
            return list(path) if isinstance(path, list) else None
        frame = frame.f_back
    return None


_path = _parent_sys_path()
if _path is not None:
    sys.path[:] = _path

# fastmfd started this forkserver with a safe import path (fastmfd.safe_path):
# that was for this interpreter, not for the workers it forks (or what they start).
if os.environ.get("PYTHONSAFEPATH") == "fastmfd":
    del os.environ["PYTHONSAFEPATH"]

# The registry below is copied into every process forked under the forkserver, and run
# again in each that starts a "fork" child: there the parent's settings are the child's.
# A child of the forkserver's own compares its parent with it too (processes.child_setup).
FORKSERVER_PID = os.getpid()


class _ProgramsSettings:
    """multiprocessing has one forkserver per program, which fastmfd may start: the
    program's own processes of the "forkserver" context are forked from it as well."""

    @staticmethod
    def restore(_: object) -> None:
        """In each child, before its target runs: a child that is not fastmfd's gets
        the program's SIGINT and SIGHUP, not the ones set here; only a child of the
        forkserver's own, not one a child of it forks (which keeps its parent's)."""
        if os.getppid() != FORKSERVER_PID:
            return
        fastmfds = sys.modules.get("fastmfd._engine.forkserver_start")
        if fastmfds is not None and isinstance(process.current_process(),
                                               fastmfds.ForkServerChild):
            return
        for sig, disposition in _STARTED_WITH.items():
            if disposition is not None:
                signal.signal(sig, disposition)


_programs_settings = _ProgramsSettings()        # held: the registry's values are weak
util.register_after_fork(_programs_settings, _ProgramsSettings.restore)
