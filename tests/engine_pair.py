"""One channel's SendEngine and RecvEngine, each in a thread of this process,
over a connected socket pair, plain or through TLSChannels.

The engines release the GIL for their I/O, so threads are enough to run a
channel end to end without worker processes: the source side's commands go
down a pipe as a send worker's do, the destination's engine applies packets
into its own region, and device chunks come out of its reassembly pipe.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np

from fastmfd import _core
from fastmfd.regions import Region
from fastmfd.shm import SharedMemory

PAGE = 4096
CHUNK = 64 << 10            # device chunk data bytes
POOL_SLOTS = 8


def image(size: int, seed: int = 1, zero_every: int = 7) -> np.ndarray:
    """Random pages, every ``zero_every``-th one zero (so zero pages are listed too)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    pages = data.reshape(-1, PAGE)
    pages[::zero_every] = 0
    return data


class EnginePair:
    """``send_*`` queue work for the send engine; ``finish()`` quits it and
    waits for the receiver to see the end of the stream."""

    def __init__(self, src_sock: socket.socket, dst_sock: socket.socket, size: int, *,
                 compression: str = "none", tls: tuple | None = None,
                 packet_pages: int = 128, checksum: bool = False, devices: bool = True,
                 image_data: np.ndarray | None = None, place: bool = False,
                 dst_path: str | os.PathLike[str] | None = None,
                 page_size: int = PAGE) -> None:
        self.size = size
        self.src_sock, self.dst_sock = src_sock, dst_sock
        self.owned: list = []
        self.params = {"page_size": page_size, "packet_pages": packet_pages, "checksum": checksum,
                       "chunk_size": CHUNK, "zero_page_detection": True}
        self.job_pages = 1024
        self.src = self._own(Region.create("ram0", size, page_size=page_size))
        self.dst = self._own(
            Region.create("ram0", size, page_size=page_size) if dst_path is None else
            Region.from_file("ram0", dst_path, size=size, exclusive=True, page_size=page_size))
        # place: the receiver places pages into the fresh region through a
        # second mapping of its file, as a destination's workers do.
        self.dst_file = self._own(self.dst.open_file()) if place else None
        data = image(size) if image_data is None else image_data
        self.src.array[:] = data
        self.counters_src = self._own(_core.Counters.create(1, tag="test-counters"))
        self.counters_dst = self._own(_core.Counters.create(1, tag="test-counters"))
        self.selector = self._own(_core.ChannelSelector.create(1, tag="test-selector"))
        self.mailbox = self._own(SharedMemory.create(self.job_pages * 8, tag="test-mailbox"))
        self.box = np.frombuffer(self.mailbox.buf, dtype=np.uint64)
        self.received = self._own(_core.DirtyBitmap.create(size // page_size,
                                                           tag="test-received"))
        dev = [("dev0", 0)] if devices else []
        self.pool_src = self.pool_dst = None
        if devices:
            slot = CHUNK + _core.CHUNK_HEADER_SIZE
            self.pool_src = self._own(_core.BufferPool.create(POOL_SLOTS, slot, tag="test-pool"))
            self.pool_dst = self._own(_core.BufferPool.create(POOL_SLOTS, slot, tag="test-pool"))
        self.cmd_r, self.cmd_w = os.pipe()
        self.reasm_r, self.reasm_w = os.pipe() if devices else (-1, -1)
        tls_src, tls_dst = tls if tls else (None, None)
        try:
            self._make_engines(compression, dev, tls_src, tls_dst)
        except BaseException:
            self._free()
            raise
        self.events: list[int] = []
        self._event_cond = threading.Condition()
        self.send_error: BaseException | None = None
        self.recv_error: BaseException | None = None
        self._send_thread = threading.Thread(target=self._run_sender, daemon=True)
        self._recv_thread = threading.Thread(target=self._run_receiver, daemon=True)
        self._send_thread.start()
        self._recv_thread.start()

    def _make_engines(self, compression, dev, tls_src, tls_dst) -> None:
        self.sender = self.receiver = None
        self.sender = _core.SendEngine(
            self.src_sock.fileno(), 0, self.params, _core.make_codec(compression, True),
            [self.src], self.counters_src, self.selector, 0, self.mailbox.buf, self.pool_src,
            dev, tls=tls_src)
        self.receiver = _core.RecvEngine(
            self.dst_sock.fileno(), 0, self.params, _core.make_codec(compression, False),
            [self.dst], self.counters_dst, [self.received], [True], self.pool_dst, dev,
            self.reasm_w, True, tls=tls_dst,
            place_fds=[self.dst_file.fileno() if self.dst_file is not None else -1])

    def _own(self, thing):
        self.owned.append(thing)
        return thing

    # ------------------------------------------------------------ threads
    def _run_sender(self) -> None:
        try:
            self.sender.run(self.cmd_r)
        except BaseException as exc:       # noqa: BLE001 - reported by finish()
            self.send_error = exc
            self.selector.abort()

    def _run_receiver(self) -> None:
        try:
            while True:
                event = self.receiver.run()
                with self._event_cond:
                    self.events.append(event)
                    self._event_cond.notify_all()
                if event == _core.EVENT_EOF:
                    return
        except BaseException as exc:       # noqa: BLE001 - reported by finish()
            with self._event_cond:
                self.recv_error = exc
                self._event_cond.notify_all()
            # A receiver that gave up reads no more: let the sender see it.
            try:
                self.dst_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------ commands
    def _take_channel(self) -> None:
        if self.selector.select(timeout=30) is None:
            raise TimeoutError("the send engine did not finish its job within 30 s")

    def send_pages(self, pages) -> None:
        pages = np.asarray(pages, dtype=np.uint64)
        for start in range(0, len(pages), self.job_pages):
            part = pages[start:start + self.job_pages]
            self._take_channel()
            self.box[:len(part)] = part
            os.write(self.cmd_w, _core.pack_command(_core.CMD_RAM, 0, len(part)))

    def send_chunk(self, idx: int, payload: bytes, last: bool = False) -> None:
        slot = self.pool_src.acquire(timeout=30)
        view = self.pool_src.view(slot)
        n = _core.encode_chunk_header(view, idx, _core.CHUNK_FLAG_LAST if last else 0)
        view[n:n + len(payload)] = payload
        self._take_channel()
        os.write(self.cmd_w, _core.pack_command(_core.CMD_DEVICE, 0, n + len(payload), slot))

    def sync(self) -> None:
        os.write(self.cmd_w, _core.pack_command(_core.CMD_SYNC))

    def wait_events(self, count: int, timeout: float = 60) -> None:
        """Wait until the receiver has returned ``count`` events (SYNCs applied)."""
        with self._event_cond:
            if not self._event_cond.wait_for(
                    lambda: len(self.events) >= count or self.recv_error is not None, timeout):
                raise TimeoutError(f"the receiver saw {len(self.events)} of {count} events")
        if self.recv_error is not None:
            raise self.recv_error

    def finish(self, timeout: float = 60) -> None:
        """QUIT the sender; wait for both threads; raise the first error seen."""
        try:
            os.write(self.cmd_w, _core.pack_command(_core.CMD_QUIT))
        except OSError:
            pass
        self.join(timeout)
        if self.recv_error is not None:
            raise self.recv_error
        if self.send_error is not None:
            raise self.send_error

    def join(self, timeout: float = 60) -> None:
        self._send_thread.join(timeout)
        self._recv_thread.join(timeout)
        assert not self._send_thread.is_alive(), "the send engine hangs"
        assert not self._recv_thread.is_alive(), "the receive engine hangs"

    def chunks(self) -> list[tuple[int, int, bytes]]:
        """(idx, flags, data) of every device chunk the receiver delivered."""
        out = []
        os.set_blocking(self.reasm_r, False)
        raw = b""
        try:
            while True:
                part = os.read(self.reasm_r, 1 << 16)
                if not part:
                    break
                raw += part
        except BlockingIOError:
            pass
        for device, idx, flags, slot, length, channel in _core.unpack_descriptors(raw):
            view = self.pool_dst.view(slot)
            out.append((idx, flags, bytes(view[_core.CHUNK_HEADER_SIZE:length])))
            self.pool_dst.release(slot)
        return out

    def close(self) -> None:
        """Stop whatever still runs and free everything (safe after a failure)."""
        for sock in (self.src_sock, self.dst_sock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.write(self.cmd_w, _core.pack_command(_core.CMD_QUIT))
        except OSError:
            pass
        self.selector.abort()
        if self.pool_src is not None:
            self.pool_src.abort()
            self.pool_dst.abort()
        self._send_thread.join(30)
        self._recv_thread.join(30)
        self._free()

    def _free(self) -> None:
        self.sender = self.receiver = None
        del self.box
        for fd in (self.cmd_r, self.cmd_w, self.reasm_r, self.reasm_w):
            if fd >= 0:
                os.close(fd)
        for thing in reversed(self.owned):
            try:
                thing.close()           # owners unlink their segments first
            except BufferError:         # a view still alive: unlinked all the same
                pass
