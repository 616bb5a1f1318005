"""The channel handshake: how every connection of a session opens (DESIGN §4.1, §4.2, §4.7).

::

    main channel:     [TLS] [channel header, type 0] FMFD magic, version,
                      [AUTH(uuid), shared-key proof as AUTH messages], SETUP, ...
    multifd channel:  [TLS] [channel header, type 2 or 3] 64-byte init packet,
                      [shared-key proof], packets...

The channel header is present unless the session runs the "old way"
(``channel_header=False``); then the destination tells the kinds apart by
their first four bytes (the FMFD magic or the multifd magic). TLS wraps the
whole connection; the shared-key proof (:mod:`.security`) is bound to the
session UUID and the channel.

Every step has one deadline for the whole greeting (a peer trickling bytes
cannot stretch it). A connection that fails its greeting — a stranger, a
wrong key, a certificate that does not verify, another session's UUID — is
*refused*: the caller drops it and goes on waiting for the real source.
What a connection that passed its greeting then breaks fails the session.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Collection, Container
from dataclasses import dataclass

from .. import _core
from ..errors import MigrationError, ProtocolError, SecurityError, TLSError, peer_words
from .main_channel import (MAIN, MAIN_MAGIC, MAIN_VERSION, MESSAGE_HEADER,
                           MESSAGE_HEADER_SIZE, MainChannel, Msg, Sender, SetupAck,
                           decode_message_header, decode_payload, encode_message,
                           encode_preamble, expect_message)
from .security import (MAIN_CHANNEL_ID, ChannelSecurity, Stream, TLSConfig, check_authz,
                       check_key_proof, identities_of, is_tls_record, prove_key,
                       tls_connect, tls_handshake)
from .qemu import QEVM_MAGIC
from .refusing import tell_why
from .setup import Setup
from .sockets import Address, ConnectionClosed, recv_exact, send_all


__all__ = ["ChannelHello", "SocketStream", "TLSStream", "read_hello", "main_channel_start",
           "channel_start", "open_main_channel", "open_channel", "MainGreeting",
           "greet_main_channel", "greet_channel", "tls_accept", "check_channel", "error_left",
           "version_refused"]


# ---------------------------------------------------------------- streams

class SocketStream:
    """A plain socket as the greeting reads and writes it, under one deadline."""

    def __init__(self, sock: socket.socket, where: str | None,
                 deadline: float | None = None) -> None:
        self.sock, self.where, self.deadline = sock, where, deadline

    def _arm(self) -> None:
        if self.deadline is not None:
            self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))

    def send_all(self, data: bytes, what: str = "handshake") -> None:
        self._arm()
        send_all(self.sock, data, what, self.where)

    def recv_exact(self, size: int, what: str = "handshake") -> bytes:
        return recv_exact(self.sock, size, what, self.where, self.deadline)


class TLSStream:
    """A channel's TLS connection (the core's, as its worker holds it)."""

    def __init__(self, tls: "_core.TLSChannel", where: str | None, deadline: float) -> None:
        self.tls, self.where, self.deadline = tls, where, deadline

    def send_all(self, data: bytes, what: str = "handshake") -> None:
        try:
            self.tls.send_all(data)
        except TLSError as exc:
            raise SecurityError(f"sending {what}: {exc}", channel=self.where) from None
        except OSError as exc:
            raise MigrationError(f"connection lost sending {what}: {exc.strerror or exc}",
                                 channel=self.where) from None

    def recv_exact(self, size: int, what: str = "handshake") -> bytes:
        left = self.deadline - time.monotonic()
        try:
            return self.tls.recv_exact(size, max(0.001, left))
        except EOFError:
            raise ProtocolError(f"connection closed during {what}", field="length",
                                received="end of stream", expected=size,
                                where=self.where) from None
        except TimeoutError:
            raise MigrationError(f"timed out waiting for {what}", channel=self.where) from None
        except TLSError as exc:
            raise SecurityError(f"reading {what}: {exc}", channel=self.where) from None
        except OSError as exc:
            raise MigrationError(f"connection lost reading {what}: {exc.strerror or exc}",
                                 channel=self.where) from None


class _AuthMessages:
    """The shared-key proof on the main channel, carried as AUTH messages (so a
    peer without a key meets an ERROR it can read, not stray bytes), read from
    the peer, the ``sender``. ``where`` names the connection in errors,
    ``seconds`` the greeting's deadline."""

    def __init__(self, sock: socket.socket, deadline: float, sender: Sender, where: str = MAIN,
                 seconds: float | None = None) -> None:
        self.sock, self.deadline, self.sender = sock, deadline, sender
        self.where, self.seconds = where, seconds

    def send_all(self, data: bytes, what: str = "AUTH") -> None:
        send_all(self.sock, encode_message(Msg.AUTH, data), what, self.where)

    def recv_exact(self, size: int, what: str = "AUTH") -> bytes:
        kind, body = _read_bounded(self.sock, what, self.where, self.deadline, self.seconds,
                                   (Msg.AUTH, Msg.ERROR), self.sender, size)
        if kind is Msg.ERROR:
            raise SecurityError(f"the peer refused: "
                                f"{peer_words(decode_payload(kind, body).error)}",
                                channel=self.where, side="peer")
        return body


def _read_bounded(sock: socket.socket, what: str, where: str, deadline: float,
                  seconds: float | None, expected: Collection[Msg], sender: Sender,
                  auth_size: int | None = None) -> tuple[Msg, bytes]:
    """A message from a peer that has proved nothing, one of ``expected`` (an
    AUTH of ``auth_size`` bytes): its header is judged, its type first, before
    its payload, which is allocated whole as it is read, is read. A stranger
    announcing 16 MiB messages held that much of a destination's memory per
    connection."""
    kind, length = decode_message_header(
        recv_exact(sock, MESSAGE_HEADER_SIZE, what, where, deadline, seconds), 0,
        sender=sender, expected=expected)
    if kind is Msg.AUTH:
        _check_auth_size(length, auth_size, where)
    body = recv_exact(sock, length, f"{kind.name} payload", where, deadline,
                      seconds) if length else b""
    return kind, body


def _check_auth_size(length: int, size: int | None, where: str) -> None:
    """An AUTH of the proof must be of the ``size`` its step carries."""
    if length != size:
        raise SecurityError(f"expected an AUTH message of {size} bytes, received AUTH of "
                            f"{length}", channel=where)


# ---------------------------------------------------------------- what a source sends

def _channel_header(kind: int) -> bytes:
    header = bytearray(_core.CHANNEL_HEADER_SIZE)
    _core.encode_channel_header(header, kind)
    return bytes(header)


def main_channel_start(channel_header: bool) -> bytes:
    """What a source sends first on its main channel."""
    return (_channel_header(_core.CHANNEL_MAIN) if channel_header else b"") + encode_preamble()


def channel_start(setup: Setup, channel_id: int) -> bytes:
    """What a source sends first on channel ``channel_id``: its header and init packet."""
    kind = _core.CHANNEL_MULTIFD if channel_id < setup.channels else _core.CHANNEL_DEVICE_STATE
    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, setup.uuid, channel_id)
    return (_channel_header(kind) if setup.channel_header else b"") + bytes(init)


# The longest a destination may take to fault in a GiB of regions before its
# SETUP_ACK (prealloc): memory the host must find again costs ~4 s/GiB here.
PREALLOC_SECONDS_PER_GIB = 30.0


# What a source asks when its SETUP met silence or an end with no word: a QEMU's
# -incoming, say, waits for its multifd channels first, or closes on the preamble.
NO_LISTENER_HINT = ("(is a fastmfd listener there? a QEMU destination takes "
                    "`fastmfd send --qemu`)")


# The highest main channel version a refusal takes for one (5 now, one a release at most).
MAX_PLAUSIBLE_VERSION = 255

# A destination's refusal of its source's main channel version, as one of version 4
# said it: what follows it names both versions and the side to upgrade.
_REFUSED_VERSION = re.compile(r"main channel field 'version': received (\d+), expected (\d+)\Z")


def version_refused(received: int, expected: int = MAIN_VERSION) -> str:
    """What a destination (the side that checks) says of a source's main channel version
    ``received``: both versions, and which fastmfd to upgrade. One of version 4 said
    "received 5, expected 4" alone, and its source took no more from it. A number no
    fastmfd could speak (0; the bytes of another protocol) asks what the peer is: it
    was told to upgrade the destination."""
    said = f"main channel field 'version': received {received}, expected {expected}"
    if not 0 < received <= MAX_PLAUSIBLE_VERSION:
        return f"{said} (no main channel version: is the peer a fastmfd source?)"
    older = "source" if received < expected else "destination"
    return (f"{said} (the source speaks main channel version {received}, the destination "
            f"{expected}: upgrade fastmfd at the {older})")


def _told_what_to_do(exc: BaseException) -> MigrationError | None:
    """``exc``, a destination's refusal of this source's version in a version 4's words
    alone, said with both versions and the side to upgrade; None for any other."""
    said = _REFUSED_VERSION.search(exc.cause) if isinstance(exc, MigrationError) else None
    if said is None:
        return None
    assert isinstance(exc, MigrationError), "searched"
    words = exc.cause[:said.start()] + version_refused(*map(int, said.groups()))
    return MigrationError(words, channel=exc.channel, side=exc.side)


def open_main_channel(sock: socket.socket, security: ChannelSecurity, setup: Setup,
                      channel_header: bool, address: str,
                      opened: Callable[[MainChannel], None] | None = None
                      ) -> tuple[socket.socket, SetupAck]:
    """The source's side of the main channel's opening: the greeting, SETUP, and
    the destination's SETUP_ACK. Returns the socket to use from then on
    (TLS-wrapped or not) and the SETUP_ACK (the destination's stall_timeout); on
    failure the socket is closed. Its errors say where: "main channel to
    ``address``", as a failed connect does.

    ``opened(main)``: the session takes the channel as its SETUP goes, so that its
    failure (a cancel, a Ctrl-C) while the destination checks SETUP tells the
    destination why, after the SETUP (before it, the destination would refuse a
    stranger); a Ctrl-C then leaves the socket to the session, to say why on it."""
    where = f"{MAIN} to {address}"
    deadline = time.monotonic() + security.timeout
    handed = False
    try:
        if security.tls is not None:
            sock = tls_connect(sock, security, deadline, security.timeout, where)
        stream = SocketStream(sock, where, deadline)
        stream.send_all(main_channel_start(channel_header), "preamble")
        if security.auth_key is not None:
            stream.send_all(encode_message(Msg.AUTH, setup.uuid), "AUTH")
            prove_key(_AuthMessages(sock, deadline, "destination", where, security.timeout),
                      security.auth_key, setup.uuid, MAIN_CHANNEL_ID, where)
        main = MainChannel(sock)
        with main.writing():
            if opened is not None:
                opened(main)
                handed = True
            stream.send_all(encode_message(Msg.SETUP, setup), "SETUP")
        # A destination that preallocates its memory (prealloc) answers only once
        # it is done, sending KEEPALIVE meanwhile: each one restarts the wait,
        # within what faulting in the announced regions can take.
        announced = sum(region.size for region in setup.regions)
        until = (time.monotonic() + security.timeout + setup.stall_timeout
                 + PREALLOC_SECONDS_PER_GIB * announced / (1 << 30))
        try:
            ack: SetupAck = expect_message(
                sock, Msg.SETUP_ACK, deadline=deadline, seconds=security.timeout, where=where,
                keepalive_wait=setup.stall_timeout, keepalive_until=until, sender="destination")
        except MigrationError as exc:
            # A listener answers SETUP at once (or with KEEPALIVEs): silence is
            # most likely no fastmfd listener, e.g. a QEMU's -incoming, which
            # waits for its multifd channels before it reads a byte.
            if not isinstance(exc.__context__, TimeoutError):
                raise
            raise MigrationError(f"{exc.cause} {NO_LISTENER_HINT}", channel=where) from exc
    except (MigrationError, ProtocolError) as exc:
        # A connection that ended or broke, not a verdict of this side's own or
        # the peer's (nor a timeout, nor a message judged wrong): the destination
        # may have refused it.
        lost = _connection_lost(exc)
        refusal = (error_left(sock, where, "the destination refused")
                   if lost and security.tls is None else None)
        sock.close()
        if refusal is not None:
            raise _told_what_to_do(refusal) or refusal from exc
        if (told := _told_what_to_do(exc)) is not None:
            raise told from exc
        if isinstance(exc, ProtocolError) and exc.field == "type" \
                and isinstance(exc.received, int):
            # Bytes that are no message type at all: another service answered.
            answer = exc.received.to_bytes(4, "big")
            raise MigrationError(f"the peer is no fastmfd listener: it answered {answer!r}..., "
                                 f"which is no fastmfd message (a QEMU destination takes "
                                 f"`fastmfd send --qemu`)", channel=where) from exc
        if lost and security.tls is None and isinstance(exc, MigrationError):
            raise MigrationError(f"{exc.cause}, before any answer {NO_LISTENER_HINT}",
                                 channel=where) from exc
        if security.tls is None or not lost:
            raise
        # TLS 1.3 lets a client finish its handshake before the server has
        # checked the client's certificate: a refusal shows up as the end of
        # the connection at the first read or write after it.
        cause = exc.cause if isinstance(exc, MigrationError) else exc.detail    # not where
        raise SecurityError(f"the destination ended the TLS connection after the handshake "
                            f"(did it refuse this source's certificate?): {cause}",
                            channel=where) from exc
    except BaseException:
        if not handed:
            sock.close()
        raise
    return sock, ack


def _connection_lost(exc: MigrationError | ProtocolError) -> bool:
    """Whether ``exc`` says the connection ended or broke (a read or a send's
    OSError, not its timeout)."""
    context = exc.__context__
    return isinstance(exc, ConnectionClosed) or (
        type(exc) is MigrationError and exc.side is None and isinstance(context, OSError)
        and not isinstance(context, TimeoutError))


def error_left(sock: socket.socket, where: str, says: str,
               sender: Sender = "destination") -> MigrationError | None:
    """The ERROR a destination left before it closed the connection, when one is
    there to read, as "``says``: its words": a source still sending its greeting
    then meets a closed connection (refuse_on_arrival) before it reads why, and
    one connecting its channels a listener that closed, perhaps behind its
    KEEPALIVEs. None if none is. (It came before the end of the connection that
    failed the source, so it is read at once, or not there.) ``sender="source"``:
    the ERROR a source left while its destination checked SETUP."""
    deadline = time.monotonic() + 0.05
    try:
        kind = Msg.KEEPALIVE
        while kind is Msg.KEEPALIVE:
            kind, body = _read_bounded(sock, "ERROR", where, deadline, None,
                                       (Msg.ERROR, Msg.KEEPALIVE), sender)
    except (MigrationError, ProtocolError, OSError):
        return None
    return MigrationError(f"{says}: {decode_payload(kind, body).error}", channel=where,
                          side="peer")


def open_channel(sock: socket.socket, security: ChannelSecurity, hello: bytes, uuid: bytes,
                 channel: int, where: str | None) -> _core.TLSChannel | None:
    """A send worker's greeting on its channel: TLS (returns the core's
    TLSChannel, or None), the init packet ``hello``, the shared-key proof."""
    deadline = time.monotonic() + security.timeout
    tls = None
    stream: SocketStream | TLSStream = SocketStream(sock, where, deadline)
    if security.tls is not None:
        tls = _tls_connect(sock, security.tls, security.hostname, deadline, where)
        stream = TLSStream(tls, where, deadline)
    stream.send_all(hello, "init packet")
    if security.auth_key is not None:
        prove_key(stream, security.auth_key, uuid, channel)
    if isinstance(stream, SocketStream):
        sock.settimeout(None)
    return tls


def _tls_connect(sock: socket.socket, tls: TLSConfig, hostname: str | None, deadline: float,
                 where: str | None) -> _core.TLSChannel:
    tls.check_files()           # (the core loads them by path, as the main channel does)
    try:
        return _core.TLSChannel.connect(sock.fileno(), cert=tls.cert, key=tls.key, ca=tls.ca,
                                        hostname=hostname, ciphers=tls.ciphers,
                                        timeout=max(0.001, deadline - time.monotonic()))
    except TLSError as exc:
        said = str(exc)
        if said.startswith("the peer does not speak TLS"):
            said += _endpoints(sock)        # whose are they: a stranger on the port?
        raise SecurityError(said, channel=where) from None


def _endpoints(sock: socket.socket) -> str:
    """' (connected to tcp:HOST:PORT from port N)' for a TCP connection, else ''."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    try:
        host, port = sock.getpeername()[:2]
        local = sock.getsockname()[1]
    except OSError:                         # the connection ended already
        return ""
    return f" (connected to {Address(sock.family, (host, port))} from port {local})"


# ---------------------------------------------------------------- what a destination checks

@dataclass(frozen=True)
class ChannelHello:
    """What the first bytes of an accepted connection said."""
    kind: int                       # CHANNEL_MAIN / CHANNEL_MULTIFD / CHANNEL_DEVICE_STATE
    uuid: bytes | None = None       # multifd channels
    channel_id: int | None = None


def read_hello(stream: Stream, with_header: bool | None, expected_uuid: bytes | None,
               nchannels: int | None) -> ChannelHello:
    """Read and check a new connection's channel header and init packet.

    ``with_header`` None means "not known yet" (the first connection of a
    session): a channel header is recognised by its first 8 bytes.
    """
    first = stream.recv_exact(4, "channel start")
    kind = None
    if with_header is None:
        with_header = first == b"\0\0\0\0"     # BE u64 header_size 4 starts with zeros
    if with_header:
        kind = _core.decode_channel_header(first + stream.recv_exact(8, "channel header"))
        if kind == _core.CHANNEL_POSTCOPY:
            raise ProtocolError("channel header field 'channel_type': received 1 (postcopy "
                                "preempt), expected 0, 2 or 3: fastmfd has no postcopy",
                                field="channel_type", received=1, expected="0, 2 or 3")
        first = stream.recv_exact(4, "channel start")
    magic = struct.unpack(">I", first)[0]
    if magic == MAIN_MAGIC and kind in (None, _core.CHANNEL_MAIN):
        return ChannelHello(_core.CHANNEL_MAIN)
    if magic == _core.MULTIFD_MAGIC and kind != _core.CHANNEL_MAIN:
        uuid, channel_id = _core.decode_init_packet(
            first + stream.recv_exact(_core.INIT_PACKET_SIZE - 4, "init packet"),
            expected_uuid, nchannels)
        return ChannelHello(kind if kind is not None else _core.CHANNEL_MULTIFD, uuid,
                            channel_id)
    expected = "the main channel magic" if kind == _core.CHANNEL_MAIN else (
        "the multifd magic 0x11223344" if kind is not None else
        f"the main channel magic {MAIN_MAGIC:#x} or the multifd magic 0x11223344")
    # A QEMU source sent to a listener of fastmfd's own stream (``listen`` without
    # --qemu): it is refused as any stranger is, but its log line says what it was.
    qemu = (" (a QEMU migration stream: a QEMU source needs `fastmfd listen --qemu` or "
            "fastmfd.qemu.receive)" if first == QEVM_MAGIC else "")
    raise ProtocolError(f"new connection: first word {magic:#010x}, expected {expected}{qemu}",
                        field="magic", received=hex(magic), expected=expected)


def _first_byte(sock: socket.socket, deadline: float, seconds: float,
                where: str | None) -> bytes:
    """The connection's first byte, left unread (it tells TLS from plaintext);
    ``seconds``: the wait ``deadline`` ends, said when it passes."""
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except socket.timeout:
        raise MigrationError(f"the connection sent nothing within {seconds:g} s",
                             channel=where) from None
    except OSError as exc:
        raise MigrationError(f"connection lost: {exc.strerror or exc}", channel=where) from None
    if not first:
        raise MigrationError("the connection closed before it said anything", channel=where)
    return first


def _check_transport(first: bytes, tls_expected: bool, where: str | None) -> None:
    if is_tls_record(first) and not tls_expected:
        raise SecurityError("the peer speaks TLS; this destination was not given tls=",
                            channel=where)
    if tls_expected and not is_tls_record(first):
        raise SecurityError("the peer does not speak TLS (it sent plaintext); this "
                            "destination requires TLS", channel=where)


@dataclass(frozen=True)
class MainGreeting:
    """A main channel that passed its greeting: its socket, the header of its
    first message after the proof (read, not yet checked: from here on the
    session checks what its source sends), the UUID the proof was bound to and
    the greeting's deadline."""
    sock: socket.socket
    first_header: bytes
    auth_uuid: bytes | None
    deadline: float         # the greeting's: the first message must be whole by then too


def greet_main_channel(sock: socket.socket, security: ChannelSecurity,
                       ended: Callable[[], str | None] = lambda: None) -> MainGreeting:
    """The destination's side of a new connection before SETUP: it must be a
    main channel of this version, over TLS when ``security.tls`` is set (from
    an identity in ``authz``), proving the shared key when one is set.
    Anything else raises (and closes the socket); the peer is sent an ERROR
    saying why when it can read one. ``ended()``: why this side stopped
    greeting, once it has; it ends the greeting's reads then, so the end of
    the stream read next is its own, not the peer's: the peer is told that
    reason, not "connection closed"."""
    deadline = time.monotonic() + security.timeout
    try:
        first = _first_byte(sock, deadline, security.timeout, MAIN)
    except MigrationError:
        if security.tls is None and (why := ended()) is not None:
            tell_why(sock, why)
        raise
    try:
        _check_transport(first, security.tls is not None, MAIN)
    except SecurityError as exc:
        if not is_tls_record(first):
            tell_why(sock, exc)
        raise
    try:
        if security.tls is not None:
            sock = security.tls.server_context().wrap_socket(sock, server_side=True,
                                                             do_handshake_on_connect=False)
            tls_handshake(sock, deadline, security.timeout, MAIN)
        try:
            return _greet_main(sock, security, deadline)
        except (SecurityError, ProtocolError) as exc:
            tell_why(sock, ended() or exc)
            raise
    except BaseException:
        sock.close()
        raise


def _greet_main(sock: socket.socket, security: ChannelSecurity, deadline: float) -> MainGreeting:
    if security.tls is not None:
        assert isinstance(sock, ssl.SSLSocket), "greet_main_channel wraps it when tls is set"
        check_authz(identities_of(sock.getpeercert() or {}), security.tls.authz)
    stream = SocketStream(sock, MAIN, deadline)
    hello = read_hello(stream, None, None, None)
    if hello.kind != _core.CHANNEL_MAIN:
        raise ProtocolError("the first connection is a multifd channel, expected the "
                            "main channel", field="channel_type",
                            received=hello.kind, expected=_core.CHANNEL_MAIN)
    version = struct.unpack(">I", stream.recv_exact(4, "version"))[0]
    if version != MAIN_VERSION:
        raise ProtocolError(version_refused(version), field="version", received=version,
                            expected=MAIN_VERSION)
    header = stream.recv_exact(MESSAGE_HEADER_SIZE, "message")
    auth_uuid = None
    if _message_type(header) == Msg.AUTH:
        if security.auth_key is None:
            raise SecurityError("the source proves an auth_key; this destination has none",
                                channel=MAIN)
        _check_auth_size(decode_message_header(header, 0)[1], 16, MAIN)
        auth_uuid = stream.recv_exact(16, "AUTH")
        check_key_proof(_AuthMessages(sock, deadline, "source"), security.auth_key, auth_uuid,
                        MAIN_CHANNEL_ID)
        header = stream.recv_exact(MESSAGE_HEADER_SIZE, "message")
    elif security.auth_key is not None:
        raise SecurityError("this destination requires an auth_key proof; the source sent "
                            "none", channel=MAIN)
    sock.settimeout(None)
    return MainGreeting(sock, header, auth_uuid, deadline)


def _message_type(header: bytes) -> int:
    kind: int = MESSAGE_HEADER.unpack(header)[0]
    return kind


def greet_channel(sock: socket.socket, security: ChannelSecurity, setup: Setup,
                  where: str | None) -> tuple[ChannelHello, _core.TLSChannel | None]:
    """A receive worker's side of a new connection after SETUP: TLS (and authz)
    when set, a multifd channel of *this* session (its UUID), the shared-key
    proof when set. Returns ``(hello, tls)`` — ``tls`` the core's TLSChannel
    or None. Anything else raises: the connection is refused."""
    deadline = time.monotonic() + security.timeout
    _check_transport(_first_byte(sock, deadline, security.timeout, where),
                     security.tls is not None, where)
    tls = None
    stream: SocketStream | TLSStream = SocketStream(sock, where, deadline)
    if security.tls is not None:
        tls = tls_accept(sock, security.tls, deadline, where)
        check_authz(tls.peer_identities(), security.tls.authz)
        stream = TLSStream(tls, where, deadline)
    hello = read_hello(stream, setup.channel_header, setup.uuid, None)
    if hello.kind == _core.CHANNEL_MAIN:
        raise ProtocolError("a second main channel connected", field="channel_type",
                            received=0, expected="2 (multifd) or 3 (device state)")
    if security.auth_key is not None:
        assert hello.channel_id is not None, "read_hello reads a multifd channel's id"
        check_key_proof(stream, security.auth_key, setup.uuid, hello.channel_id)
    sock.settimeout(None)
    return hello, tls


def tls_accept(sock: socket.socket, tls: TLSConfig, deadline: float,
               where: str | None) -> _core.TLSChannel:
    """The server's TLS handshake on ``sock`` by the deadline; SecurityError says
    why it failed."""
    tls.check_files()           # (the core loads them by path, as the main channel does)
    try:
        return _core.TLSChannel.accept(sock.fileno(), cert=tls.cert, key=tls.key, ca=tls.ca,
                                       ciphers=tls.ciphers,
                                       timeout=max(0.001, deadline - time.monotonic()))
    except TLSError as exc:
        raise SecurityError(str(exc), channel=where) from None


def check_channel(hello: ChannelHello, setup: Setup, taken: Container[int]) -> int:
    """The session's rules for a channel that passed its greeting; returns its id.

    ``taken``: the ids already set up (a second connection for one is refused)."""
    ch = hello.channel_id
    assert ch is not None, "greet_channel refuses a main channel"
    if ch >= setup.total_channels:
        raise ProtocolError(f"init packet field 'id': received {ch}, expected < "
                            f"{setup.total_channels} (channels)", field="id", received=ch,
                            expected=f"< {setup.total_channels}")
    if ch in taken:
        raise ProtocolError(f"init packet field 'id': received {ch}, which is already "
                            f"set up", field="id", received=ch, expected="an unused id")
    expected_kind = _core.CHANNEL_MULTIFD if ch < setup.channels else _core.CHANNEL_DEVICE_STATE
    if setup.channel_header and hello.kind != expected_kind:
        raise ProtocolError(f"channel {ch}: channel header type {hello.kind}, expected "
                            f"{expected_kind}", field="channel_type", received=hello.kind,
                            expected=expected_kind)
    return ch
