"""DirtyBitmap: one bit per page, marked from any process, collected and cleared atomically."""

import numpy as np
import pytest

from fastmfd._core import DirtyBitmap
from fastmfd.shm import list_segments

NPAGES = 300            # not a multiple of 64: the last word is partial
WAIT = 60.0


@pytest.fixture
def bitmap():
    with DirtyBitmap.create(NPAGES) as bitmap:
        yield bitmap


@pytest.mark.parametrize("first, count", [
    (0, 1), (63, 1), (64, 1), (63, 2), (60, 10), (0, 64), (64, 64), (0, 65), (1, 127),
    (5, 200), (127, 130), (NPAGES - 1, 1), (256, NPAGES - 256), (0, NPAGES),
])
def test_mark_range(bitmap, first, count):
    bitmap.mark(first, count)
    assert bitmap.count() == count
    assert bitmap.collect().tolist() == list(range(first, first + count))


def test_mark_one_page_by_default(bitmap):
    bitmap.mark(7)
    assert bitmap.collect().tolist() == [7]


def test_overlapping_ranges_and_pages_merge(bitmap):
    bitmap.mark(10, 60)
    bitmap.mark(50, 30)
    bitmap.mark_pages([299, 3, 70, 3, 10])
    expected = sorted({3, 299} | set(range(10, 80)))
    assert bitmap.count() == len(expected)
    result = bitmap.collect()
    assert result.dtype == np.uint64 and result.tolist() == expected


def test_mark_pages_accepts_any_integer_array(bitmap):
    bitmap.mark_pages(np.array([5, 1], dtype=np.int32))
    bitmap.mark_pages(range(290, 300))
    bitmap.mark_pages([])
    assert bitmap.collect().tolist() == [1, 5] + list(range(290, 300))


def test_count_does_not_clear_and_collect_does(bitmap):
    bitmap.mark(0, NPAGES)
    assert bitmap.count() == bitmap.count() == NPAGES
    assert len(bitmap.collect()) == NPAGES
    assert bitmap.count() == 0
    assert bitmap.collect().tolist() == []


@pytest.mark.parametrize("first, count", [(NPAGES, 1), (NPAGES - 1, 2), (0, NPAGES + 1),
                                          ((1 << 64) - 1, 2)])
def test_mark_outside_the_bitmap(bitmap, first, count):
    with pytest.raises(IndexError, match="outside the bitmap"):
        bitmap.mark(first, count)
    assert bitmap.count() == 0


def test_mark_nothing_is_allowed_anywhere(bitmap):
    bitmap.mark(NPAGES + 5, 0)
    assert bitmap.count() == 0


def test_mark_pages_outside_the_bitmap_marks_nothing(bitmap):
    with pytest.raises(IndexError, match="page 300 outside"):
        bitmap.mark_pages([1, 2, NPAGES])
    assert bitmap.count() == 0


def test_empty_bitmap():
    with DirtyBitmap.create(0) as bitmap:
        assert bitmap.npages == 0 and bitmap.count() == 0
        assert bitmap.collect().tolist() == []
        bitmap.mark(0, 0)


def mark_from_child(name, first, count, pages):
    bitmap = DirtyBitmap.attach(name)
    bitmap.mark(first, count)
    bitmap.mark_pages(pages)
    bitmap.close()


def test_marks_from_another_process(bitmap, processes):
    processes.join(processes.start(mark_from_child, bitmap.name, 100, 28, [7, 299]))
    assert bitmap.collect().tolist() == [7] + list(range(100, 128)) + [299]


def test_attach_shares_bits_and_does_not_unlink(bitmap):
    with DirtyBitmap.attach(bitmap.name) as other:
        assert other.npages == NPAGES
        other.mark(42)
        assert bitmap.collect().tolist() == [42]
        bitmap.mark(43)
        assert other.collect().tolist() == [43]
    assert bitmap.name in list_segments()


# ---------------------------------------------------------------- concurrency

CONCURRENT_PAGES = 1 << 18
MARKERS = 3


def mark_share(name, worker, start, collected):
    """Mark every page p with p % MARKERS == worker exactly once, in shuffled batches.

    Workers interleave page by page, so all of them hit the same words. The
    second half waits until the collector has taken something, so collects
    certainly fall between marks.
    """
    bitmap = DirtyBitmap.attach(name)
    pages = np.arange(worker, CONCURRENT_PAGES, MARKERS, dtype=np.uint64)
    np.random.default_rng(worker).shuffle(pages)
    start.wait(WAIT)
    for k, batch in enumerate(np.array_split(pages, 2000)):
        if k == 1000:
            assert collected.wait(WAIT)
        bitmap.mark_pages(batch)
    bitmap.close()


def test_no_mark_is_lost_while_collecting(processes):
    ctx = processes.ctx
    with DirtyBitmap.create(CONCURRENT_PAGES) as bitmap:
        start, collected = ctx.Barrier(MARKERS + 1), ctx.Event()
        markers = [processes.start(mark_share, bitmap.name, k, start, collected)
                   for k in range(MARKERS)]
        start.wait(WAIT)
        collects = []
        while any(m.is_alive() for m in markers):
            collects.append(bitmap.collect())
            if len(collects[-1]):
                collected.set()
        processes.join()
        collects.append(bitmap.collect())
    assert all(np.all(np.diff(c.astype(np.int64)) > 0) for c in collects), "ascending"
    merged = np.concatenate(collects)
    # Each page was marked once: it must come out exactly once.
    assert len(merged) == CONCURRENT_PAGES
    assert np.array_equal(np.sort(merged), np.arange(CONCURRENT_PAGES, dtype=np.uint64))


def test_test_and_marked_read_without_clearing(bitmap):
    bitmap.mark_pages([3, 64, NPAGES - 1])
    assert [bitmap.test(p) for p in (2, 3, 64, 65, NPAGES - 1)] == [False, True, True, False,
                                                                    True]
    assert bitmap.marked(np.arange(NPAGES)).tolist() == [3, 64, NPAGES - 1]
    assert bitmap.marked([NPAGES - 1, 5, 3]).tolist() == [NPAGES - 1, 3]
    assert bitmap.count() == 3


def test_test_and_marked_outside_the_bitmap(bitmap):
    with pytest.raises(IndexError):
        bitmap.test(NPAGES)
    with pytest.raises(IndexError):
        bitmap.marked([1, NPAGES])
