"""What does one uncontended hand-off cost? (target: <= 1 us each)

- BufferPool: acquire a slot and release it (the shared Treiber stack plus
  the process-shared semaphore that counts free slots), with ``timeout=0``
  (never sleeps) and with the default ``timeout=None``;
- ChannelSelector: select an idle channel and release it (the atomic cursor
  plus one compare-and-swap on the busy flag).

Each timed round runs many hand-offs: one alone is too short for the timer.
"""

import pytest

from fastmfd._core import BufferPool, ChannelSelector

HANDOFFS = 1000


def pool_cycles_nowait(pool):
    for _ in range(HANDOFFS):
        pool.release(pool.acquire(0))


def pool_cycles_blocking(pool):
    for _ in range(HANDOFFS):
        pool.release(pool.acquire())


def selector_cycles(selector):
    for _ in range(HANDOFFS):
        selector.release(selector.select())


def empty_loop(_):
    for _ in range(HANDOFFS):
        pass


@pytest.fixture
def pool():
    with BufferPool.create(8, 4096, tag="bench-pool") as pool:
        yield pool


@pytest.fixture
def selector():
    with ChannelSelector.create(8, tag="bench-selector") as selector:
        yield selector


def timed(benchmark, run, target):
    run(target)         # correct first: every hand-off completed, nothing left held
    benchmark.extra_info["handoffs_per_round"] = HANDOFFS
    benchmark.pedantic(run, args=(target,), rounds=200, warmup_rounds=5)
    stats = getattr(benchmark, "stats", None)
    if stats:
        benchmark.extra_info["ns_per_handoff"] = round(stats.stats.mean / HANDOFFS * 1e9, 1)


@pytest.mark.benchmark(group="hand-off: acquire/select + release (x1000)")
@pytest.mark.parametrize("kind", ["pool-timeout-0", "pool-blocking", "selector", "empty-loop"])
def test_uncontended_handoff(benchmark, pool, selector, kind):
    run, target = {
        "pool-timeout-0": (pool_cycles_nowait, pool),
        "pool-blocking": (pool_cycles_blocking, pool),
        "selector": (selector_cycles, selector),
        "empty-loop": (empty_loop, None),
    }[kind]
    timed(benchmark, run, target)
    assert pool.free_count == pool.nslots
    assert not any(selector.is_busy(ch) for ch in range(selector.nchannels))
