"""QEMU's main migration channel (the ``QEVM`` stream), decoded as far as RAM goes.

A QEMU multifd migration sends the data pages on the multifd channels, but the
RAM block list (and, in 7.2's way, every zero page) travels on the main channel
(spec §4.4, §4.5), so a capture's RAM image needs both. This module reads the
main channel up to its first device section::

    "QEVM" version 3
    CONFIGURATION   machine type [+ subsections: target-page-bits, capabilities, uuid]
    COMMAND ...     (kept, with where they sat: see below)
    START  "ram" v4 MEM_SIZE + block list ......... [MULTIFD_FLUSH] EOS  footer
    PART   ram      ZERO / PAGE records ... [MULTIFD_FLUSH] ... EOS  footer
    [COMMAND SWITCHOVER_START]  (QEMU >= 10.0, machine types >= 10.0: the VM stopped)
    END    ram      ZERO / PAGE records ... [MULTIFD_FLUSH] ... EOS  footer
    FULL   "timer"  <- first device section: decoding stops here
    ... device sections (not decoded) ...
    EOF  VMDESCRIPTION <json>                                  <- checked at the end

Every RAM section ends with EOS. Where the multifd SYNCs sit depends on the
machine type (spec §5.3), and the stream itself says which:

- per section (QEMU 7.2; later QEMUs with a machine type <= 8.0): one SYNC on
  every multifd channel before each EOS;
- per round (QEMU >= 8.1 machine types, e.g. QEMU 10's ``pc``): one SYNC on
  every channel before each ``MULTIFD_FLUSH`` record (the setup section has one
  before its EOS, then one comes each time the dirty scan wraps, mid-section).

Either way the records before the k-th such barrier belong to round k of the capture.
COMMAND sections are kept as sent, each with its place (before the RAM section, before its END
section: QEMU 10's SWITCHOVER_START, which tells the destination's devices, VFIO ones, that the
source stopped; or before the device sections), and a replay puts each back there; not
OPEN_RETURN_PATH and PING, the connection's (:mod:`.qemu_return_path`). QEMU sends few: more
than MAX_COMMAND_SECTIONS are an error (listen --qemu refuses a second SWITCHOVER_START). The
device sections are not decoded (their format is per device), but the stream must end with
``QEMU_VM_EOF`` and the VM description, so a main channel cut short anywhere is an error.

:class:`QevmDecoder` reads a capture (a :class:`~.bytereader.ByteReader`) or a live migration
(a :class:`~.bytereader.StreamReader`, :mod:`fastmfd.qemu`) and hands what it decodes to its
``on_*`` hooks. :func:`decode_qemu_main` is the capture's use: it hands each page on with its
round (the barriers before it), keeping none (a stream can carry millions of records, 9 bytes
each); :mod:`.qemu_encoding` writes the same format back.

Facts from migration/savevm.c, savevm.h and ram.c @ 7.2; no QEMU code is copied.
"""

from __future__ import annotations

import json
import mmap
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .bytereader import ByteReader
from .setup import MAX_NAME_BYTES, MAX_REGIONS, NAME_RULE, Invalid, check_name

__all__ = ["QEVM_MAGIC", "QemuMainChannel", "QevmDecoder", "decode_qemu_main", "PageHook",
           "check_stream_end", "stream_end_at", "SYNC_PER_SECTION", "SYNC_PER_ROUND",
           "COMMAND_PLACES", "QEMU_PACKET_BYTES"]

QEVM_MAGIC = b"QEVM"
QEVM_VERSION = 3
CONFIGURATION_AT = 8            # the CONFIGURATION section follows the magic and version
# The capability that adds each block's address to the block list, and sends no
# page of a shared file-backed block (the destination maps the same file).
IGNORE_SHARED = "x-ignore-shared"

# Section types (migration/savevm.h).
VM_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E
SECTION_NAMES = {SECTION_START: "start", SECTION_PART: "part", SECTION_END: "end",
                 SECTION_FULL: "full"}

MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING = 1, 2   # the destination answers: .qemu_return_path
MIG_CMD_POSTCOPY_ADVISE = 3     # changes the block list format: not supported
MIG_CMD_SWITCHOVER_START = 11   # QEMU >= 9.2 at switchover (the VM stopped), no data
# QEMU's commands (migration/savevm.c @ 10.0, enum qemu_vm_cmd) and the length of
# their data where it is fixed (mig_cmd_args); 0 (INVALID) and the rest are unknown.
MIG_CMDS = {1: ("OPEN_RETURN_PATH", 0), 2: ("PING", 4), 3: ("POSTCOPY_ADVISE", None),
            4: ("POSTCOPY_LISTEN", 0), 5: ("POSTCOPY_RUN", 0),
            6: ("POSTCOPY_RAM_DISCARD", None), 7: ("PACKAGED", 4), 8: ("ENABLE_COLO", 0),
            9: ("POSTCOPY_RESUME", 0), 10: ("RECV_BITMAP", None), 11: ("SWITCHOVER_START", 0)}
QEMU_PACKET_BYTES = 512 << 10       # MULTIFD_PACKET_SIZE (spec §2.1), whatever the page size
# Target pages of 512 bytes (fastmfd's smallest) up to a whole packet (QEMU's: 1..64 KiB).
MIN_PAGE_BITS, MAX_PAGE_BITS = 9, 19
# The configuration's machine type name (a name: at most MAX_NAME_BYTES; QEMU's
# are tens of bytes) and its capability list (QEMU 10 has 25) are bounded
# before they are read.
MAX_CAPABILITIES = 256
# Where a COMMAND section sat: before the RAM section, before its END, before the
# device sections (the first after the RAM section ended).
COMMAND_PLACES = ("ram", "ram-end", "devices")
MAX_COMMAND_SECTIONS = 16

# RAM record flags, the low bits of each record's BE u64 (migration/ram.c @ 7.2).
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200
UNSUPPORTED_RECORDS = {RAM_XBZRLE: "XBZRLE", RAM_HOOK: "RDMA hook",
                       RAM_COMPRESS_PAGE: "compressed page (compress threads)"}
# Where the multifd SYNCs sit (module docstring): the manifest's words for it.
SYNC_PER_SECTION = "per-section"
SYNC_PER_ROUND = "per-round"
RAM_SECTION_VERSION = 4
# A ZERO record that CONTINUEs the last block: BE u64 offset | flags, fill byte
# (packed, 9 bytes). Most of a stream's zero pages come as runs of these.
ZERO_RECORD = np.dtype([("header", ">u8"), ("fill", "u1")])
ZERO_WINDOW = 64
# How such a record ends: the header's low byte (its flags, below any page
# size's offset bits) and the fill. One record's look, before a run's scan.
ZERO_RECORD_TAIL = bytes((RAM_ZERO | RAM_CONTINUE, 0))


# A page the main channel carries (a ZERO record's fill or a PAGE record's bytes):
# (block, byte offset in it, page, the record's byte offset in the file, round).
PageHook = Callable[[str, int, memoryview, int, int], None]


@dataclass
class QemuMainChannel:
    """What the main channel says about RAM, plus facts for the summary."""
    path: str
    size: int                                   # bytes in the file
    machine: str = ""
    page_size: int = 4096
    capabilities: list[str] = field(default_factory=list)
    uuid: bytes | None = None                   # configuration/uuid subsection, if sent
    configuration: bytes = b""                  # the CONFIGURATION section as sent
    ram_section_id: int | None = None
    section_footers: bool = False               # RAM sections end with a footer
    blocks: dict[str, int] = field(default_factory=dict)
    syncs: int = 0                              # barriers: one SYNC per multifd channel each
    multifd_sync: str | None = None             # SYNC_PER_SECTION or SYNC_PER_ROUND
    ram_section_ends: int = 0                   # EOS records
    multifd_flushes: int = 0                    # MULTIFD_FLUSH records
    zero_pages: int = 0
    data_pages: int = 0
    ram_sections: Counter[str] = field(default_factory=Counter)  # start/part/end
    commands: int = 0
    command_sections: list[tuple[str, bytes]] = field(default_factory=list)  # place, bytes
    ram_bytes: int = 0                          # bytes up to the first device section
    first_device_section: str = ""
    vm_devices: int = 0                         # devices in the VM description

    def summary(self) -> dict[str, Any]:
        return {
            "file": self.path, "format": "qemu", "bytes": self.size, "version": QEVM_VERSION,
            "machine": self.machine, "capabilities": self.capabilities,
            "uuid": self.uuid.hex() if self.uuid is not None else None,
            "ram_sections": {name: self.ram_sections[name] for name in ("start", "part", "end")},
            "eos": self.ram_section_ends, "multifd_flushes": self.multifd_flushes,
            "multifd_sync": self.multifd_sync, "syncs": self.syncs,
            "zero_pages": self.zero_pages, "page_records": self.data_pages,
            "commands": self.commands, "ram_bytes": self.ram_bytes,
            "first_device_section": self.first_device_section,
            "device_bytes": self.size - self.ram_bytes, "vm_devices": self.vm_devices,
        }


def decode_qemu_main(path: str, data: bytes | mmap.mmap, page_size: int = 4096,
                     on_page: PageHook | None = None) -> QemuMainChannel:
    """Decode a QEMU main channel capture; a ProtocolError locates any fault.
    ``on_page`` takes each page as it is decoded, with its round: the records
    before the k-th barrier are round k."""
    decoder = _CaptureDecoder(ByteReader(path, data), page_size, on_page)
    out = decoder.decode_ram()
    out.vm_devices = check_stream_end(decoder.r, out.ram_bytes, out.page_size)
    return out


class QevmDecoder:
    """Decodes a main channel up to its first device section (see the module
    docstring); subclasses take what it finds through the ``on_*`` hooks."""

    def __init__(self, reader: ByteReader, page_size: int) -> None:
        self.r = reader
        self.out = QemuMainChannel(reader.path, reader.size, page_size=page_size)
        self.ram_section: int | None = None     # section id of "ram"
        self.ram_ended = False
        self.last_block: str | None = None      # for RAM_CONTINUE records
        self.fill_pages: dict[int, memoryview] = {}
        self.zero_window = ZERO_WINDOW          # records _zero_run looks at next

    # -- hooks
    def on_blocks(self) -> None:
        """The block list (``out.blocks``) is known."""

    def on_page(self, block: str, offset: int, page: memoryview, at: int) -> None:
        """A page the main channel carries, in stream order."""

    def on_zero_pages(self, block: str, offsets: np.ndarray, at: int) -> None:
        """A run of zero pages (byte ``offsets`` in ``block``), ZERO records of 9
        bytes each from byte ``at`` on; by default each is an ``on_page``."""
        zero = self._fill_page(0)
        for i, offset in enumerate(offsets.tolist()):
            self.on_page(block, offset, zero, at + i * ZERO_RECORD.itemsize)

    def on_sync(self) -> None:
        """A SYNC barrier: every multifd channel sent one SYNC packet before it."""

    def on_command(self, command: int, data: memoryview, at: int) -> None:
        """A COMMAND section (already refused: postcopy) and its data."""

    def decode_ram(self) -> QemuMainChannel:
        """Decode up to the first device section: ``out.ram_bytes`` is its offset."""
        r = self.r
        magic = bytes(r.take(4, "magic"))
        if magic != QEVM_MAGIC:
            raise r.error(f"main channel field 'magic': received {magic.hex()}, expected "
                          f"{QEVM_MAGIC.hex()} (QEVM)", field="magic", received=magic.hex(),
                          expected=QEVM_MAGIC.hex(), at=0)
        version = r.be32("version")
        if version != QEVM_VERSION:
            raise r.error(f"main channel field 'version': received {version}, expected "
                          f"{QEVM_VERSION}", field="version", received=version,
                          expected=QEVM_VERSION, at=4)
        while self._section():
            pass
        return self.out

    # -- sections

    def _section(self) -> bool:
        """Decode one section; False once the first device section (or EOF) is reached."""
        r = self.r
        r.mark()
        at = r.pos
        kind = r.u8("section type")
        if kind == CONFIGURATION and at == CONFIGURATION_AT:
            self._configuration()
            self.out.configuration = bytes(r.since(at)[:r.pos - at])
        elif kind == COMMAND:
            self._command(at)
        elif kind in (SECTION_START, SECTION_FULL):
            section_id = r.be32("section id")
            idstr = self._name("section idstr")
            r.be32("instance id")
            version = r.be32("version id")
            if kind == SECTION_START and idstr == "ram" and self.ram_section is None:
                if version != RAM_SECTION_VERSION:
                    raise r.error(f"RAM section field 'version_id': received {version}, "
                                  f"expected {RAM_SECTION_VERSION}", field="version_id",
                                  received=version, expected=RAM_SECTION_VERSION, at=at)
                self.ram_section = self.out.ram_section_id = section_id
                self._ram_section("start", section_id)
            else:
                return self._stop(at, idstr)
        elif kind in (SECTION_PART, SECTION_END):
            section_id = r.be32("section id")
            if section_id != self.ram_section or self.ram_ended:
                return self._stop(at, f"section {section_id}")
            self._ram_section(SECTION_NAMES[kind], section_id)
            self.ram_ended = kind == SECTION_END
        elif kind == VM_EOF:
            return self._stop(at, "QEMU_VM_EOF")
        else:
            raise r.error(f"main channel field 'section type': received {kind:#x}, expected "
                          "a section, command or EOF", field="section type", received=kind,
                          expected="0x0-0x4, 0x7 (first), 0x8", at=at)
        return True

    def _stop(self, at: int, what: str) -> bool:
        """The first non-RAM section: RAM must be complete by now."""
        if not self.ram_ended:
            raise self.r.error(
                f"main channel: {what} before the RAM section ended (only the RAM section is "
                "decoded, and it must come first and end before any other section)",
                field="section", received=what, expected="the RAM section (END)", at=at)
        self.out.ram_bytes = at
        self.out.first_device_section = what
        return False

    def _configuration(self) -> None:
        r = self.r
        at = r.pos
        length = r.be32("configuration name length")
        if length > MAX_NAME_BYTES:
            raise r.error(f"main channel field 'configuration name length': received {length},"
                          f" expected at most {MAX_NAME_BYTES}", field="configuration name "
                          "length", received=length, expected=f"<= {MAX_NAME_BYTES}", at=at)
        self.out.machine = self._text(r.take(length, "configuration name"),
                                      "configuration name", at)
        while r.peek(1) == bytes([SUBSECTION]):
            at = r.pos
            r.u8("subsection")
            name = self._name("subsection name")
            version = r.be32("subsection version")
            if version != 1:
                raise r.error(f"configuration subsection {name!r} field 'version': received "
                              f"{version}, expected 1", field="version", received=version,
                              expected=1, at=at)
            if name == "configuration/target-page-bits":
                bits = r.be32("target_page_bits")
                if not MIN_PAGE_BITS <= bits <= MAX_PAGE_BITS:
                    expected = f"{MIN_PAGE_BITS}..{MAX_PAGE_BITS}"
                    raise r.error(f"configuration field 'target_page_bits': received {bits}, "
                                  f"expected {expected} (a multifd packet holds 512 KiB of "
                                  "pages)", field="target_page_bits", received=bits,
                                  expected=expected, at=r.pos - 4)
                self.out.page_size = 1 << bits
            elif name == "configuration/capabilities":
                count = r.be32("caps_count")
                if count > MAX_CAPABILITIES:
                    raise r.error(f"configuration field 'caps_count': received {count}, "
                                  f"expected at most {MAX_CAPABILITIES}", field="caps_count",
                                  received=count, expected=f"<= {MAX_CAPABILITIES}",
                                  at=r.pos - 4)
                self.out.capabilities = [self._name("capability") for _ in range(count)]
            elif name == "configuration/uuid":
                self.out.uuid = bytes(r.take(16, "uuid"))
            else:
                raise r.error(f"configuration: unknown subsection {name!r}", field="subsection",
                              received=name, expected="target-page-bits, capabilities or uuid",
                              at=at)

    def _command(self, at: int) -> None:
        r = self.r
        cmd = r.be16("command")
        length = r.be16("command length")
        name, fixed = MIG_CMDS.get(cmd, (None, None))
        if name is None:
            raise r.error(f"main channel: unknown command {cmd}", field="command",
                          received=cmd, expected="1..11", at=at)
        if fixed is not None and length != fixed:
            raise r.error(f"main channel: command {name} with {length} bytes of data, "
                          f"expected {fixed}", field="command length", received=length,
                          expected=fixed, at=at)
        if cmd == MIG_CMD_POSTCOPY_ADVISE:
            # Either capability advises postcopy: postcopy-ram's advice carries its
            # page sizes, dirty-bitmaps' (bitmaps sent after the switchover) nothing.
            which = "dirty-bitmaps" if length == 0 else "postcopy-ram"
            raise r.error(f"main channel: postcopy (POSTCOPY_ADVISE: capability {which}) is "
                          "not supported", field="command", received=cmd,
                          expected="not postcopy", at=at)
        self.on_command(cmd, r.take(length, "command data"), at)
        self.out.commands += 1
        if cmd in (MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING):
            return      # the connection's, not the stream's: a replay opens its own
        if len(self.out.command_sections) == MAX_COMMAND_SECTIONS:
            raise r.error(f"main channel: more than {MAX_COMMAND_SECTIONS} COMMAND sections",
                          field="command", received=cmd, expected=MAX_COMMAND_SECTIONS, at=at)
        place = ("ram" if self.ram_section is None else "devices" if self.ram_ended
                 else "ram-end")
        self.out.command_sections.append((place, bytes(r.since(at)[:r.pos - at])))

    # -- the RAM section

    def _ram_section(self, kind: str, section_id: int) -> None:
        self.out.ram_sections[kind] += 1
        while self._ram_record(first=kind == "start"):
            pass
        r = self.r
        if r.peek(1) == bytes([SECTION_FOOTER]):
            at = r.pos
            r.u8("section footer")
            footer_id = r.be32("footer section id")
            self.out.section_footers = True
            if footer_id != section_id:
                raise r.error(f"main channel section footer: received section id {footer_id}, "
                              f"expected {section_id}", field="footer", received=footer_id,
                              expected=section_id, at=at)

    def _ram_record(self, first: bool) -> bool:
        """Decode one RAM record (or a run of zero pages); False after EOS."""
        if self._zero_run():
            return True
        r = self.r
        r.mark()
        at = r.pos
        header = r.be64("RAM record")
        page_size = self.out.page_size
        flags = header & (page_size - 1)
        addr = header - flags
        kind = flags & ~RAM_CONTINUE
        if kind == RAM_EOS:
            self.out.ram_section_ends += 1
            if self._sync_mode(SYNC_PER_SECTION, at) == SYNC_PER_SECTION:
                self._barrier()
            return False
        if kind == RAM_MULTIFD_FLUSH:
            self._sync_mode(SYNC_PER_ROUND, at)
            self.out.multifd_flushes += 1
            self._barrier()
            return True
        if kind == RAM_MEM_SIZE:
            if not first or self.out.blocks:
                raise r.error("RAM record MEM_SIZE outside the setup section", field="flags",
                              received=hex(flags), expected="ZERO, PAGE or EOS", at=at)
            self._block_list(addr)
            self.on_blocks()
        elif kind in (RAM_ZERO, RAM_PAGE):
            block = self._record_block(flags, at)
            if addr >= self.out.blocks[block]:
                raise r.error(f"RAM record field 'offset': received {addr:#x}, expected < "
                              f"{self.out.blocks[block]:#x} (size of block {block!r})",
                              field="offset", received=addr, expected=self.out.blocks[block],
                              at=at)
            if kind == RAM_ZERO:
                page = self._fill_page(r.u8("fill byte"))
                self.out.zero_pages += 1
            else:
                page = r.take(page_size, "page")
                self.out.data_pages += 1
            self.on_page(block, addr, page, at)
        elif kind in UNSUPPORTED_RECORDS:
            raise r.error(f"RAM record: {UNSUPPORTED_RECORDS[kind]} is not supported",
                          field="flags", received=hex(flags), expected="ZERO, PAGE or EOS",
                          at=at)
        else:
            raise r.error(f"RAM record field 'flags': received {flags:#x}, expected one of "
                          "MEM_SIZE, ZERO, PAGE, EOS, MULTIFD_FLUSH (+CONTINUE)", field="flags",
                          received=hex(flags), expected="0x2, 0x4, 0x8, 0x10 or 0x200", at=at)
        return True

    def _barrier(self) -> None:
        self.out.syncs += 1
        self.on_sync()

    def _sync_mode(self, seen: str, at: int) -> str:
        """The stream's SYNC placement, fixed by its first barrier: the setup section
        has either a MULTIFD_FLUSH before its EOS (per round) or not (per section)."""
        out = self.out
        if out.multifd_sync is None:
            out.multifd_sync = seen
        elif seen == SYNC_PER_ROUND and out.multifd_sync == SYNC_PER_SECTION:
            raise self.r.error("RAM record MULTIFD_FLUSH in a stream that syncs at every "
                               "section end (its setup section had none)", field="flags",
                               received=hex(RAM_MULTIFD_FLUSH), expected="ZERO, PAGE or EOS",
                               at=at)
        return out.multifd_sync

    def _zero_run(self) -> bool:
        """Decode at once the ZERO records (fill 0, CONTINUE, in the block) that
        follow, as far as the bytes at hand go: a 7.2 stream has one per zero
        page, millions for a large guest. Anything else is left to _ram_record.
        It looks twice as far after a run that filled its window, back at the
        first window after one that did not: a record that breaks runs, again
        and again, made each look scan all the bytes at hand (quadratic)."""
        r, block = self.r, self.last_block
        n = min(r.available() // ZERO_RECORD.itemsize, self.zero_window)
        if block is None or n < 2:
            return False
        if r.peek_view(ZERO_RECORD.itemsize)[7:] != ZERO_RECORD_TAIL:
            return False            # a lone record: its flags and fill tell, cheaper
        at = r.pos
        records = np.frombuffer(r.peek_view(n * ZERO_RECORD.itemsize), dtype=ZERO_RECORD)
        headers = records["header"]
        mask = np.uint64(self.out.page_size - 1)
        good = ((headers & mask) == RAM_ZERO | RAM_CONTINUE) & (records["fill"] == 0) \
            & ((headers & ~mask) < self.out.blocks[block])
        run = n if good.all() else int(np.argmin(good))
        self.zero_window = 2 * self.zero_window if run == n else ZERO_WINDOW
        if run == 0:
            return False
        offsets = headers[:run] & ~mask
        del records, headers, good              # views of the reader's buffer
        r.mark()
        r.take(run * ZERO_RECORD.itemsize, "RAM records")
        self.out.zero_pages += run
        self.on_zero_pages(block, offsets, at)
        return True

    def _block_list(self, total: int) -> None:
        """MEM_SIZE: the blocks, each ``u8 len, idstr, BE u64 used_length``, summing to total."""
        r = self.r
        ignore_shared = IGNORE_SHARED in self.out.capabilities
        left = total
        while left:
            at = r.pos
            if len(self.out.blocks) == MAX_REGIONS:
                raise r.error(f"RAM block list: more than {MAX_REGIONS} blocks (each costs the "
                              "destination a file, a mapping and a bitmap)", field="blocks",
                              received=f"> {MAX_REGIONS}",
                              expected=f"at most {MAX_REGIONS} (fastmfd's regions)", at=at)
            name = self._name("block name")
            size = r.be64("block size")
            if ignore_shared:
                r.be64("block address")
            if name in self.out.blocks:
                raise r.error(f"RAM block list: block {name!r} listed twice", field="block name",
                              received=name, expected="unique names", at=at)
            if size == 0 or size > left or size % self.out.page_size:
                raise r.error(f"RAM block {name!r} field 'size': received {size}, expected a "
                              f"multiple of {self.out.page_size} in 1..{left} (what is left of "
                              f"the total {total})", field="block size", received=size,
                              expected=f"<= {left}", at=at)
            self.out.blocks[name] = size
            left -= size

    def _record_block(self, flags: int, at: int) -> str:
        if flags & RAM_CONTINUE:
            if self.last_block is None:
                raise self.r.error("RAM record: CONTINUE without a previous block",
                                   field="flags", received=hex(flags),
                                   expected="a block name first", at=at)
            return self.last_block
        name = self._name("block name")
        if name not in self.out.blocks:
            raise self.r.error(f"RAM record: unknown block {name!r}", field="block name",
                               received=name, expected=sorted(self.out.blocks), at=at)
        self.last_block = name
        return name

    def _fill_page(self, byte: int) -> memoryview:
        # 7.2 always sends fill byte 0, but the format allows any: one shared page per value.
        page = self.fill_pages.get(byte)
        if page is None:
            page = self.fill_pages[byte] = memoryview(bytes([byte]) * self.out.page_size)
        return page

    # -- helpers

    def _name(self, what: str) -> str:
        """A ``u8 length + bytes`` name."""
        at = self.r.pos
        length = self.r.u8(what)
        return self._text(self.r.take(length, what), what, at)

    def _text(self, raw: memoryview, what: str, at: int | None = None) -> str:
        """A name (QEMU's are UTF-8, without control characters: a block's
        becomes a file's and a region's name)."""
        try:
            return check_name(bytes(raw).decode("utf-8"), what)
        except (UnicodeDecodeError, Invalid):
            raise self.r.error(f"main channel {what}: {bytes(raw)[:64]!r} is not "
                               f"{NAME_RULE}", field=what, received=bytes(raw)[:64],
                               expected=NAME_RULE, at=at) from None


class _CaptureDecoder(QevmDecoder):
    """A capture's main channel: each page goes to ``on_page`` with its round."""

    def __init__(self, reader: ByteReader, page_size: int, on_page: PageHook | None) -> None:
        super().__init__(reader, page_size)
        self.page_hook = on_page

    def on_page(self, block: str, offset: int, page: memoryview, at: int) -> None:
        if self.page_hook is not None:
            self.page_hook(block, offset, page, at, self.out.syncs)

    def on_zero_pages(self, block: str, offsets: np.ndarray, at: int) -> None:
        if self.page_hook is not None:      # or a summary would loop over each
            super().on_zero_pages(block, offsets, at)


def check_stream_end(r: ByteReader, start: int, page_size: int) -> int:
    """The stream after ``start`` (its device sections) must end with QEMU_VM_EOF,
    VMDESCRIPTION, BE u32 length and the JSON; returns the devices it lists."""
    pos = stream_end_at(r.raw, start, r.size)
    if pos is None:
        raise r.error("main channel does not end with QEMU_VM_EOF and the VM description "
                      "(truncated?)", field="QEMU_VM_EOF", received="no end marker",
                      expected="00 06 <length> <json> at the end", at=r.size)
    return _vm_description(r, pos, page_size)


def stream_end_at(raw: bytes | mmap.mmap, start: int, size: int) -> int | None:
    """Where QEMU_VM_EOF stands if ``raw[start:size]`` ends as a QEMU stream ends:
    QEMU_VM_EOF, VMDESCRIPTION, a BE u32 length and that many bytes of JSON, the
    last the source sends (QEMU's destination stops reading there). The JSON
    holds no NUL, so the last NUL is the marker's or one of the length's bytes:
    six places to try, however long the stream."""
    last_nul = raw.rfind(b"\0", start, size)
    for pos in range(last_nul, max(start, last_nul - 5) - 1, -1):
        if (raw[pos:pos + 2] == bytes((VM_EOF, VMDESCRIPTION))
                and int.from_bytes(raw[pos + 2:pos + 6], "big") == size - pos - 6):
            return pos
    return None


def _vm_description(r: ByteReader, pos: int, page_size: int) -> int:
    try:
        desc = json.loads(r.raw[pos + 6:])
    except (ValueError, RecursionError) as exc:
        raise r.error(f"main channel VM description is not JSON ({exc})",
                      field="vmdescription", received="invalid JSON", expected="JSON",
                      at=pos + 6) from None
    devices = desc.get("devices") if isinstance(desc, dict) else None
    found = desc.get("page_size") if isinstance(desc, dict) else None
    if not isinstance(devices, list) or found != page_size:
        raise r.error("main channel VM description: expected an object with 'devices' "
                      f"and 'page_size' {page_size}", field="vmdescription",
                      received=found, expected=page_size, at=pos + 6)
    return len(devices)
