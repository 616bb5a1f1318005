"""End to end: what the destination holds equals what the source sent, under every
transport, channel count, compression and zero-page setting (issue #3, Tests)."""

from __future__ import annotations

import numpy as np
import pytest

import fastmfd
from migration_support import PAGE, Migration, first_difference, make_region, zero_page_count

# Three regions: mixed pages; a size that is not a multiple of a packet (5 packets
# and 3 pages); all zero.
PACKET_PAGES = 16
SIZES = {"mixed": 64 * PACKET_PAGES * PAGE, "odd": (5 * PACKET_PAGES + 3) * PAGE,
         "zeros": 8 * PACKET_PAGES * PAGE}


def _regions(seed: int) -> list[fastmfd.Region]:
    return [make_region("mixed", SIZES["mixed"], seed),
            make_region("odd", SIZES["odd"], seed + 1, zero=0.5, text=0.1),
            make_region("zeros", SIZES["zeros"])]


def _check(regions, stats, result, config) -> None:
    npages = sum(r.npages for r in regions)
    zeros = sum(zero_page_count(r.array) for r in regions)
    for region in regions:
        got = result.regions[region.name]
        assert got.size == region.size
        assert np.array_equal(got.array, region.array), \
            f"region {region.name}: {first_difference(got.array, region.array)}"
    assert stats.rounds == 1 and result.stats.rounds == 1
    assert stats.normal_pages + stats.zero_pages == npages
    assert stats.ram_bytes == npages * PAGE
    expected_zero = zeros if config.zero_page_detection else 0
    assert stats.zero_pages == expected_zero
    assert (result.stats.normal_pages, result.stats.zero_pages) == \
        (stats.normal_pages, stats.zero_pages)
    ram = [c for c in stats.channels if c.kind == "ram"]
    assert len(ram) == config.channels
    assert all(c.syncs == 1 for c in ram)
    assert sum(c.packets for c in ram) >= -(-npages // config.packet_pages) + config.channels


@pytest.mark.parametrize("zero_detection", [True, False], ids=["zero", "nozero"])
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_destination_equals_source(transport, channels, compression, zero_detection):
    config = fastmfd.MigrationConfig(channels=channels, compression=compression,
                                     zero_page_detection=zero_detection,
                                     packet_pages=PACKET_PAGES, job_packets=2)
    regions = _regions(seed=channels)
    try:
        with Migration(config, transport=transport) as m:
            for region in regions:
                m.source.add_region(region)
            stats, result = m.run().ok()
            _check(regions, stats, result, config)
    finally:
        for region in regions:
            region.close()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_checksummed_packets_arrive_intact(compression):
    config = fastmfd.MigrationConfig(channels=2, compression=compression, checksum=True,
                                     packet_pages=PACKET_PAGES)
    regions = _regions(seed=7)
    try:
        with Migration(config) as m:
            for region in regions:
                m.source.add_region(region)
            stats, result = m.run().ok()
            _check(regions, stats, result, config)
            assert result.setup["checksum"] is True
    finally:
        for region in regions:
            region.close()


@pytest.mark.parametrize("zero_detection", [True, False], ids=["zero", "nozero"])
def test_receive_into_user_regions_overwrites_stale_data(zero_detection):
    """A region the user added holds older data: every page must be replaced, zero
    pages included (they are not skipped as in fresh, zero-filled memory)."""
    config = fastmfd.MigrationConfig(channels=2, zero_page_detection=zero_detection,
                                     packet_pages=PACKET_PAGES)
    source = make_region("mixed", SIZES["mixed"], seed=3, zero=0.5)
    stale = make_region("mixed", SIZES["mixed"])
    stale.array[:] = 0xAB
    try:
        with Migration(config) as m:
            m.source.add_region(source)
            m.destination.add_region(stale)
            stats, result = m.run().ok()
            assert result.regions["mixed"] is stale
            assert np.array_equal(stale.array, source.array), \
                first_difference(stale.array, source.array)
            assert stats.zero_pages == (zero_page_count(source.array) if zero_detection else 0)
    finally:
        source.close()
        stale.close()


@pytest.mark.parametrize("said", [True, False], ids=["zero_filled", "not_said"])
def test_a_factory_region_said_zero_filled_gets_no_zero_page_written(said):
    """``Region.zero_filled`` is taken at its word: a factory's region that says
    it is new zero memory gets no zero page written, as the destination's own
    new memory (here it holds bytes, against what it says, to show it is
    believed); without it, every zero page is cleared where data sits."""
    config = fastmfd.MigrationConfig(channels=2, packet_pages=PACKET_PAGES)
    source = make_region("mixed", SIZES["mixed"], seed=3, zero=0.5)

    def factory(name, size, page_size):
        region = fastmfd.Region.create(name, size, page_size=page_size)
        region.array[:] = 0xAB
        region.zero_filled = said
        return region

    try:
        with Migration(config, region_factory=factory) as m:
            m.source.add_region(source)
            _, result = m.run().ok()
            got = result.regions["mixed"].array.reshape(-1, PAGE)
            zero = ~source.array.reshape(-1, PAGE).any(axis=1)
            assert zero.sum() > 0
            assert np.array_equal(got[~zero], source.array.reshape(-1, PAGE)[~zero])
            assert (got[zero] == 0xAB).all() if said else not got[zero].any()
    finally:
        source.close()


def test_user_region_of_another_size_fails_both_sides():
    source = make_region("mixed", SIZES["mixed"], seed=4)
    other = make_region("mixed", SIZES["mixed"] + PAGE)
    other.array[:] = 0xAB
    try:
        with Migration() as m:
            m.source.add_region(source)
            m.destination.add_region(other)
            outcome = m.run()
            for error in (outcome.source_error, outcome.dest_error):
                assert isinstance(error, fastmfd.MigrationError)
                assert f"region 'mixed': the source sends {SIZES['mixed']} bytes" in str(error)
                assert f"has {SIZES['mixed'] + PAGE} bytes" in str(error)
            assert not np.any(other.array != 0xAB), "a byte reached the mismatched region"
    finally:
        source.close()
        other.close()
