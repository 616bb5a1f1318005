"""Counters: per-channel totals and the session's packet number in shared memory."""

from __future__ import annotations

import pytest

from fastmfd import _core

# The names Counters.read() reports, in row order: the main processes sum them by name.
FIELDS = ("packets", "normal_pages", "zero_pages", "wire_bytes", "device_packets",
          "device_bytes", "syncs", "jobs", "compressed_payloads", "raw_payloads")


def test_rows_start_at_zero_and_attach_sees_the_same_memory():
    with _core.Counters.create(3) as counters:
        assert counters.nrows == 3
        assert counters.read(2) == dict.fromkeys(FIELDS, 0)
        other = _core.Counters.attach(counters.name)
        try:
            assert other.total("packets") == 0
        finally:
            other.close()


def test_a_row_out_of_range_is_an_index_error():
    with _core.Counters.create(1) as counters:
        with pytest.raises(IndexError):
            counters.read(1)
        with pytest.raises(ValueError):
            counters.total("no such field")


def test_use_after_close_raises_instead_of_crashing():
    counters = _core.Counters.create(1)
    counters.close()
    for use in (lambda: counters.read(0), lambda: counters.total("packets"),
                lambda: counters.nrows):
        with pytest.raises(ValueError, match="closed"):
            use()
