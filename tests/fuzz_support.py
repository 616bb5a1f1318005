"""Fuzz targets for tests/test_fuzz_harness.py, which benchmarks/fuzz.py's spawned
workers import by this module's name as they import ``_fuzz_targets``.

A case is a random 64-bit number (the batch's generator's next); each target
does one thing to one chosen case, named by its id (``target:batch:index``):
hangs in ``run`` or in ``make``, kills its worker, or hangs building its seeds.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _fuzz_targets import Target  # noqa: E402
from fuzz import batch_rng  # noqa: E402

from fastmfd.errors import ConfigError  # noqa: E402

SEED = 7
FOREVER = 600.0         # a hang: the harness kills the worker long before
SLOW_MAKE = 0.3         # seconds each case of "crash" takes to make


def case_value(cid: str) -> int:
    """The case ``cid`` of this module's targets under SEED."""
    name, batch, index = cid.rsplit(":", 2)
    rng = batch_rng(SEED, name, int(batch))
    return [rng.getrandbits(64) for _ in range(int(index) + 1)][-1]


def outcome(value: int) -> str:
    """What run() makes of an ordinary case: odd ones are refused."""
    return "refused" if value % 2 else "accepted"


HANG_AT = "hang:1:4"            # run() hangs
RAISES_AT = "hang:1:2"          # run() raises a ValueError, before the hang in its batch
CRASH_AT = "crash:0:3"          # run() kills its worker
MAKE_HANGS_AT = "make_hang:0:3"  # make() hangs


def _make(rng, state) -> int:
    return rng.getrandbits(64)


def _run(state, value: int) -> None:
    if value == case_value(HANG_AT):
        time.sleep(FOREVER)
    if value == case_value(RAISES_AT):
        raise ValueError("found before the hang")
    if value == case_value(CRASH_AT):
        os.kill(os.getpid(), signal.SIGKILL)
    if outcome(value) == "refused":
        raise ConfigError("refused")


def _slow_make(rng, state) -> int:
    time.sleep(SLOW_MAKE)
    return rng.getrandbits(64)


def _make_hangs(rng, state) -> int:
    value = rng.getrandbits(64)
    if value == case_value(MAKE_HANGS_AT):
        time.sleep(FOREVER)
    return value


def _build_hangs() -> None:
    time.sleep(FOREVER)


TARGETS = {t.name: t for t in [
    Target("hang", "packets", 1, lambda: None, _make, _run, batch=10),
    # Made slowly: after the crash its new worker makes the batch's first cases
    # again, longer than a hang in all, but no one of them is.
    Target("crash", "packets", 1, lambda: None, _slow_make, _run, batch=5),
    Target("make_hang", "packets", 1, lambda: None, _make_hangs, _run, batch=10),
    Target("build_hang", "packets", 1, _build_hangs, _make, _run, batch=10),
]}
