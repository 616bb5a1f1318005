"""The test proxy (migration_support.Proxy) must not couple its connections.

A destination legitimately stops reading a RAM channel: a receive worker
holds at its SYNC until every other RAM channel has reached its own
(DESIGN §4.6). On a network, the other channels flow on regardless; the
proxy relays them all from one thread, so it must never block on one
connection. It once did (a blocking ``sendall`` to the held channel's
destination socket), and the sync-barrier test then hung: channel 1 waited
at its SYNC for channel 0, whose bytes the proxy could no longer deliver.
"""

from __future__ import annotations

import socket
import threading

from migration_support import Delay, Proxy, hello

HELD_BYTES = 64 << 20       # far more than the socket buffers of one connection hold
LATE = b"round 1 SYNC" * 100
BOUND = 5.0                 # seconds the late channel's bytes may take (they are 0.5 s late)


def test_a_connection_the_destination_does_not_read_holds_back_no_other():
    uuid = bytes(range(16))
    expected = hello(0, uuid) + LATE
    proxy = Proxy({0: Delay(0.5)})
    server = socket.create_server(("127.0.0.1", 0))
    sockets = [server]

    def connect(address: str) -> tuple[socket.socket, socket.socket]:
        """A client through the proxy, and the destination's end of it."""
        _, host, port = address.split(":")
        client = socket.create_connection((host, int(port)), timeout=10)
        sockets.append(client)
        sockets.append(server.accept()[0])
        return client, sockets[-1]

    def flood():
        try:
            held.sendall(hello(1, uuid) + bytes(HELD_BYTES))
        except OSError:
            pass            # shut down at the end of the test

    flooding = threading.Thread(target=flood, name="test flood", daemon=True)
    try:
        address = proxy.start(f"tcp:127.0.0.1:{server.getsockname()[1]}")
        held, _ = connect(address)          # channel 1: the destination never reads it
        late, late_upstream = connect(address)   # channel 0: half a second behind
        flooding.start()
        late.sendall(expected)

        got = bytearray()
        late_upstream.settimeout(BOUND)
        try:
            while len(got) < len(expected):
                piece = late_upstream.recv(len(expected) - len(got))
                if not piece:
                    break
                got += piece
        except socket.timeout:
            pass
        assert bytes(got) == expected, \
            f"channel 0 delivered {len(got)} of {len(expected)} bytes in {BOUND} s while " \
            f"the destination held channel 1 back"
    finally:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes the flood's blocked sendall
            except OSError:
                pass
            sock.close()
        proxy.close()
        if flooding.ident is not None:
            flooding.join(10)
