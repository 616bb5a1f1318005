"""Helper interpreters that import nothing from the current directory.

multiprocessing starts its forkserver and its resource tracker as new
interpreters (``python -c``), and Python puts the current directory first on
such an interpreter's import path. fastmfd's forkserver then imported
``_fastmfd_forkserver``, and either helper ``multiprocessing``, from the
directory the program using fastmfd was started in: a file of that name put
in a shared ``/tmp``, or any directory another user can write, ran as the
program's user, in the forkserver and so in every worker forked from it.

Started within :func:`safe_import_path`, they do not look there
(``PYTHONSAFEPATH``, Python's ``-P``). The forkserver takes the setting back
out of its environment (``_fastmfd_forkserver``): the workers it forks, and
whatever they start, get the user's environment.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["safe_import_path", "SAFE_PATH", "FASTMFD_SAFE_PATH"]

SAFE_PATH = "PYTHONSAFEPATH"
FASTMFD_SAFE_PATH = "fastmfd"   # its value when fastmfd set it (any non-empty value turns it on)


@contextlib.contextmanager
def safe_import_path() -> Iterator[None]:
    """Interpreters started inside do not put the current directory on their path."""
    if os.environ.get(SAFE_PATH):
        yield                       # set by the user: theirs, and on already
        return
    os.environ[SAFE_PATH] = FASTMFD_SAFE_PATH
    try:
        yield
    finally:
        os.environ.pop(SAFE_PATH, None)
