"""A host name's listening sockets: one per address it stands for, taken as one.

``localhost`` is 127.0.0.1 and ::1 on most hosts; a listener bound at the first
only was not there for a source whose resolver put the other first (its connect
refused, then retried at the next address: slower, or failed with a short
timeout). As asyncio.start_server and socket.create_server(dualstack) do, every
address is bound, each its own socket (IPv6 ones IPV6_V6ONLY: ``::`` and
``0.0.0.0`` both bind), all on the same port (port 0: the one the first got).
An address this host has no family or address for (no IPv6) is left out, with a
warning saying why; none bound is the error.

:class:`ListeningSockets` is what the accepting code takes in place of one
listening socket: its :meth:`~ListeningSockets.fileno` is an epoll descriptor,
readable when any of them has a connection waiting (or was shut down), so a
select() or a :class:`~fastmfd._engine.processes.Watch` waits on all of them.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from typing import Any

__all__ = ["ListeningSockets", "Listener", "LISTENERS", "listen_at_each", "host_port",
           "PORT_ATTEMPTS"]

log = logging.getLogger("fastmfd")

# bind() errors that say this host lacks the address or its family: left out.
NOT_HERE = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)
# With port 0, the port the first address got may be taken at another (by a
# listener there alone): the whole bind starts again, at most this many times.
PORT_ATTEMPTS = 8


class ListeningSockets:
    """Listening sockets accepted from as one (see the module's doc): what a
    listening socket is to select(), accept(), setblocking(), shutdown() and
    close(). Each member stays non-blocking; accept() waits on them all unless
    ``setblocking(False)``."""

    def __init__(self, sockets: list[socket.socket], name: str,
                 skipped: tuple[str, ...] = ()) -> None:
        assert sockets, "at least one address was bound"
        self.sockets, self.name = sockets, name
        # The name's addresses left out, each with why ("10.77.0.9 (Cannot assign ...)").
        self.skipped = skipped
        self._ready = select.epoll()
        self._blocking = True
        self._next = 0                      # whose accept() comes first: each in turn
        for sock in sockets:
            sock.setblocking(False)
            self._ready.register(sock, select.EPOLLIN)

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def fileno(self) -> int:
        return self._ready.fileno()

    def setblocking(self, flag: bool) -> None:
        self._blocking = flag

    def accept(self) -> tuple[socket.socket, Any]:
        """A connection waiting at any of the sockets (each in turn first: a flood
        at one address does not starve the other); BlockingIOError if none waits
        and non-blocking. A socket shut down or closed raises its OSError."""
        while True:
            for _ in self.sockets:
                sock = self.sockets[self._next]
                self._next = (self._next + 1) % len(self.sockets)
                try:
                    return sock.accept()
                except BlockingIOError:
                    continue
            if not self._blocking:
                raise BlockingIOError(errno.EAGAIN, "no connection waits")
            self._ready.poll()              # shutdown() makes each readable: no hang

    def shutdown(self, how: int) -> None:
        """Shut every socket down (an accept() waiting wakes); the first error raised
        once all were."""
        failed: OSError | None = None
        for sock in self.sockets:
            try:
                sock.shutdown(how)
            except OSError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self._ready.close()


Listener = socket.socket | ListeningSockets
"""What a destination accepts its connections on."""
LISTENERS = (socket.socket, ListeningSockets)      # (for isinstance)


def listen_at_each(targets: list[tuple[int, Any]], where: str, backlog: int) -> ListeningSockets:
    """Listening sockets at each (family, sockaddr) of ``targets`` (a name's addresses,
    all of one port), named ``where``; an OSError naming the address that failed (or
    each, if none could be bound)."""
    held: list[socket.socket] = []      # the port that collided, until the next is got
    collided: BaseException | None = None
    try:
        for attempt in range(PORT_ATTEMPTS):
            port = targets[0][1][1]
            bound: list[socket.socket] = []
            left_out: list[str] = []
            try:
                for family, sockaddr in targets:
                    sockaddr = (sockaddr[0], port, *sockaddr[2:])
                    try:
                        bound.append(_listening(family, sockaddr, backlog))
                    except OSError as exc:
                        if exc.errno not in NOT_HERE:
                            raise _at(sockaddr, exc) from None
                        left_out.append(f"{sockaddr[0]} ({exc.strerror or exc})")
                        continue
                    port = bound[0].getsockname()[1]
                    _close(held)
                if not bound:
                    raise OSError(errno.EADDRNOTAVAIL, f"none of its addresses is this "
                                                       f"host's: {', '.join(left_out)}")
                listening = ListeningSockets(bound, where, tuple(left_out))
            except BaseException as exc:
                in_use = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
                if in_use and not bound and collided is not None:
                    raise collided from None    # no other port: the collision says why
                if (in_use and bound and targets[0][1][1] == 0
                        and attempt + 1 < PORT_ATTEMPTS):
                    # Another port, from the first address: the one that collided held
                    # meanwhile, as the kernel gives the same port again (the odd one of
                    # 2, every time: all 8 attempts collided).
                    held.append(bound.pop(0))
                    _close(bound)
                    collided = exc
                    continue
                _close(bound)
                raise
            for why in left_out:
                log.warning("%s: not listening at %s: this host has no such address", where,
                            why)
            return listening
        raise AssertionError("the last attempt raised")
    finally:
        _close(held)


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
    sockets.clear()


def _listening(family: int, sockaddr: Any, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:       # only its own: 0.0.0.0 may be another's
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 host in brackets (``[::1]:5000``, not ``::1:5000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _at(sockaddr: Any, exc: OSError) -> OSError:
    """``exc`` saying the address it came from (the others bound)."""
    return OSError(exc.errno, f"{host_port(*sockaddr[:2])}: {exc.strerror or exc}")
