"""read_capture on the real QEMU 10.0 captures: with machine pc-i440fx-7.2
(shared/data/qemu-10.0: 7.2's flavour from a QEMU 10) and with QEMU 10's own
pc (tests/data/qemu-10.0-native: SYNCs per round with a MULTIFD_FLUSH record
on the main channel, zero pages listed in the multifd packets). Both decode
page-exact; their README gives the RAM pattern and QEMU's own page counts.
"""

from __future__ import annotations

import pytest
import zstandard

from fastmfd.tools.inspect.capture import read_capture
from captures import pattern_page

PAGE = 4096
MEM_PAGES = 8192                        # the 32 MiB block "mem"
NORMAL, DUPLICATE = 6194, 2128          # query-migrate's "normal" and "duplicate", every capture


@pytest.fixture(params=["none", "zlib", "zstd"])
def decoded(request, captures, tmp_path):
    """(capture set name, Capture) — channel files given first, the main one last."""
    which, directory = captures
    if which == "7.2":
        pytest.skip("test_inspect_qemu.py reads the QEMU 7.2 captures")
    files = []
    for name in ("conn2.bin", "conn1.bin", "conn0.bin"):
        path = directory / f"pattern-{request.param}" / name
        if not path.is_file():          # stored compressed
            packed = path.with_name(name + ".zst").read_bytes()
            path = tmp_path / name
            path.write_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(packed))
        files.append(path)
    return which, read_capture(files)


def test_every_page_of_mem_matches_the_pattern(decoded):
    _, capture = decoded
    mem = capture.ram["mem"]
    assert sorted(mem) == [i * PAGE for i in range(MEM_PAGES)]
    assert [i for i in range(MEM_PAGES) if mem[i * PAGE] != pattern_page(i)] == []


def test_zero_pages_and_syncs_are_where_the_flavour_puts_them(decoded):
    which, capture = decoded
    main = capture.main
    listed = sum(c.summary()["pages"]["zero"] for c in capture.channels)
    sent = sum(c.summary()["pages"]["normal"] for c in capture.channels)
    assert sent == NORMAL + capture.pages_resent
    assert all(c.syncs == main.syncs for c in capture.channels)
    if which == "10.0-native":
        assert (main.multifd_sync, main.zero_pages, listed) == ("per-round", 0, DUPLICATE)
        assert main.multifd_flushes == main.syncs and main.machine == "pc-i440fx-10.0"
    else:
        assert (main.multifd_sync, main.zero_pages, listed) == ("per-section", DUPLICATE, 0)
        assert main.ram_section_ends == main.syncs and main.multifd_flushes == 0
