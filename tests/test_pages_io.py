"""writev_pages / readv_pages: a header plus a page list to or from a file descriptor.

The peer on the other end of each socketpair or pipe is a thread that moves
the bytes in small, slow pieces, so the kernel hands the core partial reads
and writes; where a test asks for it, a third thread keeps signalling the
main thread, interrupting the core's blocked calls (EINTR).
"""

import contextlib
import errno
import os
import socket
import threading
import time

import numpy as np
import pytest

from fastmfd._core import readv_pages, writev_pages
from signals import interrupted

PAGE = 4096
NPAGES = 64
WAIT = 30.0


def region(npages=NPAGES, seed=1):
    """A buffer of pages whose every byte depends on its position."""
    return np.random.default_rng(seed).integers(0, 256, npages * PAGE, dtype=np.uint8)


def page_bytes(buffer, offsets, page_size=PAGE):
    return b"".join(bytes(buffer[o:o + page_size]) for o in offsets)


# Adjacent runs, a page twice, descending order, the first and the last page.
OFFSETS = [PAGE * p for p in (3, 4, 5, 9, 0, 63, 62, 10, 10, 11, 30)]


class Peer(threading.Thread):
    """The other end: sends ``data`` or receives ``size`` bytes, ``piece`` bytes at a time."""

    def __init__(self, sock_or_fd, *, data=b"", size=0, piece=1000, pause=0.0):
        super().__init__(daemon=True)
        self.end, self.data, self.size = sock_or_fd, data, size
        self.piece, self.pause = piece, pause
        self.received = bytearray()
        self.error = None

    def _send(self, chunk):
        if isinstance(self.end, socket.socket):
            self.end.sendall(chunk)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.end, view):]

    def _recv(self, n):
        if isinstance(self.end, socket.socket):
            return self.end.recv(n)
        return os.read(self.end, n)

    def run(self):
        try:
            for start in range(0, len(self.data), self.piece):
                self._send(self.data[start:start + self.piece])
                time.sleep(self.pause)
            while len(self.received) < self.size:
                chunk = self._recv(min(self.piece, self.size - len(self.received)))
                if not chunk:
                    break
                self.received += chunk
                time.sleep(self.pause)
        except BaseException as exc:        # reported by finish()
            self.error = exc

    def finish(self):
        self.join(WAIT)
        assert not self.is_alive(), "peer thread hung"
        if self.error:
            raise self.error


@pytest.fixture
def sockets():
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def tiny_sockets(sockets):
    """A socketpair whose kernel buffers are as small as Linux allows."""
    for s in sockets:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    return sockets


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


# ---------------------------------------------------------------- round trips

def test_write_then_read_round_trip(sockets):
    a, b = sockets
    src, dst = region(seed=1), np.zeros(NPAGES * PAGE, dtype=np.uint8)
    header = bytes(range(256)) * 5 + b"tail"
    want = len(header) + len(OFFSETS) * PAGE
    reader_header = bytearray(len(header))
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault(
        "n", readv_pages(b.fileno(), reader_header, dst, OFFSETS)))
    reader.start()
    assert writev_pages(a.fileno(), header, src, OFFSETS) == want
    reader.join(WAIT)
    assert result["n"] == want and bytes(reader_header) == header
    for offset in OFFSETS:
        assert np.array_equal(dst[offset:offset + PAGE], src[offset:offset + PAGE])
    untouched = set(range(0, NPAGES * PAGE, PAGE)) - set(OFFSETS)
    assert not any(dst[o:o + PAGE].any() for o in untouched)


def test_write_order_is_header_then_pages_in_offset_order(sockets):
    a, b = sockets
    src = region()
    peer = Peer(b, size=3 + len(OFFSETS) * PAGE)
    peer.start()
    writev_pages(a.fileno(), b"HDR", src, OFFSETS)
    peer.finish()
    assert bytes(peer.received) == b"HDR" + page_bytes(src, OFFSETS)


def test_partial_writes_to_a_slow_reader(tiny_sockets):
    a, b = tiny_sockets
    src = region()
    peer = Peer(b, size=10 + len(OFFSETS) * PAGE, piece=777, pause=0.0005)
    peer.start()
    with interrupted() as fired:
        assert writev_pages(a.fileno(), b"0123456789", src, OFFSETS) == 10 + len(OFFSETS) * PAGE
    peer.finish()
    assert bytes(peer.received) == b"0123456789" + page_bytes(src, OFFSETS)
    assert fired[0] > 0, "the write was never interrupted"


def test_partial_reads_from_a_slow_writer(tiny_sockets):
    a, b = tiny_sockets
    src, dst = region(), np.zeros(NPAGES * PAGE, dtype=np.uint8)
    peer = Peer(b, data=b"H" * 100 + page_bytes(src, OFFSETS), piece=333, pause=0.0005)
    header = bytearray(100)
    peer.start()
    with interrupted() as fired:
        readv_pages(a.fileno(), header, dst, OFFSETS)
    peer.finish()
    assert header == b"H" * 100
    assert page_bytes(dst, OFFSETS) == page_bytes(src, OFFSETS)
    assert fired[0] > 0, "the read was never interrupted"


def test_pipe_smaller_than_the_pages(pipe):
    """A pipe holds 64 KiB: 256 KiB of pages cannot go in one write."""
    r, w = pipe
    src, dst = region(), np.zeros(NPAGES * PAGE, dtype=np.uint8)
    offsets = [PAGE * p for p in range(NPAGES)]
    peer = Peer(r, size=8 + NPAGES * PAGE, piece=5000)
    peer.start()
    writev_pages(w, b"pipehead", src, offsets)
    peer.finish()
    assert bytes(peer.received) == b"pipehead" + bytes(src)
    peer = Peer(w, data=bytes(peer.received), piece=4096 * 3 + 1)
    peer.start()
    header = bytearray(8)
    readv_pages(r, header, dst, offsets)
    peer.finish()
    assert header == b"pipehead" and np.array_equal(dst, src)


def test_header_only_and_pages_only(sockets):
    a, b = sockets
    src, dst = region(), np.zeros(NPAGES * PAGE, dtype=np.uint8)
    assert writev_pages(a.fileno(), b"just a header", src, []) == 13
    header = bytearray(13)
    assert readv_pages(b.fileno(), header, dst, []) == 13 and header == b"just a header"
    assert writev_pages(a.fileno(), b"", src, [PAGE]) == PAGE
    assert readv_pages(b.fileno(), bytearray(), dst, [2 * PAGE]) == PAGE
    assert np.array_equal(dst[2 * PAGE:3 * PAGE], src[PAGE:2 * PAGE])


def test_other_page_sizes(sockets):
    a, b = sockets
    size = 65536
    src, dst = region(8 * size // PAGE), np.zeros(8 * size, dtype=np.uint8)
    offsets = [size * 3, size * 4, 0]
    peer = Peer(b, size=len(offsets) * size)
    peer.start()
    writev_pages(a.fileno(), b"", src, offsets, page_size=size)
    peer.finish()
    peer = Peer(b, data=bytes(peer.received))
    peer.start()
    readv_pages(a.fileno(), bytearray(), dst, offsets, page_size=size)
    peer.finish()
    assert page_bytes(dst, offsets, size) == page_bytes(src, offsets, size)


# ---------------------------------------------------------------- iovecs

def syscalls(kind, call):
    """How many read or write system calls ``call()`` makes: this thread's (not the
    process's, /proc/self/io: pytest-xdist's worker reads its channel in a thread of
    its own, and the leak check's segment watcher reads its events)."""
    def count():
        with open("/proc/thread-self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields[kind])
    measuring = count() - count()      # reading the counts costs syscalls too
    before = count()
    call()
    return count() - before + measuring


@pytest.mark.parametrize("adjacent, expected_calls", [
    (True, 1),      # 2048 adjacent pages merge into one iovec: one call
    (False, 3),     # 1 + 2048 iovecs, at most IOV_MAX (1024) per call
])
def test_adjacent_pages_merge_into_one_iovec(tmp_path, adjacent, expected_calls):
    src = region(4096)
    dst = np.zeros_like(src)
    step = 1 if adjacent else 2
    offsets = np.arange(0, 2048 * step, step, dtype=np.uint64) * PAGE
    fd = os.open(tmp_path / "pages", os.O_RDWR | os.O_CREAT)
    try:
        # A regular file takes or gives everything a call asks for.
        assert syscalls("syscw", lambda: writev_pages(fd, b"h", src, offsets)) == expected_calls
        os.lseek(fd, 0, os.SEEK_SET)
        assert syscalls("syscr", lambda: readv_pages(fd, bytearray(1), dst, offsets)) == \
            expected_calls
    finally:
        os.close(fd)
    assert page_bytes(dst, offsets) == page_bytes(src, offsets)


# ---------------------------------------------------------------- failures

def transfer(io, fd, buffer, offsets, page_size=PAGE):
    """writev_pages or readv_pages without a header: both check their arguments alike."""
    if io == "write":
        return writev_pages(fd, b"", buffer, offsets, page_size)
    return readv_pages(fd, bytearray(), buffer, offsets, page_size)


@pytest.mark.parametrize("sent", [0, 50, 100 + 2 * PAGE + 1, 100 + len(OFFSETS) * PAGE - 1])
def test_early_end_of_file(sockets, sent):
    a, b = sockets
    want = 100 + len(OFFSETS) * PAGE
    a.sendall(bytes(sent))
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError, match=f"after {sent} of {want} bytes"):
        readv_pages(b.fileno(), bytearray(100), region(), OFFSETS)


@pytest.mark.parametrize("offset", [1, PAGE + 8, NPAGES * PAGE, (NPAGES + 5) * PAGE,
                                    (1 << 64) - PAGE])
@pytest.mark.parametrize("io", ["write", "read"])
def test_offsets_must_be_whole_pages_inside_the_buffer(sockets, offset, io):
    with pytest.raises(ValueError, match="not a page inside the buffer"):
        transfer(io, sockets[0].fileno(), region(), [0, offset])


def test_a_page_cut_by_the_end_of_the_buffer(sockets):
    a, _ = sockets
    buffer = np.zeros(2 * PAGE + 100, dtype=np.uint8)
    with pytest.raises(ValueError, match="0x2000"):
        writev_pages(a.fileno(), b"", buffer, [2 * PAGE])


def test_nothing_is_sent_when_an_offset_is_bad(sockets):
    a, b = sockets
    with pytest.raises(ValueError):
        writev_pages(a.fileno(), b"header", region(), [0, 5])
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)


def test_system_errors_surface_as_oserror(sockets):
    a, b = sockets
    b.close()
    with pytest.raises(OSError) as info:
        writev_pages(a.fileno(), b"x" * 10, region(), [0])
    assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
    with pytest.raises(OSError) as info:
        readv_pages(-1, bytearray(1), region(), [])
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("io", ["write", "read"])
def test_page_size_zero_is_refused(sockets, io):
    with pytest.raises(ValueError, match="page_size"):
        transfer(io, sockets[0].fileno(), region(), [0], page_size=0)
