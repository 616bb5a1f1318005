"""QEMU's return path at fastmfd's end of a QEMU migration, either end (its
messages: :mod:`fastmfd.protocol.qemu_return_path`).

- As the destination (``listen --qemu``, :class:`ReturnPathAnswers`): a QEMU
  source with the capability ``return-path`` opens one, and at the end of its
  stream waits for SHUT before it completes. fastmfd answers each PING at once,
  acks the switchover where the source knows the message (for ``switchover-ack``)
  and says SHUT 0 only once every file is committed and durable, so the source
  reports ``completed`` only then; on any failure, SHUT 1 (or the connection's
  end): the source's migration fails, and its guest goes on running there.
- As the source (``send --qemu``, :class:`ReturnPathWatch`): every migration
  opens one, as a QEMU source with ``return-path`` does, and is done only at
  the destination's SHUT 0. Without it, a destination that failed having read
  the whole stream (behind a TCP relay, which reads it all; or at its last
  bytes) closed the connection as one that had loaded it.

The answers are a few bytes each, sent without waiting: a source that reads
none of them (its socket buffer full) fails the migration, it never holds
the receive up.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl

from ..errors import MigrationError, ProtocolError
from ..protocol.qemu_encoding import encode_open_return_path
from ..protocol.qemu_return_path import (ReturnPathDecoder, encode_rp_pong, encode_rp_shut,
                                         encode_rp_switchover_ack, knows_switchover_ack)
from ..protocol.sockets import decrypted_unread

__all__ = ["ReturnPathAnswers", "ReturnPathWatch"]

log = logging.getLogger("fastmfd")

MAIN = "main channel"
PING = 1                # what the source's one PING says (QEMU's migration_thread: 1 too)


# What a source that could not be told SHUT 0 does, though the files are complete.
SOURCE_NOT_TOLD = ("the files are complete, but the source QEMU was not told: it reports its "
                   "migration failed, and its guest may run on there")


class ReturnPathAnswers:
    """The destination's answers on the main channel's connection, once the
    source opened the return path (``open``)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.shut = False                   # SHUT said: nothing more may be
        self.confirmed = False              # SHUT 0 handed to the connection

    @property
    def opened(self) -> bool:
        return self.sock is not None

    def open(self, sock: socket.socket, machine: str) -> None:
        """OPEN_RETURN_PATH (a second one changes nothing, as in QEMU), from a source
        of the ``machine`` type. fastmfd has no device to make ready, so it acks the
        switchover at once, as a QEMU destination with ``switchover-ack`` and no
        such device does, if the source surely knows the message: one with
        ``switchover-ack`` and a running guest never switches over without it."""
        if self.sock is None:
            self.sock = sock
            if knows_switchover_ack(machine):
                self._say(encode_rp_switchover_ack())

    def pong(self, value: int) -> None:
        """Answer a PING of ``value``."""
        self._say(encode_rp_pong(value))

    def confirm(self) -> None:
        """SHUT 0: every file is committed and durable. A source that can no longer
        be told gets a warning, not an error: the files are complete, but the
        source QEMU reports its migration failed, and its guest may run on there."""
        if self.sock is None or self.shut:
            return
        try:
            self._say(encode_rp_shut(failed=False), last=True)
            self.confirmed = True
        except MigrationError as exc:
            log.warning("%s; %s", exc, SOURCE_NOT_TOLD)

    def refuse(self) -> None:
        """SHUT 1, if the source still listens: this migration failed."""
        if self.sock is not None and not self.shut:
            try:
                self._say(encode_rp_shut(failed=True), last=True)
            except MigrationError:
                pass                        # it went away first: it fails anyway

    def _say(self, message: bytes, last: bool = False) -> None:
        assert self.sock is not None, "only once the return path is open"
        self.shut = self.shut or last       # a SHUT that failed is not tried again
        try:
            sent = self.sock.send(message, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise MigrationError(f"answering on its return path failed: "
                                 f"{exc.strerror or exc}", channel=MAIN) from None
        if sent != len(message):
            raise MigrationError("the source reads nothing of its return path (its socket "
                                 "buffer is full)", channel=MAIN)


class ReturnPathWatch:
    """The source's reading of the destination's answers on the main channel's
    connection; what ``opening`` sends opens the return path."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = ReturnPathDecoder(f"{MAIN} (return path)", [PING])
        self._ended: str | None = None      # how the destination ended it, once known

    @staticmethod
    def opening() -> bytes:
        """The commands that open it: sent right after the configuration."""
        return encode_open_return_path(PING)

    @property
    def said(self) -> int | None:
        """The destination's SHUT: 0 once it loaded the stream; None before."""
        return self.decoder.shut

    def read(self) -> bool:
        """Take what has come, without waiting; False once the connection ended
        (an OSError once it was broken)."""
        readable = select.poll()
        readable.register(self.sock, select.POLLIN)
        # (recv() would wait the socket's timeout first.) Readable is not enough
        # with TLS: what came may be half a record, or none of the peer's data
        # (TLS 1.3's session tickets): recv() would wait for the rest.
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            while decrypted_unread(self.sock) or readable.poll(0):
                try:
                    data = self.sock.recv(1 << 16)
                except (ssl.SSLWantReadError, BlockingIOError):
                    return True
                if not data:
                    return False
                self.decoder.feed(data)
            return True
        finally:
            self.sock.settimeout(timeout)

    def feed(self, data: bytes) -> None:
        """Bytes read elsewhere (the wait for the end of the stream)."""
        self.decoder.feed(data)

    def ended(self) -> str | None:
        """How the destination ended the main channel, if it did (what it said
        on its return path so far is read: before the stream's end, only a
        SHUT that it failed may end it). Once known it is kept: the bytes that
        told it are not there to read again."""
        if self._ended is None:
            self._ended = self._how_ended()
        return self._ended

    def _how_ended(self) -> str | None:
        try:
            if self.read() and self.said is None:
                return None
        except OSError as exc:
            if not self.said:       # a SHUT 1 read before the reset is the cause
                return f"the destination broke the connection: {exc.strerror or exc}"
        except ProtocolError as exc:
            return str(exc)
        said = self.said
        if said is not None:
            return (f"the destination ended its return path before the stream's end (SHUT "
                    f"{said}{': it failed' if said else ''})")
        return "the destination closed the connection"
