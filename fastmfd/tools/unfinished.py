"""What a killed listener left in its directory: the unfinished receives the next one names.

A receive that fails or is interrupted removes what it wrote (``--keep-partial`` keeps it,
as ``.part``); a listener killed outright (SIGKILL to its process group: no clean-up runs)
leaves it as it was: its ``.part`` files, some perhaps renamed already, and no
``manifest.json``, which is renamed into place last, after every other file
(:mod:`.outputs`). Nothing there looks complete, but nothing said that a save was lost
either: the next listener into ``DIR`` says so as it starts, one line per unfinished
receive. ``listen --max-sessions N`` and ``--forever`` receive each session into
``DIR/<uuid>/`` (:func:`~.transfer.listen_sessions`); a single ``listen --dir`` and
``listen --qemu`` into ``DIR`` itself, where the next one of the same names would refuse
the ``.part`` files only once a source's migration had begun.

Only fastmfd's own layout is named: ``DIR``, or a directory in it (not a link) named by a
session uuid (32 hex digits), that holds no ``manifest.json`` (a complete save, whatever
else is there) and at least one ``.part`` file (not a link) of an output's name (``.img``,
``.<instance>.state``, ``vmstate.bin``, ``manifest.json``). Nothing is changed or removed,
and nothing is followed through a link. At most ``MAX_ENTRIES`` names are read, ``DIR``'s
and its session directories' together: a directory of millions costs a start no more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator

from ..units import format_bytes
from .outputs import MANIFEST, PART, VMSTATE

__all__ = ["unfinished_receives", "warn_of_unfinished_receives", "MAX_ENTRIES"]

log = logging.getLogger("fastmfd")

MAX_ENTRIES = 10_000
_SESSION = re.compile(r"[0-9a-f]{32}")          # a session's directory: its uuid, in hex
_OUTPUT_PART = re.compile(rf"(?:.+\.img|.+\.\d+\.state|{re.escape(VMSTATE)}|"
                          rf"{re.escape(MANIFEST)}){re.escape(PART)}")


def warn_of_unfinished_receives(directory: str) -> None:
    """Log (a warning) each unfinished receive in ``directory``: a listener's first act."""
    for line in unfinished_receives(directory):
        log.warning("%s", line)


def unfinished_receives(directory: str) -> list[str]:
    """One line for each unfinished receive in ``directory`` (none if it is not there)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    names = _Names(MAX_ENTRIES)
    sessions: list[str] = []
    lines = []
    try:
        lines += _said(directory, _parts(fd, names, sessions))
        for name in sessions:
            try:
                session = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, dir_fd=fd)
            except OSError:         # gone, or a link put in its place meanwhile
                continue
            try:
                lines += _said(os.path.join(directory, name), _parts(session, names))
            finally:
                os.close(session)
    except OSError:
        pass                # unreadable or gone meanwhile: nothing more to say
    finally:
        os.close(fd)
    if names.cut:
        lines.append(f"{directory}: looked for unfinished receives among its first "
                     f"{MAX_ENTRIES} names only")
    return lines


class _Names:
    """The names a scan may still read, and whether a name was left unread (``cut``):
    not so when the last name there was the last one allowed."""

    def __init__(self, left: int) -> None:
        self.left = left
        self.cut = False

    def take(self, entries: Iterable[os.DirEntry[str]]) -> Iterator[os.DirEntry[str]]:
        for entry in entries:
            if self.left <= 0:
                self.cut = True
                return
            self.left -= 1
            yield entry


def _parts(fd: int, names: _Names, sessions: list[str] | None = None) -> list[os.stat_result]:
    """The output .part files in directory ``fd``, none if it holds a manifest (a complete
    save); the session directories in it go to ``sessions`` if given."""
    try:
        os.stat(MANIFEST, dir_fd=fd, follow_symlinks=False)
        complete = True
    except FileNotFoundError:
        complete = False
    found = []
    with os.scandir(fd) as entries:
        for entry in names.take(entries):
            if (sessions is not None and _SESSION.fullmatch(entry.name)
                    and entry.is_dir(follow_symlinks=False)):
                sessions.append(entry.name)
            elif (not complete and _OUTPUT_PART.fullmatch(entry.name)
                  and entry.is_file(follow_symlinks=False)):
                with contextlib.suppress(FileNotFoundError):        # gone meanwhile
                    found.append(entry.stat(follow_symlinks=False))
    return found


def _said(path: str, parts: list[os.stat_result]) -> list[str]:
    if not parts:
        return []
    size = format_bytes(sum(st.st_size for st in parts))
    on_disk = format_bytes(sum(st.st_blocks * 512 for st in parts))     # region files: sparse
    return [f"{path}: an unfinished receive (its listener stopped or failed before it was "
            f"complete): {len(parts)} .part file(s), {size} ({on_disk} on disk); not a save"]
