"""Deadlines: whatever a session waits for must make progress within
``stall_timeout`` seconds, or the session fails naming who made none.

::

    main process monitor (each side), every quarter of the shorter deadline at most:
      Heartbeat   main channel: send KEEPALIVE when nothing else went out for a
                  quarter of the shorter deadline of the two sides (SETUP says the
                  source's, SETUP_ACK the destination's); fail when nothing came in
                  (nor waits to be read) for all of this side's
                  ("main channel: nothing from the destination for 30 s")
      Progress    each channel (and the reassembly process) that has work —
                  a job or command queued, a SYNC or the end due — or whose
                  process is stopped must finish a packet (change its shared
                  counters) within the deadline
                  ("receive channel 1: no progress for 30 s (its process is stopped)")
      Steps       the destination, while the source waits for its word (SWITCHOVER_ACK,
                  then LOADED once COMPLETE came): LOADING(steps, its stall timeout)
                  instead of KEEPALIVE and whenever they grew, steps growing as its
                  work moves on (towards the ack, its loaders' alone); the
                  source fails a destination whose steps stop growing for twice
                  the longer stall timeout of the two (AwaitingDestination)
                  ("main channel: the destination made no progress towards LOADED ...")
    data sockets: SO_SNDTIMEO = stall_timeout, so a send worker whose peer takes
                  nothing for that long fails by itself (the core maps the
                  socket's EAGAIN to "no progress for 30 s")

Nothing here polls faster than a quarter of the shorter deadline: the checks ride on
the monitor's existing wait, which wakes for reports and messages anyway.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import threading
import time
from typing import Any, Callable, Hashable

from ..errors import FastMFDError, MigrationError, ProtocolError
from ..protocol.main_channel import (MAIN, Loading, MainChannel, Msg, Sender, peer_failed,
                                     read_message)
from ..protocol.sockets import decrypted_unread

__all__ = ["Heartbeat", "Progress", "Steps", "AwaitingDestination", "set_stall_timeout",
           "bytes_waiting", "process_stopped", "stall_error", "first_few", "tick"]


def tick(stall_timeout: float) -> float:
    """How often a monitor looks: a quarter of the deadline, at most once a second."""
    return min(1.0, stall_timeout / 4)


def set_stall_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel deadlines on a data socket: a send (or receive) that moves no byte for
    ``seconds`` fails with EAGAIN, in whichever process holds the socket."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    for option in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, option, value)


def bytes_waiting(fd: int) -> int:
    """Bytes readable in a pipe or socket now (FIONREAD; either end of a pipe)."""
    try:
        waiting: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        return waiting
    except OSError:
        return 0


def process_stopped(pid: int | None) -> bool:
    """True if the process is stopped (SIGSTOP, a debugger)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def first_few(items: list[str]) -> str:
    """The first three of ``items``, for an error: "a; b; c; ..." when there are more."""
    return "; ".join(items[:3]) + ("; ..." if len(items) > 3 else "")


def stall_error(name: str, seconds: float, pid: int | None = None, detail: str = "",
                kind: type[MigrationError] = MigrationError) -> MigrationError:
    """``name: no progress for S s`` with what is known of why (a ``kind`` of error)."""
    why = " (its process is stopped)" if process_stopped(pid) else detail
    return kind(f"no progress for {seconds:g} s{why}", channel=name)


class Progress:
    """Per participant: while it has work (``expected``), its ``signature`` (a
    snapshot of its counters) must change within ``limit`` seconds. The clock
    starts when the work appears, not when the participant last moved: an idle
    channel handed a job after a minute is not late."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._seen: dict[Hashable, tuple[object, float]] = {}

    def stalled(self, name: Hashable, expected: bool, signature: object,
                now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._seen.get(name)
        if not expected or last is None or last[0] != signature:
            self._seen[name] = (signature, now)
            return False
        return now - last[1] > self.limit


class Heartbeat:
    """The main channel's liveness: KEEPALIVE out (or what ``word`` says instead),
    anything in within ``limit``. KEEPALIVEs go a quarter of the shorter of
    ``limit`` and the peer's ``peer_limit`` apart, as the peer fails this side by
    its own deadline and a round says nothing else here (its pages go on the data
    channels: a source of 30 s failed a destination of 5 s in any round longer).
    Pages arriving are no word from the peer's main process, the one watched
    here: stuck in a hook, it still has workers sending what was queued, and a
    live one may have no page to send (collecting a bitmap, saving devices)."""

    def __init__(self, main: MainChannel, limit: float, peer: Sender,
                 peer_limit: float | None = None) -> None:
        self.main, self.limit, self.peer = main, limit, peer
        self.interval = min(limit, limit if peer_limit is None else peer_limit) / 4
        self.last_received = time.monotonic()
        self.word: Callable[[], tuple[Msg, Any]] = lambda: (Msg.KEEPALIVE, None)

    @property
    def pace(self) -> float:
        """How often the monitor must look: its tick, or sooner for a KEEPALIVE due."""
        return min(tick(self.limit), self.interval)

    def received(self) -> None:
        self.last_received = time.monotonic()

    def beat(self, urgent: bool = False) -> None:
        """Send KEEPALIVE (the word) if ``urgent`` or nothing went out for a while;
        fail if nothing came in."""
        now = time.monotonic()
        if urgent or now - self.main.last_sent >= self.interval:
            try:
                self.main.send(*self.word())
            except MigrationError:
                # A side stopped past its peer's deadline finds the connection
                # closed, and the peer's ERROR saying why waiting: read next, it
                # is the cause ("Broken pipe" was said instead; a review).
                if not self.peer_spoke():
                    raise
        silent = now - self.last_received
        if silent > self.limit and not self.peer_spoke():
            raise MigrationError(f"nothing from the {self.peer} for {silent:.3g} s "
                                 f"(stall timeout {self.limit:g} s)", channel=MAIN)

    def peer_speaks_by(self, deadline: float) -> bool:
        """Whether the peer's next message comes before ``deadline``, KEEPALIVE going
        out meanwhile as it falls due: waiting for the peer's word (its ERROR, the
        cause of a failure seen here) is no silence of this side. Silent through a
        grace of half a 1 s stall timeout, a destination was the one the source
        failed ("nothing from the destination"), before its ERROR could say why.
        A KEEPALIVE that cannot go means a peer gone: it says nothing more."""
        while not decrypted_unread(self.main.sock):
            now = time.monotonic()
            if now - self.main.last_sent >= self.interval:
                try:
                    self.main.send(*self.word())
                except MigrationError:
                    return False
            wait = min(deadline, self.main.last_sent + self.interval) - now
            if select.select([self.main.sock], [], [], max(0.0, wait))[0]:
                return True
            if time.monotonic() >= deadline:
                return False
        return True

    def peer_failure_first(self, error: MigrationError, grace: float,
                           max_payload: int = 0) -> MigrationError:
        """``error``, a channel's that broke, or the peer's ERROR if it comes within
        ``grace`` seconds: a peer that fails sends its ERROR, then shuts its sockets
        down, so the channel's error is most likely the consequence, the ERROR the
        cause. The peer's other messages are skipped (the session is failing);
        ``max_payload`` bounds them (see :func:`read_message`)."""
        deadline, kind = time.monotonic() + grace, None
        try:
            while kind is not Msg.ERROR and self.peer_speaks_by(deadline):
                kind, body = read_message(self.main.sock, max_payload, deadline,
                                          sender=self.peer)
        except (FastMFDError, OSError):
            return error                # the main channel broke too: the error stands
        if kind is not Msg.ERROR:
            return error
        cause = peer_failed(body, self.peer)
        cause.__cause__ = error
        return cause

    def peer_spoke(self) -> bool:
        """Whether the peer's next message is already here, unread. A process stopped
        or descheduled past the deadline finds it queued when it runs again: the
        peer was not silent, this side was late to read (and what it reads may be
        the peer's own ERROR, the failure worth reporting)."""
        sock = self.main.sock
        return decrypted_unread(sock) > 0 or bytes_waiting(sock.fileno()) > 0


class Steps:
    """What a destination says while the source waits for its word, SWITCHOVER_ACK
    (its loaders load the chunks sent live) or LOADED (once COMPLETE came), in
    LOADING messages: a count that grows at each look that finds its work moved on
    (towards the ack, its loaders: chunks PRECOPY_SENT counted loaded, precopy_loaded()
    returned; after COMPLETE, channels draining, devices loading, regions written
    out), so a source can tell a destination that loads from one that only says it
    is alive. Said in place of KEEPALIVE, and as soon as it changed: the
    ROUND_ACKs of the rounds a source goes on sending while it waits for the ack
    may leave the heartbeat no quiet moment to say it in."""

    def __init__(self) -> None:
        self.count = 0
        self._said = 0              # the count LOADING last said
        self._seen: object = None

    def see(self, signature: object) -> None:
        if signature != self._seen:
            self._seen, self.count = signature, self.count + 1

    def news(self) -> bool:
        """Whether the count changed since LOADING last said it."""
        return self.count != self._said

    def word(self, owed: bool, stall_timeout: float) -> tuple[Msg, Any]:
        """The heartbeat's word: LOADING while ``owed`` (the source waits for this
        side's word), else KEEPALIVE."""
        if not owed:
            return Msg.KEEPALIVE, None
        self._said = self.count
        return Msg.LOADING, Loading(self.count, stall_timeout)


class AwaitingDestination:
    """The source's deadlines while it waits for the destination's word: its LOADING
    steps must grow within twice ``limit`` (or twice the destination's own stall
    timeout, which LOADING says, if longer) while SWITCHOVER_ACK is owed and from
    COMPLETE until its LOADED, and its RESUMED (its on_resume ran) must follow
    LOADED within ``limit``. KEEPALIVEs (and ROUND_ACKs) say alive, not that it
    loads or answers: a destination sending only those held the source for ever,
    iterating rounds for the ack or waiting for LOADED. Twice: what holds a
    destination's steps up (a channel swallowed, a loader stuck) fails it by its
    own deadline first, and its ERROR then says which, where this side could only
    say that it made no progress."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.steps = 0
        self.loaded_at: float | None = None     # when LOADED came (monotonic)
        self.ack_asked: float | None = None     # when PRECOPY_SENT went out (switchover_ack)
        self.acked = threading.Event()          # SWITCHOVER_ACK came back (or a failure
                                                # wakes the wait for it)
        self._live = ""                         # what PRECOPY_SENT counted, for the error
        self._progress = Progress(2 * limit)

    def ack_requested(self, devices: list[str], live_chunks: list[int]) -> None:
        """PRECOPY_SENT goes out, counting ``live_chunks`` of each of ``devices``."""
        self.ack_asked = time.monotonic()
        counted = [f"{name}: {n}" for name, n in zip(devices, live_chunks) if n]
        self._live = f"live chunks to load, {first_few(counted)}" if counted else "no live chunk"

    @property
    def ack_owed(self) -> bool:
        return self.ack_asked is not None and not self.acked.is_set()

    def loading(self, steps: int, stall_timeout: float) -> None:
        """LOADING: ``steps`` so far, each within the destination's ``stall_timeout``."""
        if steps < self.steps:
            raise ProtocolError(f"main channel: LOADING field 'steps': received {steps}, "
                                f"expected at least {self.steps} (steps only grow)",
                                field="steps", received=steps, expected=f">= {self.steps}")
        self.steps = steps
        self._progress.limit = 2 * max(self.limit, stall_timeout)

    def loaded(self) -> None:
        self.loaded_at = time.monotonic()

    def check(self, completing: bool, heartbeat: Heartbeat) -> None:
        """Fail a destination that is late; not while its word waits unread (this
        side was the one held up)."""
        now, limit, asked = time.monotonic(), self._progress.limit, self.ack_asked
        if self.loaded_at is not None and now > self.loaded_at + self.limit:
            raise MigrationError(f"no RESUMED from the destination {self.limit:g} s after "
                                 f"its LOADED (its on_resume must finish within the stall "
                                 f"timeout)", channel=MAIN)
        if self._stalled("ack", self.ack_owed, now, heartbeat):
            assert asked is not None, "stalled only while expected"
            raise MigrationError(f"the destination made no progress towards SWITCHOVER_ACK "
                                 f"for {limit:g} s, {now - asked:.3g} s after PRECOPY_SENT "
                                 f"({self._live}; its KEEPALIVEs and ROUND_ACKs say it is "
                                 f"alive, not that it loads)", channel=MAIN)
        if self._stalled("loading", completing, now, heartbeat):
            raise MigrationError(f"the destination made no progress towards LOADED for "
                                 f"{limit:g} s after COMPLETE (its KEEPALIVEs say it is "
                                 f"alive, not that it loads)", channel=MAIN)

    def _stalled(self, what: str, expected: bool, now: float, heartbeat: Heartbeat) -> bool:
        return (self._progress.stalled(what, expected, self.steps, now)
                and not heartbeat.peer_spoke())
