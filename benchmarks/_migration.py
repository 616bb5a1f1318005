"""Helpers of the migration benchmarks (test_migrate_*.py, test_downtime.py).

A transfer is timed as :mod:`fastmfd.tools.bench` defines a trial — the same code
``fastmfd bench`` runs — through ``benchmark.pedantic``::

    setup:    trial = make_trial()       workers started, connections ready (not timed)
    target:   trial.run()                the transfer (timed)
    teardown: trial.finish()             destination == source asserted, all freed

``--benchmark-disable`` (the CI smoke run) calls the target once and skips
teardown, so :func:`time_trials` finishes whatever trial is left itself:
every run, timed or not, checks its data.

Each timed test also leaves a :class:`Record`; conftest_migrate.py prints
them at the end as side-by-side tables with ratios (peers measured in the
same run, on the same machine state).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastmfd.tools.bench.trial import Measurement

GIB = 1 << 30


@dataclass(frozen=True)
class Record:
    table: str              # which end-of-run table
    row: tuple              # e.g. ("random", "zstd-1", 2)
    column: str             # e.g. "fastmfd", "qemu", "old way"
    best: Measurement       # the fastest run


RECORDS: list[Record] = []


def time_trials(benchmark, make_trial, *, rounds: int, check=None) -> list[Measurement]:
    """Time ``make_trial().run()`` over ``rounds`` fresh trials; finish (check) each.

    ``check(result)`` is called with what each trial's ``finish()`` returns.
    Returns the measurements (one when benchmarks are disabled).
    """
    live: list = []
    measurements: list[Measurement] = []

    def setup():
        trial = make_trial()
        live.append(trial)
        return (trial,), {}

    def run(trial) -> Measurement:
        measurement = trial.run()
        measurements.append(measurement)
        return measurement

    def finish(trial) -> None:
        live.remove(trial)
        result = trial.finish()
        if check is not None:
            check(result)

    try:
        benchmark.pedantic(run, setup=setup, teardown=finish, rounds=rounds, iterations=1)
        while live:                     # the untimed run leaves its trial to us
            finish(live[0])
    finally:
        for trial in live:
            trial.close()
    return measurements


def report(benchmark, measurements: list[Measurement], *, table: str | None = None,
           row: tuple = (), column: str = "", details: tuple[str, ...] = ()) -> Measurement:
    """Put bytes and throughput of the fastest run (and ``details`` keys) in extra_info;
    keep a Record for the end-of-run ``table`` when timing is on."""
    best = min(measurements, key=lambda m: m.seconds)
    info = benchmark.extra_info
    info["image_bytes"] = best.image_bytes
    info["wire_bytes"] = best.wire_bytes
    info["bytes_per_s"] = round(best.throughput)
    info["GiB/s"] = round(best.throughput / GIB, 3)
    for key in details:
        if key in best.details:
            info[key] = best.details[key]
    if table is not None and not benchmark.disabled:
        RECORDS.append(Record(table, row, column, best))
    return best
