"""``fastmfd inspect``: its arguments and the summary it prints (rich tables or JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from ...errors import ConfigError
from ..outputs import MANIFEST, VMSTATE
from .capture import LAYOUTS, read_capture

__all__ = ["add_arguments", "cli_main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="captured channel bytes, one file per connection, any order; "
                             "a directory stands for its *.bin files")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--packet-pages", type=int, default=None, metavar="N",
                        help="pages per RAM packet when no fastmfd main channel says "
                             "(default: QEMU's 512 KiB of pages, 128 of 4 KiB)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="RAM packet layout (default: qemu-7.2 with a QEMU main channel, "
                             "else current)")
    parser.add_argument("--checksum", action="store_true",
                        help="the packets carry fastmfd's checksum (send --checksum) when no "
                             "fastmfd main channel says")


def capture_files(paths: list[str]) -> list[str]:
    """``paths`` with each directory replaced by its ``*.bin`` files (a capture
    directory holds one per connection, beside notes such as ``meta.json``). A
    save (``listen``'s or ``listen --qemu``'s directory, or a file in it) is no
    capture: its ``vmstate.bin`` was read as one and said to be corrupt (a review)."""
    files = []
    for path in paths:
        _refuse_a_save(path)
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if name.endswith(".bin"))
        if not found:
            raise ConfigError(f"{path} is a directory with no *.bin capture files: "
                              f"name the files to inspect")
        files += found
    return files


def _refuse_a_save(path: str) -> None:
    """A ConfigError if ``path`` is a saved migration, a directory with a
    ``manifest.json`` (a capture's notes are ``meta.json``), or a file of a save's
    names in one."""
    if os.path.isdir(path):
        directory = path
    elif os.path.basename(path) in (VMSTATE, MANIFEST) or path.endswith((".img", ".state")):
        directory = os.path.dirname(path) or "."
    else:
        return
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        raise ConfigError(f"{path}: a saved migration (its manifest.json lists what `fastmfd "
                          f"listen` wrote), not a capture: inspect decodes the bytes of "
                          f"connections as they crossed the wire; a save goes back with "
                          f"`fastmfd send` (--qemu for a QEMU's)")


def cli_main(args: argparse.Namespace) -> int:
    capture = read_capture(capture_files(args.files), packet_pages=args.packet_pages,
                           layout=args.layout, checksum=args.checksum)
    summary = capture.summary()
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    # Not a terminal (a pipe, a test): wide enough that no cell is cut.
    # No markup: paths, block names and idstrs are the capture's text, brackets included.
    console = Console(width=None if sys.stdout.isatty() else 160, markup=False)
    files = [ch["file"] for ch in summary["channels"]]
    if summary["main"] is not None:
        files.append(summary["main"]["file"])
    directory = os.path.commonpath([os.path.abspath(f) for f in files]) if files else ""
    if len(files) > 1 and directory:
        console.print(f"files in {directory}")

    def _short(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), directory) if len(files) > 1 else path

    console.print(f"layout {summary['layout']}, page size {summary['page_size']}, "
                  f"{summary['packet_pages']} pages per packet")
    main = summary["main"]
    if main is None:
        console.print("main channel: not in the capture")
    elif main["format"] == "qemu":
        sections = main["ram_sections"]
        console.print(
            f"main channel {_short(main['file'])}: QEMU {main['machine']}, {main['bytes']} bytes; "
            f"RAM sections start/part/end {sections['start']}/{sections['part']}/"
            f"{sections['end']}, {main['eos']} EOS, {main['zero_pages']} zero pages, "
            f"{main['page_records']} page records in the first {main['ram_bytes']} bytes; "
            f"then device sections from {main['first_device_section']!r} "
            f"({main['vm_devices']} devices in the VM description)")
        console.print(f"multifd SYNCs {main['multifd_sync']}: {main['syncs']} barrier(s), "
                      f"{main['multifd_flushes']} MULTIFD_FLUSH record(s)")
    else:
        messages = ", ".join(f"{name} {n}" for name, n in main["messages"].items())
        console.print(f"main channel {_short(main['file'])}: fastmfd, {main['bytes']} bytes; "
                      f"messages: {messages}")

    table = Table(title="multifd channels")
    for column in ("file", "id", "kind", "compression", "packets", "normal pages",
                   "zero pages", "syncs", "empty", "repeated num", "flags", "bytes"):
        table.add_column(column, justify="left" if column in ("file", "kind", "flags")
                         else "right")
    for ch in summary["channels"]:
        table.add_row(_short(ch["file"]), str(ch["id"]), ch["kind"], ch["compression"] or "-",
                      str(ch["packets"]), str(ch["pages"]["normal"]), str(ch["pages"]["zero"]),
                      str(ch["syncs"]), str(ch["empty_packets"]),
                      str(ch["repeated_packet_num"]),
                      " ".join(f"{flag}:{n}" for flag, n in ch["flags"].items()),
                      str(ch["bytes"]))
    console.print(table)

    blocks = Table(title="RAM")
    for column in ("block", "size", "pages", "of"):
        blocks.add_column(column, justify="left" if column == "block" else "right")
    for name, block in summary["blocks"].items():
        blocks.add_row(name, _text(block["size"]), str(block["pages"]),
                       _text(block["pages_expected"]))
    ram = summary["ram"]
    console.print(blocks)
    console.print(f"{ram['pages']} pages in {ram['blocks']} blocks; "
                  f"{ram['pages_resent']} pages arrived again "
                  f"({ram['pages_resent_changed']} with new content)")
    if summary["devices"]:
        devices = Table(title="device state")
        devices.add_column("device")
        devices.add_column("bytes", justify="right")
        for name, size in summary["devices"].items():
            devices.add_row(name, str(size))
        console.print(devices)


def _text(value: object) -> str:
    return "?" if value is None else str(value)
