"""Selectors in threads of several processes at once never hand out a channel twice.

Six selectors — two threads in each of two child processes, two threads in
the test process — share three channels, so most selects must sleep until
another worker releases. Each worker, while it holds a channel, claims the
channel's cell in a shared owner table (checking it was free), gives the CPU
away, and checks the cell is still its own before releasing. A channel
handed out twice trips one of those checks whatever the interleaving; a
deliberately broken selector proves it.
"""

import os
import threading
import time

import numpy as np

from fastmfd._core import ChannelSelector
from fastmfd.shm import SharedMemory

CHANNELS = 3
PROCESSES = 2
THREADS = 2             # per process, the test process included
ROUNDS = 400
WAIT = 60.0


class BrokenSelector(ChannelSelector):
    """Hands channel 0 to everyone: what the checks exist to catch."""

    def select(self, timeout=0):
        return 0

    def release(self, ch):
        pass


def select_loop(selector, owners, worker, rounds, start):
    """One worker: returns (errors, picks per channel)."""
    errors, picks = [], [0] * CHANNELS
    start.wait(WAIT)
    for turn in range(rounds):
        ch = selector.select(timeout=WAIT)
        if ch is None:
            errors.append(f"worker {worker}: no channel within {WAIT} s")
            break
        picks[ch] += 1
        if not selector.is_busy(ch):
            errors.append(f"worker {worker}: channel {ch} idle while held")
        if owners[ch] != 0:
            errors.append(f"worker {worker} turn {turn}: channel {ch} handed out while "
                          f"worker {owners[ch]} holds it")
        owners[ch] = worker
        os.sched_yield()
        if turn % 8 == 0:
            time.sleep(0.0002)
        if owners[ch] != worker:
            errors.append(f"worker {worker} turn {turn}: channel {ch} taken by {owners[ch]}")
        owners[ch] = 0
        selector.release(ch)
    return errors, picks


def run_threads(selector, owners, first_worker, rounds, start):
    results = [None] * THREADS

    def body(k):
        results[k] = select_loop(selector, owners, first_worker + k, rounds, start)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def selector_process(selector_class, name, owners_name, first_worker, rounds, start, out):
    selector = selector_class.attach(name)
    segment = SharedMemory.attach(owners_name)
    owners = np.frombuffer(segment.buf, dtype=np.int64)
    out.put(run_threads(selector, owners, first_worker, rounds, start))
    del owners
    segment.close()
    selector.close()


def run_workers(processes, selector_class, rounds):
    """Run every worker against one selector; returns all (errors, picks)."""
    ctx = processes.ctx
    start, out = ctx.Barrier(THREADS * (PROCESSES + 1)), ctx.Queue()
    with ChannelSelector.create(CHANNELS) as created:
        owners_segment = SharedMemory.create(8 * CHANNELS, tag="test-owners")
        owners = np.frombuffer(owners_segment.buf, dtype=np.int64)
        try:
            for p in range(PROCESSES):
                processes.start(selector_process, selector_class, created.name,
                                owners_segment.name, 1 + THREADS * (p + 1), rounds, start, out)
            selector = selector_class.attach(created.name)
            results = run_threads(selector, owners, 1, rounds, start)
            for _ in range(PROCESSES):
                results += out.get(timeout=WAIT * 2)
            processes.join()
            selector.close()
            assert not any(created.is_busy(ch) for ch in range(CHANNELS))
            assert not owners.any()
        finally:
            del owners
            owners_segment.close()
    return results


def test_no_channel_is_ever_handed_out_twice(processes):
    results = run_workers(processes, ChannelSelector, ROUNDS)
    assert [e for errors, _ in results for e in errors] == []
    picks = np.sum([p for _, p in results], axis=0)
    assert picks.sum() == THREADS * (PROCESSES + 1) * ROUNDS
    assert all(picks > 0), f"every channel should have been used: {picks}"


def test_the_checks_catch_a_channel_handed_out_twice(processes):
    results = run_workers(processes, BrokenSelector, 100)
    assert any(errors for errors, _ in results)
