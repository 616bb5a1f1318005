"""The source side of a migration: :class:`Source`.

A Source owns what outlives any one step of a migration: its send worker
processes (one per channel, started when it is entered, outside the timed
migration), the shared counters, channel selectors and page mailbox, and the
regions and devices it was given. :meth:`Source.migrate` runs one session
(:class:`fastmfd._engine.sending.Sending`, which holds the session's state
and documents its steps); leaving the Source stops the workers and frees
every shared-memory segment on every exit path.
"""

from __future__ import annotations

import threading
import uuid as uuid_module
from typing import Any, Callable

from . import _core
from ._engine.open_files import SOURCE_PER_CHANNEL, check_session_files, check_worker_files
from ._engine.processes import ChildSet
from ._engine.sending import Sending, SourceParts
from ._engine.session import Owner
from ._engine.workers import send_worker_main
from .arguments import BOOL, CALLABLE, STR, check_types, instance_of, optional, type_error
from .config import MigrationConfig
from .devices import Device, check_device_ids
from .errors import ConfigError, MigrationError
from .protocol.setup import MAX_DEVICES, MAX_REGIONS
from .protocol.sockets import parse_address
from .regions import Region, region_to_add
from .shm import SharedMemory
from .stats import MigrationStats

__all__ = ["Source"]


class Source(Owner):
    """Migrates regions and devices to a :class:`~fastmfd.Destination`.

    ``address``: the destination's, ``tcp:HOST:PORT`` (also ``tcp://HOST:PORT``; an
    IPv6 HOST in brackets; a name is looked up, each of its addresses tried in turn)
    or ``unix:PATH``. ``config``: a :class:`~fastmfd.MigrationConfig` (default:
    ``MigrationConfig()``, 2 channels, no compression).

    Use it as a context manager: entering starts one send worker process per
    channel (outside the timed migration); leaving stops them and frees every
    shared-memory segment. One Source performs one migration.
    """

    def __init__(self, address: str, config: MigrationConfig | None = None) -> None:
        check_types("Source", address=(address, STR), config=(config, optional(
            instance_of(MigrationConfig, "a fastmfd.MigrationConfig"))))
        super().__init__()
        self.address = parse_address(address)
        self.config = config or MigrationConfig()
        self.uuid = uuid_module.uuid4().bytes
        self._regions: list[Region] = []
        self._devices: list[Device] = []
        self._workers: ChildSet | None = None
        self._parts: SourceParts | None = None
        self._session: Sending | None = None
        self._cancelled: str | None = None
        # status() reads the shared counters: close() must not free them under it.
        self._status_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        cfg, own = self.config, self._resources.own
        check_session_files(cfg.total_channels, SOURCE_PER_CHANNEL, "the source")
        self._workers = workers = self._resources.own_processes(ChildSet(
            send_worker_main, [f"send channel {i}" for i in range(cfg.total_channels)]))
        ram_selector = own(_core.ChannelSelector.create(cfg.channels))
        device_selector = ram_selector
        if cfg.device_state_channels:
            device_selector = own(_core.ChannelSelector.create(cfg.device_state_channels))
        job_pages = cfg.packet_pages * cfg.job_packets
        self._parts = SourceParts(
            address=self.address, config=cfg, uuid=self.uuid, regions=self._regions,
            devices=self._devices, workers=workers,
            counters=own(_core.Counters.create(cfg.total_channels)),
            ram_selector=ram_selector, device_selector=device_selector,
            mailbox_shm=own(SharedMemory.create(cfg.total_channels * job_pages * 8,
                                                tag="mailbox")),
            job_pages=job_pages, resources=self._resources)

    def add_region(self, region: Region) -> None:
        """Migrate ``region`` (regions are sent in the order they are added)."""
        # Refused here, not at migrate(), which finds out only once connected.
        region = region_to_add(region)
        if region.page_size != self.config.page_size:
            raise ConfigError(f"region {region.name!r} has page size {region.page_size}, the "
                              f"migration {self.config.page_size}")
        if any(r.name == region.name for r in self._regions):
            raise ConfigError(f"two regions named {region.name!r}")
        if len(self._regions) == MAX_REGIONS:
            raise ConfigError(f"at most {MAX_REGIONS} regions: a migration's SETUP carries "
                              f"no more")
        self._regions.append(region)

    def add_device(self, device: Device) -> None:
        """Migrate ``device``'s state stream (a :class:`fastmfd.devices.Device`)."""
        if not isinstance(device, Device):
            raise type_error("add_device(device)", "a fastmfd.Device (idstr, instance_id, "
                             "read_state(buf))", device)
        # Its ids go into SETUP (devices.wire_ids): checked now, not at migrate().
        check_device_ids("add_device", device.idstr, device.instance_id, of="device.")
        key = (device.idstr, device.instance_id)
        if any((d.idstr, d.instance_id) == key for d in self._devices):
            raise ConfigError(f"two devices {device.idstr!r} instance {device.instance_id}")
        if len(self._devices) == MAX_DEVICES:       # (as add_region's bound)
            raise ConfigError(f"at most {MAX_DEVICES} devices: a migration's SETUP carries "
                              f"no more")
        self._devices.append(device)

    def _described(self) -> str:
        cfg = self.config
        return (f"to {self.address} ({cfg.channels} RAM + {cfg.device_state_channels} "
                f"device-state channels), {len(self._regions)} region(s), "
                f"{len(self._devices)} device(s)")

    def worker_pids(self) -> list[int]:
        """The process ids of the send workers (empty outside ``with``): what a
        benchmark measures the CPU time of, beside this process's."""
        return self._workers.pids() if self._workers is not None else []

    def cancel(self, reason: str = "cancelled") -> None:
        """Fail the running migration from another thread: ``migrate()`` raises
        MigrationError(reason) promptly and the destination is sent the ERROR."""
        check_types("cancel", reason=(reason, STR))
        self._check_own_process()
        self._cancelled = reason
        session = self._session
        if session is not None:
            session.failure.fail(MigrationError(reason))

    def status(self) -> dict[str, Any]:
        """The migration's state now, from any thread — QEMU's ``query-migrate``:
        ``status`` ("none" before ``migrate()``, "setup", "active" while live
        rounds run, "device" from the stop to the end, "completed", "failed",
        "cancelled"), ``total_time_ms``, ``setup_time_ms``, ``downtime_ms`` (so far,
        once stopped), ``expected_downtime_ms`` (what is left at the measured
        bandwidth), ``rounds``, ``transferred`` (wire bytes, main channel
        included), ``throughput_bytes_per_s``, ``switchover_ack`` (None when off,
        "pending", "requested" — waiting for the destination — or "acked"); ``ram``:
        total, transferred, remaining, normal, duplicate (zero pages),
        normal_bytes, dirty_pages_rate, dirty_sync_count; ``device``:
        transferred, live_transferred, remaining, chunks; ``channels``: each
        channel's counters. Once the migration is over it agrees with its
        :class:`MigrationStats` (``transferred`` is ``wire_bytes``, and so on)."""
        with self._status_lock:
            session = self._session
            if session is None:
                return {"status": "none"}
            return session.status(cancelled=self._cancelled is not None)

    def _release(self) -> None:
        """Stop the workers and free every resource (idempotent): see close()."""
        try:
            self._resources.stop()
        finally:        # (a stop that raised half way: what it left is freed all the same)
            self._workers = None
            with self._status_lock:
                if self._session is not None:
                    self._session.freeze_status()
                self._resources.release()
            self._parts = None

    # ------------------------------------------------------------ migrate
    def migrate(self, *, live: bool = True, on_stop: Callable[[], object] | None = None,
                on_resume: Callable[[], object] | None = None,
                progress: bool = False) -> MigrationStats:
        """Run the migration; returns its :class:`MigrationStats`.

        ``live``: iterate over dirty pages while the workload runs, then stop
        (``on_stop()``) for the final copy; ``live=False`` stops first.
        ``on_resume()`` runs once the destination has loaded everything and run its own
        ``on_resume`` (the migration is over by then: what it raises fails only this
        call, as a MigrationError naming the hook).
        ``progress``: show a live progress display on the terminal.
        """
        check_types("migrate", live=(live, BOOL), on_stop=(on_stop, optional(CALLABLE)),
                    on_resume=(on_resume, optional(CALLABLE)), progress=(progress, BOOL))
        self._check_usable()
        if self._parts is None:
            raise ConfigError("use the Source as a context manager: `with Source(...) as src`")
        if not self._regions and not self._devices:
            raise ConfigError("nothing to migrate: add a region or a device first")
        check_worker_files(len(self._regions), "the source")
        with self._running("a Source performs one migration; make a new one"):
            self._session = self._resources.own_session(Sending(self._parts))
            if self._cancelled is not None:         # cancelled just before it began
                self._session.failure.fail(MigrationError(self._cancelled))
            return self._session.run(live, on_stop, on_resume, progress)
