"""Destination(max_memory=...) holds the receive channels' buffers too (review rev-res,
defect 1), and their worker processes (review exp40).

Each receive channel allocates its packet buffers (sized by SETUP's packet_pages and
page_size, cut to the pages of the largest region) and, for zstd, a decoder window of up to
32 MiB: private memory a source chooses, which max_memory did not count (it counted the
regions and the device-state pool), so a SETUP admitted under a 1 MiB bound could make the
workers hold hundreds of MiB. Counted against max_memory when it is given; against the
default (what /dev/shm has free) it is not, as it is not /dev/shm's memory. So are the
worker processes the session may run, WORKER_BYTES each: a source asking for 16 channels
under a bound that held their buffers made the destination start 16 workers whose own
memory was 4.2 times the bound.
"""

from __future__ import annotations

import types

import pytest

import fastmfd
from fastmfd._engine import session_regions
from fastmfd.protocol.security import ChannelSecurity
from fastmfd.protocol.setup import RegionSpec, Setup
from fastmfd._engine.admission import GREETING_SPARES, DoorWorkers
from fastmfd._engine.memory_bound import WORKER_BYTES
from migration_support import (Migration, channel_memory, make_region, setup_message,
                               worker_memory)

MIB = 1 << 20
CONFIG = fastmfd.MigrationConfig(channels=3, compression="zstd")


def buffers(config: fastmfd.MigrationConfig, largest: int) -> int:
    """What the receive channels of a session of ``config`` (no devices) are charged."""
    return channel_memory(config, largest, devices=False)


def migrate(max_memory: int, config: fastmfd.MigrationConfig = CONFIG) -> tuple:
    """The outcome of a 1 MiB migration, the destination's regions, and how many
    receive workers it had started by the end."""
    image = make_region("ram", MIB, seed=3)
    try:
        with Migration(config, max_memory=max_memory) as m:
            m.source.add_region(image)
            outcome = m.run(timeout=60)
            return outcome, m.destination._session.regions, len(m.destination._workers)
    finally:
        image.close()


def test_a_setup_whose_channels_do_not_fit_max_memory_is_refused_on_both_sides(leaks):
    need = buffers(CONFIG, MIB)
    assert need > 3 * (32 << 20)        # the zstd windows
    outcome, regions, _ = migrate(MIB + need - 1)
    assert regions == []                # refused before anything was made
    for error in (outcome.source_error, outcome.dest_error):
        assert isinstance(error, fastmfd.FastMFDError), repr(error)
        assert (f"the source's 3 channel(s) need {need} bytes of receive buffers "
                f"(packet_pages 128 x page_size 4096, at most the largest region's pages, "
                f"compression zstd), besides 1048576 bytes of regions; this destination "
                f"holds at most {MIB + need - 1} (max_memory)") in str(error), str(error)


def test_a_setup_whose_channels_fit_max_memory_migrates(leaks):
    outcome, _, _ = migrate(MIB + buffers(CONFIG, MIB) + worker_memory(CONFIG))
    outcome.ok()


def test_a_setup_whose_worker_processes_do_not_fit_is_refused_before_they_start(leaks):
    """16 channels under a bound that holds their buffers, not their 17 processes
    (16 receive workers, the reassembly process): refused on both sides, with no
    receive worker started beyond the 4 started ahead. A bound that holds those,
    and no greeting spare, receives, with no worker more than its channels."""
    config = fastmfd.MigrationConfig(channels=16)
    channels = buffers(config, MIB)
    budget = MIB + channels + worker_memory(config, spares=False) - 1
    outcome, regions, started = migrate(budget, config)
    assert regions == [] and started == 4
    workers = 16 + 1
    for error in (outcome.source_error, outcome.dest_error):
        assert isinstance(error, fastmfd.FastMFDError), repr(error)
        assert (f"the source's 16 channel(s) need {workers} worker processes (a receive "
                f"worker per channel, and the reassembly process; up to {GREETING_SPARES} "
                f"more greet connections where max_memory has room), 16 MiB each: "
                f"{workers * WORKER_BYTES} bytes, besides 1048576 bytes of regions and "
                f"{channels} bytes of receive buffers; this destination holds at most "
                f"{budget} (max_memory)") in str(error), str(error)
    outcome, _, started = migrate(budget + 1, config)
    outcome.ok()
    assert started == 16


def test_a_two_channel_session_needs_no_memory_for_greeting_spares(leaks):
    """The 8 greeting spares were counted whether they started or not: a session
    of 2 channels needed 176 MiB of max_memory for its processes (11 of them), most
    for spares that only greet strangers. It needs its own now: the 4 receive workers
    started ahead (workers=, more than its 2 channels) and the reassembly process."""
    config = fastmfd.MigrationConfig(channels=2)
    need = MIB + buffers(config, MIB) + 5 * WORKER_BYTES
    assert need < 100 * MIB
    outcome, regions, started = migrate(need - 1, config)
    assert regions == [] and started == 4
    assert ("the source's 2 channel(s) need 5 worker processes (the 4 receive workers started "
            "ahead (workers=), and the reassembly process;") in str(outcome.dest_error)
    outcome, _, started = migrate(need, config)
    outcome.ok()
    assert started == 4


def _parts(max_memory: int | None, workers: int = 4) -> object:
    return types.SimpleNamespace(max_memory=max_memory, region_pool=None, prealloc=False,
                                 security=ChannelSecurity(), workers=[None] * workers)


def _memory_left(parts, setup: Setup, specs: list[RegionSpec]) -> int:
    door = DoorWorkers(setup.total_channels, len(parts.workers), parts.max_memory is not None)
    return session_regions._memory_left(parts, setup, specs, door)


def test_the_greeting_spares_are_what_the_memory_left_holds():
    """A session's door may start up to GREETING_SPARES workers beyond those it needs
    (one a channel, or those started ahead if more): under max_memory, as many as
    what is left holds, possibly none; without it, all of them."""
    door = DoorWorkers(3, 4, bounded=True)
    assert (door.needed, door.spares) == (4, 3 + GREETING_SPARES - 4)
    assert door.fit(3 * WORKER_BYTES - 1) == 2 * WORKER_BYTES and door.at_most == 6
    door = DoorWorkers(3, 4, bounded=True)
    assert door.fit(-5) == 0 and door.at_most == 4
    door = DoorWorkers(3, 40, bounded=True)
    assert door.fit(1 << 40) == 0 and door.at_most == 40
    door = DoorWorkers(16, 4, bounded=True)
    assert door.fit(1 << 40) == GREETING_SPARES * WORKER_BYTES and door.at_most == 24
    door = DoorWorkers(2, 0, bounded=False)
    assert door.fit(0) == 0 and door.at_most == 2 + GREETING_SPARES


def test_the_channels_are_cut_to_the_largest_region_and_left_out_of_the_default(monkeypatch):
    """A 4 KiB region with 128 MiB packets: the channels are charged a one-page packet's
    buffers, not 272 MiB each. Without max_memory (what /dev/shm has free) they are not
    charged: they are private memory, and a small /dev/shm would refuse ordinary sessions."""
    setup = Setup.decode(setup_message(CONFIG.replace(packet_pages=32768), bytes(16),
                                       {"r": 4096}))
    specs = [RegionSpec("r", 4096)]
    charged = session_regions.channel_bytes(setup, tls=False)
    assert charged == buffers(CONFIG.replace(packet_pages=32768), 4096)
    assert charged < 3 * ((32 << 20) + 2 * MIB)
    with pytest.raises(fastmfd.ConfigError, match=r"receive buffers .* \(max_memory\)"):
        _memory_left(_parts(4096 + charged - 1), setup, specs)
    processes = worker_memory(CONFIG, spares=False)
    assert _memory_left(_parts(4096 + charged + processes + 5), setup, specs) == 5
    monkeypatch.setattr(session_regions, "free_bytes", lambda: 4096 + 5)
    monkeypatch.setattr(session_regions, "cgroup_room", lambda: None)
    assert _memory_left(_parts(None), setup, specs) == 5


def test_workers_started_ahead_count_when_more_than_the_session_needs():
    """Destination(workers=40) runs 40 receive workers through a 3-channel session:
    all are counted, not the 11 the session alone would start."""
    setup = Setup.decode(setup_message(CONFIG, bytes(16), {"r": 4096}))
    specs = [RegionSpec("r", 4096)]
    charged = session_regions.channel_bytes(setup, tls=False) + 41 * WORKER_BYTES
    with pytest.raises(fastmfd.ConfigError, match=r"need 41 worker processes \(the 40 "
                                                  r"receive workers started ahead"):
        _memory_left(_parts(4096 + charged - 1, workers=40), setup, specs)
    assert _memory_left(_parts(4096 + charged, workers=40), setup, specs) == 0
