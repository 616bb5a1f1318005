"""QEMU's main channel decoded as it arrives at ``listen --qemu``: what the
decoder finds (the block list, pages, barriers, commands) goes to the session
(:class:`~fastmfd._engine.qemu_receiving.QemuReceiving`), and the commands a
precopy migration sends are answered or refused here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..protocol.bytereader import StreamReader
from ..protocol.qemu import (CONFIGURATION_AT, IGNORE_SHARED, MIG_CMD_OPEN_RETURN_PATH,
                             MIG_CMD_PING, MIG_CMD_SWITCHOVER_START, MIG_CMDS, SYNC_PER_SECTION,
                             QevmDecoder)
from ..reprs import fields_repr
from .qemu_channels import QemuConnections
from .qemu_return_path import ReturnPathAnswers

__all__ = ["LiveDecoder", "LiveSession", "QemuStreamFacts"]


@dataclass
class QemuStreamFacts:
    """What the stream said, for the manifest and the caller:

    version -- the main channel's stream version (QEMU_VM_FILE_VERSION, 3)
    machine -- the source's machine type (its configuration section)
    page_size -- bytes per target page (its configuration's target-page-bits)
    capabilities -- the migration capabilities its configuration lists
    uuid -- the configuration's uuid subsection, None if it sent none
    channels -- the multifd channels that connected
    compression -- the channels' multifd compression ("zlib", "zstd"), None if no
        page came compressed
    blocks -- RAMBlock idstr -> its size in bytes
    syncs -- SYNC barriers (one SYNC per channel each)
    multifd_sync -- where they sit: "per-section" or "per-round" (protocol.qemu)
    ram_section_ends -- EOS records
    zero_pages -- ZERO records of the main channel
    multifd_zero_pages -- zero pages listed in multifd packets (QEMU >= 9.0)
    main_pages -- PAGE records of the main channel
    ram_bytes -- main-channel bytes before the device sections
    vmstate_bytes -- bytes of the device sections to the stream's end (vmstate.bin)
    vm_devices -- the devices its VM description lists
    configuration -- the stream's CONFIGURATION section, as sent
    commands -- its COMMAND sections: (where they came, their bytes) each
    ram_section_id -- the RAM section's id; None: the stream had no RAM section
    section_footers -- whether its sections end with a footer
    """
    version: int = 3
    machine: str = ""
    page_size: int = 4096
    capabilities: list[str] = field(default_factory=list)
    uuid: bytes | None = None
    channels: int = 0
    compression: str | None = None
    blocks: dict[str, int] = field(default_factory=dict)
    syncs: int = 0
    multifd_sync: str = SYNC_PER_SECTION
    ram_section_ends: int = 0
    zero_pages: int = 0
    multifd_zero_pages: int = 0
    main_pages: int = 0
    ram_bytes: int = 0
    vmstate_bytes: int = 0
    vm_devices: int = 0
    configuration: bytes = b""
    commands: list[tuple[str, bytes]] = field(default_factory=list)
    ram_section_id: int | None = 0
    section_footers: bool = True

    def __repr__(self) -> str:
        return fields_repr(self)    # bounded: 8 blocks or commands, then a count


class LiveSession(Protocol):
    """What the decoder hands its findings to (QemuReceiving)."""
    answers: ReturnPathAnswers
    connections: QemuConnections

    def on_blocks(self, blocks: dict[str, int], page_size: int) -> None: ...
    def on_page(self, block: str, offset: int, page: memoryview) -> None: ...
    def on_zero_pages(self, block: str, offsets: np.ndarray) -> None: ...
    def on_sync(self, uuid: bytes | None) -> None: ...


class LiveDecoder(QevmDecoder):
    """The main channel as it arrives: its findings go to the session."""

    r: StreamReader

    def __init__(self, reader: StreamReader, session: LiveSession) -> None:
        super().__init__(reader, 4096)
        self.session = session
        self.switchover_at: int | None = None   # where SWITCHOVER_START came

    def on_blocks(self) -> None:
        if IGNORE_SHARED in self.out.capabilities:
            # Its shared file-backed blocks are listed but their pages never sent
            # (they stay in the file both QEMUs map): their files would hold
            # holes, not the guest's RAM, and look complete.
            raise self.r.error(f"main channel: capability {IGNORE_SHARED} (its "
                               "configuration says): the source sends no page of its shared "
                               "file-backed RAM blocks, so their files would not hold the "
                               "guest's RAM; not supported", field="capabilities",
                               received=IGNORE_SHARED, expected=f"no {IGNORE_SHARED}",
                               at=CONFIGURATION_AT)
        self.session.on_blocks(self.out.blocks, self.out.page_size)

    def on_page(self, block: str, offset: int, page: memoryview, at: int) -> None:
        if page is self.fill_pages.get(0):      # a ZERO record outside a run
            self.session.on_zero_pages(block, np.array([offset], dtype=np.uint64))
        else:
            self.session.on_page(block, offset, page)

    def on_zero_pages(self, block: str, offsets: np.ndarray, at: int) -> None:
        self.session.on_zero_pages(block, offsets)

    def on_sync(self) -> None:
        self.session.on_sync(self.out.uuid)

    def on_command(self, command: int, data: memoryview, at: int) -> None:
        answers, main = self.session.answers, self.session.connections.main
        if command == MIG_CMD_OPEN_RETURN_PATH and main is not None:
            answers.open(main, self.out.machine)
        elif command == MIG_CMD_PING and answers.opened:
            answers.pong(int.from_bytes(data, "big"))
        elif command == MIG_CMD_PING:
            raise self.r.error("main channel: PING before OPEN_RETURN_PATH: no return path "
                               "to answer on", field="command", received=command,
                               expected="OPEN_RETURN_PATH first", at=at)
        elif command != MIG_CMD_SWITCHOVER_START:
            raise self.r.error(f"main channel: command {MIG_CMDS[command][0]} is not supported "
                               "(a precopy migration sends only OPEN_RETURN_PATH, PING and "
                               "SWITCHOVER_START)", field="command", received=command,
                               expected=MIG_CMD_SWITCHOVER_START, at=at)
        elif self.switchover_at is not None:
            raise self.r.error("main channel: command SWITCHOVER_START twice (QEMU sends it "
                               f"once; the first at byte {self.switchover_at})",
                               field="command", received=command,
                               expected="one SWITCHOVER_START", at=at)
        else:
            self.switchover_at = at

