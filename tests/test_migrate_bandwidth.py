"""max_bandwidth holds the wire to its cap.

A cap can only be checked against a clock: the assertion is a lower bound
(the transfer may not finish *sooner* than its bytes allow at the cap), which
a slow, loaded machine can never break; only a throttle that lets bytes run
ahead of the cap fails it.
"""

from __future__ import annotations

import fastmfd
from fastmfd import _core
from migration_support import Migration, make_region

MiB = 1 << 20


def test_the_wire_never_runs_ahead_of_max_bandwidth():
    cap = 16 * MiB
    config = fastmfd.MigrationConfig(channels=2, max_bandwidth=cap, job_packets=1,
                                     zero_page_detection=False)
    image = make_region("pc.ram", 8 * MiB, seed=5, zero=0.0, text=0.0)
    try:
        with Migration(config) as migration:
            migration.source.add_region(image)
            stats, result = migration.run().ok()
            assert (result.regions["pc.ram"].array == image.array).all()
    finally:
        image.close()
    # The throttle checks the bytes the channels have sent before it picks a
    # channel: every byte has waited its turn on the cap except what was in
    # flight at the last check (a job per channel) and the last job itself.
    job = config.packet_pages * config.page_size + _core.RamPacketCodec(config.packet_pages).header_size
    in_flight = (config.channels + 1) * job
    sent = sum(channel.wire_bytes for channel in stats.channels)
    assert stats.total_time_s >= (sent - in_flight) / cap
