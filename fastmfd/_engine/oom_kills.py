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

from ..shm import NO_LIMIT, memory_cgroup
from ..units import format_bytes

__all__ = ["oom_kills", "oom_killed"]


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def oom_kills() -> int | None:
    """The OOM kills counted in this process's memory cgroup so far (None: unknown)."""
    cgroup = memory_cgroup()
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
    cgroup = memory_cgroup()
    assert cgroup is not None, "a count was read from it"
    limit = (_read(f"{cgroup[0]}/{cgroup[2]}") or "").strip()
    said = (f"; the cgroup's memory limit is {format_bytes(int(limit))}"
            if limit.isdigit() and int(limit) < NO_LIMIT else "")
    return (f" (the kernel's out-of-memory killer, it seems: {cgroup[0]}/{cgroup[1]} counted "
            f"{after - before} more OOM kill(s){said})")
