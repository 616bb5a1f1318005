"""A channel's packet buffers are sized by what its session can use (review rev-res, defects 1
and 6).

SETUP lets a source ask for packets of up to 128 MiB (packet_pages x page_size) on up to 255
channels, and each receive worker allocated two buffers of that size (the compressed payload,
and the pages inflated before they are placed), whatever the regions: with a 4 KiB region and
a packet listing page 0 32768 times, each worker held 272 MiB. Now the buffers hold at most
the pages of the session's largest region, a packet listing more pages than its region has is
refused, and an allocation that fails says what, how large and from which SETUP fields.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import fastmfd
from fastmfd import _core
from fastmfd.protocol.main_channel import Msg
from fastmfd.regions import Region
from migration_support import FakeSource, hello, make_region, ram_packet, setup_message

PAGE = 4096
HUGE_PACKETS = 32768            # 128 MiB packets of 4 KiB pages: SETUP's largest


def allocated_by(make) -> int:
    """Bytes that ``make()`` allocates through Python's allocators (the engines' PyMem)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = make()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del made
    return grown


def _receiver(region: Region, packet_pages: int, compression: str, place_fd: int,
              keep: list) -> object:
    """A RecvEngine for ``region`` (its counters and map go into ``keep``, to close)."""
    keep.append(_core.Counters.create(1, tag="test-counters"))
    keep.append(_core.DirtyBitmap.create(region.size // PAGE, tag="test-received"))
    return _core.RecvEngine(
        -1, 0, {"page_size": PAGE, "packet_pages": packet_pages, "chunk_size": 1 << 20},
        _core.make_codec(compression, False), [region], keep[-2], [keep[-1]], [True],
        place_fds=[place_fd])


def test_receive_buffers_hold_no_more_than_the_largest_region():
    """A 4 KiB region and 128 MiB packets: a receive channel allocated 272 MiB (scratch and
    the placing buffer); now its buffers are the size of a packet of one page. A region
    larger than a packet keeps packet-sized buffers, and the destination's count
    (receive_channel_bytes, what max_memory is charged) is what the engine allocates."""
    tiny, large = make_region("tiny", PAGE), make_region("large", 8 << 20)
    keep: list = []
    try:
        with tiny.open_file() as tiny_file, large.open_file() as large_file:
            grown = allocated_by(lambda: _receiver(tiny, HUGE_PACKETS, "zstd",
                                                   tiny_file.fileno(), keep))
            assert grown < 2 << 20, f"a 4 KiB region's channel allocated {grown} bytes"
            engine = _receiver(large, 256, "zstd", large_file.fileno(), keep)
            counted = _core.receive_channel_bytes(256, PAGE, large.size, 1 << 20, False, "zstd")
            unplaced = 0 if _core.placing_available() else 256 * PAGE
            assert engine.buffer_bytes >= 256 * PAGE * (2 if not unplaced else 1)
            assert engine.buffer_bytes == counted - (1 << 25) - unplaced
            del engine
    finally:
        for thing in keep + [tiny, large]:
            thing.close()


def test_send_buffers_hold_no_more_than_the_largest_region():
    """The source's engines were sized alike (a 144 MiB scratch for checksummed packets)."""
    region = make_region("tiny", PAGE)
    counters = _core.Counters.create(1, tag="test-counters")
    selector = _core.ChannelSelector.create(1, tag="test-selector")
    box = bytearray(8 * HUGE_PACKETS)
    try:
        grown = allocated_by(lambda: _core.SendEngine(
            -1, 0, {"page_size": PAGE, "packet_pages": HUGE_PACKETS, "chunk_size": 1 << 20,
                    "checksum": True, "zero_page_detection": True},
            _core.make_codec("zstd", True), [region], counters, selector, 0, box))
        assert grown < 2 << 20, f"a 4 KiB region's send channel allocated {grown} bytes"
    finally:
        counters.close()
        selector.close()
        region.close()


def test_a_packet_listing_more_pages_than_its_region_fails_the_session_on_both_sides():
    """Page 0 of a one-page region, listed twice: refused as the other packet checks are,
    the destination failing and the source told (ERROR on the main channel)."""
    config = fastmfd.MigrationConfig(channels=1, packet_pages=16)
    uuid = bytes(range(16))
    expected = (r"RAM packet field 'normal_pages': received 2, expected <= 1 "
                r"\(pages of region 'r'\)")
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=1, timeout=10) as destination:
        result: dict[str, BaseException] = {}

        def receive() -> None:
            try:
                destination.receive()
            except BaseException as exc:        # noqa: BLE001 - checked below
                result["error"] = exc
        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        source = FakeSource(destination.address, setup_message(config, uuid, {"r": PAGE}))
        try:
            assert source.open_main()[0] is Msg.SETUP_ACK
            source.connect(hello(0, uuid) + ram_packet(config, "r", [0, 0], fill=0xEE))
            thread.join(20)
            assert not thread.is_alive(), "the destination did not fail"
            error = result.get("error")
            assert isinstance(error, fastmfd.MigrationError), repr(error)
            assert re.search(expected, str(error)), str(error)
            kind, info = source.reply()
            assert kind is Msg.ERROR and re.search(expected, info["error"]), info
        finally:
            source.close()


_NO_MEMORY = textwrap.dedent("""
    import mmap, resource
    from fastmfd import _core

    class Region:       # what the engines read of one: 128 MiB, shared (not in RLIMIT_DATA)
        name, read_only, page_size = "ram", False, 4096
        buffer = memoryview(mmap.mmap(-1, 128 << 20))

    counters = _core.Counters.create(1, tag="test-counters")
    received = _core.DirtyBitmap.create(32768, tag="test-received")
    data = int(open("/proc/self/status").read().split("VmData:")[1].split()[0]) << 10
    resource.setrlimit(resource.RLIMIT_DATA, (data + (64 << 20), resource.RLIM_INFINITY))
    try:
        _core.RecvEngine(-1, 0, {"page_size": 4096, "packet_pages": 32768,
                                 "chunk_size": 1 << 20},
                         _core.make_codec("zstd", False), [Region()], counters, [received],
                         [True])
    except MemoryError as exc:
        print("MemoryError:", exc)
    finally:
        counters.close()
        received.close()
""")


def test_a_buffer_that_cannot_be_allocated_says_which_how_large_and_from_what():
    """Under a data limit, a 128 MiB packet buffer fails: it said only 'MemoryError: '."""
    done = subprocess.run([sys.executable, "-c", _NO_MEMORY], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"MemoryError: cannot allocate 151060480 bytes of packet buffer \("
                     r"packet_pages 32768 x page_size 4096, from SETUP\)", done.stdout), \
        done.stdout + done.stderr[-3000:]
