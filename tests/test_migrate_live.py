"""Live migration: a workload in another process keeps dirtying pages while the
source iterates; after the switchover the destination holds the final content
(issue #3, Tests)."""

from __future__ import annotations

import numpy as np
import pytest

import fastmfd
from fastmfd.workers import mp_context
from leakcheck import leaks  # noqa: F401
from migration_support import Migration, first_difference, keep_writing, make_region


@pytest.mark.parametrize("compression,channels", [("none", 2), ("zlib", 3), ("zstd", 1)])
def test_live_migration_ends_with_the_final_content(compression, channels):
    # A downtime limit nothing can meet: the source iterates until max_rounds
    # unless a round ends with nothing dirty. The bandwidth cap makes each round
    # last long enough (~0.1 s) that the workload, even on a busy machine, gets
    # the CPU to dirty pages in every one of them.
    config = fastmfd.MigrationConfig(channels=channels, compression=compression,
                                     downtime_limit=1e-6, max_rounds=4, packet_pages=32,
                                     max_bandwidth=128 << 20)
    ctx = mp_context()
    busy = make_region("busy", 16 << 20, seed=11)
    quiet = make_region("quiet", 2 << 20, seed=12)
    stop, running = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=keep_writing, args=(busy.handle, stop, running, 5),
                         name="test workload", daemon=True)
    calls = []

    def on_stop():
        calls.append("stop")
        stop.set()
        writer.join(10)
        assert writer.exitcode == 0, f"the workload ended with {writer.exitcode}"

    try:
        with Migration(config) as m:
            m.source.add_region(busy)
            m.source.add_region(quiet)
            writer.start()
            assert running.wait(10), "the workload did not start"
            outcome = m.run(live=True, on_stop=on_stop, on_resume=lambda: calls.append("src"),
                            dst_on_resume=lambda: calls.append("dst"))
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
        stop.set()
        if writer.pid is not None:
            writer.join(10)
        busy.close()
        quiet.close()
