"""Neither side reads a hole of a region's file: it is a zero page.

Reading a hole of a tmpfs file through a shared mapping allocates the page:
the file loses its sparseness, and on a full file system the read is a
SIGBUS that kills the worker. A source's image may be a sparse file; a
destination's region that is not new zero memory (a user's, a pooled one, a
factory's) has every zero page sent for it cleared where it holds data, and
where its file has a hole there is nothing to clear. The workers learn the
holes with SEEK_DATA instead, afresh each round (the workload, or other
channels, write into them in between).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmfd
from fastmfd import _core
from migration_support import PAGE, Migration, first_difference, make_region


def sparse_file(path, pages: int, data_pages: int) -> None:
    """``pages`` pages: the first ``data_pages`` of the byte 0xab, the rest a hole."""
    with open(path, "wb") as file:
        file.write(b"\xab" * data_pages * PAGE)
        file.truncate(pages * PAGE)


def fill(directory) -> None:
    """Fill the file system of ``directory`` (a small one) up: ENOSPC from now on."""
    with contextlib.suppress(OSError), open(directory / "filler", "wb") as filler:
        filler.write(bytes(1 << 20))


def migrate_into(path, source: fastmfd.Region) -> fastmfd.MigrationStats:
    """Migrate ``source`` into a region of the user's mapped from ``path``."""
    target = fastmfd.Region.from_file(source.name, path)
    try:
        with Migration(fastmfd.MigrationConfig(channels=2)) as m:
            m.source.add_region(source)
            m.destination.add_region(target)
            stats, _ = m.run().ok()
    finally:
        target.close()
    return stats


def test_stale_pages_are_cleared_and_holes_left_unread(tmpfs_path):
    """32 pages: 0-7 hold older data, 8-31 are holes; the source sends 0-3 and
    16-31 as zero pages, 4-15 as data."""
    source = make_region("ram", 32 * PAGE)
    source.array[4 * PAGE:16 * PAGE] = np.random.default_rng(7).integers(
        1, 256, 12 * PAGE, dtype=np.uint8)
    path = tmpfs_path / "ram.img"
    sparse_file(path, 32, 8)
    try:
        assert migrate_into(path, source).zero_pages == 20
        # Read with read(), which allocates no hole (a read through a mapping would).
        got = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        assert np.array_equal(got, source.array), first_difference(got, source.array)
        assert path.stat().st_blocks * 512 == 16 * PAGE     # 0-3 cleared, 4-15 written
    finally:
        source.close()


def test_zero_pages_into_the_holes_of_a_full_file_system(small_disk):
    """The region's file system is full: its holes cannot be allocated, and the
    zero pages sent for them need not be."""
    source = make_region("ram", 128 * PAGE)
    source.array[:8 * PAGE] = np.random.default_rng(8).integers(1, 256, 8 * PAGE,
                                                                 dtype=np.uint8)
    path = small_disk / "ram.img"
    sparse_file(path, 128, 8)
    fill(small_disk)
    try:
        assert migrate_into(path, source).zero_pages == 120
        assert path.read_bytes() == source.array.tobytes()
    finally:
        source.close()


def test_holes_learnt_in_one_round_are_looked_up_again_in_the_next(tmpfs_path):
    """Round 1 lists page 0 as zero (the worker learns: a hole from there to the
    end of the file) and sends page 1 as data; round 2 lists page 1 as zero,
    which must be cleared, not taken for the hole learnt in round 1."""
    pages, params = 16, {"page_size": PAGE, "packet_pages": 16, "checksum": False,
                         "zero_page_detection": True}
    path = tmpfs_path / "ram.img"
    sparse_file(path, pages, 0)
    codec = _core.RamPacketCodec(16, PAGE, _core.LAYOUT_CURRENT, 0, {"ram": pages * PAGE})

    def packet(flags=0, normal=(), zero=()):
        header = bytearray(codec.header_size)
        codec.encode(header, flags=flags, ramblock=b"ram" if normal or zero else b"",
                     normal=[n * PAGE for n in normal], zero=[z * PAGE for z in zero],
                     next_packet_size=PAGE * len(normal))
        return bytes(header) + b"\x77" * PAGE * len(normal)

    stream = (packet(zero=[0]) + packet(normal=[1]) + packet(_core.FLAG_SYNC)
              + packet(zero=[1]) + packet(_core.FLAG_SYNC))
    a, b = socket.socketpair()
    with fastmfd.Region.from_file("ram", path) as region, open(path, "rb") as file, \
            _core.Counters.create(1, tag="test-counters") as counters, \
            _core.DirtyBitmap.create(pages, tag="test-received") as received:
        try:
            engine = _core.RecvEngine(b.fileno(), 0, params, None, [region], counters,
                                      [received], [False], hole_fds=[file.fileno()])
            a.sendall(stream)
            a.shutdown(socket.SHUT_WR)
            assert [engine.run() for _ in range(3)] == \
                [_core.EVENT_SYNC, _core.EVENT_SYNC, _core.EVENT_EOF]
            del engine
        finally:
            a.close()
            b.close()
    assert path.read_bytes() == bytes(pages * PAGE)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_rounds_into_any_sparse_file_leave_what_was_last_sent(tmpfs_path, data):
    """Property: a file of 24 pages, each data or a hole; one to four rounds,
    each sending some pages once, as data or as zero, in packets of up to four
    pages, in any order. Every page then holds what it was last sent (or what
    it held), and no hole was read: a page takes memory only where it was
    ever data."""
    pages, params = 24, {"page_size": PAGE, "packet_pages": 4, "checksum": False,
                         "zero_page_detection": True}
    # Few pages of data at the start: long holes, which a round's first zero page
    # learns, and the round then writes into.
    at_start = data.draw(st.sets(st.integers(0, pages - 1), max_size=6), "data at start")
    held = [p in at_start for p in range(pages)]
    expected = [bytes([0x10 + p]) * PAGE if d else bytes(PAGE) for p, d in enumerate(held)]
    ever_data = {p for p, d in enumerate(held) if d}
    codec = _core.RamPacketCodec(4, PAGE, _core.LAYOUT_CURRENT, 0, {"ram": pages * PAGE})
    stream = []
    rounds = data.draw(st.integers(1, 4), "rounds")
    for number in range(1, rounds + 1):
        sent = data.draw(st.permutations(range(pages)), "order")[:data.draw(
            st.integers(0, pages), "pages sent")]
        as_data = data.draw(st.lists(st.booleans(), min_size=len(sent), max_size=len(sent)))
        for start in range(0, len(sent), 4):
            normal = [p for p, d in zip(sent[start:start + 4], as_data[start:start + 4]) if d]
            zero = [p for p, d in zip(sent[start:start + 4], as_data[start:start + 4]) if not d]
            header = bytearray(codec.header_size)
            codec.encode(header, flags=0, ramblock=b"ram", normal=[p * PAGE for p in normal],
                         zero=[p * PAGE for p in zero], next_packet_size=len(normal) * PAGE)
            contents = [bytes([(number * 31 + p) % 255 + 1]) * PAGE for p in normal]
            stream += [bytes(header), *contents]
            for p, content in zip(normal, contents):
                expected[p] = content
                ever_data.add(p)
            for p in zero:
                expected[p] = bytes(PAGE)
        header = bytearray(codec.header_size)
        codec.encode(header, flags=_core.FLAG_SYNC, ramblock=b"", normal=(), zero=(),
                     next_packet_size=0)
        stream.append(bytes(header))

    path = tmpfs_path / f"ram-{time.monotonic_ns()}.img"
    with open(path, "wb") as file:
        for p in (p for p, d in enumerate(held) if d):
            file.seek(p * PAGE)
            file.write(bytes([0x10 + p]) * PAGE)
        file.truncate(pages * PAGE)
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: (a.sendall(b"".join(stream)),
                                              a.shutdown(socket.SHUT_WR)), daemon=True)
    try:
        with fastmfd.Region.from_file("ram", path) as region, open(path, "rb") as file, \
                _core.Counters.create(1, tag="test-counters") as counters, \
                _core.DirtyBitmap.create(pages, tag="test-received") as received:
            engine = _core.RecvEngine(b.fileno(), 0, params, None, [region], counters,
                                      [received], [False], hole_fds=[file.fileno()])
            sender.start()
            assert [engine.run() for _ in range(rounds + 1)] == \
                [_core.EVENT_SYNC] * rounds + [_core.EVENT_EOF]
            del engine
        sender.join(10)
        got = path.read_bytes()
        assert [got[p * PAGE:(p + 1) * PAGE] == expected[p] for p in range(pages)] == \
            [True] * pages
        assert path.stat().st_blocks * 512 == len(ever_data) * PAGE
    finally:
        a.close()
        b.close()
        path.unlink()


# ---------------------------------------------------------------- the source

def send_image(path, zero_pages: int) -> None:
    """Migrate the image file ``path`` into new memory: ``zero_pages`` of it
    go as zero pages, and what arrives is the file's bytes."""
    source = fastmfd.Region.from_file("ram", path)
    try:
        with Migration(fastmfd.MigrationConfig(channels=2)) as m:
            m.source.add_region(source)
            stats, result = m.run().ok()
            assert stats.zero_pages == zero_pages
            assert result.regions["ram"].buffer == path.read_bytes()
    finally:
        source.close()


def test_a_sparse_image_is_sent_without_filling_its_holes(tmpfs_path):
    path = tmpfs_path / "ram.img"
    sparse_file(path, 32, 0)
    with open(path, "r+b") as file:
        file.seek(4 * PAGE)
        file.write(np.random.default_rng(9).bytes(12 * PAGE))
    send_image(path, 20)
    assert path.stat().st_blocks * 512 == 12 * PAGE


def test_a_sparse_image_on_a_full_file_system_is_sent(small_disk):
    path = small_disk / "ram.img"
    sparse_file(path, 128, 8)
    fill(small_disk)
    send_image(path, 120)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_holes_read_without_zero_page_detection_fail_cleanly_on_a_full_file_system(
        small_disk, compression):
    """Without zero page detection every page is read, holes too, and on tmpfs a
    read allocates: where the file system is full, the send fails saying so (it
    was a SIGBUS in the compressor, an EFAULT from the socket without one)."""
    path = small_disk / "ram.img"
    sparse_file(path, 128, 8)
    fill(small_disk)
    source = fastmfd.Region.from_file("ram", path)
    config = fastmfd.MigrationConfig(channels=2, zero_page_detection=False,
                                     compression=compression)
    try:
        with Migration(config) as m:
            m.source.add_region(source)
            src, dst = m.run().failed_both(since=time.monotonic())
    finally:
        source.close()
    expected = (r"send channel \d: region ram: no memory to write into: the file system "
                r"that holds it is full \(.*; populate: E\w+\)")
    assert re.search(expected, str(src)), src
    assert re.search("the source failed: " + expected, str(dst)), dst


def test_a_hole_written_between_rounds_is_sent_as_data(tmpfs_path):
    """Round 1 finds the whole image a hole; the workload writes page 1 before
    the final round, which must read it, not take it for the hole learnt in
    round 1 (one channel: the same worker sends both rounds)."""
    path = tmpfs_path / "ram.img"
    sparse_file(path, 16, 0)
    source = fastmfd.Region.from_file("ram", path)

    def write_page_1() -> None:
        # After round 1 went out whole: the stop comes as soon as its jobs are
        # handed out, and a page read after this write would not be a hole.
        deadline = time.monotonic() + 10
        while m.source.status()["ram"]["duplicate"] < 16:
            assert time.monotonic() < deadline, "round 1 never went out"
            time.sleep(0.001)
        source.buffer[PAGE:2 * PAGE] = b"\x77" * PAGE
        source.mark_dirty(PAGE, PAGE)

    try:
        with Migration(fastmfd.MigrationConfig(channels=1)) as m:
            m.source.add_region(source)
            stats, result = m.run(live=True, on_stop=write_page_1).ok()
            assert stats.rounds == 2 and stats.zero_pages == 16
            assert result.regions["ram"].buffer == bytes(PAGE) + b"\x77" * PAGE + bytes(14 * PAGE)
    finally:
        source.close()
