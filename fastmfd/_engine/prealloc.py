"""Prealloc: a destination faults its regions in before the source sends a page
(QEMU's ``prealloc=on``), in parallel in its receive workers.

::

    Receiving (main process)                         receive worker i (idle until a channel)
      SETUP checked, regions made
      Prealloc(regions, share i) ─────────────────▶   attach, MADV_POPULATE_WRITE its share
      ◀──────────────── Preallocated(done) per slice    one slice (PREALLOC_SLICE) at a time
      meanwhile: KEEPALIVE ──▶ source (it waits for    then waits for its Greeting (or Stop)
        SETUP_ACK; each KEEPALIVE restarts its wait)
      every share done -> SETUP_ACK: the source starts

Why before SETUP_ACK: the source opens no channel and sends no page until it
has SETUP_ACK, so nothing can land in a region still being faulted in, and the
transfer that follows writes only into memory that is there. Each worker must
report a slice within the stall deadline (a stopped or stuck worker fails the
session, naming it); a file system that cannot back a share (/dev/shm full) is
the worker's clean MigrationError, sent to the source as ERROR.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..errors import MigrationError
from ..protocol.control import Prealloc, Preallocated
from ..protocol.main_channel import MainChannel, Msg
from ..regions import Region
from .liveness import Progress, stall_error, tick
from .processes import Child, ChildSet, Watch
from .session import SessionFailure
from .workers import recv_worker_main

__all__ = ["plan_shares", "preallocate", "SHARE_ALIGN"]

SHARE_ALIGN = 2 << 20       # shares split on huge-page boundaries (of the regions laid end to end)

Share = tuple[tuple[int, int, int], ...]        # (region index, offset, length) runs


def plan_shares(sizes: Sequence[int], parts: int, align: int = SHARE_ALIGN) -> list[Share]:
    """Split regions of ``sizes`` bytes, laid end to end, into ``parts`` runs of
    about equal bytes cut at multiples of ``align``; returns the runs of each
    part (some may be empty when there is little to split)."""
    total = sum(sizes)
    cuts = [0] + [min(total, -(-total * k // parts) // align * align) for k in range(1, parts)]
    cuts.append(total)
    shares = []
    for low, high in zip(cuts, cuts[1:]):
        runs, base = [], 0
        for index, size in enumerate(sizes):
            start, end = max(low, base), min(high, base + size)
            if start < end:
                runs.append((index, start - base, end - start))
            base += size
        shares.append(tuple(runs))
    return shares


def preallocate(workers: ChildSet, count: int, regions: Sequence[Region],
                main: MainChannel, stall: float, keepalive_every: float,
                failure: SessionFailure) -> list[Child]:
    """Fault ``regions`` in with ``count``
    receive workers (started if missing), each its share; returns the workers
    that were given one (they wait for a Greeting next). KEEPALIVE goes to the
    source at once and at least every ``keepalive_every`` seconds meanwhile; a worker that
    reports no slice for ``stall`` seconds fails the session."""
    shares = plan_shares([region.size for region in regions], count)
    while len(workers) < count:
        workers.add(recv_worker_main, f"receive channel {len(workers)}", stall)
    handles = tuple(region.handle for region in regions)
    owed: dict[Child, int] = {}
    done: dict[Child, int] = {}
    watch = Watch()
    for worker, share in zip(workers, shares):
        if not share:
            continue
        worker.start_session(Prealloc(handles, share), [])
        owed[worker] = sum(length for _, _, length in share)
        done[worker] = 0
        watch.add_child(worker, functools.partial(_on_report, worker, done=done))
    # The first at once: the source waits for SETUP_ACK within its handshake
    # deadline, which a KEEPALIVE replaces with the session's stall deadline.
    main.send(Msg.KEEPALIVE)
    progress = Progress(stall)
    while any(done[w] < owed[w] for w in owed):
        failure.check()
        watch.poll(min(tick(stall), keepalive_every))
        for worker in owed:
            if done[worker] < owed[worker] and progress.stalled(worker, True, done[worker]):
                raise stall_error(worker.name, stall, worker.process.pid,
                                  " (faulting its share of the regions in)")
        main.keep_alive(keepalive_every)
    return list(owed)


def _on_report(worker: Child, report: object, *, done: dict[Child, int]) -> None:
    if not isinstance(report, Preallocated):
        raise MigrationError(f"reported {type(report).__name__} while preallocating",
                             channel=worker.name)
    done[worker] = report.done
