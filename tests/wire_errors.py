"""Helpers for validation tests: break one field, expect the right ProtocolError."""

from __future__ import annotations

import struct
from contextlib import contextmanager

import pytest

from fastmfd.errors import ProtocolError


@contextmanager
def raises_protocol_error(field: str, received, expected: str):
    """Expect a ProtocolError for ``field`` whose message names both values.

    ``received`` must be the value reported exactly (as text); ``expected``
    is a piece of text the expectation must contain.
    """
    with pytest.raises(ProtocolError) as info:
        yield info
    err = info.value
    message = str(err)
    assert err.field == field, message
    assert str(err.received) == str(received), message
    assert expected in str(err.expected), message
    assert f"'{field}'" in message, message
    assert f"received {received}" in message, message
    assert f"expected {err.expected}" in message, message


def put_u32(buf: bytes | bytearray, offset: int, value: int) -> bytearray:
    """A copy of ``buf`` with a big-endian u32 written at ``offset``."""
    out = bytearray(buf)
    struct.pack_into(">I", out, offset, value)
    return out


def put_u64(buf: bytes | bytearray, offset: int, value: int) -> bytearray:
    out = bytearray(buf)
    struct.pack_into(">Q", out, offset, value)
    return out


def put_bytes(buf: bytes | bytearray, offset: int, value: bytes) -> bytearray:
    out = bytearray(buf)
    out[offset:offset + len(value)] = value
    return out
