"""The forkserver's last act: remove the directory of its socket.

multiprocessing makes that directory (``pymp-*`` in the temporary directory)
in the main process, and removes it at that process's exit: a main process
SIGKILLed never does. Its forkserver exits once the main process is gone (the
end of its "alive" pipe), running its ``atexit`` handlers; this module, which
the forkserver preloads (:func:`fastmfd._engine.processes.mp_context`),
registers one that cleans up as ``multiprocessing.util`` would have.
"""

from __future__ import annotations

import atexit
import os
import shutil
from multiprocessing import forkserver


def _remove_the_socket_directory() -> None:
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
