"""The destination side of a migration: :class:`Destination`.

A Destination owns its listener, its receive worker processes and the
reassembly process (started when it is entered, ahead of the migration),
and what its user added: regions to receive into and device loaders. The
destination needs no parameters: the source's SETUP carries them all.
:meth:`Destination.receive` runs one session
(:class:`fastmfd._engine.receiving.Receiving`, which holds the session's
state and documents its steps); leaving the Destination stops every process
and frees the regions it created and every shared-memory segment.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ._engine.processes import ChildSet
from ._engine.reassembly import reassembly_main
from ._engine.admission import (GREETING_SPARES, MAX_WORKERS, Refusal, Refusals,
                                refusal_log, refuse_waiting)
from ._engine.receiving import DestinationParts, Receiving, ReceivingState
from ._engine.session import Owner, SessionFailure, call_hook
from ._engine.session_regions import check_writable
from ._engine.stopping import end_call
from ._engine.workers import recv_worker_main
from .arguments import (BOOL, CALLABLE, INT, STR, TIMEOUT, UNSIGNED, Kind,
                        check_types, instance_of, optional, type_error, up_to, within)
from .devices import Loader, check_device_ids
from .errors import ConfigError, MigrationError
from .protocol.security import ChannelSecurity, TLSConfig, check_auth_key, hidden_key
from .protocol.setup import MAX_CHANNELS, STALL_TIMEOUT, Setup, rule
from .protocol.sockets import (LISTENERS, Listener, Listening, bound_address, listen,
                               listening_address, listening_on, parse_address)
from .region_pool import RegionPool
from .reprs import fields_repr
from .regions import Region, check_huge_pages, region_to_add
from .shm import SHM_DIR
from .stats import ReceiveStats

__all__ = ["Destination", "DestinationResult", "Refusal"]

_ADDRESS = Kind("a str (tcp:HOST:PORT or unix:PATH) or a listening socket.socket",
                lambda value: isinstance(value, (str, *LISTENERS)))
# Its own bounds on values SETUP carries: what the source's would have to be.
_MAX_QUEUED_BYTES = optional(within(INT, *rule("max_queued_bytes")))
_WORKERS = up_to(MAX_WORKERS, f"a session uses {MAX_CHANNELS} channels and {GREETING_SPARES} "
                 "greeting workers at most")


@dataclass
class DestinationResult:
    """What :meth:`Destination.receive` returns:

    regions -- region name -> Region holding the received bytes (open until the
        Destination closes; then, with a region_pool, back in the pool)
    devices -- (idstr, instance_id) -> what the device's loader returned (bytes for
        CollectLoader), in the order the source added the devices
    stats -- what the destination measured (:class:`~fastmfd.ReceiveStats`)
    setup -- the source's SETUP message: every session parameter
    """
    regions: dict[str, Region]
    devices: dict[tuple[str, int], object]
    stats: ReceiveStats
    setup: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Bounded: a CollectLoader's bytes said by their size (its 64 MiB were a repr
        # of 256 MB), 8 regions or devices shown, then a count.
        return fields_repr(self)


class Destination(Owner):
    """Receives one migration on ``address`` (``tcp:HOST:PORT``, port 0 picks one; a
    HOST name at each of its addresses, one port, ``.address`` then the name with it,
    or, where one this host lacks was left out, the first bound, and ``.listening_on``
    each bound; or ``unix:PATH``), or on a socket already listening (the caller's: it stays open,
    so a server serves one migration after another on it, see ``fastmfd listen
    --forever``).

    ``tls``: a :class:`~fastmfd.TLSConfig` with this destination's certificate
    (and ``ca`` to require client certificates); ``auth_key``: the shared key
    every connection must prove. Connections that fail either, or are not a
    fastmfd source of this session, are refused (see :attr:`refused`) while the
    Destination goes on waiting; each greeting has ``handshake_timeout`` seconds.

    Use it as a context manager: entering starts ``workers`` receive worker
    processes (at most 263: a session's channels and greeting spares) and the
    reassembly process ahead of time (more workers are started if the source
    asks for more channels); leaving stops them and frees the regions it
    created and every shared-memory segment.

    ``stall_timeout``: seconds the source, a channel or a process may make no
    progress before the session fails, 0.1..86400 (default: the source's, from
    SETUP); SETUP_ACK tells the source, whose KEEPALIVEs keep to it when it is
    shorter. ``timeout`` (the wait for a source) and ``handshake_timeout``: at most
    a week (``MAX_TIMEOUT_SECONDS``).
    ``max_queued_bytes``: this destination's own bound on the device-state bytes a
    device may have waiting out of order (default: the source's, from SETUP, 256 MiB
    unless it says otherwise), 4096 bytes to 1 TiB; the smaller of the two holds, and a
    source whose ``device_chunk_size`` is larger than this bound fails the session at its
    SETUP (both sides say why).
    ``region_factory(name, size, page_size)``: what makes each region the source
    sends that was not added (:meth:`add_region`); default: new shared memory.
    ``max_memory``: bytes of memory the session may make this destination
    hold — the regions it creates plus the device-state buffers (shared
    memory) plus, given max_memory, what the receive channels allocate
    (private memory in each worker: per channel, packet buffers sized by the
    source's packet_pages x page_size, at most what its largest region needs,
    and for zstd or "auto" a decoder window of up to 32 MiB) and the worker
    processes the session needs, 16 MiB each (a receive worker per channel,
    or the ``workers`` started ahead if more, and the reassembly process).
    Up to 8 more workers greet connections meanwhile, as many as what is
    left after those and the device-state buffers holds (possibly none).
    Default: what ``/dev/shm`` has free, against which the channels' buffers
    and processes, not /dev/shm's, are not counted; the device-state buffers
    within what this process's memory cgroup has left too. A SETUP asking
    for more is refused before anything is allocated or started, and the
    source is told why. The pages written count against the memory cgroup
    (past its limit, the OOM killer ends a worker mid-session): regions
    whose every page will be written (``prealloc``, or a source that
    detects no zero page) must fit in what it has left, or the SETUP is
    refused so; otherwise, where their size would not, a warning is logged
    (zero pages are never written: a mostly empty image fits). Given,
    ``max_memory`` also bounds the device state kept by the
    CollectLoaders of devices given no loader: together, what the regions,
    buffers, channels, processes and greeting workers leave (a stream going
    past it fails the session, naming the device and the bound).
    ``prealloc``: fault every region of the session in (allocate and map each
    page, QEMU's ``prealloc=on``) before the source may send: the receive
    workers each fault in a share, in parallel, between SETUP and SETUP_ACK,
    so the transfer writes into memory that is there; it takes
    ``stats.prealloc_time_s``, and a /dev/shm that cannot hold the regions
    fails the session cleanly on both sides before any page is sent.
    ``region_pool``: a :class:`~fastmfd.RegionPool` that the regions this
    destination creates come from, when it holds one of the same name and
    size (warm memory, left by an earlier session; one that was preallocated
    then is not again), and go
    back to when the Destination closes (drop every view of them by then: the
    next session writes into them). ``huge_pages``: the regions it creates ask
    for transparent huge pages; ConfigError, saying why and what would allow
    them, where the system gives none (see :mod:`fastmfd.huge_pages`).
    """

    def __init__(self, address: str | Listener, *, workers: int = 4, timeout: float = 30.0,
                 max_queued_bytes: int | None = None,
                 region_factory: Callable[[str, int, int], Region] | None = None,
                 tls: TLSConfig | None = None, auth_key: bytes | None = None,
                 handshake_timeout: float = 10.0, stall_timeout: float | None = None,
                 max_memory: int | None = None, prealloc: bool = False,
                 region_pool: RegionPool | None = None, huge_pages: bool = False) -> None:
        auth_key = hidden_key(auth_key)     # (a traceback's locals of a check that fails)
        check_types("Destination",
                    address=(address, _ADDRESS),
                    region_factory=(region_factory, optional(CALLABLE)),
                    tls=(tls, optional(instance_of(TLSConfig, "a fastmfd.TLSConfig"))),
                    region_pool=(region_pool, optional(
                        instance_of(RegionPool, "a fastmfd.RegionPool"))),
                    prealloc=(prealloc, BOOL), huge_pages=(huge_pages, BOOL))
        workers, timeout, max_queued_bytes, handshake_timeout, stall_timeout, max_memory = \
            check_types("Destination", workers=(workers, _WORKERS), timeout=(timeout, TIMEOUT),
                        max_queued_bytes=(max_queued_bytes, _MAX_QUEUED_BYTES),
                        handshake_timeout=(handshake_timeout, TIMEOUT),
                        stall_timeout=(stall_timeout, optional(STALL_TIMEOUT)),
                        max_memory=(max_memory, optional(UNSIGNED)))
        super().__init__()
        requested = None if isinstance(address, LISTENERS) else parse_address(address)
        if tls is not None:
            tls.check_server()
            if tls.authz is not None and tls.ca is None:
                raise ConfigError("TLSConfig.authz needs ca: client identities are only "
                                  "known from verified client certificates")
        self._security = ChannelSecurity(
            tls=tls, auth_key=check_auth_key(auth_key, "Destination"), timeout=handshake_timeout)
        self._refusals = Refusals(refusal_log(
            address if isinstance(address, LISTENERS) else None))
        self.stall_timeout = stall_timeout
        self.max_memory = max_memory
        self._listener: Listener | None
        self.prealloc = prealloc
        self.region_pool = region_pool
        if huge_pages:
            check_huge_pages(SHM_DIR)
        self.huge_pages = huge_pages
        if requested is None:
            assert isinstance(address, LISTENERS), "only a listener is not parsed"
            self._listener, self._owns_listener = address, False
            where = listening_address(address)
        else:
            self._listener, self._owns_listener = listen(requested), True
            self._resources.own(Listening(self._listener, requested.path))
            where = bound_address(self._listener, requested)
        self.address = str(where)
        # For people: each address a name's listener bound, where it left one out.
        self.listening_on = listening_on(self._listener, where)
        self._prespawn = workers
        self.timeout = timeout
        self._queued_cap = max_queued_bytes
        self._region_factory = region_factory
        self._user_regions: dict[str, Region] = {}
        self._loaders: dict[tuple[str, int], Loader] = {}
        self._workers: ChildSet | None = None
        self._reassembly: ChildSet | None = None
        self._failure = SessionFailure("destination")
        self._session: Receiving | None = None
        self._additions_taken = False       # the session took the regions and loaders added

    # ------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        names = [f"receive channel {i}" for i in range(self._prespawn)]
        own = self._resources.own_processes
        self._workers = own(ChildSet(recv_worker_main, names))
        self._reassembly = own(ChildSet(reassembly_main, ["reassembly"]))

    def add_region(self, region: Region) -> None:
        """Receive into ``region`` (it must match the source's size) instead of a new one.

        Regions the source sends that were not added are created in shared
        memory, or by ``region_factory(name, size, page_size)`` when the
        Destination was given one (``fastmfd listen`` maps files that way).
        Regions and loaders are added before :meth:`receive`, or from its
        ``on_setup``: the session takes them then (ConfigError after).
        """
        self._check_adding("add_region")
        region = region_to_add(region)
        check_writable(region, "add_region(region)")    # now, not to the source at its SETUP
        if region.name in self._user_regions:
            raise ConfigError(f"two regions named {region.name!r}")
        self._user_regions[region.name] = region

    def add_loader(self, idstr: str, instance_id: int, loader: Loader) -> None:
        """Load device ``idstr``/``instance_id`` with ``loader`` (default: CollectLoader)."""
        self._check_adding("add_loader")
        idstr, instance_id = check_device_ids("add_loader", idstr, instance_id)
        # A class has the methods too: refused now, not when its first chunk comes.
        if isinstance(loader, type) or not isinstance(loader, Loader):
            raise type_error(f"add_loader(loader) for {idstr!r}", "a fastmfd.Loader "
                             "(load_state_buffer(data), load_finish())", loader)
        if (idstr, instance_id) in self._loaders:
            raise ConfigError(f"two loaders for device {idstr!r} instance {instance_id}")
        self._loaders[(idstr, instance_id)] = loader

    def _check_adding(self, call: str) -> None:
        """Regions and loaders are taken when the source's SETUP arrives, after
        ``on_setup`` (which may add them): one added later would be ignored."""
        session = self._session
        if self._additions_taken:
            when = "the session took its regions and loaders (at the source's SETUP)"
        elif session is not None and session.state is ReceivingState.FAILED:
            when = "its receive() failed (a Destination receives once)"
        else:
            return
        raise ConfigError(f"{call}() after {when}: add them before receive(), or in its "
                          f"on_setup")

    def _taking_additions(self, on_setup: Callable[[Setup], object] | None
                          ) -> Callable[[Setup], object]:
        """``on_setup``, after which the session takes what was added (next, in the
        same thread), so that :meth:`_check_adding` refuses more from then on."""
        def hook(setup: Setup) -> None:
            try:
                if on_setup is not None:
                    on_setup(setup)
            finally:
                self._additions_taken = True
        return hook

    def _described(self) -> str:
        return (f"at {self.address}, {len(self._user_regions)} region(s) and "
                f"{len(self._loaders)} loader(s) added")

    @property
    def refused(self) -> list[Refusal]:
        """Connections dropped because they failed their greeting: a :class:`Refusal`
        each, the first 1000 (MAX_REFUSALS_KEPT); all are counted in
        :attr:`refused_total`. Each is logged too, as fast as the listening socket's
        log allows (100 lines at once, then one every 10 s; over that, a line says
        how many were not logged): on a socket given to it, that log is shared by
        every Destination that serves on it in turn."""
        return self._refusals.kept

    @property
    def refused_total(self) -> int:
        """How many connections were refused, kept in :attr:`refused` or not."""
        return self._refusals.total

    @property
    def source_connected(self) -> bool:
        """Whether a source's main channel passed its greeting in :meth:`receive`: a
        failure before that is this side's own (its processes, its threads), never a
        peer's, since a connection that fails its greeting is only refused."""
        return self._session is not None and self._session.source_came

    def worker_pids(self) -> list[int]:
        """The process ids of the receive workers and the reassembly process (empty
        outside ``with``): what a benchmark measures the CPU time of, beside this
        process's."""
        return [pid for group in (self._workers, self._reassembly) if group is not None
                for pid in group.pids()]

    def cancel(self, reason: str = "cancelled") -> None:
        """Fail the session from another thread: ``receive()`` raises MigrationError
        promptly, even while it still waits for the source to connect."""
        check_types("cancel", reason=(reason, STR))
        self._check_own_process()
        error = self._failure.fail(MigrationError(reason))
        listener = self._listener
        if listener is not None and self._owns_listener:
            # Sources waiting (before receive(), or not yet accepted) hear why, as one
            # being greeted does; then later ones are refused by the system.
            refuse_waiting(listener, error, self._security.tls is None, self._refusals.add)
            try:
                listener.shutdown(socket.SHUT_RDWR)   # wakes a blocked accept()
            except OSError:
                pass

    def _release(self) -> None:
        """Stop every process and free every resource (idempotent): see close()."""
        try:
            self._resources.stop()
        finally:        # (a stop that raised half way: what it left is freed all the same)
            self._workers = self._reassembly = None
            self._resources.release()       # the listener it made last: see __init__
            self._listener = None
            self._refusals.ended()          # none comes now: the log says what it left out

    # ------------------------------------------------------------ receive
    def receive(self, *, on_setup: Callable[[Setup], object] | None = None,
                on_resume: Callable[[], object] | None = None) -> DestinationResult:
        """Accept one migration and apply it; returns a :class:`DestinationResult`.

        ``on_setup(setup)`` runs when the source's SETUP arrives, before this side
        commits anything or answers: ``setup`` (:class:`fastmfd.Setup`)
        lists the ``regions`` (name, size) and ``devices`` (idstr, instance_id) the
        source sends; the hook may ``add_region()`` and ``add_loader()`` for them,
        and what it raises refuses the session (the source is told why).

        LOADED goes to the source only once every loader's ``load_finish()`` has
        returned and every file-backed region was written to its file
        (:meth:`Region.flush`), so a source that succeeds has its data on disk.

        ``on_resume()`` runs after everything is loaded and LOADED was sent; the source
        learns that it ran (or what it raised) before its ``migrate()`` returns.
        """
        check_types("receive", on_setup=(on_setup, optional(CALLABLE)),
                    on_resume=(on_resume, optional(CALLABLE)))
        self._check_usable()
        if self._workers is None:
            raise ConfigError("use the Destination as a context manager")
        with self._running("a Destination receives one migration; make a new one"):
            return self._receive(on_setup, on_resume)

    def _receive(self, on_setup: Callable[[Setup], object] | None,
                 on_resume: Callable[[], object] | None) -> DestinationResult:
        assert self._listener is not None and self._workers is not None, "inside with"
        assert self._reassembly is not None, "started with the workers"
        session = self._session = self._resources.own_session(Receiving(DestinationParts(
            self._listener, self.timeout, self._security, self._workers, self._reassembly,
            self._user_regions, self._loaders, self._region_factory, self._queued_cap,
            self._resources, self._failure, self._refusals, self.stall_timeout, self.max_memory,
            on_setup=self._taking_additions(on_setup), prealloc=self.prealloc,
            region_pool=self.region_pool, huge_pages=self.huge_pages)))
        try:
            session.accept_main()
            started = time.monotonic()
            with self._refusals.named_in_failure(self._failure):
                session.run()
            total = time.monotonic() - started
            session.source_still_there()
            call_hook("on_resume", on_resume)
            session.resumed()
        except BaseException as exc:         # Ctrl-C or sys.exit() too: see end_call
            end_call(self._failure, exc)
        assert session.setup is not None, "accept_main() took it"
        stats = replace(session.stats(total), refused_connections=self._refusals.total,
                        last_refused=self._refusals.last)
        return DestinationResult({r.name: r for r in session.regions}, session.device_results(),
                                 stats, session.setup.encode())
