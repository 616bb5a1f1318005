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


def test_device_state_keeps_to_max_bandwidth_too():
    """Device chunks go through each channel's token bucket like RAM packets: no
    channel runs more than one packet (here one 256 KiB chunk) ahead of its share."""
    cap, chunk = 16 * MiB, 256 << 10
    config = fastmfd.MigrationConfig(channels=2, device_state_channels=1, max_bandwidth=cap,
                                     device_chunk_size=chunk)
    with Migration(config) as migration:
        migration.source.add_device(fastmfd.SyntheticDevice("vfio", 0, 8 * MiB))
        migration.destination.add_loader("vfio", 0, fastmfd.VerifyLoader(8 * MiB))
        stats, result = migration.run().ok()
        assert result.devices == {("vfio", 0): 8 * MiB}
    share = cap / config.total_channels         # the one device channel's
    burst = chunk + 1024                        # one chunk and its headers
    sent = stats.channels[-1].wire_bytes
    assert sent >= 8 * MiB
    assert stats.total_time_s >= (sent - burst) / share


def test_a_cap_below_one_packet_per_stall_timeout_is_refused():
    import pytest
    with pytest.raises(fastmfd.ConfigError, match="less than one packet"):
        fastmfd.MigrationConfig(channels=4, max_bandwidth=100_000, stall_timeout=1.0)
