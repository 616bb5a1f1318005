"""The exceptions fastmfd raises. Every one derives from :class:`FastMFDError`.

- :class:`ConfigError` — a setting or argument that cannot work, raised before
  anything starts. Its :class:`ListenError` is an address that cannot be
  listened on and keeps the OS's ``errno`` (it is an ``OSError`` too).
- :class:`ProtocolError` — bytes on the wire (or in a capture file) that break
  the format. It names the field, the value received and the value expected,
  and where the bytes were (a channel, or a file and byte offset). Its
  :class:`ConnectionClosed` is a connection its peer ended inside a message or packet.
- :class:`TLSError` — a TLS handshake or session failed: it says what failed
  ("TLS handshake failed: certificate verify failed (certificate has
  expired)", "the peer does not speak TLS (it sent plaintext: 48 54 54 50 ...)").
- :class:`MigrationError` — a session failed: a channel, a worker process, a
  device, a loader or the peer. It names the channel (or device) and the cause.
- :class:`SecurityError` — a peer did not prove who it is (TLS or auth_key).
- :class:`ConnectError` — the peer could not be reached; keeps the OS's
  ``errno`` (it is a ``ConnectionError`` too).
- :class:`OutputError` — a file a listener writes could not be written or
  committed (a full disk, a name taken meanwhile); it names the file.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Self

__all__ = ["FastMFDError", "ConfigError", "ListenError", "ProtocolError", "TLSError",
           "ConnectionClosed", "MigrationError", "SecurityError", "ConnectError",
           "NoSourceError", "OutputError", "Aborted",
           "printable", "peer_words"]

# Unicode's categories of characters that are not text to read: controls (Cc), format
# characters (Cf: bidi overrides and isolates, zero-width ones, the BOM), line and
# paragraph separators (Zl, Zp), surrogates (Cs), private use (Co), unassigned (Cn).
_NOT_TEXT = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: str) -> str:
    """``text`` from a peer or a file, safe to put in a message a terminal or a log
    viewer shows: a character that is no text to read becomes its escape
    (``\\xNN``, ``\\uNNNN``, ``\\UNNNNNNNN``): a control character (an escape
    sequence that would clear the screen or forge a line), a bidi override that
    would show the rest of the line reversed, U+2028/U+2029 (a new line to many
    log viewers and to ``str.splitlines``), a zero-width character that hides
    text. Newlines and tabs stay."""
    if text.isprintable():          # (most text: nothing to look up)
        return text
    return "".join(_escaped(char) if char not in "\n\t"
                   and unicodedata.category(char) in _NOT_TEXT else char for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    return (f"\\x{code:02x}" if code <= 0xff else f"\\u{code:04x}" if code <= 0xffff
            else f"\\U{code:08x}")


def peer_words(text: str, limit: int = 300) -> str:
    """What a peer that has proved nothing says (why it refused us): printable,
    on one line (a newline would forge a line of the log it is written to) and
    at most ``limit`` characters (each kept refusal holds it)."""
    flat = printable(text).replace("\n", "\\n").replace("\t", " ")
    return flat if len(flat) <= limit else flat[:limit] + f"... ({len(flat) - limit} more)"


class FastMFDError(Exception):
    """Base class of every fastmfd error."""


class ConfigError(FastMFDError, ValueError):
    """A configuration value or argument that cannot work.

    One about a parameter's value says which: ``parameter``, the library's name of
    it (``"stall_timeout"``), and ``problem``, what is wrong with the value (and
    what would do) in words that name no parameter (``"must be seconds in
    0.1..86400"``), so that a command can say it of the option its user typed
    (``--stall-timeout 0.001: must be ...``); otherwise None and "". ``involves``: the
    other parameters whose values the problem is about (``("channels",
    "stall_timeout")``), which a command says are defaults where they were not typed."""

    parameter: str | None = None
    problem: str = ""
    involves: tuple[str, ...] = ()

    def __init__(self, message: str, *, parameter: str | None = None,
                 problem: str = "", involves: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.parameter, self.problem, self.involves = parameter, problem, involves


class ListenError(ConfigError, OSError):
    """An address that cannot be listened on (in use, not permitted, no such
    interface); ``errno`` is the OS's, e.g. ``errno.EADDRINUSE``."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        OSError.__init__(self, errno, message)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[Self], tuple[str | None, int | None], dict[str, Any]]:
        # (and what was set on it since: a note, a parameter; pickle restores it)
        return type(self), (self.strerror, self.errno), vars(self)


class ProtocolError(FastMFDError):
    """Malformed or unexpected bytes on the wire or in a capture.

    ``field``, ``received`` and ``expected`` describe the check that failed;
    ``where`` says where the bytes came from (``"channel 2"``,
    ``"conn1.bin at byte 1344"``), and is prefixed to the message.
    """

    def __init__(self, message: str, *, field: str | None = None, received: object = None,
                 expected: object = None, where: str | None = None) -> None:
        self.detail = message
        self.field = field
        self.received = received
        self.expected = expected
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, where: str) -> "ProtocolError":
        """The same error, located at ``where`` (outermost location first)."""
        located = f"{where}, {self.where}" if self.where else where
        return ProtocolError(self.detail, field=self.field, received=self.received,
                             expected=self.expected, where=located)


class ConnectionClosed(ProtocolError):
    """The peer closed the connection before a read was complete (a message read by
    :func:`fastmfd.protocol.sockets.recv_exact`, a packet by the core's engines)."""

    @property
    def after(self) -> str:
        """How far the read got: "after 3 of 8 bytes of message"."""
        return self.detail.removeprefix("connection closed ")


class TLSError(FastMFDError):
    """A TLS handshake or session failed; the message says what (raised by
    the core's ``TLSChannel``)."""


class MigrationError(FastMFDError):
    """A session failed. ``channel`` (or ``device``) names where, ``cause`` says why."""

    def __init__(self, message: str, *, channel: str | None = None,
                 device: str | None = None, side: str | None = None) -> None:
        self.cause = message
        self.channel = channel
        self.device = device
        self.side = side
        where = channel or device
        super().__init__(f"{where}: {message}" if where else message)


class SecurityError(MigrationError):
    """A peer failed TLS or the auth_key proof: a certificate that does not
    verify, an identity outside ``authz``, a wrong key, plaintext meeting TLS.
    ``unverified``: the peer's certificate did not verify (the handshake's check)."""

    unverified = False


class ConnectError(MigrationError, ConnectionError):
    """The peer could not be reached (refused, unreachable, timed out); ``errno``
    is the OS's, e.g. ``errno.ECONNREFUSED``."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __reduce__(self) -> tuple[type[Self], tuple[str | None, int | None], dict[str, Any]]:
        return type(self), (self.cause, self.errno), vars(self)


class NoSourceError(MigrationError, TimeoutError):
    """No source came within a destination's ``timeout`` (none passed its
    greeting): nothing was received, no session began."""


class OutputError(MigrationError):
    """A file a listener writes could not be written or committed; the message
    names it. Raised from fastmfd's own hooks (a listener commits its files in
    ``on_resume``), it passes as it is, not as "the on_resume hook raised"."""


class Aborted(FastMFDError):
    """A wait given up because its session is being torn down.

    Internal: the session reports the error that started the teardown, not
    this one.
    """
