"""What the source and the destination share: one failure for the whole
session, and the main channel's send side.

First error wins (QEMU's ``multifd_send_terminate_threads``): the first
failure reported — by a worker, the peer, a device or the main thread — is
stored once; every later one is dropped. Failing runs the session's
teardown callbacks, which wake every waiter (aborting the shared selector
and pool) and shut the sockets down so blocked I/O returns; whoever waits
then raises the stored error.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable

from ..protocol.channels import MAIN, send_all
from ..errors import Aborted, FastMFDError, MigrationError
from ..protocol.main_channel import MESSAGE_HEADER, Msg, encode_message

__all__ = ["SessionFailure", "MainChannel", "call_hook", "main_first"]


class SessionFailure:
    """The first error of a session, and the teardown it triggers."""

    def __init__(self, side: str) -> None:
        self.side = side
        self._lock = threading.Lock()
        self._error: MigrationError | None = None
        self._on_failure: list[Callable[[MigrationError], None]] = []
        self.event = threading.Event()          # set once failed

    def on_failure(self, callback: Callable[[MigrationError], None]) -> None:
        self._on_failure.append(callback)

    @property
    def error(self) -> MigrationError | None:
        return self._error

    def fail(self, exc: BaseException, channel: str | None = None) -> MigrationError:
        """Record ``exc`` as the session's failure unless one is recorded already."""
        error = as_migration_error(exc, channel)
        with self._lock:
            if self._error is not None:
                return self._error
            self._error = error
        self.event.set()
        for callback in self._on_failure:
            try:
                callback(error)
            except Exception:
                pass
        return error

    def check(self) -> None:
        """Raise the session's failure if there is one."""
        if self._error is not None:
            raise self._error

    def raise_for(self, exc: BaseException, channel: str | None = None) -> None:
        """Fail with ``exc`` (an Aborted wait defers to the real cause) and raise the
        session's error. Its ``__cause__`` is what made it (set by as_migration_error,
        or a worker's RemoteTraceback): ``raise ... from exc`` would overwrite that,
        with the error itself when ``exc`` already is the MigrationError."""
        if isinstance(exc, Aborted) and self._error is not None:
            raise self._error from None
        raise self.fail(exc, channel)


def main_first(ready: list, main) -> list:
    """``ready`` (from connection.wait, in registration order) with the main channel
    first. A failing peer sends its ERROR before it shuts its sockets down, so when
    one of our channels breaks because of that shutdown, the ERROR is already
    readable: reading it first makes the cause, not its consequence (a broken
    pipe), the session's first error."""
    return sorted(ready, key=lambda item: item is not main)


def call_hook(name: str, hook) -> None:
    """Run the user's ``hook`` (if any); what it raises becomes a MigrationError
    naming the hook, with the original exception as its cause."""
    if hook is None:
        return
    try:
        hook()
    except Exception as exc:
        raise MigrationError(f"the {name} hook raised {type(exc).__name__}: {exc}") from exc


def as_migration_error(exc: BaseException, channel: str | None = None) -> MigrationError:
    if isinstance(exc, MigrationError):
        return exc
    if isinstance(exc, FastMFDError):
        error = MigrationError(str(exc), channel=channel)
    elif isinstance(exc, OSError):
        error = MigrationError(f"{exc.strerror or exc}", channel=channel)
    else:
        error = MigrationError(f"{type(exc).__name__}: {exc}", channel=channel)
    error.__cause__ = exc
    return error


class MainChannel:
    """The main channel's socket; sends are serialized (several threads send)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self.bytes_sent = 0

    def send(self, kind: Msg, payload: dict | bytes | None = None) -> None:
        data = encode_message(kind, payload)
        with self._lock:
            send_all(self.sock, data, kind.name, MAIN)
            self.bytes_sent += len(data)

    def send_parts(self, kind: Msg, parts: list) -> None:
        """A binary message whose payload is several buffers (device chunks, old way)."""
        length = sum(len(part) for part in parts)
        with self._lock:
            send_all(self.sock, MESSAGE_HEADER.pack(int(kind), length), kind.name, MAIN)
            for part in parts:
                send_all(self.sock, part, kind.name, MAIN)
            self.bytes_sent += MESSAGE_HEADER.size + length

    def send_error(self, error: BaseException) -> None:
        """Best effort: tell the peer why the session failed."""
        try:
            self.sock.settimeout(1.0)
            self.send(Msg.ERROR, {"error": str(error)})
        except Exception:
            pass

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def shutdown_quietly(sock: socket.socket) -> None:
    """Break any I/O blocked on ``sock``, in this process or another sharing it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class SessionResources:
    """What one side of a session owns besides its processes: the data
    sockets (the main process keeps a copy of each, so shutting them down
    breaks a worker's blocked I/O), pipe file descriptors, and the shared
    structures it created. ``release()`` frees them all, on every exit path."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.fds: list[int] = []
        self._owned: list = []

    def own(self, resource):
        """Close ``resource`` (a Region, a shared structure) at release; returns it."""
        self._owned.append(resource)
        return resource

    def shutdown_sockets(self) -> None:
        for sock in self.sockets:
            shutdown_quietly(sock)

    def release(self) -> None:
        """Close every socket, descriptor and owned structure (idempotent)."""
        for sock in self.sockets:
            sock.close()
        for fd in self.fds:
            os.close(fd)
        self.sockets, self.fds = [], []
        for resource in reversed(self._owned):
            try:
                resource.close()
            except BufferError:     # a view is still out: the name is unlinked anyway
                pass
        self._owned = []
