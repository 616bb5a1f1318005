"""``listen --qemu`` in TLS (a QEMU source with ``tls-creds``): each connection
is greeted by a receive worker, which keeps it.

A TLS session cannot move between processes, and in TLS a connection's first
bytes say nothing of what it is: so every connection goes to a receive
worker as it is taken. The worker runs the handshake (the source's
certificate must chain to ``ca``, and name an ``authz`` identity when one is
given), reads QEMU's first bytes through it and reports what it found::

    QemuConnections (main process)                receive worker (one per connection)
      a connection ─ QemuGreeting + its socket ──▶  TLS handshake: once it passed,
      ◀── QemuAuthenticated ──────────────────────   then QEMU's first bytes, within
                                                     the greeting's deadline
      ◀── QemuGreeted(None): "QEVM" ──────────────   the main channel:
      Relay + one end of a socket pair ──────────▶   the stream decrypted into that end,
      the pair's other end: the main channel,         what comes out of it (the return
        read as a plaintext one                       path's answers) encrypted: relayed
                                                      until the main process closes its end
      ◀── QemuGreeted(id, uuid) ──────────────────   a multifd channel's init packet: it
        a candidate, judged as in plaintext           keeps the channel; its RecvParams
        (qemu_channels.choose_channels)               follow: RecvEngine through TLS
      ◀── Refused(why, authenticated) ────────────   not QEMU's: dropped; it greets the
                                                      next connection it is handed

A connection whose handshake fails is a stranger's whenever it came, and
dropped: without a certificate of QEMU's it cannot be one of its channels (in
plaintext one after the main channel fails the migration, as its pages might
be QEMU's). One that fails after its handshake (what it sends is not QEMU's,
or does not decrypt) holds such a certificate: it is judged by when it came,
as in plaintext. At most MAX_GREETINGS connections are greeted at once: the
listener waits meanwhile, and the kernel's backlog holds the next. Under
max_memory, fewer: a connection is greeted only where the bound holds it as a
channel of QEMU's (it may be one; until the main channel is told apart, one
being greeted is counted as it, with no buffers) beside those so far and the
workers alive (idle ones let go to make room:
memory_bound.qemu_greeting_refusal), so a channel greeted always fits, whatever
strangers are greeted meanwhile. One that finds no room waits while a greeting
under way may end to make it; once each is through its handshake
(QemuAuthenticated) and no idle worker is left, nothing will: QEMU's main
channel says nothing until all its channels are through theirs (nor, with the
return path, ends its setup section), and the wait fails after
qemu_channels.NO_ROOM_WAIT, naming what QEMU's channels need. Before the main
channel (or after the count), with none being greeted and no room, a
connection is refused at once (were it QEMU's, its channels would not fit
anyway). Barrier 1 waits COUNT_WAIT for the greetings under way; one that ends
later is judged as a connection after the count (a channel of this migration
fails it). A worker whose greeted connection is not kept is dismissed (it
exits, closing it); one whose greeting failed greets the next.

In plaintext a :class:`PlainGreeter` stands where the TLSGreeter does, with its
interface: no worker greets (the listener reads the first bytes itself), a
channel's worker is handed its socket with its RecvParams, and one whose
channel is not kept is taken back; so the receiving side has one code path.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable

from .. import _core
from ..errors import FastMFDError, MigrationError, ProtocolError
from ..protocol.control import (Eof, QemuAuthenticated, QemuGreeted, QemuGreeting, Ready,
                                RecvParams, Refused, Relay)
from ..protocol.handshake import TLSStream, tls_accept
from ..protocol.qemu import QEVM_MAGIC
from ..protocol.security import ChannelSecurity, check_authz
from .processes import Child, Watch

__all__ = ["greet_in_tls", "not_qemus", "TLSGreeter", "PlainGreeter", "MAX_GREETINGS",
           "COUNT_WAIT", "MULTIFD_MAGIC", "FIRST_BYTES_WAIT"]

log = logging.getLogger("fastmfd")

MAIN = "main channel"
MULTIFD_MAGIC = _core.MULTIFD_MAGIC.to_bytes(4, "big")
# Connections greeted at once, each by a worker process of its own: QEMU's
# default 2 channels and main channel many times over, while a flood of
# strangers (each held up to the greeting's deadline) costs at most this many.
MAX_GREETINGS = 32
# How long barrier 1 waits for the greetings under way. QEMU's channels were
# through their handshakes long before (each sent its setup SYNC since); their
# workers may still be starting on a loaded machine. A greeting that reports
# later is judged as a late connection (one of the migration's fails it): a
# stranger's stalled handshake holds the migration up this long at most.
COUNT_WAIT = 5.0
# How long a connection through its handshake (it holds a certificate ``ca``
# issued) is given for its first bytes, counted from the handshake's end, in
# handshake deadlines: QEMU's main channel sends them only once every multifd
# channel is through its own handshake, and those may wait in the backlog for
# MAX_GREETINGS strangers' greetings to end (a deadline), then be greeted.
FIRST_BYTES_WAIT = 2
# How long the relay of the main channel is given to pass on what was said last
# (SHUT 0: the source completes only once it has it) before its worker is stopped.
RELAY_DRAIN = 2.0


def greet_in_tls(sock: socket.socket, security: ChannelSecurity,
                 authenticated: Callable[[], None] = lambda: None
                 ) -> tuple[QemuGreeted | Refused, _core.TLSChannel | None]:
    """A receive worker's side of a connection to ``listen --qemu`` in TLS: the
    handshake (``authenticated()`` once it passed), then QEMU's first bytes
    (``QEVM``: its main channel, or a multifd channel's init packet). Returns
    what it found and the session (None: the handshake failed). A failure after
    the handshake, TLS's own included (a record that does not decrypt), is an
    authenticated peer's: one holding a certificate ``ca`` issued, so judged as
    QEMU's might be."""
    assert security.tls is not None, "greeted in TLS only"
    try:
        tls = tls_accept(sock, security.tls, time.monotonic() + security.timeout, None)
        check_authz(tls.peer_identities(), security.tls.authz)
    except FastMFDError as exc:
        return Refused(str(exc), authenticated=False), None
    authenticated()
    deadline = time.monotonic() + FIRST_BYTES_WAIT * security.timeout
    try:
        return _qemus_first_bytes(TLSStream(tls, None, deadline)), tls
    except FastMFDError as exc:
        return Refused(str(exc), authenticated=True), tls


def _qemus_first_bytes(stream: TLSStream) -> QemuGreeted:
    head = stream.recv_exact(4, "QEMU's first bytes")
    if head == QEVM_MAGIC:
        return QemuGreeted(None, None)
    if head != MULTIFD_MAGIC:
        raise ProtocolError(not_qemus(head), field="magic", received=head.hex(),
                            expected=f"{QEVM_MAGIC.hex()} or {MULTIFD_MAGIC.hex()}")
    packet = head + stream.recv_exact(_core.INIT_PACKET_SIZE - 4, "init packet")
    uuid, channel = _core.decode_init_packet(packet)
    return QemuGreeted(channel, uuid)


def not_qemus(head: bytes) -> str:
    """Why a connection whose first 4 bytes are ``head`` is not QEMU's."""
    return (f"it sent first bytes {head.hex()}, expected {QEVM_MAGIC.hex()} (QEVM, the main "
            f"channel) or {MULTIFD_MAGIC.hex()} (a multifd channel)")


class PlainGreeter:
    """``listen --qemu`` in plaintext, with TLSGreeter's interface (module docstring):
    ``free_worker`` takes back the worker of a channel not kept."""
    tls = False
    released = 0                                    # none dismissed: taken back

    def __init__(self, watch: Watch, free_worker: Callable[[Child], None]) -> None:
        self.watch, self.free_worker = watch, free_worker

    def greet(self, sock: socket.socket, on_greeted: object) -> bool:
        """True: no worker greets ``sock``, the caller reads its first bytes itself."""
        return True

    def no_room(self, greeting: int) -> str | None:
        return None                                 # (a worker only once it is a channel)

    def start(self, worker: Child, params: RecvParams, sock: socket.socket) -> None:
        """Start ``worker`` receiving ``sock``'s channel."""
        worker.start_session(params, [sock.fileno()])

    def dismiss(self, worker: Child) -> None:
        """``worker``'s channel is not kept: it is taken back, to be another's."""
        self.watch.remove(worker.conn)
        self.watch.remove(worker.sentinel)
        self.free_worker(worker)

    def relay_failure(self) -> FastMFDError | None:
        return None                                 # (no relay: the main channel is read)

    def drain(self) -> bool:
        return True


class TLSGreeter:
    """The main process's side: hands each connection to a receive worker and
    passes on what it reports (module docstring). ``take_worker`` gives a
    spare worker (or one started now), ``free_worker`` takes one back;
    ``no_room(n)``: why one more may not be greeted beside the ``n`` being
    greeted (under max_memory; None: it may; MAX_GREETINGS is the caller's)."""
    tls = True

    def __init__(self, security: ChannelSecurity, watch: Watch,
                 take_worker: Callable[[], Child], free_worker: Callable[[Child], None],
                 no_room: Callable[[int], str | None] = lambda greeting: None) -> None:
        self.security, self.watch = security, watch
        self.take_worker, self.free_worker, self.no_room = take_worker, free_worker, no_room
        self.relaying: Child | None = None          # the main channel's worker
        self.released = 0                           # workers dismissed: exiting, not counted

    def greet(self, sock: socket.socket,
              on_greeted: Callable[[Child, QemuAuthenticated | QemuGreeted | Refused], None]
              ) -> bool:
        """Hand ``sock`` to a worker; ``on_greeted`` gets its reports. False: the caller
        does not read it (:meth:`PlainGreeter.greet`)."""
        worker = self.take_worker()

        def on_report(report: object) -> None:
            if isinstance(report, Refused):
                self._forget(worker)
                self.free_worker(worker)
            if isinstance(report, (QemuAuthenticated, QemuGreeted, Refused)):
                on_greeted(worker, report)
            elif not isinstance(report, (Ready, Eof)):
                raise MigrationError(f"a receive worker greeting a connection reported "
                                     f"{report!r}")

        self.watch.add_child(worker, on_report)
        worker.start_session(QemuGreeting(self.security), [sock.fileno()])
        return False

    def start(self, worker: Child, params: RecvParams, sock: socket.socket) -> None:
        """Start ``worker`` receiving ``sock``'s channel: it holds the connection, since
        its greeting."""
        worker.send(params)

    def dismiss(self, worker: Child) -> None:
        """``worker``'s connection, greeted, is not kept: the worker is told to
        exit, which closes it (its peer waits for nothing more)."""
        self._forget(worker)
        worker.release()
        self.released += 1

    def _forget(self, worker: Child) -> None:
        self.watch.remove(worker.conn)
        self.watch.remove(worker.sentinel)

    def relay(self, worker: Child) -> socket.socket:
        """The main channel, greeted by ``worker``: the end of a socket pair it
        relays the TLS session with (blocking, as a main channel's socket is)."""
        ours, theirs = socket.socketpair()
        try:
            worker.name = MAIN
            worker.start_session(Relay(), [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.relaying = worker
        return ours

    def relay_failure(self) -> FastMFDError | None:
        """How the relay ended, once the main channel's end of it is shut: None
        when it passed on what it held within RELAY_DRAIN seconds (or there was
        none), else its failure (a record that did not decrypt, or its death)."""
        relaying, self.relaying = self.relaying, None
        if relaying is None:
            return None
        try:
            relaying.expect(Eof, RELAY_DRAIN)
            return None
        except FastMFDError as exc:
            return exc

    def drain(self) -> bool:
        """The session's close: whether the relay passed on what it held."""
        failure = self.relay_failure()
        if failure is not None:     # it failed or was slow: the session is over
            log.warning("the main channel's relay did not pass on its last bytes: %s",
                        failure)
        return failure is None
