"""ChannelSelector: atomic round-robin choice of an idle channel, from threads and processes."""

import threading
import time

import pytest

from fastmfd._core import BufferPool, ChannelSelector
from fastmfd.errors import Aborted
from fastmfd.shm import list_segments
from signals import Interrupted, interrupt_once

WAIT = 30.0


@pytest.fixture
def selector():
    with ChannelSelector.create(4) as selector:
        yield selector


def select_and_release(selector, times):
    picked = []
    for _ in range(times):
        ch = selector.select()
        picked.append(ch)
        selector.release(ch)
    return picked


def test_round_robin_when_all_idle(selector):
    assert selector.nchannels == 4
    assert select_and_release(selector, 9) == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_selected_channels_stay_busy_until_released(selector):
    assert [selector.select() for _ in range(4)] == [0, 1, 2, 3]
    assert all(selector.is_busy(ch) for ch in range(4))
    assert selector.select() is None
    selector.release(2)
    assert not selector.is_busy(2)
    assert selector.select() == 2


def test_busy_channels_are_skipped(selector):
    first, second = selector.select(), selector.select()
    selector.release(first)     # channel 1 stays busy, the cursor is at 2
    assert second == 1
    assert select_and_release(selector, 6) == [2, 3, 0, 2, 3, 0]
    assert selector.is_busy(1)


def test_a_busy_channel_does_not_skew_the_rotation(selector):
    """With one channel held, the others share the work evenly."""
    assert selector.select() == 0
    picks = select_and_release(selector, 300)
    assert {ch: picks.count(ch) for ch in range(4)} == {0: 0, 1: 100, 2: 100, 3: 100}


def test_release_of_an_idle_or_unknown_channel_raises(selector):
    with pytest.raises(ValueError, match="channel 1 is not busy"):
        selector.release(1)
    with pytest.raises(ValueError, match="out of range"):
        selector.release(4)
    with pytest.raises(ValueError, match="out of range"):
        selector.is_busy(4)


def test_timeout_returns_none_after_the_timeout(selector):
    for _ in range(4):
        selector.select()
    started = time.monotonic()
    assert selector.select(timeout=0.3) is None
    assert 0.3 - 0.01 <= time.monotonic() - started < WAIT


def test_a_signal_handler_runs_while_select_sleeps(selector):
    """Ctrl-C reaches a sleeping select: the handler runs, what it raises comes out."""
    for _ in range(4):
        selector.select()
    with interrupt_once(after=0.2), pytest.raises(Interrupted):
        selector.select(timeout=None)
    selector.release(3)
    assert selector.select() == 3, "the interrupted select took nothing"


def hold_all_then_release(name, channel, held, delay):
    selector = ChannelSelector.attach(name)
    assert [selector.select() for _ in range(selector.nchannels)] == [0, 1, 2, 3]
    held.set()
    time.sleep(delay)
    selector.release(channel)
    selector.close()


def test_select_sleeps_until_another_process_releases(selector, processes):
    held = processes.ctx.Event()
    child = processes.start(hold_all_then_release, selector.name, 2, held, 0.3)
    assert held.wait(WAIT)
    assert all(selector.is_busy(ch) for ch in range(4))
    assert selector.select(timeout=WAIT) == 2
    processes.join(child)


def abort_selector(name):
    selector = ChannelSelector.attach(name)
    selector.abort()
    selector.close()


def test_abort_from_another_process_wakes_sleeping_selects(selector, processes):
    for _ in range(4):
        selector.select()
    outcomes = []

    def sleeper(timeout):
        try:
            outcomes.append(selector.select(timeout=timeout))
        except Aborted:
            outcomes.append("aborted")

    threads = [threading.Thread(target=sleeper, args=(t,)) for t in (None, WAIT, WAIT)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)             # let them fall asleep (the outcome is the same if not)
    processes.join(processes.start(abort_selector, selector.name))
    for thread in threads:
        thread.join(WAIT)
    assert outcomes == ["aborted"] * 3
    with pytest.raises(Aborted):
        selector.select(timeout=1)


def test_attach_shares_state_and_does_not_unlink(selector):
    assert selector.select() == 0
    with ChannelSelector.attach(selector.name) as other:
        assert other.nchannels == 4 and other.is_busy(0)
        assert other.select() == 1          # one cursor for everyone
        other.release(0)
    assert not selector.is_busy(0) and selector.name in list_segments()


def test_attach_checks_what_the_segment_holds():
    with BufferPool.create(1, 64) as pool:
        with pytest.raises(ValueError, match="expected structure"):
            ChannelSelector.attach(pool.name)


def test_create_refuses_zero_channels():
    with pytest.raises(ValueError, match="at least one channel"):
        ChannelSelector.create(0)
