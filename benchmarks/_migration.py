"""Helpers of the migration benchmarks (test_migrate_*.py, test_downtime.py).

A transfer is timed as :mod:`fastmfd.tools.bench` defines a trial — the same code
``fastmfd bench`` runs — through ``benchmark.pedantic``::

    setup:    trial = make_trial()       workers started, connections ready (not timed)
    target:   trial.run()                the transfer (timed)
    teardown: trial.finish()             destination == source asserted, all freed

``--benchmark-disable`` (the CI smoke run) calls the target once and skips
teardown, so :func:`time_trials` finishes whatever trial is left itself:
every run, timed or not, checks its data.

A peer (QEMU on the same cell) is timed beside fastmfd round by round, and
the order alternates: even rounds run fastmfd first, odd rounds the peer, so
neither always gets the machine's fresh memory (whoever touches it first
pays); each trial frees its memory before the next starts, and the machine's
free memory is warmed right before each timed run (``warm_free_memory``).
Every run, fastmfd's as the peer's, carries each side's CPU seconds and the
load of the machine's other processes (``cpu_s``, ``foreign_cores``:
:class:`CpuMeter`, as ``fastmfd bench``), and the tables mark a cell with a
run beside more than ``FOREIGN_LOAD_FLAG`` cores of it (:func:`loaded`).

Each timed test also leaves a :class:`Record`; conftest_migrate.py prints
them at the end as side-by-side tables with ratios (peers measured in the
same run, on the same machine state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastmfd.tools.bench.matrix import RunStatistics
from fastmfd.tools.bench.trial import FOREIGN_LOAD_FLAG, CpuMeter, Measurement, warm_free_memory

GIB = 1 << 30


@dataclass(frozen=True)
class Record(RunStatistics):
    table: str              # which end-of-run table
    row: tuple              # e.g. ("random", "zstd-1", 2)
    column: str             # e.g. "fastmfd", "qemu", "old way"
    measurements: tuple[Measurement, ...]   # in the order they ran


RECORDS: list[Record] = []


def loaded(measurements) -> bool:
    """Whether a run was beside more than FOREIGN_LOAD_FLAG cores of other load."""
    return any(m.details.get("foreign_cores", 0) > FOREIGN_LOAD_FLAG for m in measurements)


def time_trials(benchmark, make_trial, *, rounds: int, check=None,
                peer: Callable[[], Measurement] | None = None
                ) -> tuple[list[Measurement], list[Measurement]]:
    """Time ``make_trial().run()`` over ``rounds`` fresh trials; finish (check) each.

    ``check(result)`` is called with what each trial's ``finish()`` returns.
    ``peer()`` times (and checks) one transfer by the peer; it runs once per
    round, after fastmfd's trial in even rounds and before it in odd ones.
    Returns fastmfd's measurements and the peer's (one each when benchmarks
    are disabled).
    """
    live: list = []
    measurements: list[Measurement] = []
    peer_measurements: list[Measurement] = []
    rounds_started = 0
    # by id(trial): its CpuMeter, started before the timed part and stopped after it
    # (in teardown: its /proc scan is not timed), and the Measurement it gets
    meters: dict[int, CpuMeter] = {}
    measured: dict[int, Measurement] = {}

    def timed_round(number: int) -> bool:
        """Whether round ``number`` (from 0) is one of the ``rounds``: with
        --benchmark-cprofile pytest-benchmark runs one more, under the profiler
        (slower, not in its statistics): it was counted in the runs and the tables,
        and could time the peer once more."""
        return number < rounds

    def setup():
        nonlocal rounds_started
        if peer is not None and rounds_started % 2 == 1 and timed_round(rounds_started):
            peer_measurements.append(peer())
        rounds_started += 1
        trial = make_trial()
        live.append(trial)
        warm_free_memory(trial.image.size)     # as run_once does for the peer
        meters[id(trial)] = CpuMeter(trial.pids(), trial.pids_complete)
        return (trial,), {}

    def run(trial) -> Measurement:
        measurement = trial.run()
        if timed_round(rounds_started - 1):
            measurements.append(measurement)
            measured[id(trial)] = measurement
        return measurement

    def measure_cpu(trial) -> None:
        """Each side's CPU seconds and the foreign load of the trial's run, in its
        details as run_once puts them in the peer's."""
        meter = meters.pop(id(trial), None)
        if meter is not None:
            cpu = meter.stop()
            if id(trial) in measured:
                measured.pop(id(trial)).details.update(cpu)

    def finish(trial) -> None:
        live.remove(trial)
        measure_cpu(trial)
        result = trial.finish()
        if check is not None:
            check(result)
        if peer is not None and rounds_started % 2 == 1 and timed_round(rounds_started - 1):
            peer_measurements.append(peer())        # an even round (counted from 0)

    try:
        benchmark.pedantic(run, setup=setup, teardown=finish, rounds=rounds, iterations=1)
        while live:                     # the untimed run leaves its trial to us
            finish(live[0])
    finally:
        for trial in live:
            measure_cpu(trial)          # (its thread stopped)
            trial.close()
    return measurements, peer_measurements


def report(benchmark, measurements: list[Measurement], *, table: str | None = None,
           row: tuple = (), column: str = "", details: tuple[str, ...] = (),
           peers: dict[str, list[Measurement]] | None = None) -> Measurement:
    """Put bytes and throughput of the fastest run (and ``details`` keys) in extra_info,
    with every run's seconds and CPU; keep a Record for the end-of-run ``table`` when
    timing is on. ``peers``: the runs of peers timed beside these (by column), kept
    in extra_info and in the table alike."""
    best = min(measurements, key=lambda m: m.seconds)
    info = benchmark.extra_info
    info["image_bytes"] = best.image_bytes
    info["wire_bytes"] = best.wire_bytes
    info["bytes_per_s"] = round(best.throughput)
    info["GiB/s"] = round(best.throughput / GIB, 3)
    info["runs"] = [{"seconds": m.seconds, **m.details} for m in measurements]
    for key in details:
        if key in best.details:
            info[key] = best.details[key]
    for name, runs in (peers or {}).items():
        info[f"{name}_runs"] = [{"seconds": m.seconds, **m.details} for m in runs]
    if table is not None and not benchmark.disabled:
        RECORDS.append(Record(table, row, column, tuple(measurements)))
        RECORDS.extend(Record(table, row, name, tuple(runs))
                       for name, runs in (peers or {}).items() if runs)
    return best


def time_downtime(benchmark, measurements: list[Measurement]) -> None:
    """Make a downtime benchmark's pytest-benchmark statistics (its table, --benchmark-json's
    ``stats``, --benchmark-compare) those of each run's downtime (``downtime_s``: the
    source's stop to the destination's LOADED), not of the whole migration its target
    timed (each run's ``seconds`` stay in extra_info's runs): with precopy the live rounds
    before the stop are no downtime, and pytest-benchmark's table showed precopy + ack
    slower than all sent at the stop though its downtime was a fifth of it. extra_info's
    ``downtime_s`` is the shortest. Call after :func:`report`."""
    from pytest_benchmark.stats import Stats
    downtimes = [m.details["downtime_s"] for m in measurements]
    benchmark.extra_info["downtime_s"] = min(downtimes)
    metadata = getattr(benchmark, "stats", None)
    if not metadata:            # --benchmark-disable: nothing was timed
        return
    stats = Stats()
    # the timed rounds (a --benchmark-cprofile run after them is none)
    for downtime in downtimes[:len(metadata.stats.data)]:
        stats.update(downtime)
    metadata.stats = stats
