"""``send --qemu`` in TLS, into a real QEMU (7.2 and 10) whose ``tls-creds``
(a ``tls-creds-x509`` object, ``endpoint=server``) are certificates from
trustme: every connection, main and multifd, in TLS, as a QEMU source with
``tls-creds`` migrates. The destination completes with the guest's RAM; a
certificate either side does not accept, and TLS meeting plaintext either
way, fail the send with an error that says so, and no QEMU outlives a test.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from fastmfd import TLSConfig, qemu
from fastmfd._engine import qemu_sending
from fastmfd.errors import MigrationError, SecurityError
from qemu_support import (QEMU, QEMUS, Background, assert_loaded, incoming_guest, needs_qemu,
                          saved_guest, wait_until_filled)
from test_qemu_peer_dies import (DESTINATION_KILLED, PATIENT, SEND_CHANNELS, SLOW, STALL,
                                 STOPPED_GUEST_MIB, assert_fails, assert_gone, kill,
                                 resume_and_close, send_slowly)
from test_qemu_receive import capture_bytes, receive_replay


@dataclass
class Credentials:
    """A QEMU destination's tls-creds directory and the send's TLSConfig."""
    qemu_dir: Path
    source: TLSConfig


def credentials(tmp_path: Path, ca: trustme.CA, *, source_ca: trustme.CA | None = None,
                server_names: tuple[str, ...] = ("127.0.0.1",)) -> Credentials:
    """The destination's certificate for ``server_names`` and the source's, both from
    ``ca``; the source trusts ``source_ca`` (default ``ca``)."""
    qemu_dir = tmp_path / "qemu-tls"
    qemu_dir.mkdir(parents=True)
    server = ca.issue_cert(*server_names)
    ca.cert_pem.write_to_path(str(qemu_dir / "ca-cert.pem"))
    server.cert_chain_pems[0].write_to_path(str(qemu_dir / "server-cert.pem"))
    server.private_key_pem.write_to_path(str(qemu_dir / "server-key.pem"))
    client = ca.issue_cert("source.example")
    mine = tmp_path / "source-tls"
    mine.mkdir()
    client.cert_chain_pems[0].write_to_path(str(mine / "cert.pem"))
    client.private_key_pem.write_to_path(str(mine / "key.pem"))
    os.chmod(mine / "key.pem", 0o600)
    (source_ca or ca).cert_pem.write_to_path(str(mine / "ca.pem"))
    return Credentials(qemu_dir, TLSConfig(cert=str(mine / "cert.pem"),
                                           key=str(mine / "key.pem"), ca=str(mine / "ca.pem")))


def tls_destination(tmp_path, qemu_binary, creds_dir: Path | None, channels: int = 2,
                    compression: str = "none", mib: int = 64):
    """A QEMU waiting for a migration in TLS with the certificates in ``creds_dir``
    (verify-peer=on: the source must show a certificate of the same CA); None:
    in plaintext."""
    if creds_dir is None:
        return incoming_guest(tmp_path, channels, compression, qemu_binary, mib=mib)
    return incoming_guest(
        tmp_path, channels, compression, qemu_binary, mib=mib,
        options=("-object", f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=server,"
                            "verify-peer=on"),
        parameters={"tls-creds": "tls0"})


def assert_not_migrated(guest) -> None:
    """A QEMU destination whose migration failed has not completed one: it exits
    (QEMU 10: its load failed) or waits on."""
    try:
        status = guest.qmp.command("query-migrate").get("status")
    except OSError:                     # its QMP socket is gone with it
        assert guest.process.wait(10) != 0
    else:
        assert status != "completed"


@pytest.mark.parametrize("qemu_binary", QEMUS)
@pytest.mark.parametrize("channels, compression", [(2, "none"), (3, "zstd")])
def test_a_saved_migration_goes_back_into_qemu_in_tls(tmp_path, qemu_binary, channels,
                                                      compression):
    """QEMU takes the first connection whose handshake completes for its main
    channel (spec §7), verifies this side's certificate (verify-peer=on), and
    QEMU 10 expects each multifd channel to end with a TLS close_notify."""
    saved, ram = saved_guest(tmp_path, 2, "none", qemu_binary)
    creds = credentials(tmp_path, trustme.CA())
    guest, ram_path, address = tls_destination(tmp_path, qemu_binary, creds.qemu_dir,
                                               channels, compression)
    try:
        sent = qemu.send(address, str(saved), channels=channels, compression=compression,
                         stall_timeout=10.0, tls=creds.source)
        assert_loaded(guest, ram_path, ram)
        assert len(sent) == channels and all(c["normal_pages"] > 0 for c in sent)
    finally:
        guest.close()


@needs_qemu
def test_send_qemu_command_in_tls(tmp_path):
    saved, ram = saved_guest(tmp_path, 2, "none", QEMU)
    creds = credentials(tmp_path, trustme.CA())
    guest, ram_path, address = tls_destination(tmp_path, QEMU, creds.qemu_dir)
    try:
        tls = creds.source
        done = subprocess.run(
            [sys.executable, "-m", "fastmfd", "send", "--qemu", address, "--dir", str(saved),
             "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert_loaded(guest, ram_path, ram)
    finally:
        guest.close()


@pytest.mark.parametrize("qemu_binary", QEMUS)
def test_a_destination_certificate_this_side_does_not_trust_fails_the_send(tmp_path,
                                                                          qemu_binary):
    saved, _ = saved_guest(tmp_path, 2, "none", qemu_binary)
    creds = credentials(tmp_path, trustme.CA(), source_ca=trustme.CA())
    guest, _, address = tls_destination(tmp_path, qemu_binary, creds.qemu_dir)
    try:
        with pytest.raises(SecurityError, match="main channel: TLS handshake failed: "
                                                "certificate verify failed"):
            qemu.send(address, str(saved), channels=2, stall_timeout=10.0, tls=creds.source)
    finally:
        guest.close()


@pytest.mark.parametrize("qemu_binary", QEMUS)
@pytest.mark.parametrize("hostname", [None, "dst.example"])
def test_the_destination_s_certificate_must_carry_the_name_checked(tmp_path, qemu_binary,
                                                                   hostname):
    """By default the address's host (127.0.0.1), which a certificate for
    dst.example does not carry; ``hostname`` names another."""
    saved, ram = saved_guest(tmp_path, 2, "none", qemu_binary)
    creds = credentials(tmp_path, trustme.CA(), server_names=("dst.example",))
    tls = TLSConfig(cert=creds.source.cert, key=creds.source.key, ca=creds.source.ca,
                    hostname=hostname)
    guest, ram_path, address = tls_destination(tmp_path, qemu_binary, creds.qemu_dir)
    try:
        if hostname is None:
            with pytest.raises(SecurityError, match="certificate verify failed.*127.0.0.1.*"
                                                    "carry the name checked"):
                qemu.send(address, str(saved), channels=2, stall_timeout=10.0, tls=tls)
        else:
            qemu.send(address, str(saved), channels=2, stall_timeout=10.0, tls=tls)
            assert_loaded(guest, ram_path, ram)
    finally:
        guest.close()


@pytest.mark.parametrize("qemu_binary", QEMUS)
def test_a_source_certificate_the_destination_refuses_fails_the_send(tmp_path, qemu_binary):
    """QEMU's verify-peer=on: a client certificate of another CA is refused. In
    TLS 1.3 this side's handshake is over before QEMU checks it: the refusal is
    the connection's end."""
    saved, _ = saved_guest(tmp_path, 2, "none", qemu_binary)
    creds = credentials(tmp_path, trustme.CA())
    stranger = credentials(tmp_path / "stranger", trustme.CA())
    refused = TLSConfig(cert=stranger.source.cert, key=stranger.source.key, ca=creds.source.ca)
    guest, _, address = tls_destination(tmp_path, qemu_binary, creds.qemu_dir)
    try:
        # The main channel's write, or a multifd channel's, meets the end first: a
        # reset, or (QEMU 10, its FIN read before the RST: about 1 run in 50 under
        # load) a broken pipe.
        with pytest.raises(MigrationError, match=r"^(main channel: sending failed: the "
                                                 r"connection ended|multifd channel \d: .*"
                                                 r"(Connection reset by peer|Broken pipe)) .* "
                                                 r"tls-creds whose CA issued this source's "
                                                 r"certificate"):
            qemu.send(address, str(saved), channels=2, stall_timeout=10.0, tls=refused)
        assert_not_migrated(guest)
    finally:
        guest.close()


@pytest.mark.parametrize("qemu_binary", QEMUS)
@pytest.mark.parametrize("ours, theirs, match", [
    # QEMU reads the ClientHello as the stream's first bytes, and fails: QEMU 10
    # closes the connection, 7.2 leaves it open (the handshake's deadline ends it).
    ("tls", "plaintext", r"^main channel: (the peer closed the connection during the TLS "
                         r"handshake \(does it use TLS\?\)|TLS handshake: no answer within 3 s) "
                         r"\(has the destination QEMU tls-creds"),
    # QEMU's handshake reads QEVM, and closes: the main channel or a multifd
    # channel (the one sending when the reset came) says so first.
    ("plaintext", "tls", r"^(main|multifd) channel.*: .* no tls-creds \(this send is in "
                         r"plaintext\)"),
])
def test_tls_meeting_plaintext_fails_the_send_saying_so(tmp_path, qemu_binary, ours, theirs,
                                                        match):
    saved, _ = saved_guest(tmp_path, 2, "none", qemu_binary)
    creds = credentials(tmp_path, trustme.CA())
    guest, _, address = tls_destination(tmp_path, qemu_binary,
                                        creds.qemu_dir if theirs == "tls" else None)
    try:
        with pytest.raises(MigrationError, match=match):
            qemu.send(address, str(saved), channels=2, stall_timeout=10.0, timeout=3.0,
                      tls=creds.source if ours == "tls" else None)
        assert_not_migrated(guest)
    finally:
        guest.close()


# ---------------------------------------------------------------- a destination that dies

@pytest.fixture(params=QEMUS)
def waiting_in_tls(request, tmp_path):
    """A saved guest larger than the send's connections hold, and a QEMU waiting
    for it in TLS: yields ((saved directory, guest, its RAM file, address), the
    send's TLSConfig)."""
    saved, _ = saved_guest(tmp_path, SEND_CHANNELS, "none", request.param,
                           mib=STOPPED_GUEST_MIB)
    creds = credentials(tmp_path, trustme.CA())
    guest, ram_path, address = tls_destination(tmp_path, request.param, creds.qemu_dir,
                                               SEND_CHANNELS, mib=STOPPED_GUEST_MIB)
    try:
        yield (saved, guest, ram_path, address), creds.source
    finally:
        resume_and_close(guest)


def test_a_destination_killed_mid_send_in_tls_fails_it_at_once(waiting_in_tls, leaks):
    destination, tls = waiting_in_tls
    sending, workers = send_slowly(destination, stall_timeout=PATIENT, tls=tls)
    kill(destination[1])
    assert_fails(sending, DESTINATION_KILLED)
    assert_gone(workers)
    destination[1].close()          # its QMP socket is the test's, not a leak
    leaks.assert_clean()


def test_a_destination_stopped_mid_send_in_tls_fails_it_at_its_stall_timeout(waiting_in_tls,
                                                                            leaks):
    """Each worker's writes have the kernel's deadline (the socket's blocking for
    OpenSSL): the first to make no progress for it, or the main process's wait
    for a channel, ends the send."""
    destination, tls = waiting_in_tls
    sending, workers = send_slowly(destination, stall_timeout=STALL, tls=tls)
    os.kill(destination[1].process.pid, signal.SIGSTOP)
    assert_fails(sending, r"^(no multifd channel took work for 2 s|main channel: the "
                          r"destination took no data for 2 s|multifd channel \d: (send: no "
                          r"progress for 2 s \(the peer takes no data\)|no Done report within"
                          r"|no progress for 2 s, after \d+ pages were written))")
    assert_gone(workers)
    resume_and_close(destination[1])
    leaks.assert_clean()


def test_a_destination_that_takes_no_channel_in_tls_is_not_said_to_have_closed(
        tmp_path, qemu72_captures):
    """A TLS destination that handshakes every connection (a TLS 1.3 server sends
    session tickets after it), reads the main channel, answers nothing and reads
    no multifd channel: the send fails as in plaintext ("no multifd channel took
    work"). Its watch of the main channel, finding the socket readable, waited
    the whole stall timeout in recv() for data the tickets are not, then said
    "the destination broke the connection: The read operation timed out" and
    hinted that it closed, which it did not (a review)."""
    receive_replay(tmp_path / "saved", capture_bytes(qemu72_captures, "none"))
    creds = credentials(tmp_path, trustme.CA())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(creds.qemu_dir / "server-cert.pem",
                            creds.qemu_dir / "server-key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve(conn: socket.socket, main: bool) -> None:
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except OSError:
            return
        held.append(tls)
        while main and tls.recv(1 << 16):
            pass

    def accept() -> None:
        for i in range(3):
            try:
                conn = listener.accept()[0]
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=serve, args=(conn, i == 0), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with pytest.raises(MigrationError) as failed:
            qemu.send(f"tcp:127.0.0.1:{listener.getsockname()[1]}", str(tmp_path / "saved"),
                      channels=2, stall_timeout=2.0, tls=creds.source)
        assert re.match(r"(multifd channel \d: )?no (multifd channel took work|progress)",
                        failed.value.cause), failed.value
        assert not re.search("broke the connection|closed the connection|timed out",
                             str(failed.value)), failed.value
    finally:
        listener.close()
        for sock in held:
            sock.close()


@pytest.mark.parametrize("qemu_binary", QEMUS)
def test_a_sender_closed_from_another_thread_mid_send_in_tls(tmp_path, qemu_binary, leaks):
    """As in plaintext (test_qemu_lifecycle): send() fails at once saying so (it
    died of SIGSEGV, its block files unmapped under it), the destination fails."""
    saved, _ = saved_guest(tmp_path, SEND_CHANNELS, "none", qemu_binary, mib=64)
    creds = credentials(tmp_path, trustme.CA())
    guest, ram_path, address = tls_destination(tmp_path, qemu_binary, creds.qemu_dir,
                                               SEND_CHANNELS, mib=64)
    try:
        sender = qemu.QemuSender(saved, channels=SEND_CHANNELS, max_bandwidth=SLOW,
                                 stall_timeout=PATIENT, tls=creds.source)
        workers = sender.worker_pids()
        sending = Background("send()", lambda: sender.send(address))
        wait_until_filled(lambda: [ram_path], ram_path.stat().st_blocks * 512 + (4 << 20))
        sender.close()
        with pytest.raises(MigrationError, match="^the QemuSender was closed$"):
            sending.result(10.0)
        assert guest.wait(10.0) == "failed"
        assert_gone(workers)
    finally:
        guest.close()
    leaks.assert_clean()


def test_a_sender_closed_during_its_main_channel_s_handshake_ends_at_once(tmp_path,
                                                                         qemu72_captures,
                                                                         leaks):
    """A destination that takes the connection and says nothing: the SSLSocket had
    taken the connection from the socket a cancel shuts, and send() waited for the
    handshake's end, up to its timeout (60 s here)."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    creds = credentials(tmp_path, trustme.CA())
    with socket.create_server(("127.0.0.1", 0)) as silent:
        sender = qemu.QemuSender(saved, timeout=60.0, stall_timeout=60.0, tls=creds.source)
        sending = Background("send()", lambda: sender.send(
            f"tcp:127.0.0.1:{silent.getsockname()[1]}"))
        held, _ = silent.accept()
        with held:
            held.settimeout(10.0)
            assert held.recv(1)                 # the ClientHello: the handshake waits
            sender.close()
            with pytest.raises(MigrationError, match="^the QemuSender was closed$"):
                sending.result(10.0)
    leaks.assert_clean()


def test_a_cancel_that_saw_the_connection_before_tls_took_it_ends_the_handshake(
        tmp_path, qemu72_captures, monkeypatch, leaks):
    """cancel() reads the sockets to shut, then shuts them: one that read the plain
    connection just before send() handed it to TLS shut a detached socket (fd -1),
    never the copy a cancel shuts, and send() waited for the handshake's end, its
    timeout (a review; the cancel's thread held there, as a thread switch holds it)."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    creds = credentials(tmp_path, trustme.CA())
    real_connect, real_shutdown = qemu_sending.connect, qemu_sending.shutdown_quietly
    listed = threading.Event()

    def held_after_its_list(sock):
        if threading.current_thread().name == "canceller":
            listed.set()
            deadline = time.monotonic() + 2
            while sock.fileno() != -1 and time.monotonic() < deadline:
                time.sleep(0.01)            # until send() has handed it to its SSLSocket
        real_shutdown(sock)

    def connected_then_cancelled(address, timeout, connecting):
        sock = real_connect(address, timeout, connecting)
        threading.Thread(target=sender.cancel, args=("stop now",), name="canceller",
                         daemon=True).start()
        listed.wait(5)                      # the cancel came now, seeing ``sock``
        return sock

    monkeypatch.setattr(qemu_sending, "connect", connected_then_cancelled)
    monkeypatch.setattr(qemu_sending, "shutdown_quietly", held_after_its_list)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        sender = qemu.QemuSender(saved, timeout=60.0, stall_timeout=60.0, tls=creds.source)
        sending = Background("send()", lambda: sender.send(
            f"tcp:127.0.0.1:{silent.getsockname()[1]}"))
        held, _ = silent.accept()           # taken, and nothing said
        with held:
            with pytest.raises(MigrationError, match="^stop now$"):
                sending.result(10.0)        # (its timeout: 60 s)
        sender.close()
    leaks.assert_clean()
