"""What does TLS cost one channel? (issue 8: AES-GCM runs at GB/s per core)

One channel's SendEngine and RecvEngine, each in a thread, over an AF_UNIX
socketpair: plain (the engines' writev/readv) against TLS (OpenSSL from C,
mutual TLS 1.3 with trustme certificates, the cipher OpenSSL prefers). A
timed round sends the whole region (random, incompressible pages, no
compression) plus a SYNC and waits until the receiver has applied it, so
both ends' work is in the time. Pages go as contiguous runs (large iovecs:
SSL_write straight from the region) or scattered (4 KiB pages gathered in
the staging buffer). Every setting checks destination == source first.

The throughput of TLS over plain, per layout, is the figure to read.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from engine_pair import PAGE, EnginePair  # noqa: E402

from fastmfd._core import TLSChannel  # noqa: E402


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("server.test").private_key_and_cert_chain_pem.write_to_path(str(d / "s.pem"))
    ca.issue_cert("client.test").private_key_and_cert_chain_pem.write_to_path(str(d / "c.pem"))
    return str(d / "ca.pem"), str(d / "s.pem"), str(d / "c.pem")


def tls_handshake(a: socket.socket, b: socket.socket, certificates):
    ca, server_pem, client_pem = certificates
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("server", TLSChannel.accept(
        b.fileno(), cert=server_pem, key=None, ca=ca, timeout=10)))
    thread.start()
    client = TLSChannel.connect(a.fileno(), cert=client_pem, key=None, ca=ca,
                                hostname="server.test", timeout=10)
    thread.join()
    return client, out["server"]


@pytest.fixture(scope="module")
def image(sizes):
    return np.random.default_rng(7).integers(1, 256, sizes.channel_bytes, dtype=np.uint8)


LAYOUTS = {
    "contiguous": lambda n: np.arange(n),
    "scattered": lambda n: np.random.default_rng(11).permutation(n),
}


@pytest.mark.benchmark(group="one channel: plain vs TLS")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_channel_throughput(benchmark, report_throughput, certificates, image, transport,
                            layout):
    a, b = socket.socketpair()
    engines = None
    try:
        tls = tls_handshake(a, b, certificates) if transport == "tls" else None
        engines = EnginePair(a, b, image.size, tls=tls, devices=False, image_data=image)
        pages = LAYOUTS[layout](image.size // PAGE)
        rounds = [0]

        def one_round():
            engines.send_pages(pages)
            engines.sync()
            rounds[0] += 1
            engines.wait_events(rounds[0])

        one_round()
        assert np.array_equal(engines.dst.array, engines.src.array)
        if tls is not None:
            benchmark.extra_info["cipher"] = tls[0].cipher
        benchmark.pedantic(one_round, rounds=7, warmup_rounds=1)
        report_throughput(image.size)
        engines.finish()
    finally:
        if engines is not None:
            engines.close()
        a.close()
        b.close()
