"""Live migration: a workload in another process keeps dirtying pages while the
source iterates; after the switchover the destination holds the final content
(issue #3, Tests)."""

from __future__ import annotations

import numpy as np
import pytest

import fastmfd
from fastmfd._engine.processes import mp_context
from migration_support import Migration, first_difference, keep_writing, make_region


class Workload:
    """A process rewriting ``region`` until ``stop()`` (the migration's on_stop;
    calling it again is harmless)."""

    def __init__(self, region) -> None:
        ctx = mp_context()
        self._stop, running = ctx.Event(), ctx.Event()
        self.process = ctx.Process(target=keep_writing,
                                   args=(region.handle, self._stop, running, 5),
                                   name="test workload", daemon=True)
        self.process.start()
        assert running.wait(10), "the workload did not start"

    def stop(self) -> None:
        self._stop.set()
        self.process.join(10)
        assert self.process.exitcode == 0, f"the workload ended with {self.process.exitcode}"


@pytest.mark.parametrize("compression,channels", [("none", 2), ("zlib", 3), ("zstd", 1)])
def test_live_migration_ends_with_the_final_content(compression, channels):
    # A downtime limit nothing can meet: the source iterates until max_rounds
    # unless a round ends with nothing dirty. The bandwidth cap makes each round
    # last long enough (~0.1 s) that the workload, even on a busy machine, gets
    # the CPU to dirty pages in every one of them.
    config = fastmfd.MigrationConfig(channels=channels, compression=compression,
                                     downtime_limit=1e-6, max_rounds=4, packet_pages=32,
                                     max_bandwidth=128 << 20)
    busy = make_region("busy", 16 << 20, seed=11)
    quiet = make_region("quiet", 2 << 20, seed=12)
    calls = []
    try:
        with Migration(config) as m:
            m.source.add_region(busy)
            m.source.add_region(quiet)
            workload = Workload(busy)

            def on_stop():
                calls.append("stop")
                workload.stop()

            try:
                outcome = m.run(live=True, on_stop=on_stop,
                                on_resume=lambda: calls.append("src"),
                                dst_on_resume=lambda: calls.append("dst"))
            finally:
                workload.stop()
            stats, result = outcome.ok()
            assert calls.count("stop") == 1 and calls.index("stop") < calls.index("src")
            assert "dst" in calls
            for region in (busy, quiet):
                got = result.regions[region.name].array
                assert np.array_equal(got, region.array), \
                    f"{region.name}: {first_difference(got, region.array)}"
            assert stats.rounds >= 3, stats.round_stats
            assert result.stats.rounds == stats.rounds
            live = [r for r in stats.round_stats if r.live]
            final = [r for r in stats.round_stats if not r.live]
            assert len(final) == 1 and stats.round_stats[-1] is final[0]
            assert all(r.pages > 0 for r in live[1:]), "a live round found nothing dirty"
            assert stats.ram_bytes == sum(r.pages for r in stats.round_stats) * 4096
            assert stats.downtime_s <= stats.total_time_s
    finally:
        busy.close()
        quiet.close()


def test_checksums_hold_while_the_workload_writes():
    """With checksums and no compression a packet's pages are read twice, for the
    CRC and for the write: a page the workload rewrites in between must not make
    the destination reject a correct transfer."""
    config = fastmfd.MigrationConfig(channels=2, checksum=True, packet_pages=64, job_packets=1,
                                     zero_page_detection=False, downtime_limit=1e-6,
                                     max_rounds=10, max_bandwidth=64 << 20)
    region = make_region("hot", 4 << 20, seed=13)
    try:
        with Migration(config) as m:
            m.source.add_region(region)
            workload = Workload(region)
            try:
                stats, result = m.run(live=True, on_stop=workload.stop).ok()
            finally:
                workload.stop()
            assert np.array_equal(result.regions["hot"].array, region.array)
    finally:
        region.close()
