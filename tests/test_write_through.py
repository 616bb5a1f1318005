"""A receive engine given a region's file (``write_fds``) writes the pages
with pwrite through it, never through its own mapping of the region: fresh
memory is then allocated as it is copied into, with no page fault and no
clearing first. The bytes must land exactly as through the mapping, raw,
compressed and checksummed, in a first round and over pages already there."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from engine_pair import PAGE, EnginePair, image


def resident_bytes(address: int) -> int:
    """How much of the mapping that holds ``address`` this process has mapped
    (its Rss in /proc/self/smaps): pages written through the file are not."""
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


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("checksum", [False, True], ids=["", "checksum"])
@pytest.mark.parametrize("write_through", [True, False], ids=["file", "mapping"])
def test_pages_land_byte_exact_and_only_the_mapping_path_maps_them(compression, checksum,
                                                                  write_through):
    size = 4 << 20
    npages = size // PAGE
    pair = socket.socketpair()
    engines = EnginePair(pair[0], pair[1], size, compression=compression, checksum=checksum,
                         devices=False, write_through=write_through)
    try:
        rng = np.random.default_rng(7)
        engines.send_pages(rng.permutation(npages))
        engines.sync()
        # Round 2: pages already written get new bytes (a live migration's re-sends).
        again = rng.choice(npages, npages // 5, replace=False)
        fresh = image(size, seed=2, zero_every=10 ** 9).reshape(-1, PAGE)
        engines.src.array.reshape(-1, PAGE)[again] = fresh[again]
        engines.send_pages(np.sort(again))
        engines.sync()
        engines.finish()
        assert engines.events == [1, 1, 0]
        mapped = resident_bytes(engines.dst.array.ctypes.data)
        data_pages = int(np.count_nonzero(engines.src.array.reshape(-1, PAGE).any(axis=1)))
        if write_through:
            assert mapped == 0, f"{mapped} bytes went through the receiver's mapping"
        else:
            assert mapped >= data_pages * PAGE
        assert np.array_equal(engines.dst.array, engines.src.array)
        sent = engines.counters_src.read(0)
        assert sent == engines.counters_dst.read(0) | {"jobs": sent["jobs"]}
    finally:
        engines.close()
        for sock in pair:
            sock.close()
