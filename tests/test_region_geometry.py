"""A destination's region must match what the source sends: its size and its pages.

A region made by the destination's ``region_factory`` was taken as it came
(found in review): one of 4 KiB pages in a session of 1 KiB pages had its
received-page map indexed in the session's pages, four times past its end,
and the receive worker died writing outside it (or, with the next page
mapped, corrupted it silently). Now it is refused like a region given with
``add_region``, and the core refuses a map too small for the session's pages.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

import fastmfd
from fastmfd import _core
from fastmfd._engine.session import SessionResources
from migration_support import Migration

MIB = 1 << 20


def _source_region(page_size: int) -> fastmfd.Region:
    region = fastmfd.Region.create("ram", 4 * MIB, page_size=page_size)
    region.array[:] = np.random.default_rng(3).integers(0, 256, region.size, dtype=np.uint8)
    return region


@pytest.mark.parametrize("made, expected", [
    (lambda name, size, page_size: fastmfd.Region.create(name, size),
     "1024-byte pages, the destination's region has 4194304 bytes in 4096-byte pages"),
    (lambda name, size, page_size: fastmfd.Region.create(name, size // 2, page_size=page_size),
     "4194304 bytes in 1024-byte pages, the destination's region has 2097152 bytes"),
], ids=["other pages", "other size"])
def test_a_factory_region_that_does_not_match_fails_both_sides(made, expected):
    config = fastmfd.MigrationConfig(channels=2, page_size=1024)
    image = _source_region(1024)
    try:
        with Migration(config, region_factory=made) as m:
            m.source.add_region(image)
            outcome = m.run(timeout=30)
    finally:
        image.close()
    for side, error in (("source", outcome.source_error), ("destination", outcome.dest_error)):
        assert isinstance(error, fastmfd.FastMFDError), f"the {side} ended with {error!r}"
        assert "region 'ram'" in str(error) and expected in str(error), f"{side}: {error}"


def test_a_factory_that_returns_no_region_fails_both_sides_and_frees_everything():
    # A factory that forgot its `return`: it failed with "'NoneType' object has no
    # attribute 'zero_filled'", the None was owned, and closing it at the end stopped
    # the release, leaving the listening socket open after the `with`.
    config = fastmfd.MigrationConfig(channels=2, page_size=1024)
    image = _source_region(1024)
    try:
        with Migration(config, region_factory=lambda name, size, page_size: None) as m:
            m.source.add_region(image)
            outcome = m.run(timeout=30)
            host, port = m.destination.address[len("tcp:"):].rsplit(":", 1)
    finally:
        image.close()
    expected = (f"TypeError: region_factory('ram', {4 * MIB}, 1024)'s result must be a "
                f"fastmfd.Region, not NoneType")
    for side, error in (("source", outcome.source_error), ("destination", outcome.dest_error)):
        assert isinstance(error, fastmfd.MigrationError), f"the {side} ended with {error!r}"
        assert expected in str(error), f"{side}: {error}"
    with socket.socket() as probe:
        assert probe.connect_ex((host, int(port))) != 0, "the listener was left open"


def test_a_resource_that_fails_to_close_does_not_keep_the_others_open():
    resources = SessionResources()
    listener = resources.own(socket.create_server(("127.0.0.1", 0)))
    closed = []

    class Failing:
        def close(self):
            raise RuntimeError("close failed")

    class Recorded:
        def close(self):
            closed.append(self)

    last = resources.own(Recorded())
    resources.own(Failing())
    resources.own(Recorded())
    with pytest.raises(RuntimeError, match="close failed"):
        resources.release()
    assert listener.fileno() == -1 and last in closed and len(closed) == 2
    resources.release()         # nothing is left to close, nor to fail again


def test_a_matching_factory_region_receives_the_image():
    config = fastmfd.MigrationConfig(channels=2, page_size=1024)
    image = _source_region(1024)
    try:
        with Migration(config, region_factory=lambda name, size, page_size:
                       fastmfd.Region.create(name, size, page_size=page_size)) as m:
            m.source.add_region(image)
            _, result = m.run(timeout=30).ok()
            assert np.array_equal(result.regions["ram"].array, image.array)
    finally:
        image.close()


def test_the_core_refuses_a_received_map_too_small_for_the_sessions_pages():
    # A 64 KiB region of 4 KiB pages has a map of 16 bits; in 1 KiB pages it needs 64.
    params = {"page_size": 1024, "packet_pages": 16, "checksum": False,
              "zero_page_detection": True}
    a, b = socket.socketpair()
    with fastmfd.Region.create("ram", 64 << 10) as region, \
            _core.Counters.create(1, tag="test-counters") as counters, \
            _core.DirtyBitmap.create(16, tag="test-received") as received:
        try:
            with pytest.raises(ValueError, match="received map smaller than its region"):
                _core.RecvEngine(b.fileno(), 0, params, None, [region], counters, [received],
                                 [True], None, [], -1, True)
        finally:
            a.close()
            b.close()
