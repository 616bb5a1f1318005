"""Channel workers: one process per channel on each side, each running its
channel's engine from the Cython core.

::

    Source / Destination main process                channel worker (a Child)
      ChildSet(send_worker_main | recv_worker_main)    run_child: Ready, then
      source: start_session(SendParams,                  send: opens its channel (TLS, init
        [socket, command pipe]) ──────────────────▶        packet, shared-key proof), then
                                                           SendEngine.run(command pipe), Done
      destination (prealloc): Prealloc ─────────▶   receive: faults its share in,
      ◀── Preallocated(bytes) per slice ──────────        reporting each slice; then:
      destination: start_session(Greeting, [socket]) ▶   receive: greets the connection (TLS,
      ◀── Greeted(ch) or Refused (then the next           init packet of this session, proof);
            connection: Greeting + socket)                Refused: dropped, waits for another
      RecvParams (+ reassembly pipe) ─────────────▶      RecvEngine.run() until SYNC n:
      Watch ◀── Synced(n) ────────────────────────        report, wait for Go(n)
            ─── Go(n) ────────────────────────────▶      ... until the channel ends: Eof
            ◀── Failed(text, traceback) ───────────      any failure, then exit(1)
      close: Stop ─────────────────────────────────▶   after Done / Eof: tear down, exit
      QEMU (qemu_recv_worker_main): RecvParams +      the main process read the init packet:
        socket ───────────────────────────────▶       RecvEngine on QEMU 7.2's layout, as above
      QEMU in TLS: QemuGreeting + socket ─────▶       greets it (qemu_tls): then RecvParams
                                                      as above, or Relay: the main channel

Only parameters (once) and per-round reports cross the control pipe; pages
and device chunks go from socket to shared memory inside the engines.
"""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection
from typing import Any

from .. import _core
from ..errors import ConnectionClosed, MigrationError, ProtocolError
from ..protocol import handshake
from ..protocol.qemu import QEVM_MAGIC
from ..protocol.control import (ChannelParams, Done, Eof, Go, Greeted, Greeting, Prealloc,
                                Preallocated, QemuAuthenticated, QemuGreeted, QemuGreeting,
                                RecvParams, Refused, Relay, SendParams, Stop, Synced)
from ..protocol.sockets import describe_peer, peer_on_this_host
from ..regions import Region
from ..shm import SharedMemory
from .open_files import allow_worker_files
from .processes import ChildPipe, run_child
from .qemu_tls import greet_in_tls
from .session import Closable

__all__ = ["send_worker_main", "recv_worker_main", "qemu_recv_worker_main", "PREALLOC_SLICE"]

# Bytes a receive worker faults in between two progress reports: small enough
# that even memory the host must find again (~4 s/GiB) reports every ~0.25 s,
# well inside any stall deadline.
PREALLOC_SLICE = 64 << 20
# The nice value of a send worker told to yield the CPU (SendParams.yield_cpu)
# to a peer on this host: it then runs only where the peer leaves a core idle.
LOWEST_PRIORITY = 19


def _attach(params: ChannelParams, stack: list[Closable]
            ) -> tuple[list[Region], _core.Counters, _core.BufferPool | None]:
    """Map the session's regions, counters and pool; remember them for closing."""
    allow_worker_files(len(params.regions))     # the engine holds a file per region
    regions = [Region.attach(handle) for handle in params.regions]
    stack.extend(regions)
    counters = _core.Counters.attach(params.counters)
    stack.append(counters)
    pool: _core.BufferPool | None = None
    if params.pool:
        pool = _core.BufferPool.attach(params.pool)
        stack.append(pool)
    return regions, counters, pool


def _engine_geometry(params: ChannelParams, zero_page_detection: bool = False) -> dict[str, Any]:
    """What the core's engines read from their parameters."""
    return {"page_size": params.page_size, "packet_pages": params.packet_pages,
            "checksum": params.checksum, "chunk_size": params.chunk_size,
            "zero_page_detection": zero_page_detection,
            "auto": params.compression == "auto"}


def _send_session(pipe: ChildPipe, params: SendParams, stack: list[Closable]) -> None:
    sock = socket.socket(fileno=pipe.recv_fd())
    stack.append(sock)
    cmd_fd = pipe.recv_fd()
    tls = handshake.open_channel(sock, params.security, params.hello, params.uuid,
                                 params.channel, None)
    regions, counters, pool = _attach(params, stack)
    selector = _core.ChannelSelector.attach(params.selector)
    stack.append(selector)
    mailbox = SharedMemory.attach(params.mailbox)
    stack.append(mailbox)
    row_bytes = params.job_pages * 8
    box = mailbox.buf[params.mailbox_row * row_bytes:][:row_bytes]
    codec = _core.make_codec(params.compression, True, params.compression_level)
    geometry = _engine_geometry(params, params.zero_page_detection)
    # auto measures the link only where it is one: a peer on this host shares our CPUs.
    beside_peer = peer_on_this_host(sock)
    geometry.update(rate=params.rate, layout=params.layout, measure_link=not beside_peer)
    if params.yield_cpu and beside_peer:
        # The peer's CPU time goes first (the one thread that runs the engine).
        os.setpriority(os.PRIO_PROCESS, 0, LOWEST_PRIORITY)
    # The regions' files: a page in a hole of one is a zero page, sent unread (or,
    # without zero page detection, populated before it is read). Where the jobs say
    # which pages lie in holes (send --qemu), the files are not asked again: a file
    # of lone zero pages cost two lseeks per page sent, a quarter of the workers' CPU.
    hole_fds = None if params.holes_listed else [
        _region_file(region, stack) for region in regions]
    engine = _core.SendEngine(sock.fileno(), params.channel, geometry, codec,
                              regions, counters, selector, params.selector_index, box, pool,
                              list(params.devices), tls=tls, hole_fds=hole_fds)
    engine.run(cmd_fd)
    pipe.send(Done())
    _hold_until_stopped(pipe)
    del engine, box         # views of the mailbox must go before it closes


def _greet(pipe: ChildPipe, greeting: Greeting
           ) -> tuple[socket.socket, handshake.ChannelHello, _core.TLSChannel | None] | None:
    """Greet each connection handed over until one is a channel of the session;
    returns ``(socket, hello, tls)``, or None when told to Stop."""
    while True:
        sock = socket.socket(fileno=pipe.recv_fd())
        try:
            hello, tls = handshake.greet_channel(sock, greeting.security, greeting.setup, None)
            return sock, hello, tls
        except (MigrationError, ProtocolError) as exc:     # a stranger or an impostor
            sock.close()
            pipe.send(Refused(str(exc)))
        greeting = pipe.recv()
        if isinstance(greeting, Stop):
            return None


def _preallocate(pipe: ChildPipe, prealloc: Prealloc) -> None:
    """Fault this worker's share of the regions in, one slice at a time, each
    reported; the pages stay allocated (in /dev/shm, or a file's page cache)
    after the regions are unmapped."""
    done = 0
    for index, offset, length in prealloc.shares:
        with Region.attach(prealloc.regions[index]) as region:
            for start in range(offset, offset + length, PREALLOC_SLICE):
                end = min(start + PREALLOC_SLICE, offset + length)
                with region.buffer[start:end] as part:
                    _core.populate(part, f"region {region.name}")
                done += end - start
                pipe.send(Preallocated(done))


def _recv_session(pipe: ChildPipe, first: Greeting | Prealloc, stack: list[Closable]) -> None:
    if isinstance(first, Prealloc):
        _preallocate(pipe, first)
        after = pipe.recv()
        if isinstance(after, Stop):
            return
        if not isinstance(after, Greeting):
            raise MigrationError(f"expected a Greeting after Prealloc, not "
                                 f"{type(after).__name__}")
        first = after
    greeted = _greet(pipe, first)
    if greeted is None:
        return
    sock, hello, tls = greeted
    stack.append(sock)
    assert hello.channel_id is not None, "greet_channel refuses a main channel"
    pipe.send(Greeted(hello.channel_id, hello.kind))
    params = pipe.recv()
    if isinstance(params, Stop):
        return
    _receive(pipe, sock, params, tls, stack)


def _qemu_recv_session(pipe: ChildPipe, first: RecvParams | QemuGreeting,
                       stack: list[Closable]) -> None:
    """A QEMU multifd channel, greeted (its init packet read) by the main process;
    in TLS, each connection this worker is handed, greeted here (:mod:`.qemu_tls`)."""
    if isinstance(first, RecvParams):
        sock = socket.socket(fileno=pipe.recv_fd())
        stack.append(sock)
        _receive(pipe, sock, first, None, stack)
        return
    greeted = _greet_qemu(pipe, first)
    if greeted is None:
        return
    sock, tls, told = greeted
    stack.append(sock)
    if isinstance(told, RecvParams):
        _receive(pipe, sock, told, tls, stack)
        return
    with socket.socket(fileno=pipe.recv_fd()) as relayed:
        relayed.sendall(QEVM_MAGIC)         # read by its greeting
        tls.relay(relayed.fileno())
    pipe.send(Eof())
    _hold_until_stopped(pipe)


def _greet_qemu(pipe: ChildPipe, greeting: QemuGreeting
                ) -> tuple[socket.socket, _core.TLSChannel, RecvParams | Relay] | None:
    """Greet each connection handed over until one is QEMU's and the main process
    keeps it (a QemuGreeting instead drops it); returns ``(socket, tls, what
    follows)``, or None when told to Stop."""
    while True:
        sock = socket.socket(fileno=pipe.recv_fd())
        greeted, tls = greet_in_tls(sock, greeting.security,
                                    lambda: pipe.send(QemuAuthenticated()))
        if isinstance(greeted, Refused):
            sock.close()        # now: its peer is not left waiting for the next greeting
        pipe.send(greeted)
        told = pipe.recv()
        if isinstance(greeted, QemuGreeted) and isinstance(told, (RecvParams, Relay)):
            assert tls is not None, "greeted through its handshake"
            return sock, tls, told
        sock.close()
        if not isinstance(told, QemuGreeting):
            return None
        greeting = told


def _receive(pipe: ChildPipe, sock: socket.socket, params: RecvParams,
             tls: _core.TLSChannel | None, stack: list[Closable]) -> None:
    """Run the channel's RecvEngine, holding at each SYNC until told Go."""
    reassembly_fd = pipe.recv_fd() if params.pool else -1
    regions, counters, pool = _attach(params, stack)
    received = [_core.DirtyBitmap.attach(name) for name in params.received]
    stack.extend(received)
    # A RAM channel's regions' files: unallocated memory's to place pages into;
    # other memory's to learn its holes where it may hold data (not fresh), and,
    # fresh or not, its file system, which says how its pages are best populated
    # (RegionRef.populate_read): a fresh region faulted in already (prealloc, a
    # warm file) was populated for writing, a fault a page on tmpfs.
    place_fds, hole_fds = [-1] * len(regions), [-1] * len(regions)
    for index, region in enumerate(regions if params.ram else ()):
        placed = bool(params.place) and params.place[index]
        (place_fds if placed else hole_fds)[index] = _region_file(region, stack)
    geometry = _engine_geometry(params)
    geometry.update(layout=params.layout, learn_compression=params.learn_compression)
    codec = None if params.learn_compression else _core.make_codec(params.compression, False)
    engine = _core.RecvEngine(sock.fileno(), params.channel, geometry, codec,
                              regions, counters, received, list(params.fresh), pool,
                              list(params.devices), reassembly_fd, params.ram, tls=tls,
                              sparse=list(params.sparse) or None, place_fds=place_fds,
                              hole_fds=hole_fds)
    peer = _peer_of(sock)
    try:
        while engine.run() == _core.EVENT_SYNC:
            pipe.send(Synced(engine.rounds,
                             engine.compression if params.learn_compression else None))
            reply = pipe.recv()
            if isinstance(reply, Stop):
                break
            if not isinstance(reply, Go) or reply.round != engine.rounds:
                raise ProtocolError(f"channel {params.channel} holds at the SYNC of round "
                                    f"{engine.rounds} and was told {reply!r}", field="go",
                                    received=reply, expected=Go(engine.rounds))
    except ConnectionClosed as exc:
        # Cut inside a packet, with no ERROR: said as the main channel says its own
        # end, naming whom (not "ProtocolError: RAM payload: connection closed").
        raise MigrationError(f"the connection from {peer} closed {exc.after}") from None
    pipe.send(Eof())
    _hold_until_stopped(pipe)
    del engine


def _peer_of(sock: socket.socket) -> str:
    """Whom ``sock`` is connected to, for errors: taken before its end (a connection
    reset has no peer)."""
    try:
        return describe_peer(sock.getpeername())
    except OSError:
        return "the source"


def _region_file(region: Region, stack: list[Closable]) -> int:
    """``region``'s file opened anew for the engine (closed with ``stack``)."""
    file = region.open_file()
    stack.append(file)
    return file.fileno()


def _hold_until_stopped(pipe: ChildPipe) -> None:
    """After its last report, a worker keeps its engine, its mappings and its
    process until the owner closes the session (its Stop). Tearing them down
    (unmapping every page of its share, exiting) costs milliseconds of CPU per
    channel, which on a busy machine the channels still running and the end of
    the session would wait for: a 64 MiB migration over 8 channels took 67 ms
    with it in the session and 47-52 without."""
    told = pipe.recv()
    if not isinstance(told, Stop):
        raise MigrationError(f"a worker whose channel ended was told {told!r}, "
                             f"expected Stop")


def send_worker_main(conn: Connection) -> None:
    """A send worker: runs one channel's SendEngine for one session."""
    run_child(conn, _send_session)


def recv_worker_main(conn: Connection) -> None:
    """A receive worker: runs one channel's RecvEngine, holding at each SYNC."""
    run_child(conn, _recv_session)


def qemu_recv_worker_main(conn: Connection) -> None:
    """A receive worker for a QEMU multifd channel (:mod:`.qemu_receiving`)."""
    run_child(conn, _qemu_recv_session)
