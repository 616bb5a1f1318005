"""What a saved QEMU stream starts with and its flavour, from its manifest: what
:mod:`.qemu_sending` replays, and what a destination must be to load it."""

from __future__ import annotations

from uuid import UUID

from ..protocol.qemu import COMMAND_PLACES, SYNC_PER_ROUND, SYNC_PER_SECTION
from ..units import format_bytes

__all__ = ["QemuStream"]


class QemuStream:
    """What a saved QEMU stream starts with and its flavour (from its manifest)."""

    def __init__(self, configuration: bytes, uuid: bytes, ram_section_id: int,
                 section_footers: bool, *, machine: str = "",
                 blocks: dict[str, int] | None = None,
                 multifd_sync: str = SYNC_PER_SECTION,
                 zero_page_detection: str = "legacy",
                 commands: list[dict[str, str]] | None = None) -> None:
        self.configuration, self.uuid = configuration, uuid
        # The saved COMMAND sections, joined per place (protocol.qemu.COMMAND_PLACES).
        self.commands = dict.fromkeys(COMMAND_PLACES, b"")
        for command in commands or []:
            self.commands[command["before"]] += bytes.fromhex(command["section"])
        self.ram_section_id, self.section_footers = ram_section_id, section_footers
        self.machine = machine
        self.blocks = blocks or {}      # idstr -> size: the RAM a destination must have
        self.per_round = multifd_sync == SYNC_PER_ROUND
        self.zeros_in_packets = zero_page_detection == "multifd"

    def describe(self) -> str:
        """The destination this stream needs, for an error message."""
        if self.per_round:
            flavour = ("QEMU >= 8.1 machine type: SYNCs per round (MULTIFD_FLUSH)"
                       + (", zero pages listed in multifd packets (QEMU >= 9.0)"
                          if self.zeros_in_packets else ""))
        else:
            flavour = "QEMU 7.2, or a later QEMU with a machine type <= 8.0: SYNCs per section"
        # A destination of other RAM (-m, a device missing) drops the stream
        # too, and says which block differs only in its own log.
        ram = ", ".join(f"{name} {format_bytes(size)}" for name, size in self.blocks.items())
        # Every multifd channel's init packet carries the source's -uuid, which the
        # destination's must equal (it says so only in its log, too).
        uuid = f"; with -uuid {UUID(bytes=self.uuid)}" if any(self.uuid) else ""
        return (f"machine {self.machine or '(unknown)'}, {flavour}{uuid}"
                + (f"; with the RAM blocks (its -m and devices) {ram}" if ram else ""))
