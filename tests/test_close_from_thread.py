"""``close()`` from another thread cancels first (issue #9).

``Source.close()`` called while ``migrate()`` runs in another thread freed the
selector, pool and pipes under it and left ``migrate()`` blocked forever in
3 of 7 tries. Now it fails the session first, waits for ``migrate()`` to
leave, then frees everything; the same holds for ``Destination.close()``.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

import fastmfd
import fastmfd.destination
import fastmfd.source
from migration_support import Migration, make_region

MIB = 1 << 20
# No throttle: the source's main thread spends the transfer waiting for an idle
# channel, the wait close() used to pull the selector from under.
CONFIG = fastmfd.MigrationConfig(channels=2, job_packets=1, zero_page_detection=False)
BOUND = 2.0         # seconds from close() to the end of migrate() / receive()


def _both_name_the_closed_region(outcome) -> None:
    """Each side failed with one MigrationError naming region 'ram' as closed."""
    for name, error in (("source", outcome.source_error), ("destination", outcome.dest_error)):
        assert isinstance(error, fastmfd.MigrationError), f"the {name} ended with {error!r}"
        assert "region 'ram' was closed during the migration" in str(error), \
            f"the {name}'s error does not name the region: {error}"


@pytest.fixture
def image():
    region = make_region("ram", 128 * MIB)
    yield region
    region.close()


def _close_mid_transfer(image, side: str) -> tuple[dict, object]:
    with Migration(CONFIG) as m:
        m.source.add_region(image)
        counters = m.source._parts.counters
        owner = getattr(m, side)
        closed = {}

        def closer():
            deadline = time.monotonic() + 10
            while counters.total("wire_bytes") < MIB and time.monotonic() < deadline:
                time.sleep(0.005)
            closed["at"] = time.monotonic()
            owner.close()

        thread = threading.Thread(target=closer, name="test closer")
        thread.start()
        try:
            outcome = m.run(timeout=30)
        finally:
            thread.join(10)
    return closed, outcome


@pytest.mark.parametrize("side", ["source", "destination"])
def test_close_from_another_thread_ends_the_session(image, side, leaks):
    for attempt in range(10):
        closed, outcome = _close_mid_transfer(image, side)
        assert "at" in closed
        for name, error, end in (("source", outcome.source_error, outcome.source_end),
                                 ("destination", outcome.dest_error, outcome.dest_end)):
            assert isinstance(error, fastmfd.MigrationError), \
                f"try {attempt}: the {name} ended with {error!r}"
            assert end - closed["at"] < BOUND, \
                f"try {attempt}: the {name} ended {end - closed['at']:.2f} s after close()"
        leaks.assert_clean(keep=[image])


# ---------------------------------------------------------------- at the same moment

RACES = 8       # each race below was lost in about 9 tries of 10 before the fix


@pytest.fixture
def small_image():
    region = make_region("ram", MIB)
    yield region
    region.close()


@pytest.fixture
def eager_switching():
    """Threads switch as often as the interpreter lets them: a race between two
    calls that start together is run through its interleavings, not won by
    whichever thread started first."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def _at_once(*calls) -> list[object]:
    """Run ``calls`` from threads released together; what each returned or raised."""
    outcomes: list[object] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index, call):
        start.wait()
        try:
            outcomes[index] = call()
        except BaseException as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i, call), name=f"test call {i}")
               for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), f"a call hangs: {outcomes}"
    return outcomes


@pytest.mark.parametrize("side", ["source", "destination"])
def test_close_as_the_call_begins(small_image, side, eager_switching):
    """close() from another thread just as migrate()/receive() begins: the call is
    refused (the owner is closed) or cancelled; before the fix it ran on what close()
    had freed ("ValueError: Counters is closed") or, at the destination, waited for
    the source on a closed listener until its timeout."""
    config = fastmfd.MigrationConfig(channels=1)
    for attempt in range(RACES):
        with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as destination:
            with fastmfd.Source(destination.address, config) as source:
                source.add_region(small_image)
                owner, call = ((source, lambda: source.migrate(live=False)) if side == "source"
                               else (destination, destination.receive))
                outcome, closed = _at_once(call, owner.close)
        assert closed is None, f"try {attempt}: close() raised {closed!r}"
        assert isinstance(outcome, (fastmfd.ConfigError, fastmfd.MigrationError)), \
            f"try {attempt}: the {side}'s call ended with {outcome!r}"


def test_two_calls_at_once(small_image, eager_switching):
    """migrate() twice at once from two threads, receive() likewise: one runs and
    succeeds, the other is refused. Before the fix both passed the check and ran
    two sessions on one set of workers, and both failed."""
    config = fastmfd.MigrationConfig(channels=1)
    for attempt in range(RACES):
        with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as destination:
            received: list[object] = []
            receiver = threading.Thread(target=lambda: received.extend(
                _at_once(destination.receive, destination.receive)), name="test receiver")
            receiver.start()
            with fastmfd.Source(destination.address, config) as source:
                source.add_region(small_image)
                sent = _at_once(lambda: source.migrate(live=False),
                                lambda: source.migrate(live=False))
            receiver.join(30)
        for name, outcomes, kind in (("migrate", sent, fastmfd.MigrationStats),
                                     ("receive", received, fastmfd.DestinationResult)):
            refused = [o for o in outcomes if isinstance(o, fastmfd.ConfigError)]
            ran = [o for o in outcomes if isinstance(o, kind)]
            assert len(refused) == 1 and len(ran) == 1, \
                f"try {attempt}: two {name}() calls at once ended with {outcomes!r}"
            assert "one migration" in str(refused[0])


# ---------------------------------------------------------------- while entering

@pytest.mark.parametrize("side", ["source", "destination"])
def test_close_while_another_thread_enters(side, monkeypatch, leaks):
    """close() from another thread while __enter__ starts the workers: it waits for
    them, then frees everything, and __enter__ fails. Before the fix close() freed
    what was made so far and returned; __enter__ then went on and returned a closed
    owner holding live workers and shared memory until a second close()."""
    module = fastmfd.source if side == "source" else fastmfd.destination
    owner = (fastmfd.Source("tcp:127.0.0.1:1", fastmfd.MigrationConfig(channels=2))
             if side == "source" else fastmfd.Destination("tcp:127.0.0.1:0", workers=2))
    closer = threading.Thread(target=owner.close, name="test closer")
    real = module.ChildSet

    def child_set(*args, **kwargs):
        """The first group of processes, then close() from another thread, then
        what else __enter__ makes."""
        made = real(*args, **kwargs)
        if closer.ident is None:        # the first group only
            closer.start()
            deadline = time.monotonic() + 10
            while not owner._closed and time.monotonic() < deadline:
                time.sleep(0.001)
            closer.join(0.5)    # (it has nothing to wait for without the fix)
        return made

    monkeypatch.setattr(module, "ChildSet", child_set)
    try:
        with pytest.raises(fastmfd.ConfigError, match="was closed"):
            owner.__enter__()
        closer.join(10)
        assert not closer.is_alive(), "close() hangs"
        assert owner.worker_pids() == []
        leaks.assert_clean()
    finally:
        owner.close()


# ---------------------------------------------------------------- a region

@pytest.mark.parametrize("side", ["source", "destination", "factory"])
def test_a_region_closed_mid_migration_is_named(side, leaks):
    """A region the session uses, closed from another thread mid-transfer: both
    sides fail naming it, and the source's status() meanwhile still reports. Before
    the fix: "ValueError: DirtyBitmap is closed", a structure the user never made,
    and no region named (status() too raised it). "factory": the region the
    destination's region_factory made, new (zero_filled, as `listen --dir`'s files
    are), whose pages the end does not check: its flush met it, and both sides said
    "ValueError: region 'ram' is closed"."""
    # Round 1 takes about 1 s: the close lands in it (once the source stopped, the
    # workers' own mappings finish the transfer, and the migration may succeed).
    config = fastmfd.MigrationConfig(channels=2, max_bandwidth=16 * MIB, job_packets=1)
    region = make_region("ram", 16 * MIB, seed=3, zero=0.0)
    target = make_region("ram", 16 * MIB)
    target.zero_filled = side == "factory"
    closing = region if side == "source" else target
    made = {"region_factory": lambda name, size, page_size: target}
    try:
        with Migration(config, **(made if side == "factory" else {})) as m:
            m.source.add_region(region)
            if side != "factory":
                m.destination.add_region(target)
            status: dict[str, object] = {}      # the source's status() right after the close

            def mid_round_1() -> bool:
                status = m.source.status()
                return status["status"] == "active" and status["ram"]["transferred"] > 0

            def closer():
                deadline = time.monotonic() + 10
                while not mid_round_1() and time.monotonic() < deadline:
                    time.sleep(0.005)
                closing.close()
                try:        # (the source's rounds are still running: it reads the bitmaps)
                    status["after"] = m.source.status()["status"]
                except BaseException as exc:
                    status["after"] = exc

            thread = threading.Thread(target=closer, name="test closer")
            thread.start()
            try:
                outcome = m.run(live=True, timeout=30)
            finally:
                thread.join(10)
            _both_name_the_closed_region(outcome)
            assert isinstance(status["after"], str), f"status() raised {status['after']!r}"
    finally:
        region.close()
        target.close()
    leaks.assert_clean()


class _ClosingDevice:
    """A device whose stop-and-copy closes the source's region: the final round's
    pages are collected by then, and their jobs handed to the workers."""
    idstr, instance_id = "closer", 0

    def __init__(self, region: fastmfd.Region) -> None:
        self.region, self.done = region, False

    def read_state(self, buf: memoryview) -> int:
        if self.done:
            return 0
        self.region.close()
        self.done = True
        buf[:4] = b"done"
        return 4


@pytest.mark.parametrize("when", ["on_stop", "stop-and-copy", "loaded"])
def test_a_source_region_closed_after_the_stop(when, leaks):
    """A source's region closed once the source stopped: in on_stop, before the
    final round collects what was dirtied since the last, the migration fails on
    both sides naming it (the last pages to send are not known); after that
    (during the stop-and-copy, or while the source waits for the destination's
    word) it is a no-op, as the README says: the stopped source's pages go from
    the workers' own mappings of it, and the destination has every byte."""
    region = make_region("ram", 4 * MIB, seed=5, zero=0.0)
    expected = bytes(region.buffer)
    try:
        with Migration(CONFIG) as m:
            m.source.add_region(region)
            if when == "stop-and-copy":
                m.source.add_device(_ClosingDevice(region))
            outcome = m.run(live=True, on_stop=region.close if when == "on_stop" else None,
                            dst_on_resume=region.close if when == "loaded" else None)
            assert region.closed, "the region was never closed"
            if when == "on_stop":
                _both_name_the_closed_region(outcome)
            else:
                _, result = outcome.ok()
                assert bytes(result.regions["ram"].buffer) == expected, "bytes differ"
    finally:
        region.close()
    leaks.assert_clean()
