"""Which process owns a segment, alive or dead, told by a lock; and the sweep of the
segments of owners that died with their resource tracker.

The resource tracker unlinks a dead owner's segments (see :mod:`fastmfd.shm`), but
it is in the owner's process group and cgroup: a kill of the whole (``kill -9
-PGID``, systemd's final SIGKILL of a service, ``docker kill``, an OOM kill of the
group) kills it too, and left every segment of the session in /dev/shm for good.

So each process that creates segments holds, for its life, a ``flock`` on an
*owner file* ``/dev/shm/fastmfd-owner-PID-TOKEN`` (made at its first segment),
and each of its segments' names starts its random part with that ``TOKEN``
(``fastmfd-TAG-PID-TOKENxxxxxx``); every process that attaches one of them holds
the same lock while attached. The locks are shared; a sweep tries the exclusive
one. The kernel releases a lock when the last descriptor of it closes, however
its process ended: an owner file whose exclusive lock can be taken is an owner
dead everywhere, and no process attached to its segments. A pid cannot tell
that: a /dev/shm shared by containers is shared across pid namespaces, and pids
are reused. A process's first segment sweeps: of each owner file of this user
whose exclusive lock it can take, it unlinks the segments and then the owner
file. So a segment's name lives as long as its owner or a process attached to it
(a forkserver's or spawned child of a killed owner, using it, attaches it again
by name); not, as with the resource tracker alone, until the whole tree has
exited: a child that closed it, its owner killed and a sweep run since, finds it
gone. A forked child inherits the lock too, and a child that creates segments
makes an owner file of its own. Another user's files, links and what is not a
regular file are left alone. Names made before owner files were (no owner file
matches them) are not swept, nor those of a process that could make no owner
file (a /dev/shm without O_TMPFILE, no /proc): those are the tracker's alone.

The owner file goes at its process's exit (multiprocessing's exit handlers, which
its worker processes run too), or with the resource tracker like a segment.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import threading
import time
from multiprocessing import resource_tracker, util

__all__ = ["SHM_DIR", "SEGMENT_PREFIX", "OWNER_TAG", "TOKEN_CHARS", "RANDOM_CHARS", "owner_token",
           "owner_of", "is_owner_file", "owner_lives", "sweep_dead_owners", "hold_owner",
           "let_go_of_owner"]

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "fastmfd-"
OWNER_TAG = "owner"
TOKEN_CHARS = 6         # an owner's token: hex digits
RANDOM_CHARS = 2 * TOKEN_CHARS  # a segment's random part: its owner's token, then its own
_HEX = frozenset("0123456789abcdef")
HOLD_WAIT = 1.0         # seconds an attacher waits for a sweep holding an owner's lock

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
    if len(random) == RANDOM_CHARS or (len(random) == TOKEN_CHARS and is_owner_file(name)):
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
        fcntl.flock(fd, fcntl.LOCK_SH)
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


def _open_owner_file(name: str, uid: int) -> tuple[int, os.stat_result] | None:
    """A descriptor of owner file ``name`` and its status, if it is ``uid``'s regular
    file; None otherwise (gone, a link, a FIFO, another user's)."""
    try:
        # O_NONBLOCK: a FIFO by that name would block an open
        fd = os.open(os.path.join(SHM_DIR, name),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
        os.close(fd)
        return None
    return fd, st


def _still_named(name: str, st: os.stat_result) -> bool:
    """Whether ``name`` is still the file ``st`` is of: a sweep may have removed it,
    and a new owner taken the name, meanwhile."""
    try:
        now = os.stat(os.path.join(SHM_DIR, name), follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _lock_if_dead(name: str, uid: int) -> int | None:
    """A descriptor of owner file ``name``, its exclusive lock taken, if it is this
    user's regular file and no process holds its lock (its owner, a forked child of
    it, an attacher); None otherwise."""
    opened = _open_owner_file(name, uid)
    if opened is None:
        return None
    fd, st = opened
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _still_named(name, st):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def owner_lives(name: str) -> bool:
    """Whether a process holds owner file ``name``'s lock (this one included: a lock
    is its open file's, and this opens another)."""
    fd = _lock_if_dead(name, os.geteuid())
    if fd is None:
        return os.path.lexists(os.path.join(SHM_DIR, name))   # else gone meanwhile
    os.close(fd)
    return False


# The owners of the segments this process has attached, held alive by their lock:
# (pid, token) -> [the descriptor locked, the attachments].
_held: dict[tuple[int, str], list[int]] = {}
# Re-entrant: a collection in the middle may run a finalizer that closes a segment.
_held_guard = threading.RLock()


def _after_fork_in_child() -> None:
    global _held_guard
    _held_guard = threading.RLock()     # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def hold_owner(segment: str) -> None:
    """Keep the owner of ``segment`` alive to sweeps while this process has it
    attached (:func:`let_go_of_owner` when it is closed): a sweep unlinked the names
    of a killed owner whose spawned child still used them, and attached them again
    (a review). Best effort: an owner file gone (its owner exited, or was swept just
    now: then its names are gone too), not this user's, or locked by a sweep for
    longer than HOLD_WAIT leaves the attachment unheld."""
    owner = owner_of(segment)
    if owner is None or owner == _this_owner():
        return
    with _held_guard:
        held = _held.get(owner)
        if held is not None:
            held[1] += 1
            return
    # Opened and locked outside the guard: it may wait (HOLD_WAIT), and a finalizer
    # that a collection runs meanwhile closes segments (a hang with the guard held).
    fd = _lock_shared(_owner_name(*owner))
    if fd is None:
        return
    with _held_guard:
        held = _held.get(owner)
        if held is None:
            _held[owner] = [fd, 1]
            return
        held[1] += 1                    # another thread held it meanwhile
    os.close(fd)


def let_go_of_owner(segment: str) -> None:
    """One attachment of ``segment`` closed: see :func:`hold_owner`."""
    owner = owner_of(segment)
    if owner is None or owner == _this_owner():
        return
    with _held_guard:
        held = _held.get(owner)
        if held is None:
            return
        held[1] -= 1
        if not held[1]:
            del _held[owner]
            os.close(held[0])


def _lock_shared(name: str) -> int | None:
    """Owner file ``name`` open with its shared lock; None if it cannot be had (see
    hold_owner). A sweep holds the exclusive lock for as long as its unlinks take."""
    opened = _open_owner_file(name, os.geteuid())
    if opened is None:
        return None
    fd, st = opened
    deadline = time.monotonic() + HOLD_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if _still_named(name, st):
                return fd
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        except OSError:
            break
    os.close(fd)
    return None


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
