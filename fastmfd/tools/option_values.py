"""What the commands' options take: argparse types that refuse a bad value
while the command line is read, before any work, in one line that names it
(``fastmfd send: argument --timeout: '0' is not a positive number of seconds``).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from ..protocol.setup import COMPRESSION_LEVELS
from ..units import parse_size

__all__ = ["positive_int", "positive_int_to", "positive_seconds", "positive_seconds_to",
           "positive_size", "whole_pages", "rate", "LEVEL_HELP"]

PAGE = 4096
_ZLIB, _ZSTD = COMPRESSION_LEVELS["zlib"], COMPRESSION_LEVELS["zstd"]
LEVEL_HELP = (f"zlib's ({_ZLIB.start}..{_ZLIB.stop - 1}) or zstd's ({_ZSTD.start}.."
              f"{_ZSTD.stop - 1}) level (default 1)")
"""--level's help: send's and bench's, with one range per method (the library's)."""


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:    # "²" is a digit
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def positive_int_to(most: int) -> Callable[[str], int]:
    """A whole number in 1..``most``."""
    def parse(text: str) -> int:
        if positive_int(text) > most:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in 1..{most}")
        return int(text)
    return parse


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def positive_seconds_to(most: float) -> Callable[[str], float]:
    """Positive seconds, at most ``most`` (a wait longer than the platform's time
    can say ends in an OverflowError where it is waited on)."""
    def parse(text: str) -> float:
        seconds = positive_seconds(text)
        if seconds > most:
            raise argparse.ArgumentTypeError(f"{text!r} is more than {most:g} seconds")
        return seconds
    return parse


def positive_size(text: str) -> int:
    return _positive_bytes(text, "size")


def whole_pages(text: str) -> int:
    """A positive size that is a whole number of 4 KiB pages (an image's)."""
    size = positive_size(text)
    if size % PAGE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 4 KiB pages")
    return size


def rate(text: str) -> int:
    """Bytes per second, in a size's units (``100M``: 100 MiB/s)."""
    return _positive_bytes(text, "rate")


def _positive_bytes(text: str, what: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive {what}")
    return value
