"""benchmarks/fuzz.py's harness when a case hangs or kills its worker (real worker
processes, on fuzz_support's targets): the case is recorded once, its batch goes
on with the next case in a new worker, every case is counted once with its
outcome, and a hang is the case's own, from the start of its making.
"""

from __future__ import annotations

import pytest

import fastmfd

from fuzz_support import (CRASH_AT, HANG_AT, MAKE_HANGS_AT, RAISES_AT, SEED, case_value,
                          outcome)
from fuzz import Campaign  # after fuzz_support, which puts benchmarks/ on the path

HANG = 1.0      # seconds: fuzz.HANG_SECONDS is a minute


def _campaign(counts: dict[str, int]):
    return Campaign(counts, SEED, jobs=2, log=lambda text: None, targets="fuzz_support",
                    hang_seconds=HANG)


def _expected(name: str, count: int, batch: int, special: set[str]) -> dict[str, int]:
    """How many of the first ``count`` cases of ``name`` run() accepts and refuses,
    but for the ``special`` ones."""
    cases = [f"{name}:{i // batch}:{i % batch}" for i in range(count)]
    outcomes = [outcome(case_value(cid)) for cid in cases if cid not in special]
    return {kind: outcomes.count(kind) for kind in ("accepted", "refused")}


@pytest.mark.timeout(60)
def test_a_hang_or_crash_is_recorded_once_and_its_batch_goes_on_after_it():
    tallies = _campaign({"hang": 30, "crash": 5, "make_hang": 10}).run()

    hang = tallies["hang"]
    assert hang.hangs == [(HANG_AT, f"made no progress for {HANG:g} s")]
    assert hang.crashes == []
    assert hang.cases == 30, "every case once: none lost, none counted twice"
    assert {"accepted": hang.accepted, "refused": hang.refused} == \
        _expected("hang", 30, 10, {HANG_AT, RAISES_AT})
    assert hang.bad_count == 1 and hang.bad["ValueError"].examples[0][:2] == \
        (RAISES_AT, "found before the hang"), "the batch's finding before its hang is kept"

    crash = tallies["crash"]
    assert crash.crashes == [(CRASH_AT, "was killed by SIGKILL")]
    # Its new worker made the cases before the crash again to reach the next one,
    # longer than HANG in all: no one case was, and none hung.
    assert crash.hangs == []
    assert crash.cases == 5
    assert {"accepted": crash.accepted, "refused": crash.refused} == \
        _expected("crash", 5, 5, {CRASH_AT})

    # A make that hangs is its own case's hang, not the case made before; the
    # batch's later cases cannot be made without it.
    make_hang = tallies["make_hang"]
    assert make_hang.hangs == [(MAKE_HANGS_AT,
                                f"made no progress for {HANG:g} s making the case")]
    assert make_hang.cases == 4
    assert make_hang.accepted + make_hang.refused == 3


@pytest.mark.timeout(60)
def test_a_hang_building_the_seeds_stops_the_run():
    """Not a case, so not one to go on after: it used to count as case -1 and
    start the batch again, building the seeds again, forever."""
    with pytest.raises(SystemExit, match=f"^fuzz.py: a worker made no progress for {HANG:g} s "
                                         "building the seeds of 'build_hang'$"):
        _campaign({"build_hang": 10}).run()


def test_the_inspect_target_decodes_its_seeds_and_reads_its_cases():
    """'inspect captures' patched capture._read_file, gone since captures are mapped
    (_map_file): every case, seeds included, was 'No such file or directory', counted
    as refused, and no capture was decoded. Its seeds (the QEMU captures, fastmfd's
    encoders', real sessions with a shared key and the old way with checksums) each
    decode at build, and some of its mutated cases are accepted."""
    import random

    import fastmfd.tools.inspect.capture as capture
    from _fuzz_targets import TARGETS
    reads_files = capture._map_file
    target = TARGETS["inspect captures"]
    state = target.build()
    names = [seed[0] for seed in state[1]]
    assert {"real shared key channels", "real old way checksum"} <= set(names), names
    rng, accepted = random.Random(SEED), 0
    for _ in range(60):
        try:
            target.run(state, target.make(rng, state))
            accepted += 1
        except fastmfd.FastMFDError as exc:
            assert "No such file" not in str(exc), exc
    assert accepted > 0
    # The reads go to the cases' bytes for each case only: patched for good, every later
    # inspect test of this xdist worker read the target's dict (KeyError; a full run).
    assert capture._map_file is reads_files


@pytest.mark.parametrize("name, cases", [("bench link text", 3000), ("bounded reprs", 150)])
def test_the_link_and_repr_targets_hold_their_oracles(name, cases):
    """'bench link text': parse_link refuses with a ConfigError only, and what it takes
    LinkSpec.same spells as the same rate and delay (400 nines were an OverflowError,
    27.42ms not the delay of its spelling '27420us'); 'bounded reprs': a result, its
    stats or any value's repr never raises and is bounded (a loader's int of 5000 digits
    or a released memoryview raised ValueError). Both outcomes occur for the links."""
    import random

    from _fuzz_targets import TARGETS
    target = TARGETS[name]
    state = target.build()
    rng, outcomes = random.Random(SEED), {"accepted": 0, "refused": 0}
    for _ in range(cases):
        try:
            target.run(state, target.make(rng, state))
            outcomes["accepted"] += 1
        except fastmfd.FastMFDError:
            outcomes["refused"] += 1
    assert outcomes["accepted"] > 0
    assert outcomes["refused"] > 0 or name == "bounded reprs"


def test_the_inspect_target_says_what_the_user_may_wrongly_say():
    """Its cases also read with --checksum, --packet-pages and --layout as a user may
    give them (--layout qemu-7.2 on a session whose SETUP says checksum raised
    ValueError), over a real checksummed session with a device-state channel."""
    import random

    from _fuzz_targets import TARGETS
    target = TARGETS["inspect captures"]
    state = target.build()
    assert "real checksum device channel channels" in [seed[0] for seed in state[1]]
    rng = random.Random(SEED)
    options = [target.make(rng, state)[3] for _ in range(200)]
    assert any(o.get("layout") == "qemu-7.2" for o in options)
    assert any(o.get("checksum") is False for o in options)
