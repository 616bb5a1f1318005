"""What ``--force`` does to the save already in a directory: the files its
``manifest.json`` lists that the new save does not write are removed, so the
directory holds the new save alone, not memory of an earlier guest that no
manifest lists (a two-NUMA-node guest's ``m0.img``, ``m1.img`` under a new
save of one block).

Only what a manifest fastmfd wrote lists (``listen``'s regions and devices,
``listen --qemu``'s blocks and vmstate), read bounded and checked; only plain
names directly in the directory; only regular files, never a link (nor what it
points to). Anything else is left where it is, named in one warning line:
:func:`listed_files` is called before the old manifest is removed, and
:func:`remove_files` once that removal is durable (:mod:`.outputs` commit()).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from typing import Any

log = logging.getLogger("fastmfd")

__all__ = ["listed_files", "remove_files", "MAX_MANIFEST_BYTES"]

# A manifest lists a guest's RAM blocks and a few COMMAND sections, or a session's
# regions and devices: kilobytes. One larger is not fastmfd's, and is not read whole
# into memory, here or by send --qemu (:mod:`.qemu_manifest` takes this bound).
MAX_MANIFEST_BYTES = 4 << 20


def listed_files(dir_fd: int, manifest: str, show: str) -> list[str] | None:
    """The plain file names the manifest ``manifest`` in ``dir_fd`` lists (``show``:
    its path, for the warning), or None when there is none; [] and a warning when
    it is not one fastmfd wrote (its files are then left alone)."""
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        return _foreign(show, f"cannot open it: {why}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return _foreign(show, "not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
        if len(text) > MAX_MANIFEST_BYTES:
            return _foreign(show, f"larger than {MAX_MANIFEST_BYTES} bytes")
        names = _names(json.loads(text))
    except (OSError, ValueError, RecursionError) as exc:
        return _foreign(show, getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
    finally:
        os.close(fd)
    if names is None:
        return _foreign(show, "not the manifest of a listen or listen --qemu save")
    return names


def _names(manifest: Any) -> list[str] | None:
    """The ``file`` of each entry of a ``listen`` manifest (regions, devices) or a
    ``listen --qemu`` one (blocks, vmstate); None unless it is one, every name plain."""
    if not isinstance(manifest, dict):
        return None
    qemu = manifest.get("format") == "qemu-migration"
    kinds: list[Any] = ([manifest.get("blocks"), [manifest.get("vmstate")]] if qemu
                         else [manifest.get("regions"), manifest.get("devices")])
    if not all(isinstance(kind, list) for kind in kinds):
        return None
    names = [entry.get("file") if isinstance(entry, dict) else None
             for kind in kinds for entry in kind]
    plain = [name for name in names if isinstance(name, str) and name not in ("", ".", "..")
             and "/" not in name and "\0" not in name]
    return plain if len(plain) == len(names) else None


def _foreign(show: str, why: str) -> list[str]:
    log.warning("%s: %s: replacing it removes nothing it lists (the earlier save's files are "
                "left as they are)", show, why)
    return []


def remove_files(dir_fd: int, names: list[str], keep: set[str], path: str) -> None:
    """Unlink each of ``names`` in ``dir_fd`` (``path``) that is not in ``keep`` and
    is a regular file; those that are not, or that cannot be removed, are left and
    named in one warning line. The caller makes the removals durable."""
    left = []
    for name in dict.fromkeys(names):
        if name in keep:
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                left.append(f"{name} (not a regular file)")
                continue
            os.unlink(name, dir_fd=dir_fd)      # the name: a link swapped in stays a link
        except FileNotFoundError:
            pass
        except OSError as exc:
            left.append(f"{name} ({exc.strerror or exc})")
    if left:
        log.warning("%s: files of the earlier save left (only the regular files its manifest "
                    "lists are removed): %s", path, ", ".join(left))
