"""What file system a path is on, for tests whose behaviour depends on it; what
a user may have put where a command writes."""

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


def put_in_the_way(path, kind: str, target) -> None:
    """Make ``path`` a user's ``kind`` of thing: a "file", a "symlink" to
    ``target``, a "fifo" or a "directory"."""
    if kind == "file":
        path.write_text("the user's")
    elif kind == "symlink":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        assert kind == "directory", kind
        path.mkdir()
