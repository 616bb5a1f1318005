"""wire.decode_control: any payload a peer sends is a JSON object or a ProtocolError."""

from __future__ import annotations

import json

import pytest

from fastmfd import MigrationConfig
from fastmfd.protocol.setup import Setup

from fastmfd.errors import ProtocolError
from fastmfd.protocol.main_channel import MAX_ERROR_CHARS, Msg, decode_control, decode_payload


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


@pytest.mark.parametrize("where", ["page_size", "regions", "round"])
def test_a_value_nested_as_deep_as_json_allows_is_a_protocol_error(where):
    """Found by benchmarks/fuzz.py: a value nested just shallow enough for the
    JSON decoder was too deep to show in the error message (RecursionError from
    repr). Every depth, up to past the decoder's limit, is a ProtocolError."""
    setup = json.dumps(Setup(uuid=bytes(16), **MigrationConfig().session_values(),
                             regions=(), devices=()).encode()).encode()
    for depth in range(1, 1200):
        nested = b"[" * depth + b"]" * depth
        if where == "round":
            kind, body = Msg.ROUND_END, b'{"round": ' + nested + b"}"
        else:
            kind = Msg.SETUP
            old = b'"page_size": 4096' if where == "page_size" else b'"regions": []'
            body = setup.replace(old, f'"{where}": ['.encode() + nested + b"]")
        with pytest.raises(ProtocolError):
            decode_payload(kind, body)


def test_a_peers_error_reaches_the_user_escaped_on_one_line():
    """The peer's reason is shown to a user: its control characters are escaped,
    newlines too (one forged a line of the user's output or log), and it is cut
    at MAX_ERROR_CHARS."""
    body = json.dumps({"error": "bad\x1b[2J\rline\nnext\x07"}).encode()
    assert decode_payload(Msg.ERROR, body).error == "bad\\x1b[2J\\x0dline\\nnext\\x07"
    long = decode_payload(Msg.ERROR, json.dumps({"error": "y" * 5000}).encode()).error
    assert long == "y" * MAX_ERROR_CHARS + f"... ({5000 - MAX_ERROR_CHARS} more)"


def test_unicode_that_is_no_text_is_escaped_too():
    """Bidi overrides and isolates (a line shown reversed), U+2028/U+2029 (a new line
    to log viewers and str.splitlines), zero-width characters and the BOM (hidden
    text), private-use and unassigned code points came through (a review); letters
    of any script, spaces of other widths and emoji stay."""
    from fastmfd.errors import printable
    hostile = "ok\u2028forged \u202egnp.exe\u202c \u2066x\u2069\u200b\ufeff\ue000\U000e0001"
    assert printable(hostile) == ("ok\\u2028forged \\u202egnp.exe\\u202c \\u2066x\\u2069"
                                  "\\u200b\\ufeff\\ue000\\U000e0001")
    assert printable("para\u2029\x85\x1b[2J") == "para\\u2029\\x85\\x1b[2J"
    assert printable("\ud800 lone") == "\\ud800 lone"
    assert printable("\u0378") == "\\u0378"           # unassigned
    text = "Grüße, 日本語, עברית\u00a0\u3000🙂\tand\nlines"
    assert printable(text) == text


def test_precopy_sent_and_switchover_ack_decode():
    from fastmfd.protocol.main_channel import PrecopySent, encode_message
    message = encode_message(Msg.PRECOPY_SENT, PrecopySent([3, 0, 17]))
    assert decode_payload(Msg.PRECOPY_SENT, message[8:]) == PrecopySent([3, 0, 17])
    assert decode_payload(Msg.SWITCHOVER_ACK, b"") is None


@pytest.mark.parametrize("kind, body, field", [
    (Msg.PRECOPY_SENT, b'{"device_chunks": [-1]}', "device_chunks"),
    (Msg.PRECOPY_SENT, b'{"device_chunks": [true]}', "device_chunks"),
    (Msg.PRECOPY_SENT, b'{"device_chunks": 3}', "device_chunks"),
    (Msg.PRECOPY_SENT, b'{"device_chunks": [' + b"1," * 4096 + b'1]}', "device_chunks"),
    (Msg.PRECOPY_SENT, b'{"device_chunks": [], "more": 1}', "payload"),
    (Msg.SWITCHOVER_ACK, b'{"round": 1}', "payload"),
], ids=["negative", "bool", "not-a-list", "too-many", "unknown-field", "ack-not-empty"])
def test_bad_switchover_messages_are_protocol_errors(kind, body, field):
    with pytest.raises(ProtocolError) as info:
        decode_payload(kind, body)
    assert info.value.field == field


def _complete(row: dict) -> bytes:
    return json.dumps({"channels": [row], "device_chunks": []}).encode()


@pytest.mark.parametrize("row", [
    {"packets": 1, "normal_page": 2, "zero_pages": 0, "device_packets": 0},   # a key damaged
    {"packets": 1},
    {**{f"c{i}": 0 for i in range(100)}, "packets": 1, "normal_pages": 2, "zero_pages": 0,
     "device_packets": 0},
], ids=["damaged-key", "missing-keys", "too-many-keys"])
def test_complete_counters_name_every_counter_checked(row):
    # A damaged key was taken, and the count check then said "the source sent None
    # normal pages, 216 arrived" (a fuzz review).
    with pytest.raises(ProtocolError) as info:
        decode_payload(Msg.COMPLETE, _complete(row))
    assert info.value.field == "channels"
    assert ("objects of at most 64 counts, each with packets, normal_pages, zero_pages, "
            "device_packets") in str(info.value)


def test_complete_counters_beyond_those_checked_are_taken():
    from fastmfd.protocol.main_channel import Complete
    row = {"packets": 1, "normal_pages": 2, "zero_pages": 0, "device_packets": 0, "syncs": 3}
    assert decode_payload(Msg.COMPLETE, _complete(row)) == Complete([row], [])


def test_a_setup_gives_back_the_config_that_made_it():
    # Setup.to_config_kwargs: what a destination's hook gets, under MigrationConfig's
    # names (device_chunk_size is SETUP's chunk_size), through the wire and back.
    config = MigrationConfig(channels=3, compression="zstd", compression_level=7,
                             checksum=True, device_chunk_size=1 << 20, stall_timeout=12.5)
    setup = Setup(uuid=bytes(16), **config.session_values(), regions=(), devices=())
    received = Setup.decode(json.loads(json.dumps(setup.encode())))
    assert MigrationConfig(**received.to_config_kwargs()) == config
