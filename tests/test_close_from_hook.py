"""``close()`` from a hook of the running ``migrate()`` / ``receive()``, on the
call's own thread: ``on_stop``, ``on_setup``, a ``region_factory``, the
destination's ``on_resume``.

close() cancelled only a call running on another thread; on the call's own
thread it went straight on to free the workers, counters and pool under the
call, which then failed with an internal error ("ValueError: Counters is
closed", "AttributeError: 'NoneType' object has no attribute 'send'",
"AssertionError: after accept_main()") while the peer heard only that the
connection closed. Now it cancels the call, which fails with one
MigrationError that the peer hears too, and frees everything as it leaves.
"""

from __future__ import annotations

import os

import pytest

import fastmfd
from migration_support import Migration, make_region

MIB = 1 << 20
CONFIG = fastmfd.MigrationConfig(channels=2)


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


# hook -> the side whose owner the hook closes, and Migration.run()'s argument for it
HOOKS = {"on_stop": ("source", "on_stop"), "on_setup": ("destination", "dst_on_setup"),
         "region_factory": ("destination", None), "on_resume": ("destination", "dst_on_resume")}


@pytest.mark.parametrize("hook", HOOKS)
def test_close_from_a_hook_fails_the_call_and_tells_the_peer(hook, leaks):
    side, argument = HOOKS[hook]
    region = make_region("ram", MIB, seed=1)
    owners: dict[str, fastmfd.Source | fastmfd.Destination] = {}

    def close(*args: object) -> None:
        owners["closing"].close()

    def factory(name: str, size: int, page_size: int) -> fastmfd.Region:
        close()
        return fastmfd.Region.create(name, size, page_size=page_size)

    options = {"region_factory": factory} if hook == "region_factory" else {}
    run = {argument: close} if argument is not None else {}
    try:
        with Migration(CONFIG, **options) as m:
            m.source.add_region(region)
            owner = owners["closing"] = getattr(m, side)
            pids = owner.worker_pids()
            outcome = m.run(live=False, **run)
            name = type(owner).__name__
            said = f"the {name} was closed from a hook during the migration"
            for side, error in (("source", outcome.source_error),
                                ("destination", outcome.dest_error)):
                assert isinstance(error, fastmfd.MigrationError), \
                    f"the {side} ended with {error!r}"
                assert said in str(error), f"the {side}'s error does not say why: {error}"
            # Freed as the call left, not only by the Migration's close() below.
            assert owner.worker_pids() == [] and _alive(pids) == []
    finally:
        region.close()
    leaks.assert_clean()


def test_close_from_the_sources_on_resume_after_success(leaks):
    """The source's on_resume runs once the destination runs: closing there
    cancels nothing (the migration is over); it still frees as the call leaves."""
    region = make_region("ram", MIB, seed=2)
    try:
        with Migration(CONFIG) as m:
            m.source.add_region(region)
            pids = m.source.worker_pids()
            stats, result = m.run(live=False, on_resume=lambda: m.source.close()).ok()
            assert bytes(result.regions["ram"].buffer) == bytes(region.buffer)
            assert m.source.worker_pids() == [] and _alive(pids) == []
    finally:
        region.close()
    leaks.assert_clean()
