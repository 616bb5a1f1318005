"""The forkserver's last act: remove the directory of its socket.

multiprocessing makes that directory (``pymp-*`` in the temporary directory)
in the main process, and removes it at that process's exit: a main process
SIGKILLed never does. Its forkserver exits once the main process is gone (the
end of its "alive" pipe), running its ``atexit`` handlers; this module, which
the forkserver preloads (:func:`fastmfd._engine.forkserver_start.mp_context`),
registers one that cleans up as ``multiprocessing.util`` would have, only then:
a forkserver that exits while its main process lives (a fork that failed ends
its loop) leaves the directory, in which the next forkserver binds its socket.
"""

from __future__ import annotations

import atexit
import os
import shutil
import time
from multiprocessing import forkserver

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
