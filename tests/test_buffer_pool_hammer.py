"""4 processes hammer a 3-slot pool: no slot is ever held by two of them at once.

Two independent detectors run in every cycle, both of which a double hand-out
trips whatever the interleaving that caused it:

- the slot's bytes: the holder fills the whole slot with (pid, sequence),
  gives the CPU away, and checks that nobody overwrote them before release;
- an owner table in a separate shared segment: the holder checks that the
  slot's cell is free and writes its pid; before release, it checks that the
  cell still holds its pid and clears it.

The pool's own view is checked too: ``is_held(slot)`` while holding. More
processes than slots, all released by one barrier and holding each slot
across a yield, make acquirers wait for each other; the test checks that
they really did.
"""

import os
import struct
import time

import numpy as np

from fastmfd._core import BufferPool
from fastmfd.shm import SharedMemory

PROCESSES = 4
SLOTS = 3
SLOT_SIZE = 64
CYCLES = 3000
STAMP = struct.Struct("<qq")        # pid, sequence number
WAIT = 60.0


class BrokenPool(BufferPool):
    """Hands slot 0 to everyone: what the detectors exist to catch."""

    def acquire(self, timeout=None):
        return 0

    def release(self, slot):
        pass

    def is_held(self, slot):
        return True


def hammer(pool_class, pool_name, owners_name, cycles, start, results):
    pool = pool_class.attach(pool_name)
    owners_segment = SharedMemory.attach(owners_name)
    owners = np.frombuffer(owners_segment.buf, dtype=np.int64)
    me = os.getpid()
    errors, uses, waits = [], [0] * SLOTS, 0
    start.wait(WAIT)
    for seq in range(cycles):
        slot = pool.acquire(timeout=0)
        if slot is None:
            waits += 1
            slot = pool.acquire(timeout=WAIT)
            if slot is None:
                errors.append(f"no slot within {WAIT} s")
                break
        uses[slot] += 1
        if not pool.is_held(slot):
            errors.append(f"cycle {seq}: pool says slot {slot} is free while held")
        if owners[slot] != 0:
            errors.append(f"cycle {seq}: slot {slot} handed out while pid {owners[slot]} "
                          "holds it")
        owners[slot] = me
        stamp = STAMP.pack(me, seq) * (SLOT_SIZE // STAMP.size)
        view = pool.view(slot)
        view[:] = stamp
        os.sched_yield()
        if seq % 8 == 0:
            time.sleep(0.0002)          # hold longer now and then: more contention
        if bytes(view) != stamp:
            errors.append(f"cycle {seq}: slot {slot} overwritten while held: "
                          f"{STAMP.unpack_from(bytes(view))}")
        if owners[slot] != me:
            errors.append(f"cycle {seq}: slot {slot} taken over by pid {owners[slot]}")
        owners[slot] = 0
        view.release()
        pool.release(slot)
    del owners
    owners_segment.close()
    pool.close()
    results.put((me, errors[:10], uses, waits))


def run_hammers(processes, pool, pool_class, cycles):
    """Run PROCESSES hammers on ``pool``; returns their reports and the owner table."""
    ctx = processes.ctx
    owners_segment = SharedMemory.create(8 * SLOTS, tag="test-owners")
    try:
        start, results = ctx.Barrier(PROCESSES), ctx.Queue()
        for k in range(PROCESSES):
            processes.start(hammer, pool_class, pool.name, owners_segment.name, cycles, start,
                            results, name=f"hammer-{k}")
        reports = [results.get(timeout=WAIT * 2) for _ in range(PROCESSES)]
        processes.join()
        return reports, np.frombuffer(owners_segment.buf, dtype=np.int64).copy()
    finally:
        owners_segment.close()


def test_no_slot_is_ever_held_twice(processes):
    pool = BufferPool.create(SLOTS, SLOT_SIZE)
    try:
        reports, owners = run_hammers(processes, pool, BufferPool, CYCLES)
        errors = [e for _, errs, _, _ in reports for e in errs]
        assert errors == []
        uses = np.sum([u for _, _, u, _ in reports], axis=0)
        assert uses.sum() == PROCESSES * CYCLES
        assert all(uses > 0), f"every slot should have been used: {uses}"
        assert sum(w for _, _, _, w in reports) > 0, "the processes never had to wait"
        assert pool.free_count == SLOTS
        assert not any(pool.is_held(slot) for slot in range(SLOTS))
        assert not owners.any()
    finally:
        pool.close()


def test_the_detectors_catch_a_slot_handed_out_twice(processes):
    with BufferPool.create(SLOTS, SLOT_SIZE) as pool:
        reports, _ = run_hammers(processes, pool, BrokenPool, 200)
    assert any(errors for _, errors, _, _ in reports)
