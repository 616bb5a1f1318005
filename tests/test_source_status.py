"""``Source.status()`` (issue #13): QEMU's query-migrate, from any thread, while
the migration runs — and, once it is over, the same numbers as its stats."""

from __future__ import annotations

import json

import fastmfd
from migration_support import Migration, make_region

MIB = 1 << 20


class _Reporting(fastmfd.SyntheticDevice):
    """A SyntheticDevice that takes its Source's status at its first stop-copy read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source = None
        self.at_stop_copy = None

    def read_state(self, buf) -> int:
        if self.at_stop_copy is None:
            self.at_stop_copy = self.source.status()
        return super().read_state(buf)


def test_status_while_running_and_after_agrees_with_the_stats():
    config = fastmfd.MigrationConfig(channels=2, device_state_channels=1, switchover_ack=True)
    region = make_region("ram", 4 * MIB, seed=1)
    device = _Reporting("vfio", 0, 3 * MIB, precopy_size=2 * MIB)
    seen = {}
    try:
        with Migration(config) as m:
            src = m.source
            device.source = src
            src.add_region(region)
            src.add_device(device)
            assert src.status() == {"status": "none"}
            outcome = m.run(live=True, on_stop=lambda: seen.update(stop=src.status()))
            stats, _ = outcome.ok()
            final = src.status()
        assert src.status() == final        # and after the Source is closed, the same
    finally:
        region.close()

    stop = seen["stop"]
    assert stop["status"] == "active" and stop["switchover_ack"] == "acked"
    assert stop["downtime_ms"] is not None and stop["setup_time_ms"] > 0
    assert stop["device"]["live_transferred"] == 2 * MIB + 2 * 12    # two 1 MiB chunks
    assert stop["ram"]["total"] == 4 * MIB and stop["rounds"] >= 1

    during = device.at_stop_copy
    assert during["status"] == "device" and during["device"]["remaining"] == 0
    assert during["device"]["transferred"] >= stop["device"]["transferred"]

    assert final["status"] == "completed"
    assert final["transferred"] == stats.wire_bytes
    assert final["rounds"] == final["ram"]["dirty_sync_count"] == stats.rounds
    assert final["ram"]["normal"] == stats.normal_pages
    assert final["ram"]["duplicate"] == stats.zero_pages
    assert final["ram"]["transferred"] == stats.ram_bytes
    assert final["ram"]["remaining"] == 0 and final["expected_downtime_ms"] in (None, 0.0)
    assert final["device"]["transferred"] == stats.device_bytes
    assert final["device"]["live_transferred"] == stats.device_live_bytes
    assert final["device"]["chunks"] == stats.device_chunks
    assert final["downtime_ms"] == stats.downtime_s * 1000
    assert final["total_time_ms"] == stats.total_time_s * 1000
    assert [c["wire_bytes"] for c in final["channels"]] == [c.wire_bytes for c in stats.channels]
    json.dumps(final)                   # JSON-ready, as `fastmfd send --status-json` streams it
