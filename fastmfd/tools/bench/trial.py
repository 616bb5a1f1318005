"""What every way of moving an image agrees on: the trial steps and what they measure.

A trial is prepared in its constructor (processes started, connections made:
not timed), then::

    measurement = trial.run()       the timed part: the whole transfer
    trial.finish()                  destination == source checked, everything freed
    trial.close()                   frees without checking (idempotent)

fastmfd's own trial is in :mod:`.fastmfd_trial`, the peers' in :mod:`.peers`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Measurement", "Trial", "wait_until_idle"]


@dataclass(frozen=True)
class Measurement:
    """One timed transfer."""
    seconds: float              # wall clock of the timed part
    image_bytes: int            # bytes of memory moved
    wire_bytes: int | None      # bytes written on every connection (None: not known)
    details: dict = field(default_factory=dict)   # what else the method measured

    @property
    def throughput(self) -> float:
        """Image bytes per second."""
        return self.image_bytes / self.seconds if self.seconds > 0 else 0.0


class Trial(Protocol):
    """One prepared transfer (see the module docstring)."""

    def run(self) -> Measurement: ...

    def finish(self) -> object: ...

    def close(self) -> None: ...


def _cpu_ns(pids) -> int:
    """CPU time used so far by every thread of ``pids`` (those that have exited count 0)."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                    total += int(stat.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wait_until_idle(pids, *, window: float = 0.02, timeout: float = 10.0) -> None:
    """Return once ``pids`` used under 5% of a CPU for ``window`` seconds (or at ``timeout``).

    A peer's processes (QEMU, the sendall pair) start in the background; on a
    small machine the tail of that start-up would otherwise run during the
    timed transfer. (fastmfd's own workers report ready before the Source or
    Destination is entered, so its trials need no wait.)
    """
    deadline = time.monotonic() + timeout
    before = _cpu_ns(pids)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = _cpu_ns(pids)
        if now - before < 0.05 * window * 1e9:
            return
        before = now
