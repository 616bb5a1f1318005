"""What a capture carries, put together: the RAM image and each device's state."""

from __future__ import annotations

from ... import _core
from ...errors import ProtocolError
from ...protocol.bytereader import ByteReader

__all__ = ["RamImage", "DeviceChunks"]


class RamImage:
    """``{block: {offset: page}}``, each page its latest copy: the SYNC barriers
    order a capture's rounds, and a later round's copy of a page wins (within a
    round no two sources send one page). The main channel's pages are applied
    first, every round at once (:meth:`apply_main` keeps each one's round, not
    the records: a stream can hold millions), then the multifd channels' round
    after round, each replacing a main channel copy only from that round on."""

    def __init__(self, max_bytes: int) -> None:
        self.pages: dict[str, dict[int, memoryview]] = {}
        self.main_rounds: dict[str, dict[int, int]] = {}
        self.max_bytes = max_bytes
        self.bytes = 0
        self.resent = 0
        self.changed = 0

    def charge(self, size: int, field: str, path: str, at: int) -> None:
        """Count ``size`` more bytes kept in memory (``field``: distinct pages, or
        inflated device state: what a small compressed capture can inflate to), up to
        ``max_bytes``."""
        self.bytes += size
        if self.bytes > self.max_bytes:
            raise ProtocolError(
                f"the capture carries more than max_ram_bytes={self.max_bytes} of pages "
                f"and inflated device state", field=field, received=self.bytes,
                expected=f"<= {self.max_bytes}").at(f"{path} at byte {at}")

    def apply_main(self, block: str, offset: int, page: memoryview, path: str, at: int,
                   round_: int) -> None:
        self.main_rounds.setdefault(block, {})[offset] = round_
        self.apply_located(block, offset, page, path, at)

    def apply_located(self, block: str, offset: int, page: memoryview, path: str, at: int,
                      round_: int | None = None) -> None:
        pages = self.pages.setdefault(block, {})
        old = pages.get(offset)
        if old is None:
            self.charge(len(page), "pages", path, at)
        else:
            self.resent += 1
            # bytes compare with memcmp; two memoryviews item by item (30 us a page)
            self.changed += old is not page and old.tobytes() != page.tobytes()
            if round_ is not None and self.main_rounds.get(block, {}).get(offset, -1) > round_:
                return          # the main channel's copy is of a later round
        pages[offset] = page

    def by_block(self, blocks: dict[str, int]) -> dict[str, dict[int, memoryview]]:
        """The pages of each of ``blocks`` (in their order, none for a block no
        page came for), then of any other block a page named."""
        return {**{name: {} for name in blocks}, **self.pages}


class DeviceChunks:
    """Device-state chunks by device, reassembled in idx order at the end."""

    def __init__(self) -> None:
        # (idstr, instance_id) -> {idx: (data, is_last, where)}
        self.streams: dict[tuple[str, int], dict[int, tuple[memoryview, bool, str]]] = {}

    def add(self, idstr: str, instance_id: int, payload: memoryview, reader: ByteReader,
            at: int) -> None:
        try:
            idx, flags = _core.decode_chunk_header(payload[:_core.CHUNK_HEADER_SIZE])
        except ProtocolError as exc:
            raise reader.locate(exc, at) from None
        chunks = self.streams.setdefault((idstr, instance_id), {})
        if idx in chunks:
            raise reader.error(f"device {idstr!r} instance {instance_id}: chunk {idx} "
                               f"received twice (first {chunks[idx][2]})", field="idx",
                               received=idx, expected="each idx once", at=at)
        chunks[idx] = (payload[_core.CHUNK_HEADER_SIZE:], bool(flags & _core.CHUNK_FLAG_LAST),
                       reader.where(at))

    def finish(self) -> dict[tuple[str, int], bytes]:
        out = {}
        for (idstr, instance_id), chunks in sorted(self.streams.items()):
            name = f"device {idstr!r} instance {instance_id}"
            top = max(chunks)
            lasts = sorted(idx for idx, chunk in chunks.items() if chunk[1])
            if not lasts or lasts[0] != top:
                where = chunks[lasts[0] if lasts else top][2]
                raise ProtocolError(
                    f"{name}: chunk {top} is the highest, but the last-chunk flag is "
                    f"{'on chunk ' + str(lasts[0]) if lasts else 'on none (truncated?)'}",
                    field="flags", received=lasts[:1], expected=f"last flag on chunk {top}"
                ).at(where)
            missing = next((i for i in range(top) if i not in chunks), None)
            if missing is not None:
                raise ProtocolError(f"{name}: chunk {missing} of 0..{top} is missing",
                                    field="idx", received=sorted(chunks)[:8],
                                    expected=f"0..{top}").at(chunks[top][2])
            out[(idstr, instance_id)] = b"".join(chunks[i][0] for i in range(top + 1))
        return out
