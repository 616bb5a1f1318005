"""Whether the kernel's out-of-memory killer killed a worker: a SIGKILL alone said
"killed by SIGKILL", and left the user guessing who sent it (a container's
memory limit below the image, most often).

The kernel counts each OOM kill in the memory cgroup of the process killed
(cgroup v2 ``memory.events``, v1 ``memory.oom_control``: ``oom_kill N``). A
worker runs in its main process's cgroup, which ``/proc/self/cgroup`` names:
the count read when the worker started and again at its SIGKILL tells whether
one happened meanwhile (another process of the same cgroup killed then would
be counted too: said as what it likely is, not as certain).
"""

from __future__ import annotations

import signal

from ..units import format_bytes

__all__ = ["oom_kills", "oom_killed"]

_ROOT = "/sys/fs/cgroup"
_NO_LIMIT = 1 << 62         # cgroup v1's "no limit" is about 2**63 rounded to pages


def _memory_cgroup() -> tuple[str, str, str] | None:
    """(directory, events file, limit file) of this process's memory cgroup."""
    try:
        with open("/proc/self/cgroup") as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return None
    for entry in entries:
        if len(entry) == 3 and "memory" in entry[1].split(","):       # v1
            return f"{_ROOT}/memory{entry[2]}", "memory.oom_control", "memory.limit_in_bytes"
    for entry in entries:
        if len(entry) == 3 and entry[0] == "0" and entry[1] == "":     # v2
            return f"{_ROOT}{entry[2]}", "memory.events", "memory.max"
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def oom_kills() -> int | None:
    """The OOM kills counted in this process's memory cgroup so far (None: unknown)."""
    cgroup = _memory_cgroup()
    text = _read(f"{cgroup[0]}/{cgroup[1]}") if cgroup is not None else None
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def oom_killed(exitcode: int | None, before: int | None) -> str:
    """" (the kernel's out-of-memory killer, ...)" for a process that ended with
    ``exitcode`` when it was SIGKILLed and this cgroup's OOM kill count grew from
    ``before``; "" otherwise."""
    if exitcode != -signal.SIGKILL or before is None:
        return ""
    after = oom_kills()
    if after is None or after <= before:
        return ""
    cgroup = _memory_cgroup()
    assert cgroup is not None, "a count was read from it"
    limit = (_read(f"{cgroup[0]}/{cgroup[2]}") or "").strip()
    said = (f"; the cgroup's memory limit is {format_bytes(int(limit))}"
            if limit.isdigit() and int(limit) < _NO_LIMIT else "")
    return (f" (the kernel's out-of-memory killer, it seems: {cgroup[0]}/{cgroup[1]} counted "
            f"{after - before} more OOM kill(s){said})")
