"""Destination(max_memory=...) holds the receive channels' buffers too (review rev-res,
defect 1).

Each receive channel allocates its packet buffers (sized by SETUP's packet_pages and
page_size, cut to the pages of the largest region) and, for zstd, a decoder window of up to
32 MiB: private memory a source chooses, which max_memory did not count (it counted the
regions and the device-state pool), so a SETUP admitted under a 1 MiB bound could make the
workers hold hundreds of MiB. Counted against max_memory when it is given; against the
default (what /dev/shm has free) it is not, as it is not /dev/shm's memory.
"""

from __future__ import annotations

import types

import pytest

import fastmfd
from fastmfd._engine import session_regions
from fastmfd.protocol.security import ChannelSecurity
from fastmfd.protocol.setup import RegionSpec, Setup
from migration_support import Migration, channel_memory, make_region, setup_message

MIB = 1 << 20
CONFIG = fastmfd.MigrationConfig(channels=3, compression="zstd")


def buffers(config: fastmfd.MigrationConfig, largest: int) -> int:
    """What the receive channels of a session of ``config`` (no devices) are charged."""
    return channel_memory(config, largest, devices=False)


def migrate(max_memory: int) -> tuple:
    image = make_region("ram", MIB, seed=3)
    try:
        with Migration(CONFIG, max_memory=max_memory) as m:
            m.source.add_region(image)
            return m.run(timeout=60), m.destination._session.regions
    finally:
        image.close()


def test_a_setup_whose_channels_do_not_fit_max_memory_is_refused_on_both_sides(leaks):
    need = buffers(CONFIG, MIB)
    assert need > 3 * (32 << 20)        # the zstd windows
    outcome, regions = migrate(MIB + need - 1)
    assert regions == []                # refused before anything was made
    for error in (outcome.source_error, outcome.dest_error):
        assert isinstance(error, fastmfd.FastMFDError), repr(error)
        assert (f"the source's 3 channel(s) need {need} bytes of receive buffers "
                f"(packet_pages 128 x page_size 4096, at most the largest region's pages, "
                f"compression zstd), besides 1048576 bytes of regions; this destination "
                f"holds at most {MIB + need - 1} (max_memory)") in str(error), str(error)


def test_a_setup_whose_channels_fit_max_memory_migrates(leaks):
    outcome, _ = migrate(MIB + buffers(CONFIG, MIB))
    outcome.ok()


def _parts(max_memory: int | None) -> object:
    return types.SimpleNamespace(max_memory=max_memory, region_pool=None,
                                 security=ChannelSecurity())


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
        session_regions._memory_left(_parts(4096 + charged - 1), setup, specs)
    assert session_regions._memory_left(_parts(4096 + charged + 5), setup, specs) == 5
    monkeypatch.setattr(session_regions, "free_bytes", lambda: 4096 + 5)
    assert session_regions._memory_left(_parts(None), setup, specs) == 5
