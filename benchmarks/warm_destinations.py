"""Warm destinations (issue #12): how long a migration takes, and how steady it is,
into fresh memory, with prealloc, and into a pooled region.

::

    python benchmarks/warm_destinations.py [--size 1G] [--channels 2] [--rounds 6]
                                           [--modes plain,prealloc,pool] [--huge-pages]

Each round runs every mode once, the order rotating from round to round; each
run is a new Destination (its workers started before timing) receiving the
same random image over loopback TCP, timed from ``Source.migrate()`` to its
return (the destination loaded everything and said so); the prealloc time is
the destination's own (``ReceiveStats.prealloc_time_s``, inside the total).
``plain`` and ``prealloc`` free the destination's memory after each run;
``pool`` keeps it in a RegionPool (prealloc on), so from its second run on it
lands in warm memory. Right before each run the machine's free memory is
warmed (``warm_free_memory``, as ``fastmfd bench`` and the pytest suites do:
on a VM that hands free memory back to its host, the run after the image was
made, always ``plain``'s first, paid the host's faults too). Each run's result
is checked against the image, outside the timing. Beside each run: the CPU
seconds of the destination's workers and the cores other processes kept busy
meanwhile (foreign load: on a shared machine, the figure that says how much a
run can be trusted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import fastmfd
from fastmfd.config import COMPRESSION_METHODS
from fastmfd.tools.bench.trial import CpuMeter, warm_free_memory
from fastmfd.tools.images import Image
from fastmfd.tools.option_values import positive_int, whole_pages
from fastmfd.units import format_bytes

MODES = ("plain", "prealloc", "pool")


def one_run(image: Image, config: fastmfd.MigrationConfig, mode: str,
            pool: fastmfd.RegionPool | None, huge_pages: bool) -> dict[str, Any]:
    """One migration of ``image``: its wall time, prealloc time, the CPU seconds of
    the destination's workers, and the cores other processes used meanwhile."""
    options: dict[str, Any] = {"prealloc": mode != "plain", "huge_pages": huge_pages}
    if mode == "pool":
        options["region_pool"] = pool
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=config.total_channels,
                             **options) as dst, \
            fastmfd.Source(dst.address, config) as src:
        src.add_region(image.region)
        box: dict[str, Any] = {}
        receiver = threading.Thread(target=lambda: box.update(result=dst.receive()))
        receiver.start()
        meter = CpuMeter({"source": src.worker_pids(), "destination": dst.worker_pids(),
                          "main": [os.getpid()]})
        started = time.perf_counter()
        src.migrate(live=False)
        seconds = time.perf_counter() - started
        receiver.join()
        cpu = meter.stop()
        result = box["result"]
        region = result.regions[image.region.name]
        if not image.matches(region):
            raise SystemExit(f"{mode}: the destination's region differs from the image")
        del region
        return {"seconds": seconds, "prealloc": result.stats.prealloc_time_s or 0.0,
                "dst_cpu": cpu["cpu_s"]["destination"], "foreign": cpu["foreign_cores"]}


def summary(runs: list[dict[str, Any]]) -> str:
    times = [r["seconds"] for r in runs]
    prealloc = [r["prealloc"] for r in runs]
    return (f"median {statistics.median(times) * 1000:7.1f} ms  min {min(times) * 1000:7.1f}"
            f"  max {max(times) * 1000:7.1f}  spread {max(times) / min(times):5.2f}"
            f"  prealloc median {statistics.median(prealloc) * 1000:6.1f} ms"
            f"  destination CPU median {statistics.median(r['dst_cpu'] for r in runs):5.2f} s"
            f"  foreign median {statistics.median(r['foreign'] for r in runs):4.2f} cores")


def _modes(text: str) -> list[str]:
    """Modes from MODES, once each: another name ran as prealloc under its own label."""
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"{', '.join(bad) or repr(text)}: choose from "
                                         f"{', '.join(MODES)}")
    return modes


def main(argv: list[str] | None = None) -> int:
    # Every value checked as it is parsed (exit 2, one line): --modes pooled ran prealloc
    # and called it "pooled", --rounds 0 ended in a traceback after the image was made.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=whole_pages, default=1 << 30)
    parser.add_argument("--channels", type=positive_int, default=2)
    parser.add_argument("--compression", choices=list(COMPRESSION_METHODS),
                        default="none")
    parser.add_argument("--rounds", type=positive_int, default=6)
    parser.add_argument("--modes", type=_modes, default=list(MODES))
    parser.add_argument("--huge-pages", action="store_true",
                        help="the destinations' regions in transparent huge pages")
    args = parser.parse_args(argv)
    modes = args.modes
    config = fastmfd.MigrationConfig(channels=args.channels, compression=args.compression)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    print(f"{format_bytes(args.size)} random image, {args.channels} channel(s), "
          f"{args.compression}, {args.rounds} rounds, modes {modes}"
          + (", huge pages" if args.huge_pages else ""), flush=True)
    with Image.create("random", args.size) as image, \
            fastmfd.RegionPool(max_bytes=args.size) as pool:
        for number in range(args.rounds):
            order = modes[number % len(modes):] + modes[:number % len(modes)]
            for mode in order:
                warm_free_memory(args.size)
                run = one_run(image, config, mode, pool, args.huge_pages)
                runs[mode].append(run)
                print(f"round {number + 1} {mode:<8} {run['seconds'] * 1000:8.1f} ms  "
                      f"prealloc {run['prealloc'] * 1000:6.1f} ms  destination CPU "
                      f"{run['dst_cpu']:5.2f} s  foreign load {run['foreign']:.2f} cores",
                      flush=True)
    for mode in modes:
        print(f"{mode:<8} {summary(runs[mode])}")
        if mode == "pool" and len(runs[mode]) > 1:
            print(f"{'pool 2+':<8} {summary(runs[mode][1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
