"""What the source and the destination share: one failure for the whole
session, and the resources a session owns.

First error wins (QEMU's ``multifd_send_terminate_threads``): the first
failure reported — by a worker, the peer, a device or the main thread — is
stored once; every later one is dropped. Failing runs the session's
teardown callbacks, which wake every waiter (aborting the shared selector
and pool), tell the peer why and shut the sockets down so blocked I/O
returns; whoever waits then raises the stored error, but only once the
teardown is over: raising lets the owner close the sockets, and the peer
must have been told first.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import socket
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Callable, NoReturn, Protocol, Self, TypeVar

from .. import _core
from ..errors import Aborted, ConfigError, FastMFDError, MigrationError, OutputError
from ..protocol.main_channel import MainChannel
from ..shm import check_usable
from ..threads import start_thread

__all__ = ["SessionFailure", "SessionResources", "Owner", "break_session", "call_hook", "main_first",
           "as_migration_error"]


TEARDOWN_TIMEOUT = 10.0     # seconds a waiter gives a failure's teardown (_torn_down)


class SessionFailure:
    """The first error of a session, and the teardown it triggers.

    The teardown runs in the thread that failed first, often not the session's
    own (``cancel()`` from the user's thread, the monitor, a device's save
    thread); its first steps wake the session's thread. ``fail()`` and
    ``check()`` give the error back only once the teardown is over: the
    session's thread, woken and raising, lets its owner close the main channel,
    and a cancel's ERROR not written by then never reached the peer (1 cancel
    in 5)."""

    def __init__(self, side: str) -> None:
        self.side = side
        self._lock = threading.Lock()
        self._error: MigrationError | None = None
        self._on_failure: list[Callable[[MigrationError], None]] = []
        self.event = threading.Event()          # set once failed and torn down

    def on_failure(self, callback: Callable[[MigrationError], None]) -> None:
        """Run ``callback(error)`` at the first failure, in the thread that failed;
        it must not call fail() or check() (they wait for the teardown it is part of)."""
        self._on_failure.append(callback)

    @property
    def error(self) -> MigrationError | None:
        """The first error, from the moment it is recorded (its teardown may still run)."""
        return self._error

    def fail(self, exc: BaseException, channel: str | None = None) -> MigrationError:
        """Record ``exc`` as the session's failure unless one is recorded already,
        and return the first error once its teardown is over."""
        error = as_migration_error(exc, channel)
        with self._lock:
            first = self._error
            if first is None:
                self._error = error
        if first is not None:
            self._torn_down()
            return first
        try:
            for callback in self._on_failure:
                try:
                    callback(error)
                except Exception:
                    pass
        finally:            # a KeyboardInterrupt in a callback must not leave waiters blocked
            self.event.set()
        return error

    def _torn_down(self) -> None:
        """Wait for the first failure's teardown, within TEARDOWN_TIMEOUT: it is
        bounded (its ERROR within 2 s, aborts and shutdowns), and were a callback
        ever to wait on this thread, the error is raised anyway, not never."""
        self.event.wait(TEARDOWN_TIMEOUT)

    def check(self) -> None:
        """Raise the session's failure if there is one (once its teardown is over)."""
        if self._error is not None:
            self._torn_down()
            raise self._error

    def raise_for(self, exc: BaseException, channel: str | None = None) -> NoReturn:
        """Fail with ``exc`` (an Aborted wait defers to the real cause) and raise the
        session's error. Its ``__cause__`` is what made it (set by as_migration_error,
        or a worker's RemoteTraceback): ``raise ... from exc`` would overwrite that,
        with the error itself when ``exc`` already is the MigrationError."""
        if isinstance(exc, Aborted) and self._error is not None:
            self._torn_down()
            raise self._error from None
        raise self.fail(exc, channel)


_Ready = TypeVar("_Ready")


def main_first(ready: list[_Ready], main: object) -> list[_Ready]:
    """``ready`` (from connection.wait, in registration order) with the main channel
    first. A failing peer sends its ERROR before it shuts its sockets down, so when
    one of our channels breaks because of that shutdown, the ERROR is already
    readable: reading it first makes the cause, not its consequence (a broken
    pipe), the session's first error."""
    return sorted(ready, key=lambda item: item is not main)


Hook = Callable[[], object]
"""A user's hook (``on_stop``, ``on_resume``): called with nothing, its result unused."""


def call_hook(name: str, hook: Hook | None) -> None:
    """Run the user's ``hook`` (if any); what it raises becomes a MigrationError
    naming the hook, with the original exception as its cause. An OutputError
    passes as it is: it names the file a listener's own hook could not commit."""
    if hook is None:
        return
    try:
        hook()
    except OutputError:
        raise
    except Exception as exc:
        raise MigrationError(f"the {name} hook raised {type(exc).__name__}: {exc}") from exc


_Result = TypeVar("_Result")


def call_user(name: str, call: Callable[..., _Result], *args: object) -> _Result:
    """``call(*args)``, the user's code that ``name`` says (``"the on_setup hook"``):
    what it raises that is no fastmfd error becomes a MigrationError naming it, as
    :func:`call_hook`'s do (it was "ValueError: ...", which said neither side where it
    came from); a FastMFDError passes, a refusal in its own words, and so does an
    OSError said with its file (a listener's factory: "X.part: No space left ..."). One
    of no file is named too: the user's ``OSError(ENOSPC, ...)`` was said bare, "the
    peer failed: No space left on device", neither side naming the hook."""
    try:
        return call(*args)
    except FastMFDError:
        raise
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise MigrationError(f"{name} raised {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise MigrationError(f"{name} raised {type(exc).__name__}: {exc}") from exc


def as_migration_error(exc: BaseException, channel: str | None = None) -> MigrationError:
    if isinstance(exc, MigrationError):
        return exc
    if isinstance(exc, FastMFDError):
        error = MigrationError(str(exc), channel=channel)
    elif isinstance(exc, OSError):
        # The file is said: "Read-only file system" alone named nothing
        where = f"{exc.filename}: " if exc.filename is not None else ""
        error = MigrationError(f"{where}{exc.strerror or exc}", channel=channel)
    else:
        error = MigrationError(f"{type(exc).__name__}: {exc}", channel=channel)
    error.__cause__ = exc
    return error


def shutdown_quietly(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Break any I/O blocked on ``sock`` (reading, writing or ``how``), in this
    process or another sharing it."""
    try:
        sock.shutdown(how)
    except OSError:
        pass


class Closable(Protocol):
    def close(self) -> None: ...


Owned = TypeVar("Owned", bound=Closable)


class Stoppable(Protocol):
    def stop(self) -> None: ...


Processes = TypeVar("Processes", bound=Stoppable)


class SessionResources:
    """What one side of a session owns: its child processes, its session (whose
    ``close()`` stops the threads that watch them), the data sockets (the main
    process keeps a copy of each, so shutting them down breaks a worker's
    blocked I/O), pipe file descriptors, and the shared structures it created.
    ``stop()`` then ``release()`` free them all, on every exit path. Nothing here
    refers to the owner, so its finalizer can free them too (:class:`Owner`): the
    session, which may (through a hook, or a failure's traceback), is held weakly;
    its owner keeps it, and so does its monitor thread while it runs."""

    def __init__(self) -> None:
        self._session: weakref.ref[Closable] | None = None
        self.sockets: list[socket.socket] = []
        self.fds: list[int] = []
        self._processes: list[Stoppable] = []
        self._owned: list[Closable] = []

    def own(self, resource: Owned) -> Owned:
        """Close ``resource`` (a Region, a shared structure) at release; returns it."""
        self._owned.append(resource)
        return resource

    def own_session(self, session: Owned) -> Owned:
        """Close ``session`` at stop() if it is still alive; returns it."""
        self._session = weakref.ref(session)
        return session

    def _live_session(self) -> Closable | None:
        return self._session() if self._session is not None else None

    def own_processes(self, processes: Processes) -> Processes:
        """Stop ``processes`` (a ChildSet) at stop(); returns it."""
        self._processes.append(processes)
        return processes

    def holds_any(self) -> bool:
        return self._live_session() is not None or bool(self.sockets or self.fds or self._processes
                                                 or self._owned)

    def shutdown_sockets(self) -> None:
        for sock in self.sockets:
            shutdown_quietly(sock)

    def stop(self) -> None:
        """Stop the session's threads, break its blocked I/O, then stop every
        process (idempotent)."""
        session = self._live_session()
        try:
            if session is not None:
                session.close()
        finally:            # a close that failed half way: the rest is freed all the same
            self.shutdown_sockets()
            for processes in self._processes:
                processes.stop()
            self._processes = []

    def release(self) -> None:
        """Close every socket, descriptor and owned structure (idempotent; after stop()):
        each one, even when closing another raised (the listener would stay open),
        then raise the first such error."""
        self._session = None
        closes: list[Callable[[], object]] = [sock.close for sock in self.sockets]
        closes += [functools.partial(os.close, fd) for fd in self.fds]
        closes += [resource.close for resource in reversed(self._owned)]
        self.sockets, self.fds, self._owned = [], [], []
        first: BaseException | None = None
        for close in closes:
            try:
                close()
            except BufferError:     # a structure's view is still out: its name is unlinked
                pass
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first


def break_session(error: MigrationError, peer: str, main: MainChannel | None,
                  resources: SessionResources) -> None:
    """The common part of a side's teardown: tell the peer why (unless the error is
    the peer's own), then break every blocked read and write on the session's sockets."""
    if main is not None and error.side != peer:
        main.send_error(error)
    resources.shutdown_sockets()
    if main is not None:
        main.shutdown()


CLOSE_WAIT = 10.0    # seconds close() waits for a cancelled migrate()/receive() to leave


class Owner:
    """A context manager that starts what it owns on entry (``_start()``), once:
    entering it again, inside its ``with`` or after, or once closed, is refused (a
    second set of processes would replace the first, which close() would then miss;
    a closed one's would run unused). A failure while starting, or leaving, calls
    ``close()``, which must free whatever was started, however far ``_start`` got.

    What it owns is in ``self._resources``, which refers to no owner: an owner
    collected without ``close()`` (dropped, or lost on an exception path) has
    them freed by its finalizer then, with a ResourceWarning as an unclosed file
    gives, and one alive at the interpreter's exit at that exit (as is one that
    a hook it was given refers to).

    The owner's one session call (``migrate()``, ``receive()``) runs inside
    ``self._running()``, which claims it: a second call, or one after
    ``close()`` began, is a ConfigError. Claiming and closing take one lock,
    so a call from one thread and ``close()`` from another, at the same
    moment, are ordered: the call is refused, or ``close()`` sees it and
    first cancels it and waits for it to leave (:meth:`_stop_running_call`),
    so nothing is freed under a thread still using it. Then ``close()``
    frees (``_release()``) under another lock: the calling thread's own
    ``close()`` (leaving its ``with``) may come at the same time. A
    ``close()`` from a hook of the call, on the call's own thread, cannot
    wait for it: it cancels the call, which frees everything as it leaves.
    ``_start()`` runs under that lock too: a ``close()`` meanwhile waits for
    what it makes, then frees it all, and entering fails.

    What it owns is its maker's process's: in a child forked from that process
    (``os.fork()``, multiprocessing's 'fork'), which may leave the ``with`` it
    inherited, ``close()`` frees none of it, and entering it or its session call
    is a ConfigError. The parent's session runs on, its workers untouched."""

    _call_thread: int | None = None
    _call_left: threading.Event | None = None
    _entered = False

    def __init__(self) -> None:
        check_usable()      # before a listener listens: it would fail only at SETUP
        self._releasing = threading.Lock()
        self._claiming = threading.Lock()   # the session call against a second one, and close()
        self._called = False
        self._closed = False
        self._resources = SessionResources()
        self._pid = os.getpid()
        weakref.finalize(self, _free_unclosed, type(self).__name__, self._resources, self._pid)

    @contextlib.contextmanager
    def _running(self, once: str) -> Iterator[None]:
        """Run the session call, claimed; ``once``: the ConfigError of a second one."""
        with self._claiming:
            self._check_usable()
            if self._called:
                raise ConfigError(once)
            self._called = True
            self._call_left = left = threading.Event()
            self._call_thread = threading.get_ident()
        try:
            yield
        finally:
            self._call_thread = None
            try:
                # Closed meanwhile: from a hook of this call, which left the freeing to
                # it (see close()), or from another thread, which waits for it to leave.
                if self._closed:
                    with self._releasing:
                        self._release()
            finally:
                left.set()

    def _check_own_process(self) -> None:
        """In a child forked from its maker's process nothing of it is used or
        stopped: it is the parent's (a cancel() there shut the parent's listener
        and sockets down under its running session)."""
        if os.getpid() != self._pid:
            name = type(self).__name__
            raise ConfigError(f"this {name} belongs to process {self._pid}, which this process "
                              f"was forked from: make a new {name} here")

    def _check_usable(self) -> None:
        """A closed owner is used no more: not entered again (which would start its
        processes again), nor its session call made; nor is one in a forked child."""
        self._check_own_process()
        if self._closed:
            raise ConfigError(f"this {type(self).__name__} was closed: make a new one")

    def _stop_running_call(self) -> bool:
        """Cancel a running session call; whether it runs on this thread (a hook of it
        called close()), which still uses what it is to free: it then frees it all
        as it leaves (:meth:`_running`)."""
        with self._claiming:
            self._closed = True             # no session call starts from now on
            thread, left = self._call_thread, self._call_left
        if thread is None:
            return False
        name = type(self).__name__
        if thread == threading.get_ident():
            self.cancel(f"the {name} was closed from a hook during the migration")
            return True
        self.cancel(f"the {name} was closed")
        assert left is not None, "set with _call_thread"
        left.wait(CLOSE_WAIT)
        return False

    def cancel(self, reason: str = "cancelled") -> None:
        raise NotImplementedError

    def _start(self) -> None:
        """What entering starts (the workers of a Source, a Destination); nothing
        for an owner whose parts started when it was made (a QemuReceiver, a
        QemuSender)."""

    def close(self) -> None:
        """Free everything (idempotent, any thread); from another thread while the
        session call runs, cancel it first and wait for it to leave; from a hook of
        that call, cancel it and return: the call frees everything as it leaves."""
        if os.getpid() != self._pid:
            self._closed = True         # the parent's, which its session may be using
            return
        if self._stop_running_call():
            return
        with self._releasing:
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        name = type(self).__name__
        if self._entered:
            raise ConfigError(f"this {name} was entered already: a {name} is entered once, "
                              f"by one `with`; make a new one")
        self._check_usable()
        self._entered = True
        try:
            # A close() from another thread meanwhile waits for what _start() makes,
            # then frees it all: entering then fails, or it would hand out a closed owner.
            with self._releasing:
                self._start()
            self._check_usable()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # Where it is in its life (read without a lock: a repr waits for nothing). One
        # whose __init__ failed half way, even before Owner's (a type check), is "not
        # made": a traceback's locals (capture_locals) repr it, and an AttributeError
        # here ended the report of the error that failed it.
        try:
            state = ("closed" if self._closed else "running" if self._call_thread is not None
                     else "done" if self._called else "open" if self._entered
                     else "not entered")
            described = self._described()
        except AttributeError:
            return f"<{type(self).__name__} (not made)>"
        return f"<{type(self).__name__} {described}: {state}>"

    def _described(self) -> str:
        """Its own words in its repr: the address, what it holds."""
        return ""


def _free_unclosed(owner: str, resources: SessionResources, pid: int) -> None:
    """An Owner's finalizer: free what it still holds (nothing, once closed). In a
    child forked from its process (which runs finalizers at its exit too) it does
    nothing: the sockets, processes and segments are the parent's.

    A cyclic collection runs it in whichever thread the collection interrupted,
    wherever that thread was: inside multiprocessing's resource tracker (which
    then refuses the segments' unregistering as a reentrant call), or in a
    session's thread that would wait for the workers to stop. Then it frees
    from a thread of its own, which the interpreter's exit waits for."""
    if os.getpid() != pid:
        return
    if not resources.holds_any():
        return
    warnings.warn(f"unclosed fastmfd.{owner}: its processes, sockets and shared memory are "
                  f"freed now; close() it, or use it in a `with`", ResourceWarning)
    if _core.collecting():
        start_thread(threading.Thread(target=_free, args=(resources,),
                                      name=f"fastmfd unclosed {owner}"))
    else:
        _free(resources)


def _free(resources: SessionResources) -> None:
    try:
        resources.stop()
    finally:
        resources.release()


gc.callbacks.append(_core.note_collection)      # compiled: see there why
