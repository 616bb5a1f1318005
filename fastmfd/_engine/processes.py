"""Child processes: the one lifecycle of every process fastmfd starts (channel
workers, the reassembly process, benchmark peers) and the loop that watches them.

::

    main process                                   child (forkserver)
      Child(target, name) ───── start ─────────▶     run_child(conn, body):
      child.wait_ready()  ◀──── Ready ─────────        ignore SIGINT+HUP, die with parent
      child.start_session(params, fds) ────────▶        params = recv(); fds by SCM_RIGHTS
      Watch: reports and exits of every child           body(pipe, params, stack)
             ◀── Synced / Done / Eof / Loaded ...        close what ``stack`` holds
             ◀── Failed(text, traceback) ───────        on any failure, then exit(1)
      ChildSet.stop(): Stop, wait, kill, reap

A child that dies becomes a MigrationError with its exit status, never a hang (loky's
habit); its last reports are read before it is judged, so an error it reported is the one
raised, not "exited with status 1". The control pipe carries parameters once and reports
once per session or round (:mod:`fastmfd.protocol.control`), never per packet.

A child runs only fastmfd's code, so it never imports the caller's ``__main__`` as
multiprocessing's children do: a script without an ``if __name__ == "__main__":`` guard,
``python -``, a REPL or a notebook all work: what ``__main__`` defines goes on the control
pipe by value (:mod:`.control_pickling`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from multiprocessing import connection, forkserver, reduction
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import setproctitle

from .. import _core
from ..errors import MigrationError
from ..protocol.control import Done, Drained, Eof, Failed, Ready, Stop
from ..protocol.sockets import ListeningSockets, decrypted_unread
from ..threads import start_thread
from . import control_pickling
from .forkserver_start import (FORKSERVER_EXIT_WAIT, READY_TIMEOUT, ForkServerChild,
                               describe_exit, forkserver_ended_within, forkserver_failure,
                               forkserver_pid, leave_to_the_forkserver, mp_context,
                               stopped_forkserver)
from .liveness import process_stopped
from .oom_kills import oom_killed, oom_kills
from .open_files import check_room_for_child
from .session import Closable, as_migration_error, main_first

__all__ = ["Child", "ChildSet", "ChildPipe", "Watch", "RemoteTraceback", "mp_context",
           "run_child", "child_setup", "kill_all"]

_FINAL_REPORTS = (Done, Eof, Drained)   # after one of these a child's exit is expected
# The exit status multiprocessing gives a child whose forkserver could not report one:
# the forkserver ended (its children die with it: child_setup).
FORKSERVER_GONE = 255


ChildMain = Callable[[Connection], None]
"""A child's body: it runs with its end of the control pipe."""
_Report = TypeVar("_Report")

if TYPE_CHECKING:
    from multiprocessing.connection import _ConnectionBase
    # What Watch waits on: what multiprocessing.connection.wait takes and returns.
    Waitable = _ConnectionBase[Any, Any] | socket.socket | int | ListeningSockets


def process_title(name: str) -> tuple[str, str]:
    """A child's title in ``ps``/``/proc/PID/cmdline`` and its short name in
    ``top``/``/proc/PID/comm`` (the kernel keeps 15 bytes of it)."""
    short = name.replace("receive", "recv").replace("channel ", "").replace("reassembly", "reasm")
    return f"fastmfd: {name}", f"fastmfd {short}"[:15]


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a child process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.text}\"\"\""


# ------------------------------------------------------------------ main side

class Child:
    """One child process and the main process's end of its control pipe."""

    def __init__(self, ctx: multiprocessing.context.ForkServerContext, target: ChildMain,
                 name: str, timeout: float = READY_TIMEOUT) -> None:
        self.name = name
        check_room_for_child(name)
        if stopped_forkserver() is not None:    # said now, not at the deadline of its answer
            raise forkserver_failure(name)
        self.conn, theirs = ctx.Pipe(duplex=True)
        self.process = ForkServerChild(target=target, args=(theirs,), name=name, daemon=True)
        self.process.start_timeout = timeout
        try:
            self.process.start()
        finally:
            theirs.close()          # the child's now; not started, ours goes too
            if self.process.pid is None:
                self.conn.close()
        self.finished = False          # sent its final report: its exit is expected
        self._exitcode: int | None = None      # kept once the process object is closed
        self.closed = False
        self.gone = False              # its end of the pipe is closed: no more reports
        self._oom_kills = oom_kills()  # its cgroup's so far: whether one killed it (oom_killed)
        self.failed_locally = False    # it reported a failure of this host's own (Failed.local)
        self.peer_closed = False       # it reported its connection closed by its peer (ditto)
        self._partial = bytearray()    # a report read in part (see next_report)
        # Its owner's guess at what made it fail, added to the error (a source's
        # image that shrank under it: a SIGBUS, or EFAULT from the socket).
        self.explain_failure: Callable[[], str | None] | None = None

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    @property
    def exitcode(self) -> int | None:
        """The exit status (negative: killed by that signal), None while it runs."""
        return self._exitcode if self.closed else self.process.exitcode

    def close(self) -> None:
        """Free the pipe and the process object's descriptors (its sentinel and
        the forkserver's status pipe), which only the cyclic garbage collector
        would free otherwise. The process must have been reaped."""
        if self.closed:
            return
        self.conn.close()
        self._exitcode = self.process.exitcode
        if self._exitcode is not None:
            self.process.close()
            self.closed = True

    def next_report(self) -> Any | None:
        """The child's next report if one has arrived whole, else None (also once it is
        gone: then ``gone`` is set).

        Reports are read as their bytes come and never waited for: a child stopped (SIGSTOP)
        halfway through writing a long report (a device's collected state) held its reader
        in ``recv()`` for as long as it stayed stopped, and nothing else of the session was
        watched; now the part waits here for the rest while the session's deadlines run. A
        Failed report is raised as the child's MigrationError."""
        while (missing := self._missing()) and not self.gone:
            try:
                if not self.conn.poll():
                    return None
                data = os.read(self.conn.fileno(), min(missing, 1 << 20))
            except OSError:
                data = b""
            if not data:
                self.gone = True
            self._partial += data
        if missing:
            return None
        report = self._take_report()
        if isinstance(report, Failed):
            raise self.error_from(report)
        if isinstance(report, _FINAL_REPORTS):
            self.finished = True
        return report

    def _missing(self) -> int:
        """Bytes still to come of the report at the front of ``_partial`` (only those:
        the pipe stays readable while whole reports wait in it). multiprocessing's
        framing: a 4-byte length, -1 and an 8-byte one past 2 GiB, then the pickle."""
        buf = self._partial
        if len(buf) < 4:
            return 4 - len(buf)
        size: int
        size, = struct.unpack_from("!i", buf)
        start = 4
        if size == -1:
            if len(buf) < 12:
                return 12 - len(buf)
            size, = struct.unpack_from("!Q", buf, 4)
            start = 12
        return start + size - len(buf)

    def _take_report(self) -> Any:
        """The whole report in ``_partial``, unpickled; empties it."""
        start = 12 if struct.unpack_from("!i", self._partial)[0] == -1 else 4
        report = control_pickling.loads(self._partial[start:])
        self._partial = bytearray()
        return report

    def expect(self, kind: type[_Report], timeout: float) -> _Report:
        """Wait up to ``timeout`` for the next report, which must be a ``kind``."""
        deadline = time.monotonic() + timeout
        report = ready = None
        while report is None and not self.gone:
            ready = connection.wait([self.conn, self.sentinel],
                                    max(0.0, deadline - time.monotonic()))
            report = self.next_report() if ready else None
            if not ready or self.sentinel in ready:
                break
        if report is None:
            # Its pipe closed, it is exiting: its status comes from the forkserver, late
            # on a loaded machine (0.5 s said "no Ready report within 30 s" at once).
            self.process.join(max(0.5, deadline - time.monotonic()) if self.gone
                              else 0.5 if ready else 0)
            if self.exitcode is not None:
                raise self.death_error()
            raise MigrationError(f"no {kind.__name__} report within {timeout:g} s",
                                 channel=self.name)
        if not isinstance(report, kind):
            raise MigrationError(f"reported {type(report).__name__}, expected {kind.__name__}",
                                 channel=self.name)
        return report

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the child is up (so no start-up runs inside a timed migration)."""
        self.expect(Ready, timeout)

    def release(self) -> None:
        """Tell the child to exit (Stop): an idle one, or one past its final report, which
        keeps what it holds until told (see :mod:`.workers`). One already gone needs nothing."""
        try:
            self.conn.send(Stop())
        except OSError:
            pass

    def start_session(self, params: Any, fds: list[int]) -> None:
        """Send the session's parameters, then the file descriptors it needs."""
        self.send(params)
        self.send_fds(fds)

    def send(self, message: Any) -> None:
        try:
            self.conn.send_bytes(control_pickling.dumps(message))
        except OSError as exc:
            raise self.lost(exc) from None

    def send_fds(self, fds: list[int]) -> None:
        try:
            for fd in fds:
                reduction.send_handle(self.conn, fd, self.process.pid)
        except OSError as exc:
            raise self.lost(exc) from None

    def lost(self, exc: OSError) -> MigrationError:
        """A pipe to the child that broke (its control pipe, or one only it reads)
        means it is gone: say what became of it. Its exit may not be known yet (the
        forkserver reports it, late on a loaded machine), while the failure it
        reported before exiting already is, in its pipe."""
        reported = self.reported_failure()
        if reported is not None:
            return reported
        self.process.join(1)
        if self.exitcode is not None:
            return self.death_error()
        return MigrationError(f"cannot reach the process: {exc.strerror or exc}",
                              channel=self.name)

    def error_from(self, report: Failed) -> MigrationError:
        self.failed_locally, self.peer_closed = report.local, report.peer_closed
        error = MigrationError(report.text + self._explained(report.text), channel=self.name,
                               device=report.device)
        error.__cause__ = RemoteTraceback(report.traceback)
        return error

    def reported_failure(self) -> MigrationError | None:
        """The failure the child reported, if it waits in the pipe; asked on a failure's
        path only: the other reports read on the way are dropped."""
        try:
            while self.next_report() is not None:
                pass
        except MigrationError as reported:
            return reported
        return None

    def death_error(self) -> MigrationError:
        """The error of a child found dead: the failure it reported before it exited if
        that is still in the pipe (a child reports, then exits 1), else its exit."""
        reported = self.reported_failure()
        if reported is not None:
            return reported
        ended = (forkserver_ended_within(FORKSERVER_EXIT_WAIT)
                 if self.exitcode == FORKSERVER_GONE else None)
        if ended is not None:
            server, status = ended
            return MigrationError(f"the worker process ended with its parent, multiprocessing's "
                                 f"forkserver (pid {server}), which {describe_exit(status)}",
                                 channel=self.name)
        died = describe_exit(self.exitcode) + oom_killed(self.exitcode, self._oom_kills)
        return MigrationError(f"the worker process {died}{self._explained()}", channel=self.name)

    def _explained(self, said: str = "") -> str:
        why = self.explain_failure() if self.explain_failure is not None else None
        return f" ({why})" if why and why not in said else ""


class ChildSet:
    """Starts, holds and stops a group of children; the one owner that joins or
    kills every one of them on every exit path."""

    def __init__(self, target: ChildMain, names: list[str]) -> None:
        self._lock = threading.Lock()
        self.children: list[Child] = []
        try:
            ctx = mp_context()
            for name in names:
                self.children.append(Child(ctx, target, name))
            for child in self.children:
                child.wait_ready()
        except BaseException:
            self.kill()
            self._close()
            raise

    def __iter__(self) -> Iterator[Child]:
        return iter(self.children)

    def pids(self) -> list[int]:
        """The process ids of the children still running."""
        return [c.process.pid for c in self.children
                if c.process.pid is not None and c.process.exitcode is None]

    def __len__(self) -> int:
        return len(self.children)

    def __getitem__(self, index: int) -> Child:
        return self.children[index]

    def add(self, target: ChildMain, name: str, timeout: float = READY_TIMEOUT) -> Child:
        """Start one more child (during a session: ``timeout``, its deadline)."""
        child = self.spawn(target, name, timeout)
        child.wait_ready(timeout)
        return child

    def grow(self, target: ChildMain, count: int, prefix: str, timeout: float,
             between: Callable[[], None] = lambda: None) -> None:
        """Start children until there are ``count`` (named ``prefix`` and their index), all
        at once (one by one, a loaded host took ~50 ms a start), then wait for each within
        ``timeout`` of the one before; ``between()`` before each (a KEEPALIVE: 200 take 3 s)."""
        started = []
        for _ in range(len(self), count):
            between()
            started.append(self.spawn(target, f"{prefix} {len(self)}", timeout))
        for child in started:
            between()
            child.wait_ready(timeout)

    def spawn(self, target: ChildMain, name: str, timeout: float = READY_TIMEOUT) -> Child:
        """Start one more child without waiting for it: its first report is Ready."""
        child = Child(mp_context(), target, name, timeout)
        self.children.append(child)
        return child

    def stop(self, timeout: float = 2.0) -> None:
        """Tell idle children to exit, wait up to ``timeout`` for all of them (none
        when one is stopped: it cannot take its release), kill what is left, close
        the pipes."""
        alive = [child for child in self.children if child.exitcode is None]
        for child in alive:
            child.release()
        stopped = any(process_stopped(child.process.pid) for child in alive)
        deadline = time.monotonic() + (0.0 if stopped else timeout)
        # wait() returns at the first exit (and sleeps its whole timeout on an
        # empty list), so loop until every child is gone or time is up.
        while running := [c.sentinel for c in self.children if c.exitcode is None]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            connection.wait(running, left)
        self.kill()
        self._close()

    def _close(self) -> None:
        for child in self.children:
            child.close()

    def kill(self) -> None:
        """Kill every child still running and reap them all (any thread, idempotent)."""
        kill_all([self])


def kill_all(groups: list[ChildSet]) -> None:
    """Kill every child of ``groups`` still running and reap them all (any thread, idempotent)
    within one deadline: a stopped forkserver reports no exit, a blocked one none in time."""
    with contextlib.ExitStack() as held:
        for group in groups:
            held.enter_context(group._lock)
        children = [child for group in groups for child in group if not child.closed]
        for child in children:
            if child.process.exitcode is None:
                child.process.kill()
        deadline = time.monotonic() + (0 if stopped_forkserver() is not None else 5)
        for child in children:
            child.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if child.process.exitcode is None:
                leave_to_the_forkserver(child.process)


class Watch:
    """One wait over everything a main process serves: the main channel (read
    first, see :func:`~fastmfd._engine.session.main_first`), children's reports
    and exits, and any other waitable (a listener, a wake-up pipe).

    A handler's exception leaves :meth:`poll` as a MigrationError naming the
    channel it was registered with."""

    def __init__(self, main: socket.socket | None = None) -> None:
        self.main = main
        self._handlers: dict[Waitable, tuple[Callable[[], None], str | None]] = {}
        self._alarms: dict[object, tuple[float, Callable[[], None], str | None]] = {}

    def add(self, waitable: Waitable, handler: Callable[[], None],
            channel: str | None = None) -> None:
        self._handlers[waitable] = (handler, channel)

    def remove(self, waitable: Waitable) -> None:
        self._handlers.pop(waitable, None)

    def alarm(self, key: object, when: float, handler: Callable[[], None],
              channel: str | None = None) -> None:
        """Call ``handler`` once, in the first :meth:`poll` that ends at or after ``when``
        (monotonic), unless ``drop_alarm(key)`` came first: a wait for nothing to happen."""
        self._alarms[key] = (when, handler, channel)

    def drop_alarm(self, key: object) -> None:
        self._alarms.pop(key, None)

    def add_child(self, child: Child, on_report: Callable[[Any], None]) -> None:
        """Call ``on_report(report)`` for each report; a child that exits before
        its final report (Done, Eof, Drained) fails with its exit status."""
        def readable() -> None:
            report = child.next_report()
            if report is not None:
                on_report(report)
            elif child.gone:
                self.remove(child.conn)     # nothing more will come

        def exited() -> None:
            self.remove(child.sentinel)
            while (report := child.next_report()) is not None:   # its last words first
                on_report(report)
            if not child.finished:
                raise child.death_error()

        self.add(child.conn, readable)
        self.add(child.sentinel, exited)

    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` and handle whatever is ready."""
        # What TLS decrypted waits in the SSL object, not in the socket: a record
        # that held two messages leaves the second where no wait sees it.
        decrypted = [item for item in self._handlers
                     if isinstance(item, socket.socket) and decrypted_unread(item)]
        if self._alarms:
            soonest = min(when for when, _, _ in self._alarms.values()) - time.monotonic()
            timeout = max(0.0, soonest if timeout is None else min(timeout, soonest))
        waiting: list[Any] = list(self._handlers)   # (it takes any fileno(); its stub: 3 types)
        ready = connection.wait(waiting, 0 if decrypted else timeout)
        ready = list(dict.fromkeys([*decrypted, *ready]))
        for item in main_first(ready, self.main):
            if item in self._handlers:      # (not removed by an earlier handler)
                self._call(*self._handlers[item])
        for key, (when, handler, channel) in list(self._alarms.items()):
            if when <= time.monotonic() and self._alarms.pop(key, None) is not None:
                self._call(handler, channel)

    @staticmethod
    def _call(handler: Callable[[], None], channel: str | None) -> None:
        try:
            handler()
        except Exception as exc:
            raise as_migration_error(exc, channel)


# ------------------------------------------------------------------ child side

class ChildPipe:
    """The child's end of its control pipe. Several threads may report (the
    reassembly's reader and loaders), so each whole message goes out under one
    lock: two writers interleave their bytes on a pipe and break its framing."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, report: Any) -> None:
        data = control_pickling.dumps(report)
        with self._lock:
            self.conn.send_bytes(data)

    def recv(self) -> Any:
        return control_pickling.loads(self.conn.recv_bytes())

    def recv_fd(self) -> int:
        return reduction.recv_handle(self.conn)

    def report_failure(self, exc: BaseException) -> None:
        """Report ``exc`` (call it where ``exc`` is handled: its traceback goes too)."""
        try:
            self.send(Failed.of(exc, traceback.format_exc()))
        except OSError:
            pass


def child_setup() -> None:
    """First thing in a child: take its title ("fastmfd: receive channel 1" in ``ps``),
    ignore Ctrl-C and a hangup, which reach a terminal's whole process group (the main
    process tears down), and die at once with whichever parent dies.

    A child's OS parent is the forkserver, its owner the main process:
    - the kernel kills it when the forkserver exits (PR_SET_PDEATHSIG); if that came first,
      it exits (re-parented to init, or to a subreaper such as systemd --user: not pid 1);
    - a watchdog thread kills it when the main process ends: multiprocessing keeps the write
      end of a pipe in the main process for each child (the "parent sentinel"), which reads
      end of file once the main process is gone;
    - it lets go of the forkserver's "alive" pipe, which every child inherits and which keeps
      the forkserver running while any holder lives: with it, a SIGKILLed main process left
      the forkserver and a worker blocked on a silent channel running, and the session's
      /dev/shm segments in place (the resource tracker unlinks those its owner could not
      once the whole tree is gone: :mod:`fastmfd.shm`).
    """
    os_parent = forkserver_pid() or os.getppid()       # noted before the prctl
    title, short = process_title(multiprocessing.current_process().name)
    setproctitle.setproctitle(title)
    setproctitle.setthreadtitle(short)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _core.die_with_parent()
    server = forkserver._forkserver
    # CPython's private "alive" descriptor, not in typeshed:
    alive: int | None = server._forkserver_alive_fd  # type: ignore[attr-defined]
    if alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]
    sentinel = getattr(multiprocessing.parent_process(), "sentinel", None)
    if sentinel is not None:
        start_thread(threading.Thread(target=_die_with_parent, args=(sentinel,), daemon=True,
                                      name="fastmfd parent watchdog"))
    if os.getppid() != os_parent:
        os._exit(1)


def _die_with_parent(sentinel: int) -> None:
    """Watchdog thread: block until the main process is gone, then die with it."""
    try:
        select.select([sentinel], [], [])
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def close_all(stack: list[Closable]) -> None:
    """Close what a child attached, newest first, whatever fails."""
    for item in reversed(stack):
        with contextlib.suppress(Exception):
            item.close()


def run_child(conn: Connection, body: Callable[[ChildPipe, Any, list[Closable]], None]) -> None:
    """A child's life: report Ready, take one session's parameters, run
    ``body(pipe, params, stack)``, close what it attached (``stack``), report
    Failed and exit 1 on failure. Told Stop instead of parameters, it exits; so
    it does, quietly, when its owner is gone before that (its end of the pipe
    closed: the owner was collected, or its process ended, without a Stop)."""
    pipe = ChildPipe(conn)
    try:
        child_setup()
    except MigrationError as exc:   # no thread for its watchdog: said, not "exited with 1"
        pipe.report_failure(exc)
        sys.exit(1)
    try:
        pipe.send(Ready())
        params = pipe.recv()
    except (EOFError, OSError):
        return
    if isinstance(params, Stop):
        return
    stack: list[Closable] = []
    failed = False
    try:
        body(pipe, params, stack)
    except BaseException as exc:
        pipe.report_failure(exc)
        failed = True
    finally:
        close_all(stack)
    if failed:
        sys.exit(1)
