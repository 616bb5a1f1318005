"""Transparent huge pages for regions: whether this system lets a region's memory
come in 2 MiB pages, and in plain words why not when it does not.

A region lives in a file: a shared-memory segment on the tmpfs at /dev/shm, or
a file ``fastmfd listen`` maps. Linux gives huge pages to a writable file
mapping only on tmpfs, and a tmpfs decides by its mount's ``huge=`` option:
``always`` and ``within_size`` use them anyway, ``advise`` where the mapping
asked for them (``MADV_HUGEPAGE``, which every process mapping such a region
does), ``never`` (the default) not at all.
``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` governs only the
kernel's internal mount (memfd, shared anonymous memory, SysV shm), except
its two emergency values, ``deny`` (none anywhere) and ``force`` (everywhere).
So ``shmem_enabled=advise`` alone gives /dev/shm no huge page; ``mount -o
remount,huge=advise /dev/shm`` does. (hugetlbfs pages are another pool,
``HugePages_Total``, reserved by the administrator: not used here.)
"""

from __future__ import annotations

import mmap
import os

__all__ = ["SHMEM_ENABLED", "why_no_huge_pages", "advise_huge_pages"]

SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
_HUGE_MOUNT_VALUES = ("always", "within_size", "advise")


def _selected(path: str) -> str:
    """The [bracketed] value of a sysfs choice file."""
    with open(path) as f:
        text = f.read()
    return text[text.index("[") + 1:text.index("]")]


def _mount_of(path: str) -> tuple[str, str, dict[str, str]]:
    """The mount holding ``path``: its mount point, file system type and super
    block options (``/proc/self/mountinfo``; the last of equal mount points wins,
    as it is the one on top)."""
    target = os.path.realpath(path)
    best: tuple[str, str, dict[str, str]] = ("/", "", {})
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            after = fields.index("-")
            fstype, options = fields[after + 1], fields[after + 3]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, fstype, dict(o.partition("=")[::2] for o in options.split(",")))
    return best


def why_no_huge_pages(directory: str) -> str | None:
    """None if regions in files under ``directory`` can get transparent huge pages
    (asking with MADV_HUGEPAGE), else why not, and what would allow it."""
    try:
        shmem = _selected(SHMEM_ENABLED)
    except FileNotFoundError:
        return f"this kernel has no transparent huge pages for shared memory ({SHMEM_ENABLED})"
    point, fstype, options = _mount_of(directory)
    if fstype != "tmpfs":
        return (f"{directory} is on {fstype or 'an unknown file system'}: Linux gives writable "
                f"file mappings huge pages only on tmpfs")
    if shmem == "deny":
        return f"{SHMEM_ENABLED} is deny: no shared memory gets huge pages"
    huge = options.get("huge", "never")
    if shmem == "force" or huge in _HUGE_MOUNT_VALUES:
        return None
    return (f"the tmpfs at {point} is mounted huge={huge} ({SHMEM_ENABLED}, {shmem} here, "
            f"covers only memfd and shared anonymous memory); as root, "
            f"`mount -o remount,huge=advise {point}` allows them")


def advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for huge pages where this mapping is faulted in (MADV_HUGEPAGE)."""
    mapping.madvise(mmap.MADV_HUGEPAGE)
