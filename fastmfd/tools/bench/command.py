"""``fastmfd bench``: its arguments, the settings they name, and the run."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import TypeVar

from rich.console import Console

from ...config import COMPRESSION_METHODS
from ...errors import ConfigError
from .. import security_options
from ..images import IMAGE_KINDS, Image, check_scratch_room
from ...units import format_bytes, format_rate
from ..new_files import check_new_file, write_new_file
from ..option_values import LEVEL_HELP, positive_int, whole_pages
from .document import (LINK, RunConditions, check_comparable, document, emulated,
                       load_baseline)
from .link import EmulatedLink, LinkSpec, check_can_emulate, parse_link
from .matrix import PEERS, QEMU_METHODS, Result, Setting, run_matrix
from .output import comparison_table, render
from .peers import check_guest_size, check_qemu, find_qemu
from .trial import FOREIGN_LOAD_FLAG, Measurement

__all__ = ["add_arguments", "settings_from_args", "cli_main"]

_T = TypeVar("_T")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         f"channel counts") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"channel counts must be >= 1, not {text!r}")
    return _once(values)


def _once(values: list[_T]) -> list[_T]:
    """``values`` without repeats, in order: a setting or image named twice ran twice per
    repeat and both runs went into its one row (a median of 2 beside rows of 1)."""
    return list(dict.fromkeys(values))


def _choice_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad) or repr(text)}: choose from {', '.join(choices)}")
        return _once(values)
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=whole_pages, default=256 << 20,
                        help="image size, e.g. 64M, 1G (default 256M)")
    parser.add_argument("--channels", type=_int_list, default=[1, 2, 4],
                        help="comma-separated channel counts (default 1,2,4); here and in "
                             "--compression and --image a value named twice runs once")
    parser.add_argument("--compression", type=_choice_list(COMPRESSION_METHODS),
                        default=list(COMPRESSION_METHODS),
                        help="comma-separated methods from none, zlib, zstd, auto (fastmfd "
                             "only: raw or zstd per packet; default all)")
    parser.add_argument("--level", type=int, default=1, help=LEVEL_HELP)
    parser.add_argument("--image", type=_choice_list(IMAGE_KINDS), default=["random"],
                        help="random (incompressible), text, mixed (the demo's: half zero "
                             "pages, a quarter text, a quarter random), halftext (half zero "
                             "pages, half text) or zero; comma-separated for several "
                             "(default random)")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="runs per setting; the table shows the median, the fastest, "
                             "the first (cold) run and the spread, and odd runs go in reverse "
                             "order (default 1)")
    parser.add_argument("--peer", action="append", choices=PEERS, default=[],
                        help="also time a peer on the same image: sendall (one plain "
                             "socket) or qemu (real QEMU multifd, needs qemu-system-x86_64: "
                             "QEMU -> QEMU, QEMU -> fastmfd listen --qemu, fastmfd send "
                             "--qemu -> QEMU); repeatable")
    parser.add_argument("--qemu-binary", default=None, metavar="PATH",
                        help="QEMU to run for --peer qemu (default: qemu-system-x86_64 "
                             "on PATH), with machine type pc: the binary's current one "
                             "(QEMU 10's own stream from a QEMU 10)")
    parser.add_argument("--prealloc", action="store_true",
                        help="allocate and fault in the destination's memory before timing "
                             "(QEMU: prealloc=on): times the transport without the cost of "
                             "fresh memory")
    parser.add_argument("--cold-memory", action="store_true",
                        help="do not warm the machine's free memory right before each timed "
                             "run: each destination takes memory as the host left it (on a VM "
                             "that hands free memory back to its host, memory freed a few "
                             "seconds ago costs several times more to touch, so runs spread "
                             "with whatever came before them)")
    parser.add_argument("--link", metavar="RATE[/DELAY]", type=_link, default=None,
                        help="run every destination (fastmfd's and the peers') behind an "
                             "emulated link instead of loopback: a network namespace joined "
                             "by a veth shaped with tc, RATE each way (e.g. 1gbit, 10gbit) "
                             "and DELAY each way (e.g. 10gbit/1ms; needs the kernel's "
                             "netem); needs root")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the results to FILE as JSON, in pytest-benchmark's "
                             "layout with the machine, commit and date")
    parser.add_argument("--compare", metavar="OLD.json", default=None,
                        help="also print each result beside the same one in OLD.json (a "
                             "file --json wrote): best times and the speed-up (> 1x: faster "
                             "now), for results of the same image size, --prealloc, "
                             "--cold-memory, --link and TLS only (exit 2 before the run "
                             "when none is)")
    parser.add_argument("--chart", metavar="FILE.svg", type=_svg, default=None,
                        help="also draw the tables and throughput charts into FILE.svg")
    security_options.add_arguments(parser, side="both")


def _link(text: str) -> LinkSpec:
    try:
        return parse_link(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _svg(text: str) -> str:
    if not text.endswith(".svg"):
        raise argparse.ArgumentTypeError(f"{text!r}: the chart is drawn as SVG; name a .svg file")
    return text


def settings_from_args(args: argparse.Namespace) -> list[Setting]:
    """The settings to time, in run (and table) order: the sendall peer first, then
    each (compression, channels) cell with its QEMU peer right after it."""
    methods = ["fastmfd"] + (list(QEMU_METHODS) if "qemu" in args.peer else [])
    settings = [Setting("sendall", 1, "none")] if "sendall" in args.peer else []
    # QEMU has no "auto": that cell is fastmfd's alone.
    settings += [Setting(method, ch, comp, args.level)
                 for comp in args.compression for ch in args.channels for method in methods
                 if comp != "auto" or method == "fastmfd"]
    for setting in settings:
        if setting.method != "sendall":
            setting.config()            # a bad level fails here, before any work
    return settings


def _check_room(args: argparse.Namespace) -> None:
    """The images, QEMU's saved copy of each (--peer qemu) and one destination's copy
    at a time, all in memory: a --size of 100T failed once it made the image."""
    count = len(args.image)
    copies = count * (2 if "qemu" in args.peer else 1) + 1
    check_scratch_room(copies * args.size, (
        f"--size {format_bytes(args.size)}: {count} image{'s' * (count > 1)}"
        + (", QEMU's saved copy of each" if "qemu" in args.peer else "")
        + " and a destination's copy"))


def cli_main(args: argparse.Namespace) -> int:
    # No markup: --compare's file name titles a table, brackets included.
    console = Console(width=None if sys.stdout.isatty() else 120, markup=False)
    log = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    settings = settings_from_args(args)
    if args.link is not None:
        check_can_emulate(args.link)    # at once: before a link's namespace, or any run
    for option, path in (("--json", args.json), ("--chart", args.chart)):
        if path:
            check_new_file(path, option)
    # Each passes its check alone; the second write would fail after every run.
    if args.json and args.chart and os.path.realpath(args.json) == os.path.realpath(args.chart):
        raise ConfigError(f"--json and --chart both name {args.chart}: give each its own file")
    baseline = load_baseline(args.compare) if args.compare else None
    qemu_version = None
    if "qemu" in args.peer:
        args.qemu_binary = find_qemu(args.qemu_binary)
        qemu_version = check_qemu(args.qemu_binary)     # before any timed run
        check_guest_size(args.size)
    elif args.qemu_binary is not None:
        raise ConfigError("--qemu-binary goes with --peer qemu")
    _check_room(args)
    images: list[Image] = []
    with ExitStack() as cleanup:
        link = cleanup.enter_context(EmulatedLink(args.link)) if args.link else None
        # Its destinations listen on the link's far end: --tls's certificate names it.
        security = cleanup.enter_context(security_options.loopback_security(
            args, (link.destination_host,) if link is not None else ()))
        conditions = RunConditions(
            tls=security.label or None, prealloc=args.prealloc, warm_memory=not args.cold_memory,
            link=emulated(args.link.text) if args.link else LINK,
            qemu=qemu_version)
        if baseline is not None:
            # Before any image is made: a comparison that would pair nothing costs no run.
            check_comparable(baseline, [(Result(s, kind).name, conditions.of(s, args.size))
                                        for kind in args.image for s in settings], args.compare)
        for kind in args.image:
            log.print(f"making a {format_bytes(args.size)} {kind} image ...")
            # Each closed by the stack: an interrupt closing one stops none of the others.
            images.append(cleanup.enter_context(Image.create(kind, args.size)))

        def progress(kind: str, setting: Setting, number: int, m: Measurement) -> None:
            load = m.details.get("foreign_cores", 0)
            log.print(f"  {kind:<6} {setting.label:<24} run {number + 1}: "
                      f"{m.seconds * 1000:8.1f} ms  {format_rate(m.throughput)}  verified"
                      + (f"  (other load {load:.2f} cores)" if load > FOREIGN_LOAD_FLAG
                         else ""))

        results = run_matrix(settings, images, args.repeat, progress,
                             qemu_binary=args.qemu_binary, prealloc=args.prealloc,
                             security=security, link=link, warm_memory=not args.cold_memory)
    notes = [f", over an emulated {args.link.text} link"] if args.link else []
    if args.prealloc:
        notes.append(", destination preallocated")
    if args.cold_memory:
        notes.append(", free memory not warmed")
    if security.label:
        notes.append(f", fastmfd with {security.label}")
    if qemu_version is not None:
        notes.append(f", {qemu_version}")
    if "qemu" in args.peer and security.source_tls is not None:
        notes.append(", QEMU in TLS (its tls-creds)")
    render(results, console, note="".join(notes))
    if baseline is not None:
        console.print(comparison_table(results, baseline, args.compare, conditions))
    if args.chart:
        chart = Console(record=True, width=120, file=io.StringIO(), markup=False)
        render(results, chart, note="".join(notes))
        write_new_file(args.chart, chart.export_svg(title="fastmfd bench").encode())
    if args.json:
        write_new_file(args.json, json.dumps(document(results, conditions), indent=2).encode()
                       + b"\n")
    return 0
