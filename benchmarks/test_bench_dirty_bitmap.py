"""How long does collecting the dirty bitmap of 1 GiB of 4 KiB pages take?

Each round marks the pattern (untimed), then times ``collect()``: atomic
exchange of every word with zero plus extraction of the set page indices
into a numpy array. Patterns: clean (nothing to collect), sparse (one page
in 1024), a random half, and every page.
"""

import numpy as np
import pytest

from fastmfd._core import DirtyBitmap
from fastmfd.units import format_bytes


def patterns(npages):
    rng = np.random.default_rng(7)
    return {
        "clean": np.empty(0, dtype=np.uint64),
        "sparse-1-in-1024": np.arange(0, npages, 1024, dtype=np.uint64),
        "random-half": np.flatnonzero(rng.random(npages) < 0.5).astype(np.uint64),
        "all": np.arange(npages, dtype=np.uint64),
    }


@pytest.fixture(scope="module")
def bitmap(sizes):
    with DirtyBitmap.create(sizes.bitmap_pages, tag="bench-dirty") as bitmap:
        yield bitmap


@pytest.mark.parametrize("pattern", ["clean", "sparse-1-in-1024", "random-half", "all"])
def test_dirty_bitmap_collect(benchmark, bitmap, pattern):
    # The size measured, not the full run's: a CI-sized run (64 MiB) said 1 GiB.
    benchmark.group = f"dirty bitmap collect ({format_bytes(bitmap.npages * 4096)} of pages)"
    pages = patterns(bitmap.npages)[pattern]
    bitmap.mark_pages(pages)
    assert np.array_equal(bitmap.collect(), pages), "collect returns exactly what was marked"
    assert bitmap.count() == 0
    benchmark.extra_info.update(pages=bitmap.npages, dirty=len(pages))
    result = benchmark.pedantic(bitmap.collect, setup=lambda: bitmap.mark_pages(pages),
                                rounds=50, warmup_rounds=2)
    assert len(result) == len(pages)
