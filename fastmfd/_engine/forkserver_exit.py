"""The forkserver's last act: remove the directory of its socket.

multiprocessing makes that directory (``pymp-*`` in the temporary directory)
in the main process, and removes it at that process's exit: a main process
SIGKILLed never does. Its forkserver exits once the main process is gone (the
end of its "alive" pipe), running its ``atexit`` handlers; this module, which
the forkserver preloads (:func:`fastmfd._engine.forkserver_start.mp_context`),
registers one that cleans up as ``multiprocessing.util`` would have, only then:
a forkserver that exits while its main process lives (a fork that failed ends
its loop) leaves the directory, in which the next forkserver binds its socket.

A fork that fails for want of a process (EAGAIN: cgroup pids.max, RLIMIT_NPROC)
ends the forkserver with status FORK_FAILED, quietly: the process that asked
reads its end and says it in one line (forkserver_start.forkserver_gone), where
the forkserver's traceback came first and the answer was "EOFError: unexpected
EOF".
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import time
from multiprocessing import forkserver
from types import TracebackType

from .open_files import FORK_FAILED

_parent = os.getppid()      # the main process, as the forkserver is started
REPARENT_WAIT = 2.0         # seconds


def _remove_the_socket_directory() -> None:
    # The main process is gone once this one is re-parented, which its exit does
    # just after closing the "alive" pipe whose end made this one exit.
    deadline = time.monotonic() + REPARENT_WAIT
    while os.getppid() == _parent:
        if time.monotonic() > deadline:
            return              # the main process lives: this one failed by itself
        time.sleep(0.01)
    # multiprocessing's ForkServer, not public API: the forkserver process knows
    # its listener's address, and no forkserver pid (the main process knows one:
    # there, if this module is imported at all, multiprocessing does the work).
    server = forkserver._forkserver
    address = getattr(server, "_forkserver_address", None)
    if getattr(server, "_forkserver_pid", None) is not None or not isinstance(address, str):
        return
    directory = os.path.dirname(address)
    if os.path.basename(directory).startswith("pymp-"):
        shutil.rmtree(directory, ignore_errors=True)


atexit.register(_remove_the_socket_directory)


def _quiet_when_a_fork_failed(kind: type[BaseException], exc: BaseException,
                              tb: TracebackType | None) -> None:
    last = tb
    while last is not None and last.tb_next is not None:
        last = last.tb_next
    if (isinstance(exc, BlockingIOError) and last is not None      # os.fork() in its loop
            and last.tb_frame.f_globals.get("__name__") == "multiprocessing.forkserver"):
        os._exit(FORK_FAILED)       # (the main process lives: nothing for atexit to do)
    _python_excepthook(kind, exc, tb)


_python_excepthook = sys.excepthook
sys.excepthook = _quiet_when_a_fork_failed
