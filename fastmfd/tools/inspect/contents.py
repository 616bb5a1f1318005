"""What a capture carries, put together: the RAM image and each device's state."""

from __future__ import annotations

from ... import _core
from ...errors import ProtocolError
from ...protocol.bytereader import ByteReader

__all__ = ["RamImage", "DeviceChunks"]


class RamImage:
    """``{block: {offset: page}}``; a page applied again replaces the earlier copy."""

    def __init__(self, blocks: dict[str, int], page_size: int, max_bytes: int) -> None:
        self.pages: dict[str, dict[int, memoryview]] = {name: {} for name in blocks}
        self.zero_page = memoryview(bytes(page_size))
        self.page_size = page_size
        self.max_bytes = max_bytes
        self.count = 0
        self.resent = 0
        self.changed = 0

    def apply_located(self, block: str, offset: int, page: memoryview, path: str,
                      at: int) -> None:
        pages = self.pages.setdefault(block, {})
        old = pages.get(offset)
        if old is None:
            self.count += 1
            if self.count * self.page_size > self.max_bytes:
                raise ProtocolError(
                    f"the capture carries more than max_ram_bytes={self.max_bytes} of pages",
                    field="pages", received=self.count * self.page_size,
                    expected=f"<= {self.max_bytes}").at(f"{path} at byte {at}")
        else:
            self.resent += 1
            self.changed += old != page
        pages[offset] = page


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
