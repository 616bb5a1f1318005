"""What every way of moving an image agrees on: the trial steps and what they measure.

A trial is prepared in its constructor (processes started, connections made:
not timed), then::

    trial.pids()                    each side's processes, whose CPU time is measured
    measurement = trial.run()       the timed part: the whole transfer
    trial.finish()                  destination == source checked, everything freed
    trial.close()                   frees without checking (idempotent)

fastmfd's own trial is in :mod:`.fastmfd_trial`, the peers' in :mod:`.peers`.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..._core import populate
from ...threads import start_thread
from ..images import Image

__all__ = ["Measurement", "Trial", "CpuMeter", "FOREIGN_LOAD_FLAG", "wait_until_idle",
           "warm_free_memory"]

FOREIGN_LOAD_FLAG = 0.25    # cores of other processes' CPU use that make a run suspect


@dataclass(frozen=True)
class Measurement:
    """One timed transfer."""
    seconds: float              # wall clock of the timed part
    image_bytes: int            # bytes of memory moved
    wire_bytes: int | None      # bytes written on every connection (None: not known)
    details: dict[str, Any] = field(default_factory=dict)   # what else the method measured

    @property
    def throughput(self) -> float:
        """Image bytes per second."""
        return self.image_bytes / self.seconds if self.seconds > 0 else 0.0


class Trial(Protocol):
    """One prepared transfer (see the module docstring)."""

    image: Image            # what it moves

    def pids(self) -> dict[str, list[int]]: ...

    pids_complete: bool     # pids() lists every process the trial runs

    def run(self) -> Measurement: ...

    def finish(self) -> object: ...

    def close(self) -> None: ...


_TICK = os.sysconf("SC_CLK_TCK")
_PF_KTHREAD = 0x00200000        # /proc/PID/stat flags: a kernel thread


def _process_cpu_ns(pid: int) -> int | None:
    """CPU nanoseconds ``pid`` has used so far, every thread counted (even ended
    ones); None once it has exited. Its process CPU clock (clock_getcpuclockid):
    /proc/PID/stat's utime and stime are in whole clock ticks, each truncated,
    which made a 20-100 ms run's CPU seconds noise and a tick of it 0.1-0.5
    cores of "other load"."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)    # CPUCLOCK_SCHED of the process
    except OSError:                 # EINVAL: no such process (any more)
        return None


def _kernel_thread(pid: int) -> bool:
    """Whether ``pid`` is a kernel thread (False once gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return bool(int(stat.read().rsplit(")", 1)[1].split()[6]) & _PF_KTHREAD)
    except (OSError, IndexError, ValueError):
        return False


def _machine_busy_s() -> float:
    """CPU seconds the machine's processes (every core) and its host have used,
    irq and softirq left out: with ticks charged to them no process is, the
    trial's own loopback networking counted as other load (where the kernel
    charges that work to the task it interrupts, the trial's CPU time has it)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = \
            map(int, stat.readline().split()[1:9])
    return (user + nice + system + steal) / _TICK


class CpuMeter:
    """The CPU seconds of a trial's processes over its timed part, by side, and
    the load of everything else on the machine meanwhile (in cores): a run
    beside a foreign load above :data:`FOREIGN_LOAD_FLAG` is suspect. A trial
    whose ``pids`` are not all its processes (``complete=False``) gets no load
    figure: its own unseen processes would count as foreign.

    The foreign load is the larger of two lower bounds. The other processes' CPU
    time, to the nanosecond (their CPU clocks at the start and the end; one
    started meanwhile counts whole): kernel threads are left out, on an idle
    machine the trial's own work (softirq, writeback). And, for processes that
    start and end within the run, the machine's busy time (/proc/stat) less
    everything counted: that is in clock ticks, so it counts only beyond its
    granularity (:meth:`_tick_error`), which leaves a run of a few dozen
    milliseconds judged by the first bound alone.

    fastmfd's workers tear down and exit when their session is closed, after
    the timed part, so their teardown is not counted (nor is QEMU's: its
    processes outlive the timed part too). A process that exits within it takes
    its counters along: a thread samples every process every
    ``SAMPLE_SECONDS`` and keeps the last value, so only its last few
    milliseconds can be missed."""

    SAMPLE_SECONDS = 0.01

    def __init__(self, pids: dict[str, list[int]], complete: bool = True) -> None:
        self._sides, self._complete = pids, complete
        # The bench's own process is no other load, whether or not a side runs in it.
        self._mine = {pid for side in pids.values() for pid in side} | {os.getpid()}
        self._kernel: dict[int, bool] = {}      # by pid, looked up once
        self._others = self._others_ns() if complete else {}
        self._first = self._sample({})
        self._bench_ns = time.process_time_ns()
        self._last = dict(self._first)
        self._busy = _machine_busy_s()
        self._wall = time.monotonic()
        self._stop = threading.Event()
        self._thread = start_thread(threading.Thread(target=self._run, daemon=True,
                                                     name="bench cpu meter"))

    def _sample(self, into: dict[int, int]) -> dict[int, int]:
        for pids in self._sides.values():
            for pid in pids:
                value = _process_cpu_ns(pid)
                if value is not None:
                    into[pid] = value
        return into

    def _others_ns(self) -> dict[int, tuple[int, bool]]:
        """Every other process's CPU nanoseconds, and whether it is a kernel thread."""
        found: dict[int, tuple[int, bool]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in self._mine:
                continue
            pid = int(name)
            value = _process_cpu_ns(pid)
            if value is not None:
                kernel = self._kernel.get(pid)
                if kernel is None:
                    kernel = self._kernel[pid] = _kernel_thread(pid)
                found[pid] = (value, kernel)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.SAMPLE_SECONDS):
            self._sample(self._last)

    @staticmethod
    def _tick_error(wall: float) -> float:
        """Cores by which /proc/stat's busy time over ``wall`` seconds can be off:
        its four fields each truncated to a tick, and each core's ticks charged
        whole to what they land on (two each, at either end)."""
        return (4 + 2 * (os.cpu_count() or 1)) / _TICK / wall

    def stop(self) -> dict[str, Any]:
        """``{"cpu_s": {side: seconds}, "foreign_cores": load}`` for Measurement.details."""
        self._stop.set()
        self._thread.join()
        self._sample(self._last)
        wall = time.monotonic() - self._wall
        busy = _machine_busy_s() - self._busy
        cpu = {side: round(sum(self._last.get(pid, 0) - self._first.get(pid, 0)
                               for pid in pids) / 1e9, 3)
               for side, pids in self._sides.items()}
        if not self._complete:      # the trial's own unseen processes would count as foreign
            return {"cpu_s": cpu}
        others = {False: 0, True: 0}            # ns of user processes, of kernel threads
        for pid, (now, kernel) in self._others_ns().items():
            before = self._others.get(pid, (0, kernel))[0]
            others[kernel] += now - before if now >= before else now    # else: a pid reused
        if wall <= 0:
            return {"cpu_s": cpu, "foreign_cores": 0.0}
        counted = (sum(cpu.values()) + (others[False] + others[True]) / 1e9
                   + (0 if os.getpid() in self._first else
                      (time.process_time_ns() - self._bench_ns) / 1e9))
        unseen = (busy - counted) / wall - self._tick_error(wall)
        foreign = max(others[False] / 1e9 / wall, unseen)
        return {"cpu_s": cpu, "foreign_cores": round(max(0.0, foreign), 2)}


def wait_until_idle(pids: Iterable[int], *, window: float = 0.02, timeout: float = 10.0) -> None:
    """Return once ``pids`` used under 5% of a CPU for ``window`` seconds (or at ``timeout``).

    A peer's processes (QEMU, the sendall pair) start in the background; on a
    small machine the tail of that start-up would otherwise run during the
    timed transfer. (fastmfd's own workers report ready before the Source or
    Destination is entered, so its trials need no wait.)
    """
    deadline = time.monotonic() + timeout
    pids = list(pids)

    def used() -> int:      # those that have exited count 0
        return sum(_process_cpu_ns(pid) or 0 for pid in pids)
    before = used()
    while time.monotonic() < deadline:
        time.sleep(window)
        now = used()
        if now - before < 0.05 * window * 1e9:
            return
        before = now


WARM_MARGIN = 8         # warm 1/8 more than the image: the processes' own buffers


def warm_free_memory(image_bytes: int) -> None:
    """Touch and free a little more memory than an image right before a timed run,
    so that the memory its destination takes is equally fresh whichever side
    runs and whatever came before.

    On a VM whose balloon reports free memory to its host (virtio-balloon free
    page reporting, as here: memory free for about 2 s is handed back), the
    first touch of memory handed back costs the host's fault and clear on top
    of the guest's: up to 10x more for the clear, 0.62-1.05 CPU-s to fault in
    1 GiB against 0.58-0.66 right after a free. Which runs met such memory
    depended on how long the step before them took (a QEMU started, an image
    made), not on the transfer: without this, the first run after a 1 GiB
    image was made took 1.40 s where the rest took 0.46-0.52 (fastmfd ->
    fastmfd), and 1.63 s against 0.56-0.87 (fastmfd -> QEMU 10); with it, 0.48
    and 0.58. A kernel without MADV_POPULATE_WRITE (< 5.14) gets no warm-up.
    """
    size = image_bytes + image_bytes // WARM_MARGIN
    size -= size % mmap.PAGESIZE
    if size <= 0:
        return
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as memory:
        view = memoryview(memory)
        try:
            populate(view, "the bench's warm-up memory")
        finally:
            view.release()
