"""Channel workers: one process per channel on each side, each running its
channel's engine from the Cython core.

::

    Source / Destination main process                channel worker (a Child)
      ChildSet(send_worker_main | recv_worker_main)    run_child: Ready, then SendParams or
      child.start_session(params, [socket, pipe]) ──▶    RecvParams and the fds it needs
                                                         send: SendEngine.run(command pipe)
                                                           then Done
                                                         receive: RecvEngine.run() until SYNC n:
      Watch ◀── Synced(n) ────────────────────────        report, wait for Go(n)
            ─── Go(n) ────────────────────────────▶      ... until the channel ends: Eof
            ◀── Failed(text, traceback) ───────────      any failure, then exit(1)

Only parameters (once) and per-round reports cross the control pipe; pages
and device chunks go from socket to shared memory inside the engines.
"""

from __future__ import annotations

from .. import _core
from ..errors import ProtocolError
from ..protocol.control import ChannelParams, Done, Eof, Go, RecvParams, SendParams, Stop, \
    Synced
from ..regions import Region
from ..shm import SharedMemory
from .processes import ChildPipe, run_child

__all__ = ["send_worker_main", "recv_worker_main"]


def _attach(params: ChannelParams, stack: list) -> tuple[list, "_core.Counters", object]:
    """Map the session's regions, counters and pool; remember them for closing."""
    regions = [Region.attach(handle) for handle in params.regions]
    stack.extend(regions)
    counters = _core.Counters.attach(params.counters)
    stack.append(counters)
    pool = None
    if params.pool:
        pool = _core.BufferPool.attach(params.pool)
        stack.append(pool)
    return regions, counters, pool


def _engine_geometry(params: ChannelParams, zero_page_detection: bool = False) -> dict:
    """What the core's engines read from their parameters."""
    return {"page_size": params.page_size, "packet_pages": params.packet_pages,
            "checksum": params.checksum, "chunk_size": params.chunk_size,
            "zero_page_detection": zero_page_detection}


def _send_session(pipe: ChildPipe, params: SendParams, stack: list) -> None:
    sock_fd = pipe.recv_fd()
    cmd_fd = pipe.recv_fd()
    regions, counters, pool = _attach(params, stack)
    selector = _core.ChannelSelector.attach(params.selector)
    stack.append(selector)
    mailbox = SharedMemory.attach(params.mailbox)
    stack.append(mailbox)
    row_bytes = params.job_pages * 8
    box = mailbox.buf[params.mailbox_row * row_bytes:][:row_bytes]
    codec = _core.make_codec(params.compression, True, params.compression_level)
    engine = _core.SendEngine(sock_fd, params.channel,
                              _engine_geometry(params, params.zero_page_detection), codec,
                              regions, counters, selector, params.selector_index, box, pool,
                              list(params.devices))
    engine.run(cmd_fd)
    del engine, box         # views of the mailbox must go before it closes
    pipe.send(Done())


def _recv_session(pipe: ChildPipe, params: RecvParams, stack: list) -> None:
    sock_fd = pipe.recv_fd()
    reassembly_fd = pipe.recv_fd() if params.pool else -1
    regions, counters, pool = _attach(params, stack)
    received = [_core.DirtyBitmap.attach(name) for name in params.received]
    stack.extend(received)
    codec = _core.make_codec(params.compression, False)
    engine = _core.RecvEngine(sock_fd, params.channel, _engine_geometry(params), codec,
                              regions, counters, received, list(params.fresh), pool,
                              list(params.devices), reassembly_fd, params.ram)
    while engine.run() == _core.EVENT_SYNC:
        pipe.send(Synced(engine.rounds))
        reply = pipe.recv()
        if isinstance(reply, Stop):
            break
        if not isinstance(reply, Go) or reply.round != engine.rounds:
            raise ProtocolError(f"channel {params.channel} holds at the SYNC of round "
                                f"{engine.rounds} and was told {reply!r}", field="go",
                                received=reply, expected=Go(engine.rounds))
    del engine
    pipe.send(Eof())


def send_worker_main(conn) -> None:
    """A send worker: runs one channel's SendEngine for one session."""
    run_child(conn, _send_session)


def recv_worker_main(conn) -> None:
    """A receive worker: runs one channel's RecvEngine, holding at each SYNC."""
    run_child(conn, _recv_session)
