"""The options a multifd channel's socket gets (``protocol.sockets.tune_data_socket``).

A channel to a process on this host keeps at most LOCAL_UNSENT_LIMIT bytes
unsent (over loopback the destination would otherwise transmit the source's
queue for it); one to another host (here: across an emulated link, another
network namespace) keeps TCP's defaults.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time

import pytest

from fastmfd.protocol.sockets import (DATA_SOCKET_BUFFER, LOCAL_UNSENT_LIMIT,
                                      tune_data_socket)
from fastmfd.tools.bench.link import EmulatedLink, parse_link


def unsent_limit(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)   # 0: the default


def test_a_loopback_channel_keeps_little_unsent_and_no_nagle_delay():
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as source:
        destination, _ = server.accept()
        with destination:
            for sock in (source, destination):
                tune_data_socket(sock)
                assert unsent_limit(sock) == LOCAL_UNSENT_LIMIT
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_unix_channel_gets_large_buffers():
    a, b = socket.socketpair()
    with a, b:
        tune_data_socket(a)
        # The kernel caps each request at net.core.[wr]mem_max, and doubles it.
        for option, limit in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
            with open(f"/proc/sys/net/core/{limit}") as f:
                cap = int(f.read())
            assert a.getsockopt(socket.SOL_SOCKET, option) == 2 * min(DATA_SOCKET_BUFFER, cap)
        assert b.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != \
            a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)      # b, untuned, differs


def test_a_channel_its_peer_reset_is_left_for_its_first_read_to_report():
    with socket.create_server(("127.0.0.1", 0)) as server:
        source = socket.create_connection(server.getsockname())
        destination, _ = server.accept()
        with destination:
            source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            source.close()                                  # a reset, not a FIN
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    destination.getpeername()
                except OSError:
                    break
                time.sleep(0.01)
            tune_data_socket(destination)                   # no OSError from here
            with pytest.raises(ConnectionResetError):
                destination.recv(1)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None,
                    reason="an emulated link needs root and iproute2 (network namespace, "
                           "veth, tc)")
def test_a_channel_to_another_host_keeps_tcps_defaults():
    with EmulatedLink(parse_link("10gbit")) as link, link.listen() as server, \
            socket.create_connection(server.getsockname()) as source:
        destination, _ = server.accept()
        with destination:
            tune_data_socket(source)
            assert unsent_limit(source) == 0
            assert source.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
