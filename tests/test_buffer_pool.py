"""BufferPool: fixed-size slots in one shared-memory segment, for any process."""

import threading
import time

import numpy as np
import pytest

from fastmfd._core import BufferPool, ChannelSelector
from fastmfd.errors import Aborted, ConfigError
from fastmfd.shm import list_segments
from signals import Interrupted, interrupt_once

WAIT = 30.0     # bound on every wait that should end much sooner


@pytest.fixture
def pool():
    with BufferPool.create(4, 1000) as pool:
        yield pool


def test_geometry(pool):
    assert (pool.nslots, pool.slot_size, pool.free_count) == (4, 1000, 4)
    assert pool.name.startswith("fastmfd-") and pool.name in list_segments()
    assert not any(pool.is_held(slot) for slot in range(4))


def test_every_slot_is_handed_out_once(pool):
    slots = [pool.acquire(timeout=0) for _ in range(4)]
    assert sorted(slots) == [0, 1, 2, 3]
    assert all(pool.is_held(slot) for slot in slots)
    assert pool.free_count == 0
    assert pool.acquire(timeout=0) is None
    for slot in slots:
        pool.release(slot)
    assert pool.free_count == 4
    assert sorted(pool.acquire(timeout=0) for _ in range(4)) == [0, 1, 2, 3]


def test_a_released_slot_comes_back(pool):
    slots = [pool.acquire(timeout=0) for _ in range(4)]
    pool.release(slots[2])
    assert pool.acquire(timeout=0) == slots[2]


def test_double_release_raises_and_changes_nothing(pool):
    slot = pool.acquire()
    pool.release(slot)
    with pytest.raises(ValueError, match=f"slot {slot} is not held"):
        pool.release(slot)
    # The failed release must not have pushed the slot a second time.
    assert pool.free_count == 4
    assert sorted(pool.acquire(timeout=0) for _ in range(4)) == [0, 1, 2, 3]
    assert pool.acquire(timeout=0) is None


def test_releasing_a_slot_never_acquired_or_out_of_range(pool):
    with pytest.raises(ValueError, match="not held"):
        pool.release(3)
    with pytest.raises(ValueError, match="out of range"):
        pool.release(4)
    with pytest.raises(ValueError, match="out of range"):
        pool.view(4)
    with pytest.raises(ValueError, match="out of range"):
        pool.is_held(4)
    assert pool.free_count == 4


def test_views_are_slot_sized_writable_and_disjoint(pool):
    for slot in range(4):
        view = pool.view(slot)
        assert len(view) == 1000 and not view.readonly
        view[:] = bytes([slot + 1]) * 1000
    for slot in range(4):
        assert bytes(pool.view(slot)) == bytes([slot + 1]) * 1000


def test_views_share_memory_without_copying(pool):
    first, second = pool.view(1), pool.view(1)
    array = np.frombuffer(pool.view(1), dtype=np.uint8)
    first[10:14] = b"abcd"
    assert bytes(second[10:14]) == b"abcd"
    assert bytes(array[10:14]) == b"abcd"
    array[0] = 0x7F
    assert first[0] == 0x7F


def answer_in_slot(name, slot):
    """Child: read the parent's bytes through its own mapping, answer in place."""
    pool = BufferPool.attach(name)
    view = pool.view(slot)
    assert bytes(view[:5]) == b"hello", bytes(view[:5])
    assert pool.is_held(slot)
    view[:5] = b"world"
    view.release()
    pool.close()


def test_slot_bytes_are_shared_between_processes(pool, processes):
    slot = pool.acquire()
    pool.view(slot)[:5] = b"hello"
    processes.join(processes.start(answer_in_slot, pool.name, slot))
    assert bytes(pool.view(slot)[:5]) == b"world"


def test_timeout_zero_returns_none_at_once(pool):
    for _ in range(4):
        pool.acquire()
    started = time.monotonic()
    assert pool.acquire(timeout=0) is None
    assert time.monotonic() - started < WAIT, "timeout=0 must not block"


def test_timeout_returns_none_after_the_timeout(pool):
    for _ in range(4):
        pool.acquire()
    started = time.monotonic()
    assert pool.acquire(timeout=0.3) is None
    elapsed = time.monotonic() - started
    assert 0.3 - 0.01 <= elapsed < WAIT


def test_a_signal_handler_runs_while_acquire_sleeps(pool):
    """Ctrl-C reaches a sleeping acquire: the handler runs, what it raises comes out."""
    for _ in range(4):
        pool.acquire()
    with interrupt_once(after=0.2), pytest.raises(Interrupted):
        pool.acquire(timeout=WAIT)
    pool.release(0)
    assert pool.acquire(timeout=0) == 0, "the interrupted wait took nothing"


def hold_then_release(name, held, delay):
    pool = BufferPool.attach(name)
    slot = pool.acquire(timeout=WAIT)
    held.set()
    time.sleep(delay)
    pool.release(slot)
    pool.close()


def test_blocked_acquire_wakes_when_another_process_releases(processes):
    with BufferPool.create(1, 64) as pool:
        held = processes.ctx.Event()
        child = processes.start(hold_then_release, pool.name, held, 0.3)
        assert held.wait(WAIT)
        assert pool.free_count == 0 and pool.is_held(0)
        assert pool.acquire(timeout=WAIT) == 0
        processes.join(child)


def wait_for_a_slot(name, waiting, outcome):
    pool = BufferPool.attach(name)
    waiting.set()
    try:
        pool.acquire()
        outcome.put("acquired")
    except Aborted:
        outcome.put("aborted")
    finally:
        pool.close()


def test_abort_wakes_waiters_in_other_processes_and_threads(processes):
    with BufferPool.create(1, 64) as pool:
        pool.acquire()
        waiting, outcome = processes.ctx.Event(), processes.ctx.Queue()
        child = processes.start(wait_for_a_slot, pool.name, waiting, outcome)
        raised = []

        def waiter():
            with pytest.raises(Aborted):
                pool.acquire(timeout=WAIT)
            raised.append(True)

        threads = [threading.Thread(target=waiter) for _ in range(3)]
        for thread in threads:
            thread.start()
        assert waiting.wait(WAIT)
        time.sleep(0.2)         # let everyone fall asleep (the result is the same if not)
        pool.abort()
        for thread in threads:
            thread.join(WAIT)
        assert raised == [True] * 3
        assert outcome.get(timeout=WAIT) == "aborted"
        processes.join(child)


def test_abort_also_stops_future_acquires(pool):
    free = pool.free_count
    pool.abort()
    assert pool.free_count == free          # the wake-up post is not a free slot
    with pytest.raises(Aborted):
        pool.acquire(timeout=0)
    with pytest.raises(Aborted):
        pool.acquire(timeout=1)


def test_attach_checks_what_the_segment_holds():
    with ChannelSelector.create(64) as selector:     # big enough for a pool header
        with pytest.raises(ValueError, match="expected structure"):
            BufferPool.attach(selector.name)
    with ChannelSelector.create(2) as selector:
        with pytest.raises(ValueError, match=r"holds \d+ bytes, needs \d+"):
            BufferPool.attach(selector.name)
    with pytest.raises(ConfigError, match="does not exist"):
        BufferPool.attach("fastmfd-no-such-pool")


@pytest.mark.parametrize("nslots, slot_size", [(0, 64), (4, 0)])
def test_create_refuses_an_empty_pool(nslots, slot_size):
    with pytest.raises(ValueError, match="at least one"):
        BufferPool.create(nslots, slot_size)


def test_attached_pool_sees_the_same_slots(pool):
    slot = pool.acquire()
    with BufferPool.attach(pool.name) as other:
        assert (other.nslots, other.slot_size, other.free_count) == (4, 1000, 3)
        assert other.is_held(slot)
        other.release(slot)
    assert pool.free_count == 4 and pool.name in list_segments(), "an attacher never unlinks"


def test_owner_close_unlinks(pool):
    name = pool.name
    pool.close()
    assert name not in list_segments()
    pool.close()        # idempotent
