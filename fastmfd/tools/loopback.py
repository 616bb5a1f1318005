"""Run a whole migration on this machine: a Destination receiving in a thread
and a Source sending to it, over loopback TCP (or a Unix socket).

The demo, ``fastmfd bench`` and the benchmarks all need exactly this. It
comes in steps, so a benchmark can time the migration alone::

    migration = LoopbackMigration(config, regions, ...)   both sides entered: workers started
    stats = migration.run(live=...)                       Source.migrate(); receive() in a thread
    result = migration.finish(check)                      check(DestinationResult) while the
                                                          destination's regions are open; close
    (migration.close() frees everything without checking)

and as one call, :func:`migrate_locally`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar, overload

from ..config import MigrationConfig
from ..destination import Destination, DestinationResult
from ..devices import Device, Loader
from ..errors import MigrationError
from ..protocol.security import TLSConfig
from ..regions import Region
from ..source import Source
from ..stats import MigrationStats, ReceiveStats
from ..threads import start_thread

__all__ = ["LoopbackSecurity", "LoopbackResult", "LoopbackMigration", "migrate_locally"]


@dataclass(frozen=True)
class LoopbackSecurity:
    """Both ends' security settings (each end has its own certificate)."""
    source_tls: TLSConfig | None = None
    destination_tls: TLSConfig | None = None
    auth_key: bytes | None = field(default=None, repr=False)

    def source_config(self, config: MigrationConfig) -> MigrationConfig:
        if self.source_tls is None and self.auth_key is None:
            return config
        return config.replace(tls=self.source_tls, auth_key=self.auth_key)

    @property
    def label(self) -> str:
        """How the channels are protected, for tables ("" when they are not)."""
        return " + ".join(name for name, on in (("TLS", self.source_tls is not None),
                                                ("auth key", self.auth_key is not None))
                          if on)


NO_SECURITY = LoopbackSecurity()


_Checked = TypeVar("_Checked", covariant=True)     # LoopbackResult is frozen
Hook = Callable[[], object]


@dataclass(frozen=True)
class LoopbackResult(Generic[_Checked]):
    stats: MigrationStats
    received: ReceiveStats
    checked: _Checked               # what ``check`` returned


class LoopbackMigration:
    """One migration of ``regions`` and ``devices`` to a destination in this process.

    Creating it enters the Destination and the Source, which starts their
    worker processes; ``loaders`` maps ``(idstr, instance_id)`` to a loader;
    ``receive_into`` lists regions the destination receives into instead of
    creating its own. ``address`` is where the destination listens, or a
    socket listening already (the caller's to close).
    """

    def __init__(self, config: MigrationConfig, regions: Sequence[Region], *,
                 devices: Sequence[Device] = (),
                 loaders: Mapping[tuple[str, int], Loader] | None = None,
                 receive_into: Sequence[Region] = (),
                 address: str | socket.socket = "tcp:127.0.0.1:0",
                 security: LoopbackSecurity = NO_SECURITY) -> None:
        self._outcome: dict[str, DestinationResult | BaseException] = {}
        self._thread: threading.Thread | None = None
        self._src: Source | None = None
        self._stats: MigrationStats | None = None
        self._dst: Destination | None = Destination(
            address, workers=config.total_channels, tls=security.destination_tls,
            auth_key=security.auth_key)
        try:
            self._dst.__enter__()
            for region in receive_into:
                self._dst.add_region(region)
            for (idstr, instance_id), loader in (loaders or {}).items():
                self._dst.add_loader(idstr, instance_id, loader)
            self._src = Source(self._dst.address, security.source_config(config)).__enter__()
            for region in regions:
                self._src.add_region(region)
            for device in devices:
                self._src.add_device(device)
        except BaseException:
            self.close()
            raise

    def run(self, *, live: bool = False, on_stop: Hook | None = None,
            on_resume: Hook | None = None, progress: bool = False) -> MigrationStats:
        """The migration itself (:meth:`Source.migrate`); raises the source's error."""
        assert self._src is not None and self._dst is not None, "open until close()"
        # The receiving thread starts here, so a migration closed before it
        # runs has no thread waiting for a source that never comes.
        self._thread = start_thread(threading.Thread(target=self._receive, daemon=True,
                                                     name="fastmfd loopback destination"))
        try:
            self._stats = self._src.migrate(live=live, on_stop=on_stop, on_resume=on_resume,
                                            progress=progress)
        except BaseException as exc:
            # The destination may not have heard from the source at all.
            self._dst.cancel(f"the source failed: {exc}")
            raise
        return self._stats

    def pids(self) -> dict[str, list[int]]:
        """Each side's worker processes, and this process ("main": both sides' main
        threads): what a benchmark measures the CPU time of."""
        assert self._src is not None and self._dst is not None, "open until close()"
        return {"source": self._src.worker_pids(), "destination": self._dst.worker_pids(),
                "main": [os.getpid()]}

    def _receive(self) -> None:
        assert self._dst is not None, "closed only after this thread ends"
        try:
            self._outcome["result"] = self._dst.receive()
        except BaseException as exc:        # reported by finish(), after the source's
            self._outcome["error"] = exc

    @overload
    def finish(self, check: None = None) -> LoopbackResult[None]: ...
    @overload
    def finish(self, check: Callable[[DestinationResult], _Checked]
               ) -> LoopbackResult[_Checked]: ...

    def finish(self, check: Callable[[DestinationResult], _Checked] | None = None
               ) -> LoopbackResult[_Checked | None]:
        """Wait for the destination, call ``check`` on its result, free everything."""
        try:
            if self._thread is None or self._stats is None:
                raise MigrationError("the migration has not run")
            self._thread.join()
            error = self._outcome.get("error")
            if isinstance(error, BaseException):
                raise error
            result = self._outcome.pop("result")
            assert isinstance(result, DestinationResult), "no error: a result"
            checked = check(result) if check is not None else None
            return LoopbackResult(self._stats, result.stats, checked)
        finally:
            self.close()

    def close(self) -> None:
        """Stop both sides and free every resource (idempotent)."""
        if self._src is not None:
            self._src.close()
            self._src = None
        if self._dst is not None:
            if self._thread is not None and self._thread.is_alive():
                self._dst.cancel("the loopback migration was closed")
                self._thread.join()
            self._dst.close()
            self._dst = None

    def __enter__(self) -> "LoopbackMigration":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def migrate_locally(config: MigrationConfig, regions: Sequence[Region], *,
                    devices: Sequence[Device] = (),
                    loaders: Mapping[tuple[str, int], Loader] | None = None, live: bool = False,
                    on_stop: Hook | None = None, on_resume: Hook | None = None,
                    progress: bool = False, receive_into: Sequence[Region] = (),
                    check: Callable[[DestinationResult], object] | None = None,
                    address: str = "tcp:127.0.0.1:0",
                    security: LoopbackSecurity = NO_SECURITY) -> LoopbackResult[object]:
    """Migrate ``regions`` and ``devices`` to a destination in this process, in one call.

    ``check`` inspects the :class:`~fastmfd.DestinationResult` before the
    destination closes. Raises the source's error if the session fails.
    """
    with LoopbackMigration(config, regions, devices=devices, loaders=loaders,
                           receive_into=receive_into, address=address,
                           security=security) as migration:
        migration.run(live=live, on_stop=on_stop, on_resume=on_resume, progress=progress)
        return migration.finish(check)
