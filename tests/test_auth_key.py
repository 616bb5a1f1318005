"""The shared-key mode (issue #8): every connection proves it knows ``auth_key``
with an HMAC-SHA256 challenge-response bound to the session UUID and the
channel. A source without the key (or with another) is refused — told why,
within 5 s — while the destination goes on waiting and writes nothing; a
recorded proof cannot be replayed into another connection or channel.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from typing import Iterator

import numpy as np
import pytest

import fastmfd
from fastmfd.errors import NoSourceError, SecurityError
from fastmfd.protocol import security
from fastmfd.protocol.handshake import SocketStream, main_channel_start
from fastmfd.protocol.main_channel import MESSAGE_HEADER, Msg, encode_message
from migration_support import FakeSource, Migration, hello, make_region, ram_packet, \
    receiving, setup_message
from test_handshake import wait_refused

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CONFIG = fastmfd.MigrationConfig(channels=2, packet_pages=16, auth_key=KEY)
SIZE = 64 * 4096


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("channels,device_channels", [(1, 0), (2, 1)])
def test_migration_with_a_shared_key_is_byte_exact(transport, channels, device_channels):
    config = CONFIG.replace(channels=channels, device_state_channels=device_channels)
    region = make_region("ram", 1 << 20, seed=5)
    with Migration(config, transport=transport, auth_key=KEY) as m:
        m.source.add_region(region)
        m.source.add_device(fastmfd.BytesDevice("dev", 0, b"state" * 1000))
        _, result = m.run().ok()
        assert np.array_equal(result.regions["ram"].array, region.array)
        assert result.devices[("dev", 0)] == b"state" * 1000
        assert m.destination.refused == []
    region.close()


@pytest.mark.parametrize("source_key,destination_key,source_says,destination_says", [
    # Neither side can tell which key is the wrong one: each says the keys differ
    # (it once told the source "the destination does not know the auth_key").
    (OTHER_KEY, KEY, r"^main channel to .*: the destination's auth_key proof does not match "
                     r"this source's key: the two sides' auth_keys differ \(either may be "
                     r"the wrong one; both must hold the same key\), or this is not the "
                     r"destination meant$",
     r"wrong auth_key proof: the source's proof does not match this destination's key for "
     r"this session and channel: the two sides' auth_keys differ \(either may be the wrong "
     r"one; both must hold the same key\)$"),
    (None, KEY, r"requires an auth_key proof; the source sent none",
     r"requires an auth_key proof; the source sent none"),
    (KEY, None, r"the source proves an auth_key; this destination has none",
     r"the source proves an auth_key; this destination has none"),
], ids=["wrong key", "no key at the source", "no key at the destination"])
def test_a_source_without_the_key_is_refused(source_key, destination_key, source_says,
                                             destination_says):
    with make_region("ram", SIZE, seed=1) as region, make_region("ram", SIZE) as target, \
            Migration(CONFIG.replace(auth_key=source_key), auth_key=destination_key) as m:
        target.array[:] = 0xAB
        m.source.add_region(region)
        m.destination.add_region(target)
        error, refused = m.run_refused()
        assert re.search(source_says, str(error)), str(error)
        # It says where, as a failed connect does (the wrong key's message once named
        # neither the channel nor the address).
        assert str(error).startswith(f"main channel to {m.source.address}: "), str(error)
        assert re.search(destination_says, refused[0].reason), refused[0].reason
        assert np.all(target.array == 0xAB), "a byte reached the region"


def test_a_wait_no_source_passed_names_the_connections_it_refused():
    """A source with another key is refused, and the destination waits on for its
    source: when none came within its timeout, its failure names what it refused
    meanwhile. It said only "no connection for the main channel passed its greeting
    within 2 s", the wrong key in its log alone."""
    with fastmfd.Destination("tcp:127.0.0.1:0", timeout=2, auth_key=KEY) as dst, \
            make_region("ram", SIZE, seed=1) as region:
        thread, got = receiving(dst)
        with fastmfd.Source(dst.address, CONFIG.replace(auth_key=OTHER_KEY)) as src:
            src.add_region(region)
            with pytest.raises(SecurityError, match="auth_key proof does not match"):
                src.migrate(live=False)
        thread.join(10)
    error = got.get("error")
    assert isinstance(error, NoSourceError), got
    assert re.search(r"^no connection for the main channel passed its greeting within 2 s; "
                     r"refused 1 connection meanwhile \(127\.0\.0\.1:\d+: .*wrong auth_key "
                     r"proof.*\)$", str(error)), str(error)


class Recorder:
    """A stream that records what the client sends."""

    def __init__(self, stream) -> None:
        self.stream, self.sent = stream, []

    def send_all(self, data, what="handshake"):
        self.sent.append(bytes(data))
        self.stream.send_all(data, what)

    def recv_exact(self, size, what="handshake"):
        return self.stream.recv_exact(size, what)


class Replayer:
    """A client that replays recorded messages, whatever the server says."""

    def __init__(self, stream, recorded) -> None:
        self.stream, self.recorded = stream, list(recorded)

    def run(self, reply_size: int) -> None:
        self.stream.send_all(self.recorded[0])
        self.stream.recv_exact(reply_size)
        self.stream.send_all(self.recorded[1])


def _pair():
    a, b = socket.socketpair()
    return SocketStream(a, "client"), SocketStream(b, "server"), (a, b)


def _exchange(client_call, server_call):
    """Run both sides at once; returns the server's outcome (None or its error)."""
    outcome: list = []

    def serve():
        try:
            server_call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client_call()
    except SecurityError:
        pass
    thread.join(5)
    return outcome[0]


UUID = bytes(range(16))


@pytest.mark.parametrize("replay_into", ["the same channel", "another channel",
                                         "another session"])
def test_a_recorded_proof_cannot_be_replayed(replay_into):
    client, server, socks = _pair()
    recorder = Recorder(client)
    assert _exchange(lambda: security.prove_key(recorder, KEY, UUID, 0),
                     lambda: security.check_key_proof(server, KEY, UUID, 0)) is None
    for sock in socks:
        sock.close()

    client, server, socks = _pair()
    uuid, channel = {"the same channel": (UUID, 0), "another channel": (UUID, 1),
                     "another session": (bytes(16), 0)}[replay_into]
    replay = Replayer(client, recorder.sent)
    error = _exchange(lambda: replay.run(security.NONCE_SIZE + security.PROOF_SIZE),
                      lambda: security.check_key_proof(server, KEY, uuid, channel))
    assert isinstance(error, SecurityError) and "wrong auth_key proof" in str(error)
    for sock in socks:
        sock.close()


def test_a_channel_with_the_right_uuid_but_no_proof_is_dropped():
    """Knowing the session's UUID is not enough: a channel must prove the key."""
    target = make_region("ram", SIZE)
    target.array[:] = 0xAB
    with fastmfd.Destination("tcp:127.0.0.1:0", timeout=10, auth_key=KEY,
                             handshake_timeout=1.0) as dst:
        dst.add_region(target)
        thread = threading.Thread(target=lambda: _swallow(dst.receive), daemon=True)
        thread.start()
        source = FakeSource(dst.address, setup_message(CONFIG, UUID, {"ram": SIZE}),
                            auth_key=KEY)
        try:
            assert source.open_main()[0].name == "SETUP_ACK"
            marker = ram_packet(CONFIG, "ram", list(range(16)), fill=0xEE)
            source.connect(hello(0, UUID) + bytes(security.NONCE_SIZE)
                           + bytes(security.PROOF_SIZE) + marker)
            wait_refused(dst, r"wrong auth_key proof|connection closed")
            assert thread.is_alive()
            assert np.all(target.array == 0xAB), "a byte reached the region"
        finally:
            dst.cancel("the test is over")
            thread.join(10)
            source.close()
    target.close()


@contextlib.contextmanager
def a_stranger_in_the_proof(then: bytes) -> Iterator[fastmfd.Destination]:
    """A destination with a shared key, waiting for its source, and a stranger that
    begins the proof (its AUTH nonce), then sends ``then``; the destination is
    yielded while the stranger's connection is open."""
    with fastmfd.Destination("tcp:127.0.0.1:0", timeout=10, auth_key=KEY,
                             handshake_timeout=10.0) as dst:
        thread = threading.Thread(target=lambda: _swallow(dst.receive), daemon=True)
        thread.start()
        _, host, port = dst.address.split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(main_channel_start(True) + encode_message(Msg.AUTH, bytes(16))
                             + then)
                yield dst
            assert thread.is_alive()
        finally:
            dst.cancel("the test is over")
            thread.join(10)


@pytest.mark.parametrize("kind,length", [(Msg.ERROR, 16 << 20), (Msg.AUTH, 31)],
                         ids=["a 16 MiB ERROR", "a short AUTH"])
def test_a_message_in_the_proof_is_refused_on_its_header(kind, length):
    """A stranger in the middle of the proof has proved nothing: an AUTH of another
    size than expected, or an ERROR longer than any, is refused on its header, its
    payload unread (as is a message of another type, below). It was allocated whole
    and waited for: 16 MiB of the destination's memory per connection, each held for
    the handshake timeout."""
    with a_stranger_in_the_proof(MESSAGE_HEADER.pack(int(kind), length)) as dst:
        wait_refused(dst, rf"expected an AUTH message of {security.NONCE_SIZE} bytes, "
                          rf"received {kind.name} of {length}$"
                     if kind is not Msg.ERROR else    # no ERROR is longer than 64 KiB
                     rf"main channel ERROR field 'length': received {length}, expected <= "
                     rf"{64 << 10}$")


# By its type, before its length (and its payload unread: only the header is sent): a
# DEVICE_STATE was refused as "main channel DEVICE_STATE field 'length': received 100,
# expected <= 0", a ROUND_END as longer than its 4 KiB, as if either could have come.
@pytest.mark.parametrize("kind,length,says", [
    (Msg.DEVICE_STATE, 100, "expected AUTH or ERROR"),
    (Msg.ROUND_END, 64 << 10, "expected AUTH or ERROR"),
    (Msg.SETUP, 1 << 20, "expected AUTH or ERROR"),
    (Msg.SETUP_ACK, 64 << 10, "which a source does not send"),
], ids=lambda value: value.name if isinstance(value, Msg) else "")
def test_a_message_in_the_proof_is_judged_by_its_type_first(kind, length, says):
    with a_stranger_in_the_proof(MESSAGE_HEADER.pack(int(kind), length)) as dst:
        wait_refused(dst, rf"^main channel: received {kind.name}, {says}$")


@pytest.mark.parametrize("kind,length,says", [
    (Msg.DEVICE_STATE, 100, "which a destination does not send"),
    (Msg.LOADED, 5 << 20, "expected AUTH or ERROR"),
    (Msg.SETUP_ACK, 0, "expected AUTH or ERROR"),
], ids=lambda value: value.name if isinstance(value, Msg) else "")
def test_a_destination_s_message_in_the_proof_is_judged_by_its_type_first(kind, length, says):
    """The source reads the destination's half of the proof the same way."""
    listener = socket.create_server(("127.0.0.1", 0))
    greeting = 12 + 8 + 8 + 16 + 8 + security.NONCE_SIZE  # header, preamble, AUTH(uuid, nonce)

    def destination() -> None:
        sock, _ = listener.accept()
        with sock:
            got = b""
            while len(got) < greeting:
                got += sock.recv(greeting - len(got))
            sock.sendall(MESSAGE_HEADER.pack(int(kind), length))
            sock.recv(1 << 16)              # until the source gives up
    thread = threading.Thread(target=destination, daemon=True)
    thread.start()
    address = "tcp:127.0.0.1:%d" % listener.getsockname()[1]
    try:
        with make_region("ram", SIZE, seed=1) as region, \
                fastmfd.Source(address, CONFIG.replace(timeout=5)) as source:
            source.add_region(region)
            with pytest.raises(fastmfd.MigrationError) as error:
                source.migrate(live=False)
        assert re.search(rf"main channel: received {kind.name}, {says}$", str(error.value)), \
            str(error.value)
    finally:
        thread.join(10)
        listener.close()


def test_a_stranger_s_own_words_are_kept_short_and_on_one_line(caplog):
    """Why a peer that proved nothing says it refused us is its own text: 64 KiB
    of it, newlines kept, was each Refusal (a thousand are kept) and each log
    line, where its newlines forged lines of their own (a review)."""
    forged = "\nWARNING fastmfd: migration from 10.0.0.1 loaded and verified\n"
    words = ((forged + "x" * 200) * 250)[:60000]
    with a_stranger_in_the_proof(encode_message(Msg.ERROR, {"error": words})) as dst:
        wait_refused(dst, r"the peer refused: \\nWARNING fastmfd: .*\.\.\. \(\d+ more\)$")
    reason = dst.refused[0].reason
    assert len(reason) < 400 and "\n" not in reason
    assert "\nWARNING fastmfd: migration from" not in caplog.text


def test_a_stranger_s_unicode_controls_are_escaped(caplog):
    """A stranger's words with a bidi override, a line separator and zero-width
    characters reached the log as they were: a forged line, text shown reversed
    or hidden (a review). They arrive escaped."""
    words = ("wrong key\u20282026-12-07 09:00:00,000 fastmfd: session ok "
             "\u202egnp.exe\u202c \u200b\u2066\ufeff")
    with a_stranger_in_the_proof(encode_message(Msg.ERROR, {"error": words})) as dst:
        wait_refused(dst, r"the peer refused: wrong key\\u20282026-12-07 .*\\u202egnp\.exe"
                          r"\\u202c \\u200b\\u2066\\ufeff$")
    for char in "\u2028\u202e\u202c\u200b\u2066\ufeff":
        assert char not in dst.refused[0].reason and char not in caplog.text


def _swallow(call):
    try:
        call()
    except fastmfd.MigrationError:
        pass


@pytest.mark.parametrize("key,error,message", [
    (b"short", fastmfd.ConfigError, "auth_key must be at least 16 bytes"),
    ("text", TypeError, r"\(auth_key\) must be bytes or None, not str"),
])
def test_a_weak_key_is_a_config_error_a_mistyped_one_a_type_error(key, error, message):
    with pytest.raises(error, match=message):
        fastmfd.MigrationConfig(auth_key=key)
    with pytest.raises(error, match=message):
        fastmfd.Destination("tcp:127.0.0.1:0", auth_key=key)


def test_the_key_never_shows_in_a_repr():
    assert KEY.decode() not in repr(CONFIG)


@pytest.mark.parametrize("content,key", [(b"0123456789abcdef\n", b"0123456789abcdef"),
                                         (b"0123456789abcdef\r\n", b"0123456789abcdef"),
                                         (b"\x00binary\n\n", b"\x00binary\n"),
                                         (b"no line end", b"no line end")])
def test_a_key_file_loses_one_line_end_only(tmp_path, content, key):
    # Every trailing CR and LF went, a binary key's own last bytes too.
    from fastmfd.protocol.security import read_key_file
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(0o600)
    assert read_key_file(str(path)) == key


def test_a_proof_never_answered_is_named_in_the_timeout():
    """A destination that took a channel and never answered its auth_key proof was
    "send channel 0: timed out waiting for handshake" (a review)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        stream = SocketStream(ours, "send channel 0", time.monotonic() + 0.2)
        with pytest.raises(fastmfd.MigrationError, match=r"^send channel 0: timed out waiting "
                                                         r"for the destination's auth_key proof"):
            security.prove_key(stream, b"k" * 32, bytes(16), 1, "send channel 0")
