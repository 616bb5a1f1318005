"""Files a command reads because its user named them (``inspect``'s captures,
``bench --compare``'s results): only regular files are read.

A name can stand for anything: a FIFO (opening it waits for a writer, reading
it for the writer's bytes), ``/dev/zero`` or a link to it (reading never ends),
a directory. Each is opened with ``O_NONBLOCK``, so the open itself cannot
wait, and refused by what ``fstat`` says it is, before one byte is read.
"""

from __future__ import annotations

import os
import stat

from ..errors import ConfigError

__all__ = ["open_regular_file"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def open_regular_file(path: str, what: str) -> tuple[int, int]:
    """``(fd, size)`` of the regular file ``path``, open for reading (the caller
    closes ``fd``); anything else is a ConfigError that starts with ``what``
    (``path`` itself, or e.g. ``"--compare PATH"``) and says what it is instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror or exc}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            kind = next((name for test, name in _KINDS if test(status.st_mode)),
                        "a special file")
            raise ConfigError(f"{what}: {kind}, not a regular file")
        # Reads from here on may block as a regular file's do.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, status.st_size
