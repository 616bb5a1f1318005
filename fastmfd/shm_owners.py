"""Which process owns a segment, alive or dead, told by a lock; and the sweep of the
segments of owners that died with their resource tracker.

The resource tracker unlinks a dead owner's segments (see :mod:`fastmfd.shm`), but
it is in the owner's process group and cgroup: a kill of the whole (``kill -9
-PGID``, systemd's final SIGKILL of a service, ``docker kill``, an OOM kill of the
group) kills it too, and left every segment of the session in /dev/shm for good.

So each process that creates segments holds, for its life, an exclusive ``flock``
on an *owner file* ``/dev/shm/fastmfd-owner-PID-TOKEN`` (made at its first
segment), and each of its segments' names starts its random part with that
``TOKEN`` (``fastmfd-TAG-PID-TOKENxxxxxx``). The kernel releases the lock when the
last descriptor of it closes, however its process ended: a lock that can be taken
is an owner dead everywhere. A pid cannot tell that: a /dev/shm shared by
containers is shared across pid namespaces, and pids are reused. A process's
first segment sweeps: of each owner file of this user whose lock it can take, it
unlinks the segments and then the owner file. A forked child inherits the lock
(it is the open file's, and the child may use the segments); a child that creates
segments makes an owner file of its own. Another user's files, links and what is
not a regular file are left alone. Names made before owner files were (no owner
file matches them) are not swept, nor those of a process that could make no owner
file (a /dev/shm without O_TMPFILE, no /proc): those are the tracker's alone.

The owner file goes at its process's exit (multiprocessing's exit handlers, which
its worker processes run too), or with the resource tracker like a segment.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from multiprocessing import resource_tracker, util

__all__ = ["SHM_DIR", "SEGMENT_PREFIX", "OWNER_TAG", "TOKEN_CHARS", "owner_token", "owner_of",
           "is_owner_file", "owner_lives", "sweep_dead_owners"]

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "fastmfd-"
OWNER_TAG = "owner"
TOKEN_CHARS = 6         # an owner's token: hex digits; a segment's random part is 12
_HEX = frozenset("0123456789abcdef")

# This process's owner: (its pid, token, the locked descriptor); None until its
# first segment. A forked child sees its parent's pid here, and makes its own.
_owner: tuple[int, str, int] | None = None


def owner_of(name: str) -> tuple[int, str] | None:
    """(pid, owner token) of a segment's or owner file's name; None for a name of
    neither (another program's, a scratch directory's, an older version's)."""
    parts = name[len(SEGMENT_PREFIX):].split("-")
    if not name.startswith(SEGMENT_PREFIX) or len(parts) < 3:
        return None
    pid, random = parts[-2:]
    if not (pid.isascii() and pid.isdigit()) or not set(random) <= _HEX:
        return None
    if len(random) == 2 * TOKEN_CHARS or (len(random) == TOKEN_CHARS and is_owner_file(name)):
        return int(pid), random[:TOKEN_CHARS]
    return None


def is_owner_file(name: str) -> bool:
    """``name`` is an owner file's (``fastmfd-owner-PID-TOKEN``)."""
    parts = name.split("-")
    return (len(parts) == 4 and f"{parts[0]}-" == SEGMENT_PREFIX and parts[1] == OWNER_TAG
            and len(parts[3]) == TOKEN_CHARS)


def owner_token() -> str:
    """This process's owner token, its owner file made (and dead owners swept) at the
    first call in this process. Call after starting the resource tracker."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        made = _make_owner_file()
        if made is None:
            # The segments are the tracker's alone (a /dev/shm that takes no file at
            # all says so at the first segment).
            _owner = os.getpid(), secrets.token_hex(TOKEN_CHARS // 2), -1
            return _owner[1]
        token, fd = made
        _owner = os.getpid(), token, fd
        name = _owner_name(os.getpid(), token)
        resource_tracker.register("/" + name, "shared_memory")
        util.Finalize(None, _remove_owner_file, args=(name, fd), exitpriority=0)
        sweep_dead_owners()
    return _owner[1]


def _make_owner_file() -> tuple[str, int] | None:
    """(token, locked descriptor) of a new owner file of this process; None where
    none can be made: no O_TMPFILE in SHM_DIR (not a tmpfs), no /proc, no room."""
    try:
        fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        # Locked before it has a name: a sweep never sees it unlocked.
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _link_owner_file(fd), fd
    except OSError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _owner_name(pid: int, token: str) -> str:
    return f"{SEGMENT_PREFIX}{OWNER_TAG}-{pid}-{token}"


def _link_owner_file(fd: int) -> str:
    """Give the unnamed file ``fd`` an owner file's name no other has; its token."""
    proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            token = secrets.token_hex(TOKEN_CHARS // 2)
            try:
                # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: how an O_TMPFILE gets a name.
                os.link(str(fd), os.path.join(SHM_DIR, _owner_name(os.getpid(), token)),
                        src_dir_fd=proc_fds, follow_symlinks=True)
                return token
            except FileExistsError:
                continue
    finally:
        os.close(proc_fds)


def _remove_owner_file(name: str, fd: int) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    try:
        resource_tracker.unregister("/" + name, "shared_memory")
    except OSError:         # the tracker is gone: the name is removed already
        pass
    os.close(fd)


def sweep_dead_owners() -> list[str]:
    """Unlink the segments and owner files of this user's dead owners (their lock can
    be taken); the names removed. One listing of SHM_DIR."""
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return []
    mine = os.geteuid()
    files: dict[tuple[int, str], list[str]] = {}
    for entry in entries:
        owner = owner_of(entry.name)
        if owner is not None and not is_owner_file(entry.name):
            files.setdefault(owner, []).append(entry.name)
    removed: list[str] = []
    for entry in entries:
        owner = owner_of(entry.name)
        if owner is None or not is_owner_file(entry.name) or owner == _this_owner():
            continue
        fd = _lock_if_dead(entry.name, mine)
        if fd is None:
            continue
        try:
            for name in files.get(owner, []) + [entry.name]:
                if _remove_if_mine(name, mine):
                    removed.append(name)
        finally:
            os.close(fd)
    return removed


def _this_owner() -> tuple[int, str] | None:
    return (_owner[0], _owner[1]) if _owner is not None else None


def _lock_if_dead(name: str, uid: int) -> int | None:
    """A descriptor of owner file ``name``, its lock taken, if it is this user's
    regular file and no process holds its lock; None otherwise."""
    path = os.path.join(SHM_DIR, name)
    try:
        # O_NONBLOCK: a FIFO by that name would block an open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            raise BlockingIOError
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Another sweep may have removed it, and a new owner taken the name, meanwhile.
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise BlockingIOError
    except OSError:
        os.close(fd)
        return None
    return fd


def owner_lives(name: str) -> bool:
    """Whether a process holds owner file ``name``'s lock (this one included: a lock
    is its open file's, and this opens another). Probed with a shared lock: a sweep
    trying at that moment skips a dead owner, and never takes a live one for dead."""
    try:
        fd = os.open(os.path.join(SHM_DIR, name),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False            # gone meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _remove_if_mine(name: str, uid: int) -> bool:
    """Unlink SHM_DIR/``name`` if it is this user's regular file. /dev/shm is sticky:
    another user cannot put a file of theirs under the name after the check."""
    path = os.path.join(SHM_DIR, name)
    try:
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            return False
        os.unlink(path)
    except OSError:         # gone meanwhile; or not ours to remove: no reason to fail a session
        return False
    return True
