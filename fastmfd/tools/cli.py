"""The ``fastmfd`` command.

Each subcommand is a function ``cmd_<name>(args) -> int`` (``bench`` and
``inspect``: their package's ``command.cli_main``) plus its entry in
``_build_parser``; the work itself lives in the library modules, so every
command is also available from Python.

The commands' modules are imported inside the functions on purpose: the
worker processes a command starts (through multiprocessing's forkserver)
import the program's main module, ``fastmfd.__main__`` and so this one, and
should not pay for rich and every command's code (about 0.2 s) to start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..errors import FastMFDError
from .units import format_bytes, parse_size


def cmd_demo(args: argparse.Namespace) -> int:
    from . import security_options
    from .demo import run_demo
    with security_options.loopback_security(args) as security:
        ok = run_demo(size=args.size, channels=args.channels, compression=args.compression,
                      devices=not args.no_devices, device_size=args.device_size,
                      rate=args.device_rate, security=security)
    return 0 if ok else 1


def _config(args: argparse.Namespace):
    from ..config import MigrationConfig
    from . import security_options
    return MigrationConfig(channels=args.channels, compression=args.compression,
                           compression_level=args.level,
                           zero_page_detection=not args.no_zero_detection,
                           checksum=args.checksum, stall_timeout=args.stall_timeout,
                           tls=security_options.tls_config(args),
                           auth_key=security_options.auth_key(args))


def cmd_send(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..errors import ConfigError
    from .report import stats_table
    from .transfer import ImageSpec, StateSpec, send_images
    if args.qemu:
        return _send_qemu(args)
    if not args.images or args.dir is not None:
        raise ConfigError("send: give IMAGE files (--dir goes with --qemu)")
    config = _config(args)
    stats = send_images(args.address, config, [ImageSpec.parse(i) for i in args.images],
                        [StateSpec.parse(s) for s in args.state], progress=not args.quiet)
    if not args.quiet:
        Console().print(stats_table(stats, channels=f"{config.channels} × "
                                                    f"{config.compression}"))
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import security_options
    from .transfer import listen_once
    console = Console(stderr=True)
    if args.qemu:
        return _listen_qemu(args, console)
    result, files = listen_once(
        args.address, args.dir, timeout=args.timeout, stall_timeout=args.stall_timeout,
        force=args.force, keep_partial=args.keep_partial,
        on_listening=lambda address: console.print(f"listening on {address}"),
        tls=security_options.tls_config(args), auth_key=security_options.auth_key(args))
    for name, path in files.items():
        console.print(f"{name} -> {path} ({format_bytes(os.path.getsize(path))})")
    console.print(f"received in {result.stats.total_time_s * 1000:.0f} ms, "
                  f"{result.stats.rounds} round(s)")
    return 0


def _listen_qemu(args: argparse.Namespace, console) -> int:
    from ..errors import ConfigError
    from ..qemu import DEFAULT_STALL_TIMEOUT, receive
    from . import security_options
    if security_options.tls_config(args) or security_options.auth_key(args):
        raise ConfigError("--qemu: QEMU's channels carry no fastmfd TLS or shared-key proof")
    received = receive(
        args.address, args.dir, timeout=args.timeout,
        stall_timeout=args.stall_timeout or DEFAULT_STALL_TIMEOUT, force=args.force,
        keep_partial=args.keep_partial, workers=args.workers,
        on_listening=lambda address: console.print(f"listening on {address} (QEMU: migrate "
                                                   f"with the multifd capability)"))
    for name, path in received.files.items():
        console.print(f"{name} -> {path} ({format_bytes(os.path.getsize(path))})")
    facts = received.facts
    console.print(f"received from QEMU ({facts.machine}) in {received.seconds * 1000:.0f} ms: "
                  f"{facts.channels} channel(s), compression {facts.compression}, "
                  f"{facts.rounds} RAM section end(s)")
    return 0


def _send_qemu(args: argparse.Namespace) -> int:
    import time

    from ..errors import ConfigError
    from ..qemu import send
    from . import security_options
    if args.images or args.state or args.dir is None:
        raise ConfigError("send --qemu: give --dir DIR (what listen --qemu wrote), no images")
    if security_options.tls_config(args) or security_options.auth_key(args) \
            or args.checksum or args.no_zero_detection:
        raise ConfigError("send --qemu: QEMU's channels take no fastmfd TLS, shared key, "
                          "checksum or zero-page setting")
    started = time.monotonic()
    channels = send(args.address, args.dir, channels=args.channels,
                    compression=args.compression, level=args.level,
                    stall_timeout=args.stall_timeout)
    if not args.quiet:
        pages = sum(c["normal_pages"] for c in channels)
        wire = sum(c["wire_bytes"] for c in channels)
        print(f"sent {args.dir} to QEMU in {(time.monotonic() - started) * 1000:.0f} ms: "
              f"{pages} pages over {len(channels)} multifd channel(s), "
              f"{format_bytes(wire)} on the wire", file=sys.stderr)
    return 0


def _build_parser() -> argparse.ArgumentParser:
    # Their arguments name the image kinds and compression methods: lazy, as above.
    from . import security_options
    from .bench import command as bench
    from .inspect import command as inspect

    parser = argparse.ArgumentParser(
        prog="fastmfd",
        description="Move memory images and ordered device state over parallel connections "
                    "(QEMU multifd, rebuilt).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="a live migration on this machine, then the seed's "
                                    "device-state downtime experiment")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="image size (default 1G)")
    p.add_argument("--channels", type=int, default=2, help="multifd channels (default 2)")
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default="none")
    p.add_argument("--no-devices", action="store_true", help="skip the device-state experiment")
    p.add_argument("--device-size", type=parse_size, default=100 << 20,
                   help="state per device in the experiment (default 100M)")
    p.add_argument("--device-rate", type=parse_size, default=200 << 20,
                   help="emulated per-device read and load rate, bytes/s (default 200M)")
    security_options.add_arguments(p, loopback=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("send", help="send image files (and device state files) to a listener, "
                                    "or with --qemu a saved QEMU migration to a QEMU")
    p.add_argument("address", help="tcp:HOST:PORT or unix:PATH of `fastmfd listen` (of QEMU's "
                                   "migrate-incoming with --qemu)")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="PATH or NAME=PATH of a memory image (size a multiple of 4096)")
    p.add_argument("--qemu", action="store_true",
                   help="migrate what `listen --qemu` saved in --dir into a QEMU started with "
                        "-incoming defer; --channels and --compression must be its "
                        "multifd-channels and multifd-compression")
    p.add_argument("--dir", default=None, help="with --qemu: the saved directory")
    p.add_argument("--state", action="append", default=[], metavar="IDSTR[:N]=PATH",
                   help="a device state file (repeatable)")
    p.add_argument("--channels", type=int, default=2, help="multifd channels (default 2)")
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default="none")
    p.add_argument("--level", type=int, default=1, help="compression level (default 1)")
    p.add_argument("--no-zero-detection", action="store_true",
                   help="send zero pages as data")
    p.add_argument("--checksum", action="store_true", help="CRC-32 every packet's payload")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    p.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="fail, on both sides, when a channel, process or the peer makes no "
                        "progress for this long (default 30; the listener honours it)")
    security_options.add_arguments(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("listen", help="receive one migration into files (from fastmfd send, "
                                      "or with --qemu from a QEMU)")
    p.add_argument("address", help="tcp:HOST:PORT (port 0 picks one) or unix:PATH")
    p.add_argument("--qemu", action="store_true",
                   help="the source is a QEMU (7.2) migrating with the multifd capability: "
                        "write each RAMBlock, vmstate.bin and manifest.json into DIR")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="with --qemu: receive workers started before QEMU connects (default "
                        "2; more start as channels connect)")
    p.add_argument("--dir", default=".", help="output directory (default: here)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds to wait for the sender (default 3600)")
    p.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                   help="fail when the sender, a channel or a process makes no progress for "
                        "this long (default: the sender's --stall-timeout)")
    p.add_argument("--force", action="store_true",
                   help="replace files of the same names in DIR (a symbolic link is replaced, "
                        "never followed)")
    p.add_argument("--keep-partial", action="store_true",
                   help="after a failed receive, keep what arrived as NAME.part files")
    security_options.add_arguments(p)
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("inspect", help="decode captured multifd channel bytes (fastmfd or QEMU)")
    inspect.add_arguments(p)
    p.set_defaults(func=inspect.cli_main)

    p = sub.add_parser("bench", help="time migrations across channel and compression "
                                     "settings (and peers), verify them, draw the result")
    bench.add_arguments(p)
    p.set_defaults(func=bench.cli_main)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is, so it
    does what Ctrl-C does: the session fails on both sides (the peer is told
    "terminated by SIGTERM"), every process and file the command made is cleaned
    up, and the command exits with 143 (128 + SIGTERM; Ctrl-C: 130)."""


def _on_sigterm(signum, frame) -> None:
    # A second SIGTERM, while the first one's cleanup runs, ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated("terminated by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handled = threading.current_thread() is threading.main_thread()
    if handled:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except FastMFDError as exc:
        print(f"fastmfd {args.command}: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"fastmfd {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"fastmfd {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if handled:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
