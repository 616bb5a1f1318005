"""What a benchmark measured beside its name: the sizes and options it ran with.

pytest-benchmark's ``--benchmark-compare`` (and ``--benchmark-compare-fail``) pair
a test with the saved test of the same full name, whatever either measured: a
migration of 16 MiB was shown (and failed as a regression) beside one of 64 MiB,
3.6x "slower" for moving four times more. So every benchmark keeps what it was
measured under in ``extra_info["conditions"]`` (:data:`CONDITIONS`, by test
module: the image size, ``--sizes``, ``--migrate-prealloc``, ...), and a saved
benchmark whose conditions differ from this run's, or were not recorded, is
left out of the comparison, with a warning saying why (:func:`drop_unlike`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from fastmfd.tools.bench.document import shown_condition
from fastmfd.tools.bench.link import same_link

# test module file name -> what its timings depend on beside the test's name, as
# this run's options set it (conftest.py and conftest_migrate.py fill it in).
# A module not named here depends on nothing: any saved run of it compares.
CONDITIONS: dict[str, Callable[[Any], dict[str, Any]]] = {}


def conditions_of(config, nodeid: str) -> dict[str, Any]:
    """The conditions of the test ``nodeid`` (a full name: ``path::test[params]``) in
    this run."""
    made = CONDITIONS.get(os.path.basename(nodeid.split("::", 1)[0]))
    return made(config) if made is not None else {}


def differences(before: Any, now: dict[str, Any]) -> str:
    """Why a saved benchmark measured under ``before`` (its extra_info's conditions, if
    any) is not comparable with one measured under ``now``; "" when it is."""
    if not now:
        return ""
    if not isinstance(before, dict):
        return f"its conditions were not recorded (now: " \
               f"{', '.join(f'{k} {shown_condition(k, v)}' for k, v in now.items())})"
    # A link recorded as typed (1000mbit) is the one of its rate and delay (1gbit).
    before = {**before, **({"link": same_link(before["link"])} if "link" in before else {})}
    return "; ".join(f"{key}: {shown_condition(key, before.get(key))} before, "
                     f"{shown_condition(key, value)} now"
                     for key, value in now.items() if before.get(key) != value)


def drop_unlike(config, compared: dict[str, Any]) -> list[str]:
    """Remove from a saved run (``compared``, as pytest-benchmark loaded it) every
    benchmark not measured under this run's conditions; one line per benchmark removed."""
    kept, notes = [], []
    for bench in compared.get("benchmarks", []):
        # Another tool's file, or one edited: an extra_info that is no object, a fullname
        # that is no string, raised AttributeError here (pytest's INTERNALERROR).
        extra = bench.get("extra_info")
        fullname = bench.get("fullname")
        why = differences(extra.get("conditions") if isinstance(extra, dict) else None,
                          conditions_of(config, fullname if isinstance(fullname, str) else ""))
        if why:
            notes.append(f"{bench.get('fullname')}: not compared with the saved run: {why}")
        else:
            kept.append(bench)
    compared["benchmarks"] = kept
    return notes
