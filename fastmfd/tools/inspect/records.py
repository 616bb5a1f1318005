"""What ``fastmfd inspect`` finds in a capture: its channels, packets and contents."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ...protocol.main_channel import Msg
from ...protocol.qemu import QemuMainChannel

__all__ = ["PacketRecord", "Channel", "FastmfdMainChannel", "Capture"]


@dataclass(frozen=True)
class PacketRecord:
    """One packet of a multifd channel.

    ``kind`` is ``"sync"`` for a RAM packet with the SYNC flag (which in 7.2
    may also carry pages), ``"ram"`` for other RAM packets (empty ones
    included) and ``"device"`` for device-state packets, whose ``ramblock``
    is the device idstr.
    """
    offset: int               # byte offset of the packet header in its file
    kind: str
    flags: int
    packet_num: int | None    # None for device-state packets
    ramblock: str             # "" for packets without pages
    normal_pages: int
    zero_pages: int
    wire_bytes: int           # header + payload
    payload_bytes: int        # bytes after the header (compressed size when compressed)
    round: int                # SYNC rounds completed on the channel before this packet


@dataclass
class Channel:
    """One multifd channel of the capture."""
    path: str
    id: int
    uuid: bytes
    kind: str                 # "multifd" or "device-state" (channel header type 3)
    channel_header: bool
    size: int                 # bytes in the file
    compression: str | None = None      # from the first packet with pages
    packets: list[PacketRecord] = field(default_factory=list)

    @property
    def syncs(self) -> int:
        return sum(1 for p in self.packets if p.kind == "sync")

    def summary(self) -> dict[str, Any]:
        ram = [p for p in self.packets if p.kind != "device"]
        repeated = sum(1 for a, b in zip(ram, ram[1:]) if a.packet_num == b.packet_num)
        return {
            "file": self.path, "id": self.id, "uuid": self.uuid.hex(), "kind": self.kind,
            "channel_header": self.channel_header, "compression": self.compression,
            "packets": len(self.packets),
            # QEMU 7.2's follow-up packets (spec §5.3): neither pages nor SYNC.
            "empty_packets": sum(1 for p in ram if p.kind == "ram"
                                 and p.normal_pages + p.zero_pages == 0),
            "device_packets": len(self.packets) - len(ram),
            "syncs": self.syncs,
            "syncs_with_pages": sum(1 for p in ram if p.kind == "sync" and p.normal_pages),
            "repeated_packet_num": repeated,
            "pages": {"normal": sum(p.normal_pages for p in ram),
                      "zero": sum(p.zero_pages for p in ram)},
            "flags": {f"{flags:#x}": n for flags, n in
                      sorted(Counter(p.flags for p in self.packets).items())},
            "bytes": self.size,
            "payload_bytes": sum(p.payload_bytes for p in self.packets),
        }


@dataclass
class FastmfdMainChannel:
    """fastmfd's main channel: SETUP and the message counts."""
    path: str
    size: int
    channel_header: bool
    setup: dict[str, Any] = field(default_factory=dict)
    messages: Counter[str] = field(default_factory=Counter)

    @property
    def round_ends(self) -> int:
        return self.messages[Msg.ROUND_END.name]

    def summary(self) -> dict[str, Any]:
        return {"file": self.path, "format": "fastmfd", "bytes": self.size,
                "channel_header": self.channel_header, "setup": self.setup,
                "messages": dict(self.messages), "round_ends": self.round_ends}


@dataclass
class Capture:
    """A decoded capture: its channels, blocks, RAM image and device state."""
    layout: str
    page_size: int
    packet_pages: int
    main: QemuMainChannel | FastmfdMainChannel | None
    channels: list[Channel]                        # by channel id
    blocks: dict[str, int]                         # name -> size ({} without a main channel)
    ram: dict[str, dict[int, memoryview]]          # block -> {offset: page bytes}
    devices: dict[tuple[str, int], bytes]          # (idstr, instance_id) -> state
    pages_resent: int = 0                          # pages that arrived again
    pages_resent_changed: int = 0                  # ... with different content

    def summary(self) -> dict[str, Any]:
        """Everything the capture shows, as JSON-able data."""
        return {
            "layout": self.layout, "page_size": self.page_size,
            "packet_pages": self.packet_pages,
            "main": self.main.summary() if self.main is not None else None,
            "channels": [c.summary() for c in self.channels],
            # Declared blocks first; without a main channel, the blocks packets named.
            "blocks": {name: {"size": self.blocks.get(name),
                              "pages": len(self.ram.get(name, {})),
                              "pages_expected": self.blocks[name] // self.page_size
                              if name in self.blocks else None}
                       for name in {**self.blocks, **self.ram}},
            "ram": {"blocks": len(self.ram), "pages": sum(map(len, self.ram.values())),
                    "pages_resent": self.pages_resent,
                    "pages_resent_changed": self.pages_resent_changed},
            "devices": {f"{idstr}/{instance}": len(data)
                        for (idstr, instance), data in sorted(self.devices.items())},
        }
