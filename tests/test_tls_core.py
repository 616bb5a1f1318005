"""The core's TLS transport: TLSChannel (OpenSSL driven from C) and the engines
running a channel through it. Real TLS, certificates from trustme, over
socketpairs and loopback TCP."""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trustme

from fastmfd._core import TLSChannel
from fastmfd.errors import Aborted, MigrationError, TLSError
from engine_pair import CHUNK, PAGE, EnginePair

HOST = "server.test"


@dataclass(frozen=True)
class Pki:
    ca: str                 # the CA both sides trust
    server: str             # key + chain, DNS server.test, IPs 127.0.0.1 and ::1
    client: str             # key + chain, CN client-1, DNS client-1.test, ops@client.test
    other_server: str       # issued by another CA
    other_client: str
    expired_server: str
    expired_client: str


def _pem(directory: Path, name: str, cert: trustme.LeafCert) -> str:
    path = directory / f"{name}.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    long_ago = past - datetime.timedelta(days=30)
    return Pki(
        ca=str(d / "ca.pem"),
        server=_pem(d, "server", ca.issue_cert(HOST, "127.0.0.1", "::1")),
        client=_pem(d, "client", ca.issue_cert("client-1.test", "ops@client.test",
                                               common_name="client-1")),
        other_server=_pem(d, "other-server", other.issue_cert(HOST)),
        other_client=_pem(d, "other-client", other.issue_cert("client-1.test",
                                                              common_name="client-1")),
        expired_server=_pem(d, "expired-server", ca.issue_cert(
            HOST, not_before=long_ago, not_after=past)),
        expired_client=_pem(d, "expired-client", ca.issue_cert(
            "client-1.test", common_name="client-1", not_before=long_ago, not_after=past)),
    )


@pytest.fixture
def pair():
    """A connected AF_UNIX socketpair, closed at the end."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def tcp_pair():
    """Two ends of a loopback TCP connection (client, server), closed at the end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


def run_both(server_fn, client_fn, timeout: float = 20):
    """Run server_fn in a thread and client_fn here; (server result, client result),
    each the value returned or the exception raised."""
    out: dict = {}

    def server():
        try:
            out["server"] = server_fn()
        except BaseException as exc:   # noqa: BLE001 - compared by the test
            out["server"] = exc

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    try:
        out["client"] = client_fn()
    except BaseException as exc:       # noqa: BLE001
        out["client"] = exc
    thread.join(timeout)
    assert not thread.is_alive(), "the server side hangs"
    return out["server"], out["client"]


def handshake(pair, server_kw: dict, client_kw: dict, timeout: float = 5):
    client_sock, server_sock = pair
    return run_both(
        lambda: TLSChannel.accept(server_sock.fileno(), timeout=timeout, **server_kw),
        lambda: TLSChannel.connect(client_sock.fileno(), timeout=timeout, **client_kw))


def mutual(pki, **client_overrides):
    server_kw = {"cert": pki.server, "key": pki.server, "ca": pki.ca}
    client_kw = {"cert": pki.client, "key": pki.client, "ca": pki.ca, "hostname": HOST}
    client_kw.update(client_overrides)
    return server_kw, client_kw


def refused_by_server(server, client, server_reason: str, client_reason: str):
    """The server's handshake failed naming server_reason; the client learns of it
    with the server's alert: in its handshake (TLS 1.2) or, since a TLS 1.3
    client finishes first, at its first read."""
    assert isinstance(server, TLSError), server
    assert server_reason in str(server)
    if isinstance(client, TLSChannel):
        with pytest.raises(TLSError) as info:
            client.recv_exact(1, timeout=5)
        client = info.value
    assert isinstance(client, TLSError), client
    assert client_reason in str(client)


# ---------------------------------------------------------------- handshakes

def test_mutual_handshake_negotiates_tls13_and_names_both_peers(pki, tcp_pair):
    server, client = handshake(tcp_pair, *mutual(pki))
    assert isinstance(server, TLSChannel), server
    assert isinstance(client, TLSChannel), client
    assert client.version == server.version == "TLSv1.3"
    assert client.cipher == server.cipher == "TLS_AES_128_GCM_SHA256"
    assert server.peer_identities() == ["client-1", "client-1.test", "ops@client.test"]
    assert client.peer_identities() == [HOST, "127.0.0.1", "::1"]
    assert not client.server and server.server


def test_a_server_without_ca_asks_no_client_certificate(pki, pair):
    server, client = handshake(pair, {"cert": pki.server, "key": None},
                               {"ca": pki.ca, "hostname": HOST})
    assert isinstance(server, TLSChannel) and isinstance(client, TLSChannel)
    assert server.peer_identities() == []


@pytest.mark.parametrize("ciphers, version, cipher", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("TLS_CHACHA20_POLY1305_SHA256", "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"),
    ("TLS_AES_128_GCM_SHA256:ECDHE-ECDSA-AES256-GCM-SHA384", "TLSv1.3",
     "TLS_AES_128_GCM_SHA256"),
])
def test_ciphers_restrict_the_connection_to_those_named(pki, pair, ciphers, version, cipher):
    server_kw, client_kw = mutual(pki)
    server, client = handshake(pair, server_kw, dict(client_kw, ciphers=ciphers))
    assert isinstance(client, TLSChannel), client
    assert (client.version, client.cipher) == (version, cipher)
    assert (server.version, server.cipher) == (version, cipher)


def test_unknown_ciphers_are_refused_before_connecting(pki, pair):
    with pytest.raises(TLSError, match="no TLS 1.2 cipher in 'NOT-A-CIPHER'"):
        TLSChannel.connect(pair[0].fileno(), ca=pki.ca, ciphers="NOT-A-CIPHER")


def test_missing_files_are_named(pki, pair, tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSError, match="cannot load the certificate chain .*nope.pem"):
        TLSChannel.accept(pair[1].fileno(), cert=missing, key=None)
    with pytest.raises(TLSError, match="cannot load the CA certificates .*nope.pem"):
        TLSChannel.connect(pair[0].fileno(), ca=missing)
    with pytest.raises(TLSError, match="private key"):
        TLSChannel.accept(pair[1].fileno(), cert=pki.server, key=pki.ca)


def test_a_client_without_certificate_is_refused_by_a_server_with_ca(pki, pair):
    server, client = handshake(pair, *mutual(pki, cert=None, key=None))
    refused_by_server(server, client, "TLS handshake failed: peer did not return a certificate",
                      "alert certificate required")


def test_a_client_certificate_from_another_ca_is_refused(pki, pair):
    server, client = handshake(pair, *mutual(pki, cert=pki.other_client, key=None))
    refused_by_server(
        server, client,
        "TLS handshake failed: certificate verify failed (unable to get local issuer certificate)",
        "alert unknown ca")


def test_a_server_certificate_from_another_ca_is_refused(pki, pair):
    server_kw, client_kw = mutual(pki)
    server, client = handshake(pair, dict(server_kw, cert=pki.other_server, key=None), client_kw)
    assert isinstance(client, TLSError)
    assert str(client) == ("TLS handshake failed: certificate verify failed "
                           "(unable to get local issuer certificate)")
    assert isinstance(server, TLSError) and "alert unknown ca" in str(server)


def test_an_expired_server_certificate_is_refused(pki, pair):
    server_kw, client_kw = mutual(pki)
    server, client = handshake(pair, dict(server_kw, cert=pki.expired_server, key=None),
                               client_kw)
    assert isinstance(client, TLSError)
    assert str(client) == ("TLS handshake failed: certificate verify failed "
                           "(certificate has expired)")
    assert isinstance(server, TLSError) and "alert certificate expired" in str(server)


def test_an_expired_client_certificate_is_refused(pki, pair):
    server, client = handshake(pair, *mutual(pki, cert=pki.expired_client, key=None))
    refused_by_server(server, client,
                      "TLS handshake failed: certificate verify failed (certificate has expired)",
                      "alert certificate expired")


def test_a_wrong_hostname_is_refused(pki, pair):
    server, client = handshake(pair, *mutual(pki, hostname="other.test"))
    assert isinstance(client, TLSError)
    assert str(client) == "TLS handshake failed: certificate verify failed (hostname mismatch)"
    assert isinstance(server, TLSError)


@pytest.mark.parametrize("hostname", ["127.0.0.1", "::1", "[::1]"])
def test_an_ip_literal_hostname_matches_the_ip_san(pki, pair, hostname):
    server, client = handshake(pair, *mutual(pki, hostname=hostname))
    assert isinstance(client, TLSChannel), client
    assert isinstance(server, TLSChannel), server


def test_an_ip_literal_not_in_the_certificate_is_refused(pki, pair):
    server, client = handshake(pair, *mutual(pki, hostname="127.0.0.2"))
    assert isinstance(client, TLSError)
    assert "certificate verify failed (IP address mismatch)" in str(client)


def test_a_client_checks_the_system_cas_without_ca(pki, pair):
    server_kw, client_kw = mutual(pki, ca=None)
    server, client = handshake(pair, server_kw, client_kw)
    assert isinstance(client, TLSError)
    # trustme's chain file ends with its root: not one the system trusts.
    assert str(client).startswith("TLS handshake failed: certificate verify failed (")


def test_a_plaintext_client_is_told_apart_at_once(pki, pair):
    client_sock, server_sock = pair
    client_sock.sendall(b"\x11\x22\x33\x44 plaintext hello")
    start = time.monotonic()
    with pytest.raises(TLSError) as info:
        TLSChannel.accept(server_sock.fileno(), cert=pki.server, key=None, timeout=5)
    # Its first bytes (8 at most), in hex: what the stranger is.
    assert str(info.value) == ("the peer does not speak TLS (it sent plaintext: "
                               "11 22 33 44 20 70 6c 61)")
    assert time.monotonic() - start < 1.5


def test_a_plaintext_server_is_told_apart_at_once(pki, pair):
    client_sock, server_sock = pair
    server_sock.sendall(b"\x11\x22\x33\x44 plaintext greeting")
    with pytest.raises(TLSError) as info:
        TLSChannel.connect(client_sock.fileno(), ca=pki.ca, hostname=HOST, timeout=5)
    assert str(info.value) == ("the peer does not speak TLS (it sent plaintext: "
                               "11 22 33 44 20 70 6c 61)")


def test_a_plaintext_answer_to_the_hello_is_shown_in_hex(pki, tcp_pair):
    """An answer shorter than 8 bytes: those there are shown."""
    client_sock, server_sock = tcp_pair

    def plaintext_server():
        server_sock.recv(100)       # the ClientHello
        time.sleep(0.2)             # the client waits for its answer
        server_sock.sendall(b"\x17\x03\x03")

    _, client = run_both(plaintext_server, lambda: TLSChannel.connect(
        client_sock.fileno(), ca=pki.ca, hostname=HOST, timeout=5))
    assert isinstance(client, TLSError)
    assert str(client) == "the peer does not speak TLS (it sent plaintext: 17 03 03)"


def _fill_send_buffer(sock: socket.socket) -> int:
    """Write to ``sock`` until its send buffer and its peer's receive buffer (the
    peer reads nothing yet) take no more, and stay full; bytes written."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.setblocking(False)
    written = 0
    for _ in range(3):             # acks in flight may free room for a moment
        time.sleep(0.05)
        with contextlib.suppress(BlockingIOError):
            while True:
                written += sock.send(bytes(4096))
    sock.setblocking(True)
    return written


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection ended early"
        data += chunk
    return data


def test_a_server_answer_read_with_the_hello_is_not_taken_for_plaintext(pki, tcp_pair):
    """A client's first SSL_do_handshake sends its hello and reads what is there
    already. A server whose first flight comes in two writes (QEMU 7.2's GnuTLS:
    ServerHello and ChangeCipherSpec, then the encrypted rest, 0.1 ms later) may
    have sent only the first by that read, under load: the client, having read
    it, waited for "the answer's first byte", peeked an encrypted record's 0x17
    and said "the peer does not speak TLS (it sent plaintext)" (a QEMU TLS test
    failed so, once). Here the answer's first 3 bytes are made to be there
    before that read: the client's hello waits behind filler the relay (a man in
    the middle of a real server) reads only after sending them."""
    client_sock, relay_sock = tcp_pair
    relay_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    filler = _fill_send_buffer(client_sock)
    relay_end, server_end = socket.socketpair()
    server_kw, client_kw = mutual(pki)
    out: dict = {}

    def serve() -> None:
        out["server"] = TLSChannel.accept(server_end.fileno(), timeout=10, **server_kw)

    def copy(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)

    def relay() -> None:
        time.sleep(0.3)             # the client has looked for a greeting, found none
        relay_sock.sendall(b"\x16\x03\x03")             # a TLS 1.2+ record's start
        _recv_exactly(relay_sock, filler)               # now its hello can go
        header = _recv_exactly(relay_sock, 5)
        relay_end.sendall(header + _recv_exactly(relay_sock, int.from_bytes(header[3:],
                                                                             "big")))
        assert _recv_exactly(relay_end, 3) == b"\x16\x03\x03"
        threading.Thread(target=copy, args=(relay_sock, relay_end), daemon=True).start()
        copy(relay_end, relay_sock)

    threads = [threading.Thread(target=f, daemon=True) for f in (serve, relay)]
    for thread in threads:
        thread.start()
    try:
        client = TLSChannel.connect(client_sock.fileno(), timeout=10, **client_kw)
        threads[0].join(10)
        assert isinstance(out.get("server"), TLSChannel)
        client.send_all(b"ping")
        assert out["server"].recv_exact(4, timeout=5) == b"ping"
    finally:
        relay_end.close()
        server_end.close()


def test_a_plaintext_answer_read_with_the_hello_is_still_called_plaintext(pki, tcp_pair):
    """The case above with a plaintext server (an HTTP answer, its first 3 bytes
    there before the hello's call read): that call read them, so the client
    rightly skipped its look at the answer's first byte, and took the look as
    done: OpenSSL's "wrong version number" that came next was said as such, not
    "the peer does not speak TLS"."""
    client_sock, server_sock = tcp_pair
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    filler = _fill_send_buffer(client_sock)

    def plaintext_server() -> None:
        time.sleep(0.3)             # the client has looked for a greeting, found none
        server_sock.sendall(b"HTT")
        _recv_exactly(server_sock, filler)              # now its hello can go
        time.sleep(0.2)
        server_sock.sendall(b"P/1.1 400 Bad Request\r\n\r\n")

    _, client = run_both(plaintext_server, lambda: TLSChannel.connect(
        client_sock.fileno(), ca=pki.ca, hostname=HOST, timeout=10))
    assert isinstance(client, TLSError)
    assert str(client) == "the peer does not speak TLS (it sent plaintext)"


def test_a_server_that_closes_is_a_clear_error(pki, pair):
    client_sock, server_sock = pair
    server_sock.close()
    with pytest.raises(TLSError) as info:
        TLSChannel.connect(client_sock.fileno(), ca=pki.ca, hostname=HOST, timeout=5)
    assert str(info.value) == ("the peer closed the connection during the TLS handshake "
                               "(does it use TLS?)")


def test_a_plaintext_server_that_closes_after_reading_is_a_clear_error(pki, tcp_pair):
    client_sock, server_sock = tcp_pair

    def plaintext_server():
        server_sock.recv(100)       # the ClientHello, read as garbage
        server_sock.close()

    _, client = run_both(plaintext_server, lambda: TLSChannel.connect(
        client_sock.fileno(), ca=pki.ca, hostname=HOST, timeout=5))
    assert isinstance(client, TLSError)
    assert "the peer closed the connection during the TLS handshake" in str(client)


def test_a_client_that_closes_is_a_clear_error(pki, pair):
    client_sock, server_sock = pair
    client_sock.close()
    with pytest.raises(TLSError, match="closed the connection during the TLS handshake"):
        TLSChannel.accept(server_sock.fileno(), cert=pki.server, key=None, timeout=5)


@pytest.mark.parametrize("side", ["server", "client"])
def test_the_handshake_deadline_holds_against_a_silent_peer(pki, pair, side):
    client_sock, server_sock = pair
    start = time.monotonic()
    with pytest.raises(TLSError) as info:
        if side == "server":
            TLSChannel.accept(server_sock.fileno(), cert=pki.server, key=None, timeout=0.5)
        else:
            TLSChannel.connect(client_sock.fileno(), ca=pki.ca, hostname=HOST, timeout=0.5)
    elapsed = time.monotonic() - start
    assert str(info.value) == "TLS handshake: no answer within 0.5 s"
    assert 0.45 <= elapsed < 1.5
    # The socket is blocking again, as it was.
    assert (server_sock if side == "server" else client_sock).getblocking()


def test_the_handshake_deadline_is_total_not_per_read(pki, tcp_pair):
    """A peer that trickles the handshake a byte at a time cannot stretch it."""
    client_sock, server_sock = tcp_pair
    stop = threading.Event()

    def trickle():
        hello = b"\x16\x03\x01\x02\x00" + b"\x01" * 600
        for byte in hello:
            if stop.wait(0.05):
                return
            client_sock.send(bytes([byte]))

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(TLSError, match="no answer within 0.5 s"):
            TLSChannel.accept(server_sock.fileno(), cert=pki.server, key=None, timeout=0.5)
        assert time.monotonic() - start < 1.5
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- data

@pytest.fixture
def channels(pki, pair):
    server, client = handshake(pair, *mutual(pki))
    assert isinstance(server, TLSChannel) and isinstance(client, TLSChannel)
    return client, server


@pytest.mark.parametrize("size", [1, 100, 16383, 16384, 65537, 1 << 20, 8 << 20])
def test_send_all_and_recv_exact_round_trip(channels, size):
    client, server = channels
    data = os.urandom(size)
    sent, got = run_both(lambda: client.send_all(memoryview(data)),
                         lambda: server.recv_exact(size))
    assert sent is None
    assert got == data
    # And back, from a bytearray, with a timeout that is not reached.
    back, _ = run_both(lambda: client.recv_exact(size, timeout=20),
                       lambda: server.send_all(bytearray(data)))
    assert back == data


def test_recv_exact_times_out_and_the_channel_stays_usable(channels):
    client, server = channels
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no data within 0.3 s"):
        server.recv_exact(10, timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 1.5
    client.send_all(b"0123456789")
    assert server.recv_exact(10, timeout=5) == b"0123456789"


def test_close_write_ends_the_stream_cleanly(channels):
    client, server = channels
    client.send_all(b"last words")
    client.close_write()
    assert server.recv_exact(10) == b"last words"
    with pytest.raises(EOFError, match="closed after 0 of 1 bytes"):
        server.recv_exact(1)


def test_a_fin_without_close_notify_reads_as_end_of_stream(pki, pair):
    client_sock, server_sock = pair
    server, client = handshake(pair, *mutual(pki))
    client.send_all(b"abc")
    client_sock.shutdown(socket.SHUT_WR)
    assert server.recv_exact(3) == b"abc"
    with pytest.raises(EOFError):
        server.recv_exact(4)


def test_a_socket_timeout_is_eagain(channels, pair):
    client, server = channels
    pair[1].setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                       (0).to_bytes(8, "little") + (200_000).to_bytes(8, "little"))
    with pytest.raises(TimeoutError) as info:
        server.recv_exact(1)
    assert info.value.errno == errno.EAGAIN


def test_the_channel_does_not_own_its_socket(pki, pair):
    server, client = handshake(pair, *mutual(pki))
    fds = (pair[0].fileno(), pair[1].fileno())
    del server, client
    for fd in fds:
        os.fstat(fd)                # still open: the socket objects close them


def test_it_is_made_by_connect_or_accept_only():
    with pytest.raises(TypeError, match="connect"):
        TLSChannel()


# ---------------------------------------------------------------- engines over TLS

def tls_pair(pki, pair):
    server, client = handshake(pair, *mutual(pki))
    assert isinstance(server, TLSChannel) and isinstance(client, TLSChannel)
    return client, server


def job_pages(npages: int, seed: int = 3):
    """Every page once: a contiguous run, then the rest scattered (a few jobs)."""
    rng = np.random.default_rng(seed)
    run = np.arange(0, npages // 4)
    rest = rng.permutation(np.arange(npages // 4, npages))
    return [run, rest[: len(rest) // 2], rest[len(rest) // 2:]]


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("checksum", [False, True], ids=["", "checksum"])
def test_engines_over_tls_move_regions_byte_exact(pki, pair, compression, checksum):
    size = 8 << 20
    client, server = tls_pair(pki, pair)
    engines = EnginePair(pair[0], pair[1], size, compression=compression, checksum=checksum,
                         tls=(client, server))
    try:
        chunks = [os.urandom(CHUNK), os.urandom(1000), b""]
        for part in job_pages(size // PAGE)[:2]:
            engines.send_pages(part)
        engines.send_chunk(0, chunks[0])
        engines.send_chunk(1, chunks[1])
        engines.sync()
        engines.send_pages(job_pages(size // PAGE)[2])
        engines.send_chunk(2, chunks[2], last=True)
        engines.sync()
        engines.finish()
        assert engines.events == [1, 1, 0]      # SYNC, SYNC, EOF
        assert np.array_equal(engines.dst.array, engines.src.array)
        assert engines.chunks() == [(0, 0, chunks[0]), (1, 0, chunks[1]), (2, 1, b"")]
        sent = engines.counters_src.read(0)
        assert sent == engines.counters_dst.read(0) | {"jobs": sent["jobs"]}
    finally:
        engines.close()


def test_engines_without_tls_are_unchanged(pair):
    engines = EnginePair(pair[0], pair[1], 4 << 20)
    try:
        for part in job_pages((4 << 20) // PAGE):
            engines.send_pages(part)
        engines.send_chunk(0, b"device", last=True)
        engines.finish()
        assert np.array_equal(engines.dst.array, engines.src.array)
        assert engines.chunks() == [(0, 1, b"device")]
    finally:
        engines.close()


def test_an_engine_refuses_a_tls_channel_of_another_socket(pki, pair):
    client, server = tls_pair(pki, pair)
    with pytest.raises(ValueError, match="runs on fd"):
        EnginePair(pair[1], pair[0], 1 << 20, tls=(client, server))


class FlippingProxy:
    """Forwards bytes between two socketpairs, flipping one byte at ``offset``
    of the client -> server direction."""

    def __init__(self, offset: int) -> None:
        self.client, self._near = socket.socketpair()
        self._far, self.server = socket.socketpair()
        self.offset = offset
        self.flipped = False
        self.threads = [threading.Thread(target=self._pump, args=(self._near, self._far, True),
                                         daemon=True),
                        threading.Thread(target=self._pump, args=(self._far, self._near, False),
                                         daemon=True)]
        for thread in self.threads:
            thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if flip and seen <= self.offset < seen + len(data):
                    data = bytearray(data)
                    data[self.offset - seen] ^= 0x01
                    self.flipped = True
                seen += len(data)
                dst.sendall(data)
        except OSError:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for sock in (self.client, self.server, self._near, self._far):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(10)
        for sock in (self.client, self.server, self._near, self._far):
            sock.close()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_flipped_ciphertext_byte_is_an_error_never_garbage(pki, compression):
    size = 4 << 20
    proxy = FlippingProxy(offset=1_000_000)       # well past the handshake, inside the data
    engines = None
    try:
        client, server = tls_pair(pki, (proxy.client, proxy.server))
        engines = EnginePair(proxy.client, proxy.server, size, compression=compression,
                             tls=(client, server), image_data=np.random.default_rng(5).integers(
                                 1, 256, size, dtype=np.uint8))
        with contextlib.suppress(Aborted):      # the sender fails once the receiver has
            for part in job_pages(size // PAGE):
                engines.send_pages(part)
        with pytest.raises(OSError):
            engines.finish()
        assert proxy.flipped
        error = engines.recv_error
        assert isinstance(error, OSError) and error.errno == errno.EPROTO, error
        assert "TLS: " in str(error) and "bad record mac" in str(error), error
        # Every byte is untouched (zero: the image has none) or the source's: only
        # authenticated plaintext lands, even in a page cut by the failing record.
        dst, src = engines.dst.array, engines.src.array
        assert ((dst == src) | (dst == 0)).all()
        assert (dst == 0).any() and (dst == src).any()
        del dst, src
    finally:
        if engines is not None:
            engines.close()
        proxy.close()


def test_a_stalled_tls_peer_is_a_stall_for_the_engine(pki, pair):
    """The socket's SO_RCVTIMEO (the session's stall_timeout) ends a TLS read
    that made no progress, named as such."""
    client, server = tls_pair(pki, pair)
    pair[1].setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                       (0).to_bytes(8, "little") + (300_000).to_bytes(8, "little"))
    engines = EnginePair(pair[0], pair[1], 1 << 20, tls=(client, server))
    try:
        engines._recv_thread.join(10)
        error = engines.recv_error
        assert isinstance(error, MigrationError), repr(error)
        assert str(error) == "packet header: no progress for 0.3 s (no data arrives)"
    finally:
        engines.close()


def _relaying(server: TLSChannel, plain: socket.socket) -> tuple[threading.Thread, dict]:
    """``server.relay(plain)`` in a thread: (it, where its outcome goes)."""
    outcome: dict = {}

    def relay() -> None:
        try:
            outcome["result"] = server.relay(plain.fileno())
        except BaseException as exc:        # handed to the test
            outcome["error"] = exc
    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    return thread, outcome


def test_relay_passes_both_ways_until_its_plain_end_closes(channels, pair):
    """The peer's bytes come out of the plain socket decrypted and the plain
    socket's go to the peer encrypted; the peer's end shuts the plain socket for
    writing; the plain socket's end sends close_notify and ends the relay, which
    leaves the session's socket blocking, as it found it (it left it
    non-blocking: a review)."""
    client, server = channels
    near, far = socket.socketpair()
    with near, far:
        thread, outcome = _relaying(server, far)
        data = os.urandom(3 << 20)
        sender = threading.Thread(target=client.send_all, args=(data,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            got += near.recv(1 << 20)
        sender.join(20)
        assert bytes(got) == data
        near.sendall(b"answer")
        assert client.recv_exact(6, timeout=20) == b"answer"
        client.close_write()
        assert near.recv(1) == b""              # the peer's end, passed on
        near.sendall(b"after")                  # the other way still goes
        assert client.recv_exact(5, timeout=20) == b"after"
        near.shutdown(socket.SHUT_WR)
        thread.join(20)
        assert outcome == {"result": None}
        assert os.get_blocking(pair[1].fileno())
        with pytest.raises(EOFError):
            client.recv_exact(1, timeout=20)    # its close_notify


def test_relay_fails_on_bytes_that_are_not_tls(channels, pair):
    client, server = channels
    near, far = socket.socketpair()
    with near, far:
        thread, outcome = _relaying(server, far)
        pair[0].sendall(b"\x17\x03\x03\x00\x10" + bytes(16))   # a record that does not decrypt
        thread.join(20)
        assert isinstance(outcome.get("error"), TLSError), outcome
        assert "TLS relay failed" in str(outcome["error"])
