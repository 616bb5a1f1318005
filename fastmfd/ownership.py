"""Whose a file or directory is: a user's files go only where no other user can
replace them or choose where they go (:func:`check_only_yours`, for the directories
``listen`` writes into and ``send --qemu`` reads a save from), and the files that
decide whom a session trusts are ones no other user can change
(:func:`check_trusted_file`: the shared key, TLS keys, certificates and CA bundles).
One rule for both, ssh's ``StrictModes``."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct

from .errors import ConfigError
from .shm import file_identity

__all__ = ["check_only_yours", "check_trusted_file", "refuse_acl", "READ", "WRITE"]


def check_only_yours(path: str, opened: int | None = None,
                     what: str = "output directory") -> None:
    """ConfigError unless no other user can rename or replace what is written in the
    directory ``path``, or choose where it is: every directory the path passes
    through (:func:`_walked`: as the kernel walks it, and so every one above the
    directory it names) belongs to this user or root, and those others may write in
    are sticky (as /tmp is); a group of the user's own (:func:`_only_mine`) is no
    other; each symbolic link on the way is this user's or root's. Another user's
    directory (one made in /tmp under a name they guessed first) would let them
    swap a saved VM's memory for theirs after it was written, and their link there
    under that name would send the files into another directory of the user's,
    replacing a save there with ``--force``: refused, as ssh refuses an
    ``authorized_keys`` in such a place (``StrictModes``; the kernel's
    ``fs.protected_symlinks`` refuses such a link only where it is set). ``opened``:
    the directory's descriptor, which must still be what ``path`` names; ``what``:
    what the directory is, in the error (a saved one, read back: the same holds)."""
    _check_walk(path, opened, what, "give a directory of your own")


def check_trusted_file(path: str, what: str, opened: int | None = None) -> None:
    """ConfigError unless only this user or root can change the file ``path``, one
    that decides who may connect (``what``: which, in the error): the rule of
    :func:`check_only_yours` on each directory and link on its way, and the file
    itself this user's or root's, which no other may write (a sticky bit on a file
    protects nothing). Another user who could change it, or rename it away in its
    directory and put theirs in its place, chose whom the session trusts: their own
    CA added to a listener's bundle made their client certificates accepted.
    ``opened``: the file's descriptor, which must still be what ``path`` names."""
    _check_walk(path, opened, what, "use a file of your own, in directories only you or "
                                    "root may change")


def _check_walk(path: str, opened: int | None, what: str, mend: str) -> None:
    """:func:`check_only_yours`'s rule on ``path``; ``mend``: what to do, in the errors."""
    me = os.geteuid()
    try:
        walked, final = _walked(path)
    except OSError as exc:          # (a link or directory on the way swapped meanwhile)
        raise ConfigError(f"{what} {path}: {exc.filename or path} was replaced as it was "
                          f"opened ({exc.strerror or exc}); {mend}") from None
    if opened is not None and file_identity(opened) != (final.st_dev, final.st_ino):
        raise ConfigError(f"{what} {path}: it was replaced as it was opened; {mend}")
    for where, st in walked:
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (me, 0):
                raise ConfigError(f"{what} {path}: {where} is a symbolic link of another "
                                  f"user (uid {st.st_uid}), who chose where it leads; "
                                  f"{mend}")
            continue
        change = ("replace the files there" if stat.S_ISDIR(st.st_mode)
                  else "change what it says")
        if st.st_uid not in (me, 0):
            raise ConfigError(f"{what} {path}: {where} belongs to another user "
                              f"(uid {st.st_uid}), who could {change}; {mend}")
        others_write = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP
                                                     and not _only_mine(st.st_gid, me))
        if st.st_mode & stat.S_IWGRP and not others_write:
            refuse_acl(where, f"{what} {path}", WRITE, follow_symlinks=False)
        if others_write and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            raise ConfigError(f"{what} {path}: others may write "
                              f"{'in' if stat.S_ISDIR(st.st_mode) else 'to'} {where} (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}) and {change}; "
                              f"chmod go-w {where}")


_MAX_LINKS = 40         # links one path may pass through (the kernel's, then ELOOP)


def _walked(path: str) -> tuple[list[tuple[str, os.stat_result]], os.stat_result]:
    """Each directory and symbolic link the kernel passes through resolving ``path``
    (relative: from the working directory), in order, named where it lies, with its
    lstat; and the stat of the directory reached. A link's target is walked in its
    place, and ".." after it leads to its target's parent, as in the kernel."""
    walked = [("/", os.lstat("/"))]
    where, links = "/", 0
    todo = (path if os.path.isabs(path) else os.path.join(os.getcwd(), path)).split("/")[::-1]
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            where = os.path.dirname(where)      # (where: a directory, no link in it)
            continue
        entry = os.path.join(where, name)
        st = os.lstat(entry)
        walked.append((entry, st))
        if not stat.S_ISLNK(st.st_mode):
            where = entry
            continue
        links += 1
        if links > _MAX_LINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        target = os.readlink(entry)
        todo.extend(target.split("/")[::-1])
        if target.startswith("/"):
            where = "/"
    return walked, os.lstat(where)


def _only_mine(gid: int, me: int) -> bool:
    """Whether ``gid`` is the user ``me``'s private group, with no other member: where
    each user has a group of their own (Fedora's and RHEL's umask 002 then makes
    every directory they make group-writable), its writers are the user alone.
    Debian's ssh takes such a group for its owner in ``StrictModes`` too."""
    try:
        group, mine = grp.getgrgid(gid), pwd.getpwuid(me)
    except KeyError:            # a group or user with no name: nothing says whose
        return False
    primary = [user.pw_uid for user in pwd.getpwall() if user.pw_gid == gid]
    return (set(primary) <= {me} and set(group.gr_mem) <= {mine.pw_name}
            and bool(primary or group.gr_mem))


_ACCESS_ACL = "system.posix_acl_access"
# Its value (the kernel's posix_acl_xattr format): a version, then (tag, perm, id) entries.
_ACL_VERSION = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_NAMED_USER, _NAMED_GROUP, _MASK = 0x02, 0x08, 0x10
READ, WRITE = 4, 2


def refuse_acl(path: str, what: str, access: int, follow_symlinks: bool = True) -> None:
    """ConfigError if the POSIX access ACL of the file ``path`` (``what`` it is, in the
    error) lets another user ``access`` it (READ or WRITE): a named user but this one or
    root, or for WRITE a named group not the user's own. With an ACL the mode's group
    bits are its mask, what a named entry may at most do, not what the owning group may,
    so a group bit allowed for the owning group (the user's own, a key's service group)
    could let others in (``setfacl -m u:mallory:rw``). Entries the mask or their own
    bits keep from ``access`` (a mask alone, a read-only share, a denial) are no one's
    way in; a file system without ACLs has none."""
    try:
        acl = os.getxattr(path, _ACCESS_ACL, follow_symlinks=follow_symlinks)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    entries = [_ACL_ENTRY.unpack_from(acl, at)
               for at in range(_ACL_VERSION.size, len(acl) - _ACL_ENTRY.size + 1,
                               _ACL_ENTRY.size)]
    mask = next((perm for tag, perm, _ in entries if tag == _MASK), 7)
    me = os.geteuid()
    for tag, perm, ident in entries:
        if not perm & mask & access:
            continue
        if tag == _NAMED_USER and ident not in (me, 0):
            entry = f"u:{ident}"
        elif tag == _NAMED_GROUP and access == WRITE and not _only_mine(ident, me):
            entry = f"g:{ident}"
        else:
            continue
        verb = "write" if access == WRITE else "read"
        raise ConfigError(f"{what}: an ACL lets {'user' if entry[0] == 'u' else 'group'} "
                          f"{ident} {verb} {path} (getfacl {path}); remove that entry: "
                          f"setfacl -x {entry} {path}")
