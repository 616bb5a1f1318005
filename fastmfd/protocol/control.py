"""What the main process and its child processes tell each other.

A child (a channel's send or receive worker, the reassembly process, a
benchmark peer) gets its parameters once, as one of the frozen dataclasses
below, and reports on its control pipe with the small messages below: once
per session or per round, never per packet (the hot path is in the Cython
core and shared memory). Both ends import this one module, so a new
parameter or report is added here and used where it is made and read.

::

    main process                                   child
      Params ───────────────────────────────────▶   (or Stop: exit without a session)
      ◀─────────────────────────────── Ready        started, waiting for its Params
      Prealloc(its share) ──────────────────────▶   receive worker (prealloc): fault its
      ◀─────────────────────────────── Preallocated   share in, slice by slice, reporting
                                                      each; then a Greeting (or Stop) follows
      Greeting + a new connection ──────────────▶   receive worker: greet it (TLS, hello,
      ◀─────────────────────────────── Greeted(ch)    shared key) — then RecvParams follow —
      ◀─────────────────────────────── Refused        or drop it and wait for the next one
      QemuGreeting + a new connection ──────────▶   listen --qemu in TLS: greet it (TLS,
      ◀───────────────────────── QemuAuthenticated    its handshake passed; then
      ◀─────────────────────────────── QemuGreeted    QEMU's first bytes): a multifd
      Relay + a socket ─────────────────────────▶     channel's RecvParams follow, or the
                                                      main channel's relay (qemu_tls)
      ◀─────────────────────────────── Synced(n)    receive worker at SYNC n; waits for
      Go(n) ─────────────────────────────────────▶    Go(n) (or Stop)
      ◀─────────────────────────────── Done         send worker: every command done
      ◀─────────────────────────────── Eof          receive worker: its channel ended
      ◀─────────────────────────────── DeviceLoaded reassembly: one device loaded
      AwaitPrecopy(counts) ──────────────────────▶  reassembly: say when these are loaded
      ◀─────────────────────────────── PrecopyLoading  ... steps towards it so far
      ◀─────────────────────────────── PrecopyLoaded  ... they are (switchover_ack)
      ◀─────────────────────────────── LoaderBusy   reassembly: a loader is held up
      RamLoaded ─────────────────────────────────▶  reassembly: config chunks may load now
      Drained ───────────────────────────────────▶  reassembly: every channel has ended
      ◀─────────────────────────────── Drained      reassembly: nothing is missing
      ◀─────────────────────────────── Failed(...)  any failure, then the child exits 1
"""

from __future__ import annotations

import errno
import ssl
from dataclasses import dataclass
from typing import Any

from ..errors import MigrationError
from ..shm import limit_hint
from .security import ChannelSecurity
from .setup import Setup

__all__ = [
    "RegionHandle", "ChannelParams", "SendParams", "RecvParams", "ReassemblyParams",
    "Greeting", "Prealloc", "Preallocated", "Ready", "Stop", "Greeted", "Refused", "Synced", "Go", "Done", "Eof",
    "DeviceLoaded", "Drained", "Failed", "AwaitPrecopy", "PrecopyLoaded", "RamLoaded",
    "LoaderBusy", "PrecopyLoading", "failed_locally", "failure_text",
]


@dataclass(frozen=True)
class RegionHandle:
    """What another process needs to attach to a region (small and picklable)."""
    name: str
    size: int
    page_size: int
    kind: str           # "shm" or "file"
    location: str       # segment name or file path
    file_id: tuple[int, int]    # (st_dev, st_ino) of the file the creator mapped
    dirty: str          # dirty bitmap segment name
    huge_pages: bool = False    # every process mapping it asks for huge pages
    read_only: bool = False     # a file opened for reading: mapped so everywhere


# ---------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ChannelParams:
    """What every channel worker needs: its channel, the packet geometry, the
    regions and devices of the session, and the shared structures to attach."""
    channel: int
    page_size: int
    packet_pages: int
    checksum: bool
    chunk_size: int                         # largest device chunk's data
    compression: str
    regions: tuple[RegionHandle, ...]
    devices: tuple[tuple[str, int], ...]    # (idstr, instance_id), in SETUP's order
    counters: str                           # the Counters segment
    pool: str | None                        # the device-state BufferPool, if any


@dataclass(frozen=True)
class SendParams(ChannelParams):
    """A send worker's session: it opens its connection (``security``, then the
    init packet ``hello`` and the shared-key proof for ``uuid``), takes commands
    from a pipe and pages from its row of the mailbox, and marks itself idle in
    the channel selector. With ``holes_listed``, the main process has found the
    pages in the holes of the regions' files: its jobs mark them KNOWN_ZERO_PAGE or
    leave them out, and the worker does not look for holes itself."""
    hello: bytes
    uuid: bytes
    security: ChannelSecurity
    compression_level: int
    zero_page_detection: bool
    mailbox: str
    mailbox_row: int
    job_pages: int
    selector: str
    selector_index: int
    rate: float = 0.0                       # bytes/s this channel may send (0: no cap)
    layout: str = "current"                 # RAM header layout: "current" or "qemu-7.2"
    yield_cpu: bool = False                 # a peer on this host: run at the lowest priority
    holes_listed: bool = False              # the jobs say which pages lie in holes


@dataclass(frozen=True)
class RecvParams(ChannelParams):
    """A receive worker's session: RAM packets go into the regions (marked in
    the ``received`` bitmaps), device chunks into the pool."""
    ram: bool                               # a RAM channel (device-state channels are not)
    received: tuple[str, ...]               # per region, the bitmap of pages written
                                            # (and not punched out since)
    fresh: tuple[bool, ...]                 # per region, new zero memory (session_regions)
    layout: str = "current"                 # RAM header layout: "current" or "qemu-7.2"
    learn_compression: bool = False         # QEMU: the first packet with pages names it
    sparse: tuple[bool, ...] = ()           # per region, a sparse file: cleared pages are holes
    place: tuple[bool, ...] = ()            # per region, fresh memory: pages are placed into
                                            # it, not written through the mapping (RecvEngine)


@dataclass(frozen=True)
class Greeting:
    """A receive worker's first parameters: greet the connections it is handed
    (one fd follows each Greeting) as channels of the session ``setup``."""
    setup: Setup
    security: ChannelSecurity


@dataclass(frozen=True)
class QemuGreeting:
    """A receive worker's first parameters in ``listen --qemu`` in TLS: greet
    the connections it is handed (one fd follows each) as QEMU's
    (:mod:`fastmfd._engine.qemu_tls`)."""
    security: ChannelSecurity


@dataclass(frozen=True)
class Relay:
    """To the worker that greeted QEMU's main channel in TLS: relay it with the
    socket whose fd follows."""


@dataclass(frozen=True)
class Prealloc:
    """A receive worker's first parameters when the destination preallocates:
    fault in ``shares`` (region index, byte offset, length: page-aligned runs
    of ``regions``), then greet connections as a Greeting says."""
    regions: tuple[RegionHandle, ...]
    shares: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class ReassemblyParams:
    """The reassembly process's session: the pool chunks arrive in, and a loader
    per device (in SETUP's order, named ``idstr/instance``)."""
    pool: str
    max_queued_bytes: int
    loaders: tuple[tuple[str, Any], ...]
    config_after_ram: bool = False          # hold config chunks until RamLoaded
    stall_timeout: float = 30.0             # a loader's call slower than half is reported
    cap_cut_from: int = 0                   # max_queued_bytes before the pool's room cut it


# ---------------------------------------------------------------- reports

@dataclass(frozen=True)
class Ready:
    """The child is up and waits for its parameters."""


@dataclass(frozen=True)
class Stop:
    """Instead of parameters or a Go: exit now."""


@dataclass(frozen=True)
class Preallocated:
    """A receive worker faulted in ``done`` bytes of its Prealloc share so far
    (``done`` equal to the share's total: all of it)."""
    done: int


@dataclass(frozen=True)
class Greeted:
    """The connection is channel ``channel`` of the session (authenticated when
    the session requires it); the worker waits for its RecvParams."""
    channel: int
    kind: int


@dataclass(frozen=True)
class QemuAuthenticated:
    """A connection being greeted (a QemuGreeting) passed its TLS handshake: its peer
    holds a certificate ``ca`` issued. Its first bytes are awaited (a QemuGreeted or
    a Refused follows): QEMU's main channel says nothing until every multifd channel
    is through its own handshake."""


@dataclass(frozen=True)
class QemuGreeted:
    """A connection passed its TLS handshake and began as QEMU's main channel
    (``channel`` None: a Relay follows) or multifd channel ``channel`` of
    migration ``uuid`` (its RecvParams follow); either way a QemuGreeting
    instead means it is dropped, and the worker greets the next."""
    channel: int | None
    uuid: bytes | None


@dataclass(frozen=True)
class Refused:
    """The connection failed its greeting and was dropped; the worker is free.
    ``authenticated``: only what it sent after its TLS handshake was wrong
    (a QEMU greeting; a stranger's fails the handshake)."""
    reason: str
    authenticated: bool = False


@dataclass(frozen=True)
class Synced:
    """A receive worker reached the SYNC of ``round`` and holds there (with the
    compression its channel used so far, when it learns it from the stream)."""
    round: int
    compression: str | None = None


@dataclass(frozen=True)
class Go:
    """Every RAM channel reached the SYNC of ``round``: go on."""
    round: int


@dataclass(frozen=True)
class Done:
    """A send worker ran every command and half-closed its socket."""


@dataclass(frozen=True)
class Eof:
    """A receive worker's channel ended cleanly."""


@dataclass(frozen=True)
class DeviceLoaded:
    """The reassembly process loaded device ``device`` (its SETUP index)."""
    device: int
    result: Any
    seconds: float
    chunks: int


@dataclass(frozen=True)
class Drained:
    """To the reassembly process: every channel ended. From it: every device
    stream was complete."""


@dataclass(frozen=True)
class AwaitPrecopy:
    """To the reassembly process: report PrecopyLoaded once device i has loaded
    ``device_chunks[i]`` chunks, for every i (the source's PRECOPY_SENT)."""
    device_chunks: tuple[int, ...]


@dataclass(frozen=True)
class LoaderBusy:
    """From the reassembly process: device ``device``'s loader has been held up for
    half the deadline, ``what`` says by what ("load_state_buffer() of chunk 2 has not
    returned", "waiting for chunk 1 of the 5 PRECOPY_SENT counted"); ``what`` None: no
    longer. The main process names it if the deadline passes."""
    device: int
    what: str | None


@dataclass(frozen=True)
class PrecopyLoading:
    """From the reassembly process while PrecopyLoaded is owed, when it grew: its
    steps towards it, the chunks AwaitPrecopy counted that are loaded (each device's
    up to its count) and the precopy_loaded() calls that returned. The loaders'
    progress towards the switchover, which chunks arriving are not, nor chunks loaded
    past a device's count: a loader stuck in a call while its device, or another,
    kept sending held the session until the buffers filled."""
    steps: int


@dataclass(frozen=True)
class PrecopyLoaded:
    """From the reassembly process: every chunk AwaitPrecopy named is loaded."""


@dataclass(frozen=True)
class RamLoaded:
    """To the reassembly process: all RAM is in; config chunks may load."""


@dataclass(frozen=True)
class Failed:
    """The child failed: what happened, and its traceback."""
    text: str
    traceback: str
    local: bool = False     # of this host's own (failed_locally): no peer is to blame
    peer_closed: bool = False   # its peer closed its connection (EPIPE, ECONNRESET), as a
                                # peer that fails does: the peer's ERROR may say why
    device: str | None = None   # the device its MigrationError named (a loader's failure)

    @classmethod
    def of(cls, exc: BaseException, traceback: str) -> Failed:
        """The report of ``exc``, in :func:`failure_text`'s words."""
        closed = isinstance(exc, (BrokenPipeError, ConnectionResetError))
        device = exc.device if isinstance(exc, MigrationError) else None
        return cls(failure_text(exc), traceback, failed_locally(exc), closed, device)


# What a connection its peer ended, or that broke on the way, fails with (EPROTO:
# the core's TLS record or alert the peer sent).
_PEER_ERRNOS = frozenset({
    errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.ENOTCONN, errno.ESHUTDOWN, errno.ENETRESET, errno.ENETDOWN, errno.ENETUNREACH,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EPROTO})


def failed_locally(exc: BaseException) -> bool:
    """Whether a child's failure ``exc`` is of its own host (a system call's error
    other than a connection's: ENOMEM under a memory limit, EFBIG, EIO; the core's
    MemoryError, its allocation's ENOMEM), which its peer did not cause. (An
    SSLError's errno is OpenSSL's, not the system's; a timeout, whatever its errno,
    is a wait on the peer.)"""
    if isinstance(exc, MemoryError):
        return True
    return (isinstance(exc, OSError) and not isinstance(exc, (ssl.SSLError, TimeoutError))
            and exc.errno is not None and exc.errno not in _PEER_ERRNOS)


def failure_text(exc: BaseException) -> str:
    """What a child says of its failure ``exc``: a MigrationError says where already; a system
    call's error says it in its own words, with the errno's name (``send: Connection reset
    by peer (ECONNRESET)``, where Python's own text began ``ConnectionResetError: [Errno
    104]``); anything else is named by its type."""
    if isinstance(exc, MigrationError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        path = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{path} ({name}){limit_hint(exc.errno)}"
    return f"{type(exc).__name__}: {exc}"
