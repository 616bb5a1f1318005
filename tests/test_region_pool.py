"""RegionPool: warm regions kept between migrations of the same geometry (issue #12).
A region that comes back holds the last session's bytes: the next migration must
leave exactly its own image in it, zero pages included."""

from __future__ import annotations

import numpy as np
import pytest

import fastmfd
from fastmfd._engine import sending
from fastmfd.shm import list_segments
from migration_support import PAGE, Migration, fill_pages, first_difference, make_region

MIB = 1 << 20
SIZE = 8 * MIB


def _receive(pool: fastmfd.RegionPool, image: fastmfd.Region, config: fastmfd.MigrationConfig,
             **options) -> tuple[str, fastmfd.ReceiveStats]:
    """Migrate ``image`` into a Destination drawing on ``pool``; returns the
    segment the destination's region lives in and the receive stats, after
    checking it holds exactly ``image``."""
    with Migration(config, region_pool=pool, **options) as m:
        m.source.add_region(image)
        _, result = m.run().ok()
        got = result.regions[image.name]
        assert np.array_equal(got.array, image.array), first_difference(got.array, image.array)
        segment = got.handle.location
        del got
        return segment, result.stats


def _images() -> tuple[fastmfd.Region, fastmfd.Region]:
    """Two images of one geometry: the second has zero pages where the first has
    data (and the reverse), so stale bytes in a reused region would show."""
    old = make_region("ram", SIZE, seed=10, zero=0.3, text=0.3)
    new = make_region("ram", SIZE)
    kinds = fill_pages(new.array, seed=11, zero=0.3, text=0.3)
    old_pages = old.array.reshape(-1, PAGE)
    new_pages = new.array.reshape(-1, PAGE)
    assert (old_pages.any(axis=1) & (kinds == 0)).sum() > 100      # data -> zero
    assert (~old_pages.any(axis=1) & new_pages.any(axis=1)).sum() > 100
    return old, new


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("prealloc", [False, True])
def test_a_second_migration_into_a_pooled_region_leaves_exactly_its_image(leaks, compression,
                                                                           prealloc):
    old, new = _images()
    config = fastmfd.MigrationConfig(channels=2, compression=compression)
    try:
        with fastmfd.RegionPool(max_bytes=64 * MIB) as pool:
            first, _ = _receive(pool, old, config, prealloc=prealloc)
            assert len(pool) == 1 and pool.held_bytes == SIZE
            second, stats = _receive(pool, new, config, prealloc=prealloc)
            assert second == first                  # the same memory, reused
            assert stats.zero_pages > 0
            assert len(pool) == 1
    finally:
        old.close()
        new.close()
    assert first not in list_segments()


def test_a_pool_without_room_frees_the_region_at_the_end(leaks):
    # (leaks: no segment outlives the test)
    image = make_region("ram", SIZE, seed=12)
    try:
        with fastmfd.RegionPool(max_bytes=SIZE - PAGE) as pool:
            _receive(pool, image, fastmfd.MigrationConfig(channels=1))
            assert len(pool) == 0
    finally:
        image.close()


def test_a_session_of_another_geometry_frees_what_it_cannot_use(leaks):
    small = make_region("ram", SIZE, seed=13)
    large = make_region("ram", 2 * SIZE, seed=14)
    try:
        with fastmfd.RegionPool(max_bytes=64 * MIB) as pool:
            first, _ = _receive(pool, small, fastmfd.MigrationConfig(channels=1))
            second, _ = _receive(pool, large, fastmfd.MigrationConfig(channels=1))
            assert second != first
            assert first not in list_segments()      # freed at SETUP, not kept
            assert pool.held_bytes == 2 * SIZE
    finally:
        small.close()
        large.close()


def test_closing_the_pool_frees_every_region(leaks):
    image = make_region("ram", SIZE, seed=15)
    pool = fastmfd.RegionPool(max_bytes=64 * MIB)
    try:
        segment, _ = _receive(pool, image, fastmfd.MigrationConfig(channels=1))
        assert segment in list_segments()
    finally:
        pool.close()
        image.close()
    assert segment not in list_segments()
    assert len(pool) == 0


def test_region_pool_is_checked():
    with pytest.raises(fastmfd.ConfigError, match=r"RegionPool\(max_bytes\) must be an int >= 0"):
        fastmfd.RegionPool(max_bytes=-1)
    with pytest.raises(TypeError, match="region_pool"):
        fastmfd.Destination("tcp:127.0.0.1:0", region_pool=object())


def test_a_source_that_leaves_pages_out_is_refused_not_given_the_last_session_s_bytes(
        leaks, monkeypatch):
    """A pooled region holds the last session's bytes until round 1 brings every
    page: a source that left pages out (here every odd one) had the next
    session's result hold them, and both sides succeed (a review)."""
    old, new = _images()
    config = fastmfd.MigrationConfig(channels=2)
    dispatch = sending.Sending._dispatch_region
    try:
        with fastmfd.RegionPool(max_bytes=64 * MIB) as pool:
            _receive(pool, old, config)
            monkeypatch.setattr(sending.Sending, "_dispatch_region",
                                lambda self, index, pages: dispatch(self, index, pages[::2]))
            with Migration(config, region_pool=pool) as m:
                m.source.add_region(new)
                outcome = m.run()
    finally:
        old.close()
        new.close()
    assert str(outcome.dest_error) == (
        f"region 'ram': {SIZE // PAGE // 2} page(s) never sent (the first: page 1), which would "
        f"keep what the region held before this session")
    assert "the destination failed: region 'ram'" in str(outcome.source_error)


def test_a_user_region_refuses_a_source_that_leaves_pages_out_whatever_it_marked(
        leaks, monkeypatch):
    """A region the user gives holds its bytes (here a first session's) until round
    1 brings every page; its dirty bitmap, marked by the user's own code or an
    earlier session, hid the pages a source left out (a review): it says, from
    SETUP on, what this session sent."""
    old, new = _images()
    config = fastmfd.MigrationConfig(channels=2)
    dispatch = sending.Sending._dispatch_region
    mine = fastmfd.Region.create("ram", SIZE)
    try:
        with Migration(config) as m:
            m.source.add_region(old)
            m.destination.add_region(mine)
            m.run().ok()
        mine.dirty.mark(0, mine.npages)             # the user's own marks, say
        monkeypatch.setattr(sending.Sending, "_dispatch_region",
                            lambda self, index, pages: dispatch(self, index, pages[::2]))
        with Migration(config) as m:
            m.source.add_region(new)
            m.destination.add_region(mine)
            outcome = m.run()
    finally:
        for region in (old, new, mine):
            region.close()
    assert str(outcome.dest_error) == (
        f"region 'ram': {SIZE // PAGE // 2} page(s) never sent (the first: page 1), which would "
        f"keep what the region held before this session")
