"""Bounded, located reads over the bytes of one captured file.

Every decoder of a capture reads through a :class:`ByteReader`, so no length
taken from a file is used before it is checked against the bytes that are
really there, and every failure becomes a :class:`~fastmfd.errors.ProtocolError`
located as ``"<file> at byte <offset>"``. Reads return memoryview slices of
the file's bytes: nothing is copied.
"""

from __future__ import annotations

from ..errors import ProtocolError

__all__ = ["ByteReader"]


class ByteReader:
    """A cursor over ``data``, the whole content of the file ``path``."""

    def __init__(self, path: str, data: bytes) -> None:
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
