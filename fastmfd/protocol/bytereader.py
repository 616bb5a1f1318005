"""Bounded, located reads over the bytes of one captured file, or of a live stream.

Every decoder of a capture reads through a :class:`ByteReader`, so no length
taken from a file is used before it is checked against the bytes that are
really there, and every failure becomes a :class:`~fastmfd.errors.ProtocolError`
located as ``"<file> at byte <offset>"``. Reads return memoryview slices of
the file's bytes: nothing is copied.

A :class:`StreamReader` has the same reading surface over a connection that
is read as the decoder asks (QEMU's main channel while a migration runs): a
``take`` waits for its bytes, and the end of the stream inside one is a
truncation error at that offset.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

from ..errors import ProtocolError

__all__ = ["ByteReader", "StreamReader"]


class ByteReader:
    """A cursor over ``data``, the whole content of the file ``path``."""

    def __init__(self, path: str, data: bytes | mmap.mmap) -> None:
        self.path = path
        self.raw = data
        self.view = memoryview(data)
        self.size = len(data)
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= self.size

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes; a ProtocolError (field ``what``) if the file is shorter."""
        if n > self.size - self.pos:
            raise self.error(f"{what}: truncated: needs {n} bytes, the file has "
                             f"{self.size - self.pos} left", field=what,
                             received=self.size - self.pos, expected=n)
        view = self.view[self.pos:self.pos + n]
        self.pos += n
        return view

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def be32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes ahead, without moving (fewer at the end of the file)."""
        return bytes(self.view[self.pos:self.pos + n])

    def available(self) -> int:
        """Bytes at hand after the cursor (a stream's: what has arrived)."""
        return self.size - self.pos

    def peek_view(self, n: int) -> memoryview:
        """The next ``n`` bytes at hand (``n <= available()``), not copied: release
        it before reading on."""
        return self.view[self.pos:self.pos + n]

    def mark(self) -> None:
        """A place the caller may come back to (:meth:`since`); a file keeps every byte."""

    def since(self, at: int) -> memoryview:
        """The bytes from offset ``at`` on."""
        return self.view[at:]

    def where(self, at: int | None = None) -> str:
        return f"{self.path} at byte {self.pos if at is None else at}"

    def locate(self, exc: ProtocolError, at: int | None = None) -> ProtocolError:
        """``exc`` located at byte ``at`` (default: the cursor) of this file."""
        return exc.at(self.where(at))

    def error(self, message: str, *, field: str, received: object = None,
              expected: object = None, at: int | None = None) -> ProtocolError:
        """A new ProtocolError located at byte ``at`` (default: the cursor)."""
        return self.locate(ProtocolError(message, field=field, received=received,
                                         expected=expected), at)


class StreamReader(ByteReader):
    """A cursor over a stream: ``recv(n)`` returns up to ``n`` more bytes (b"" at
    its end). Bytes are kept from the latest :meth:`mark` on, so a caller can
    take back the start of what it decoded last (:meth:`since`)."""

    CHUNK = 1 << 20

    def __init__(self, path: str, recv: Callable[[int], bytes]) -> None:
        super().__init__(path, b"")
        self._recv = recv
        self._base = 0              # stream offset of self.raw[0]
        self._mark = 0
        self.ended = False
        self.truncated = False      # a take() failed for the stream's end: it was cut short

    def _fill(self, n: int) -> bool:
        """Have ``n`` bytes after the cursor buffered; False if the stream ends first."""
        while self.size - self.pos < n:
            if self.ended:
                return False
            # A chunk at a time, whatever n says: n may come from the wire.
            data = self._recv(self.CHUNK)
            if not data:
                self.ended = True
                continue
            keep = self._mark - self._base
            self.raw = self.raw[keep:] + data
            self._base += keep
            self.view = memoryview(self.raw)
            self.size = self._base + len(self.raw)
        return True

    def take(self, n: int, what: str) -> memoryview:
        if not self._fill(n):
            self.truncated = True
            raise self.error(f"{what}: truncated: needs {n} bytes, the stream ended "
                             f"{self.size - self.pos} bytes later", field=what,
                             received=self.size - self.pos, expected=n)
        start = self.pos - self._base
        self.pos += n
        return self.view[start:start + n]

    def peek(self, n: int) -> bytes:
        self._fill(n)
        start = self.pos - self._base
        return bytes(self.view[start:start + n])

    def peek_view(self, n: int) -> memoryview:
        start = self.pos - self._base
        return self.view[start:start + n]

    def at_end(self) -> bool:
        return not self._fill(1)

    def mark(self) -> None:
        """Keep the bytes from the cursor on (until the next mark)."""
        self._mark = self.pos

    def since(self, at: int) -> memoryview:
        """The buffered bytes from stream offset ``at`` (not before the mark) on."""
        if at < self._mark:
            raise ValueError(f"byte {at} was before the mark {self._mark}")
        return self.view[at - self._base:]
