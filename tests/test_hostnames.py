"""A host given by name: looked up for IPv4 and IPv6, each address tried in turn, the
data channels sent where the main channel went, a listener at each of the name's addresses.

Names go through the real resolver. 'localhost' is this host's; the other names live in
a private /etc/hosts, bind-mounted in a mount and network namespace of a child process
(root only) whose loopback has the addresses they name:
  two4  = 10.77.0.1 (nothing listens there: refused), 10.77.0.2
  only6 = fd00:77::2 (no IPv4 address: a name of an IPv6-only host)
  dual  = ::1, 127.0.0.1 (what localhost is on most hosts)
  gone  = 10.77.0.9 (not this host's), 127.0.0.1
  away  = 10.77.0.8, 10.77.0.9 (neither this host's)
  trio  = 10.77.0.9 (not this host's), 127.0.0.1, 10.77.0.2
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fastmfd
from fastmfd import qemu
from fastmfd.errors import ConnectError, ListenError
from fastmfd.protocol.sockets import connect, listen, parse_address
from qemu_support import QEMU, Background, Guest, listening_command, pattern
from test_qemu_receive import capture_bytes, receive_replay

# two4's last (rotating_two4 turns the file's last two lines round)
HOSTS = ("fd00:77::2 only6\n::1 dual\n127.0.0.1 dual\n10.77.0.9 gone\n127.0.0.1 gone\n"
         "10.77.0.8 away\n10.77.0.9 away\n10.77.0.9 trio\n127.0.0.1 trio\n10.77.0.2 trio\n"
         "10.77.0.1 two4\n10.77.0.2 two4\n")
SETUP = ("ip link set lo up && ip addr add 10.77.0.1/32 dev lo && "
         "ip addr add 10.77.0.2/32 dev lo && ip addr add fd00:77::2/128 dev lo nodad && "
         'mount --bind "$0" /etc/hosts && exec "$@"')
# What each child runs first.
PRELUDE = "import errno\nimport fastmfd\nfrom test_hostnames import migrate\n"


def migrate(listen: str, send: str, *, channels: int = 2, timeout: float = 30.0,
            before_send=lambda port: None) -> str:
    """A migration of one region from ``send`` (PORT: the port the destination got)
    to a destination listening at ``listen``, checked; the destination's address."""
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


def in_namespace(tmp_path, code: str = "", argv: tuple[str, ...] = ()
                 ) -> subprocess.CompletedProcess:
    """Run python ``code`` (after PRELUDE), or ``argv``, with the names above; its result."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip: the names are in a private /etc/hosts "
                    "bind-mounted in a mount namespace, their addresses on the loopback "
                    "of a network namespace (the host's /etc/hosts is not touched)")
    hosts = tmp_path / "hosts"
    hosts.write_text(open("/etc/hosts").read() + HOSTS)
    argv = argv or (sys.executable, "-c", PRELUDE + textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), INSIDE: "1"}
    return subprocess.run(["unshare", "-m", "-n", "--propagation", "private", "sh", "-c", SETUP,
                           str(hosts), *argv], capture_output=True, text=True, timeout=300,
                          env=env)


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


@pytest.mark.parametrize("send", ["tcp:127.0.0.1:PORT", "tcp:[::1]:PORT"])
def test_a_name_of_both_families_is_listened_on_at_each_address(tmp_path, send):
    """'dual' is ::1 and 127.0.0.1, as localhost is on most hosts: a listener bound the
    first only, and a source whose resolver put the other first was refused there
    ('Connection refused' here; by name, a refusal before the next address). Each is
    bound, on one port (0: the one the first got); the listener says the name."""
    done = in_namespace(tmp_path, f"""
        print(migrate("tcp:dual:0", "{send}"))
    """)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"tcp:dual:\d+\n", done.stdout), done.stdout


def test_a_names_listener_refuses_at_each_address_and_a_cancel_ends_its_wait(tmp_path):
    """The listening sockets taken as one: a stranger at each address is refused and
    counted, a cancel wakes the wait on them all, and one waiting is told why."""
    done = in_namespace(tmp_path, """
        import pytest, socket, threading, time
        with fastmfd.Destination("tcp:dual:0", timeout=30) as dst:
            port = int(dst.address.rpartition(":")[2])
            strangers = [socket.create_connection((host, port)) for host in ("127.0.0.1", "::1")]
            for stranger in strangers:
                stranger.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n" * 10)
            failed = []
            waiting = threading.Thread(target=lambda: failed.append(
                pytest.raises(fastmfd.MigrationError, dst.receive)))
            waiting.start()
            while dst.refused_total < 2:
                time.sleep(0.05)
            late = socket.create_connection(("::1", port))
            dst.cancel("stop now")
            waiting.join(10)
            late.settimeout(10)
            print(failed[0].value, late.recv(200)[8:])
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ('stop now b\'{"error":"dropped: the session ended: stop now"}\'\n'
                           ), done.stdout


def test_an_address_of_a_name_this_host_lacks_is_left_out_saying_why(tmp_path):
    """'gone': 10.77.0.9 is no address of this host (as ::1 where IPv6 is off): left
    out with a warning, not a failure; the listener says the one address it has."""
    done = in_namespace(tmp_path, """
        import logging
        logging.basicConfig(format="%(levelname)s %(message)s")
        print(migrate("tcp:gone:0", "tcp:127.0.0.1:PORT"))
    """)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"tcp:127\.0\.0\.1:\d+\n", done.stdout), done.stdout
    assert ("WARNING tcp:gone:0: not listening at 10.77.0.9 (Cannot assign requested "
            "address): this host has no such address\n") in done.stderr, done.stderr


def test_a_name_with_an_address_left_out_says_each_address_it_listens_at(tmp_path):
    """'trio': 10.77.0.9 is not this host's, 127.0.0.1 and 10.77.0.2 are. The listener
    said the name ("listening on tcp:trio:PORT", Destination.address too): a source
    given it tries 10.77.0.9 first, where nothing listens. It says each address it
    bound, after the warning naming the one left out; .address is the first bound."""
    (tmp_path / "ram.img").write_bytes(bytes(range(256)) * 256)
    done = in_namespace(tmp_path, f"""
        import subprocess, sys
        with fastmfd.Destination("tcp:trio:0") as dst:
            port = dst.address.rpartition(":")[2]
            each = getattr(dst, "listening_on", "(none)")     # (unfixed: none, said the name)
            print(dst.address.replace(port, "PORT"), "|", each.replace(port, "PORT"))
        command = [sys.executable, "-m", "fastmfd"]
        listener = subprocess.Popen([*command, "listen", "tcp:trio:0", "--dir", "{tmp_path}/out",
                                     "--timeout", "60", "--json"], stderr=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        try:
            warned, line = listener.stderr.readline(), listener.stderr.readline()
            port = line.rpartition(":")[2].strip()
            print(warned.strip())
            print(line.replace(port, "PORT").strip())
            sent = subprocess.run([*command, "send", f"tcp:10.77.0.2:{{port}}",
                                   "{tmp_path}/ram.img", "-q", "--timeout", "10"],
                                  capture_output=True, text=True, timeout=60)
            print(sent.returncode, listener.wait(30), sent.stderr)
        finally:
            listener.kill()
            listener.wait(30)
        qemu = subprocess.run([*command, "listen", "--qemu", "tcp:trio:0", "--dir",
                               "{tmp_path}/saved", "--timeout", "1"], capture_output=True,
                              text=True, timeout=60)
        import re
        print(re.sub(r":\\d+ ", ":PORT ", qemu.stderr.splitlines()[1]))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "listening on tcp:127.0.0.1:PORT and tcp:10.77.0.2:PORT (QEMU: migrate with the "
        "multifd capability)"), done.stdout
    assert done.stdout.splitlines()[:-1] == [
        "tcp:127.0.0.1:PORT | tcp:127.0.0.1:PORT and tcp:10.77.0.2:PORT",
        "tcp:trio:0: not listening at 10.77.0.9 (Cannot assign requested address): this host "
        "has no such address",
        "listening on tcp:127.0.0.1:PORT and tcp:10.77.0.2:PORT",
        "0 0 "], done.stdout


def test_a_name_none_of_whose_addresses_is_here_is_no_listener(tmp_path):
    done = in_namespace(tmp_path, """
        from fastmfd.errors import ListenError
        from fastmfd.protocol.sockets import listen, parse_address
        try:
            listen(parse_address("tcp:away:5000"))
        except ListenError as exc:
            print(exc)
    """)
    assert done.returncode == 0, done.stderr
    said = done.stdout.removeprefix("cannot listen on tcp:away:5000: none of its addresses "
                                    "is this host's: ")
    assert sorted(said.strip().split(", ")) == [
        "10.77.0.8 (Cannot assign requested address)",
        "10.77.0.9 (Cannot assign requested address)"], done.stdout


def test_listen_on_a_name_of_both_families_takes_a_session_at_each_address(tmp_path):
    """``fastmfd listen`` of sessions one after another (each a Destination on the
    command's listening sockets) says the name and takes a source at each address."""
    (tmp_path / "ram.img").write_bytes(bytes(range(256)) * 256)
    done = in_namespace(tmp_path, f"""
        import glob, subprocess, sys
        command = [sys.executable, "-m", "fastmfd"]
        listener = subprocess.Popen([*command, "listen", "tcp:dual:0", "--max-sessions", "2",
                                     "--dir", "{tmp_path}/out", "--timeout", "60"],
                                    stderr=subprocess.PIPE, text=True)
        try:
            line = listener.stderr.readline()
            port = line.rpartition(":")[2].strip()
            print(line.replace(port, "PORT"), end="")
            for host in ("127.0.0.1", "[::1]"):
                sent = subprocess.run([*command, "send", f"tcp:{{host}}:{{port}}",
                                       "{tmp_path}/ram.img", "-q", "--timeout", "10"],
                                      capture_output=True, text=True, timeout=60)
                print(host, sent.returncode, sent.stderr)
            print(listener.wait(30), len(glob.glob("{tmp_path}/out/*/ram.img")))
        finally:            # (one that waits for a session more: not left behind)
            listener.terminate()
            listener.wait(30)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["listening on tcp:dual:PORT", "127.0.0.1 0 ",
                                        "[::1] 0 ", "0 2"], done.stdout


def test_port_0_taken_at_a_names_next_address_is_tried_again_then_given_up(tmp_path):
    """With port 0 each address gets the port the first got; taken at the next (by
    a listener there alone), the whole bind starts again, PORT_ATTEMPTS times at
    most, the port that collided held meanwhile. Here the host has one ephemeral
    port, taken at the name's second address: the second attempt finds no other
    port (it tried the same one 8 times), and the error names the collision; no
    socket is left open."""
    done = in_namespace(tmp_path, """
        import os, socket
        from fastmfd.errors import ListenError
        from fastmfd.protocol import listeners
        from fastmfd.protocol.sockets import listen, parse_address
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as ports:
            ports.write("40000 40000")
        second = socket.getaddrinfo("dual", 0, type=socket.SOCK_STREAM)[1]
        taken = socket.socket(second[0])
        if second[0] == socket.AF_INET6:
            taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind((second[4][0], 40000))
        taken.listen()
        binds = []
        listening = listeners._listening
        listeners._listening = lambda *args: binds.append(args[1]) or listening(*args)
        open_before = len(os.listdir("/proc/self/fd"))
        try:
            listen(parse_address("tcp:dual:0"))
        except ListenError as exc:
            print(exc)
        print(len(binds), 3, len(os.listdir("/proc/self/fd")) - open_before)
    """)
    assert done.returncode == 0, done.stderr
    said, counts = done.stdout.splitlines()
    assert re.fullmatch(r"cannot listen on tcp:dual:0: (127\.0\.0\.1|\[::1\]):40000: Address "
                        r"already in use", said), said
    binds, expected, left_open = counts.split()
    assert (binds, left_open) == (expected, "0"), counts


def test_port_0_taken_at_a_names_next_address_is_tried_again_and_got(tmp_path):
    """The retry that succeeds: the host has two ephemeral ports, and the one the
    kernel gives a bind first (the odd one) is taken at the name's second address.
    The retry asked for port 0 again and got the same port every time: all
    PORT_ATTEMPTS collided and the listener failed ("Address already in use") with
    a port free at both addresses. The port that collided is held while the next
    attempt gets another; a source reaches the listener at each address."""
    done = in_namespace(tmp_path, """
        import socket
        from fastmfd.protocol.sockets import listen, parse_address
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as ports:
            ports.write("40000 40001")
        second = socket.getaddrinfo("dual", 0, type=socket.SOCK_STREAM)[1]
        taken = socket.socket(second[0])
        if second[0] == socket.AF_INET6:
            taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind((second[4][0], 40001))
        taken.listen()
        listening = listen(parse_address("tcp:dual:0"))
        print(sorted(sock.getsockname()[1] for sock in listening.sockets))
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as ports:
            ports.write("41000 42000")      # (for the connections' own ports)
        for family, _, _, _, address in socket.getaddrinfo("dual", 40000,
                                                            type=socket.SOCK_STREAM):
            with socket.create_connection(address[:2], timeout=5):
                listening.accept()[0].close()
            print(address[0], "reached")
        listening.close()
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[40000, 40000]", "::1 reached", "127.0.0.1 reached"], \
        done.stdout


INSIDE = "FASTMFD_TEST_NAMES_INSIDE"
inside = pytest.mark.skipif(os.environ.get(INSIDE) != "1", reason="run in the namespace by "
                            "test_the_channels_go_where_the_main_channel_went_not_to_the_name")


def test_the_channels_go_where_the_main_channel_went_not_to_the_name_again(tmp_path):
    """The tests marked ``inside``, run in the namespace (in one process, ``-n 0``: four
    tests, and pytest-xdist's workers say nothing of those deselected)."""
    done = in_namespace(tmp_path, argv=(sys.executable, "-m", "pytest", "-q", "-n", "0", "-p",
                                        "no:cacheprovider", f"--basetemp={tmp_path / 'inside'}",
                                        __file__, "-k", "inside_"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^4 passed, \d+ deselected", done.stdout, re.M), done.stdout


@pytest.fixture
def rotating_two4(monkeypatch) -> Iterator[list[int]]:
    """A name whose answers rotate (round-robin DNS): /etc/hosts lists two4's addresses
    the other way round after each connection to a port put in the list given; as it
    was again after the test (10.77.0.1 first)."""
    ports: list[int] = []
    hosts = open("/etc/hosts").read()
    connect = socket.socket.connect

    def connect_and_rotate(sock, target):
        try:
            return connect(sock, target)
        finally:
            if isinstance(target, tuple) and target[1] in ports:
                rotate()

    def rotate():
        head, _, last = open("/etc/hosts").read().rstrip("\n").rpartition("\n")
        first, _, middle = head.rpartition("\n")
        with open("/etc/hosts", "w") as file:
            file.write(f"{first}\n{last}\n{middle}\n")

    monkeypatch.setattr(socket.socket, "connect", connect_and_rotate)
    yield ports
    with open("/etc/hosts", "w") as file:
        file.write(hosts)


@contextlib.contextmanager
def another_host(port: int) -> Iterator[None]:
    """Another host's listener on the name's other address, 10.77.0.2: it takes
    connections and says nothing; none is made to it."""
    with socket.create_server(("10.77.0.2", port)) as other:
        yield
        other.setblocking(False)
        with pytest.raises(BlockingIOError):
            other.accept()


@inside
def test_inside_fastmfd_channels_go_where_the_main_channel_went(rotating_two4):
    """The channels looked the name up again, so the first reached another host and
    the migration failed ('channel 0: not connected 3 s after SETUP_ACK')."""
    def before_send(port):
        rotating_two4.append(port)
        stack.enter_context(another_host(port))

    with contextlib.ExitStack() as stack:
        address = migrate("tcp:10.77.0.1:0", "tcp:two4:PORT", timeout=3, before_send=before_send)
    assert address.startswith("tcp:10.77.0.1:")


@inside
def test_inside_send_qemu_channels_go_where_the_main_channel_went(tmp_path, qemu72_captures,
                                                                  rotating_two4):
    """send --qemu's multifd channels too (into fastmfd's QEMU-protocol receiver)."""
    saved = receive_replay(tmp_path / "first", capture_bytes(qemu72_captures, "zstd"))
    listening, box = threading.Event(), {}
    receiving = Background("receive()", lambda: qemu.receive(
        "tcp:10.77.0.1:0", str(tmp_path / "second"), timeout=10, stall_timeout=10,
        on_listening=lambda address: (box.update(address=address), listening.set())),
        then=listening.set)
    assert listening.wait(30) and "address" in box, receiving.outcome
    port = int(box["address"].rpartition(":")[2])
    rotating_two4.append(port)
    with another_host(port):
        qemu.send(f"tcp:two4:{port}", str(tmp_path / "first"), channels=2, stall_timeout=10)
        again = receiving.result()
    assert again.manifest["channels"] == 2
    assert again.manifest["blocks"] == saved.manifest["blocks"]


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


def test_a_first_address_that_never_answers_leaves_time_for_the_next(monkeypatch):
    """A name's first address that drops every SYN (a broken IPv6 route; here a
    listener whose accept queue is full) took the whole timeout, and the next
    address, which answers, was never tried (a reread): each gets its share."""
    hole = socket.socket(socket.AF_INET6)
    good = socket.create_server(("127.0.0.1", 0))
    with hole, good:
        hole.bind(("::1", 0))
        hole.listen(0)
        filler = socket.create_connection(("::1", hole.getsockname()[1]))  # the queue is full
        answers = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                    ("::1", hole.getsockname()[1], 0, 0)),
                   (socket.AF_INET, socket.SOCK_STREAM, 6, "",
                    ("127.0.0.1", good.getsockname()[1]))]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answers)
        with filler, connect(parse_address("tcp:dual.example:9"), 4.0) as sock:
            assert sock.getpeername()[:2] == ("127.0.0.1", good.getsockname()[1])


@pytest.mark.parametrize("call", ["listen", "connect"])
def test_a_name_idna_cannot_encode_is_no_such_name(call):
    """'a..b' (an empty label) raised a bare UnicodeError from the lookup, a traceback
    at the command line, where it had been 'Name or service not known' (a reread)."""
    with pytest.raises((ListenError, ConnectError), match=r"a\.\.b:5: Name or service not "
                       r"known$"):
        if call == "listen":
            listen(parse_address("tcp:a..b:5")).close()
        else:
            connect(parse_address("tcp:a..b:5"), 1.0).close()


def _with_a_silent_dns(tmp_path, code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a mount and network namespace where /etc/resolv.conf
    names 127.0.0.1 (timeout:10, attempts:1), where the code's UDP socket reads
    nothing; nsswitch.conf looks names up in DNS only."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip (a private resolv.conf and loopback)")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:10 "
                                          "attempts:1\n")
    (tmp_path / "nsswitch.conf").write_text("hosts: dns\n")
    setup = (f"ip link set lo up && mount --bind {tmp_path}/resolv.conf /etc/resolv.conf && "
             f"mount --bind {tmp_path}/nsswitch.conf /etc/nsswitch.conf && exec \"$@\"")
    return subprocess.run(["unshare", "-m", "-n", "--propagation", "private", "sh", "-c",
                           setup, "sh", sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize("call, failed", [
    ('connect(parse_address("tcp:slow.example:5000"), 1.0)', "cannot connect to"),
    ('fastmfd.Destination("tcp:slow.example:5000")', "cannot listen on"),
    ('fastmfd.qemu.QemuReceiver("tcp:slow.example:5000", "TMP/out")', "cannot listen on")])
def test_a_lookup_nobody_answers_ends_within_its_deadline(tmp_path, call, failed):
    """getaddrinfo has no deadline of its own: a DNS server that never answers held a
    connect with a timeout of 1 s, and a listener, for the resolver's time (here
    timeout:10, 10 s), then said 'Temporary failure in name resolution'. A listener
    waits LISTEN_LOOKUP_SECONDS (1 s here)."""
    done = _with_a_silent_dns(tmp_path, f"""
        import socket, time
        import fastmfd, fastmfd.qemu
        from fastmfd.errors import ConnectError, ListenError
        from fastmfd.protocol import sockets
        from fastmfd.protocol.sockets import connect, parse_address
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 53))
        sockets.LISTEN_LOOKUP_SECONDS = 1.0
        started = time.monotonic()
        try:
            {call.replace("TMP", str(tmp_path))}
        except (ConnectError, ListenError) as exc:
            print(exc.errno == socket.EAI_AGAIN, round(time.monotonic() - started, 1))
            print(exc)
    """)
    assert done.returncode == 0, done.stderr
    said, error = done.stdout.splitlines()
    eai_again, seconds = said.split()
    assert eai_again == "True" and float(seconds) < 1 + 2, done.stdout
    assert error == (f"{failed} tcp:slow.example:5000: no answer looking up "
                     "slow.example within 1 s (its name service: /etc/resolv.conf, "
                     "/etc/nsswitch.conf)")


def test_connects_that_give_up_leave_one_lookup_of_a_name_running(tmp_path):
    """Each connect that gave up at its deadline left its lookup thread running for
    the resolver's time: 8 retries, 8 threads, each a pid against pids.max (a
    review). A later connect waits on the lookup in flight instead, and says so."""
    done = _with_a_silent_dns(tmp_path, """
        import socket, threading
        from fastmfd.errors import ConnectError
        from fastmfd.protocol.sockets import connect, parse_address
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 53))
        for attempt in range(4):
            try:
                connect(parse_address("tcp:slow.example:5000"), 0.5)
            except ConnectError as exc:
                print(exc.errno == socket.EAI_AGAIN)
        print(sum(t.name == "fastmfd name lookup" for t in threading.enumerate()))
    """)
    assert done.stdout.split() == ["True"] * 4 + ["1"], (done.stdout, done.stderr[-2000:])


def test_a_child_forked_while_a_lookup_is_in_flight_looks_the_name_up_again(tmp_path):
    """A connect that gave up left its lookup in flight; a child forked then had the
    entry but not the thread that ends it: every later connect to the name there
    waited on it and failed 'no answer looking up', though the name server answered
    by then (a review, D3). Here the child answers the DNS queries itself."""
    done = _with_a_silent_dns(tmp_path, """
        import os, socket, struct, threading
        from fastmfd.errors import ConnectError
        from fastmfd.protocol.sockets import connect, parse_address
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 53))
        server = socket.create_server(("127.0.0.1", 0))
        name = f"tcp:slow.example:{server.getsockname()[1]}"
        try:
            connect(parse_address(name), 0.5)
        except ConnectError as exc:
            print("parent gave up", exc.errno == socket.EAI_AGAIN)

        def answer():                   # 127.0.0.1 for A, no data for AAAA
            while True:
                query, peer = silent.recvfrom(512)
                end = query.index(b"\\0", 12) + 5
                qtype = struct.unpack(">H", query[end - 4:end - 2])[0]
                record = (b"\\xc0\\x0c" + struct.pack(">HHIH", 1, 1, 60, 4)
                          + socket.inet_aton("127.0.0.1")) if qtype == 1 else b""
                header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, len(record) > 0, 0, 0)
                silent.sendto(header + query[12:end] + record, peer)

        pid = os.fork()
        if pid == 0:
            threading.Thread(target=answer, daemon=True).start()
            try:
                connect(parse_address(name), 3.0).close()
                print("child connected", flush=True)
            except ConnectError as exc:
                print("child:", exc, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    """)
    assert done.stdout.splitlines() == ["parent gave up True", "child connected"], (
        done.stdout, done.stderr[-2000:])


@inside
def test_inside_listen_qemu_on_a_name_of_both_families_is_reached_at_each(tmp_path,
                                                                         qemu72_captures):
    """listen --qemu's listener (QemuReceiver) on 'dual' (::1, 127.0.0.1): bound at its
    first address only, a QEMU migrating to the other was refused."""
    saved = receive_replay(tmp_path / "first", capture_bytes(qemu72_captures, "zstd"))
    for host in ("127.0.0.1", "[::1]"):
        listening, box = threading.Event(), {}
        receiving = Background("receive()", lambda into=tmp_path / host: qemu.receive(
            "tcp:dual:0", str(into), timeout=10, stall_timeout=10,
            on_listening=lambda address: (box.update(address=address), listening.set())),
            then=listening.set)
        assert listening.wait(30) and "address" in box, receiving.outcome
        qemu.send(f"tcp:{host}:{box['address'].rpartition(':')[2]}", str(tmp_path / "first"),
                  channels=2, stall_timeout=10)
        assert receiving.result().manifest["blocks"] == saved.manifest["blocks"]
        assert re.fullmatch(r"tcp:dual:\d+", box["address"]), box


@inside
def test_inside_listen_qemu_command_on_a_name_takes_a_qemu_at_each_address(tmp_path):
    """``fastmfd listen --qemu tcp:dual:0`` says the name; a real QEMU migrating to
    either address (one was refused: bound at the first only) is received whole."""
    ram = pattern(16, seed=5)
    ram.tofile(tmp_path / "ram.img")
    for n, host in enumerate(("127.0.0.1", "[::1]")):
        qmp = tempfile.mkdtemp(prefix="fmfd-names-")   # (a socket's path: 107 bytes at most)
        guest = Guest(Path(qmp), str(tmp_path / "ram.img"), 16, name=f"src{n}", binary=QEMU)
        try:
            guest.set_multifd(2, "none")
            with listening_command(tmp_path / f"out{n}", "--stall-timeout", "10",
                                   at="tcp:dual:0") as (listen, address):
                guest.migrate(f"tcp:{host}:{address.rpartition(':')[2]}")
                assert guest.wait() == "completed"
                _, said = listen.communicate(timeout=60)
            assert listen.returncode == 0, said
            assert re.fullmatch(r"tcp:dual:\d+", address), address
        finally:
            guest.close()
            shutil.rmtree(qmp)
        saved = np.fromfile(tmp_path / f"out{n}" / "mem.img", dtype=np.uint8)
        assert np.array_equal(saved, ram)
