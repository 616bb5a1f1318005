"""The sync barrier is what keeps re-sent pages right (DESIGN §4.6, issue #3 item 6).

Every page is sent in round 1, rewritten at the stop and sent again in round 2.
Channel 0 reaches the destination half a second late (a proxy holds its bytes
back), and at the stop its send worker is paused for a moment, so channel 0
stays busy and the selector hands round 2 to channel 1. A page whose round-1
copy travelled on channel 0 then has its round-2 copy at the destination long
before the old one. Only the barrier — channel 1 waits at its round-1 SYNC
until channel 0 has applied everything before its own — keeps the old copy
from landing last.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np

import fastmfd
from fastmfd import _core
from migration_support import Migration, Packets, Proxy, first_difference, make_region

PACKET_PAGES = 16
LAG = 0.5           # seconds channel 0 runs behind


class Recorder(Packets):
    """Note which pages a channel carried in which round; hold the channel back by
    ``lag`` seconds."""

    def __init__(self, config, lag: float) -> None:
        super().__init__(config, self.on_packet)
        self.codec = _core.RamPacketCodec(config.packet_pages, config.page_size)
        self.lag = lag
        self.round = 1
        self.pages: dict[int, set[int]] = {1: set(), 2: set()}

    def on_packet(self, link, packet):
        ram = self.codec.decode(bytes(packet.header))
        self.pages.setdefault(self.round, set()).update(
            int(o) // 4096 for o in (*ram.offsets, *ram.zero_offsets))
        if ram.is_sync:
            self.round += 1
        link.send(packet.raw, delay=self.lag)


def test_a_page_resent_on_another_channel_is_never_overwritten_by_its_old_copy():
    config = fastmfd.MigrationConfig(channels=2, packet_pages=PACKET_PAGES, job_packets=1,
                                     zero_page_detection=False, max_rounds=1,
                                     downtime_limit=1e-6)
    slow, fast = Recorder(config, LAG), Recorder(config, 0.0)
    region = make_region("ram", 64 * PACKET_PAGES * 4096, seed=1, zero=0.0, text=0.0)
    paused: list[int] = []

    def resume():
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop_and_rewrite(migration):
        def on_stop():
            pid = migration.source._workers[0].process.pid
            os.kill(pid, signal.SIGSTOP)
            paused.append(pid)
            threading.Timer(0.3, resume).start()
            region.array[:] = np.random.default_rng(2).integers(0, 256, region.size, np.uint8)
            region.mark_dirty(0, region.size)
        return on_stop

    try:
        with Migration(config, proxy=Proxy({0: slow, 1: fast})) as m:
            m.source.add_region(region)
            stats, result = m.run(live=True, on_stop=stop_and_rewrite(m)).ok()
            assert stats.rounds == 2
            got = result.regions["ram"].array
            assert np.array_equal(got, region.array), \
                f"stale pages survived: {first_difference(got, region.array)}"
        # The race this test is about really was set up: pages (a job's worth at
        # least) moved from the slow channel to the fast one.
        crossing = slow.pages[1] & fast.pages[2]
        assert len(crossing) >= PACKET_PAGES, \
            f"only {len(crossing)} pages moved from the slow to the fast channel"
    finally:
        resume()
        region.close()
