"""wire.decode_control: any payload a peer sends is a JSON object or a ProtocolError."""

from __future__ import annotations

import pytest

from fastmfd.errors import ProtocolError
from fastmfd.protocol.main_channel import Msg, decode_control


def test_a_json_object_is_returned():
    assert decode_control(Msg.SETUP, b'{"page_size": 4096}') == {"page_size": 4096}
    assert decode_control(Msg.COMPLETE, b"") == {}


@pytest.mark.parametrize("body", [
    b"[" * 100_000,                 # nesting deeper than the JSON decoder's recursion limit
    b'{"a": ' * 100_000,
    b"\xff\xfe",                    # not UTF-8
    b'{"a": 1',                     # not JSON
    b"[1, 2]",                      # not an object
], ids=["deep-array", "deep-object", "not-utf8", "not-json", "not-object"])
def test_anything_else_is_a_protocol_error(body):
    with pytest.raises(ProtocolError) as info:
        decode_control(Msg.SETUP, body)
    assert info.value.field == "payload"
