"""Sockets: addresses, listening, connecting, tuning, and exact reads and writes.

An address is ``tcp:HOST:PORT`` (``PORT`` 0 picks a free port; also written
``tcp://HOST:PORT``; ``tcp::PORT``, as QEMU writes it, is ``0.0.0.0``: every
IPv4 interface, where QEMU's listens on IPv6 too) or ``unix:PATH``. Nothing
here knows fastmfd's messages: the handshake (:mod:`.handshake`) and the main
channel (:mod:`.main_channel`) are built on these. Every error names the
connection it happened on (``where``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (ConfigError, ConnectError, ConnectionClosed, ListenError,
                      MigrationError)
from ..threads import start_thread
from .listeners import LISTENERS, Listener, ListeningSockets, host_port, listen_at_each

if TYPE_CHECKING:
    from typing_extensions import Buffer     # collections.abc.Buffer from Python 3.12

__all__ = ["Address", "host_port", "describe_peer", "Listening", "parse_address", "listen",
           "remove_socket_file", "bound_address", "connect", "peer_address",
           "recv_exact", "ConnectionClosed", "send_all", "tune_data_socket", "tune_main_socket",
           "peer_on_this_host", "decrypted_unread", "Listener", "ListeningSockets",
           "LISTENERS", "listening_on"]

# Unix sockets have no buffer autotuning: large buffers let a send worker's
# writev of a whole packet complete without waiting on its peer (the kernel
# caps them at net.core.*mem_max). TCP sockets are left to autotuning.
DATA_SOCKET_BUFFER = 4 << 20

# At most this many bytes wait unsent in a TCP channel to a peer on this host
# (TCP_NOTSENT_LOWAT; a sender blocks beyond it). Over loopback, whoever sends
# an ACK runs its delivery, and so the transmit of whatever the sender has
# queued and that data's whole receive path: with the autotuned MiBs queued,
# the destination, the side that is behind, did that work for the source on
# every window it opened (perf, into QEMU 10: its TCP work beside the copy
# took 0.28 CPU-s per GiB, 0.15 from QEMU's own source). With 64 KiB the
# source, which has CPU to spare, sends on its own core: 1 GiB random, 2
# channels, medians of 6 alternating runs, fastmfd -> fastmfd 593 -> 490 ms
# (destination 0.76 -> 0.52 CPU-s), `send --qemu` -> QEMU 10 703 -> 633 (QEMU
# 1.01 -> 0.76 CPU-s). A peer elsewhere acks from its own host, so its link
# keeps TCP's defaults.
LOCAL_UNSENT_LIMIT = 64 << 10


def describe_peer(peer: tuple[Any, ...] | str) -> str:
    """An accepted connection's address: (host, port, ...) or a Unix socket's path."""
    if isinstance(peer, tuple):
        return host_port(peer[0], peer[1])
    return peer or "a local process"


@dataclass(frozen=True)
class Address:
    family: int                            # AF_UNSPEC: a name, looked up when used
    target: tuple[str, int] | str          # (host, port) or a filesystem path

    @property
    def path(self) -> str | None:
        """The filesystem path of a ``unix:`` address; None for TCP."""
        return self.target if isinstance(self.target, str) else None

    def __str__(self) -> str:
        if isinstance(self.target, str):
            return f"unix:{self.target}"
        return f"tcp:{host_port(*self.target)}"


UNIX_PATH_MAX = 107                  # sun_path less its terminating NUL
MAX_PORT = 65535


def parse_address(text: str | Address) -> Address:
    """Parse ``tcp:HOST:PORT``, ``tcp://HOST:PORT``, ``tcp::PORT`` (every IPv4
    interface, ``0.0.0.0``: QEMU's ``-incoming tcp::PORT`` takes IPv6 too, which
    ``tcp:[::]:PORT`` does here; connecting there reaches this host) or
    ``unix:PATH``. An IPv6 host is in brackets: ``tcp:[::1]:PORT``. A name is
    looked up, for IPv4 and IPv6, when it is used: :func:`connect` tries each of its
    addresses, :func:`listen` binds each (:mod:`.listeners`)."""
    if isinstance(text, Address):
        return text
    kind, _, rest = str(text).partition(":")
    if kind == "unix" and rest:
        if len(os.fsencode(rest)) > UNIX_PATH_MAX:
            raise _bad_address(text, f"a Unix socket's path holds at most {UNIX_PATH_MAX} "
                                     f"bytes, not {len(os.fsencode(rest))}")
        return Address(socket.AF_UNIX, rest)
    if kind == "tcp":
        text_host, sep, port = rest.removeprefix("//").rpartition(":")
        host = _tcp_host(text_host)
        if sep and host is not None:
            digits = port.isascii() and port.isdigit()     # not "²", which int() refuses
            if digits and int(port) <= MAX_PORT:
                return Address(_family(host), (host, int(port)))
            # The address has its shape: say what is wrong with it, not what shape it needs.
            raise _bad_address(text, f"port {port!r} is " + (
                f"not in 0..{MAX_PORT}" if digits else f"not a number (0..{MAX_PORT})"))
    raise _bad_address(text, "expected tcp:HOST:PORT (or tcp://HOST:PORT, tcp::PORT; an IPv6 "
                             "HOST in brackets, tcp:[::1]:PORT) or unix:PATH")


def _bad_address(text: str | Address, problem: str) -> ConfigError:
    return ConfigError(f"bad address {text!r}: {problem}", parameter="address", problem=problem)


def _family(host: str) -> int:
    """An address literal's family; AF_UNSPEC for a name, looked up for IPv4 and IPv6
    when it is used (an IPv6-only host has names too)."""
    if ":" in host:
        return socket.AF_INET6
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return socket.AF_UNSPEC
    return socket.AF_INET


def _targets(address: Address, seconds: float) -> list[tuple[int, Any]]:
    """(family, sockaddr) of each address ``address`` stands for: itself, or a name's
    addresses in getaddrinfo's order (a gaierror, an OSError, if it has none, or no
    answer came within ``seconds``)."""
    if address.family != socket.AF_UNSPEC:
        return [(address.family, address.target)]
    assert not isinstance(address.target, str), "a unix: address has a family"
    host, port = address.target
    try:
        found = _look_up(host, port, seconds)
    except UnicodeError:        # a name IDNA cannot encode ("a..b": an empty label)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    return list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in found))


class _Lookup:
    """One getaddrinfo in a thread of its own: its outcome once ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: list[Any] | BaseException | None = None


# The lookups in flight, by (name, port): a connect that gives up at its deadline
# leaves its lookup to end by itself (the resolver's own time: timeout x attempts),
# and one that retries every second had a thread per attempt running (a review),
# each a pid against pids.max: a later connect waits on the lookup in flight.
_IN_FLIGHT: dict[tuple[str, int], _Lookup] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def _look_up(host: str, port: int, seconds: float) -> list[Any]:
    """getaddrinfo(``host``), within ``seconds``: it has no deadline of its own, and
    waited the resolver's (resolv.conf's timeout and attempts, each server in turn:
    a DNS server that never answers held a connect with a timeout of 2 s for 16 s).
    Looked up in a thread of its own, left to end by itself when no answer comes,
    and taken by the lookups of the same name and port meanwhile (_IN_FLIGHT)."""
    with _IN_FLIGHT_LOCK:
        lookup = _IN_FLIGHT.get((host, port))
        if lookup is None:
            lookup = _Lookup()
            start_thread(threading.Thread(target=_run_lookup, args=(host, port, lookup),
                                          daemon=True, name="fastmfd name lookup"))
            _IN_FLIGHT[host, port] = lookup
    if not lookup.done.wait(seconds):
        raise socket.gaierror(socket.EAI_AGAIN, f"no answer looking up {host} within "
                                                f"{seconds:g} s (its name service: "
                                                f"/etc/resolv.conf, /etc/nsswitch.conf)")
    if isinstance(lookup.outcome, BaseException):
        raise lookup.outcome.with_traceback(None)   # (each caller's, not the last one's)
    assert lookup.outcome is not None, "done"
    return lookup.outcome


def _forget_the_parents_lookups() -> None:
    """In a forked child: the lookups in flight are the parent's threads', which the
    child has not, and would never end there: each later connect to such a name
    waited on one and failed (a review). Its lock may have been copied held too."""
    global _IN_FLIGHT_LOCK
    _IN_FLIGHT.clear()
    _IN_FLIGHT_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_the_parents_lookups)


def _run_lookup(host: str, port: int, lookup: _Lookup) -> None:
    try:
        lookup.outcome = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except BaseException as exc:        # (a UnicodeError too) raised in each caller
        lookup.outcome = exc
    finally:
        with _IN_FLIGHT_LOCK:
            del _IN_FLIGHT[host, port]
        lookup.done.set()


def _numeric(sockaddr: Any) -> str:
    """A TCP socket address's host as text (an IPv6 scope kept: fe80::1%eth0)."""
    return socket.getnameinfo(sockaddr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]


def peer_address(sock: socket.socket, address: Address) -> Address:
    """The address ``sock``, connected to ``address``, reached: ``address`` unless it
    is a name. A migration's other channels connect there, not to the name again: a
    DNS answer that rotates would split the migration across hosts. (A connection
    already reset has no peer: the name then, its next read says what happened.)"""
    if address.family != socket.AF_UNSPEC:
        return address
    try:
        peer = sock.getpeername()
    except OSError:
        return address
    return Address(sock.family, (_numeric(peer), peer[1]))


def _tcp_host(text: str) -> str | None:
    """The host of ``tcp:HOST:PORT`` (empty: every IPv4 interface), or None when
    it is malformed: a bracket left open ("[::1"), or an IPv6 address that is
    not one.
    Nothing else is checked here: a name is looked up when it is used."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if not text:
            return None
    if "[" in text or "]" in text:
        return None
    if ":" in text:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return None
    return text or "0.0.0.0"


# The socket files listen() made: path -> (st_dev, st_ino), for remove_socket_file.
_socket_files: dict[str, tuple[int, int]] = {}


# How long a listener waits for its name's addresses: getaddrinfo has no deadline of
# its own (see _look_up), and a listener has no connect timeout to take one from.
LISTEN_LOOKUP_SECONDS = 10.0


def listen(address: Address, backlog: int = 128) -> Listener:
    """A listening socket (:func:`bound_address` says where, with the real port).
    A ``unix:`` listener's file is removed with :func:`remove_socket_file`. A name,
    looked up within LISTEN_LOOKUP_SECONDS, is bound at each of its addresses, on
    one port (:mod:`.listeners`; :func:`bound_address` says where)."""
    try:
        targets = _targets(address, LISTEN_LOOKUP_SECONDS)
        if address.family == socket.AF_UNSPEC:
            return listen_at_each(targets, str(address), backlog)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}",
                          exc.errno) from None
    family, target = targets[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            _remove_stale_socket(address)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        if address.path is not None:
            st = _only_for_this_user(address)
            _socket_files[address.path] = (st.st_dev, st.st_ino)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {exc.strerror}", exc.errno) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _only_for_this_user(address: Address) -> os.stat_result:
    """Make the socket file bind() just made 0600, before listen(): who may connect
    is who may write it, and bind() made it as the umask says (0777 under umask 000:
    any user of the host could connect first and be the source). It is changed
    through a descriptor (O_PATH), never through a link put there meanwhile."""
    assert address.path is not None, "only a unix: address has a socket file"
    fd = os.open(address.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{address}: the socket was replaced as it was made")
        os.chmod(f"/proc/self/fd/{fd}", 0o600)      # chmod() of an O_PATH descriptor
    finally:
        os.close(fd)
    return st


def _remove_stale_socket(address: Address) -> None:
    """Unlink the socket a killed listener left at ``address``'s path, and only that:
    a path that is not a socket (a file, a symlink, a directory) or a socket
    something still listens on is refused, untouched."""
    path = address.path
    assert path is not None, "listen() removes stale sockets of unix: addresses only"
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(before.st_mode):
        raise ConfigError(f"{address}: the path already exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass                        # nobody listens: stale
    except FileNotFoundError:
        return
    except OSError as exc:          # a full backlog, a permission: somebody's
        raise ConfigError(f"{address}: the socket exists and cannot be probed "
                          f"({exc.strerror or exc})") from None
    else:
        raise ConfigError(f"{address}: another process listens on this socket")
    finally:
        probe.close()
    now = os.lstat(path)
    if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
        os.unlink(path)


def remove_socket_file(path: str) -> None:
    """Unlink the socket file listen() made at ``path`` when its listener closes,
    if it is still that one: whatever was put there since (a file of the user's, a
    later listener's socket) is left alone."""
    made = _socket_files.pop(path, None)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == made:
        os.unlink(path)


@dataclass
class Listening:
    """A listener its owner made (one it was given stays open): closed, its
    socket file removed, when the owner is (a Destination, a QemuReceiver)."""
    sock: Listener
    path: str | None

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            remove_socket_file(self.path)


def listening_address(sock: Listener) -> Address:
    """The address a listening socket accepts on. A socket given that no source could
    connect to (closed, not a TCP or Unix stream socket, not listening) is a
    ConfigError now: accept() would only wait on it until the timeout."""
    if isinstance(sock, ListeningSockets):
        for each in sock.sockets:       # a name's listener: each of its sockets, alike
            listening_address(each)
        return _where_each_listens(sock)
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or \
            sock.type != socket.SOCK_STREAM:
        raise ConfigError(f"the socket given is {sock.family.name} {sock.type.name}: a "
                          f"migration is accepted on a TCP or Unix stream socket")
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise ConfigError(f"the socket given cannot be used: {exc.strerror or exc}") from None
    if not listening:
        raise ConfigError("the socket given is not listening: bind() and listen() it first")
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return Address(socket.AF_UNIX, os.fsdecode(name))   # bytes: an abstract name
    return Address(sock.family, name[:2])


def bound_address(sock: Listener, requested: Address) -> Address:
    if requested.family == socket.AF_UNIX:
        return requested
    if isinstance(sock, ListeningSockets):
        return _where_each_listens(sock)
    bound = sock.getsockname()
    return Address(sock.family, (_numeric(bound), bound[1]))


def _where_each_listens(listening: ListeningSockets) -> Address:
    """A name's listener: the name, if bound at each of its addresses (a source
    reaches it at any); otherwise the first it has, which a source should use: the
    name would send a source to an address left out first (see :func:`listening_on`)."""
    if len(listening.sockets) > 1 and not listening.skipped:
        name = parse_address(listening.name).target
        assert isinstance(name, tuple), "a name's listener is TCP"
        return Address(socket.AF_UNSPEC, (name[0], listening.port))
    return bound_address(listening.sockets[0], parse_address(listening.name))


def listening_on(listener: Listener, address: Address) -> str:
    """Where ``listener`` accepts, for people ("listening on ..."): ``address`` (as
    :func:`bound_address` says it), but for a name's listener that left out an address
    this host lacks, each address it bound ("tcp:127.0.0.1:5000 and tcp:10.77.0.2:5000"):
    the name stands for the address left out too, and the first address alone is not
    all it listens at. (The log says each left out, and why: :mod:`.listeners`.)"""
    if not isinstance(listener, ListeningSockets) or not listener.skipped:
        return str(address)
    return " and ".join(str(bound_address(sock, address)) for sock in listener.sockets)


CONNECT_RETRY_SECONDS = 3.0     # how long a refused connection is retried


def connect(address: Address, timeout: float,
            connecting: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """Connect within ``timeout``; a refused connection (the listener is not
    there yet) is retried for a few seconds, not for the whole timeout.
    ``connecting(sock)`` is told each socket before it connects: one shut down
    from another thread ends the wait (a cancel), and it may raise.
    A name is looked up within ``timeout`` too (the rest is for connecting); its
    addresses are tried in turn, as QEMU's tcp: and
    socket.create_connection do, each within its share of what is left of
    ``timeout`` (a first address that drops every SYN, a broken IPv6 route, took
    it all, and the next was never tried): use :func:`peer_address` for a
    migration's other channels."""
    started = time.monotonic()
    deadline = started + timeout
    retry_until = started + min(timeout, CONNECT_RETRY_SECONDS)
    delay = 0.01
    try:
        targets = _targets(address, timeout)
    except OSError as exc:
        raise ConnectError(f"cannot connect to {address}: {exc.strerror or exc}",
                           exc.errno) from None
    while True:
        failed: list[tuple[Any, OSError]] = []
        for tried, (family, target) in enumerate(targets):
            now = time.monotonic()
            share = now + (deadline - now) / (len(targets) - tried)
            try:
                return _connect_one(family, target, share, connecting)
            except OSError as exc:
                failed.append((target, exc))
            if time.monotonic() >= deadline:
                break
        transient = any(exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
                        for _, exc in failed)
        if not transient or time.monotonic() + delay >= retry_until:
            raise _connect_error(address, failed)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _connect_one(family: int, target: Any, deadline: float,
                 connecting: Callable[[socket.socket], None] | None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        if connecting is not None:
            connecting(sock)
        sock.connect(target)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_error(address: Address, failed: list[tuple[Any, OSError]]) -> ConnectError:
    """What each address tried said; a name's addresses named (the first one's errno)."""
    first = failed[0][1]
    if address.family != socket.AF_UNSPEC:
        return ConnectError(f"cannot connect to {address}: {first.strerror or first}",
                            first.errno)
    said = "; ".join(f"{_numeric(target)}: {exc.strerror or exc}" for target, exc in failed)
    return ConnectError(f"cannot connect to {address}: {said}", first.errno)


def tune_main_socket(sock: socket.socket) -> None:
    """The main channel carries small request/answer messages (ROUND_END,
    COMPLETE, LOADED): without TCP_NODELAY, Nagle's algorithm meets the peer's
    delayed ACK and each answer waits ~40 ms."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune_data_socket(sock: socket.socket) -> None:
    """Options for a connected multifd channel: no Nagle delay on SYNCs; a
    short unsent queue to a peer on this host; Unix socket buffers.

    TCP buffers stay autotuned (as QEMU leaves them): setting SO_SNDBUF/RCVBUF
    turns autotuning off, and fixed 4 MiB buffers made 8 loopback channels
    18-24% slower (1 GiB, 10 interleaved runs: best 564 vs 465 ms) by keeping
    more data in flight than the caches hold, with no gain at 2 channels.
    """
    if sock.family == socket.AF_UNIX:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, DATA_SOCKET_BUFFER)
            except OSError:
                pass
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        local = peer_on_this_host(sock)
    except OSError:         # already reset by its peer: its first read or write says so
        return
    if local:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, LOCAL_UNSENT_LIMIT)


def decrypted_unread(sock: socket.socket) -> int:
    """Bytes of the peer's that a TLS socket holds decrypted, not yet read (0 for a
    plain socket): they are in no kernel buffer, so polling the socket misses them."""
    return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0


def peer_on_this_host(sock: socket.socket) -> bool:
    """Whether the connected peer runs on this host: a Unix socket, a loopback
    address, or the socket's own address (another namespace's address is a peer
    elsewhere). Both ends of such a connection share the CPUs, so the link is
    not a wire that compression could relieve (``compression="auto"``)."""
    if sock.family == socket.AF_UNIX:
        return True
    try:
        local, peer = sock.getsockname()[0], sock.getpeername()[0]
    except OSError:         # the connection ended already: its next write says how
        return False
    address = ipaddress.ip_address(peer.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped           # ::ffff:127.0.0.1
    return address.is_loopback or peer == local


def recv_exact(sock: socket.socket, size: int, what: str, where: str | None = None,
               deadline: float | None = None, seconds: float | None = None) -> bytes:
    """Read exactly ``size`` bytes; a short read is a ConnectionClosed naming ``what``.
    ``where`` names the connection in every error (e.g. "main channel").
    ``deadline`` (monotonic) bounds the whole read: a socket's own timeout bounds
    each recv, so a peer trickling a byte at a time would never trip it; ``seconds``,
    the wait it ends, is said when it passes. The
    socket's timeout is restored after (other threads' sends go by it), and left
    alone once another thread set its own meanwhile (a teardown's bounded ERROR)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    previous = armed = sock.gettimeout()
    try:
        while got < size:
            if deadline is not None and sock.gettimeout() == armed:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                armed = sock.gettimeout()       # as the socket keeps it (nanoseconds)
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionClosed(f"connection closed after {got} of {size} bytes of "
                                       f"{what}", field="length", received=got, expected=size,
                                       where=where)
            got += n
    except socket.timeout:
        within = f" within {seconds:g} s" if seconds is not None else ""
        raise MigrationError(f"timed out waiting for {what}{within}", channel=where) from None
    except OSError as exc:
        raise MigrationError(f"connection lost reading {what}: {exc.strerror or exc}",
                             channel=where) from None
    finally:
        with contextlib.suppress(OSError):          # closed meanwhile by another thread
            if deadline is not None and sock.gettimeout() == armed:
                sock.settimeout(previous)
    return bytes(buf)


def send_all(sock: socket.socket, data: Buffer, what: str, where: str | None = None) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise MigrationError(f"connection lost sending {what}: {exc.strerror or exc}",
                             channel=where) from None
