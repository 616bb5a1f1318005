"""Options, fixtures and end-of-run tables of the migration benchmarks.

Options:

- ``--qemu``: also time a real QEMU multifd migration of each image, round by
  round beside fastmfd (``qemu-system-x86_64``, or $FASTMFD_QEMU, e.g. a QEMU
  10 build); the cells are skipped, saying why, when it is not installed.
- ``--migrate-size=1G``: image size (default 1 GiB; 16 MiB when CI=true or
  ``--sizes=ci``); ``--migrate-rounds=N``: timed runs per cell (default 3).
- ``--migrate-prealloc``: every destination's memory is allocated and faulted
  in before timing (QEMU: ``prealloc=on``), which times the transport alone;
  by default destinations start on fresh memory, as a new QEMU does.
- ``--migrate-link=RATE[/DELAY]``: every destination behind an emulated link
  (root; see ``fastmfd bench --link``) instead of loopback.

At the end of a timed run, the records of ``_migration.report`` are printed
as side-by-side tables: for every (image, compression, channels) cell
fastmfd's median, first (cold) run and spread against QEMU's, with sendall's
median per image, and the downtime of the three ways to send device state,
with the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import os

import pytest

from _conditions import CONDITIONS
from _migration import RECORDS, Record, loaded
from fastmfd.errors import ConfigError
from fastmfd.tools.bench.link import same_link
from fastmfd.tools.bench.trial import FOREIGN_LOAD_FLAG
from fastmfd.tools.images import Image, check_scratch_room
from fastmfd.tools.option_values import positive_int, whole_pages
from fastmfd.units import format_bytes

CI_SIZE = 16 << 20
FULL_SIZE = 1 << 30


def _link_text(text: str) -> str:
    """A valid --migrate-link, as typed (a mistake is a usage error, before any test)."""
    from fastmfd.tools.bench.link import parse_link
    try:
        parse_link(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def pytest_addoption(parser):
    # Each value checked as pytest parses it: a mistake is one line and exit 4 (a usage
    # error) before any work, not a traceback in every test (--migrate-rounds 0 ran 1).
    group = parser.getgroup("fastmfd migration benchmarks")
    group.addoption("--qemu", action="store_true", default=False,
                    help="also time real QEMU 7.2 multifd migrations (qemu-system-x86_64)")
    group.addoption("--migrate-size", type=whole_pages, default=None, metavar="SIZE",
                    help="image size for test_migrate_* (default 1G; 16M when CI=true)")
    group.addoption("--migrate-rounds", type=positive_int, default=3, metavar="N",
                    help="timed runs per migration benchmark (default 3)")
    group.addoption("--migrate-prealloc", action="store_true", default=False,
                    help="preallocate destination memory before timing (QEMU prealloc=on)")
    group.addoption("--migrate-link", type=_link_text, default=None, metavar="RATE[/DELAY]",
                    help="every destination behind an emulated link, e.g. 1gbit (root)")


def small_sizes_of(config) -> bool:
    """True for the quick CI sizes: CI=true, or the core benchmarks' --sizes=ci."""
    sizes = config.getoption("--sizes", default=None)
    if sizes is not None:
        return bool(sizes == "ci")
    return os.environ.get("CI", "").lower() == "true"


def migrate_size_of(config) -> int:
    given: int | None = config.getoption("--migrate-size")      # parsed: whole_pages
    if given is not None:
        return given
    return CI_SIZE if small_sizes_of(config) else FULL_SIZE


@pytest.fixture(scope="session")
def small_sizes(request) -> bool:
    return small_sizes_of(request.config)


@pytest.fixture(scope="session")
def migrate_size(request) -> int:
    return migrate_size_of(request.config)


# What the migration benchmarks' timings depend on beside their names (_conditions.py).
CONDITIONS.update({
    "test_migrate_throughput.py": lambda config: {
        "image_bytes": migrate_size_of(config),
        "prealloc": bool(config.getoption("--migrate-prealloc")),
        "link": same_link(config.getoption("--migrate-link"))},
    # Its statistics are of the downtime: runs saved before were of whole migrations.
    "test_downtime.py": lambda config: {
        "sizes": "ci" if small_sizes_of(config) else "full", "timed": "downtime_s"},
})


@pytest.fixture(scope="session")
def migrate_rounds(request) -> int:
    return max(1, request.config.getoption("--migrate-rounds"))


@pytest.fixture(scope="session")
def migrate_prealloc(request) -> bool:
    return request.config.getoption("--migrate-prealloc")


@pytest.fixture(scope="session")
def images():
    """``images(kind, size)``: one Image per kind and size for the whole session."""
    made: dict[tuple[str, int], Image] = {}

    def get(kind: str, size: int) -> Image:
        if (kind, size) not in made:
            # The image and a destination's copy: one that does not fit was made until
            # /dev/shm was full (or, past the memory, tried in every test).
            try:
                check_scratch_room(2 * size, f"a {format_bytes(size)} {kind} image and a "
                                             f"destination's copy")
                refused = None
            except ConfigError as exc:
                refused = str(exc)
            if refused is not None:         # (outside the except: one line, no chain)
                pytest.fail(refused, pytrace=False)
            made[kind, size] = Image.create(kind, size)
        return made[kind, size]

    yield get
    for image in made.values():
        image.close()


@pytest.fixture(scope="session")
def qemu_peer(request) -> str | None:
    """The QEMU to time beside fastmfd (None without --qemu); with --qemu and no
    QEMU installed, the cells skip, saying why."""
    if not request.config.getoption("--qemu"):
        return None
    from fastmfd.tools.bench.peers import find_qemu
    from fastmfd.errors import ConfigError
    try:
        return find_qemu()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def migrate_link(request):
    """The emulated link every destination is behind (None: loopback)."""
    text = request.config.getoption("--migrate-link")
    if text is None:
        yield None
        return
    from fastmfd.tools.bench.link import EmulatedLink, parse_link
    with EmulatedLink(parse_link(text)) as link:
        yield link


# ---------------------------------------------------------------- end-of-run tables

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}x"


def _runs(record: Record | None) -> str:
    """``median (first, spread)`` of a record's runs; ``*``: one beside other load."""
    if record is None:
        return "-"
    return (f"{_ms(record.median_seconds)} ({_ms(record.first_seconds)}, "
            f"{record.spread:.2f})" + ("*" if loaded(record.measurements) else ""))


def _migrate_lines(prealloc: bool, link: str | None) -> list[str]:
    cells: dict[tuple, dict[str, Record]] = {}
    for record in RECORDS:
        if record.table == "migrate":
            cells.setdefault(record.row, {})[record.column] = record
    if not cells:
        return []
    sendall = {row[0]: cols["sendall"] for row, cols in cells.items() if "sendall" in cols}
    where = "destinations preallocated" if prealloc else "fresh destination memory"
    over = f"an emulated {link} link" if link else "loopback"
    lines = [f"migrate(live=False), {where}, over {over}: median (first run, spread) per "
             f"cell; the ratios are of medians, > 1 means fastmfd is faster; * a run beside "
             f"more than {FOREIGN_LOAD_FLAG} cores of other load", "",
             f"{'image':<8} {'compression':<11} {'ch':>2} {'fastmfd':>27} {'qemu':>27} "
             f"{'qemu/fastmfd':>12} {'sendall':>9} {'sendall/fastmfd':>15}"]
    for row in sorted(r for r in cells if r[2] is not None):
        image, compression, channels = row
        mine, qemu = cells[row].get("fastmfd"), cells[row].get("qemu")
        peer = sendall.get(image)

        def median(record: Record | None) -> float | None:
            return None if record is None else record.median_seconds
        lines.append(f"{image:<8} {compression:<11} {channels:>2} {_runs(mine):>27} "
                     f"{_runs(qemu):>27} {_ratio(median(qemu), median(mine)):>12} "
                     f"{_ms(median(peer)):>9} {_ratio(median(peer), median(mine)):>15}")
    return lines


def _shortest_downtime(record: Record) -> float:
    """The shortest downtime of a record's runs (not the downtime of its fastest run:
    with precopy, the live rounds make a run fast or slow, not its downtime)."""
    return min(m.details["downtime_s"] for m in record.measurements)


def _downtime_lines() -> list[str]:
    cells: dict[int, dict[str, float]] = {}
    for record in RECORDS:
        if record.table == "downtime":
            cells.setdefault(record.row[0], {})[record.column] = _shortest_downtime(record)
    if not cells:
        return []
    ways = {"old": "old way", "mixed": "new way, mixed", "dedicated": "new way, dedicated",
            "precopy+ack": "new way, precopy + ack"}
    lines = ["downtime (the shortest of the runs) and how much less than the old way", "",
             f"{'devices':>7} " + " ".join(f"{label:>22}" for label in ways.values())]
    for devices in sorted(cells):
        row = cells[devices]
        old = row.get("old")
        parts = []
        for way in ways:
            value = row.get(way)
            text = _ms(value)
            if way != "old" and value is not None and old:
                less = (1 - value / old) * 100
                text += f" ({less:.0f}% less)" if less >= 0 else f" ({-less:.0f}% more)"
            parts.append(f"{text:>22}")
        lines.append(f"{devices:>7} " + " ".join(parts))
    return lines


def _precopy_lines() -> list[str]:
    best = {record.column: _shortest_downtime(record) for record in RECORDS
            if record.table == "precopy"}
    if "all at stop" not in best or "precopy+ack" not in best:
        return []
    share = best["precopy+ack"] / best["all at stop"]
    return ["issue #13: 4 devices x 36 MiB at 128 MiB/s, 32 MiB of it initial data",
            f"all at the stop: {_ms(best['all at stop'])}; precopy + switchover-ack: "
            f"{_ms(best['precopy+ack'])} ({share * 100:.0f} % of it; the target is <= 30 %)"]


@pytest.hookimpl(trylast=True)      # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    prealloc = config.getoption("--migrate-prealloc")
    link = config.getoption("--migrate-link")
    for lines in (_migrate_lines(prealloc, link), _downtime_lines(), _precopy_lines()):
        if lines:
            terminalreporter.write_sep("-", lines[0])
            for line in lines[1:]:
                terminalreporter.write_line(line)
