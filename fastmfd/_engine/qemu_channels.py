"""Which connections to a QEMU destination are QEMU's multifd channels.

The listener of ``listen --qemu`` takes any connection; QEMU's are told apart
by their first bytes (``QEVM``: the main channel; the multifd magic: a multifd
channel, then its 64-byte init packet: UUID and id). Whether a connection is
QEMU's is decided once the setup section ended (barrier 1: by then every
channel of QEMU's has connected and sent its init packet), by one fact of
QEMU's own: it connects its main channel first, then its multifd channels
(both 7.2 and 10.x; a 7.2 destination relies on it, spec §1.4).

- One that came after the main channel is QEMU's: it must be a multifd
  channel with a good init packet, all of them must carry one UUID (the
  main channel's, where its configuration names one) and each id once, or
  the migration fails, as QEMU's own destination fails it (dropped, its
  pages would be lost).
- One that came before it is a stranger's, dropped, unless it has that UUID
  and fills a gap in their ids (or, if none came after the main channel, is
  the first of its id): the accept order of two connections can only be
  turned around by a lost handshake packet, and such a channel is QEMU's.
- One that came after barrier 1 is a stranger's, dropped, unless it is a
  multifd channel with the migration's UUID: then it fails the migration.

No connection is waited for alone (:class:`QemuConnections`): each is read as
its bytes come (its first 4 peeked, a multifd channel's init packet taken into
a buffer), so a stranger that says nothing, or trickles, holds nothing up. At
barrier 1 those not yet complete get LATE_BYTES_WAIT, all together.

In TLS each connection is greeted by a receive worker instead (:mod:`.qemu_tls`),
which reports what it is; one whose handshake fails is dropped whenever it came.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable, cast

from .. import _core
from ..errors import FastMFDError, MigrationError, ProtocolError
from ..protocol.control import QemuAuthenticated, QemuGreeted, Refused
from ..protocol.qemu import QEVM_MAGIC
from ..protocol.refusing import end_on_arrival
from ..protocol.sockets import Listener, describe_peer
from .liveness import process_stopped
from .processes import Child, Watch
from .qemu_tls import (COUNT_WAIT, MAX_GREETINGS, MULTIFD_MAGIC, PlainGreeter, TLSGreeter,
                       not_qemus)

__all__ = ["QemuChannel", "QemuConnections", "migration_uuid", "choose_channels",
           "late_sync_error", "stopped_note", "LATE_BYTES_WAIT", "NO_ROOM", "NO_ROOM_WAIT"]

log = logging.getLogger("fastmfd")

INIT_PACKET_SIZE = _core.INIT_PACKET_SIZE
# When the setup section ends, QEMU's channels have written their init packets
# (then their setup SYNC, which the section waits for): on this machine's
# loopback they are here; a connection with nothing to say by then is not QEMU's.
LATE_BYTES_WAIT = 1.0
# accept(2) on Linux passes a new connection's own pending network error on:
# retried, as for EAGAIN; any other failure (out of descriptors) is the listener's.
ACCEPT_RETRY = {errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                errno.ENETUNREACH}


# Why a connection in TLS was refused unread (qemu_tls: under max_memory), and what a
# wait for QEMU says when connections waited for room to be greeted (and the log, once
# one is greeted after such a wait).
NO_ROOM = ("max_memory holds no worker process more to greet it, beside QEMU's channels so "
           "far and the workers alive")
WAITED_FOR_ROOM = ("connections waited for room to be greeted under max_memory, beside QEMU's "
                   "channels so far and those being greeted: it may not hold QEMU's channels")
# How long a connection waits for room to be greeted (under max_memory) once nothing
# being greeted may end to make it, before the channels are counted: each greeting under
# way is through its TLS handshake (a stranger's handshake would end at its deadline),
# and no idle worker is left to let go. If QEMU has every channel in, it goes on at once
# (its main channel says QEVM, or its setup section ends) and the one waiting is a
# stranger's; else it waits for its next channel, in the backlog: the bound does not
# hold QEMU's channels. (Without this end, the wait lasted until the main channel's
# greeting timed out, 20 s, and receive() failed only at its timeout.)
NO_ROOM_WAIT = 1.0
NO_ROOM_LEFT = ("the connection waiting to be greeted is one of QEMU's channels: nothing "
                f"made room within {NO_ROOM_WAIT:g} s (each connection being greeted is "
                "through its TLS handshake, as QEMU's are) and the setup section did not "
                "end (QEMU's main channel waits for every channel of its)")
# What a fastmfd source sent here is told (its `fastmfd send` said "is a fastmfd listener
# there? a QEMU destination takes `fastmfd send --qemu`", a wrong fix: a review).
FASTMFD_SOURCE_HERE = ("this is a QEMU destination (`fastmfd listen --qemu`): it takes a QEMU's "
                       "migration; a fastmfd source's goes to `fastmfd listen` without --qemu")
# Dropped connections are each said in the log up to this many of a kind; after
# that only counted (a flood of strangers, at a few hundred a second, would fill it).
LOGGED_DROPS = 10


@dataclass
class Dropped:
    """Connections dropped for one reason: how many, and the first (its peer and
    why). Not each one: a flood of strangers must not grow the listener."""
    what: str                               # e.g. "failed the TLS handshake"
    count: int = 0
    first: str = ""
    verdict: str = "not QEMU's, dropped"

    def add(self, peer: str, why: str) -> None:
        self.count += 1
        self.first = self.first or f"from {peer}: {why}"
        if self.count <= LOGGED_DROPS:
            log.warning("a connection (%s) %s: %s: %s%s", peer, self.what, why, self.verdict,
                        " (more are counted, not logged)" if self.count == LOGGED_DROPS else "")

    def __str__(self) -> str:
        return f"{self.count} connection(s) {self.what}; the first, {self.first}"


@dataclass
class QemuChannel:
    """A connection that sent a good init packet, and its receive worker."""
    id: int
    sock: socket.socket
    worker: Child | None                    # None only while its worker starts
    uuid: bytes = bytes(16)
    arrival: int = 0                        # its place in the order of accepted connections
    ready: bool = False                     # its worker reported Ready
    starting: bool = False                  # its parameters wait for that Ready
    synced: int = 0
    pages_at_sync: int = 0                  # its page count when let on from its last SYNC
    ended: bool = False
    compression: str | None = None


def migration_uuid(candidates: list[QemuChannel], main_arrival: int,
                   configured: bytes | None) -> bytes | None:
    """The UUID of the migration: the main channel's configuration's, else the
    first channel's that came after the main channel (else the first's): first to
    connect, not first to finish its init packet (the order ``candidates`` has)."""
    if configured is not None or not candidates:
        return configured
    after = [c for c in candidates if c.arrival > main_arrival]
    return min(after or candidates, key=_arrival).uuid


def _arrival(channel: QemuChannel) -> int:
    return channel.arrival


def late_sync_error(late: list[QemuChannel], barrier: int, stall: float) -> MigrationError:
    """No SYNC for ``barrier`` from the ``late`` channels within ``stall`` seconds: one
    whose receive worker is stopped is named first (:func:`stopped_note`)."""
    stopped = [c for c in late if _stopped(c)]
    return MigrationError(f"no SYNC for barrier {barrier} within {stall:g} s{_said(stopped)}",
                          channel=f"multifd channel {(stopped or late)[0].id}")


def stopped_note(channels: Iterable[QemuChannel]) -> str:
    """What a stall of the migration says where one of this side's receive workers is
    stopped (SIGSTOP, a debugger): the stall is this side's, which read as QEMU's or
    the network's doing (the source waits on that channel, and the main channel with it)."""
    return _said([c for c in channels if _stopped(c)])


def _said(stopped: list[QemuChannel]) -> str:
    return (f" (the receive worker of multifd channel {stopped[0].id} is stopped)" if stopped
            else "")


def _stopped(channel: QemuChannel) -> bool:
    return channel.worker is not None and process_stopped(channel.worker.process.pid)


def choose_channels(candidates: list[QemuChannel], main_arrival: int, uuid: bytes | None
                    ) -> tuple[dict[int, QemuChannel], list[tuple[QemuChannel, str]]]:
    """QEMU's channels by id, and the strangers with why (module docstring);
    ``candidates`` taken in the order they connected."""
    expected = uuid.hex() if uuid is not None else None
    chosen: dict[int, QemuChannel] = {}
    candidates = sorted(candidates, key=_arrival)
    for channel in [c for c in candidates if c.arrival > main_arrival]:
        where = f"multifd channel {channel.id}"
        if channel.uuid != uuid:
            # Which one is wrong is not known: say whose uuid this one differs from.
            whose = (f"multifd channel {next(iter(chosen))}'s, the first after the main "
                     "channel" if chosen else "the main channel's configuration's")
            raise ProtocolError(f"init packet field 'uuid': received {channel.uuid.hex()}, "
                                f"expected {expected} (the migration's: {whose})",
                                field="uuid", received=channel.uuid.hex(), expected=expected,
                                where=where)
        if channel.id in chosen:
            raise ProtocolError(f"init packet field 'id': received {channel.id}, already "
                                "connected", field="id", received=channel.id,
                                expected="a new channel id", where=where)
        chosen[channel.id] = channel
    top = max(chosen, default=None)
    strangers = []
    for channel in [c for c in candidates if c.arrival < main_arrival]:
        if channel.uuid != uuid:
            strangers.append((channel, f"the migration's uuid is {expected}"))
        elif channel.id in chosen or (top is not None and channel.id > top):
            strangers.append((channel, "the channels that came after the main channel are "
                                       f"{sorted(chosen)}"))
        else:
            chosen[channel.id] = channel
    return chosen, strangers


class QemuConnections:
    """The connections a QEMU destination's listener takes: each told apart by
    its first bytes as they come, none waited for alone (module docstring).
    The main channel becomes ``main``; a multifd channel's init packet is read,
    and each good one (``candidates``) goes to ``on_channel`` for a worker; a
    connection that is not QEMU's is judged by when it came (:meth:`_judge`).
    :meth:`count` takes stock at barrier 1; later connections are still told
    apart (a channel of the migration fails it, anything else is dropped).
    Its ``greeter`` (qemu_tls) says whether a worker greets each connection (TLS)."""

    def __init__(self, listener: Listener, watch: Watch,
                 on_channel: Callable[[QemuChannel], None],
                 greeter: TLSGreeter | PlainGreeter) -> None:
        self.listener, self.watch, self.on_channel = listener, watch, on_channel
        self.greeter = greeter
        self.main: socket.socket | None = None
        self.main_arrival = -1
        self.main_at = 0.0                              # when the main channel came
        self.candidates: list[QemuChannel] = []         # good init packets
        self.rejects: list[tuple[int, str, str]] = []   # not QEMU's: arrival, why, peer
        self.pending: dict[socket.socket, int] = {}     # not told apart yet: arrival
        self.opening: dict[socket.socket, tuple[int, bytearray]] = {}  # init packet so far
        self.greeting: dict[socket.socket, int] = {}    # with a worker (TLS): arrival
        self.through: set[socket.socket] = set()        # of those, through the handshake
        self.overdue: set[socket.socket] = set()        # greeted past the count: late
        self.failed_handshakes = Dropped("failed the TLS handshake")
        self.no_room = Dropped("found no room to be greeted", verdict="refused")
        self.waiting_room = False                       # the listener waits for a greeting's end
        self.waited_for_room = False                    # it did, under max_memory
        self.room_said = False                          # WAITED_FOR_ROOM logged
        self.peers: dict[socket.socket, str] = {}       # each held connection's address
        self.arrivals = 0
        self.counted_at: int | None = None              # arrivals when barrier 1 came
        self.uuid: bytes | None = None                  # the migration's, once counted
        self.late: dict[socket.socket, float] = {}      # after the count: when it came
        listener.setblocking(False)
        watch.add(listener, self._accept)

    def sockets(self) -> list[socket.socket]:
        """Every connection held (for the session's close)."""
        return [*([self.main] if self.main is not None else []), *self.pending,
                *self.opening, *self.greeting, *(c.sock for c in self.candidates)]

    def forget(self) -> None:
        """Hold no connection any more (the session has closed them all)."""
        self.main, self.candidates = None, []
        for held in (self.pending, self.opening, self.greeting, self.late, self.peers,
                     self.overdue, self.through):
            held.clear()

    # ------------------------------------------------------------ taking them
    def _accept(self) -> None:
        """Take every connection waiting; each is told apart once it has sent bytes.
        After the count, one still silent after LATE_BYTES_WAIT is dropped as
        the next comes, so a client that holds connections open cannot use up
        the descriptors."""
        self._drop_stale()
        while True:
            full = len(self.greeting) >= MAX_GREETINGS
            short = None if full else self.greeter.no_room(len(self.greeting))  # max_memory
            if (full or short) and (self.greeting or self._qemus_turn()):
                self._wait_for_room(short)
                return
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_RETRY:   # that connection's own failure
                    continue
                if self.counted_at is None:
                    raise MigrationError(f"taking a connection failed: {exc.strerror or exc}",
                                         channel="listener") from None
                log.warning("taking a connection failed (%s): no more are taken",
                            exc.strerror or exc)
                self.watch.remove(self.listener)
                return
            if short:           # none being greeted: nothing would make room for it
                self.no_room.add(describe_peer(peer), NO_ROOM)
                sock.close()
                continue
            self.peers[sock] = describe_peer(peer)
            self.arrivals += 1
            if self.waited_for_room and not self.room_said:
                # Said once one is taken after the wait, not as it began: a wait
                # that nothing ends fails, saying why precisely (NO_ROOM_LEFT).
                log.warning("%s", WAITED_FOR_ROOM)
                self.room_said = True
            self.greeting[sock] = self.arrivals - 1
            if self.greeter.greet(sock, functools.partial(self._greeted, sock)):
                self._read_here(sock)

    def _read_here(self, sock: socket.socket) -> None:
        """A connection no worker greets (plaintext): told apart here, as its bytes come."""
        self.pending[sock] = self.greeting.pop(sock)
        sock.setblocking(False)
        if self.counted_at is not None:
            self.late[sock] = time.monotonic()
        self.watch.add(sock, functools.partial(self._classify, sock))

    def _qemus_turn(self) -> bool:
        """Whether a connection now is QEMU's next channel (or a stranger's in the
        moments before the setup section ends): after the main channel, before
        the count."""
        return self.main is not None and self.counted_at is None

    def _wait_for_room(self, short: str | None) -> None:
        """Leave the next connection in the backlog until a greeting's news (its
        handshake passed, its end) or the count. Under max_memory (``short``: why
        there is no room) one more thing: when nothing being greeted may end to make
        room, the wait fails after NO_ROOM_WAIT, naming what QEMU's channels need."""
        self.watch.remove(self.listener)
        self.waiting_room = True
        if short is None:           # MAX_GREETINGS: each ends within its deadline
            return
        self.waited_for_room = True
        if self.counted_at is None and set(self.greeting) <= self.through:
            self.watch.alarm(self, time.monotonic() + NO_ROOM_WAIT,
                             functools.partial(self._no_room_for_qemu, short))

    @staticmethod
    def _no_room_for_qemu(short: str) -> None:
        raise MigrationError(f"{short}; {NO_ROOM_LEFT}", channel="listener")

    def _resume(self) -> None:
        """A greeting's news, or the count: connections are taken again, and the
        room for them looked at anew."""
        if self.waiting_room:
            self.watch.add(self.listener, self._accept)
            self.waiting_room = False
        self.watch.drop_alarm(self)                     # a wait's alarm (_wait_for_room)

    def room_note(self) -> str:
        """What a wait for QEMU adds, when connections waited for room (max_memory)."""
        return f" ({WAITED_FOR_ROOM})" if self.waited_for_room or self.no_room.count else ""

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for sock, came in list(self.late.items()):
            if now - came > LATE_BYTES_WAIT and (sock in self.pending or sock in self.opening):
                log.warning("a connection after the channels were counted (%s) said nothing "
                            "QEMU's would within %g s: dropped", self.peers[sock],
                            LATE_BYTES_WAIT)
                self._forget(sock)

    def _forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock``, hold it no more, close it."""
        self.watch.remove(sock)
        for held in (self.pending, self.opening, self.greeting, self.late, self.peers):
            held.pop(sock, None)
        self.overdue.discard(sock)
        self.through.discard(sock)
        sock.close()

    def _classify(self, sock: socket.socket) -> None:
        """Main channel or multifd channel, by its first 4 bytes (what QEMU >= 8.0
        does; 7.2's "the first connection is main" holds for QEMU's own
        sources), once it is readable. A connection whose first bytes are fewer
        than 4 (QEMU writes those and more at once) or other bytes is not
        QEMU's, whatever it is (a port scan, a health check, a wrong address)."""
        try:
            head = sock.recv(4, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            head, reason = b"", str(exc)
        else:
            reason = "fewer than QEMU's first bytes" if head else "closed"
        arrival = self.pending[sock]
        if len(head) < 4 or head not in (QEVM_MAGIC, MULTIFD_MAGIC):
            # A fastmfd source's main channel starts with its channel header's zero
            # bytes (or, the old way, with FMFD): a user may have sent it here. It
            # reads an ERROR: told what this listener is, its user does not guess.
            ours = head in (bytes(4), b"FMFD")
            if ours:
                end_on_arrival(sock, FASTMFD_SOURCE_HERE, plaintext=True)
            self._reject(sock, f"it sent {len(head)} bytes ({reason})" if len(head) < 4 else
                         not_qemus(head) + (" (a fastmfd source's stream? it goes to `fastmfd "
                                            "listen` without --qemu)" if ours else ""))
        elif head == QEVM_MAGIC:
            if self.main is not None:
                self._reject(sock, "a second main channel (QEVM)")
                return
            self.watch.remove(sock)
            del self.pending[sock]
            sock.setblocking(True)
            self._main_came(sock, arrival)
        else:
            self.watch.remove(sock)
            del self.pending[sock]
            self.opening[sock] = (arrival, bytearray())
            self.watch.add(sock, functools.partial(self._read_init, sock))
            self._read_init(sock)

    def _read_init(self, sock: socket.socket) -> None:
        """Take what has come of a multifd channel's init packet. QEMU writes the
        packet whole as it connects; one cut short or bad (another version) is
        not QEMU's. Whether a good one is QEMU's (its UUID and id) is decided
        at barrier 1 (:func:`choose_channels`)."""
        arrival, data = self.opening[sock]
        try:
            more = sock.recv(INIT_PACKET_SIZE - len(data))
        except BlockingIOError:
            return
        except OSError as exc:
            self._reject(sock, f"bad init packet: reading it failed: {exc.strerror or exc}")
            return
        if not more:
            self._reject(sock, f"bad init packet: connection closed after {len(data)} of "
                               f"{INIT_PACKET_SIZE} bytes")
            return
        data += more
        if len(data) < INIT_PACKET_SIZE:
            return
        try:
            uuid, ch = _core.decode_init_packet(bytes(data))
        except FastMFDError as exc:
            self._reject(sock, f"bad init packet: {exc}")
            return
        if self._took_channel(sock, arrival, uuid, ch):
            self.watch.remove(sock)
            del self.opening[sock]
            sock.setblocking(True)
            self.on_channel(self.candidates[-1])

    def _took_channel(self, sock: socket.socket, arrival: int, uuid: bytes, ch: int,
                      worker: Child | None = None) -> bool:
        """A good init packet: whether it is a candidate (the last), or not QEMU's
        (rejected); one of this migration's after the count fails it."""
        if self._late(arrival) or sock in self.overdue:
            if uuid == self.uuid:
                peer = self.peers[sock]
                self._forget(sock)
                raise ProtocolError(f"multifd channel {ch} of this migration (uuid "
                                    f"{uuid.hex()}) connected after the setup section ended, "
                                    "when the channels were counted: its pages would be "
                                    "missed", field="connection", received="a late channel",
                                    expected="every channel before barrier 1",
                                    where=f"multifd channel {ch} (from {peer})")
            self._reject(sock, f"a multifd channel of another migration (uuid {uuid.hex()})")
            return False
        self.candidates.append(QemuChannel(ch, sock, worker, uuid, arrival,
                                           ready=worker is not None))
        return True

    def _main_came(self, sock: socket.socket, arrival: int) -> None:
        self.main, self.main_arrival, self.main_at = sock, arrival, time.monotonic()
        self._judge(final=False)        # those that waited for the main channel

    def _greeted(self, sock: socket.socket, worker: Child,
                 report: QemuAuthenticated | QemuGreeted | Refused) -> None:
        """What the worker greeting ``sock`` in TLS found (:mod:`.qemu_tls`)."""
        greeter = cast(TLSGreeter, self.greeter)        # (a worker greeted it: TLS)
        self._resume()                  # room looked at anew: a greeting passed or ended
        if isinstance(report, QemuAuthenticated):
            if sock in self.greeting:
                self.through.add(sock)
        elif isinstance(report, Refused) and not report.authenticated:
            self.failed_handshakes.add(self.peers[sock], report.reason)
            self._forget(sock)
        elif isinstance(report, Refused):
            self._reject(sock, report.reason)
        elif report.channel is None and self.main is not None:
            greeter.dismiss(worker)
            self._reject(sock, "a second main channel (QEVM)")
        elif report.channel is None:
            arrival = self.greeting[sock]
            self._forget(sock)              # its worker holds the connection
            self._main_came(greeter.relay(worker), arrival)
        else:
            assert report.uuid is not None, "a multifd channel's greeting has its uuid"
            try:
                taken = self._took_channel(sock, self.greeting[sock], report.uuid,
                                           report.channel, worker)
            except ProtocolError:
                greeter.dismiss(worker)
                raise
            if taken:
                del self.greeting[sock]
                self.through.discard(sock)
                self.on_channel(self.candidates[-1])
            else:
                greeter.dismiss(worker)

    # ------------------------------------------------------------ judging them
    def _reject(self, sock: socket.socket, why: str) -> None:
        """A connection that is not QEMU's: closed, and judged by when it came."""
        if sock in self.overdue:
            log.warning("a connection greeted after the channels were counted (%s): %s: "
                        "dropped", self.peers[sock], why)
            self._forget(sock)
            return
        arrival = (self.pending[sock] if sock in self.pending else self.greeting[sock]
                   if sock in self.greeting else self.opening[sock][0])
        self.rejects.append((arrival, why, self.peers[sock]))
        self._forget(sock)
        self._judge(final=False)

    def _judge(self, final: bool) -> None:
        """Drop the connections that are not QEMU's and came before the main
        channel (or after the count); fail on one that came after the main
        channel before the count: QEMU connects every channel after its main
        channel, so that was one of QEMU's (and losing one loses its pages).
        Until the main channel is told apart (``final``: it is), a connection
        after an undecided one waits."""
        undecided = (min([*self.pending.values(), *self.greeting.values()], default=None)
                     if self.main is None else None)
        for reject in list(self.rejects):
            arrival, why, peer = reject
            if self._late(arrival):
                log.warning("a connection after the channels were counted (%s): %s: dropped",
                            peer, why)
                self.rejects.remove(reject)
                continue
            before = (arrival < self.main_arrival if self.main is not None
                      else undecided is None or arrival < undecided)
            if not before and (final or self.main is not None):
                raise ProtocolError(f"not one of QEMU's channels: {why}", field="connection",
                                    received=why, expected="a multifd channel of QEMU's",
                                    where=f"a connection after the main channel (from {peer})")
            if before:
                log.warning("a connection before the main channel came (%s): %s: not QEMU's, "
                            "dropped", peer, why)
                self.rejects.remove(reject)

    def _late(self, arrival: int) -> bool:
        return self.counted_at is not None and arrival >= self.counted_at

    def count(self, wait: float = LATE_BYTES_WAIT) -> None:
        """Barrier 1, the setup section's end: every channel QEMU opened has
        connected and sent its init packet (its setup SYNC came before). Take
        the last connections, give those not complete ``wait`` seconds, all
        together, then judge what each sent. The caller then sets ``uuid``."""
        self._accept()
        self.counted_at = self.arrivals
        self._resume()                  # (no connection is QEMU's turn now)
        if self.greeting:               # (TLS) workers greeting connections
            wait = max(wait, COUNT_WAIT)
        deadline = time.monotonic() + wait
        while self._untold() and (left := deadline - time.monotonic()) > 0:
            self.watch.poll(left)
        for sock in self._untold():
            if sock in self.greeting:       # judged as a late one once it is greeted
                log.warning("a connection (%s) was not through its greeting %g s after the "
                            "setup section's end: not counted", self.peers[sock], wait)
                self.overdue.add(sock)
                continue
            self._reject(sock, f"no complete init packet within {wait:g} s of the setup "
                               "section's end" if sock in self.opening else
                         f"it sent nothing within {wait:g} s of the setup section's end")
        self._judge(final=True)

    def _untold(self) -> list[socket.socket]:
        """The connections from before the count that have not said what they are."""
        return [sock for sock, arrival in
                [*self.pending.items(), *self.greeting.items(),
                 *((s, a) for s, (a, _) in self.opening.items())]
                if not self._late(arrival) and sock not in self.overdue]
