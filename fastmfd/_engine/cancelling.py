"""A cancel, from another thread, of a session whose thread waits in a
:class:`~fastmfd._engine.processes.Watch` (a QEMU migration's receive): it is
raised there, at that thread's next wait, which it ends at once. Every wait of
such a session is the watch's, so nothing it does is freed or closed under it:
it fails, and its own error path closes its connections (QEMU's migration
fails with them) and removes its files.

First error wins, as a Source's SessionFailure orders a cancel and a failure:
the session's failure that came before the cancel is what it raises; what it
raises after the cancel (a wait on a descriptor its owner's freeing closed) is
the cancel's consequence (:meth:`WatchCancel.first`)."""

from __future__ import annotations

import socket
import threading

from ..errors import MigrationError
from .processes import Watch

__all__ = ["WatchCancel", "FirstError"]


class FirstError:
    """The first of a cancel and a session's own failure: what the session call
    raises (first error wins, as a SessionFailure orders them for a Source and a
    Destination)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cancelled: MigrationError | None = None    # the first cancel's error
        self._first: Exception | None = None

    def cancel(self, reason: str) -> MigrationError:
        """Record a cancel (of two at once, one: its error is what both raise)."""
        with self._lock:
            if self.cancelled is None:
                self.cancelled = MigrationError(reason)
            if self._first is None:
                self._first = self.cancelled
            return self.cancelled

    def record(self, exc: Exception) -> Exception:
        """Record ``exc`` unless a cancel or failure came first; the first."""
        with self._lock:
            if self._first is None:
                self._first = exc
            return self._first


class WatchCancel:
    """``cancel(reason)`` from any thread; the thread polling ``watch`` raises
    MigrationError(reason) (the first reason given) from then on."""

    def __init__(self, watch: Watch) -> None:
        self._wake, self._waker = socket.socketpair()
        self._order = FirstError()
        watch.add(self._wake, self._raise)

    def cancel(self, reason: str) -> None:
        self._order.cancel(reason)
        try:
            self._waker.send(b"\0", socket.MSG_DONTWAIT)
        except OSError:         # closed (the session is over), or woken already
            pass

    @property
    def error(self) -> MigrationError | None:
        """The cancel's error, once cancelled."""
        return self._order.cancelled

    def check(self) -> None:
        """Raise the cancel's error, if cancelled (for a step that does not wait)."""
        if self.error is not None:
            raise self.error

    def first(self, exc: Exception) -> Exception:
        """``exc``, the session's failure, unless the cancel came first: then the
        cancel's error (``exc`` most likely its doing)."""
        return self._order.record(exc)

    def _raise(self) -> None:
        assert self.error is not None, "readable once cancelled, or closed"
        raise self.error

    def close(self) -> None:
        """Its session's thread may still wait (its owner freed at the interpreter's
        exit, under a daemon thread running the call): it fails, saying so."""
        self.cancel("freed while the migration ran (its owner was collected, or the "
                    "interpreter is exiting)")
        self._wake.close()
        self._waker.close()
