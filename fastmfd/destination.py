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

import os
import socket
import time
from dataclasses import dataclass, field

from ._engine.processes import ChildSet
from ._engine.reassembly import reassembly_main
from ._engine.receiving import DestinationParts, Receiving
from ._engine.session import Owner, SessionFailure, SessionResources, call_hook
from ._engine.workers import recv_worker_main
from .errors import ConfigError, MigrationError
from .protocol.setup import MAX_STALL_SECONDS, MIN_STALL_SECONDS
from .protocol.sockets import bound_address, listen, parse_address
from .regions import Region
from .stats import ReceiveStats

__all__ = ["Destination", "DestinationResult"]


@dataclass
class DestinationResult:
    """What :meth:`Destination.receive` returns."""
    regions: dict[str, Region]
    """Region name -> Region holding the received bytes (open until the Destination closes)."""
    devices: dict[tuple[str, int], object]
    """(idstr, instance_id) -> what the device's loader returned (bytes for CollectLoader)."""
    stats: ReceiveStats
    setup: dict = field(default_factory=dict)
    """The source's SETUP message: every session parameter."""


class Destination(Owner):
    """Receives one migration on ``address`` (``tcp:HOST:PORT``, port 0 picks one, or
    ``unix:PATH``).

    Use it as a context manager: entering starts ``workers`` receive worker
    processes and the reassembly process ahead of time (more workers are
    started if the source asks for more channels); leaving stops them and
    frees the regions it created and every shared-memory segment.
    """

    def __init__(self, address: str, *, workers: int = 4, timeout: float = 30.0,
                 max_queued_bytes: int | None = None, region_factory=None,
                 stall_timeout: float | None = None) -> None:
        requested = parse_address(address)
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, not {workers}")
        if stall_timeout is not None and not MIN_STALL_SECONDS <= stall_timeout <= \
                MAX_STALL_SECONDS:
            raise ConfigError(f"stall_timeout must be in {MIN_STALL_SECONDS:g}.."
                              f"{MAX_STALL_SECONDS:g} s, not {stall_timeout!r}")
        self.stall_timeout = stall_timeout
        self._listener = listen(requested)
        self.address = str(bound_address(self._listener, requested))
        self._unix_path = requested.target if requested.family == socket.AF_UNIX else None
        self._prespawn = workers
        self.timeout = timeout
        self._queued_cap = max_queued_bytes
        self._region_factory = region_factory
        self._user_regions: dict[str, Region] = {}
        self._loaders: dict[tuple[str, int], object] = {}
        self._workers: ChildSet | None = None
        self._reassembly: ChildSet | None = None
        self._resources = SessionResources()
        self._failure = SessionFailure("destination")
        self._session: Receiving | None = None

    # ------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        names = [f"receive channel {i}" for i in range(self._prespawn)]
        self._workers = ChildSet(recv_worker_main, names)
        self._reassembly = ChildSet(reassembly_main, ["reassembly"])

    def add_region(self, region: Region) -> None:
        """Receive into ``region`` (it must match the source's size) instead of a new one.

        Regions the source sends that were not added are created in shared
        memory, or by ``region_factory(name, size, page_size)`` when the
        Destination was given one (``fastmfd listen`` maps files that way).
        """
        if region.name in self._user_regions:
            raise ConfigError(f"two regions named {region.name!r}")
        self._user_regions[region.name] = region

    def add_loader(self, idstr: str, instance_id: int, loader) -> None:
        """Load device ``idstr``/``instance_id`` with ``loader`` (default: CollectLoader)."""
        for method in ("load_state_buffer", "load_finish"):
            if not callable(getattr(loader, method, None)):
                raise ConfigError(f"loader for {idstr!r} has no {method}() method")
        self._loaders[(idstr, instance_id)] = loader

    def cancel(self, reason: str = "cancelled") -> None:
        """Fail the session from another thread: ``receive()`` raises MigrationError
        promptly, even while it still waits for the source to connect."""
        self._failure.fail(MigrationError(reason))
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)   # wakes a blocked accept()
            except OSError:
                pass

    def close(self) -> None:
        """Stop every process and free every resource (idempotent). From another thread
        while ``receive()`` runs, it cancels the session first and waits for it."""
        self._stop_running_call()
        self._resources.shutdown_sockets()
        for group in (self._workers, self._reassembly):
            if group is not None:
                group.stop()
        self._workers = self._reassembly = None
        if self._session is not None:
            self._session.close()
        self._resources.release()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._unix_path and os.path.exists(self._unix_path):
                os.unlink(self._unix_path)

    # ------------------------------------------------------------ receive
    def receive(self, *, on_resume=None) -> DestinationResult:
        """Accept one migration and apply it; returns a :class:`DestinationResult`.

        ``on_resume()`` runs after everything is loaded and LOADED was sent; the source
        learns that it ran (or what it raised) before its ``migrate()`` returns.
        """
        if self._workers is None:
            raise ConfigError("use the Destination as a context manager")
        if self._session is not None:
            raise ConfigError("a Destination receives one migration; make a new one")
        with self._running():
            return self._receive(on_resume)

    def _receive(self, on_resume) -> DestinationResult:
        session = self._session = Receiving(DestinationParts(
            self._listener, self.timeout, self._workers, self._reassembly, self._user_regions,
            self._loaders, self._region_factory, self._queued_cap, self._resources,
            self._failure, self.stall_timeout))
        try:
            session.accept_main()
            started = time.monotonic()
            session.run()
            total = time.monotonic() - started
            session.source_still_there()
            call_hook("on_resume", on_resume)
            session.resumed()
        except KeyboardInterrupt:
            self._failure.fail(MigrationError("interrupted by the user"))
            raise
        except BaseException as exc:
            self._failure.raise_for(exc)
        return DestinationResult({r.name: r for r in session.regions}, session.device_results(),
                                 session.stats(total), session.setup.encode())
