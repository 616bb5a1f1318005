"""fastmfd's own trial: one migration over loopback TCP, prepared ahead of timing."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from contextlib import ExitStack

from ...config import MigrationConfig
from ...destination import DestinationResult
from ...devices import Device, Loader
from ...errors import MigrationError
from ...regions import Region
from ..images import Image
from ..loopback import NO_SECURITY, LoopbackMigration, LoopbackSecurity
from .link import EmulatedLink
from .trial import Measurement

__all__ = ["FastmfdTrial", "LOOPBACK"]

LOOPBACK = "tcp:127.0.0.1:0"


class FastmfdTrial:
    """One fastmfd migration of ``image`` over loopback TCP, prepared ahead of timing.

    A :class:`~fastmfd.tools.loopback.LoopbackMigration` underneath: entering
    the Destination and the Source starts their worker processes (one per
    channel on each side), as a long-running migration service would have
    them; :meth:`run` is the migration alone. ``devices`` are ``(device,
    loader)`` pairs; :meth:`finish` returns what the loaders returned, keyed
    ``(idstr, instance_id)``.

    By default the destination creates its region when the source announces
    it, so the migration pays for fresh memory, as a new QEMU does.
    ``prealloc=True`` receives into a region allocated and faulted in
    beforehand (QEMU: ``prealloc=on``), which leaves the transport alone.
    ``live=True`` runs live rounds before the stop (for devices with precopy
    data); by default the source stops first and all of it is downtime.
    ``link``: the destination listens on the far side of this emulated link
    instead of on loopback.
    """

    pids_complete = True

    def __init__(self, image: Image, config: MigrationConfig,
                 devices: Sequence[tuple[Device, Loader]] = (), *,
                 prealloc: bool = False, security: LoopbackSecurity = NO_SECURITY,
                 live: bool = False, link: EmulatedLink | None = None) -> None:
        self.image = image
        self.live = live
        # Closed last in, first out: the migration, then the preallocated region.
        self._resources = ExitStack()
        try:
            targets: list[Region] = []
            if prealloc:
                target = self._resources.enter_context(Region.create(
                    image.region.name, image.size, page_size=image.region.page_size))
                target.array[::image.region.page_size] = 0     # allocate, map
                targets.append(target)
            address: str | socket.socket = LOOPBACK
            if link is not None:
                address = self._resources.enter_context(link.listen())
            self._migration = self._resources.enter_context(LoopbackMigration(
                config, [image.region], devices=[d for d, _ in devices],
                loaders={(d.idstr, d.instance_id): loader for d, loader in devices},
                receive_into=targets, address=address, security=security))
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, list[int]]:
        return self._migration.pids()

    def run(self) -> Measurement:
        started = time.perf_counter()
        stats = self._migration.run(live=self.live)
        seconds = time.perf_counter() - started
        return Measurement(seconds, stats.ram_bytes, stats.wire_bytes, {
            "total_time_s": stats.total_time_s, "setup_time_s": stats.setup_time_s,
            "downtime_s": stats.downtime_s, "normal_pages": stats.normal_pages,
            "zero_pages": stats.zero_pages, "device_bytes": stats.device_bytes})

    def finish(self) -> dict[tuple[str, int], object]:
        """Check the destination holds the image; return the loaders' results; free all."""
        def check(result: DestinationResult) -> dict[tuple[str, int], object]:
            if not self.image.matches(result.regions[self.image.region.name]):
                raise MigrationError(f"the destination's region differs from the "
                                     f"{self.image.kind} image")
            return result.devices
        try:
            return self._migration.finish(check).checked
        finally:
            self.close()

    def close(self) -> None:
        """Stop every process and free every segment (idempotent)."""
        self._resources.close()
