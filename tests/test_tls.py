"""TLS on every connection (issue #8), with real certificates from trustme.

Migrations over TLS are byte-exact whatever the channels, compression and
device-state arrangement; nothing of the image crosses the wire in clear; and
every way a peer can fail to prove itself — another CA, an expired or
misnamed certificate, no client certificate, an identity outside ``authz``,
plaintext meeting TLS either way — is refused within 5 s, named on both
sides, with nothing written at the destination and the destination still
waiting for its real source.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import trustme

import fastmfd
from fastmfd import _core
from fastmfd._engine.processes import Watch
from fastmfd.protocol import handshake
from fastmfd.protocol.main_channel import (MESSAGE_HEADER, Msg, decode_message_header,
                                           encode_message, encode_preamble)
from fastmfd.protocol.security import ChannelSecurity
from fastmfd.protocol.sockets import recv_exact
from fastmfd.tools.security_options import LOCAL_CLIENT
from migration_support import Migration, make_region, stopped_in_setup

SIZE = 1 << 20


def _write(tmp_path, name: str, blob) -> str:
    path = str(tmp_path / name)
    blob.write_to_path(path)
    os.chmod(path, 0o600)               # a key others may read is refused
    return path


def _identity(tmp_path, ca: trustme.CA, name: str, *identities: str, **validity):
    """A certificate chain and key file for ``identities``, issued by ``ca``."""
    cert = ca.issue_cert(*identities, **validity)
    chain = tmp_path / f"{name}.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return str(chain), _write(tmp_path, f"{name}-key.pem", cert.private_key_pem)


@pytest.fixture
def pki(tmp_path):
    """A CA, the destination's certificate (localhost, 127.0.0.1) and the source's."""
    ca = trustme.CA()
    ca_path = _write(tmp_path, "ca.pem", ca.cert_pem)
    server = _identity(tmp_path, ca, "server", "localhost", "127.0.0.1")
    client = _identity(tmp_path, ca, "client", LOCAL_CLIENT)

    class Pki:
        def source(self, **changes) -> fastmfd.TLSConfig:
            values = dict(cert=client[0], key=client[1], ca=ca_path) | changes
            return fastmfd.TLSConfig(**values)

        def destination(self, **changes) -> fastmfd.TLSConfig:
            values = dict(cert=server[0], key=server[1], ca=ca_path) | changes
            return fastmfd.TLSConfig(**values)

        def other_ca(self, name: str, *identities: str, **validity):
            """A certificate from another CA (and that CA's file)."""
            other = trustme.CA()
            return (_write(tmp_path, f"{name}-ca.pem", other.cert_pem),
                    _identity(tmp_path, other, name, *identities, **validity))

        def issue(self, name: str, *identities: str, **validity):
            return _identity(tmp_path, ca, name, *identities, **validity)
    return Pki()


def _migrate(config, dst_tls, *, transport="tcp", states: dict = {}, **dst):
    """Migrate a region and a BytesDevice per ``states`` entry (idstr -> bytes)."""
    with make_region("ram", SIZE, seed=7, zero=0.2, text=0.4) as region, \
            Migration(config, transport=transport, tls=dst_tls, **dst) as m:
        m.source.add_region(region)
        for idstr, state in states.items():
            m.source.add_device(fastmfd.BytesDevice(idstr, 0, state))
        _, result = m.run().ok()
        assert np.array_equal(result.regions["ram"].array, region.array)
        assert {idstr: result.devices[(idstr, 0)] for idstr in states} == states
        assert m.destination.refused == []


@pytest.mark.parametrize("transport,channels,compression", [
    ("tcp", 1, "none"), ("tcp", 2, "zstd"), ("unix", 2, "zlib"), ("tcp", 4, "none"),
    ("unix", 4, "zstd")])
def test_a_migration_over_tls_is_byte_exact(pki, transport, channels, compression):
    hostname = {"unix": "localhost"}.get(transport)
    config = fastmfd.MigrationConfig(channels=channels, compression=compression,
                                     tls=pki.source(hostname=hostname))
    _migrate(config, pki.destination(), transport=transport, states={"dev": b"state" * 3000})


def test_a_preallocating_destination_over_tls(pki):
    # Its KEEPALIVEs before SETUP_ACK travel inside TLS like every main-channel message.
    config = fastmfd.MigrationConfig(channels=2, tls=pki.source())
    _migrate(config, pki.destination(), prealloc=True, states={"dev": b"state" * 3000})


@pytest.mark.parametrize("prealloc", [False, True], ids=["", "prealloc"])
def test_a_source_cancelled_before_setup_ack_says_why_over_tls(pki, prealloc):
    """Its ERROR, sent while the handshake's thread waits for SETUP_ACK on the same
    TLS connection, reaches the destination (which was not told)."""
    config = fastmfd.MigrationConfig(channels=2, tls=pki.source())
    source_error, destination_error = stopped_in_setup(
        lambda source: source.cancel("cancelled by the test"), config,
        tls=pki.destination(), prealloc=prealloc)
    assert "cancelled by the test" in str(source_error), source_error
    assert "main channel: the source failed: cancelled by the test" in \
        str(destination_error), destination_error


@pytest.mark.parametrize("arrangement", ["old way", "dedicated device channels",
                                         "with auth_key"])
def test_device_state_over_tls(pki, arrangement):
    changes = {"old way": dict(channel_header=False),
               "dedicated device channels": dict(device_state_channels=2),
               "with auth_key": dict(auth_key=b"k" * 32)}[arrangement]
    config = fastmfd.MigrationConfig(channels=2, tls=pki.source(), **changes)
    _migrate(config, pki.destination(), auth_key=changes.get("auth_key"),
             states={f"dev{i}": bytes([i]) * 300_000 for i in range(3)})


# TLS 1.2 ciphers for trustme's keys (ECDSA, or RSA in older versions), and a TLS 1.3 suite.
TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
TLS13_SUITE = "TLS_CHACHA20_POLY1305_SHA256"


@pytest.mark.parametrize("ciphers,version", [(TLS12_CIPHERS, "TLSv1.2"),
                                             (TLS13_SUITE, "TLSv1.3")],
                         ids=["TLS 1.2 ciphers", "a TLS 1.3 suite"])
def test_ciphers_hold_on_the_main_channel_too(pki, ciphers, version):
    """``ciphers`` applies to the main channel as to the channels: TLS 1.2 names
    alone keep it to TLS 1.2 and a cipher named (it negotiated TLS 1.3 with a
    suite not named), TLS 1.3 names alone to TLS 1.3 (they were a ConfigError)."""
    source = pki.source(ciphers=ciphers)
    destination = pki.destination(ciphers=ciphers)
    a, b = socket.socketpair()
    negotiated: list = []

    def serve():
        with destination.server_context().wrap_socket(a, server_side=True) as tls:
            negotiated.append((tls.version(), tls.cipher()[0]))
    thread = threading.Thread(target=serve)
    thread.start()
    with source.client_context("localhost").wrap_socket(b, server_hostname="localhost"):
        thread.join(10)
    assert negotiated and negotiated[0][0] == version, negotiated
    if version == "TLSv1.2":
        assert negotiated[0][1] in ciphers.split(":"), negotiated
    _migrate(fastmfd.MigrationConfig(channels=2, tls=source), destination)


class Tap:
    """A relay in front of the destination that records every byte the source sends."""

    def __init__(self, upstream: str) -> None:
        _, host, port = upstream.split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.recorded = bytearray()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b, record in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._relay, args=(a, b, record), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _relay(self, a, b, record) -> None:
        try:
            while data := a.recv(1 << 16):
                if record:
                    with self._lock:
                        self.recorded += data
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """A shutdown, not a close, wakes a relay blocked in recv() on a socket (the
        destination's end, still open, sends nothing more): each relay's join waited
        its 5 s out, 15 s of the test."""
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass                    # (its peer reset it already)
        for thread in self.threads:
            thread.join(5)
        for sock in self.sockets:
            sock.close()


def test_the_wire_carries_none_of_the_image(pki):
    text = b"the quick brown fox jumps over the lazy dog; " * 91
    region = make_region("ram", SIZE)
    for offset in range(0, SIZE, 4096):
        region.array[offset:offset + 4095] = np.frombuffer(text[:4095], np.uint8)
    state = b"device secret " * 1000
    with fastmfd.Destination("tcp:127.0.0.1:0", tls=pki.destination()) as dst:
        tap = Tap(dst.address)
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=dst.receive()), daemon=True)
        thread.start()
        config = fastmfd.MigrationConfig(channels=2, tls=pki.source(hostname="127.0.0.1"))
        with fastmfd.Source(tap.address, config) as src:
            src.add_region(region)
            src.add_device(fastmfd.BytesDevice("dev", 0, state))
            src.migrate(live=False)
        thread.join(10)
        assert np.array_equal(result["r"].regions["ram"].array, region.array)
        tap.close()
    region.close()
    wire = bytes(tap.recorded)
    assert len(wire) > SIZE, "the tap saw less than the image"
    # Needles long enough that ciphertext cannot hold one by chance (a 3-byte
    # one turns up in a few MiB of random bytes about once in 16 runs): the
    # image's text, the device's state, the main channel's preamble, a multifd
    # packet's magic and version, and the ramblock field of a RAM header.
    ramblock = b"ram" + bytes(13)
    for clear in (text[:32], b"device secret", encode_preamble(),
                  b"\x11\x22\x33\x44\x00\x00\x00\x01", ramblock):
        assert clear not in wire, f"{clear!r} crossed the wire in clear"
    assert ramblock in _unencrypted_ram_header(), "the needle would not find a clear header"


def _unencrypted_ram_header() -> bytes:
    header = bytearray(_core.RamPacketCodec(128).header_size)
    _core.RamPacketCodec(128, regions={"ram": SIZE}).encode(header, ramblock="ram",
                                                            normal=[0])
    return bytes(header)


def _refusal(pki, source_tls, destination_tls, *, source_says, destination_says,
             transport="tcp", auth_key=None):
    config = fastmfd.MigrationConfig(channels=2, tls=source_tls, auth_key=auth_key)
    with make_region("ram", SIZE, seed=1) as region, make_region("ram", SIZE) as target, \
            Migration(config, transport=transport, tls=destination_tls,
                      handshake_timeout=3.0) as m:
        target.array[:] = 0xAB
        m.source.add_region(region)
        m.destination.add_region(target)
        error, refused = m.run_refused()
        assert re.search(source_says, str(error)), str(error)
        assert_says_where_once(error, m.source.address)
        assert re.search(destination_says, refused[0].reason), refused[0].reason
        assert np.all(target.array == 0xAB), "a byte reached the region"


def assert_says_where_once(error, address):
    """A source's refusal names the main channel and the address, once (it named
    neither after a certificate it did not accept, and "main channel" twice after
    the destination refused its own). What the destination said is quoted as it is."""
    assert str(error).startswith(f"main channel to {address}: "), str(error)
    ours = str(error).split("the peer failed: ")[0]
    assert ours.count("main channel") == 1, str(error)


def test_a_destination_from_another_ca_is_refused(pki):
    other_ca, (cert, key) = pki.other_ca("impostor", "localhost", "127.0.0.1")
    _refusal(pki, pki.source(), pki.destination(cert=cert, key=key),
             source_says=r"certificate verify failed",
             destination_says=r"TLS handshake failed|closed the connection during the TLS")


def test_a_source_from_another_ca_is_refused(pki):
    _, (cert, key) = pki.other_ca("intruder", LOCAL_CLIENT)
    _refusal(pki, pki.source(cert=cert, key=key), pki.destination(),
             source_says=r"did it refuse this source's certificate",
             destination_says=r"TLS handshake failed: .*certificate verify failed")


def test_an_expired_destination_certificate_is_refused(pki):
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert, key = pki.issue("expired", "localhost", "127.0.0.1",
                          not_before=past - datetime.timedelta(days=30), not_after=past)
    _refusal(pki, pki.source(), pki.destination(cert=cert, key=key),
             source_says=r"certificate has expired",
             destination_says=r"TLS handshake failed|closed the connection during the TLS")


def test_an_expired_client_certificate_is_refused(pki):
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert, key = pki.issue("old-client", LOCAL_CLIENT,
                          not_before=past - datetime.timedelta(days=30), not_after=past)
    _refusal(pki, pki.source(cert=cert, key=key), pki.destination(),
             source_says=r"did it refuse this source's certificate",
             destination_says=r"certificate has expired")


def test_a_wrong_hostname_is_refused(pki):
    _refusal(pki, pki.source(hostname="migration.example"), pki.destination(),
             source_says=r"Hostname mismatch|certificate verify failed",
             destination_says=r"TLS handshake failed|closed the connection during the TLS")


def test_a_client_without_a_certificate_is_refused(pki):
    _refusal(pki, pki.source(cert=None, key=None), pki.destination(),
             source_says=r"did it refuse this source's certificate",
             destination_says=r"TLS handshake failed: .*(certificate|peer did not return)")


def test_an_identity_outside_authz_is_refused(pki):
    _refusal(pki, pki.source(), pki.destination(authz=["someone-else"]),
             source_says=r"the peer (refused|failed): .*not in authz",
             destination_says=rf"client certificate \({LOCAL_CLIENT}\) is not in authz")


def test_plaintext_to_a_tls_destination_is_refused(pki):
    _refusal(pki, None, pki.destination(),
             source_says=r"does not speak TLS \(it sent plaintext\); this destination "
                         r"requires TLS",
             destination_says=r"does not speak TLS \(it sent plaintext\)")


def test_a_channel_answered_in_plaintext_says_what_came_and_from_where(pki):
    """A source's channel in TLS whose peer greets in plaintext (a stranger on the
    port) is refused naming the peer's first bytes and both ends of the
    connection: a stranger tells itself apart from a TLS peer whose answer was
    misread (a QEMU TLS test failed once saying only "it sent plaintext")."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
        with sock, peer:
            peer.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            security = ChannelSecurity.of_source(pki.source(), listener.getsockname(),
                                                 socket.AF_INET, timeout=5.0)
            with pytest.raises(fastmfd.errors.SecurityError) as info:
                handshake.open_channel(sock, security, b"hello", bytes(16), 0,
                                       "multifd channel 0")
            port, local = listener.getsockname()[1], sock.getsockname()[1]
    assert info.value.cause == ("the peer does not speak TLS (it sent plaintext: 53 53 48 2d "
                                f"32 2e 30 2d) (connected to tcp:127.0.0.1:{port} from port "
                                f"{local})")
    assert info.value.channel == "multifd channel 0"

def test_tls_to_a_plaintext_destination_is_refused(pki):
    _refusal(pki, pki.source(), None,
             source_says=r"closed the connection during the TLS handshake \(does it use TLS",
             destination_says=r"the peer speaks TLS; this destination was not given tls=")


def test_a_tls_handshake_with_no_answer_says_how_long_it_waited(pki):
    """A source's TLS handshake that no one answers says its seconds, as the
    plaintext greeting's deadlines do (it said "no answer within the handshake
    deadline", a review between two hosts)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:    # the kernel accepts; no one reads
        address = f"tcp:127.0.0.1:{silent.getsockname()[1]}"
        config = fastmfd.MigrationConfig(channels=1, timeout=1.0, tls=pki.source())
        with make_region("ram", SIZE, seed=1) as region, \
                fastmfd.Source(address, config) as source:
            source.add_region(region)
            with pytest.raises(fastmfd.SecurityError) as failed:
                source.migrate(live=False)
    assert str(failed.value) == f"main channel to {address}: TLS handshake: no answer within 1 s"


def test_a_stranger_silent_in_its_tls_handshake_is_refused_saying_where_and_how_long(pki):
    """A connection that starts a TLS record and says no more is refused at the
    handshake deadline naming the main channel and its seconds, as a plaintext
    one that says nothing is ("main channel: the connection sent nothing within
    1 s"); it named neither. The destination then takes its real source."""
    config = fastmfd.MigrationConfig(channels=2, tls=pki.source())
    with make_region("ram", SIZE, seed=1) as region, make_region("ram", SIZE) as target, \
            Migration(config, tls=pki.destination(), handshake_timeout=1.0) as m:
        m.source.add_region(region)
        m.destination.add_region(target)
        host, port = m.destination.address.split(":")[1:]
        waiting = threading.Thread(target=lambda: m.destination.receive(), daemon=True)
        with socket.create_connection((host, int(port))) as stranger:
            stranger.sendall(b"\x16\x03\x01")      # a handshake record's start, no more
            waiting.start()
            for _ in range(250):
                if m.destination.refused:
                    break
                time.sleep(0.02)
        m.source.migrate(live=False)
        waiting.join(10)
        assert np.array_equal(target.array, region.array)
        assert [r.reason for r in m.destination.refused] == [
            "main channel: TLS handshake: no answer within 1 s"]


def test_a_wrong_auth_key_under_tls_is_refused(pki):
    region = make_region("ram", SIZE, seed=1)
    config = fastmfd.MigrationConfig(channels=2, tls=pki.source(), auth_key=b"a" * 16)
    with Migration(config, tls=pki.destination(), auth_key=b"b" * 16) as m:
        m.source.add_region(region)
        error, refused = m.run_refused()
        assert "auth_keys differ" in str(error)
        assert_says_where_once(error, m.source.address)
        assert "wrong auth_key proof" in refused[0].reason
    region.close()


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o640], ids=lambda m: f"{m:04o}")
def test_a_private_key_others_may_read_or_write_is_refused(pki, mode):
    """As the auth key file is (but its group may read it: a service's group often
    does): a key every user of the host may read is no secret."""
    key = pki.source().key
    os.chmod(key, mode)
    if mode == 0o640:
        assert pki.source().key == key
        return
    with pytest.raises(fastmfd.ConfigError, match=f"TLSConfig.key: {key} is open to others "
                                                  f"\\(mode {mode:04o}\\): make it private"):
        pki.source()


def test_a_destination_needs_its_own_certificate(pki):
    with pytest.raises(fastmfd.ConfigError, match="needs its own certificate"):
        fastmfd.Destination("tcp:127.0.0.1:0", tls=fastmfd.TLSConfig(ca=pki.source().ca))
    with pytest.raises(fastmfd.ConfigError, match="authz needs ca"):
        fastmfd.Destination("tcp:127.0.0.1:0",
                            tls=pki.destination(ca=None, authz=["x"]))
    with pytest.raises(fastmfd.ConfigError, match="cannot read"):
        fastmfd.TLSConfig(ca="/nonexistent/ca.pem")


@pytest.mark.parametrize("name", ["ca", "cert", "key"])
def test_a_tls_file_that_cannot_be_opened_is_refused_with_the_reason(pki, tmp_path, name):
    """A typo in a TLS file's path said only "TLSConfig.ca: cannot read PATH" (the
    auth key file's said why); a file root may open is no longer passed by
    os.access either."""
    with pytest.raises(fastmfd.ConfigError) as error:
        pki.source(**{name: str(tmp_path / "typo.pem")})
    assert str(error.value) == (f"TLSConfig.{name}: cannot read {tmp_path}/typo.pem: No such "
                                f"file or directory")


def test_a_tls_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """The readable check opened it non-blocking and passed it; the load then read it
    blocking, and a FIFO no one writes held the command for ever (a reread). In a
    child: without the fix it would hang this process."""
    os.mkfifo(tmp_path / "fifo.pem")
    made = subprocess.run([sys.executable, "-c", "import fastmfd, sys\n"
                           "try:\n    fastmfd.TLSConfig(ca=sys.argv[1])\n"
                           "except fastmfd.ConfigError as exc:\n    print(exc)\n",
                           str(tmp_path / "fifo.pem")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert made.stdout == f"TLSConfig.ca: {tmp_path}/fifo.pem is not a regular file\n", made


def test_each_side_refuses_the_other_sides_check(pki):
    """A source's authz (the sources a destination accepts) and a destination's
    hostname (the name a source checks) would be ignored: a source given authz=["X"]
    migrated to a destination whose certificate is not X."""
    with pytest.raises(fastmfd.ConfigError, match="authz names the sources a destination "
                                                  "accepts"):
        fastmfd.MigrationConfig(tls=pki.source(authz=["someone"]))
    with pytest.raises(fastmfd.ConfigError, match="hostname is the name a source checks"):
        fastmfd.Destination("tcp:127.0.0.1:0", tls=pki.destination(hostname="localhost"))


def test_a_watch_sees_what_tls_decrypted_beyond_the_last_read():
    """Two messages in one TLS record: once the first is read, the second waits
    decrypted in the SSL object, where no wait on the socket sees it. A source's
    monitor left a destination's RESUMED there (written with its LOADED) and failed
    "no RESUMED ... after its LOADED" (a review)."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_context)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        box: list[ssl.SSLSocket] = []
        accepting = threading.Thread(target=lambda: box.append(
            server_context.wrap_socket(theirs, server_side=True)))
        accepting.start()
        with client_context.wrap_socket(ours, server_hostname="localhost") as tls:
            accepting.join(10)
            box[0].sendall(b"LOADED+RESUMED")        # one record
            assert tls.recv(6) == b"LOADED"
            heard = []
            watch = Watch(tls)
            watch.add(tls, lambda: heard.append(tls.recv(100)))
            watch.poll(10.0)
            assert heard == [b"+RESUMED"]
            box[0].close()


@pytest.mark.parametrize("answer, says", [
    (encode_message(Msg.ROUND_ACK, {"round": 1}), "received ROUND_ACK, expected SETUP_ACK"),
    (MESSAGE_HEADER.pack(int(Msg.SETUP_ACK), 2) + b"[]", "SETUP_ACK: payload is not a JSON "
                                                         "object"),
])
def test_a_wrong_answer_in_tls_is_not_called_a_refused_certificate(pki, answer, says):
    """Over TLS a source told every failure of its SETUP_ACK wait that the
    destination "ended the TLS connection after the handshake (did it refuse this
    source's certificate?)": one that answered, wrongly, ended nothing (a review)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def destination():
        with listener.accept()[0] as sock:
            greeting = handshake.greet_main_channel(
                sock, ChannelSecurity(tls=pki.destination(ca=None)))
            with greeting.sock as tls:
                recv_exact(tls, decode_message_header(greeting.first_header, 0)[1], "SETUP")
                tls.sendall(answer)
                tls.recv(1)                 # until the source is gone

    serving = threading.Thread(target=destination, daemon=True)
    serving.start()
    config = fastmfd.MigrationConfig(channels=1, timeout=5.0, tls=pki.source(cert=None,
                                                                              key=None))
    try:
        with make_region("ram", 1 << 20, seed=3) as region, \
                fastmfd.Source(f"tcp:127.0.0.1:{listener.getsockname()[1]}", config) as source:
            source.add_region(region)
            with pytest.raises(fastmfd.MigrationError) as failed:
                source.migrate(live=False)
    finally:
        listener.close()
        serving.join(10)
    assert says in str(failed.value) and "certificate" not in str(failed.value)
