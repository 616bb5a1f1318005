"""The ``fastmfd`` command.

Each subcommand is a function ``cmd_<name>(args) -> int`` (``bench`` and
``inspect``: their package's ``command.cli_main``) plus its entry in
``_build_parser``; the work itself lives in the library modules, so every
command is also available from Python.

The commands' modules are imported inside the functions on purpose: a
command pays only for its own code (rich and every command's code take about
0.2 s to import).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

from .. import __version__
from ..errors import ConfigError, FastMFDError
from ..protocol.setup import COMPRESSION_METHODS
from ..units import format_bytes
from .command_line import EXIT_USAGE, CommandParser, in_options
from .option_values import (LEVEL_HELP, positive_int, positive_int_to, positive_seconds,
                            positive_seconds_to, positive_size, rate, whole_pages)
from .stop_signals import STOPPED_BY as _STOPPED_BY
from .stop_signals import Terminated
from .stop_signals import on_stop_signal as _on_stop_signal

if TYPE_CHECKING:       # imported where used, so that `fastmfd --version` starts fast
    from rich.console import Console

    from ..config import MigrationConfig
    from ..destination import DestinationResult
    from .outputs import SavedFiles

log = logging.getLogger("fastmfd")

# Exit statuses: what a shell script tells apart.
EXIT_FAILED = 1             # the work was tried and failed (a migration, a file)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..config import MigrationConfig
    from . import security_options
    from .demo import run_demo
    config = MigrationConfig(channels=args.channels, compression=args.compression,
                             downtime_limit=args.downtime_limit,
                             max_bandwidth=args.max_bandwidth)
    with security_options.loopback_security(args) as security:
        ok = run_demo(size=args.size, config=config, devices=not args.no_devices,
                      device_size=args.device_size, rate=args.device_rate, security=security)
    return 0 if ok else EXIT_FAILED


def _config(args: argparse.Namespace) -> MigrationConfig:
    from ..config import MigrationConfig
    from . import security_options
    return MigrationConfig(channels=args.channels, compression=args.compression,
                           compression_level=_level(args),
                           zero_page_detection=not args.no_zero_detection,
                           checksum=args.checksum, stall_timeout=args.stall_timeout,
                           timeout=args.timeout, max_bandwidth=args.max_bandwidth,
                           tls=security_options.tls_config(args),
                           auth_key=security_options.auth_key(args))


def _level(args: argparse.Namespace) -> int:
    """``--level``, which only zlib and zstd take (given with none or auto, it was
    taken and ignored)."""
    if args.level is None:
        return 1
    if args.compression not in ("zlib", "zstd"):
        raise ConfigError(f"--level sets zlib's or zstd's level; --compression "
                          f"{args.compression} takes none")
    return int(args.level)


def _print_json(result: dict[str, Any]) -> None:
    """A command's result for programs: one JSON object, on one line of stdout (a
    listener of several sessions prints one line each: JSON Lines)."""
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_send(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .report import stats_table
    from .transfer import ImageSpec, StateSpec, send_images
    if args.qemu:
        return _send_qemu(args)
    if not args.images or args.dir is not None:
        raise ConfigError("give IMAGE files (--dir goes with --qemu)")
    config = _config(args)
    images = [ImageSpec.parse(i) for i in args.images]
    states = [StateSpec.parse(s) for s in args.state]
    log.info("sending %d image(s) and %d state file(s) to %s", len(images), len(states),
             args.address)
    streaming = args.status_json is not None
    stats = send_images(args.address, config, images, states,
                        progress=not (args.quiet or streaming),
                        on_status=_record("status") if streaming else None,
                        status_interval=args.status_json or 0.5)
    if not (args.quiet or streaming):
        Console(stderr=True).print(stats_table(stats, channels=f"{config.channels} × "
                                                               f"{config.compression}"))
    if args.json:
        # Beside status lines, each line says its kind; alone, as it always was.
        (_record("result") if streaming else _print_json)(stats.as_dict())
    return 0


def _record(kind: str) -> Callable[[dict[str, Any]], None]:
    """_print_json of a dict with ``"record": kind`` first: on the stdout of ``send
    --status-json`` (with ``--json`` too), every line's kind, "status" or "result"
    (their fields overlap: "channels", "rounds")."""
    return lambda fields: _print_json({"record": kind, **fields})


def cmd_listen(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import security_options
    from .transfer import FailedSession, listen_once, listen_sessions
    # No markup: addresses and paths are the user's text, and rich takes '[fd00::2]' or
    # 'sav[e]d' for style tags and drops them. Soft wrap: each line stays one, the folding
    # left to a terminal; in a service's log file rich folded them at 80 columns, a path
    # apart from its arrow and a size cut in two (a review).
    console = Console(stderr=True, quiet=args.quiet, markup=False, soft_wrap=True)
    if args.qemu:
        return _listen_qemu(args, console)
    if args.workers is not None:
        raise ConfigError("--workers goes with --qemu (a fastmfd source's channels get their "
                          "workers at its SETUP)")
    options = dict(timeout=args.timeout, stall_timeout=args.stall_timeout, force=args.force,
                   keep_partial=args.keep_partial, max_size=args.max_size,
                   max_memory=args.max_memory, prealloc=args.prealloc,
                   huge_pages=args.huge_pages,
                   tls=security_options.tls_config(args, listener=True),
                   auth_key=security_options.auth_key(args))

    def on_listening(address: str) -> None:
        console.print(f"listening on {address}")

    sessions = None if args.forever else args.max_sessions
    if sessions == 1:
        _report_session(console, *listen_once(args.address, args.dir, on_listening=on_listening,
                                              **options), as_json=args.json)
        return 0
    failed = 0
    for outcome in listen_sessions(args.address, args.dir, sessions=sessions,
                                   on_listening=on_listening, **options):
        if isinstance(outcome, FailedSession):
            failed += 1
            print(f"fastmfd listen: session failed: {outcome.error}", file=sys.stderr)
            if args.json:       # a program reading the lines sees every session
                _print_json(outcome.as_json())
        else:
            _report_session(console, *outcome, as_json=args.json)
    return EXIT_FAILED if failed else 0


def _report_session(console: Console, result: DestinationResult, files: SavedFiles, *,
                    as_json: bool) -> None:
    from .._engine.admission import refused_meanwhile
    _print_files(console, files)
    prealloc = result.stats.prealloc_time_s
    console.print(f"received in {result.stats.total_time_s * 1000:.0f} ms, "
                  f"{result.stats.rounds} round(s)"
                  + (f", after {prealloc * 1000:.0f} ms of prealloc" if prealloc else ""))
    if result.stats.last_refused is not None:
        console.print(refused_meanwhile(result.stats.refused_connections,
                                        result.stats.last_refused))
    if as_json:
        _print_json({**_files_json(files), "stats": result.stats.as_dict()})


def _print_files(console: Console, files: SavedFiles) -> None:
    for what, path in files.listed():
        console.print(f"{what} -> {path} ({format_bytes(files.sizes[path])})")


def _files_json(files: SavedFiles) -> dict[str, Any]:
    """--json's "files" (by kind) and "sizes" (by path: a path names one file)."""
    return {"files": files.as_json(), "sizes": files.sizes}


def _refuse_with_qemu(args: argparse.Namespace, options: dict[str, str]) -> None:
    """A ConfigError naming the first of ``options`` (dest -> its flag) given:
    what the command cannot do with a QEMU at the other end, said up front
    rather than ignored (the --tls-* options are QEMU's TLS)."""
    if getattr(args, "auth_key_file", None) is not None:
        raise ConfigError("--qemu: QEMU's channels carry no shared-key proof (--auth-key-file)")
    for dest, flag in options.items():
        value = getattr(args, dest)
        if not (value is None or value is False):
            raise ConfigError(f"--qemu: {flag} works with fastmfd peers only, not with a QEMU")


def _listen_qemu(args: argparse.Namespace, console: Console) -> int:
    from ..qemu import DEFAULT_STALL_TIMEOUT, _ListenCommand
    from . import security_options
    _refuse_with_qemu(args, {"prealloc": "--prealloc", "huge_pages": "--huge-pages",
                             "forever": "--forever"})
    if args.max_sessions != 1:
        raise ConfigError("--qemu: receives one migration (no --max-sessions)")
    if security_options.tls_given(args) and args.tls_ca is None:
        raise ConfigError("--qemu in TLS tells QEMU's connections by their certificate: give "
                          "--tls-ca, the CA that issued the source QEMU's tls-creds "
                          "certificate")
    tls = security_options.tls_config(args, listener=True)

    def on_listening(address: str) -> None:
        console.print(f"listening on {address} (QEMU: migrate with the multifd capability"
                      f"{', and tls-creds whose certificate --tls-ca issued' if tls else ''})")

    # qemu.receive(), its errors naming this command's options (--force)
    received = _ListenCommand(
        args.address, args.dir, timeout=args.timeout,
        stall_timeout=args.stall_timeout or DEFAULT_STALL_TIMEOUT, force=args.force,
        keep_partial=args.keep_partial, max_size=args.max_size, tls=tls,
        max_memory=args.max_memory,
        **({} if args.workers is None else {"workers": args.workers})).run(on_listening)
    _print_files(console, received.files)
    facts = received.facts
    console.print(f"received from QEMU ({facts.machine}) in {received.seconds * 1000:.0f} ms: "
                  f"{facts.channels} channel(s), compression {facts.compression}, "
                  f"{facts.syncs} SYNC barrier(s) ({facts.multifd_sync}), "
                  f"{facts.ram_section_ends} RAM section end(s)")
    if args.json:
        _print_json({**_files_json(received.files), "seconds": received.seconds,
                     "channels": received.channels, "manifest": received.manifest})
    return 0


def _send_qemu(args: argparse.Namespace) -> int:
    import time

    from ..qemu import send
    from . import security_options
    if args.images or args.state or args.dir is None:
        raise ConfigError("--qemu: give --dir DIR (what listen --qemu wrote), no images "
                          "or --state files")
    _refuse_with_qemu(args, {"checksum": "--checksum",
                             "no_zero_detection": "--no-zero-detection",
                             "status_json": "--status-json"})
    if args.compression == "auto":
        raise ConfigError("--qemu: --compression auto works with fastmfd peers only; QEMU's "
                          "multifd-compression is none, zlib or zstd")
    started = time.monotonic()
    channels = send(args.address, args.dir, channels=args.channels,
                    compression=args.compression, level=_level(args),
                    stall_timeout=args.stall_timeout, timeout=args.timeout,
                    max_bandwidth=args.max_bandwidth,
                    tls=security_options.tls_config(args))
    seconds = time.monotonic() - started
    if not args.quiet:
        pages = sum(c["normal_pages"] for c in channels)
        wire = sum(c["wire_bytes"] for c in channels)
        print(f"sent {args.dir} to QEMU in {seconds * 1000:.0f} ms: "
              f"{pages} pages over {len(channels)} multifd channel(s), "
              f"{format_bytes(wire)} on the wire", file=sys.stderr)
    if args.json:
        _print_json({"seconds": seconds, "channels": channels})
    return 0


# The library parameter each option gives its value to: a ConfigError about the
# parameter names the option, with the value as typed (command_line.in_options).
_OPTION_OF = {"timeout": "--timeout", "stall_timeout": "--stall-timeout",
              "compression_level": "--level", "level": "--level", "channels": "--channels",
              "max_bandwidth": "--max-bandwidth", "cert": "--tls-cert", "key": "--tls-key",
              "ca": "--tls-ca"}


def _build_parser() -> CommandParser:
    # Their arguments name the image kinds and compression methods: lazy, as above.
    from . import security_options
    from .._engine.qemu_receiving import MAX_WORKERS as QEMU_WORKERS
    from ..arguments import MAX_TIMEOUT_SECONDS as WEEK
    from ..protocol.setup import MAX_STALL_SECONDS, MIN_STALL_SECONDS
    stall = f"{MIN_STALL_SECONDS:g}..{MAX_STALL_SECONDS:g}"
    from .bench import command as bench
    from .inspect import command as inspect

    parser = CommandParser(
        prog="fastmfd",
        description="Move memory images and ordered device state over parallel connections "
                    "(QEMU multifd, rebuilt). Progress and logs go to stderr; --json "
                    "results to stdout.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Every command takes -v, before or after its name.
    common = CommandParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log what happens to stderr (-vv: debug)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens to stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # parse_command_line checks

    parser.commands = {}

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser.commands[name] = sub.add_parser(name, parents=[common], **kwargs)
        return parser.commands[name]

    def add_channel_options(p: argparse.ArgumentParser) -> None:
        """demo's and send's: the data channels and their compression."""
        p.add_argument("--channels", type=positive_int, default=2,
                       help="multifd channels (default 2)")
        p.add_argument("--compression", choices=COMPRESSION_METHODS, default="none",
                       help="none, zlib, zstd, or auto: raw or zstd per packet, as the link "
                            "and the data make pay (default none)")

    p = add_command("demo", help="a live migration on this machine, then the seed's "
                                 "device-state downtime experiment")
    p.add_argument("--size", type=whole_pages, default=None,
                   help="image size (default 1G, or where /dev/shm has less room, as in a "
                        "container, the largest power of two that leaves a third of it free)")
    add_channel_options(p)
    p.add_argument("--no-devices", action="store_true", help="skip the device-state experiment")
    p.add_argument("--device-size", type=positive_size, default=100 << 20,
                   help="state per device in the experiment (default 100M)")
    p.add_argument("--device-rate", type=rate, default=200 << 20,
                   help="emulated per-device read and load rate, bytes/s (default 200M)")
    p.add_argument("--downtime-limit", type=positive_seconds, default=0.3, metavar="SECONDS",
                   help="stop the workload once the dirty pages left can be sent in this "
                        "long (default 0.3)")
    p.add_argument("--max-bandwidth", type=rate, default=None, metavar="RATE",
                   help="cap the live migration's channels at RATE bytes/s in all, e.g. "
                        "500M (binary units: MiB/s)")
    security_options.add_arguments(p, side="both")
    p.set_defaults(func=cmd_demo)

    p = add_command("send", help="send image files (and device state files) to a listener, "
                                 "or with --qemu a saved QEMU migration to a QEMU",
                    description="Send image files (and device state files) to `fastmfd "
                                "listen`, or with --qemu a directory `listen --qemu` saved to "
                                "a QEMU. A file is sent as it is, in one round: no workload "
                                "dirties it meanwhile, so there is no --downtime-limit (live "
                                "rounds are the library's: Source.migrate(live=True)).")
    p.add_argument("address", help="tcp:HOST:PORT (or tcp://HOST:PORT) or unix:PATH of "
                                   "`fastmfd listen` (of QEMU's migrate-incoming with --qemu)")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="PATH or NAME=PATH of a memory image (size a multiple of 4096)")
    p.add_argument("--qemu", action="store_true",
                   help="migrate what `listen --qemu` saved in --dir into a QEMU started with "
                        "-incoming defer; --channels and --compression must be its "
                        "multifd-channels and multifd-compression; exit 0 only once it says "
                        "it loaded the stream (on the return path this opens); with --tls-*: "
                        "in TLS, into a QEMU with tls-creds")
    p.add_argument("--dir", default=None, help="with --qemu: the saved directory")
    p.add_argument("--state", action="append", default=[], metavar="IDSTR[:N]=PATH",
                   help="a device state file (repeatable)")
    add_channel_options(p)
    p.add_argument("--level", type=int, default=None, help=LEVEL_HELP)
    p.add_argument("--no-zero-detection", action="store_true",
                   help="send zero pages as data")
    p.add_argument("--checksum", action="store_true", help="CRC-32 every packet (header and payload)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    p.add_argument("--status-json", type=positive_seconds_to(WEEK), nargs="?", const=0.5,
                   default=None, metavar="SECONDS",
                   help="instead of the progress and summary, print the migration's status "
                        "(QEMU query-migrate's fields) as one JSON line every SECONDS "
                        f"(default 0.5, at most {WEEK:g}), and once at the end; each line "
                        'has "record": "status" (with --json, its last line "record": '
                        '"result")')
    p.add_argument("--json", action="store_true",
                   help="print the migration's statistics as JSON on stdout (one line; "
                        'with --status-json, after the status lines, with "record": '
                        '"result")')
    p.add_argument("--timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                   help="how long connecting and the handshake may take (default 30, at "
                        f"most {WEEK:g}: a week)")
    p.add_argument("--max-bandwidth", type=rate, default=None, metavar="RATE",
                   help="cap the channels at RATE bytes/s in all, e.g. 100M (binary units: "
                        "MiB/s; default: no cap)")
    p.add_argument("--stall-timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                   help="fail, on both sides, when a channel, process or the peer makes no "
                        f"progress for this long: {stall} (default 30; the listener "
                        "honours it)")
    security_options.add_arguments(p, side="send")
    p.set_defaults(func=cmd_send)

    p = add_command("listen", help="receive one migration into files (from fastmfd send, "
                                   "or with --qemu from a QEMU)")
    p.add_argument("address", help="tcp:HOST:PORT (port 0 picks one; tcp::PORT: every IPv4 "
                                   "interface; tcp:[::]:PORT: IPv6 too) or unix:PATH")
    p.add_argument("--qemu", action="store_true",
                   help="the source is a QEMU (7.2 or 10.x) migrating with the multifd "
                        "capability: write each RAMBlock, vmstate.bin and manifest.json into "
                        "DIR; a source with the return-path capability as well completes only "
                        "once they are on disk; with --tls-*: in TLS, from a QEMU with "
                        "tls-creds whose certificate --tls-ca issued")
    p.add_argument("--workers", type=positive_int_to(QEMU_WORKERS), default=None, metavar="N",
                   help="with --qemu: receive workers started before QEMU connects (default "
                        f"2, at most {QEMU_WORKERS}; more start as channels connect)")
    p.add_argument("--dir", default=".", help="output directory (default: here)")
    p.add_argument("--timeout", type=positive_seconds, default=3600.0, metavar="SECONDS",
                   help=f"how long to wait for the sender (default 3600, at most {WEEK:g}: a "
                        "week; with --max-sessions or --forever, a wait no sender came in is "
                        "no session: it waits again)")
    p.add_argument("--stall-timeout", type=positive_seconds, default=None, metavar="SECONDS",
                   help="fail when the sender, a channel or a process makes no progress for "
                        f"this long: {stall} (default: the sender's --stall-timeout; with "
                        "--max-sessions or --forever, 30)")
    p.add_argument("--force", action="store_true",
                   help="replace files of the same names in DIR (a symbolic link is replaced, "
                        "never followed), and remove the files an earlier save's manifest.json "
                        "lists that this one does not write")
    p.add_argument("--keep-partial", action="store_true",
                   help="after a failed receive, keep what arrived as NAME.part files")
    sessions = p.add_mutually_exclusive_group()
    sessions.add_argument("--max-sessions", type=positive_int, default=1, metavar="N",
                   help="receive N migrations one after another, each into DIR/<session "
                        "uuid>/; a failed one does not end the others (default 1: into DIR)")
    sessions.add_argument("--forever", action="store_true",
                   help="like --max-sessions, with no limit: until interrupted")
    p.add_argument("--max-size", type=positive_size, default=None, metavar="SIZE",
                   help="refuse a sender whose regions (QEMU: RAM blocks) exceed SIZE, and "
                        "fail one whose device state goes past what they leave (default: "
                        "DIR's free space)")
    p.add_argument("--max-memory", type=positive_size, default=None, metavar="SIZE",
                   help="memory for device state in flight, the receive channels' "
                        "buffers and the worker processes (16 MiB each; default: what "
                        "/dev/shm has free, within what the memory cgroup has left, for the "
                        "device state only); with --prealloc and "
                        "several sessions, also the most bytes of warm region files kept for "
                        "the next session; with --qemu, the channels' buffers and workers")
    p.add_argument("--prealloc", action="store_true",
                   help="fault each region's file in (allocate every page) before the sender "
                        "may send, in parallel in the receive workers (QEMU: prealloc=on); "
                        "with several sessions, the files of the next one are faulted in "
                        "between sessions")
    p.add_argument("--huge-pages", action="store_true",
                   help="map the region files with transparent huge pages (DIR on a tmpfs "
                        "mounted huge=advise, or within_size/always); says why not otherwise")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true",
                   help="print the files written and the statistics as JSON on stdout (a "
                        "line per session; a failed one of several: {\"failed\": its error, "
                        "\"session\": its uuid or null, \"refused_connections\": N})")
    security_options.add_arguments(p, side="listen")
    p.set_defaults(func=cmd_listen)

    p = add_command("inspect", help="decode captured multifd channel bytes (fastmfd or QEMU)")
    inspect.add_arguments(p)
    p.set_defaults(func=inspect.cli_main)

    p = add_command("bench", help="time migrations across channel and compression "
                                     "settings (and peers), verify them, draw the result")
    bench.add_arguments(p)
    p.set_defaults(func=bench.cli_main)
    return parser


def _log_to_stderr(verbosity: int) -> logging.Handler | None:
    if not verbosity:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
    return handler


def _forget_the_interrupt() -> None:
    """A KeyboardInterrupt (or Terminated) that escaped an exec() of a string
    (dataclasses make their methods so) stays noted by the interpreter as unhandled,
    though handled here, and ``python -m`` then dies by SIGINT instead of exiting
    with the status (CPython's pythonrun.c, run_eval_code_obj). An exec clears the
    note as it starts."""
    exec("")


def main(argv: list[str] | None = None) -> int:
    handled = threading.current_thread() is threading.main_thread()
    if handled:     # one ignored (nohup's SIGHUP) stays so
        previous = {sig: signal.signal(sig, _on_stop_signal) for sig in _STOPPED_BY
                    if signal.getsignal(sig) is not signal.SIG_IGN}
    command = "fastmfd"             # "fastmfd listen" once the command line is read
    handler = None
    args: argparse.Namespace | None = None
    entry = sys.modules.get("_fastmfd_cli")
    try:
        # Until here, a Ctrl-C ended the command at once (the entry's handler, which
        # the imports needed: _fastmfd_cli); from here, this function handles it.
        if entry is not None and handled:
            entry.hand_over()
        # Read inside the try: building the parser imports the commands' modules
        # (0.1 s), in which a Ctrl-C or SIGTERM gave a traceback, and -2 or -15.
        parser = _build_parser()
        from .._engine.forkserver_start import interrupts_deferred
        # argparse parses a command's arguments by changing its actions and putting them
        # back in a `finally`, which a Ctrl-C before the change broke (AttributeError
        # 'save_nargs', a traceback): one there is raised once the parse is done.
        with interrupts_deferred():
            args = parser.parse_command_line(argv)
        command = f"fastmfd {args.command}"
        handler = _log_to_stderr(args.verbose)
        status: int = args.func(args)
        return status
    except ConfigError as exc:
        said = str(exc) if args is None else in_options(
            exc, _OPTION_OF, args, parser.commands[args.command])
        print(f"{command}: {said}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Whoever read the output stopped (`| head`): status 1 and nothing said, as
        # rich's console does for what it prints; stdout goes nowhere now, for the
        # flush at the interpreter's exit ("[Errno 32] Broken pipe" was said).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (FastMFDError, OSError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Terminated as stop:
        print(f"{command}: {stop.said}", file=sys.stderr)
        _forget_the_interrupt()
        return stop.status
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        _forget_the_interrupt()
        return 130
    finally:
        if handled:
            # The command's process, hung up, ignores the next hangups until it exits
            # (_on_stop_signal); a program calling this function gets back what it had.
            exits = entry is not None and entry.installed
            for sig, disposition in previous.items():
                if not (exits and signal.getsignal(sig) is signal.SIG_IGN):
                    signal.signal(sig, disposition)
        if handler is not None:
            log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
