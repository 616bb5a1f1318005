"""Who gets in: before SETUP, which connection is the session's source
(:class:`Admission`); after it, which connections are its channels
(:class:`ChannelDoor`).

Until a source has passed its greeting (:func:`~fastmfd.protocol.handshake.
greet_main_channel`: TLS, preamble, shared-key proof), every connection to a
destination is a candidate, and most may be strangers: port scans, health
checks, garbage, a peer trickling a byte a second. Each candidate is greeted
in a thread of its own under the greeting's deadline, so no stranger holds up
the real source; the first to pass wins, every other is refused (dropped,
counted, logged) and the listener is left to the session. A greeting still
running when the wait ends is refused with the reason it ended: another passed
(ACCEPTED_ANOTHER), or the session ended (its timeout, a failure, a cancel).

At most MAX_CANDIDATES are greeted at once. One more arriving then takes the
place of the oldest greeting if that one has run for EVICT_AFTER seconds (a
source greets in milliseconds: what lingers is a stranger), and is refused
on arrival otherwise (TOO_MANY): holding the destination shut takes a
stranger MAX_CANDIDATES new connections every EVICT_AFTER seconds, not
MAX_CANDIDATES idle ones.

::

    acceptor thread: select(listener, wake) -> accept -> greeting thread per connection
    greeting threads: greet_main_channel() -> passed (a queue) | refused
    Admission.wait(): the first that passed, or the timeout, or the session's failure

After SETUP a connection can only be greeted by a receive worker (a TLS
session cannot move between processes): the door hands each new connection to
a free worker with a Greeting; the worker answers Greeted(channel), and the
session assigns it, or Refused, and the worker is free again. At most
``GREETING_SPARES`` workers beyond the session's channels greet at once, as
many as max_memory has room for once the session's own parts are counted
(:class:`DoorWorkers`: possibly none); more connections wait in the listen
backlog meanwhile, and, as before SETUP, one waiting takes the place of a
greeting that has run for EVICT_AFTER (the session's channels, queued behind
a flood of strangers that say nothing, waited each stranger's whole handshake
deadline, and the session failed: "not connected ... after SETUP_ACK").
Greetings ending, passed or refused, are the door's progress (:attr:`ChannelDoor.
turnover`): no channel is late while the door works through strangers or channels.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

from ..errors import MigrationError, NoSourceError, ProtocolError
from ..protocol.control import Greeting
from ..protocol.handshake import MainGreeting, greet_main_channel
from ..protocol.refusing import refuse_on_arrival, tell_why
from ..protocol.security import ChannelSecurity
from ..protocol.setup import MAX_CHANNELS, Setup
from ..protocol.sockets import Listener, describe_peer
from ..threads import start_thread
from .liveness import process_stopped
from .memory_bound import WORKER_BYTES
from .processes import Child, ChildSet, Watch
from .session import SessionFailure, SessionResources, as_migration_error
from .stopping import stop_reason
from .workers import recv_worker_main

log = logging.getLogger("fastmfd")

Refuse = Callable[[str, "BaseException | str"], None]
"""``refuse(peer, reason)``: a connection was dropped, and why."""

__all__ = ["Admission", "ChannelDoor", "Refusal", "Refusals", "RefusalLog", "refusal_log",
           "MAX_CANDIDATES", "MAX_REFUSALS_KEPT", "REFUSAL_LOG_BURST", "REFUSAL_LOG_EVERY",
           "EVICT_AFTER", "ACCEPTED_ANOTHER", "TOO_MANY", "EVICTED",
           "session_ended", "refuse_waiting", "refused_meanwhile",
           "GREETING_SPARES", "MAX_WORKERS", "DOOR_EVICTED", "DoorWorkers"]

MAX_CANDIDATES = 64     # connections greeted at once (see the module's docstring)
EVICT_AFTER = 1.0       # seconds a greeting runs before a newcomer may take its place
MAX_REFUSALS_KEPT = 1000    # refusals a destination keeps (in memory)
REFUSAL_LOG_BURST = 100     # refusals a listening socket logs at once ...
REFUSAL_LOG_EVERY = 10.0    # ... and then one per this many seconds (see RefusalLog)
ACCEPTED_ANOTHER = "dropped: the session's source was accepted first"
TOO_MANY = f"{MAX_CANDIDATES} connections are being greeted already"
EVICTED = (f"dropped: greeted for over {EVICT_AFTER:g} s when {MAX_CANDIDATES} were being "
           f"greeted, for a newer connection")
GREETING_SPARES = 8     # receive workers beyond the channels, to greet strangers meanwhile
MAX_WORKERS = MAX_CHANNELS + GREETING_SPARES    # the most receive workers a session uses
CLOSING_GRACE = 2.0     # seconds greetings have to end once their reads are ended
DOOR_EVICTED = (f"dropped: greeted for over {EVICT_AFTER:g} s when every greeting worker was "
                f"busy, for a newer connection")


class DoorWorkers:
    """The receive workers the door lets a session of ``channels`` run (``at_most``):
    those it needs (``needed``: one a channel, or the ``started`` ahead if more) and
    up to GREETING_SPARES more to greet connections meanwhile (started only as
    connections come). Under max_memory (``bounded``) the spares are cut to what
    the memory left holds (:meth:`fit`), possibly to none: the session's own
    parts are counted first, and a spare only ever greets (strangers, mostly)."""

    def __init__(self, channels: int, started: int, bounded: bool) -> None:
        self.needed = max(channels, started)
        self.at_most = max(channels + GREETING_SPARES, self.needed)
        self.bounded = bounded

    @property
    def spares(self) -> int:
        return self.at_most - self.needed

    def fit(self, room: int) -> int:
        """Cut the spares to what ``room`` bytes (what max_memory leaves) hold,
        WORKER_BYTES each; returns the bytes they take (0 when not bounded)."""
        if not self.bounded:
            return 0
        self.at_most = self.needed + min(self.spares, max(0, room) // WORKER_BYTES)
        return self.spares * WORKER_BYTES


@dataclass(frozen=True)
class Refusal:
    """A connection the destination dropped (``fastmfd.Refusal``): who (``peer``), and
    why (``reason``)."""
    peer: str
    reason: str


class Refusals:
    """The connections one destination refused: each counted (``total``), the
    first MAX_REFUSALS_KEPT kept (``kept``), and logged to ``log_to`` (the
    listening socket's: :func:`refusal_log`). A stranger can open about 175
    connections a second here: kept and logged, all of them, they grew a
    long-waiting listener's memory and log without bound."""

    def __init__(self, log_to: RefusalLog) -> None:
        self.kept: list[Refusal] = []
        self.total = 0
        self.last: str | None = None        # the last refusal's "peer: reason"
        self._log = log_to
        self._lock = threading.Lock()      # refused from greeting threads and the watch loop

    def add(self, peer: str, reason: BaseException | str) -> None:
        refusal = Refusal(peer, str(reason))
        with self._lock:
            self.total += 1
            self.last = f"{peer}: {refusal.reason}"
            if len(self.kept) < MAX_REFUSALS_KEPT:
                self.kept.append(refusal)
        self._log.add(refusal)

    def ended(self) -> None:
        """The destination refuses no more: see :meth:`RefusalLog.say_skipped`."""
        self._log.say_skipped()

    @contextmanager
    def named_in_failure(self, failure: SessionFailure) -> Iterator[None]:
        """The error the block raises, the session's failure, says the connections
        refused while it ran, if any: a channel whose hello came damaged (a proxy, a
        bad link) is refused as a stranger, and the session then failed waiting for it
        ("not connected", "nothing from the source") with no word of why, here or at
        the source (a fuzzing review). A failure recorded already (another thread's,
        told the source) stands as it is."""
        before = self.total
        try:
            yield
        except Exception as exc:
            with self._lock:
                count, last = self.total - before, self.last
            if not count or last is None or failure.error is not None:
                raise
            error = as_migration_error(exc)
            note = f"; {refused_meanwhile(count, last)}"
            error.cause += note
            error.args = (f"{error.args[0]}{note}",)
            if error is exc:
                raise
            raise error from exc


def refused_meanwhile(count: int, last: str) -> str:
    """``count`` connections refused, the ``last`` one's "peer: reason", in words: a
    session's failure says so, and ``listen`` after each session."""
    if count == 1:
        return f"refused 1 connection meanwhile ({last})"
    return f"refused {count} connections meanwhile (the last: {last})"


class RefusalLog:
    """The log lines refused connections take, bounded in rate (a token bucket): up
    to REFUSAL_LOG_BURST at once, then one more every REFUSAL_LOG_EVERY seconds. A
    refusal past that is only counted, and a line says how many were not logged:
    before the next one that is, or at the end of a Destination if sooner. One for a
    listening socket, however many Destinations serve on it in turn: ``listen
    --forever`` makes one for each wait (``--timeout``) and each session, and each
    logged a thousand strangers afresh (a review). A thousand for the socket's whole
    life left a service silent after them: a wrong key days later was logged nowhere
    (another review)."""

    def __init__(self) -> None:
        self._allowance = float(REFUSAL_LOG_BURST)     # lines that may be logged now
        self._topped_up = time.monotonic()
        self._skipped = 0                   # refusals not logged since the last line
        self._skipped_since = 0.0           # when the first of them was refused
        self._lock = threading.Lock()

    def add(self, refusal: Refusal) -> None:
        # Logged under the lock: a summary comes just before the line it goes with.
        with self._lock:
            now = time.monotonic()
            self._allowance = min(float(REFUSAL_LOG_BURST), self._allowance
                                  + (now - self._topped_up) / REFUSAL_LOG_EVERY)
            self._topped_up = now
            if self._allowance < 1:
                if not self._skipped:
                    self._skipped_since = now
                self._skipped += 1
                return
            self._allowance -= 1
            self._say_skipped(now)
            log.warning("refused a connection from %s: %s", refusal.peer, refusal.reason)

    def say_skipped(self) -> None:
        """Log how many refusals were not logged, if any: at the end of a Destination
        (one line per wait or session, however many strangers came)."""
        with self._lock:
            self._say_skipped(time.monotonic())

    def _say_skipped(self, now: float) -> None:
        """(Under the lock.)"""
        if self._skipped:
            log.warning("%d refused connection(s) not logged in the last %.1f s",
                        self._skipped, now - self._skipped_since)
            self._skipped = 0


# The log of each listening socket given to a Destination (the caller's, which serves
# one Destination after another on it): gone with the socket.
_SOCKET_LOGS: weakref.WeakKeyDictionary[Listener, RefusalLog] = \
    weakref.WeakKeyDictionary()
_SOCKET_LOGS_LOCK = threading.Lock()


def refusal_log(listener: Listener | None) -> RefusalLog:
    """The refusal log of a Destination on ``listener``, a listening socket it was
    given: the one every Destination on that socket shares. None (the Destination
    listens on a socket of its own): a new one."""
    if listener is None:
        return RefusalLog()
    with _SOCKET_LOGS_LOCK:
        return _SOCKET_LOGS.setdefault(listener, RefusalLog())


def session_ended(why: BaseException | str) -> str:
    """The reason a connection still being greeted is dropped when the session ends."""
    # What stopped the program, in words: a Ctrl-C's KeyboardInterrupt has no text (it
    # was "dropped: the session ended: "), a SystemExit's is its code alone.
    if isinstance(why, BaseException) and not isinstance(why, Exception):
        why = stop_reason(why, "destination")
    return f"dropped: the session ended: {why}"


def refuse_waiting(listener: Listener, why: BaseException | str, plaintext: bool,
                   refuse: Refuse) -> None:
    """The session ended (``why``): refuse the connections waiting in ``listener``'s
    backlog, each told so if ``plaintext`` (see refuse_on_arrival), before the
    listener is shut down: its shutdown reset them, and a source waiting there read
    "Connection reset by peer ... (is a fastmfd listener there? ...)". Leaves the
    listener non-blocking: an acceptor in another thread (the admission's, the
    door's) that finds one taken here fails, not blocks (the session has failed)."""
    reason = session_ended(why)
    try:
        listener.setblocking(False)
        for _ in range(MAX_CANDIDATES):     # a flood of strangers is not waited out
            sock, peer = listener.accept()
            refuse_on_arrival(sock, reason, plaintext)
            refuse(describe_peer(peer), reason)
    except OSError:                         # BlockingIOError: none waits; or shut, closed
        pass


class Admission:
    """Greets the connections arriving on ``listener`` until one passes.

    ``refuse(peer, reason)`` is called for each connection dropped;
    ``failed()`` gives the session's failure, if any (a cancel shuts the
    listener down, after recording it). Use as a context manager: leaving stops
    the acceptor, ends every greeting still running and closes their
    connections (never the winner's).
    """

    def __init__(self, listener: Listener, security: ChannelSecurity,
                 refuse: Refuse, failed: Callable[[], BaseException | None]) -> None:
        self._listener, self._security, self._refuse = listener, security, refuse
        self._failed = failed
        # A greeting that passed; None: the wait was aborted; an error: the accept
        # loop's own failure, raised by the wait at once.
        self._passed: queue.Queue[MainGreeting | MigrationError | None] = queue.Queue()
        self._lock = threading.Lock()
        # Each greeting's connection (a descriptor of the table's own, its family and
        # type) and start, oldest first.
        self._greeting: dict[threading.Thread, tuple[int, int, int, float]] = {}
        self._evicted: set[threading.Thread] = set()    # ended for a newcomer, not yet gone
        self._closing = False
        self._ended: str | None = None      # why the wait ended: the first reason given
        self._wake_r, self._wake_w = os.pipe()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="fastmfd admission")
        try:
            start_thread(self._acceptor, "main channel")
        except MigrationError:          # the process limit: no __exit__ to close them
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise

    def wait(self, timeout: float, what: str) -> MainGreeting:
        """The first connection that passed its greeting, within ``timeout`` seconds."""
        try:
            greeting = self._passed.get(timeout=max(0.0, timeout))
        except queue.Empty:
            error = NoSourceError(f"no connection for {what} passed its greeting within "
                                  f"{timeout:g} s")
            self._end(session_ended(error))
            raise error from None
        if greeting is None:
            raise MigrationError("stopped waiting for the source")
        if isinstance(greeting, MigrationError):
            self._end(session_ended(greeting))
            raise greeting
        self._end(ACCEPTED_ANOTHER)
        return greeting

    def abort(self, why: BaseException | str) -> None:
        """Wake :meth:`wait` (any thread): the session failed, ``why``."""
        self._end(session_ended(why))
        self._passed.put(None)

    def _end(self, reason: str) -> None:
        """The wait ended: greetings still running are refused with ``reason``
        (the first one given: what ended it)."""
        with self._lock:
            if self._ended is None:
                self._ended = reason

    # ------------------------------------------------------------ threads
    def _accept_loop(self) -> None:
        waitables: list[Listener | int] = [self._listener, self._wake_r]
        while True:
            try:
                readable = select.select(waitables, [], [])[0]
                if self._wake_r in readable:
                    return
                sock, peer = self._listener.accept()
            except (OSError, ValueError):       # the listener was shut down or closed
                # By a cancel (which recorded why first) maybe before this admission
                # was the session's (its teardown found none to end): that is why.
                self.abort(self._failed() or "its listener was shut down")
                return
            thread = threading.Thread(target=self._greet, args=(sock, describe_peer(peer)),
                                      daemon=True, name="fastmfd greeting")
            with self._lock:
                crowded = not self._room()      # (_closing comes after this thread)
                if not crowded:
                    # A descriptor of the table's own: the greeting closes its
                    # socket before it leaves the table (a failed one), and its
                    # number, free, may be the next connection's (the source's).
                    self._greeting[thread] = (os.dup(sock.fileno()), sock.family,
                                              sock.type, time.monotonic())
            if crowded:
                refuse_on_arrival(sock, TOO_MANY, plaintext=self._security.tls is None)
                self._refuse(describe_peer(peer), TOO_MANY)
                continue
            try:
                start_thread(thread, "main channel")
            except MigrationError as exc:   # the process limit: no one could be greeted
                with self._lock:
                    os.close(self._greeting.pop(thread)[0])     # never ran: never joined
                refuse_on_arrival(sock, str(exc), plaintext=self._security.tls is None)
                self._passed.put(exc)   # the wait fails now, not at its timeout (an hour)
                return

    def _room(self) -> bool:
        """Whether one more may be greeted: under MAX_CANDIDATES, or the oldest
        greeting, past EVICT_AFTER, ended for it (its thread then refuses it,
        EVICTED). Under the lock."""
        running = [t for t in self._greeting if t not in self._evicted]
        if len(running) < MAX_CANDIDATES:
            return True
        oldest = running[0]
        if time.monotonic() - self._greeting[oldest][3] < EVICT_AFTER:
            return False
        self._evicted.add(oldest)
        _end_connection(*self._greeting[oldest][:3])
        return True

    def _greet(self, sock: socket.socket, peer: str) -> None:
        greeting: MainGreeting | None
        refusal: BaseException | str | None
        heard: list[str | None] = []    # why the wait ended, each time a failing greeting asked
        def ended() -> str | None:      # (None: the wait was on: refused for what it sent)
            heard.append(self._why_ended())
            return heard[-1]
        try:
            greeting, refusal = greet_main_channel(sock, self._security, ended), None
        except Exception as exc:                # never lose a candidate's thread silently
            greeting, refusal = None, exc if isinstance(exc, (MigrationError, ProtocolError)) \
                else f"{type(exc).__name__}: {exc}"
        passed = greeting
        with self._lock:                        # before any close: see __exit__
            os.close(self._greeting.pop(threading.current_thread())[0])
            if threading.current_thread() in self._evicted:
                # Evicted stays its reason though the admission closed before this
                # thread ran (a loaded host): the newcomer, not the end, dropped it.
                self._evicted.discard(threading.current_thread())
                greeting, refusal = None, EVICTED
            elif self._closing and not (refusal is not None and heard[-1:] == [None]):
                greeting, refusal = None, self._ended       # ended by __exit__, or too late
            if greeting is not None:
                self._passed.put(greeting)
        if refusal is not None:
            self._refuse(peer, refusal)
            # A greeting that failed closed a TLS-wrapped socket; one that passed
            # too late holds the connection in its own (TLS) socket, and its source,
            # whose SETUP_ACK never comes, hears why (__exit__ left it writable).
            if passed is not None:
                tell_why(passed.sock, refusal)
            (passed.sock if passed is not None else sock).close()

    def _why_ended(self) -> str | None:
        """Why the admission ended the greetings, once it has (see __exit__)."""
        with self._lock:
            return self._ended if self._closing else None

    # ------------------------------------------------------------ closing
    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        os.write(self._wake_w, b"x")
        self._acceptor.join()
        # Left without a wait's end: the session failed before (its teardown
        # aborted this already) or raised here.
        self._end(session_ended(exc if exc is not None else "stopped waiting for the source"))
        with self._lock:
            self._closing = True
            running = list(self._greeting)
            # End each greeting still running now (its thread then refuses it),
            # through the table's descriptor of its connection: its reads end, its
            # writes may go on, so that a source whose greeting passed meanwhile
            # is told why (shut down both ways, it read "connection closed").
            for fd, family, kind, _ in self._greeting.values():
                _end_connection(fd, family, kind, socket.SHUT_RD)
        deadline = time.monotonic() + CLOSING_GRACE
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:                        # held up writing (a peer that reads nothing)
            for fd, family, kind, _ in self._greeting.values():
                _end_connection(fd, family, kind)
        for thread in running:
            thread.join()
        while True:                             # passed too, but not the one taken
            try:
                greeting = self._passed.get_nowait()
            except queue.Empty:
                break
            if isinstance(greeting, MainGreeting):
                # A source whose greeting passed as the wait ended: no SETUP_ACK comes, so
                # it hears why (it read "connection reset" and a hint of no listener there).
                tell_why(greeting.sock, str(self._ended))
                greeting.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _end_connection(fd: int, family: int, kind: int, how: int = socket.SHUT_RDWR) -> None:
    """End a connection being greeted in another thread (which then refuses it),
    through the admission's own descriptor of it ``fd``: the greeting's socket
    object may have been wrapped for TLS meanwhile, or closed. ``how``: what of it
    ends (shutdown's SHUT_RD leaves the greeting's thread its writes)."""
    try:
        with socket.fromfd(fd, family, kind) as dup:
            dup.shutdown(how)
    except OSError:
        pass


class DoorParts(Protocol):
    """What the door takes of the destination's parts (receiving's DestinationParts)."""
    listener: Listener
    workers: ChildSet
    security: ChannelSecurity
    resources: SessionResources


class ChannelDoor:
    """After SETUP: hands each new connection on the listener to a free receive
    worker to greet (``parts``: the session's :class:`DestinationParts`;
    ``workers``: how many it may run; ``watch_worker(worker)`` starts watching a
    worker it adds)."""

    def __init__(self, parts: DoorParts, setup: Setup, workers: DoorWorkers, stall: float,
                 watch: Watch, watch_worker: Callable[[Child], None], refuse: Refuse,
                 started: Iterable[Child] = ()) -> None:
        self._parts, self._setup, self._stall, self._watch = parts, setup, stall, watch
        self._workers = workers
        self._watch_worker, self._refuse = watch_worker, refuse
        # worker -> its connection, the peer, and when its greeting began
        self._greeting: dict[Child, tuple[socket.socket, str, float]] = {}
        self._evicted: set[Child] = set()   # greetings ended for a newcomer
        self.turnover = 0                   # greetings ended: the door's progress
        self._started: set[Child] = set(started)    # workers already given a session (a
                                                    # Greeting, or Prealloc: a Greeting next)
        self._assigned: set[Child] = set()  # workers that became channels
        self._open = True
        watch.add(parts.listener, self._accept)

    def _free_worker(self) -> Child | None:
        busy = set(self._greeting) | self._assigned
        return next((w for w in self._parts.workers if w not in busy), None)

    def _at_most(self) -> bool:
        """Whether no more workers may start to greet."""
        return len(self._parts.workers) >= self._workers.at_most

    def _accept(self) -> None:
        workers = self._parts.workers
        worker = self._free_worker()
        if worker is None:
            if self._at_most():
                self._watch.remove(self._parts.listener)    # until a greeting ends
                self.make_room()
                return
            # During a session a worker's start has the session's deadline.
            worker = workers.add(recv_worker_main, f"receive channel {len(workers)}", self._stall)
            self._watch_worker(worker)
        sock, peer = self._parts.listener.accept()
        self._parts.resources.sockets.append(sock)
        self._greeting[worker] = (sock, describe_peer(peer), time.monotonic())
        greeting = Greeting(self._setup, self._parts.security)
        if worker in self._started:
            worker.send(greeting)
            worker.send_fds([sock.fileno()])
        else:
            self._started.add(worker)
            worker.start_session(greeting, [sock.fileno()])

    def greeted(self, worker: Child) -> socket.socket:
        """``worker``'s connection passed its greeting: it is the session's now."""
        sock = self._greeting.pop(worker)[0]
        self.turnover += 1
        self._evicted.discard(worker)
        self._assigned.add(worker)
        sock.settimeout(None)
        return sock

    def refused(self, worker: Child, reason: str) -> None:
        """``worker`` dropped its connection: refuse it; the worker is free again."""
        sock, peer, _ = self._greeting.pop(worker)
        self._parts.resources.sockets.remove(sock)
        sock.close()
        self.turnover += 1
        if worker in self._evicted:
            self._evicted.discard(worker)
            reason = DOOR_EVICTED
        self._refuse(peer, reason)
        if self._open:
            self._watch.add(self._parts.listener, self._accept)

    def make_room(self) -> None:
        """Every greeting worker busy and a connection waiting: end each greeting run
        for EVICT_AFTER (its worker then refuses it, and greets the next). Called as
        the listener fills, and on the session's watch (the listener is not watched
        meanwhile); a channel of the session greets in milliseconds."""
        if (not self._open or self._free_worker() is not None or not self._at_most()
                or not select.select([self._parts.listener], [], [], 0)[0]):
            return
        now = time.monotonic()
        for worker, (sock, _, since) in self._greeting.items():
            if now - since >= EVICT_AFTER and worker not in self._evicted:
                self._evicted.add(worker)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stopped_greeters(self) -> str:
        """Why a connection may not be a channel yet: the worker process handed it to
        greet is stopped (which connection is whose channel, its greeting says)."""
        pids = [str(w.process.pid) for w in self._greeting if process_stopped(w.process.pid)]
        return (f" (a connection waits for its greeting by a stopped worker process, pid "
                f"{', '.join(pids)})" if pids else "")

    def close(self) -> None:
        """Every channel is in: stop taking connections."""
        self._open = False
        self._watch.remove(self._parts.listener)
