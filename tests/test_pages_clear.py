"""clear_pages: how a receive worker clears a page that held data (a page QEMU
lists as zero in a later round). In a sparse file mapped shared it punches a
hole, one call per run of adjacent pages at least PUNCH_MIN_BYTES long; a
shorter run, or one elsewhere, is zero-filled."""

import os

import numpy as np
import pytest

from fastmfd._core import PUNCH_MIN_BYTES, clear_pages
from fastmfd.errors import MigrationError
from fastmfd.regions import Region

PAGE = 4096
RUN = PUNCH_MIN_BYTES // PAGE       # the shortest run punched
PAGES = 4 * RUN


@pytest.fixture
def block_file(tmp_path):
    """A region of PAGES pages over a file, every page written and flushed (its
    blocks allocated); page i holds the byte i % 251 + 1."""
    region = Region.from_file("pc.ram", str(tmp_path / "pc.ram.img"), size=PAGES * PAGE,
                              page_size=PAGE)
    data = np.repeat((np.arange(PAGES) % 251 + 1).astype(np.uint8), PAGE)
    region.buffer[:] = data.tobytes()
    region.flush()
    yield region, tmp_path / "pc.ram.img", data
    region.close()


def test_runs_of_pages_of_a_file_become_holes(block_file):
    """Two runs long enough are punched out; a short run and a lone page are
    written zeros (and keep their blocks)."""
    region, path, data = block_file
    before = os.stat(path).st_blocks
    punched = [*range(RUN, 2 * RUN), *range(3 * RUN - 1, PAGES)]
    written = [5, 6, 2 * RUN + 3]
    cleared = sorted(punched + written)
    assert clear_pages(region.buffer, np.array(cleared, dtype=np.uint64) * PAGE, PAGE, True)
    data.reshape(PAGES, PAGE)[cleared] = 0
    assert bytes(region.buffer) == data.tobytes()   # cleared pages read zero, the rest kept
    region.flush()
    assert path.read_bytes() == data.tobytes()
    assert os.stat(path).st_blocks == before - len(punched) * PAGE // 512


def test_punched_pages_are_no_longer_marked_written(block_file):
    """A punched page is a hole again, which a read would allocate: the map of
    pages written (``written``, a region's dirty map) loses it, so a later zero
    page for it is not read; a zero-filled page keeps its block and its mark."""
    region, _, _ = block_file
    region.dirty.mark(0, PAGES)
    cleared = [5, *range(RUN, 2 * RUN)]
    clear_pages(region.buffer, np.array(cleared, dtype=np.uint64) * PAGE, PAGE, True,
                region.dirty)
    unmarked = set(range(PAGES)) - set(region.dirty.marked(np.arange(PAGES, dtype=np.uint64)))
    assert unmarked == set(range(RUN, 2 * RUN))
    with pytest.raises(ValueError, match="written map smaller than the buffer"):
        clear_pages(region.buffer, np.array([0], dtype=np.uint64), PAGE // 2, True,
                    region.dirty)


def test_pages_no_memory_backs_fail_cleanly_instead_of_a_sigbus(tmp_path):
    """A zero-filled run is populated first: where no memory can back a page
    (here the file was cut short under the mapping; on a file system that
    copies on write and is full, a page that holds data is the same), the
    clearing fails with the clean error, and a write would be a SIGBUS."""
    path = tmp_path / "pc.ram.img"
    path.write_bytes(b"\x01" * 8 * PAGE)
    region = Region.from_file("pc.ram", str(path), page_size=PAGE)
    try:
        os.truncate(path, 2 * PAGE)
        with pytest.raises(MigrationError, match=r"block pc\.ram: no memory to write into"):
            clear_pages(region.buffer, np.array([4 * PAGE], dtype=np.uint64), PAGE, False,
                        what="block pc.ram")
    finally:
        os.truncate(path, 8 * PAGE)
        region.close()


def test_without_punching_the_pages_are_written(block_file):
    region, path, data = block_file
    before = os.stat(path).st_blocks
    cleared = list(range(RUN, 3 * RUN))
    assert not clear_pages(region.buffer, np.array(cleared, dtype=np.uint64) * PAGE, PAGE,
                           False)
    data.reshape(PAGES, PAGE)[cleared] = 0
    region.flush()
    assert path.read_bytes() == data.tobytes() and os.stat(path).st_blocks == before


@pytest.mark.parametrize("page_size", [PAGE, 512])
def test_memory_no_hole_can_be_punched_into_is_zero_filled(page_size):
    """Private memory (MADV_REMOVE refuses it), or pages smaller than the system's
    (a hole would take their neighbours): zeros written, and the call says so."""
    pages = PUNCH_MIN_BYTES // page_size * 4
    buf = np.full(pages * page_size, 0xAB, dtype=np.uint8)
    cleared = [1, *range(pages // 2, pages)]
    assert not clear_pages(buf, np.array(cleared, dtype=np.uint64) * page_size, page_size,
                           True)
    expected = np.full((pages, page_size), 0xAB, dtype=np.uint8)
    expected[cleared] = 0
    assert np.array_equal(buf, expected.reshape(-1))


@pytest.mark.parametrize("offset", [PAGE * 64, PAGE * 63 + 1])
def test_a_page_outside_the_buffer_or_unaligned(offset):
    with pytest.raises(IndexError, match="outside a buffer of 262144 bytes, or not page-aligned"):
        clear_pages(np.zeros(64 * PAGE, dtype=np.uint8), [offset], PAGE, True)
