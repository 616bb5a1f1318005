"""A cancel, from another thread, of a session whose thread waits in a
:class:`~fastmfd._engine.processes.Watch` (a QEMU migration's receive): it is
raised there, at that thread's next wait, which it ends at once. Every wait of
such a session is the watch's, so nothing it does is freed or closed under it:
it fails, and its own error path closes its connections (QEMU's migration
fails with them) and removes its files."""

from __future__ import annotations

import socket

from ..errors import MigrationError
from .processes import Watch

__all__ = ["WatchCancel"]


class WatchCancel:
    """``cancel(reason)`` from any thread; the thread polling ``watch`` raises
    MigrationError(reason) (the first reason given) from then on."""

    def __init__(self, watch: Watch) -> None:
        self._wake, self._waker = socket.socketpair()
        self.error: MigrationError | None = None
        watch.add(self._wake, self._raise)

    def cancel(self, reason: str) -> None:
        if self.error is None:
            self.error = MigrationError(reason)
        try:
            self._waker.send(b"\0", socket.MSG_DONTWAIT)
        except OSError:         # closed (the session is over), or woken already
            pass

    def _raise(self) -> None:
        assert self.error is not None, "readable once cancelled, or closed"
        raise self.error

    def close(self) -> None:
        """Its session's thread may still wait (its owner freed at the interpreter's
        exit, under a daemon thread running the call): it fails, saying so."""
        if self.error is None:
            self.error = MigrationError("freed while the migration ran (its owner was "
                                        "collected, or the interpreter is exiting)")
        self._wake.close()
        self._waker.close()
