"""A host given by name: looked up for IPv4 and IPv6, each address tried in turn, the
data channels sent where the main channel went, a listener on the name's first address.

Names go through the real resolver. 'localhost' is this host's; the other names live in
a private /etc/hosts, bind-mounted in a mount and network namespace of a child process
(root only) whose loopback has the addresses they name:
  two4  = 10.77.0.1 (nothing listens there: refused), 10.77.0.2
  only6 = fd00:77::2 (no IPv4 address: a name of an IPv6-only host)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

import fastmfd
from fastmfd.protocol.sockets import connect, parse_address

HOSTS = "fd00:77::2 only6\n10.77.0.1 two4\n10.77.0.2 two4\n"      # two4's last
SETUP = ("ip link set lo up && ip addr add 10.77.0.1/32 dev lo && "
         "ip addr add 10.77.0.2/32 dev lo && ip addr add fd00:77::2/128 dev lo nodad && "
         'mount --bind "$0" /etc/hosts && exec "$@"')
# What each child runs first: a migration of one region to ADDRESS, checked.
MIGRATE = """
import socket, threading
import fastmfd
from fastmfd.protocol.sockets import connect, parse_address

def migrate(listen, send, *, channels=2, timeout=30.0, before_send=lambda port: None):
    ram = fastmfd.Region.create("ram", 64 * 4096)
    ram.array[:] = 7
    box = {}
    try:
        with fastmfd.Destination(listen, workers=channels, timeout=timeout) as dst:
            port = int(dst.address.rpartition(":")[2])
            before_send(port)
            thread = threading.Thread(target=lambda: box.update(r=dst.receive()))
            thread.start()
            config = fastmfd.MigrationConfig(channels=channels, timeout=timeout,
                                             stall_timeout=timeout)
            try:
                with fastmfd.Source(send.replace("PORT", str(port)), config) as src:
                    src.add_region(ram)
                    src.migrate(live=False)
            finally:
                thread.join(60)
            assert (box["r"].regions["ram"].array == 7).all()
            return dst.address
    finally:
        ram.close()
"""


def in_namespace(tmp_path, code: str) -> subprocess.CompletedProcess:
    """Run python ``code`` (after MIGRATE) with the names above; its result."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip: the names are in a private /etc/hosts "
                    "bind-mounted in a mount namespace, their addresses on the loopback "
                    "of a network namespace (the host's /etc/hosts is not touched)")
    hosts = tmp_path / "hosts"
    hosts.write_text(open("/etc/hosts").read() + HOSTS)
    script = MIGRATE + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(["unshare", "-m", "-n", "--propagation", "private", "sh", "-c", SETUP,
                           str(hosts), sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_name_whose_first_address_refuses_is_reached_at_the_next(tmp_path):
    """Was 'cannot connect to tcp:two4:PORT: Connection refused' (10.77.0.1 only)."""
    done = in_namespace(tmp_path, """
        print(migrate("tcp:10.77.0.2:0", "tcp:two4:PORT"))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tcp:10.77.0.2:")


def test_a_name_with_only_an_ipv6_address_is_listened_on_and_reached(tmp_path):
    """Was 'Temporary failure in name resolution' to listen and to connect (looked up
    for IPv4 only); the listener says the address it bound."""
    done = in_namespace(tmp_path, """
        print(migrate("tcp:only6:0", "tcp:only6:PORT"))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tcp:[fd00:77::2]:"), done.stdout


def test_a_name_nothing_answers_at_is_refused_naming_each_address_tried(tmp_path):
    done = in_namespace(tmp_path, """
        import errno
        try:
            migrate("tcp:127.0.0.1:0", "tcp:two4:PORT", timeout=0.5)
        except fastmfd.ConnectError as exc:
            assert exc.errno == errno.ECONNREFUSED, exc
            print(exc)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"cannot connect to tcp:two4:{done.stdout.split(':')[2]}: "
                                   "10.77.0.1: Connection refused; "
                                   "10.77.0.2: Connection refused"), done.stdout


def test_the_channels_go_where_the_main_channel_went_not_to_the_name_again(tmp_path):
    """A name whose answers rotate (round-robin DNS: here /etc/hosts lists two4's
    addresses the other way round after each connection to the migration's port).
    The channels looked the name up again, so the first reached another host (a
    listener that takes connections and says nothing) and the migration failed."""
    done = in_namespace(tmp_path, """
        hosts = open("/etc/hosts").read()
        others, connect = [], socket.socket.connect

        def connect_and_rotate(sock, target):
            try:
                return connect(sock, target)
            finally:
                if others and isinstance(target, tuple) and \\
                        target[1] == others[0].getsockname()[1]:
                    rotate()

        def rotate():
            global hosts
            head, _, last = hosts.rstrip("\\n").rpartition("\\n")
            first, _, middle = head.rpartition("\\n")
            hosts = f"{first}\\n{last}\\n{middle}\\n"
            with open("/etc/hosts", "w") as file:
                file.write(hosts)

        socket.socket.connect = connect_and_rotate
        print(migrate("tcp:10.77.0.1:0", "tcp:two4:PORT", timeout=3, before_send=lambda port:
                      others.append(socket.create_server(("10.77.0.2", port)))))
        others[0].setblocking(False)
        try:
            others[0].accept()
            raise AssertionError("a channel went to 10.77.0.2")
        except BlockingIOError:
            pass
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tcp:10.77.0.1:"), done.stdout


def test_a_name_of_this_host_nothing_answers_at_names_the_address_tried():
    """'localhost' through this host's resolver: was only 'Connection refused'."""
    with socket.socket() as probe:           # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    addresses = [a[4][0] for a in socket.getaddrinfo("localhost", port, socket.AF_UNSPEC,
                                                     socket.SOCK_STREAM)]
    with pytest.raises(fastmfd.ConnectError) as error:
        connect(parse_address(f"tcp:localhost:{port}"), 0.5)
    # ::1 may refuse or be unreachable (no IPv6 here): each says its own
    assert str(error.value).startswith(f"cannot connect to tcp:localhost:{port}: "
                                       f"{addresses[0]}: "), error.value
    for address in addresses:
        assert f"{address}: " in str(error.value)
