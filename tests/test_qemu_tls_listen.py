"""``listen --qemu`` in TLS: a real QEMU source (7.2 and 10) whose ``tls-creds``
(a ``tls-creds-x509`` object, ``endpoint=client``) are certificates from
trustme migrates into ``qemu.receive(..., tls=...)``, every connection in TLS,
each greeted by a receive worker (the main channel's relayed to the main
process). The files hold the guest's RAM; a source this side does not trust,
or one in plaintext, is dropped (the error, at the listener's timeout, says
why); strangers connecting meanwhile are dropped without harming the
migration; nothing leaks (the ``leakcheck`` plugin), and no QEMU outlives a
test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trustme

from fastmfd import TLSConfig, _core, qemu
from fastmfd._engine import qemu_channels
from fastmfd._engine.memory_bound import WORKER_BYTES
from fastmfd._engine.qemu_receiving import QemuReceiving
from fastmfd._engine.processes import Watch
from fastmfd._engine.qemu_channels import LOGGED_DROPS
from fastmfd._engine.qemu_tls import MAX_GREETINGS, TLSGreeter, greet_in_tls
from fastmfd.errors import ConfigError, MigrationError, ProtocolError
from fastmfd.protocol.control import QemuAuthenticated, QemuGreeted, Refused
from fastmfd.protocol.security import ChannelSecurity
from qemu_support import (QEMU, QEMUS, Background, Guest, Receiver, assert_nothing_complete,
                          listening_command, needs_qemu, pattern, wait_until_filled)
from test_qemu_peer_dies import (SLOW, SOURCE_KILLED, killed_mid_migration,
                                 resume_and_close, stopped_mid_migration)

GUEST_MIB = 64
# What max_memory counts a QEMU channel's buffers as in TLS (512 KiB packets of 4 KiB pages).
CHANNEL_BYTES = _core.receive_channel_bytes(128, 4096, 1 << 62, 0, False, "zstd", True)


@dataclass
class Credentials:
    """The source QEMU's tls-creds directory and the listener's TLSConfig."""
    qemu_dir: Path
    listener: TLSConfig


def credentials(tmp_path: Path, ca: trustme.CA, *, source_ca: trustme.CA | None = None
                ) -> Credentials:
    """The listener's certificate (for 127.0.0.1) from ``ca``, trusting ``ca``;
    the source QEMU's from ``source_ca`` (default ``ca``), trusting ``ca``."""
    qemu_dir = tmp_path / "qemu-tls"
    qemu_dir.mkdir()
    client = (source_ca or ca).issue_cert("source.example")
    # QEMU checks its own certificate against its ca-cert.pem too: both CAs.
    (qemu_dir / "ca-cert.pem").write_bytes(
        ca.cert_pem.bytes() + (source_ca.cert_pem.bytes() if source_ca else b""))
    client.cert_chain_pems[0].write_to_path(str(qemu_dir / "client-cert.pem"))
    client.private_key_pem.write_to_path(str(qemu_dir / "client-key.pem"))
    mine = tmp_path / "listener-tls"
    mine.mkdir()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(mine / "cert.pem"))
    server.private_key_pem.write_to_path(str(mine / "key.pem"))
    os.chmod(mine / "key.pem", 0o600)
    ca.cert_pem.write_to_path(str(mine / "ca.pem"))
    return Credentials(qemu_dir, TLSConfig(cert=str(mine / "cert.pem"),
                                           key=str(mine / "key.pem"), ca=str(mine / "ca.pem")))


def tls_source(tmp_path: Path, binary: str, creds_dir: Path | None, channels: int = 2,
               compression: str = "none", return_path: bool = False
               ) -> tuple[Guest, np.ndarray]:
    """A paused guest ready to migrate in TLS with the certificates in ``creds_dir``
    (None: in plaintext): (it, its RAM)."""
    ram = pattern(GUEST_MIB, seed=5)
    ram_path = tmp_path / "src-ram.img"
    ram.tofile(ram_path)
    options = (() if creds_dir is None else
               ("-object", f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client"))
    guest = Guest(tmp_path, str(ram_path), GUEST_MIB, binary=binary, options=options)
    try:
        guest.set_multifd(channels, compression)
        if creds_dir is not None:
            guest.qmp.command("migrate-set-parameters", **{"tls-creds": "tls0"})
        if return_path:
            guest.qmp.command("migrate-set-capabilities", capabilities=[
                {"capability": "return-path", "state": True}])
    except BaseException:
        guest.close()
        raise
    return guest, ram


def assert_saved(out: Path, ram: np.ndarray, channels: int, compression: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["channels"], manifest["compression"]) == (channels, compression)
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), ram)


@pytest.mark.parametrize("qemu_binary", QEMUS)
@pytest.mark.parametrize("channels, compression, return_path",
                         [(2, "none", False), (3, "zstd", True)])
def test_qemu_migrates_into_files_in_tls(tmp_path, qemu_binary, channels, compression,
                                         return_path):
    """With the return path, QEMU completes only once this side said SHUT 0,
    which goes out through the main channel's relay."""
    creds = credentials(tmp_path, trustme.CA())
    source, ram = tls_source(tmp_path, qemu_binary, creds.qemu_dir, channels, compression,
                             return_path)
    try:
        receiver = Receiver(tmp_path / "out", tls=creds.listener)
        source.migrate(receiver.address)
        assert source.wait() == "completed"
        received = receiver.result()
        assert [c["channel"] for c in received.channels] == list(range(channels))
        assert all(c["normal_pages"] > 0 for c in received.channels)
        assert_saved(tmp_path / "out", ram, channels, compression)
    finally:
        source.close()


@needs_qemu
def test_listen_qemu_command_in_tls(tmp_path):
    creds = credentials(tmp_path, trustme.CA())
    source, ram = tls_source(tmp_path, QEMU, creds.qemu_dir)
    tls = creds.listener
    try:
        with listening_command(tmp_path / "out", "--tls-cert", str(tls.cert), "--tls-key",
                               str(tls.key), "--tls-ca", str(tls.ca)) as (listen, address):
            source.migrate(address)
            assert source.wait() == "completed"
            out, err = listen.communicate(timeout=60)
            assert listen.returncode == 0, err
            assert "received from QEMU" in err
        assert_saved(tmp_path / "out", ram, 2, "none")
    finally:
        source.close()


def strangers(address: str, other_ca: trustme.CA, tmp_path: Path) -> list[socket.socket]:
    """Connections that are not QEMU's, left open: one silent, one in plaintext
    (QEVM, as a QEMU main channel without TLS would begin), one through a TLS
    handshake with a certificate of another CA (refused by this side)."""
    host, port = address.split(":")[1:]
    silent = socket.create_connection((host, int(port)))
    plain = socket.create_connection((host, int(port)))
    plain.sendall(b"QEVM\x00\x00\x00\x03")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    cert = other_ca.issue_cert("stranger.example")
    cert.configure_cert(ctx)
    wrong = ctx.wrap_socket(socket.create_connection((host, int(port))),
                            do_handshake_on_connect=False)
    wrong.setblocking(False)
    try:
        wrong.do_handshake()        # its ClientHello goes out; the refusal comes later
    except ssl.SSLWantReadError:
        pass
    return [silent, plain, wrong]


@contextlib.contextmanager
def silent_strangers(address: str, count: int) -> Iterator[None]:
    """``count`` connections to ``address`` that never send a byte, closed after."""
    host, port = address.split(":")[1:]
    silent: list[socket.socket] = []
    try:
        silent.extend(socket.create_connection((host, int(port))) for _ in range(count))
        yield
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("qemu_binary", QEMUS)
@pytest.mark.parametrize("when", ["before", "during"])
def test_strangers_that_fail_the_handshake_are_dropped(tmp_path, qemu_binary, when):
    """Before QEMU's connections or among them (in plaintext, a connection after
    the main channel that is not QEMU's fails the migration: its pages might be
    QEMU's; in TLS one without QEMU's certificate cannot be)."""
    creds = credentials(tmp_path, trustme.CA())
    source, ram = tls_source(tmp_path, qemu_binary, creds.qemu_dir)
    held: list[socket.socket] = []
    try:
        receiver = Receiver(tmp_path / "out", tls=creds.listener)
        if when == "before":
            held = strangers(receiver.address, trustme.CA(), tmp_path)
        source.migrate(receiver.address)
        if when == "during":
            held = strangers(receiver.address, trustme.CA(), tmp_path)
        assert source.wait() == "completed"
        receiver.result()
        assert_saved(tmp_path / "out", ram, 2, "none")
    finally:
        for sock in held:
            sock.close()
        source.close()


@pytest.mark.parametrize("qemu_binary", QEMUS)
@pytest.mark.parametrize("source", ["another CA", "plaintext"])
def test_a_source_this_side_does_not_trust_is_not_taken(tmp_path, qemu_binary, source):
    """Its connection fails the handshake and is dropped: the listener goes on
    waiting for QEMU, and its timeout says what the last connection failed."""
    ca = trustme.CA()
    creds = credentials(tmp_path, ca, source_ca=trustme.CA() if source == "another CA" else ca)
    guest, _ = tls_source(tmp_path, qemu_binary,
                          creds.qemu_dir if source == "another CA" else None)
    try:
        # (the timeout is waited out: QEMU, started already, connects at once)
        receiver = Receiver(tmp_path / "out", tls=creds.listener, timeout=3.0)
        guest.migrate(receiver.address)
        assert guest.wait() == "failed"
        with pytest.raises(MigrationError, match=r"no QEMU connected within 3 s \(\d+ "
                                                 r"connection\(s\) failed the TLS handshake; "
                                                 "the first, from 127.0.0.1:") as err:
            receiver.result()
        # A client certificate of a CA this side did not name is not even sent (GnuTLS).
        assert re.search("certificate verify failed|peer did not return a certificate"
                         if source == "another CA" else "does not speak TLS", str(err.value))
        assert_nothing_complete(tmp_path / "out")
    finally:
        guest.close()


def test_tls_without_a_ca_is_refused_up_front(tmp_path):
    """A source is told by its certificate: without ``ca`` any client would pass."""
    listener = credentials(tmp_path, trustme.CA()).listener
    no_ca = TLSConfig(cert=listener.cert, key=listener.key)
    with pytest.raises(ConfigError, match="must name the CA that issued the source QEMU"):
        qemu.receive("tcp:127.0.0.1:0", str(tmp_path / "out"), tls=no_ca)
    done = subprocess.run(
        [sys.executable, "-m", "fastmfd", "listen", "--qemu", "tcp:127.0.0.1:0", "--dir",
         str(tmp_path / "out"), "--tls-cert", str(listener.cert), "--tls-key",
         str(listener.key)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "give --tls-ca" in done.stderr
    assert_nothing_complete(tmp_path / "out")


@pytest.fixture(params=QEMUS)
def slow_tls_source(request, tmp_path):
    """A guest about to migrate in TLS at SLOW bytes/s over 2 channels, and the
    listener's TLSConfig."""
    creds = credentials(tmp_path, trustme.CA())
    guest, _ = tls_source(tmp_path, request.param, creds.qemu_dir)
    try:
        guest.qmp.command("migrate-set-parameters", **{"max-bandwidth": SLOW})
        yield guest, creds.listener
    finally:
        resume_and_close(guest)


def test_a_tls_source_killed_mid_migration_fails_receive_at_once(tmp_path, slow_tls_source,
                                                                 leaks):
    """The main channel's relay passes the connection's end on (or its worker
    fails, naming the connection's loss); a channel's worker sees its own."""
    guest, tls = slow_tls_source
    killed_mid_migration(tmp_path / "out", guest, leaks, SOURCE_KILLED +
                         r"|^main channel: .*(Connection reset by peer|TLS)", tls=tls)


def test_a_tls_source_stopped_mid_migration_fails_receive_at_its_stall_timeout(
        tmp_path, slow_tls_source, leaks):
    guest, tls = slow_tls_source
    stopped_mid_migration(tmp_path / "out", guest, leaks, tls=tls)


@needs_qemu
def test_connections_beyond_the_greetings_at_once_wait_their_turn(tmp_path, leaks):
    """MAX_GREETINGS silent strangers hold every greeting until their handshake's
    deadline; QEMU's connections wait in the listener's backlog meanwhile, then
    are greeted, and the migration completes."""
    creds = credentials(tmp_path, trustme.CA())
    source, ram = tls_source(tmp_path, QEMU, creds.qemu_dir)
    try:
        receiver = Receiver(tmp_path / "out", tls=creds.listener)
        with silent_strangers(receiver.address, MAX_GREETINGS):
            source.migrate(receiver.address)
            assert source.wait(timeout=120) == "completed"
            receiver.result(120)
            assert_saved(tmp_path / "out", ram, 2, "none")
    finally:
        source.close()
    leaks.assert_clean()


# ---------------------------------------------------------------- the bookkeeping

def greeting_of(tmp_path: Path, client: str, timeout: float = 10.0) -> Refused | QemuGreeted:
    """What a receive worker's greeting (its handshake's deadline ``timeout``)
    reports of a connection from ``client``: "stranger" (a certificate of
    another CA), "garbage after the handshake" (a certificate of the listener's
    CA, then bytes that are no TLS record), "not QEMU's" (the same certificate,
    then a record saying HTTP) or "QEMU, late" (the same certificate, then QEVM
    1.5 times the handshake's deadline after it)."""
    ca = trustme.CA()
    creds = credentials(tmp_path, ca)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=creds.listener.ca)
    ctx.check_hostname = False
    (ca if client != "stranger" else trustme.CA()).issue_cert("source.example"
                                                              ).configure_cert(ctx)
    authenticated: list[bool] = []
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as raw:
        accepted, _ = listener.accept()
        with accepted, concurrent.futures.ThreadPoolExecutor(1) as pool:
            greeting = pool.submit(greet_in_tls, accepted,
                                   ChannelSecurity(tls=creds.listener, timeout=timeout),
                                   lambda: authenticated.append(True))
            try:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    if client == "QEMU, late":
                        time.sleep(1.5 * timeout)
                        tls.sendall(b"QEVM")
                    elif client == "not QEMU's":
                        tls.sendall(b"GET / HTTP/1.1\r\n")
                    else:
                        os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + b"\xee" * 32)
                    report, session = greeting.result(timeout=20)
            except ssl.SSLError:        # the stranger's refusal, seen by its side
                report, session = greeting.result(timeout=20)
    assert (session is None) == (client == "stranger") == (not authenticated)
    return report


@pytest.mark.parametrize("client, authenticated", [
    ("stranger", False), ("garbage after the handshake", True), ("not QEMU's", True)])
def test_a_greeting_says_whether_the_peer_held_a_certificate_of_the_ca(
        tmp_path, client, authenticated):
    """One past its handshake holds a certificate the listener's CA issued: it is
    judged by when it came, as a plaintext connection is (after the main channel
    it fails the migration, its pages might be QEMU's). A record that did not
    decrypt made it a stranger's, dropped in silence, however it came (stop 36's
    left undone)."""
    report = greeting_of(tmp_path, client)
    assert isinstance(report, Refused) and report.authenticated is authenticated
    assert {"stranger": "certificate", "garbage after the handshake": "QEMU's first bytes",
            "not QEMU's": "it sent first bytes 47455420"}[client] in report.reason


def test_a_peer_through_its_handshake_has_longer_than_its_deadline_for_its_first_bytes(
        tmp_path):
    """QEMU's main channel sends its first bytes only once every multifd channel
    is through its handshake, and those may wait behind MAX_GREETINGS strangers
    for a handshake deadline: one deadline for both, the main channel's greeting
    timed out, and it was dropped as a connection before the main channel (a
    review, with real QEMUs behind a forwarder that put 32 strangers between
    QEMU's first and second connection)."""
    assert greeting_of(tmp_path, "QEMU, late", timeout=1.0) == QemuGreeted(None, None)


class StubGreeter:
    """Stands in for the workers (their reports are the test's to give)."""

    def __init__(self) -> None:
        self.greeted: list[socket.socket] = []
        self.dismissed: list[object] = []
        self.no_room = lambda greeting: None    # (max_memory's say: TLSGreeter.no_room)

    def greet(self, sock, on_greeted) -> None:
        self.greeted.append(sock)
        self.on_greeted = on_greeted

    def dismiss(self, worker) -> None:
        self.dismissed.append(worker)


@pytest.fixture
def counted(monkeypatch):
    """QemuConnections in TLS, one connection accepted and still being greeted when
    the channels are counted (COUNT_WAIT made short): (connections, stub, its socket,
    the client's end)."""
    monkeypatch.setattr(qemu_channels, "COUNT_WAIT", 0.05)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    stub = StubGreeter()
    connections = qemu_channels.QemuConnections(listener, Watch(), lambda channel: None,
                                                stub)   # type: ignore[arg-type]
    connections.main = socket.socket()      # the main channel came before it
    connections._accept()
    assert len(stub.greeted) == 1
    connections.count(wait=0.05)
    connections.uuid = b"u" * 16
    yield connections, stub, stub.greeted[0], client
    for sock in connections.sockets():
        sock.close()
    client.close()
    listener.close()


def test_a_channel_of_the_migration_greeted_after_the_count_fails_it(counted):
    """Its pages would be lost: a greeting not over when the channels were counted
    was dropped without a word, and one of QEMU's channels whose worker was late
    would have been lost silently (a review)."""
    connections, stub, sock, _ = counted
    assert sock in connections.overdue and sock.fileno() != -1
    with pytest.raises(ProtocolError, match="multifd channel 1 of this migration .* connected "
                                            "after the setup section ended"):
        stub.on_greeted("worker", QemuGreeted(1, b"u" * 16))
    assert stub.dismissed == ["worker"]


def test_a_stranger_greeted_after_the_count_is_dropped(counted):
    connections, stub, sock, client = counted
    stub.on_greeted("worker", QemuGreeted(0, b"x" * 16))     # another migration's
    assert stub.dismissed == ["worker"] and sock.fileno() == -1
    assert client.recv(1) == b""                            # its connection closed
    assert not connections.overdue and not connections.greeting


class Door:
    """QemuConnections in TLS with a StubGreeter, one connection taken and still being
    greeted (``first``); every socket closed by close()."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stub, self.watch = StubGreeter(), Watch()
        self.connections = qemu_channels.QemuConnections(
            self.listener, self.watch, lambda channel: None, self.stub)  # type: ignore[arg-type]
        self.clients: list[socket.socket] = []
        self.first = self.connect()
        self.connections._accept()
        assert len(self.stub.greeted) == 1

    def connect(self) -> socket.socket:
        self.clients.append(socket.create_connection(self.listener.getsockname()))
        return self.clients[-1]

    def close(self) -> None:
        for sock in (*self.connections.sockets(), *self.clients, self.listener):
            sock.close()


@pytest.fixture
def door():
    taken = Door()
    yield taken
    taken.close()


def test_a_connection_max_memory_has_no_room_to_greet_waits_or_is_refused(door):
    """Under max_memory a connection is greeted only where the bound holds it as a
    channel (TLSGreeter.room): while others are being greeted it waits in the backlog
    until one ends; with none being greeted (nothing would make room) it is refused
    at once, counted, and no worker greets it."""
    stub, connections, watch = door.stub, door.connections, door.watch
    stub.no_room = lambda greeting: "no room"
    second = door.connect()
    connections._accept()                   # the first still being greeted: waits
    assert len(stub.greeted) == 1 and door.listener not in watch._handlers
    stub.on_greeted("worker", Refused("no certificate", authenticated=False))
    assert door.listener in watch._handlers     # a greeting ended: the next may be taken
    connections._accept()                   # none being greeted, no room: refused
    assert len(stub.greeted) == 1 and connections.no_room.count == 1
    assert connections.no_room.first.endswith(qemu_channels.NO_ROOM)
    second.settimeout(5)
    assert second.recv(1) == b""
    stub.no_room = lambda greeting: None
    door.connect()
    connections._accept()
    assert len(stub.greeted) == 2


def test_a_wait_for_room_that_nothing_being_greeted_can_end_fails(door, monkeypatch, caplog):
    """Under max_memory a connection waits for room while a greeting under way may
    end (a stranger's handshake does, at its deadline); once each is through its TLS
    handshake (QEMU's main channel, saying nothing until its channels are through
    theirs) nothing will, and the wait fails after NO_ROOM_WAIT, saying why, once: the
    warning that connections waited for room, logged as the wait began, said it
    before, less precisely (a review)."""
    monkeypatch.setattr(qemu_channels, "NO_ROOM_WAIT", 0.05)
    stub, watch = door.stub, door.watch
    stub.no_room = lambda greeting: "no room"
    door.connect()
    for _ in range(2):                      # the first's handshake is under way
        watch.poll(0.2)
    assert len(stub.greeted) == 1 and door.listener not in watch._handlers
    stub.on_greeted("worker", QemuAuthenticated())
    with pytest.raises(MigrationError, match=re.escape(
            f"listener: no room; {qemu_channels.NO_ROOM_LEFT}")):
        for _ in range(20):                 # its listener's turn, then the alarm's
            watch.poll(1.0)
    assert len(stub.greeted) == 1
    assert qemu_channels.WAITED_FOR_ROOM not in caplog.text


def test_greetings_under_max_memory_are_what_it_holds_as_channels(tmp_path):
    """Each connection being greeted in TLS is counted as a channel (it may be one) with
    its worker, beside the workers alive, but one, until the main channel is told
    apart: one more is greeted only where that fits, idle workers beyond one let go
    first (a bound of 3 channels and 3 workers, 4 idle workers started ahead)."""
    creds = credentials(tmp_path, trustme.CA())
    each = CHANNEL_BYTES
    with socket.create_server(("127.0.0.1", 0)) as listener:
        session = QemuReceiving(listener, None, timeout=5.0, stall_timeout=5.0,  # type: ignore
                                workers=4, security=ChannelSecurity(tls=creds.listener),
                                max_memory=3 * each + 3 * WORKER_BYTES)

        def fits(greeting: int) -> bool:
            return session._no_room(greeting) is None
        try:
            assert session.greeter is not None
            assert fits(0) and fits(1) and fits(2)
            assert session.greeter.released == 0
            assert fits(3) and session.greeter.released == 1
            assert session._no_room(4) == (
                "QEMU's 4 multifd channel(s) so far, with one more to greet, need 1 worker "
                "processes (a receive worker per channel, and those started ahead or greeting "
                f"connections), 16 MiB each: {WORKER_BYTES} bytes, besides {4 * each} bytes of "
                f"receive buffers; this receiver holds at most {3 * each + 3 * WORKER_BYTES} "
                "(max_memory)")
            assert session.greeter.released == 3 and len(session.spares) == 1
            assert fits(3)                          # 3 channels, 1 worker
            session.connections.main = socket.socket()     # told apart: none is it
            try:
                assert not fits(3) and fits(2)
            finally:
                session.connections.main.close()
        finally:
            session.close()


def tls_channels_need(channels: int) -> int:
    """The max_memory that holds QEMU's ``channels`` in TLS and no more: their buffers,
    their workers and the main channel's relay."""
    return channels * CHANNEL_BYTES + (channels + 1) * WORKER_BYTES


def test_strangers_greeted_do_not_push_qemus_channels_over_max_memory(
        tmp_path, monkeypatch, leaks, caplog):
    """Every worker greeting a stranger counted against max_memory as QEMU's channels
    connected: 6 silent strangers before QEMU took 6 workers, and QEMU's channels,
    under a bound that holds them, failed it ("QEMU's 2 multifd channel(s) so far need
    ... worker processes"). A greeting is now taken only where the bound holds it as a
    channel: the strangers wait their turn, and the migration completes (the log says
    once that connections waited for room)."""
    monkeypatch.setattr(qemu, "ChannelSecurity",
                        functools.partial(ChannelSecurity, timeout=2.0))   # their deadline
    creds = credentials(tmp_path, trustme.CA())
    source, ram = tls_source(tmp_path, QEMU, creds.qemu_dir)
    try:
        receiver = Receiver(tmp_path / "out", tls=creds.listener, timeout=15.0,
                            max_memory=tls_channels_need(2))
        with silent_strangers(receiver.address, 6):
            time.sleep(0.5)
            source.migrate(receiver.address)
            assert source.wait(timeout=120) == "completed"
            receiver.result(120)
            assert_saved(tmp_path / "out", ram, 2, "none")
    finally:
        source.close()
    assert caplog.text.count(qemu_channels.WAITED_FOR_ROOM) == 1
    leaks.assert_clean()


@pytest.mark.parametrize("qemu_binary", QEMUS)
@pytest.mark.parametrize("return_path", [False, True])
def test_a_bound_short_of_qemus_channels_in_tls_fails_at_once(tmp_path, qemu_binary,
                                                              return_path, leaks, caplog):
    """A byte short of what QEMU's 2 channels need, its last channel waited for room
    to be greeted behind its main channel, which says nothing until every channel is
    through its handshake (or, with the return path, said QEVM and waits for them
    before the setup section ends). receive() failed at its timeout (60 s here),
    saying only that connections waited for room (or, with the return path, "no data
    for 10 s"), though nothing could make room once each connection being greeted
    was through its handshake (a stranger's ends at its deadline). Now the wait
    fails then, naming what QEMU's channels need and the bound: at once, not at a
    timeout; QEMU fails, and nothing is left. The warning that connections waited for
    room, logged just before that error, said it twice: it is not logged."""
    creds = credentials(tmp_path, trustme.CA())
    source, _ = tls_source(tmp_path, qemu_binary, creds.qemu_dir, return_path=return_path)
    bound = tls_channels_need(2) - 1
    try:
        receiver = Receiver(tmp_path / "out", tls=creds.listener, timeout=60.0,
                            max_memory=bound)
        source.migrate(receiver.address)
        with pytest.raises(MigrationError, match=(
                r"^listener: QEMU's 2 multifd channel\(s\) so far, with one more to greet, "
                r"need 3 worker processes .*" + re.escape(
                    f"; this receiver holds at most {bound} (max_memory); "
                    f"{qemu_channels.NO_ROOM_LEFT}") + "$")):
            receiver.result(30)         # before its timeout, 60 s
        assert source.wait(timeout=60) == "failed"
        assert_nothing_complete(tmp_path / "out")
        assert qemu_channels.WAITED_FOR_ROOM not in caplog.text
    finally:
        source.close()
    leaks.assert_clean()


class StuckRelay:
    """A relay worker that never reports its end (its QEMU stopped reading)."""
    name = "main channel"

    def expect(self, kind, timeout):
        raise MigrationError(f"no {kind.__name__} report within {timeout:g} s",
                             channel=self.name)


def test_a_relay_that_does_not_pass_on_its_last_bytes_is_said(caplog):
    """A SHUT 0 handed to the relay may not have reached QEMU: the close says so
    (it passed in silence: a review), where in plaintext confirm() itself does."""
    greeter = TLSGreeter(None, Watch(), None, None)     # type: ignore[arg-type]
    greeter.relaying = StuckRelay()                     # type: ignore[assignment]
    assert greeter.drain() is False
    assert "the main channel's relay did not pass on its last bytes" in caplog.text
    assert greeter.drain() is True                      # once: it is let go


def refused_at_once(address: str, within: float = 10.0) -> None:
    """A plaintext connection that begins as QEMU's main channel does: its TLS
    handshake fails, and it is closed (reset: its bytes are left unread) ``within``
    seconds."""
    host, port = address.split(":")[1:]
    with socket.create_connection((host, int(port))) as plain:
        plain.sendall(b"QEVM\x00\x00\x00\x03")
        plain.settimeout(within)
        try:
            assert plain.recv(64) == b""
        except ConnectionResetError:
            pass


def test_a_connection_refused_is_closed_at_once(tmp_path):
    """Its worker reported it and waited for the next connection to greet before it
    closed it: its peer (QEMU's main channel, its greeting timed out) waited with
    it, up to the listener's timeout (a review)."""
    creds = credentials(tmp_path, trustme.CA())
    # (closed in some 2 ms; held, it would be closed at the timeout, past `within`)
    receiver = Receiver(tmp_path / "out", tls=creds.listener, timeout=4.0)
    refused_at_once(receiver.address, within=2.0)      # not held to the timeout
    with pytest.raises(MigrationError, match="no QEMU connected within 4 s"):
        receiver.result()


def test_a_relay_that_fails_says_why_not_that_the_source_closed(tmp_path):
    """The relay's socket pair closed as it failed, and the main channel's end of
    stream came first: "the source closed it before the stream's end"; its
    failure only in close()'s warning (a review)."""
    ca = trustme.CA()
    creds = credentials(tmp_path, ca)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=creds.listener.ca)
    ctx.check_hostname = False
    ca.issue_cert("source.example").configure_cert(ctx)
    receiver = Receiver(tmp_path / "out", tls=creds.listener)
    host, port = receiver.address.split(":")[1:]
    with ctx.wrap_socket(socket.create_connection((host, int(port))),
                         server_hostname=host) as tls:
        tls.sendall(b"QEVM")                # QEMU's main channel: relayed
        time.sleep(0.5)
        os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + b"\xee" * 32)   # no record of it
        with pytest.raises(MigrationError) as failed:
            receiver.result()
    assert failed.value.channel == "main channel"
    assert "relay" in str(failed.value) and "the source closed it" not in str(failed.value)
    assert_nothing_complete(tmp_path / "out")


def test_strangers_are_counted_not_each_kept_or_logged(tmp_path, caplog):
    """Each failed handshake was kept (its peer and why) and logged: a flood of
    strangers, some hundreds a second, grew the listener for as long as it waited
    for QEMU (a review)."""
    creds = credentials(tmp_path, trustme.CA())
    # (the timeout is waited out: 2 s, the strangers are refused in some 0.05 s)
    receiver = Receiver(tmp_path / "out", tls=creds.listener, timeout=2.0)
    for _ in range(2 * LOGGED_DROPS):
        refused_at_once(receiver.address)
    with pytest.raises(MigrationError, match=fr"\({2 * LOGGED_DROPS} connection\(s\) failed "
                                             "the TLS handshake; the first, from 127.0.0.1:"):
        receiver.result()
    logged = [r for r in caplog.records if "failed the TLS handshake" in r.getMessage()]
    assert len(logged) == LOGGED_DROPS
    assert "more are counted, not logged" in logged[-1].getMessage()


def test_a_tls_receiver_closed_from_another_thread_mid_migration(tmp_path, slow_tls_source,
                                                                 leaks):
    """As in plaintext (test_qemu_lifecycle): receive() fails at once saying so, the
    greeting workers and the main channel's relay stop, QEMU fails, nothing is left."""
    guest, tls = slow_tls_source
    out = tmp_path / "out"
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", out, stall_timeout=60.0, tls=tls)
    call = Background("receive()", receiver.receive)
    guest.migrate(receiver.address)
    wait_until_filled(lambda: out.glob("*.part"), 4 << 20)
    receiver.close()
    with pytest.raises(MigrationError, match="^the QemuReceiver was closed$"):
        call.result(10.0)
    assert guest.wait(10.0) == "failed"
    assert_nothing_complete(out)
    guest.close()           # its QMP socket and process are the test's
    leaks.assert_clean()
