"""With ``switchover_ack`` the source stops only once the destination acks, and that
wait has the deadline every wait has: while the ack is owed, the destination's
loaders must make progress (a call into them that returns) within
``stall_timeout``, or both sides fail naming the loader held up. A loader that is
slow but moves on is no failure, however long the ack takes.

Before, a loader stuck in a live chunk while its device kept sending one a round
held both sides until the destination's buffers filled (each arriving chunk
counted as the loaders' progress): hours, with small chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmfd
from device_support import ChurningDevice, HangingLoader
from migration_support import Migration, make_region

STALL = 1.0
CONFIG = fastmfd.MigrationConfig(channels=2, device_chunk_size=4096, stall_timeout=STALL,
                                 switchover_ack=True)


def _migrate(config, device, loader, beside=()):
    """A live migration of 1 MiB and ``device`` (its loader ``loader``), and the devices
    ``beside`` (their loaders the default); the outcome."""
    region = make_region("ram", 1 << 20, seed=3)
    try:
        with Migration(config) as m:
            m.source.add_region(region)
            for each in (device, *beside):
                m.source.add_device(each)
            m.destination.add_loader(device.idstr, device.instance_id, loader)
            outcome = m.run(live=True, timeout=15)
            if outcome.result is not None:      # (readable until the Migration closes)
                assert np.array_equal(outcome.result.regions["ram"].array, region.array)
        return outcome
    finally:
        region.close()


@pytest.mark.parametrize("beside", [0, 1], ids=["alone", "beside-a-device-loading-on"])
def test_a_loader_stuck_in_a_live_chunk_while_its_device_keeps_sending(leaks, beside):
    """The device gives a live chunk each round (its state keeps changing) and never
    converges; at max_rounds the source asks for the ack and goes on iterating; the
    loader never returns from chunk 2. Both sides fail, naming the loader's call,
    whether or not another device's loader goes on loading the chunks its device
    goes on sending (no step towards the ack: they are past what PRECOPY_SENT
    counted)."""
    others = [ChurningDevice("other", 0, claimed=1 << 40)] * beside
    outcome = _migrate(CONFIG.replace(max_rounds=3), ChurningDevice("busy", 0, claimed=1 << 40),
                       HangingLoader("load_state_buffer"), others)
    held = "reassembly: no progress for 1 s (busy/0: load_state_buffer() of chunk 2 has not " \
           "returned)"
    assert isinstance(outcome.dest_error, fastmfd.MigrationError), outcome.dest_error
    assert str(outcome.dest_error) == held
    assert isinstance(outcome.source_error, fastmfd.MigrationError), outcome.source_error
    assert str(outcome.source_error) == f"main channel: the destination failed: {held}"
    leaks.assert_clean()


def test_a_slow_loader_that_moves_on_is_no_failure():
    """Each of the 16 live chunks takes the loader about 0.3 s, so the ack comes some
    5 s (5 stall timeouts) after the source asked for it, while rounds go on every
    few milliseconds: the destination says its loaders' progress (LOADING) each time
    it grew, not only when the ROUND_ACKs leave it a quiet moment, and the migration
    succeeds with every byte checked."""
    chunk, live = 64 << 10, 16
    size = live * chunk + 4096
    config = CONFIG.replace(device_chunk_size=chunk, downtime_limit=0.02)
    device = fastmfd.SyntheticDevice("vfio", 0, size, seed=2, precopy_size=live * chunk)
    loader = fastmfd.VerifyLoader(size, seed=2, write_rate=chunk / 0.3,
                                  precopy_size=live * chunk)
    stats, result = _migrate(config, device, loader).ok()
    assert result.devices == {("vfio", 0): size}
    assert stats.device_live_bytes == live * (chunk + 12)
