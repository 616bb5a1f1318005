"""The main channel (DESIGN §4.5): its messages, and their writer and reader.

The multifd channels use QEMU's own packet layouts, framed by the Cython
core (``fastmfd._core``). The main channel is fastmfd's own: after the
optional channel header it starts with a 4-byte magic and a version, then
carries messages ``(BE u32 type, BE u32 length, payload)``. Control payloads
are JSON objects — this is not the hot path — decoded into the typed
messages below, every field checked; DEVICE_STATE (the old way's device
chunks) is binary::

    BE u32 device index (position in SETUP's device list)
    12-byte chunk header (version, idx, flags) + chunk data

SETUP's payload has its own module (:mod:`.setup`); AUTH carries the
shared-key proof of :mod:`.security`, binary. Adding a message: a
:class:`Msg` number, a dataclass, and its decoder in ``_DECODERS``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Collection, Literal, TypeVar

from .. import _core
from ..errors import MigrationError, ProtocolError, peer_words
from .setup import (MAX_CHANNELS, MAX_DEVICES, MAX_STALL_SECONDS, MIN_STALL_SECONDS, Setup,
                    is_stall_seconds)
from .sockets import ConnectionClosed, describe_peer, recv_exact, send_all

if TYPE_CHECKING:
    from typing_extensions import Buffer     # collections.abc.Buffer from Python 3.12

__all__ = [
    "MAIN", "MAIN_MAGIC", "MAIN_VERSION", "CAPTURE_VERSIONS", "MAIN_PREAMBLE",
    "MESSAGE_HEADER", "MESSAGE_HEADER_SIZE", "MAX_CONTROL_PAYLOAD", "MAX_SMALL_PAYLOAD",
    "MAX_ERROR_CHARS", "MAX_JSON_DEPTH", "OLD_WAY_PREFIX", "OLD_WAY_CHECKSUM", "Msg",
    "DESTINATION_SENDS", "SOURCE_SENDS", "Sender",
    "SetupAck", "RoundEnd", "RoundAck", "PrecopySent", "Complete", "Loaded", "Loading", "Error",
    "MainChannel", "encode_message", "error_message", "decode_message_header",
    "decode_control", "decode_payload", "encode_preamble", "check_preamble", "read_message",
    "read_payload", "expect_message", "old_way_message_size", "old_way_checksum",
    "check_round", "peer_failed", "read_from_source"
]

MAIN = "main channel"               # how errors name the main channel
MAIN_MAGIC = 0x464D4644            # "FMFD"; differs from MULTIFD_MAGIC, so channels can be told apart
# 2: a checksum (SETUP's) chains through its channel's packets; a peer of 1
# would take every checksummed packet after the first for a damaged one.
# 3: LOADING, and each message's payload bounded; 4: LOADING while SWITCHOVER_ACK is
# owed too, which a source of 3 refuses (mid-session, where 4 is refused at once).
# 5: SETUP_ACK carries the destination's stall_timeout, a payload a source of 4 would
# refuse after its SETUP (a version apart is refused at the preamble instead).
MAIN_VERSION = 5
# What a capture of a source's main channel may say: its side of versions 2 to 4 is
# version 5's (LOADING and SETUP_ACK's payload are a destination's).
CAPTURE_VERSIONS = (2, 3, 4, 5)
MAIN_PREAMBLE = struct.Struct(">II")
MESSAGE_HEADER = struct.Struct(">II")
MESSAGE_HEADER_SIZE = MESSAGE_HEADER.size
MAX_CONTROL_PAYLOAD = 16 << 20     # bound on any JSON message a peer can make us read
MAX_SMALL_PAYLOAD = 4 << 10        # ... and on those that carry {} or a number or two
MAX_ERROR_CHARS = 1000             # an ERROR's text, as sent and as shown
MAX_AUTH_PAYLOAD = 64              # a UUID, a nonce, a nonce and a proof, or a proof
MAX_JSON_DEPTH = 32                # nesting of a control payload (SETUP's is 3): deeper ones
                                   # would not even fit an error message (repr recursion)
OLD_WAY_PREFIX = struct.Struct(">I")    # DEVICE_STATE: the device index before the chunk
OLD_WAY_CHECKSUM = struct.Struct("<Q")  # DEVICE_STATE with SETUP's checksum: CRC-32 of the
                                        # rest. Little-endian, unlike a multifd device
                                        # packet's trailer (BE, DESIGN §4); changing it
                                        # takes a new main channel version
ERROR_TIMEOUT = 1.0                 # seconds a failing side gives its ERROR (send_error)
_MAX_COUNT = (1 << 63) - 1          # any counter or round number
_MAX_COUNTERS = 64                  # counters in one channel's row of COMPLETE
_MAX_SECONDS = 1e9                  # any duration (about 32 years)


class Msg(enum.IntEnum):
    """Main-channel message types."""
    SETUP = 1               # source -> destination: every session parameter
    SETUP_ACK = 2           # destination -> source: ready for channels; its stall_timeout
    ROUND_END = 3           # source -> destination: every RAM channel has its SYNC for round n
    ROUND_ACK = 4           # destination -> source: round n applied on every channel
    DEVICE_STATE = 5        # source -> destination: one device chunk (old way only)
    SWITCHOVER_START = 6    # source -> destination: the source stopped; device state follows
    COMPLETE = 7            # source -> destination: everything sent (totals)
    LOADED = 8              # destination -> source: everything applied and loaded
    ERROR = 9               # either way: the session failed (text)
    RESUMED = 10            # destination -> source: its on_resume ran; the session is over
    AUTH = 11               # either way, before SETUP: the shared-key proof (binary, .security)
    KEEPALIVE = 12          # either way, after SETUP_ACK: still here (a quarter of the
                            # shorter stall_timeout of the two apart);
                            # and destination -> source before it, while preallocating
    PRECOPY_SENT = 13       # source -> destination, switchover_ack: the chunks each device sent live
    SWITCHOVER_ACK = 14     # destination -> source: those chunks are loaded; the source may stop
    LOADING = 15            # destination -> source, while SWITCHOVER_ACK is owed and after
                            # COMPLETE, in place of KEEPALIVE: its steps towards the ack or
                            # LOADED so far (must grow within stall_timeout)


# ---------------------------------------------------------------- payloads

@dataclass(frozen=True)
class SetupAck:
    """The destination is ready for channels. ``stall_timeout``: its own deadline
    (or the source's, SETUP's, if it has none), within which it must hear from
    the source on this channel: the source's KEEPALIVEs keep to it when shorter."""
    stall_timeout: float


@dataclass(frozen=True)
class RoundEnd:
    """Every RAM channel has been sent the SYNC of ``round``."""
    round: int


@dataclass(frozen=True)
class RoundAck:
    """Round ``round`` is applied on every RAM channel."""
    round: int


@dataclass(frozen=True)
class PrecopySent:
    """The source is ready to stop (switchover_ack): per device, in SETUP's order,
    the chunks it sent live (idx 0 up to this). The destination answers
    SWITCHOVER_ACK once every one of them is loaded."""
    device_chunks: list[int]


def old_way_message_size(chunk_size: int, checksum: bool) -> int:
    """The largest DEVICE_STATE payload: device index, chunk header, a chunk of
    ``chunk_size`` and, with ``checksum``, its trailer."""
    return (OLD_WAY_PREFIX.size + _core.CHUNK_HEADER_SIZE + chunk_size
            + OLD_WAY_CHECKSUM.size * checksum)


def old_way_checksum(*parts: bytes | memoryview) -> bytes:
    """The trailer of a checksummed DEVICE_STATE message: the CRC-32 of ``parts``
    (its device index, chunk header and data)."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return OLD_WAY_CHECKSUM.pack(crc)


def check_round(message: str, received: int, expected: int, field: str = "round") -> None:
    """A round number (or count, ``field``) the peer sent must be the one this side knows."""
    if received != expected:
        raise ProtocolError(f"main channel: {message} field {field!r}: received {received}, "
                            f"expected {expected}", field=field, received=received,
                            expected=expected)


def peer_failed(body: bytes, peer: Sender) -> MigrationError:
    """The ``peer``'s ERROR message (its payload ``body``) as the session's error."""
    return MigrationError(f"the {peer} failed: {decode_payload(Msg.ERROR, body).error}",
                          channel=MAIN, side=peer)


def read_from_source(main: MainChannel, max_payload: int, deadline: float,
                     channels: int) -> tuple[Msg, bytes]:
    """:func:`read_message` from the source mid-session. Its end of the connection
    without an ERROR says whose it was; with none of its ``channels`` connected, it
    most likely gave up waiting for SETUP_ACK (this side held up meanwhile: stopped)."""
    try:
        return read_message(main.sock, max_payload, deadline, sender="source")
    except ConnectionClosed as exc:
        where = f"{MAIN} (from {main.peer})" if main.peer else MAIN
        gave_up = "" if channels else (", before any of its channels connected (did it give "
                                       "up waiting for SETUP_ACK?)")
        raise MigrationError(f"the source closed the connection {exc.after}{gave_up}",
                             channel=where) from None


@dataclass(frozen=True)
class Complete:
    """Everything is sent: per channel the source's counters, per device its chunks
    (the destination checks both against its own)."""
    channels: list[dict[str, int]]
    device_chunks: list[int]

    # What each side counts of a channel's packets, and must agree on.
    COUNTED = ("packets", "normal_pages", "zero_pages", "device_packets")

    def check_channels(self, arrived: Callable[[int], dict[str, int]], total: int) -> None:
        """Each of ``total`` channels' counters as sent against ``arrived(ch)``'s."""
        for ch in range(total):
            mine = arrived(ch)
            theirs = self.channels[ch] if ch < len(self.channels) else {}
            for key in self.COUNTED:
                if theirs.get(key) != mine[key]:
                    raise ProtocolError(f"channel {ch}: the source sent {theirs.get(key)} "
                                        f"{key.replace('_', ' ')}, {mine[key]} arrived",
                                        field=key, received=mine[key], expected=theirs.get(key))


@dataclass(frozen=True)
class Loaded:
    """Everything is applied and every device loaded."""
    rounds: int
    load_seconds: dict[str, float]

    def check(self, rounds: int, acked: int, devices: Collection[str]) -> None:
        """Against what the source knows: the ``rounds`` it ended, each acknowledged
        (a destination sends every ROUND_ACK before LOADED), and a load time only
        for its ``devices`` (names kept in its statistics and printed)."""
        check_round("LOADED", self.rounds, rounds, "rounds")
        if acked != rounds:
            raise ProtocolError(f"main channel: LOADED before the ROUND_ACK of round "
                                f"{acked + 1}", field="rounds", received=acked, expected=rounds)
        unknown = set(self.load_seconds) - set(devices)
        if unknown:
            raise ProtocolError(f"main channel: LOADED field 'load_seconds': "
                                f"{peer_words(min(unknown), 80)!r} is no device of this "
                                f"session", field="load_seconds", received=len(unknown),
                                expected=sorted(devices)[:8])


@dataclass(frozen=True)
class Loading:
    """Not loaded yet, but moving: ``steps`` grows as the destination's loaders load
    the chunks sent live (SWITCHOVER_ACK owed), or as it drains its channels, loads
    its devices and writes its regions out (after COMPLETE), each within its own
    ``stall_timeout`` (which may be longer than the source's)."""
    steps: int
    stall_timeout: float


@dataclass(frozen=True)
class Error:
    """The session failed; ``error`` says why."""
    error: str


_Payload = TypeVar("_Payload")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _counters(value: Any) -> bool:
    # Every counter both sides check, and a bounded number of others (more are kept
    # than checked); a key missing read as "the source sent None normal pages".
    return (isinstance(value, dict) and len(value) <= _MAX_COUNTERS
            and all(key in value for key in Complete.COUNTED)
            and all(_count(v) for v in value.values()))


def _seconds(value: Any) -> bool:
    return isinstance(value, dict) and len(value) <= MAX_DEVICES and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < _MAX_SECONDS
        for v in value.values())


def _typed(cls: type[_Payload],
           **rules: tuple[Callable[[Any], bool], str]) -> Callable[[dict[str, Any]], _Payload]:
    """A decoder for ``cls``: exactly the fields of ``rules``, each passing its check."""
    def decode(value: dict[str, Any]) -> _Payload:
        if set(value) != set(rules):
            raise ProtocolError(f"{cls.__name__}: fields {sorted(value)[:8]}, expected "
                                f"{sorted(rules)}", field="payload",
                                received=sorted(value)[:8], expected=sorted(rules))
        for name, (check, expected) in rules.items():
            if not check(value[name]):
                raise ProtocolError(f"{cls.__name__} field {name!r}: received "
                                    f"{value[name]!r:.80}, expected {expected}", field=name,
                                    received=value[name], expected=expected)
        return cls(**value)
    return decode


def _peer_error(value: dict[str, Any]) -> Error:
    """The peer's reason as it is shown to a user: its control characters escaped,
    on one line (a newline would forge a line of a log), at most MAX_ERROR_CHARS."""
    error = _typed(Error, error=(lambda v: isinstance(v, str), "a string"))(value)
    return Error(peer_words(error.error, MAX_ERROR_CHARS))


def error_message(error: BaseException | str) -> bytes:
    """The ERROR that tells the peer ``error``: at most MAX_ERROR_CHARS of it."""
    return encode_message(Msg.ERROR, Error(str(error)[:MAX_ERROR_CHARS]))


# Per device, a chunk count (COMPLETE, PRECOPY_SENT).
_CHUNK_COUNTS = (lambda v: isinstance(v, list) and len(v) <= MAX_DEVICES and all(map(_count, v)),
                 f"at most {MAX_DEVICES} chunk counts")
# A side's stall_timeout (SETUP_ACK, LOADING), bounded as SETUP's.
_STALL_SECONDS = (is_stall_seconds, f"seconds in {MIN_STALL_SECONDS:g}..{MAX_STALL_SECONDS:g}")

# How each control message's payload is decoded; messages not listed carry {}.
_DECODERS: dict[Msg, Callable[[dict[str, Any]], Any]] = {
    Msg.SETUP: Setup.decode,
    Msg.SETUP_ACK: _typed(SetupAck, stall_timeout=_STALL_SECONDS),
    Msg.ROUND_END: _typed(RoundEnd, round=(_count, "a round number")),
    Msg.ROUND_ACK: _typed(RoundAck, round=(_count, "a round number")),
    Msg.PRECOPY_SENT: _typed(PrecopySent, device_chunks=_CHUNK_COUNTS),
    Msg.COMPLETE: _typed(
        Complete,
        channels=(lambda v: isinstance(v, list) and len(v) <= MAX_CHANNELS
                  and all(map(_counters, v)),
                  f"at most {MAX_CHANNELS} objects of at most {_MAX_COUNTERS} counts, each "
                  f"with {', '.join(Complete.COUNTED)}"),
        device_chunks=_CHUNK_COUNTS),
    Msg.LOADED: _typed(Loaded, rounds=(_count, "a round count"),
                       load_seconds=(_seconds, f"an object of at most {MAX_DEVICES} seconds")),
    Msg.LOADING: _typed(Loading, steps=(_count, "a step count"), stall_timeout=_STALL_SECONDS),
    Msg.ERROR: _peer_error,
}


def decode_payload(kind: Msg, body: bytes) -> Any:
    """The typed payload of control message ``kind`` (None for an empty one)."""
    value = decode_control(kind, body)
    decoder = _DECODERS.get(kind)
    if decoder is not None:
        return decoder(value)
    if value:
        raise ProtocolError(f"main channel {kind.name}: expected an empty payload",
                            field="payload", received=sorted(value)[:8], expected="{}")
    return None


def _encode_payload(payload: Any) -> dict[str, Any]:
    if isinstance(payload, Setup):
        return payload.encode()
    if isinstance(payload, dict):
        return payload
    return {f.name: getattr(payload, f.name) for f in fields(payload)}


# ---------------------------------------------------------------- framing

def encode_preamble() -> bytes:
    return MAIN_PREAMBLE.pack(MAIN_MAGIC, MAIN_VERSION)


def check_preamble(data: Buffer, versions: tuple[int, ...] = (MAIN_VERSION,)) -> None:
    """The main channel's preamble: the magic, and one of ``versions``."""
    magic, version = MAIN_PREAMBLE.unpack(data)
    if magic != MAIN_MAGIC:
        raise ProtocolError(f"main channel field 'magic': received {magic:#x}, expected "
                            f"{MAIN_MAGIC:#x}", field="magic", received=magic,
                            expected=MAIN_MAGIC)
    if version not in versions:
        expected = " or ".join(filter(None, (", ".join(map(str, versions[:-1])),
                                             str(versions[-1]))))
        raise ProtocolError(f"main channel field 'version': received {version}, expected "
                            f"{expected}", field="version", received=version,
                            expected=expected)


def encode_message(kind: Msg, payload: Any = None) -> bytes:
    """A whole message: header plus payload (a dataclass or dict is sent as JSON)."""
    if payload is None or isinstance(payload, (bytes, bytearray)):
        body = bytes(payload or b"")
    else:
        body = json.dumps(_encode_payload(payload), separators=(",", ":"),
                          allow_nan=False).encode()
    return MESSAGE_HEADER.pack(int(kind), len(body)) + body


# What each message's payload may be: what its largest legitimate one needs. A
# peer's JSON costs the reader objects many times its size while it is parsed
# (a review measured 200-440 MiB for 16 MiB of small keys), so the messages a
# destination sends, all small, are held to their size, not to SETUP's.
_PAYLOAD_LIMITS = {
    Msg.SETUP: MAX_CONTROL_PAYLOAD,     # up to 4096 regions and 4096 devices, named
    Msg.LOADED: 4 << 20,                # a load time per device (4096 named at most)
    Msg.COMPLETE: 1 << 20,              # counters per channel, chunks per device
    Msg.PRECOPY_SENT: 1 << 20,          # chunks per device
    Msg.ERROR: 64 << 10,                # MAX_ERROR_CHARS, each up to 12 bytes escaped
    Msg.AUTH: MAX_AUTH_PAYLOAD,
}


# What each side sends: a message the other side alone sends is refused by its type.
DESTINATION_SENDS = frozenset({Msg.SETUP_ACK, Msg.ROUND_ACK, Msg.LOADED, Msg.ERROR, Msg.RESUMED,
                               Msg.AUTH, Msg.KEEPALIVE, Msg.SWITCHOVER_ACK, Msg.LOADING})
SOURCE_SENDS = frozenset({Msg.SETUP, Msg.ROUND_END, Msg.DEVICE_STATE, Msg.SWITCHOVER_START,
                          Msg.COMPLETE, Msg.ERROR, Msg.AUTH, Msg.KEEPALIVE, Msg.PRECOPY_SENT})
Sender = Literal["source", "destination"]
_SENDS: dict[Sender, frozenset[Msg]] = {"source": SOURCE_SENDS,
                                        "destination": DESTINATION_SENDS}


def decode_message_header(data: Buffer, max_payload: int, *, sender: Sender | None = None,
                          expected: Collection[Msg] = ()) -> tuple[Msg, int]:
    """Validate a message header; return ``(type, payload length)``.

    Its type is judged before its length, so that a message that cannot come
    is refused as such, not as too long (a DEVICE_STATE was refused as longer
    than 0 bytes): it must be one ``sender`` sends, if said, and one of
    ``expected``, if given."""
    kind, length = MESSAGE_HEADER.unpack(data)
    try:
        msg = Msg(kind)
    except ValueError:
        raise ProtocolError(f"main channel field 'type': received {kind}, expected one of "
                            f"{[int(m) for m in Msg]}", field="type", received=kind,
                            expected="a message type") from None
    if sender is not None and msg not in _SENDS[sender]:
        raise ProtocolError(f"main channel: received {msg.name}, which a {sender} does not "
                            f"send", field="type", received=msg.name,
                            expected=f"a {sender}'s message")
    if expected and msg not in expected:
        names = " or ".join(m.name for m in expected)
        raise ProtocolError(f"main channel: received {msg.name}, expected {names}",
                            field="type", received=msg.name, expected=names)
    limit = max_payload if msg is Msg.DEVICE_STATE else _PAYLOAD_LIMITS.get(msg,
                                                                          MAX_SMALL_PAYLOAD)
    if length > limit:
        raise ProtocolError(f"main channel {msg.name} field 'length': received {length}, "
                            f"expected <= {limit}", field="length", received=length,
                            expected=limit)
    return msg, length


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (Python's reader takes them): a count or a
    time that is one would make every result computed from it one too."""
    raise ValueError(f"{name} is not a JSON number")


def decode_control(kind: Msg, body: bytes) -> dict[str, Any]:
    """The JSON object of a control message."""
    try:
        value = json.loads(body, parse_constant=_no_constant) if body else {}
    except (ValueError, RecursionError) as exc:     # bad UTF-8 or JSON; nesting too deep
        raise ProtocolError(f"main channel {kind.name}: payload is not JSON ({exc})",
                            field="payload", received=body[:40], expected="JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"main channel {kind.name}: payload is not a JSON object",
                            field="payload", received=type(value).__name__, expected="object")
    if not _nested_at_most(value, MAX_JSON_DEPTH):
        raise ProtocolError(f"main channel {kind.name}: payload nested deeper than "
                            f"{MAX_JSON_DEPTH} levels", field="payload", received="deeper",
                            expected=f"at most {MAX_JSON_DEPTH} levels")
    return value


def _nested_at_most(value: Any, limit: int) -> bool:
    """Whether no object or array in ``value`` lies more than ``limit`` levels deep
    (iterative: a value too deep for recursion is exactly what it looks for)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return True


# ---------------------------------------------------------------- reader and writer

def read_message(sock: socket.socket, max_payload: int, deadline: float | None = None, *,
                 what: str = "message", where: str = MAIN, seconds: float | None = None,
                 sender: Sender | None = None) -> tuple[Msg, bytes]:
    """One main-channel message (type, raw payload); ``max_payload`` bounds DEVICE_STATE.
    ``deadline`` (monotonic) bounds the whole message: a peer that trickles one
    must not hold the reader (and every deadline its thread keeps) for ever.
    Errors name the message awaited (``what``), the connection (``where``) and
    the ``seconds`` the deadline gave, if said. ``sender``: see
    :func:`decode_message_header`."""
    kind, length = decode_message_header(
        recv_exact(sock, MESSAGE_HEADER_SIZE, what, where, deadline, seconds), max_payload,
        sender=sender)
    return kind, (recv_exact(sock, length, f"{kind.name} payload", where, deadline, seconds)
                  if length else b"")


def read_payload(sock: socket.socket, deadline: float | None = None, *, what: str = "message",
                 where: str = MAIN, seconds: float | None = None,
                 sender: Sender | None = None) -> tuple[Msg, Any]:
    """One control message, typed (an ERROR is returned, not raised)."""
    kind, body = read_message(sock, 0, deadline, what=what, where=where, seconds=seconds,
                              sender=sender)
    return kind, decode_payload(kind, body)


def expect_message(sock: socket.socket, kind: Msg, *, deadline: float, seconds: float,
                   where: str = MAIN, keepalive_wait: float | None = None,
                   keepalive_until: float | None = None, sender: Sender | None = None) -> Any:
    """Read a control message that must be ``kind``, whole by ``deadline``
    (monotonic, ``seconds`` from the wait's start); the peer's ERROR is raised.
    Errors name the connection: ``where``. ``sender``: see
    :func:`decode_message_header`.

    ``keepalive_wait``: KEEPALIVEs may come first (a peer still busy, alive),
    each giving the peer that many more seconds for the next message, but
    none past ``keepalive_until`` (monotonic): a peer that only ever says it is
    alive must not hold the wait forever."""
    got, payload = read_payload(sock, deadline, what=kind.name, where=where, seconds=seconds,
                                sender=sender)
    while got is Msg.KEEPALIVE and keepalive_wait is not None:
        if keepalive_until is not None and time.monotonic() > keepalive_until:
            raise MigrationError(f"still no {kind.name} after the peer's KEEPALIVEs ran past "
                                 f"their deadline", channel=where)
        try:
            got, payload = read_payload(sock, time.monotonic() + keepalive_wait,
                                        what=kind.name, where=where, seconds=keepalive_wait,
                                        sender=sender)
        except MigrationError as exc:       # (a peer that spoke: no "is it there?" hint)
            raise MigrationError(f"{exc.cause}, after the peer's KEEPALIVE (it was alive and "
                                 f"busy)", channel=where) from exc
    if got is Msg.ERROR:
        raise MigrationError(f"the peer failed: {payload.error}", channel=where, side="peer")
    if got is not kind:
        raise ProtocolError(f"received {got.name}, expected {kind.name}", where=where,
                            field="type", received=got.name, expected=kind.name)
    return payload


class MainChannel:
    """The main channel's socket and its writer; sends are serialized (several
    threads send: the session's thread, device savers, the failure path)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Whose it is, for errors: taken now, as a reset connection has no peer.
        try:
            peer = sock.getpeername()
        except OSError:
            peer = ""
        self.peer = describe_peer(peer) if isinstance(peer, tuple) else ""
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.last_sent = time.monotonic()

    def send(self, kind: Msg, payload: Any = None) -> None:
        with self._lock:
            self._write(kind, encode_message(kind, payload))

    def keep_alive(self, every: float) -> None:
        """KEEPALIVE if nothing went out for ``every`` seconds."""
        if time.monotonic() - self.last_sent >= every:
            self.send(Msg.KEEPALIVE)

    def _write(self, kind: Msg, data: bytes) -> None:
        """Send a whole message (the caller holds the lock)."""
        send_all(self.sock, data, kind.name, MAIN)
        self.bytes_sent += len(data)
        self.last_sent = time.monotonic()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer while the handshake sends on the socket (the source's SETUP):
        an ERROR sent meanwhile by another thread follows it, whole."""
        with self._lock:
            yield

    def send_parts(self, kind: Msg, parts: list[bytes | memoryview]) -> None:
        """A binary message whose payload is several buffers (device chunks, old way)."""
        length = sum(len(part) for part in parts)
        with self._lock:
            send_all(self.sock, MESSAGE_HEADER.pack(int(kind), length), kind.name, MAIN)
            for part in parts:
                send_all(self.sock, part, kind.name, MAIN)
            self.bytes_sent += MESSAGE_HEADER.size + length
            self.last_sent = time.monotonic()

    def send_error(self, error: BaseException) -> None:
        """Best effort, within ERROR_TIMEOUT for the lock and as much for the send:
        tell the peer why the session failed. The failure's teardown waits on it,
        and the shutdown that follows is what breaks another thread's send stuck
        behind a peer that reads nothing (the ERROR could not have followed it)."""
        if not self._lock.acquire(timeout=ERROR_TIMEOUT):
            return
        try:
            self.sock.settimeout(ERROR_TIMEOUT)
            self._write(Msg.ERROR, error_message(error))
        except Exception:
            pass
        finally:
            self._lock.release()

    def shutdown(self) -> None:
        """Break any I/O blocked on the socket, in this thread or another."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
