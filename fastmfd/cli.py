"""The ``fastmfd`` command.

Each subcommand is a function ``cmd_<name>(args) -> int`` plus an entry in
``_build_parser``; the work itself lives in the library modules, so every
command is also available from Python.
"""

from __future__ import annotations

import argparse
import sys

from .errors import FastMFDError


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import inspect
    return inspect.cli_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    return bench.cli_main(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmfd",
        description="Move memory images and ordered device state over parallel connections "
                    "(QEMU multifd, rebuilt).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="decode captured multifd channel bytes (fastmfd or QEMU)")
    from . import inspect
    inspect.add_arguments(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="time migrations across channel and compression "
                                     "settings (and peers), verify them, draw the result")
    from . import bench
    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastMFDError as exc:
        print(f"fastmfd {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastmfd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
