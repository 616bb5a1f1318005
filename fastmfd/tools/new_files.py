"""Files and directories a command makes for its user: new, durable, never in
place of anything.

A name is taken only once what it names is complete and on disk: a file is
written under a temporary name, fsynced, then renamed to its name without
replacing whatever may have appeared there meanwhile (``renameat2`` with
``RENAME_NOREPLACE``; a link and an unlink where the file system lacks it),
and its directory is fsynced. A directory made is made durable in its parent.
No path is followed through a symbolic link at its last component.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat

from ..errors import ConfigError, OutputError

__all__ = ["rename_without_replacing", "make_directories", "make_new_directory",
           "remove_directories_made",
           "check_new_file", "try_making_a_file", "write_durably", "write_new_file"]

_RENAME_NOREPLACE = 1
_TRIES = 3                  # make_directories' tries, each parent removed meanwhile
_libc = ctypes.CDLL(None, use_errno=True)


def rename_without_replacing(src: str, dst: str, dir_fd: int) -> None:
    """Rename ``src`` to ``dst`` (both in the directory ``dir_fd``); FileExistsError
    if anything is at ``dst``, which is left as it was."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst),
                     _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):       # EINVAL: not on this file system
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=dir_fd)


def make_directories(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``, each directory it makes fsynced into its
    parent (else a crash could lose a directory whose files were reported durable;
    a parent it may not read is left unsynced); returns the directories it made,
    outermost first. The path is walked as the kernel resolves it (``..`` after a
    link is the link's parent), and one made meanwhile by another is taken; a
    parent removed meanwhile (another listener's, failed, left empty) is made again."""
    for _ in range(_TRIES - 1):
        try:
            return _make_directories(path)
        except FileNotFoundError:
            continue
    return _make_directories(path)


def make_new_directory(path: str) -> list[str]:
    """Make the directory ``path``, which must not exist (FileExistsError: a name
    there already, even a link to a directory, is not taken), fsynced into its
    parent; returns ``[path]``, what it made."""
    os.mkdir(path, 0o755)
    _fsync_directory(os.path.dirname(path) or ".")
    return [path]


def _make_directories(path: str) -> list[str]:
    head, tail = os.path.split(path)
    if not tail:
        head, tail = os.path.split(head)
    made = []
    if head and tail and not os.path.exists(head):
        made = _make_directories(head)
    try:
        os.mkdir(path, 0o755)   # others never write where a command puts its user's files
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return made
    made.append(path)
    try:
        _fsync_directory(head or ".")
    except PermissionError:
        pass
    return made


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_new_file(path: str, option: str) -> None:
    """Refuse, before any work, an output ``path`` that exists (whatever it is: a
    file is not replaced, a link not followed, a FIFO not opened) or whose
    directory cannot take a new file. ``option`` names it in the error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                "a directory" if stat.S_ISDIR(st.st_mode) else
                "a file" if stat.S_ISREG(st.st_mode) else "not a regular file")
        raise ConfigError(f"{option} {path}: exists ({what}): not replacing it; give a new "
                          f"file name")
    try:
        try_making_a_file(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                          f"give a writable file name") from None


def try_making_a_file(directory: str, stem: str) -> None:
    """Make and remove a new file in ``directory`` (OSError where none can be made):
    whether the kernel lets files be made there (permissions, a read-only mount, a
    file system that takes none), which no access() check says for every case."""
    probe = os.path.join(directory, f".{stem}.{secrets.token_hex(4)}")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    os.unlink(probe)


def remove_directories_made(made: list[str]) -> None:
    """Remove the directories :func:`make_directories` made (its list), innermost
    first, as long as each is empty: what a failed listener leaves of its own."""
    for path in reversed(made):
        try:
            os.rmdir(path)
        except OSError:
            return      # not empty (or not ours to remove any more): nor are its parents


def write_durably(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, then fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _not_written(path: str, exc: OSError) -> OutputError:
    """The file system's failure (ENOSPC, EIO, no inode left), naming ``path``: the
    errno alone names no file, or the temporary one."""
    return OutputError(f"{path}: not written: {exc.strerror or exc}")


def write_new_file(path: str, data: bytes) -> None:
    """Write ``data`` to the new file ``path``: under a temporary name, fsynced, then
    renamed to ``path``, and the directory fsynced. If something is at ``path`` by
    then, ConfigError names where the data was kept instead (the temporary file);
    any other failure removes the temporary file, and one of the file system's
    (a full disk, EIO) is an OutputError naming ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = f".{name}.{secrets.token_hex(4)}.part"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _not_written(path, exc) from None
    try:
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            raise _not_written(path, exc) from None
        try:
            try:
                write_durably(fd, data)
            finally:
                os.close(fd)
            rename_without_replacing(temporary, name, dir_fd)
        except FileExistsError:
            raise ConfigError(f"{path}: appeared meanwhile: not replacing it; the data is "
                              f"in {os.path.join(directory, temporary)}") from None
        except BaseException as exc:
            os.unlink(temporary, dir_fd=dir_fd)
            if isinstance(exc, OSError):
                raise _not_written(path, exc) from None
            raise
        try:
            os.fsync(dir_fd)
        except OSError as exc:
            raise OutputError(f"{path}: written, but its directory's entry was not made "
                              f"durable: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)
