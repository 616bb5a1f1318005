"""Settings for the micro-benchmarks of fastmfd's Cython core.

Every benchmark checks its result before it is timed, so
``pytest benchmarks --benchmark-disable`` (one untimed call each) is a
smoke test of the whole suite. Sizes:

- ``--sizes=full`` — what the questions are about (1 GiB zero-page scan);
- ``--sizes=ci`` — small, for a quick smoke run;
- default: ``ci`` when the environment says ``CI=true``, ``full`` otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from _conditions import CONDITIONS, conditions_of, drop_unlike


@dataclass(frozen=True)
class Sizes:
    name: str
    scan_bytes: int         # zero-page scan buffer
    bitmap_pages: int       # dirty bitmap collect: pages tracked
    channel_bytes: int      # one channel's engines, plain vs TLS: bytes per round


FULL = Sizes("full", scan_bytes=1 << 30, bitmap_pages=(1 << 30) // 4096,
             channel_bytes=256 << 20)
CI = Sizes("ci", scan_bytes=16 << 20, bitmap_pages=(64 << 20) // 4096,
           channel_bytes=8 << 20)


def pytest_addoption(parser):
    parser.addoption("--sizes", choices=("full", "ci"), default=None,
                     help="benchmark sizes (default: ci when CI=true, else full)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """One process, whatever pyproject's addopts says (``-n 2``, for the tests): a
    timing needs the machine to itself, and pytest-benchmark times nothing in
    pytest-xdist's workers (it turns itself off there)."""
    if getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0


def sizes_of(config) -> Sizes:
    """The sizes this run's options (or CI=true) choose."""
    choice = config.getoption("--sizes", default=None)
    if choice is None:
        choice = "ci" if os.environ.get("CI", "").lower() == "true" else "full"
    return FULL if choice == "full" else CI


@pytest.fixture(scope="session")
def sizes(request) -> Sizes:
    return sizes_of(request.config)


# What each module's timings depend on (see _conditions.py): its buffer's size.
CONDITIONS.update({
    "test_bench_zero_scan.py": lambda config: {"scan_bytes": sizes_of(config).scan_bytes},
    "test_bench_dirty_bitmap.py": lambda config: {"bitmap_pages": sizes_of(config).bitmap_pages},
    "test_bench_tls.py": lambda config: {"channel_bytes": sizes_of(config).channel_bytes},
})


@pytest.fixture(autouse=True)
def _measured_under(request):
    """Every benchmark's extra_info says what it measured under (``conditions``)."""
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["conditions"] = \
            conditions_of(request.config, request.node.nodeid)


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info,
                                          compared_benchmark):
    """--benchmark-compare: leave out the saved benchmarks measured unlike this run's."""
    for note in drop_unlike(config, compared_benchmark):
        benchmarksession.logger.warning(note)


@pytest.fixture
def report_throughput(benchmark):
    """Call with the bytes one timed call handles, after timing: adds bytes and GB/s."""
    def report(nbytes: int) -> None:
        benchmark.extra_info["bytes"] = nbytes
        stats = getattr(benchmark, "stats", None)
        if stats:       # None when run with --benchmark-disable
            benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.mean / 1e9, 2)
    return report


# ---------------------------------------------------------------- migration benchmarks
# test_migrate_*.py and test_downtime.py: their command-line options (--qemu,
# --migrate-size, --migrate-rounds, --migrate-prealloc), fixtures and end-of-run
# comparison tables live in conftest_migrate.py, loaded here so `pytest
# benchmarks` knows the options before it collects. They follow --sizes too.
pytest_plugins = ["conftest_migrate"]
