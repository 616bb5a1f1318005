"""``fastmfd demo``: a whole live migration on this machine, then the seed's
downtime experiment.

Part 1 — live migration. A 1 GiB image (half zero pages, the rest text and
random pages; smaller where /dev/shm has less room, as in a container) in
shared memory; a separate *workload* process keeps rewriting pages and
marking them dirty while the source iterates; when the remaining dirty pages
fit the downtime limit the source stops the workload (``on_stop``), sends the
last pages and completes. The destination's copy is compared with the source's
final content.

Part 2 — the experiment of the patch series *Multifd device state transfer
support with VFIO consumer*: four devices of 100 MiB whose state can only be
read (and loaded) at an emulated per-device rate, migrated the old way
(device after device on the main channel), the new way (all devices at once
over the multifd channels), with dedicated device-state channels, and —
issue #13 — as VFIO devices that send 8/9 of their state as initial data in
the live rounds, the source stopping only once the destination acked it
loaded that data (switchover-ack). The table shows each way's downtime and
how much less it is than the old way's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing import synchronize

import numpy as np
from rich.console import Console
from rich.table import Table

from ..config import MigrationConfig
from ..devices import SyntheticDevice, VerifyLoader
from .images import fill_image, region_holds
from .loopback import NO_SECURITY, LoopbackSecurity, migrate_locally
from ..protocol.control import RegionHandle
from ..regions import Region
from ..shm import SHM_DIR, free_bytes
from ..stats import MigrationStats
from .report import stats_table
from ..units import format_bytes, format_rate
from .._engine.forkserver_start import ForkServerChild
from .._engine.processes import child_setup, mp_context

__all__ = ["run_demo", "live_migration", "seed_experiment", "WayResult"]

MiB = 1 << 20


# ------------------------------------------------------------------ workload

def _workload(handle: RegionHandle, stop: synchronize.Event, stopped: synchronize.Event,
              pages_per_burst: int, seed: int) -> None:
    """Rewrite random pages in bursts (a guest dirtying memory) until told to stop."""
    child_setup()
    region = Region.attach(handle)
    try:
        rng = np.random.default_rng(seed)
        pages = region.array.reshape(-1, region.page_size)
        generation = 0
        while not stop.wait(0.005):
            generation += 1
            picked = rng.integers(0, len(pages), pages_per_burst)
            pages[picked] = (generation % 255) + 1
            region.dirty.mark_pages(picked)
    finally:
        del pages
        region.close()
        stopped.set()


class Workload:
    """The workload process, started and stopped around a migration."""

    def __init__(self, region: Region, pages_per_burst: int = 64, seed: int = 1) -> None:
        ctx = mp_context()
        self._stop, self._stopped = ctx.Event(), ctx.Event()
        self._process = ForkServerChild(target=_workload, name="demo workload", daemon=True,
                                        args=(region.handle, self._stop, self._stopped,
                                              pages_per_burst, seed))
        try:
            self._process.start()
        except BaseException:
            # A Ctrl-C held while it started: kill it before this process exits and
            # removes the events' semaphores, which it may still be unpacking.
            if self._process.pid is not None:
                self.close()
            raise

    def stop(self) -> None:
        """Stop writing (the migration's on_stop): returns once no write can follow."""
        self._stop.set()
        self._stopped.wait(10)
        self._process.join(10)

    def close(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()


DEMO_SIZE = 1 << 30
SMALLEST_FITTED = 16 * MiB


# The device-state experiment's destination keeps the chunks that arrive ahead of
# their turn over its four channels in /dev/shm: with less free than this, its cap on
# them shrinks below what the channels carry ahead, and the experiment fails (with
# 128 MiB free it did, with 256 MiB it passed).
SEED_SHM_NEEDED = 384 * MiB


def fitted_size(free: int) -> int:
    """The image's size where none was asked for: DEMO_SIZE, or, where /dev/shm has
    ``free`` bytes too few for it (a container's is 64 MiB unless started with more),
    the largest power of two that leaves at least a third of them (the source's and the
    destination's copies take the rest), down to SMALLEST_FITTED."""
    size = DEMO_SIZE
    while 3 * size > free and size > SMALLEST_FITTED:
        size //= 2
    return size


def live_migration(console: Console, size: int | None, config: MigrationConfig,
                   security: LoopbackSecurity = NO_SECURITY) -> bool:
    """The live migration of an image of ``size`` bytes (None: :func:`fitted_size`)."""
    console.rule("[bold]Live migration")
    fitted = ""
    if size is None:
        free = free_bytes()
        size = fitted_size(free)
        if size < DEMO_SIZE:
            fitted = (f" (less than {format_bytes(DEMO_SIZE)}: {SHM_DIR} has "
                      f"{format_bytes(free)} free; --size chooses)")
    console.print(f"Image: {format_bytes(size)} in shared memory{fitted}, half zero pages, a "
                  f"quarter text, a quarter random; a workload process keeps rewriting pages"
                  + (f"; channels protected by {security.label}." if security.label else "."))
    region = Region.create("pc.ram", size, page_size=config.page_size)
    workload = None
    try:
        fill_image(region, "mixed")
        workload = Workload(region)
        result = migrate_locally(
            config, [region], live=True, on_stop=workload.stop, progress=True,
            check=lambda dst: region_holds(dst.regions["pc.ram"], region.array),
            security=security)
    finally:
        if workload is not None:
            workload.close()
        region.close()
    verdict = ("[green]identical[/] to the source's final content" if result.checked
               else "[red]DIFFERENT[/] from the source's final content")
    table = stats_table(result.stats, channels=f"{config.channels} × {config.compression}",
                        downtime_limit=config.downtime_limit, verdict=verdict)
    console.print(table)
    return bool(result.checked)


# ------------------------------------------------------------------ seed experiment

@dataclass(frozen=True)
class WayResult:
    way: str
    channels: str
    downtime_s: float


def _migrate_devices(config: MigrationConfig, ndevices: int, device_size: int,
                     rate: float, ram_size: int, security: LoopbackSecurity) -> MigrationStats:
    region = Region.create("pc.ram", ram_size, page_size=config.page_size)
    # With switchover-ack, the devices are VFIO devices with initial data (PRE_COPY):
    # 8/9 of their state, as issue #13's 32 MiB of 36.
    precopy = device_size * 8 // 9 if config.switchover_ack else 0
    try:
        fill_image(region, "mixed")
        devices = [SyntheticDevice(f"0000:00:0{i + 1}.0/vfio", 0, device_size, read_rate=rate,
                                   seed=i, precopy_size=precopy) for i in range(ndevices)]
        loaders = {(d.idstr, 0): VerifyLoader(device_size, seed=i, write_rate=rate,
                                              precopy_size=precopy)
                   for i, d in enumerate(devices)}
        result = migrate_locally(
            config, [region], devices=devices, loaders=loaders, live=True,
            check=lambda dst: region_holds(dst.regions["pc.ram"], region.array),
            security=security)
    finally:
        region.close()
    if not result.checked:
        raise AssertionError("the destination's RAM differs from the source's")
    return result.stats


def seed_experiment(console: Console, *, ndevices: int = 4, device_size: int = 100 * MiB,
                    rate: float = 200 * MiB, ram_size: int = 64 * MiB, channels: int = 4,
                    security: LoopbackSecurity = NO_SECURITY) -> list[WayResult]:
    console.rule("[bold]Device state over multifd: the seed's downtime experiment")
    console.print(f"{ndevices} devices × {format_bytes(device_size)} of state, each read and "
                  f"loaded at {format_rate(rate)} (an emulated VFIO data fd), plus "
                  f"{format_bytes(ram_size)} of RAM"
                  + (f"; {security.label} on every connection." if security.label else "."))
    ways = [
        ("old way: main channel, device after device",
         MigrationConfig(channels=channels, channel_header=False), f"{channels}"),
        ("new way: multifd channels, all devices at once",
         MigrationConfig(channels=channels), f"{channels} mixed"),
        ("new way, dedicated device-state channels",
         MigrationConfig(channels=channels // 2, device_state_channels=channels - channels // 2),
         f"{channels // 2} RAM + {channels - channels // 2} device"),
        ("new way + precopy + switchover-ack",
         MigrationConfig(channels=channels, switchover_ack=True), f"{channels} mixed"),
    ]
    results = []
    for label, config, channel_text in ways:
        stats = _migrate_devices(config, ndevices, device_size, rate, ram_size, security)
        results.append(WayResult(label, channel_text, stats.downtime_s))
    old = results[0].downtime_s
    table = Table(title="Downtime by way of sending device state")
    for column in ("way", "channels", "downtime", "vs old way"):
        table.add_column(column, justify="left" if column == "way" else "right")
    for r in results:
        saved = (1 - r.downtime_s / old) * 100
        change = "—" if r is results[0] else (
            f"{saved:.0f} % less" if saved >= 0 else f"{-saved:.0f} % more")
        table.add_row(r.way, r.channels, f"{r.downtime_s * 1000:.0f} ms", change)
    console.print(table)
    console.print("The seed measured about 2100 ms → 1100 ms (48 % less) with 4 devices and "
                  "~400 MiB; reading the devices fully in parallel can cut up to 75 %. With "
                  "precopy, 8/9 of each device's state is initial data sent while the "
                  "workload runs, and the source stops once the destination acked it loaded.")
    return results


def run_demo(*, size: int | None = None, config: MigrationConfig | None = None,
             devices: bool = True, device_size: int = 100 * MiB, rate: float = 200 * MiB,
             console: Console | None = None, security: LoopbackSecurity = NO_SECURITY) -> bool:
    """Run both parts (the live migration of ``size`` bytes, default 1 GiB or what
    /dev/shm fits, with ``config``, default 2 channels); True when the destination
    matched the source."""
    console = console or Console()
    started = time.monotonic()
    ok = live_migration(console, size, config or MigrationConfig(channels=2), security)
    if devices and (free := free_bytes()) < SEED_SHM_NEEDED:
        console.print(f"[yellow]The device-state experiment is left out: it needs "
                      f"{format_bytes(SEED_SHM_NEEDED)} of {SHM_DIR}, which has "
                      f"{format_bytes(free)} free (a container: docker run --shm-size=1g).")
    elif devices:
        seed_experiment(console, device_size=device_size, rate=rate, security=security)
    console.print(f"[dim]demo finished in {time.monotonic() - started:.1f} s")
    return ok
