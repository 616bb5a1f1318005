"""Which connections to a QEMU destination are QEMU's multifd channels.

The listener of ``listen --qemu`` takes any connection; QEMU's are told apart
by their first bytes (``QEVM``: the main channel; the multifd magic: a multifd
channel, then its 64-byte init packet: UUID and id). Anything else is not
QEMU's and is dropped as it shows (:mod:`.qemu_receiving`). A connection that
sends the multifd magic and a good init packet could still be another
program's, or another VM's migration. Whether it is QEMU's is decided once
the setup section ended (barrier 1: by then every channel of QEMU's has
connected and sent its init packet), by one fact of QEMU's own: it connects
its main channel first, then its multifd channels (both 7.2 and 10.x; a 7.2
destination relies on it, spec §1.4).

- One that came after the main channel is QEMU's: all of them must carry
  one UUID (the main channel's, where its configuration names one) and each
  id once, or the migration fails, as QEMU's own destination fails it.
- One that came before it is a stranger's, dropped, unless it has that UUID
  and fills a gap in their ids (or, if none came after the main channel, is
  the first of its id): the accept order of two connections can only be
  turned around by a lost handshake packet, and such a channel is QEMU's.

No connection is waited for alone (:class:`QemuConnections`): each is read as
its bytes come (its first 4 peeked, a multifd channel's init packet taken into
a buffer), so a stranger that says nothing, or trickles, holds nothing up. At
barrier 1 those not yet complete get LATE_BYTES_WAIT, all together.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable

from .. import _core
from ..errors import FastMFDError, ProtocolError
from ..protocol.qemu import QEVM_MAGIC
from .processes import Child, Watch

__all__ = ["QemuChannel", "QemuConnections", "migration_uuid", "choose_channels",
           "LATE_BYTES_WAIT"]

log = logging.getLogger("fastmfd")

MULTIFD_MAGIC = _core.MULTIFD_MAGIC.to_bytes(4, "big")
INIT_PACKET_SIZE = _core.INIT_PACKET_SIZE
# When the setup section ends, QEMU's channels have written their init packets
# (then their setup SYNC, which the section waits for): on this machine's
# loopback they are here; a connection with nothing to say by then is not QEMU's.
LATE_BYTES_WAIT = 1.0


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
    first channel's that came after the main channel (else the first's)."""
    if configured is not None or not candidates:
        return configured
    after = [c for c in candidates if c.arrival > main_arrival]
    return (after or candidates)[0].uuid


def choose_channels(candidates: list[QemuChannel], main_arrival: int, uuid: bytes | None
                    ) -> tuple[dict[int, QemuChannel], list[tuple[QemuChannel, str]]]:
    """QEMU's channels by id, and the strangers with why (module docstring);
    ``candidates`` in the order they came."""
    expected = uuid.hex() if uuid is not None else None
    chosen: dict[int, QemuChannel] = {}
    for channel in [c for c in candidates if c.arrival > main_arrival]:
        where = f"multifd channel {channel.id}"
        if channel.uuid != uuid:
            raise ProtocolError(f"init packet field 'uuid': received {channel.uuid.hex()}, "
                                f"expected {expected} (the migration's)", field="uuid",
                                received=channel.uuid.hex(), expected=expected, where=where)
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
    """The connections a QEMU destination's listener takes, until barrier 1: each
    told apart by its first bytes (the main channel: ``main``; a multifd
    channel: its init packet read; anything else dropped) as its bytes come,
    none waited for alone (module docstring). ``on_channel`` is called with
    each channel whose init packet is good (``candidates``), to give it a
    worker; :meth:`close` counts them at barrier 1."""

    def __init__(self, listener: socket.socket, watch: Watch,
                 on_channel: Callable[[QemuChannel], None]) -> None:
        self.listener, self.watch, self.on_channel = listener, watch, on_channel
        self.main: socket.socket | None = None
        self.main_arrival = -1
        self.main_at = 0.0                              # when the main channel came
        self.candidates: list[QemuChannel] = []         # good init packets
        self.rejects: list[tuple[int, str]] = []        # not QEMU's: arrival, why
        self.pending: dict[socket.socket, int] = {}     # not told apart yet: arrival
        self.opening: dict[socket.socket, tuple[int, bytearray]] = {}  # init packet so far
        self.arrivals = 0
        self.counted_at: int | None = None          # arrivals when barrier 1 came
        self.uuid: bytes | None = None              # the migration's, once counted
        listener.setblocking(False)
        watch.add(listener, self._accept)

    def sockets(self) -> list[socket.socket]:
        """Every connection held (for the session's close)."""
        return [*([self.main] if self.main is not None else []), *self.pending,
                *self.opening, *(c.sock for c in self.candidates)]

    def _accept(self) -> None:
        """Take every connection waiting; each is told apart once it has sent bytes."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            self.pending[sock] = self.arrivals
            self.arrivals += 1
            self.watch.add(sock, functools.partial(self._classify, sock))

    def _classify(self, sock: socket.socket) -> None:
        """Main channel or multifd channel, by its first 4 bytes (what QEMU >= 8.0
        does; 7.2's "the first connection is main" holds for QEMU's own
        sources), once it is readable. A connection whose first bytes are fewer
        than 4 (QEMU writes those and more at once) or other bytes is not
        QEMU's, whatever it is (a port scan, a health check, a wrong address):
        before the main channel it is dropped, and the migration goes on
        without it; after it, it fails the migration (:meth:`_judge`)."""
        try:
            head = sock.recv(4, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            head, reason = b"", str(exc)
        else:
            reason = "fewer than QEMU's first bytes" if head else "closed"
        self.watch.remove(sock)
        arrival = self.pending.pop(sock)
        if len(head) < 4 or head not in (QEVM_MAGIC, MULTIFD_MAGIC):
            sock.close()
            self._reject(arrival, f"it sent {len(head)} bytes ({reason})" if len(head) < 4 else
                         f"it sent first bytes {head.hex()}, expected {QEVM_MAGIC.hex()} "
                         f"(QEVM, the main channel) or {MULTIFD_MAGIC.hex()} (a multifd "
                         "channel)")
        elif head == QEVM_MAGIC:
            if self.main is not None:
                sock.close()
                raise ProtocolError("a second main channel (QEVM) connected", field="magic",
                                    received=head.hex(), expected="one main channel",
                                    where="a new connection")
            sock.setblocking(True)
            self.main, self.main_arrival, self.main_at = sock, arrival, time.monotonic()
        elif head == MULTIFD_MAGIC:
            self.opening[sock] = (arrival, bytearray())
            self.watch.add(sock, functools.partial(self._read_init, sock))
            self._read_init(sock)

    def _read_init(self, sock: socket.socket) -> None:
        """Take what has come of a multifd channel's init packet. QEMU writes the
        packet whole as it connects, and connects its main channel first: a
        packet cut short or bad (another version) fails the migration on a
        connection that came after the main channel, and on one that came
        before it is a stranger's, dropped. Whether a good one is QEMU's (its
        UUID and id) is decided at barrier 1 (:func:`choose_channels`)."""
        arrival, data = self.opening[sock]
        try:
            more = sock.recv(INIT_PACKET_SIZE - len(data))
        except BlockingIOError:
            return
        except OSError as exc:
            self._bad_init(sock, f"reading it failed: {exc.strerror or exc}")
            return
        if not more:
            self._bad_init(sock, f"connection closed after {len(data)} of {INIT_PACKET_SIZE} "
                                 "bytes")
            return
        data += more
        if len(data) < INIT_PACKET_SIZE:
            return
        try:
            uuid, ch = _core.decode_init_packet(bytes(data))
        except FastMFDError as exc:
            self._bad_init(sock, str(exc))
            return
        self.watch.remove(sock)
        del self.opening[sock]
        if self._late(arrival):
            sock.close()
            if uuid == self.uuid:
                raise ProtocolError(f"multifd channel {ch} of this migration (uuid "
                                    f"{uuid.hex()}) connected after the setup section ended, "
                                    "when the channels were counted: its pages would be "
                                    "missed", field="connection", received="a late channel",
                                    expected="every channel before barrier 1",
                                    where=f"multifd channel {ch}")
            log.warning("a multifd channel of another migration (uuid %s) connected after "
                        "the channels were counted: dropped", uuid.hex())
            return
        sock.setblocking(True)
        channel = QemuChannel(ch, sock, None, uuid, arrival)
        self.candidates.append(channel)
        self.on_channel(channel)

    def _bad_init(self, sock: socket.socket, why: str) -> None:
        arrival, _ = self.opening.pop(sock)
        self.watch.remove(sock)
        sock.close()
        self._reject(arrival, f"bad init packet: {why}")

    def _reject(self, arrival: int, why: str) -> None:
        """A connection that is not QEMU's (closed): judged by when it came."""
        self.rejects.append((arrival, why))
        self._judge(final=False)

    def _judge(self, final: bool) -> None:
        """Drop the connections that are not QEMU's and came before the main
        channel; fail on one that came after it: QEMU connects every channel
        after its main channel, so that was one of QEMU's (and losing one
        loses its pages). Until the main channel is told apart (``final``: it
        is), a connection after an undecided one waits."""
        undecided = min(self.pending.values(), default=None) if self.main is None else None
        for arrival, why in list(self.rejects):
            if self._late(arrival):
                log.warning("a connection after the channels were counted: %s: dropped", why)
                self.rejects.remove((arrival, why))
                continue
            before = (arrival < self.main_arrival if self.main is not None
                      else undecided is None or arrival < undecided)
            if not before and (final or self.main is not None):
                raise ProtocolError(f"not one of QEMU's channels: {why}", field="connection",
                                    received=why, expected="a multifd channel of QEMU's",
                                    where="a connection after the main channel")
            if before:
                log.warning("a connection before the main channel came: %s: not QEMU's, "
                            "dropped", why)
                self.rejects.remove((arrival, why))

    def _late(self, arrival: int) -> bool:
        return self.counted_at is not None and arrival >= self.counted_at

    def close(self, wait: float = LATE_BYTES_WAIT) -> None:
        """Barrier 1, the setup section's end: every channel QEMU opened has
        connected and sent its init packet (its setup SYNC came before). Take
        the last connections, give those not complete ``wait`` seconds, all
        together, then judge what each sent. Later connections are still told
        apart: one of this migration's channels (``uuid``, which the caller
        sets once it has counted them) fails it, any other is dropped."""
        self._accept()
        self.counted_at = self.arrivals
        deadline = time.monotonic() + wait
        while self._counted() and (left := deadline - time.monotonic()) > 0:
            self.watch.poll(left)
        for sock in self._counted():
            if sock in self.opening:
                self._bad_init(sock, f"no complete init packet within {wait:g} s of the "
                                     "setup section's end")
                continue
            self.watch.remove(sock)
            sock.close()
            self.rejects.append((self.pending.pop(sock), f"it sent nothing within {wait:g} s "
                                                         "of the setup section's end"))
        self._judge(final=True)

    def _counted(self) -> list[socket.socket]:
        """The connections before barrier 1 that have not said what they are."""
        return [sock for sock, arrival in
                [*self.pending.items(), *((s, a) for s, (a, _) in self.opening.items())]
                if not self._late(arrival)]
