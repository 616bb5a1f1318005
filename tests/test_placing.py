"""A receive engine given a fresh region's file (``place_fds``) places the
pages into it with userfaultfd's UFFDIO_COPY, through a second mapping,
never through its own mapping of the region: fresh memory is then allocated
as it is copied into, with no page fault and no clearing first. The bytes
must land exactly as through the mapping, raw, compressed and checksummed;
a page that exists already (a later round's) is copied through the mapping;
where the file system does not serve userfaultfd, everything is."""

from __future__ import annotations

import socket
from typing import Callable

import numpy as np
import pytest

from fastmfd._core import placing_available
from engine_pair import PAGE, EnginePair, image
from filesystems import file_system_type

SIZE = 4 << 20
NPAGES = SIZE // PAGE


def resident_bytes(address: int) -> int:
    """How much of the mapping that holds ``address`` this process has mapped
    (its Rss in /proc/self/smaps): placed pages are not."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise LookupError(f"no mapping holds {address:#x}")


def two_rounds(engines: EnginePair, between: Callable[[], object] = lambda: None
               ) -> np.ndarray:
    """Every page once, then (after ``between``) a fifth of them again with new
    bytes (a live migration's re-sends); returns the re-sent pages."""
    rng = np.random.default_rng(7)
    engines.send_pages(rng.permutation(NPAGES))
    engines.sync()
    between()
    again = np.sort(rng.choice(np.arange(1, NPAGES), NPAGES // 5, replace=False))
    fresh = image(SIZE, seed=2, zero_every=10 ** 9).reshape(-1, PAGE)
    engines.src.array.reshape(-1, PAGE)[again] = fresh[again]
    engines.send_pages(again)
    engines.sync()
    engines.finish()
    assert engines.events == [1, 1, 0]
    return again


PLACED = pytest.param(True, id="placed", marks=pytest.mark.skipif(
    not placing_available(), reason="this process may not use userfaultfd (a kernel "
                                    "before 5.11, or a seccomp sandbox that forbids it)"))


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("checksum", [False, True], ids=["", "checksum"])
@pytest.mark.parametrize("place", [PLACED, pytest.param(False, id="mapping")])
def test_pages_land_byte_exact_and_only_existing_ones_go_through_the_mapping(
        compression, checksum, place):
    pair = socket.socketpair()
    # One zero page, page 0 (never re-sent): the codecs differ in which pages
    # they list as zero, and a listed one is never written.
    engines = EnginePair(pair[0], pair[1], SIZE, compression=compression, checksum=checksum,
                         devices=False, place=place, image_data=image(SIZE, zero_every=NPAGES))
    try:
        after_round_1: list[int] = []
        written_twice = two_rounds(engines, lambda: after_round_1.append(
            resident_bytes(engines.dst.array.ctypes.data)))
        mapped = resident_bytes(engines.dst.array.ctypes.data)
        if place:
            # Round 1 placed every page, none through the mapping; round 2 found
            # its pages there and copied them through the mapping, populated for
            # reading (the region is on tmpfs): each fault mapped the neighbours
            # there already too (fault-around), where a write fault maps one page.
            assert after_round_1 == [0]
            assert len(written_twice) * PAGE < mapped <= SIZE
        else:
            assert mapped >= SIZE - PAGE       # page 0 is zero: a codec may list it so
        assert np.array_equal(engines.dst.array, engines.src.array)
        sent = engines.counters_src.read(0)
        assert sent == engines.counters_dst.read(0) | {"jobs": sent["jobs"]}
    finally:
        engines.close()
        for sock in pair:
            sock.close()


def test_a_region_on_a_file_system_userfaultfd_does_not_serve_is_written_through_its_mapping(
        tmp_path):
    if file_system_type(tmp_path) in ("tmpfs", "shmem"):
        pytest.skip(f"{tmp_path} is on tmpfs here, which userfaultfd serves")
    pair = socket.socketpair()
    engines = EnginePair(pair[0], pair[1], SIZE, devices=False, place=True,
                         dst_path=tmp_path / "ram0")
    try:
        two_rounds(engines)
        data_pages = int(np.count_nonzero(engines.src.array.reshape(-1, PAGE).any(axis=1)))
        assert resident_bytes(engines.dst.array.ctypes.data) >= data_pages * PAGE
        assert np.array_equal(engines.dst.array, engines.src.array)
    finally:
        engines.close()
        for sock in pair:
            sock.close()


@pytest.mark.skipif(not placing_available(), reason="this process may not use userfaultfd")
def test_system_pages_there_already_inside_larger_pages_are_copied_through_the_mapping():
    """Session pages of 64 KiB, some of whose 4 KiB system pages exist before any
    is sent (read or written by someone else): the kernel refuses to place those
    (EEXIST), each is copied through the mapping, and placing goes on from the
    next system page, inside the same session page, up to the run's end."""
    page = 64 << 10
    pair = socket.socketpair()
    engines = EnginePair(pair[0], pair[1], SIZE, devices=False, place=True, page_size=page,
                         image_data=image(SIZE, zero_every=NPAGES))
    try:
        last = SIZE - page
        for offset in (5 * page + 8192, last + 4096, last + page - 4096):
            engines.dst.array[offset] = 0           # the system page exists now
        engines.send_pages(np.arange(SIZE // page))
        engines.sync()
        engines.finish()
        assert np.array_equal(engines.dst.array, engines.src.array)
    finally:
        engines.close()
        for sock in pair:
            sock.close()
