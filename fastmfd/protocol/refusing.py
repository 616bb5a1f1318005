"""Telling a refused peer why: the main channel's ERROR, sent where the peer can
read it (a plaintext connection, or one whose TLS handshake passed), best
effort, then the connection ended without resetting it: what the peer sent
meanwhile is drained first, since closing a socket with unread bytes resets
the connection, and a reset can overtake the ERROR."""

from __future__ import annotations

import socket
import time

from .main_channel import error_message

__all__ = ["tell_why", "refuse_on_arrival", "end_on_arrival", "TELL_SECONDS"]

TELL_SECONDS = 0.5             # how long a refused peer is given to read why
TELL_DRAIN_BYTES = 1 << 20


def tell_why(sock: socket.socket, error: BaseException | str) -> None:
    """Best effort: tell a refused peer why, as the main channel's ERROR. What it
    sent meanwhile is drained for a moment first: closing a socket with unread
    bytes resets the connection, and a reset can overtake the ERROR."""
    try:
        sock.settimeout(TELL_SECONDS)
        sock.sendall(error_message(error))
        deadline = time.monotonic() + TELL_SECONDS
        drained = 0
        while drained < TELL_DRAIN_BYTES and time.monotonic() < deadline:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except (OSError, ValueError):
        pass


def refuse_on_arrival(sock: socket.socket, reason: str, plaintext: bool) -> None:
    """Refuse a connection as it arrives, waiting for nothing (no thread greets
    it): a ``plaintext`` peer is sent an ERROR saying why, which fits the new
    connection's empty send buffer, then the end of the stream. What the peer
    sent so far is drained without waiting (closing with unread bytes resets
    the connection, and a reset can overtake the ERROR). A TLS peer could not
    read a plaintext ERROR: it sees the connection end. Closes ``sock``."""
    try:
        end_on_arrival(sock, reason, plaintext)
    finally:
        sock.close()


def end_on_arrival(sock: socket.socket, reason: str, plaintext: bool) -> None:
    """:func:`refuse_on_arrival` but the close: the caller's, where others hold
    ``sock`` too (a watch: it is taken from there first, then closed)."""
    try:
        sock.setblocking(False)
        if plaintext:
            sock.send(error_message(reason))
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < TELL_DRAIN_BYTES:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:         # BlockingIOError: nothing more sent yet
        pass
