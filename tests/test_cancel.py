"""``Source.cancel()`` from another thread (QEMU's migrate_cancel, issue #13):
mid-RAM, mid-device-state and while the source waits for switchover-ack, both
sides end with a FastMFDError within 2 s, and nothing is left behind (the
leakcheck plugin checks processes, segments and sockets after each test)."""

from __future__ import annotations

import threading
import time

import pytest

import fastmfd
from migration_support import Migration, make_region

MIB = 1 << 20
BOUND = 2.0             # seconds from cancel() to the end of migrate() and receive()
REASON = "the operator cancelled"


def _cancel_when(m: Migration, ready, **run) -> None:
    """Run the migration; cancel it from another thread as soon as ``ready(status)``."""
    cancelled = {}

    def canceller():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not cancelled:
            status = m.source.status()
            if status["status"] in ("completed", "failed"):
                return
            if status["status"] != "none" and ready(status):
                cancelled["status"] = status
                cancelled["at"] = time.monotonic()
                m.source.cancel(REASON)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=canceller, name="test canceller", daemon=True)
    thread.start()
    outcome = m.run(**run)
    thread.join(5)
    assert "at" in cancelled, f"the moment to cancel never came: {m.source.status()}"
    for side, error, end in (("source", outcome.source_error, outcome.source_end),
                             ("destination", outcome.dest_error, outcome.dest_end)):
        assert isinstance(error, fastmfd.FastMFDError), f"the {side} ended with {error!r}"
        assert REASON in str(error), f"the {side}'s error does not say why: {error}"
        assert end - cancelled["at"] < BOUND, \
            f"the {side} ended {end - cancelled['at']:.2f} s after cancel() (bound {BOUND} s)"
    assert m.source.status()["status"] == "cancelled"


def test_cancel_mid_ram():
    config = fastmfd.MigrationConfig(channels=2, max_bandwidth=16 * MIB)
    region = make_region("ram", 64 * MIB, seed=1, zero=0.0)
    try:
        with Migration(config) as m:
            m.source.add_region(region)
            _cancel_when(m, lambda s: s["status"] == "active" and s["ram"]["transferred"] > 0,
                         live=True)
    finally:
        region.close()


@pytest.mark.parametrize("way", ["mixed", "old"])
def test_cancel_mid_device_state(way):
    config = fastmfd.MigrationConfig(channels=2, channel_header=way != "old")
    with Migration(config) as m:
        m.source.add_device(fastmfd.SyntheticDevice("vfio", 0, 256 * MIB, read_rate=16 * MIB))
        m.destination.add_loader("vfio", 0, fastmfd.VerifyLoader(256 * MIB))
        _cancel_when(m, lambda s: s["status"] == "device" and s["device"]["transferred"] > 0,
                     live=False)


def test_cancel_while_waiting_for_switchover_ack():
    config = fastmfd.MigrationConfig(channels=2, switchover_ack=True)
    region = make_region("ram", MIB, seed=2)
    try:
        with Migration(config) as m:
            m.source.add_region(region)
            m.source.add_device(fastmfd.SyntheticDevice("vfio", 0, 9 * MIB, precopy_size=8 * MIB))
            m.destination.add_loader("vfio", 0, fastmfd.VerifyLoader(
                9 * MIB, precopy_size=8 * MIB, write_rate=1 * MIB))
            _cancel_when(m, lambda s: s["switchover_ack"] == "requested", live=True)
    finally:
        region.close()
