"""What file system a path is on, for tests whose behaviour depends on it."""

from __future__ import annotations

import os


def file_system_type(path) -> str:
    """The type of the file system ``path`` is on, from /proc/self/mountinfo."""
    path, mount, kind = os.path.realpath(path), "", ""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[4]
            if (path == point or path.startswith(point.rstrip("/") + "/")) \
                    and len(point) >= len(mount):
                mount, kind = point, fields[fields.index("-") + 1]
    return kind
