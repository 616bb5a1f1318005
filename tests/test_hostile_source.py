"""A destination against a source that sends what only a destination sends: the
message is refused by its type, before its length or its place in the session,
and both sides fail with one error saying so (the source hears it as the
destination's ERROR). The source here is ``FakeSource``, a script over sockets;
test_hostile_destination holds the other direction.
"""

from __future__ import annotations

import os

import pytest

import fastmfd
from fastmfd.protocol.handshake import main_channel_start
from fastmfd.protocol.main_channel import DESTINATION_SENDS, MESSAGE_HEADER, SOURCE_SENDS, Msg
from migration_support import FakeSource, receiving, setup_message

CONFIG = fastmfd.MigrationConfig(channels=1, packet_pages=16)


def _send_to_a_destination(header: bytes, after_setup: bool) -> tuple[str, str]:
    """A fake source sends ``header`` as its first message, or after SETUP's ACK;
    returns the destination's error and the ERROR the source was sent."""
    setup = setup_message(CONFIG, os.urandom(16), {"ram": 16 * 4096})
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=1, stall_timeout=5) as dst:
        thread, got = receiving(dst)
        source = FakeSource(dst.address, setup)
        try:
            if after_setup:
                assert source.open_main()[0] is Msg.SETUP_ACK
                source.main.sendall(header)
            else:
                source.main = source.connect(main_channel_start(True) + header)
            thread.join(10)
            assert not thread.is_alive(), "the destination still waits"
            source.main.settimeout(5)
            kind = None
            while kind is not Msg.ERROR:        # (KEEPALIVEs aside)
                kind, payload = source.reply()
        finally:
            source.close()
    assert set(got) == {"error"}, got
    return str(got["error"]), payload["error"]


# Judged by its length first, or by its place: "SETUP_ACK field 'length': received
# 33554432, expected <= 4096", "unexpected LOADED from the source while receiving", as
# if a source could have sent it.
@pytest.mark.parametrize("length", [0, 32 << 20])
@pytest.mark.parametrize("after_setup", [False, True], ids=["for-setup", "after-setup-ack"])
@pytest.mark.parametrize("kind", sorted(DESTINATION_SENDS - SOURCE_SENDS),
                         ids=lambda kind: kind.name)
def test_a_message_only_a_destination_sends_is_refused_by_its_type(kind, after_setup, length):
    error, told = _send_to_a_destination(MESSAGE_HEADER.pack(int(kind), length), after_setup)
    expected = f"main channel: received {kind.name}, which a source does not send"
    assert error == expected
    assert told == expected


# Before SETUP, a source's own message was judged by its length against a bound of 0
# for DEVICE_STATE ("field 'length': received 100, expected <= 0").
@pytest.mark.parametrize("kind,length", [(Msg.DEVICE_STATE, 100), (Msg.COMPLETE, 32 << 20)],
                         ids=lambda value: value.name if isinstance(value, Msg) else "")
def test_a_message_before_setup_is_refused_by_its_type(kind, length):
    error, told = _send_to_a_destination(MESSAGE_HEADER.pack(int(kind), length), False)
    assert error == told == f"main channel: received {kind.name}, expected SETUP"
