"""Compare channel and compression settings, and peers: ``fastmfd bench``.

Every way of moving an image is a *trial* with the same three steps, so the
command and the pytest-benchmark suite (``benchmarks/``) time exactly the
same thing::

    trial = make_trial(setting, image)   processes started, connections made (not timed)
    measurement = trial.run()            the timed part: the whole transfer
    trial.finish()                       destination == source checked, everything freed
                                         (trial.close() frees without checking)

    bench matrix: for each repeat ─▶ for each setting ─▶ one trial
      (repeats are the outer loop, so drift on a busy machine hits every setting alike)
                      │
                      ▼
    Result per setting (best and median time) ─▶ rich table + throughput bar chart, JSON

Methods: ``fastmfd`` (this library, ``migrate(live=False)``), ``sendall``
(one plain socket between two processes, :mod:`fastmfd.bench_peers`) and
``qemu`` (a real QEMU multifd migration of a paused guest whose RAM is the
image, :mod:`fastmfd.bench_peers`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from ...config import COMPRESSION_METHODS, MigrationConfig
from ...errors import ConfigError, MigrationError
from ..images import IMAGE_KINDS, Image
from ..loopback import LoopbackMigration
from ...regions import Region
from ..units import format_bytes, format_rate, parse_size

__all__ = ["Setting", "Measurement", "Result", "FastmfdTrial", "make_trial", "run_once",
           "run_matrix", "wait_until_idle", "render", "add_arguments",
           "cli_main"]

METHODS = ("fastmfd", "sendall", "qemu")
PEERS = ("sendall", "qemu")
LOOPBACK = "tcp:127.0.0.1:0"


@dataclass(frozen=True)
class Setting:
    """One way to move an image: a column of the comparison."""
    method: str = "fastmfd"
    channels: int = 2
    compression: str = "none"
    level: int = 1

    @property
    def compression_label(self) -> str:
        """``none``, ``zlib-1``, ``zstd-3``..."""
        return self.compression if self.compression == "none" else \
            f"{self.compression}-{self.level}"

    @property
    def label(self) -> str:
        if self.method == "sendall":
            return "sendall (1 socket)"
        return f"{self.method} {self.channels}ch {self.compression_label}"

    def config(self) -> MigrationConfig:
        """The fastmfd configuration of this setting."""
        return MigrationConfig(channels=self.channels, compression=self.compression,
                               compression_level=self.level if self.compression != "none"
                               else 1)


@dataclass(frozen=True)
class Measurement:
    """One timed transfer."""
    seconds: float              # wall clock of the timed part
    image_bytes: int            # bytes of memory moved
    wire_bytes: int | None      # bytes written on every connection (None: not known)
    details: dict = field(default_factory=dict)   # what else the method measured

    @property
    def throughput(self) -> float:
        """Image bytes per second."""
        return self.image_bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Result:
    """Every measurement of one setting on one image."""
    setting: Setting
    image: str
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def best(self) -> Measurement:
        return min(self.measurements, key=lambda m: m.seconds)

    @property
    def median_seconds(self) -> float:
        return statistics.median(m.seconds for m in self.measurements)

    def as_dict(self) -> dict:
        best = self.best
        return {
            "image": self.image, "method": self.setting.method, "label": self.setting.label,
            "channels": self.setting.channels, "compression": self.setting.compression,
            "level": self.setting.level, "image_bytes": best.image_bytes,
            "best_s": best.seconds, "median_s": self.median_seconds,
            "throughput_bytes_per_s": best.throughput, "wire_bytes": best.wire_bytes,
            "runs_s": [m.seconds for m in self.measurements], "details": best.details,
        }


# ------------------------------------------------------------------ settling

def _cpu_ns(pids) -> int:
    """CPU time used so far by every thread of ``pids`` (those that have exited count 0)."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                    total += int(stat.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wait_until_idle(pids, *, window: float = 0.02, timeout: float = 10.0) -> None:
    """Return once ``pids`` used under 5% of a CPU for ``window`` seconds (or at ``timeout``).

    A peer's processes (QEMU, the sendall pair) start in the background; on a
    small machine the tail of that start-up would otherwise run during the
    timed transfer. (fastmfd's own workers report ready before the Source or
    Destination is entered, so its trials need no wait.)
    """
    deadline = time.monotonic() + timeout
    before = _cpu_ns(pids)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = _cpu_ns(pids)
        if now - before < 0.05 * window * 1e9:
            return
        before = now


# ------------------------------------------------------------------ fastmfd trial

class FastmfdTrial:
    """One fastmfd migration of ``image`` over loopback TCP, prepared ahead of timing.

    A :class:`~fastmfd.loopback.LoopbackMigration` underneath: entering the
    Destination and the Source starts their worker processes (one per
    channel on each side), as a long-running migration service would have
    them; :meth:`run` is the migration alone. ``devices`` are ``(device,
    loader)`` pairs; :meth:`finish` returns what the loaders returned, keyed
    ``(idstr, instance_id)``.

    By default the destination creates its region when the source announces
    it, so the migration pays for fresh memory, as a new QEMU does.
    ``prealloc=True`` receives into a region allocated and faulted in
    beforehand (QEMU: ``prealloc=on``), which leaves the transport alone.
    """

    def __init__(self, image: Image, config: MigrationConfig, devices=(), *,
                 prealloc: bool = False) -> None:
        self.image = image
        self._target: Region | None = None
        self._migration: LoopbackMigration | None = None
        try:
            if prealloc:
                self._target = Region.create(image.region.name, image.size,
                                             page_size=image.region.page_size)
                self._target.array[::image.region.page_size] = 0     # allocate, map
            self._migration = LoopbackMigration(
                config, [image.region], devices=[d for d, _ in devices],
                loaders={(d.idstr, d.instance_id): loader for d, loader in devices},
                receive_into=[self._target] if prealloc else [], address=LOOPBACK)
        except BaseException:
            self.close()
            raise

    def run(self) -> Measurement:
        started = time.perf_counter()
        stats = self._migration.run(live=False)
        seconds = time.perf_counter() - started
        return Measurement(seconds, stats.ram_bytes, stats.wire_bytes, {
            "total_time_s": stats.total_time_s, "setup_time_s": stats.setup_time_s,
            "downtime_s": stats.downtime_s, "normal_pages": stats.normal_pages,
            "zero_pages": stats.zero_pages, "device_bytes": stats.device_bytes})

    def finish(self) -> dict:
        """Check the destination holds the image; return the loaders' results; free all."""
        def check(result) -> dict:
            if not self.image.matches(result.regions[self.image.region.name].buffer):
                raise MigrationError(f"the destination's region differs from the "
                                     f"{self.image.kind} image")
            return result.devices
        try:
            return self._migration.finish(check).checked
        finally:
            self.close()

    def close(self) -> None:
        """Stop every process and free every segment (idempotent)."""
        if self._migration is not None:
            self._migration.close()
            self._migration = None
        if self._target is not None:
            self._target.close()
            self._target = None


def make_trial(setting: Setting, image: Image, *, qemu_binary: str | None = None,
               prealloc: bool = False):
    """A prepared trial of ``setting`` moving ``image`` (see the module docstring).

    ``prealloc``: the destination's memory is allocated and faulted in before
    timing, for every method alike (see :class:`FastmfdTrial`).
    """
    if setting.method == "fastmfd":
        return FastmfdTrial(image, setting.config(), prealloc=prealloc)
    from . import peers
    if setting.method == "sendall":
        return peers.SendallTrial(image, prealloc=prealloc)
    if setting.method == "qemu":
        return peers.QemuTrial(image, setting.channels, setting.compression,
                                     setting.level, binary=qemu_binary, prealloc=prealloc)
    raise ConfigError(f"unknown method {setting.method!r}; choose one of {METHODS}")


def run_once(setting: Setting, image: Image, **kwargs) -> Measurement:
    """Prepare, time and check one transfer."""
    trial = make_trial(setting, image, **kwargs)
    try:
        measurement = trial.run()
    except BaseException:
        trial.close()
        raise
    trial.finish()
    return measurement


def run_matrix(settings: list[Setting], images: list[Image], repeat: int = 1,
               on_measurement=None, **kwargs) -> list[Result]:
    """Time every setting on every image ``repeat`` times; one Result per pair."""
    results = {(s, im.kind): Result(s, im.kind) for im in images for s in settings}
    for number in range(repeat):
        for image in images:
            for setting in settings:
                measurement = run_once(setting, image, **kwargs)
                results[setting, image.kind].measurements.append(measurement)
                if on_measurement is not None:
                    on_measurement(image.kind, setting, number, measurement)
    return list(results.values())


# ------------------------------------------------------------------ report

BAR_WIDTH = 40


def render(results: list[Result], console, *, note: str = "") -> None:
    """Print one table and one throughput bar chart per image (``note`` in the titles)."""
    from rich.table import Table
    from rich.text import Text

    for kind in dict.fromkeys(r.image for r in results):
        rows = [r for r in results if r.image == kind]
        fastest = min(r.best.seconds for r in rows)
        peer = next((r for r in rows if r.setting.method == "sendall"), None)
        qemu = {(r.setting.channels, r.setting.compression): r.best.seconds
                for r in rows if r.setting.method == "qemu"}
        runs = len(rows[0].measurements)
        title = f"{kind} image, {format_bytes(rows[0].best.image_bytes)}{note}"
        table = Table(title=f"{title} (best of {runs})" if runs > 1 else title,
                      title_justify="left")
        table.add_column("setting")
        table.add_column("time", justify="right")
        table.add_column("throughput", justify="right")
        table.add_column("wire bytes", justify="right")
        table.add_column("time / fastest", justify="right")
        if peer is not None:
            table.add_column("speed vs sendall", justify="right")
        if qemu:
            table.add_column("speed vs QEMU", justify="right")
        for r in rows:
            best = r.best
            cells = [r.setting.label, f"{best.seconds * 1000:.0f} ms",
                     format_rate(best.throughput),
                     "-" if best.wire_bytes is None else format_bytes(best.wire_bytes),
                     f"{best.seconds / fastest:.2f}x"]
            if peer is not None:
                cells.append(f"{peer.best.seconds / best.seconds:.2f}x")
            if qemu:
                # fastmfd's rows: QEMU's time in the same cell over fastmfd's
                same = qemu.get((r.setting.channels, r.setting.compression))
                cells.append(f"{same / best.seconds:.2f}x"
                             if r.setting.method == "fastmfd" and same else "")
            table.add_row(*cells, style="bold" if best.seconds == fastest else None)
        console.print(table)

        top = max(r.best.throughput for r in rows)
        width = max(len(r.setting.label) for r in rows)
        console.print(f"throughput, {kind} image")
        for r in rows:
            fill = r.best.throughput / top * BAR_WIDTH if top else 0
            bar = "█" * int(fill) + ("▌" if fill - int(fill) >= 0.5 else "")
            line = Text(f"  {r.setting.label:<{width}} ")
            line.append(f"{bar:<{BAR_WIDTH}}", style="cyan")
            line.append(f" {format_rate(r.best.throughput)}")
            console.print(line)
        console.print()


# ------------------------------------------------------------------ command line

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         f"channel counts") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"channel counts must be >= 1, not {text!r}")
    return values


def _choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad) or repr(text)}: choose from {', '.join(choices)}")
        return values
    return parse


def _size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    if size % 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 4 KiB pages")
    return size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=_size, default=256 << 20,
                        help="image size, e.g. 64M, 1G (default 256M)")
    parser.add_argument("--channels", type=_int_list, default=[1, 2, 4],
                        help="comma-separated channel counts (default 1,2,4)")
    parser.add_argument("--compression", type=_choice_list(COMPRESSION_METHODS),
                        default=list(COMPRESSION_METHODS),
                        help="comma-separated methods from none, zlib, zstd (default all)")
    parser.add_argument("--level", type=_positive, default=1,
                        help="zlib/zstd compression level (default 1)")
    parser.add_argument("--image", type=_choice_list(IMAGE_KINDS), default=["random"],
                        help="random (incompressible), text, mixed (the demo's: half zero "
                             "pages, a quarter text, a quarter random), halftext (half zero "
                             "pages, half text) or zero; comma-separated for several "
                             "(default random)")
    parser.add_argument("--repeat", type=_positive, default=1,
                        help="runs per setting; the table shows the best (default 1)")
    parser.add_argument("--peer", action="append", choices=PEERS, default=[],
                        help="also time a peer on the same image: sendall (one plain "
                             "socket) or qemu (real QEMU multifd, needs qemu-system-x86_64); "
                             "repeatable")
    parser.add_argument("--qemu-binary", default=None, metavar="PATH",
                        help="QEMU to run for --peer qemu (default: qemu-system-x86_64 "
                             "on PATH)")
    parser.add_argument("--prealloc", action="store_true",
                        help="allocate and fault in the destination's memory before timing "
                             "(QEMU: prealloc=on): times the transport without the cost of "
                             "fresh memory")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write every measurement to FILE as JSON")


def settings_from_args(args: argparse.Namespace) -> list[Setting]:
    """The settings to time, in run (and table) order: the sendall peer first, then
    each (compression, channels) cell with its QEMU peer right after it."""
    methods = ["fastmfd"] + (["qemu"] if "qemu" in args.peer else [])
    settings = [Setting("sendall", 1, "none")] if "sendall" in args.peer else []
    settings += [Setting(method, ch, comp, args.level)
                 for comp in args.compression for ch in args.channels for method in methods]
    for setting in settings:
        if setting.method != "sendall":
            setting.config()            # a bad level fails here, before any work
    return settings


def cli_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 120)
    log = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    settings = settings_from_args(args)
    if "qemu" in args.peer:
        from .peers import find_qemu
        args.qemu_binary = find_qemu(args.qemu_binary)
    images: list[Image] = []
    try:
        for kind in args.image:
            log.print(f"making a {format_bytes(args.size)} {kind} image ...")
            images.append(Image.create(kind, args.size))

        def progress(kind, setting, number, m):
            log.print(f"  {kind:<6} {setting.label:<24} run {number + 1}: "
                      f"{m.seconds * 1000:8.1f} ms  {format_rate(m.throughput)}  verified")

        results = run_matrix(settings, images, args.repeat, progress,
                             qemu_binary=args.qemu_binary, prealloc=args.prealloc)
    finally:
        for image in images:
            image.close()
    render(results, console, note=", destination preallocated" if args.prealloc else "")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([r.as_dict() for r in results], out, indent=2)
            out.write("\n")
    return 0
