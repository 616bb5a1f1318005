"""The comparison: settings × images × repeats, one trial each.

::

    for each repeat ─▶ for each image ─▶ for each setting ─▶ make_trial ─▶ run ─▶ finish
      (repeats are the outer loop, so drift on a busy machine hits every setting alike;
       odd repeats run the settings in reverse, so no side always runs first — on fresh
       memory whoever touches it first pays — finish() frees each trial's memory
       before the next starts, and the machine's free memory is warmed right before
       each timed run: see warm_free_memory)
                      │
                      ▼
    Result per (setting, image): every Measurement (CPU seconds by side, foreign load);
    median, min, first (cold) run and spread
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ...config import Compression, MigrationConfig
from ...errors import ConfigError
from ..images import Image
from ..loopback import NO_SECURITY, LoopbackSecurity
from .fastmfd_trial import FastmfdTrial
from .link import EmulatedLink
from .peers import QemuTrial, SendallTrial
from .qemu_cells import FastmfdToQemuTrial, QemuToFastmfdTrial
from .trial import FOREIGN_LOAD_FLAG, CpuMeter, Measurement, Trial, warm_free_memory

__all__ = ["METHODS", "PEERS", "QEMU_METHODS", "TLS_METHODS", "Setting", "RunStatistics",
           "Result", "make_trial", "run_once", "run_matrix"]

METHODS = ("fastmfd", "sendall", "qemu", "qemu-to-fastmfd", "fastmfd-to-qemu")
# --peer qemu: QEMU -> QEMU, and fastmfd as either end of a QEMU migration.
QEMU_METHODS = ("qemu", "qemu-to-fastmfd", "fastmfd-to-qemu")
_QEMU_TRIALS: dict[str, type[QemuTrial | QemuToFastmfdTrial | FastmfdToQemuTrial]] = {
    "qemu": QemuTrial, "qemu-to-fastmfd": QemuToFastmfdTrial,
    "fastmfd-to-qemu": FastmfdToQemuTrial}
PEERS = ("sendall", "qemu")
# The methods whose connections go in TLS when the bench's do (all but sendall's).
TLS_METHODS = ("fastmfd", *QEMU_METHODS)


@dataclass(frozen=True)
class Setting:
    """One way to move an image: a column of the comparison."""
    method: str = "fastmfd"
    channels: int = 2
    compression: Compression = "none"
    level: int = 1

    @property
    def compression_label(self) -> str:
        """``none``, ``auto``, ``zlib-1``, ``zstd-3``..."""
        return self.compression if self.compression in ("none", "auto") else \
            f"{self.compression}-{self.level}"

    @property
    def label(self) -> str:
        if self.method == "sendall":
            return "sendall (1 socket)"
        return f"{self.method} {self.channels}ch {self.compression_label}"

    def config(self) -> MigrationConfig:
        """The fastmfd configuration of this setting."""
        return MigrationConfig(channels=self.channels, compression=self.compression,
                               compression_level=self.level if self.compression in ("zlib", "zstd")
                               else 1)


class RunStatistics:
    """What the runs of one thing say, in the order they ran (``measurements``)."""
    measurements: Sequence[Measurement]

    @property
    def best(self) -> Measurement:
        return min(self.measurements, key=lambda m: m.seconds)

    @property
    def median_seconds(self) -> float:
        return statistics.median(m.seconds for m in self.measurements)

    @property
    def first_seconds(self) -> float:
        """The first (cold) run: a user migrates once."""
        return self.measurements[0].seconds

    @property
    def spread(self) -> float:
        """Slowest run over fastest."""
        return max(m.seconds for m in self.measurements) / self.best.seconds


@dataclass
class Result(RunStatistics):
    """Every measurement of one setting on one image."""
    setting: Setting
    image: str
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The benchmark's name in JSON results and comparisons: image and setting."""
        return f"{self.image} {self.setting.label}"

    @property
    def median_throughput(self) -> float:
        return self.best.image_bytes / self.median_seconds

    def median_cpu_s(self, side: str) -> float | None:
        """Median CPU seconds of ``side``'s processes (None if not measured)."""
        values = [m.details["cpu_s"][side] for m in self.measurements
                  if side in m.details.get("cpu_s", {})]
        return statistics.median(values) if values else None

    @property
    def loaded_runs(self) -> int:
        """Runs beside a foreign load above FOREIGN_LOAD_FLAG cores."""
        return sum(m.details.get("foreign_cores", 0) > FOREIGN_LOAD_FLAG
                   for m in self.measurements)


def make_trial(setting: Setting, image: Image, *, qemu_binary: str | None = None,
               prealloc: bool = False, security: LoopbackSecurity = NO_SECURITY,
               link: EmulatedLink | None = None) -> Trial:
    """A prepared trial of ``setting`` moving ``image`` (see :mod:`.trial`).

    ``prealloc``: the destination's memory is allocated and faulted in before
    timing, for every method alike (see :class:`.FastmfdTrial`). ``security``:
    TLS and/or the shared key for fastmfd's channels, and its TLS for QEMU's
    (``listen --qemu`` and ``send --qemu`` in TLS too). ``link``: every
    method's destination is on the far side of this emulated link (default:
    loopback).
    """
    if setting.method == "fastmfd":
        return FastmfdTrial(image, setting.config(), prealloc=prealloc, security=security,
                            link=link)
    if setting.method == "sendall":
        return SendallTrial(image, prealloc=prealloc, link=link)
    if setting.method in _QEMU_TRIALS:
        return _QEMU_TRIALS[setting.method](image, setting.channels, setting.compression,
                                            setting.level, binary=qemu_binary,
                                            prealloc=prealloc, link=link, security=security)
    raise ConfigError(f"unknown method {setting.method!r}; choose one of {METHODS}")


def run_once(setting: Setting, image: Image, *, warm_memory: bool = True,
             **kwargs: Any) -> Measurement:
    """Prepare, time and check one transfer. ``warm_memory``: the machine's free
    memory is warmed right before timing (:func:`.warm_free_memory`). On an
    emulated link, the bytes its source side carried are kept as
    ``details["link_bytes"]``."""
    trial = make_trial(setting, image, **kwargs)
    link: EmulatedLink | None = kwargs.get("link")
    try:
        if warm_memory:
            warm_free_memory(image.size)
        carried = link.sent_bytes() if link is not None else 0
        meter = CpuMeter(trial.pids(), trial.pids_complete)
        measurement = trial.run()
        measurement.details.update(meter.stop())
        if link is not None:
            measurement.details["link_bytes"] = link.sent_bytes() - carried
    except BaseException:
        trial.close()
        raise
    trial.finish()
    return measurement


def run_matrix(settings: list[Setting], images: list[Image], repeat: int = 1,
               on_measurement: Callable[[str, Setting, int, Measurement], None] | None = None,
               **kwargs: Any) -> list[Result]:
    """Time every setting on every image ``repeat`` times; one Result per pair
    (``kwargs``: :func:`run_once`'s)."""
    results = {(s, im.kind): Result(s, im.kind) for im in images for s in settings}
    for number in range(repeat):
        for image in images:
            for setting in (settings if number % 2 == 0 else settings[::-1]):
                measurement = run_once(setting, image, **kwargs)
                results[setting, image.kind].measurements.append(measurement)
                if on_measurement is not None:
                    on_measurement(image.kind, setting, number, measurement)
    return list(results.values())
