"""Zero-page detection: is_zero (QEMU's buffer_is_zero), find_zero_pages,
FileHoles (a sparse file's holes, learnt without reading them), and the
send engine's pages marked KNOWN_ZERO_PAGE (listed as zero, unread).

The scan tests the first 16 bytes on their own, then OR-reduces the body 128
(AVX2) or 64 (SSE2) bytes at a time, then checks a tail shorter than 64 bytes
bytewise. A single nonzero byte must be found in each of those places, at
every alignment, for every length class around the block sizes.
"""

import mmap
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmfd
from fastmfd._core import KNOWN_ZERO_PAGE, FileHoles, find_zero_pages, is_zero
from engine_pair import PAGE, EnginePair
from filesystems import file_system_type

SMALL_LENGTHS = range(1, 300)
LARGE_LENGTHS = [4095, 4096, 4097, 65536 + 17, 1 << 20]


def positions(length):
    """Where a lone nonzero byte must still be seen, for a buffer of ``length``."""
    body = length & ~63
    candidates = {0, 1, 15, 16, 17, 31, 32, 63, 64, 100, 127, 128, 129, 191, 192,
                  length // 2, length - 1, body - 1, body, body + 1, body - 64 + 32}
    return sorted(p for p in candidates if 0 <= p < length)


def test_empty_buffer_is_zero():
    assert is_zero(b"")


def test_every_position_of_small_buffers():
    for length in SMALL_LENGTHS:
        buf = bytearray(length)
        assert is_zero(buf), length
        for position in range(length):
            buf[position] = 0x80
            assert not is_zero(buf), (length, position)
            buf[position] = 0


@pytest.mark.parametrize("length", LARGE_LENGTHS)
def test_position_classes_of_large_buffers(length):
    buf = bytearray(length)
    assert is_zero(buf)
    for position in positions(length) + list(range(0, length, 4093)):
        buf[position] = 1
        assert not is_zero(buf), position
        buf[position] = 0


@pytest.mark.parametrize("start", range(0, 64))
def test_unaligned_buffers(start):
    raw = bytearray(start + 4096 + 100)
    view = memoryview(raw)[start:start + 4096 + 37]
    assert is_zero(view)
    for position in positions(len(view)):
        view[position] = 0xFF
        assert not is_zero(view), (start, position)
        view[position] = 0
    raw[start - 1 if start else len(raw) - 1] = 1       # outside the view: must not count
    raw[start + len(view)] = 1
    assert is_zero(view)


def test_every_bit_value_counts():
    buf = bytearray(4096)
    for value in (1, 2, 4, 8, 16, 32, 64, 128):
        buf[3000] = value
        assert not is_zero(buf)


def test_numpy_arrays_and_memoryviews():
    page = np.zeros(4096, dtype=np.uint8)
    assert is_zero(page) and is_zero(memoryview(page))
    page[-1] = 1
    assert not is_zero(page)


# ---------------------------------------------------------------- find_zero_pages

def pages_with_zeros(npages, page_size, zero):
    buf = np.random.default_rng(0).integers(1, 256, npages * page_size, dtype=np.uint8)
    for p in zero:
        buf[p * page_size:(p + 1) * page_size] = 0
    return buf


def test_find_every_zero_page():
    zero = [0, 3, 4, 17, 63]
    buf = pages_with_zeros(64, 4096, zero)
    result = find_zero_pages(buf)
    assert result.dtype == np.uint64 and result.tolist() == zero


def test_a_single_byte_makes_a_page_nonzero():
    buf = np.zeros(4 * 4096, dtype=np.uint8)
    buf[4096] = 1                   # page 1, first byte
    buf[3 * 4096 - 1] = 1           # page 2, last byte
    buf[3 * 4096 + 2048 + 32] = 1   # page 3, middle of a 64-byte block
    assert find_zero_pages(buf).tolist() == [0]


def test_only_the_pages_asked_for_in_their_order():
    buf = pages_with_zeros(16, 4096, [1, 5, 9])
    assert find_zero_pages(buf, pages=[9, 2, 1, 1, 15]).tolist() == [9, 1, 1]
    assert find_zero_pages(buf, pages=np.array([5], dtype=np.int64)).tolist() == [5]
    assert find_zero_pages(buf, pages=[]).tolist() == []


@pytest.mark.parametrize("page_size", [100, 1000, 4096 + 64, 65536])
def test_page_sizes_that_are_not_4_kib(page_size):
    buf = pages_with_zeros(8, page_size, [2, 7])
    assert find_zero_pages(buf, page_size).tolist() == [2, 7]
    buf[3 * page_size - 1] = 9      # last byte of page 2 (a tail byte when not a 64 multiple)
    assert find_zero_pages(buf, page_size).tolist() == [7]


def test_a_partial_last_page_is_not_scanned():
    buf = np.zeros(2 * 4096 + 100, dtype=np.uint8)
    buf[-1] = 1
    assert find_zero_pages(buf).tolist() == [0, 1]


def test_pages_outside_the_buffer():
    with pytest.raises(IndexError, match="page 4 outside a buffer of 4 pages"):
        find_zero_pages(np.zeros(4 * 4096, dtype=np.uint8), pages=[0, 4])


def test_result_does_not_keep_the_scratch_array_alive():
    result = find_zero_pages(np.zeros(64 * 4096, dtype=np.uint8), pages=[3])
    assert result.base is None and result.tolist() == [3]


def test_page_size_zero_is_refused():
    with pytest.raises(ValueError, match="page_size"):
        find_zero_pages(np.zeros(4096, dtype=np.uint8), 0)


# ---------------------------------------------------------------- FileHoles

@pytest.fixture
def sparse_file(tmpfs_path):
    """16 pages on tmpfs: pages 1, 2 and 9 hold text, page 5 is written zeros,
    the others are holes; (fd, its mapping)."""
    fd = os.open(tmpfs_path / "sparse.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16 * 4096)
    for page, fill in [(1, b"a"), (2, b"b"), (5, b"\0"), (9, b"c")]:
        os.pwrite(fd, fill * 4096, page * 4096)
    mapping = mmap.mmap(fd, 16 * 4096, prot=mmap.PROT_READ)
    yield fd, mapping
    mapping.close()
    os.close(fd)


HOLES = [0, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("page_cache", [True, False], ids=["mincore", "lseek"])
def test_the_holes_are_zero_pages_found_without_reading_them(sparse_file, page_cache):
    fd, mapping = sparse_file
    held = os.fstat(fd).st_blocks
    holes = FileHoles(fd, page_cache=page_cache)
    assert holes.zero_pages(mapping, 4096, 0, 16).tolist() == HOLES    # page 5 is data
    assert holes.reads_page_cache == page_cache     # tmpfs, a file of ours
    assert os.fstat(fd).st_blocks == held       # no hole was read: none was allocated
    # What the check above would catch: a scan of the mapping fills tmpfs's holes.
    assert find_zero_pages(mapping, 4096).tolist() == sorted(HOLES + [5])
    assert os.fstat(fd).st_blocks > held


@pytest.mark.parametrize("page_cache", [True, False], ids=["mincore", "lseek"])
def test_slices_in_any_order_on_one_file(sparse_file, page_cache):
    """The extent kept from one slice answers only for the places it covers."""
    fd, mapping = sparse_file
    holes = FileHoles(fd, page_cache)
    assert holes.zero_pages(mapping, 4096, 2, 4).tolist() == [3, 4]
    assert holes.zero_pages(mapping, 4096, 1, 1).tolist() == []
    assert holes.zero_pages(mapping, 4096, 6, 4).tolist() == [6, 7, 8]
    assert holes.zero_pages(mapping, 4096, 9, 1).tolist() == []
    assert holes.zero_pages(mapping, 4096, 0, 2).tolist() == [0]
    assert holes.zero_pages(mapping, 4096, 10, 6).tolist() == [10, 11, 12, 13, 14, 15]
    assert holes.zero_pages(mapping, 4096, 15, 1).tolist() == [15]
    assert holes.zero_pages(mapping, 4096, 16, 0).tolist() == []
    assert [holes.zero_pages(mapping, 4096, first, 4).tolist() for first in (0, 4, 8, 12)] \
        == [[0, 3], [4, 6, 7], [8, 10, 11], [12, 13, 14, 15]]


def test_the_page_cache_and_the_lseeks_agree_on_a_file_of_lone_pages(tmpfs_path):
    """A saved half-zero image: every other page a hole (two lseeks each), some
    pages fallocate()d but never written (holes to both), a written zero page
    (data), on tmpfs; 8 KiB pages too (two system pages each)."""
    pages = 4096
    fd = os.open(tmpfs_path / "lone.img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, pages * 4096)
        text = b"text" * 1024
        for page in range(0, pages, 2):
            if not 2000 <= page < 2010:
                os.pwrite(fd, text, page * 4096)
        os.posix_fallocate(fd, 2000 * 4096, 5 * 4096)       # pages 2000-2004, unwritten
        os.pwrite(fd, bytes(4096), 3001 * 4096)
        mapping = mmap.mmap(fd, pages * 4096, prot=mmap.PROT_READ)
        try:
            held = os.fstat(fd).st_blocks
            for page_size in (4096, 8192):
                by_cache, by_lseek = FileHoles(fd), FileHoles(fd, page_cache=False)
                count = pages * 4096 // page_size
                slices = [(first, min(1000, count - first)) for first in range(0, count, 1000)]
                found = [np.concatenate([h.zero_pages(mapping, page_size, first, n)
                                         for first, n in slices]) for h in (by_cache, by_lseek)]
                assert by_cache.reads_page_cache and not by_lseek.reads_page_cache
                assert found[0].tolist() == found[1].tolist()
                if page_size == 4096:
                    assert found[0].tolist() == sorted(
                        (set(range(1, pages, 2)) | set(range(2000, 2010))) - {3001})
                else:                   # 8 KiB pages: text in each but 1000-1004
                    assert found[0].tolist() == list(range(1000, 1005))
            assert os.fstat(fd).st_blocks == held       # the holes were never read
        finally:
            mapping.close()
    finally:
        os.close(fd)


PAGE_KINDS = "hdfz"         # hole, data, fallocated but unwritten, written zeros


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(PAGE_KINDS), min_size=1, max_size=96),
       slice_pages=st.integers(1, 40), page_size=st.sampled_from([4096, 8192]))
def test_the_page_cache_and_the_lseeks_agree_on_any_file(tmpfs_path, kinds, slice_pages,
                                                         page_size):
    """Any mix of holes, data, fallocated and zero-written pages, in slices of any
    size: mincore() (where it is used) finds exactly the lseeks' zero pages."""
    path = tmpfs_path / "mix.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = -(-len(kinds) * 4096 // page_size) * page_size
        os.ftruncate(fd, size)
        for page, kind in enumerate(kinds):
            if kind == "d":
                os.pwrite(fd, b"d" * 4096, page * 4096)
            elif kind == "z":
                os.pwrite(fd, bytes(4096), page * 4096)
            elif kind == "f":
                os.posix_fallocate(fd, page * 4096, 4096)
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        try:
            count = size // page_size
            found = [np.concatenate([holes.zero_pages(mapping, page_size, first,
                                                      min(slice_pages, count - first))
                                     for first in range(0, count, slice_pages)]).tolist()
                     for holes in (FileHoles(fd), FileHoles(fd, page_cache=False))]
        finally:
            mapping.close()
    finally:
        os.close(fd)
        os.unlink(path)
    assert found[0] == found[1]
    per = page_size // 4096
    padded = kinds + ["h"] * (size // 4096 - len(kinds))
    assert found[0] == [p for p in range(size // page_size)
                        if all(k in "hf" for k in padded[p * per:(p + 1) * per])]


def test_only_tmpfs_has_its_holes_read_from_the_page_cache(tmp_path, tmpfs_path):
    """On another file system the page cache says nothing of holes (a data page
    need not be cached): lseek it is; either way the same holes."""
    for directory in (tmp_path, tmpfs_path):
        with open(directory / "sparse.img", "wb") as f:
            f.truncate(4 * 4096)
            f.seek(4096)
            f.write(b"x" * 4096)
        with open(directory / "sparse.img", "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            try:
                holes = FileHoles(f.fileno())
                assert holes.zero_pages(mapping, 4096, 0, 4).tolist() == [0, 2, 3]
                assert holes.reads_page_cache == (file_system_type(directory) == "tmpfs")
            finally:
                mapping.close()
    assert file_system_type(tmpfs_path) == "tmpfs"


# Where the fastmfd these tests import lives: what a child must import too.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastmfd.__file__)))
READS_AS_ANOTHER = """
import mmap, os, sys
from fastmfd._core import FileHoles
fd = os.open(sys.argv[1], os.O_RDONLY)
mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
holes = FileHoles(fd)
print(holes.zero_pages(mapping, 4096, 0, 16).tolist(), holes.reads_page_cache)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to read the file without its rights")
def test_a_reader_the_kernel_hides_the_page_cache_from_gets_the_lseeks(sparse_file):
    """mincore() tells a file's page cache only to its owner or a writer (or one
    with CAP_FOWNER or CAP_DAC_OVERRIDE); anyone else is told every page is
    resident, which would make every hole data (read, and on tmpfs allocated):
    the residency check sees the first hole "resident" and uses the lseeks."""
    fd, _ = sparse_file
    os.fchown(fd, 65534, 65534)
    os.fchmod(fd, 0o444)
    rights = "-fowner,-dac_override"
    done = subprocess.run(["setpriv", f"--bounding-set={rights}", f"--inh-caps={rights}",
                           sys.executable, "-c", READS_AS_ANOTHER, f"/proc/self/fd/{fd}"],
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                          text=True, timeout=60, pass_fds=[fd])
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{HOLES} False\n"


def test_a_page_partly_in_a_hole_is_data(tmp_path):
    """Holes finer than a page (here: 8 KiB pages over 4 KiB blocks, or any file
    system's granularity) leave a page partly data: it is data."""
    path = tmp_path / "half.img"
    with open(path, "wb") as f:
        f.truncate(4 * 8192)
        f.seek(8192 + 4096)
        f.write(b"x" * 4096)            # the second half of page 1
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert FileHoles(f.fileno()).zero_pages(mapping, 8192, 0, 4).tolist() == [0, 2, 3]
        finally:
            mapping.close()


def test_zero_pages_refuses_pages_outside_and_a_bad_descriptor(sparse_file):
    fd, mapping = sparse_file
    with pytest.raises(IndexError, match="pages 10..17 outside a buffer of 16 pages"):
        FileHoles(fd).zero_pages(mapping, 4096, 10, 8)
    bad = os.open(os.devnull, os.O_RDONLY)
    os.close(bad)
    with pytest.raises(OSError, match="finding the holes of file descriptor"):
        FileHoles(bad).zero_pages(mapping, 4096, 0, 16)


# ---------------------------------------------------------------- KNOWN_ZERO_PAGE

def test_the_send_engine_lists_a_known_zero_page_unread():
    """A page the main process marks KNOWN_ZERO_PAGE goes as a zero page whatever
    its bytes (the engine never reads it); the others are scanned as before."""
    size = 16 * PAGE
    data = np.full(size, 7, dtype=np.uint8)
    data[3 * PAGE:4 * PAGE] = 0
    src, dst = socket.socketpair()
    engines = EnginePair(src, dst, size, image_data=data, devices=False)
    try:
        marked = np.arange(16, dtype=np.uint64)
        marked[[5, 6]] |= np.uint64(KNOWN_ZERO_PAGE)
        engines.send_pages(marked)
        engines.finish()
        expected = data.reshape(16, PAGE).copy()
        expected[[5, 6]] = 0
        assert np.array_equal(engines.dst.array.reshape(16, PAGE), expected)
        sent = engines.counters_src.read(0)
        assert (sent["normal_pages"], sent["zero_pages"]) == (13, 3)
    finally:
        engines.close()
        src.close()
        dst.close()
