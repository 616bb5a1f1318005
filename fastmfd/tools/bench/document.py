"""``fastmfd bench --json FILE``: the results as one JSON document in
pytest-benchmark's layout, so a result says where, when and from which code
it was measured, and tools that read pytest-benchmark files read it::

    {"machine_info": {"node", "machine", "processor", "cpu_count", "system",
                      "release", "python_version", "python_implementation"},
     "commit_info": {"id", "dirty", "project", "branch"},   # id None: not a checkout
     "datetime": "2026-12-03T09:10:00+00:00", "version": "<fastmfd's>",
     "benchmarks": [{"name", "fullname", "group",  # group: image, size, conditions
                     "stats": {"min", "max", "mean", "stddev", "rounds", "median",
                               "iqr", "q1", "q3", "iqr_outliers", "stddev_outliers",
                               "outliers", "ld15iqr", "hd15iqr", "ops", "total",
                               "iterations", "data"},      # seconds, as pytest-benchmark's
                     "extra_info": {"image", "compression", "channels", "peer", "link",
                                    "tls", "prealloc", "warm_memory", "image_bytes",
                                    "qemu" (a cell with QEMU: its -version),
                                    "throughput_bytes_per_s",
                                    "first_s", "spread", "loaded_runs",
                                    "runs": [{"seconds", "cpu_s", ...}], ...}}]}

``--compare OLD.json`` pairs a result with OLD.json's of the same name (image
and setting) only when image_bytes, link, tls, prealloc, warm_memory and (a cell
with QEMU) the QEMU version match too (:class:`RunConditions`): a 64 MiB run
beside a 1 GiB one showed a tenfold "speed-up" for moving less. A link is
matched by its rate and delay, however typed (1gbit is 1000mbit).

The output files are checked before the run
(:func:`fastmfd.tools.new_files.check_new_file`): a path that exists or cannot
be written fails the command at once, not after every migration.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...errors import ConfigError
from ...units import format_bytes
from ..input_files import open_regular_file
from .link import same_link
from .matrix import QEMU_METHODS, TLS_METHODS

if TYPE_CHECKING:
    from .matrix import Result, Setting

__all__ = ["RunConditions", "Baseline", "document", "load_baseline", "check_comparable",
           "shown_condition", "emulated"]

LINK = "loopback TCP"           # what carries the bytes without --link
EMULATED = re.compile(r"^emulated (\S+) \(veth, tc\)$")     # with --link (:func:`emulated`)
# A results file holds a few KiB per setting; past this it is not one (and
# reading it whole is not free).
MAX_COMPARE_BYTES = 64 << 20


@dataclass(frozen=True)
class RunConditions:
    """What one bench run held alike for all its cells beside the image and setting (which
    the names say): ``tls``: fastmfd's (and QEMU's) protection, ``prealloc``, ``warm_memory``
    (free memory warmed before each run), ``link``: what carried the bytes, ``qemu``: the
    first line of ``-version`` of the QEMU that ran (``--peer qemu``)."""
    tls: str | None = None
    prealloc: bool = False
    warm_memory: bool = True
    link: str = LINK
    qemu: str | None = None

    def of(self, setting: Setting, image_bytes: int) -> dict[str, Any]:
        """The extra_info fields --compare matches of one cell moving ``image_bytes``
        (sendall has no TLS; a cell with QEMU at either end says which QEMU: the same
        name was a QEMU 7.2 migration in one file and a QEMU 10 one in another)."""
        fields = {"image_bytes": image_bytes, "link": self.link,
                  "tls": self.tls if setting.method in TLS_METHODS else None,
                  "prealloc": self.prealloc, "warm_memory": self.warm_memory}
        if setting.method in QEMU_METHODS:
            fields["qemu"] = self.qemu
        return fields

    def group(self, setting: Setting, image: str, image_bytes: int) -> str:
        """The pytest-benchmark group of a result: the image, its size and what else of
        :meth:`of` was not the default, so ``pytest-benchmark compare OLD.json NEW.json``
        shows results measured alike in one table (a 16 MiB run beside a 128 MiB one was
        rated 3.29x slower in the group of its image; a QEMU cell names its QEMU)."""
        fields = self.of(setting, image_bytes)
        parts = [f"{image} {format_bytes(image_bytes)}"]
        if fields["link"] != LINK:
            parts.append(fields["link"])
        if fields["tls"]:
            parts.append(fields["tls"])
        if fields["prealloc"]:
            parts.append("destination preallocated")
        if not fields["warm_memory"]:
            parts.append("free memory not warmed")
        if fields.get("qemu"):
            parts.append(fields["qemu"])
        return ", ".join(parts)


def emulated(link: str) -> str:
    """The ``link`` condition of a run over the emulated link typed ``link``, in the link's
    one spelling (:func:`.link.same_link`): runs over 1gbit and 1000mbit are compared
    (:func:`_baseline` reads an earlier file's as typed likewise)."""
    return f"emulated {same_link(link)} (veth, tc)"


# How a field of RunConditions.of reads in a note on two results that differ in it.
_FIELD_NAMES = {"image_bytes": "image", "link": "link", "tls": "TLS",
                "prealloc": "destination preallocated", "warm_memory": "free memory warmed",
                "qemu": "QEMU"}


@dataclass(frozen=True)
class Baseline:
    """One result of an earlier run: its best time and what it was measured under
    (the fields of :meth:`RunConditions.of` its extra_info has)."""
    seconds: float
    conditions: dict[str, Any]
    runs: int | None = None     # how many runs its best is of (None: not said)

    def differences(self, now: dict[str, Any]) -> str:
        """Why this result is not comparable with one measured under ``now``
        (:meth:`RunConditions.of`), one line; "" when it is. A field the earlier file
        lacks (a pytest-benchmark file, an older bench) differs: it may have been anything."""
        before = self.conditions
        unknown = [_FIELD_NAMES[key] for key in now if key not in before]
        return "; ".join([f"{_FIELD_NAMES[key]}: {shown_condition(key, before[key])} before, "
                          f"{shown_condition(key, value)} now" for key, value in now.items()
                          if key in before and before[key] != value]
                         + ([f"not recorded before: {', '.join(unknown)}"] if unknown else []))


def shown_condition(key: str, value: Any) -> str:
    """A condition's value as a "before"/"now" line says it (``bench --compare``'s and
    the benchmark suites' compare hook's): a size of ``*_bytes`` in binary units, a
    flag yes or no, anything else as text cut at 60 characters (a saved file may hold
    anything)."""
    # (an int past a float's range made format_bytes raise OverflowError, a traceback)
    if key.endswith("bytes") and isinstance(value, int) and not isinstance(value, bool) \
            and abs(value) < 1 << 80:
        return format_bytes(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = "none" if value is None else str(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def load_baseline(path: str) -> dict[str, Baseline]:
    """``name -> Baseline`` of the benchmarks in a document :func:`document` wrote
    (or pytest-benchmark); read before the run, so a bad file costs no run.
    Only a regular file of at most MAX_COMPARE_BYTES is read."""
    what = f"--compare {path}"
    fd, _ = open_regular_file(path, what)
    try:
        with os.fdopen(fd, "rb") as f:
            text = f.read(MAX_COMPARE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror or exc}") from None
    if len(text) > MAX_COMPARE_BYTES:
        raise ConfigError(f"{what}: larger than {MAX_COMPARE_BYTES >> 20} MiB: not a results "
                          f"file written by `fastmfd bench --json`")
    try:
        return {b["name"]: _baseline(b) for b in json.loads(text)["benchmarks"]}
    # RecursionError: arrays nested deeper than the parser's stack.
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
            OverflowError) as exc:
        raise ConfigError(f"{what}: not a results file written by "
                          f"`fastmfd bench --json` ({type(exc).__name__}: {exc})") from None


def _baseline(benchmark: dict[str, Any]) -> Baseline:
    extra = benchmark.get("extra_info", {})
    if not isinstance(extra, dict):
        raise TypeError(f"extra_info of {benchmark['name']!r} is not an object")
    rounds = benchmark["stats"].get("rounds")
    best = benchmark["stats"]["min"]
    # A best time is seconds > 0: NaN, -1 or "0.5" (float() takes a string) made a table
    # of "nan ms" and "-52.88x", and an int past a float's range (float() raises
    # OverflowError) a traceback.
    if not isinstance(best, (int, float)) or isinstance(best, bool) or \
            not 0 < float(best) < math.inf:
        raise ValueError(f"the best time of {repr(benchmark['name'])[:60]} is "
                         f"{repr(best)[:40]}, not seconds")
    conditions = {key: extra[key] for key in _FIELD_NAMES if key in extra}
    typed = EMULATED.match(conditions["link"]) if isinstance(conditions.get("link"), str) \
        else None
    if typed is not None:
        conditions["link"] = emulated(typed.group(1))
    return Baseline(float(best), conditions,
                    rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else None)


def check_comparable(baseline: dict[str, Baseline], cells: list[tuple[str, dict[str, Any]]],
                     path: str) -> None:
    """Refuse ``--compare path`` before the run when none of this run's ``cells``
    (name, :meth:`RunConditions.of`) pairs with a result in it: the comparison
    would show nothing."""
    shared = [(name, baseline[name].differences(now)) for name, now in cells
              if name in baseline]
    if any(not why for _, why in shared):
        return
    if not shared:
        raise ConfigError(f"--compare {path}: no result in it has the name (image and "
                          f"setting) of one of this run's, e.g. {cells[0][0]!r}")
    name, why = shared[0]
    raise ConfigError(f"--compare {path}: no result in it was measured like this run's: "
                      f"{name!r}: {why}")


def document(results: list[Result], conditions: RunConditions) -> dict[str, Any]:
    """The JSON document of ``results`` (:class:`.matrix.Result`, in table order),
    all measured under ``conditions``."""
    return {
        "machine_info": machine_info(),
        "commit_info": commit_info(),
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "benchmarks": [_benchmark(result, conditions) for result in results],
    }


def _benchmark(result: Result, conditions: RunConditions) -> dict[str, Any]:
    best = result.best
    setting = result.setting
    name = result.name
    return {
        "name": name, "fullname": f"fastmfd bench::{name}",
        "group": conditions.group(setting, result.image, best.image_bytes),
        "stats": run_stats([m.seconds for m in result.measurements]),
        "extra_info": {
            "image": result.image, "compression": setting.compression_label,
            "channels": setting.channels, "peer": setting.method,
            **conditions.of(setting, best.image_bytes),
            "throughput_bytes_per_s": best.throughput,
            "median_throughput_bytes_per_s": result.median_throughput,
            "first_s": result.first_seconds, "spread": round(result.spread, 3),
            "wire_bytes": best.wire_bytes, "loaded_runs": result.loaded_runs,
            "runs": [{"seconds": m.seconds, **m.details} for m in result.measurements],
        },
    }


def run_stats(runs: list[float]) -> dict[str, Any]:
    """pytest-benchmark's statistics of ``runs`` (seconds, one iteration each),
    field for field as its ``Stats`` computes them: its quartiles (Wikipedia's
    methods 2 and 3), Tukey's fences at 1.5 IQR (``ld15iqr``/``hd15iqr``: the
    runs nearest inside them), ``outliers``: "beyond one stddev;beyond the fences"."""
    data = sorted(runs)
    rounds, total, mean = len(runs), sum(runs), statistics.fmean(runs)
    stddev = statistics.stdev(runs) if rounds > 1 else 0.0
    q1, q3 = _quartiles(data)
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    stddev_outliers = sum(not mean - stddev <= run <= mean + stddev for run in runs)
    iqr_outliers = sum(not low <= run <= high for run in runs)
    return {"min": data[0], "max": data[-1], "mean": mean, "stddev": stddev, "rounds": rounds,
            "median": statistics.median(data), "iqr": iqr, "q1": q1, "q3": q3,
            "iqr_outliers": iqr_outliers, "stddev_outliers": stddev_outliers,
            "outliers": f"{stddev_outliers};{iqr_outliers}",
            "ld15iqr": next(run for run in data if run >= low),
            "hd15iqr": next(run for run in reversed(data) if run <= high),
            "ops": rounds / total if total else 0.0, "total": total, "iterations": 1,
            "data": runs}


def _quartiles(data: list[float]) -> tuple[float, float]:
    """Q1 and Q3 of sorted ``data`` as pytest-benchmark computes them."""
    n = len(data)
    if n == 1:
        return data[0], data[0]
    if n % 2 == 0:      # the medians of each half
        return statistics.median(data[:n // 2]), statistics.median(data[n // 2:])
    m, r = divmod(n, 4)     # odd: weighted between the two data around each quarter
    if r == 1:
        return (0.25 * data[m - 1] + 0.75 * data[m],
                0.75 * data[3 * m] + 0.25 * data[3 * m + 1])
    return 0.75 * data[m] + 0.25 * data[m + 1], 0.25 * data[3 * m + 1] + 0.75 * data[3 * m + 2]


def machine_info() -> dict[str, Any]:
    uname = platform.uname()
    return {"node": uname.node, "machine": uname.machine, "processor": uname.processor,
            "cpu_count": os.cpu_count(), "system": uname.system, "release": uname.release,
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation()}


def commit_info() -> dict[str, Any]:
    """The git commit of the fastmfd source that ran, when it runs from a checkout
    (an installed wheel has none: then ``id`` is None and ``version`` says which)."""
    here = os.path.dirname(os.path.abspath(__file__))
    info: dict[str, Any] = {"id": None, "dirty": None, "project": "fastmfd", "branch": None,
                  "version": __version__}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        info.update(id=commit, branch=git("rev-parse", "--abbrev-ref", "HEAD"),
                    dirty=bool(git("status", "--porcelain", "--untracked-files=no")))
    return info
