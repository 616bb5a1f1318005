"""``close()`` from another thread cancels first (issue #9).

``Source.close()`` called while ``migrate()`` runs in another thread freed the
selector, pool and pipes under it and left ``migrate()`` blocked forever in
3 of 7 tries. Now it fails the session first, waits for ``migrate()`` to
leave, then frees everything; the same holds for ``Destination.close()``.
"""

from __future__ import annotations

import threading
import time

import pytest

import fastmfd
from migration_support import Migration, make_region

MIB = 1 << 20
# No throttle: the source's main thread spends the transfer waiting for an idle
# channel, the wait close() used to pull the selector from under.
CONFIG = fastmfd.MigrationConfig(channels=2, job_packets=1, zero_page_detection=False)
BOUND = 2.0         # seconds from close() to the end of migrate() / receive()


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
