"""Sizes and rates as the tools read and print them: binary units everywhere.

``parse_size("1.5G") == 3 << 29`` on the way in; ``format_bytes(3 << 29) ==
"1.50 GiB"`` and ``format_rate(...)`` (``"... GiB/s"``) on the way out, with
three significant digits, so every command prints sizes alike.
"""

from __future__ import annotations

import argparse
import re
from fractions import Fraction

__all__ = ["parse_size", "format_bytes", "format_rate"]

# ASCII: Unicode rules took other scripts' digits, and a dotless i for 'i'.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE | re.ASCII)
_MAX_DIGITS = 40        # characters of a number (Fraction refuses over 4300 digits)
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``256M``, ``1G``, ``1.5GiB`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 64K, 256M, 1G)")
    if len(match.group(1)) > _MAX_DIGITS:
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: a number of more than {_MAX_DIGITS} "
                                         f"characters is no size")
    # Exact: float() made 400 nines infinity, and int() of it raised OverflowError (a
    # traceback: argparse turns only ValueError and TypeError into a usage error).
    number, unit = Fraction(match.group(1)), match.group(2).lower()
    scale = 1 << (10 * ("kmgt".index(unit) + 1)) if unit else 1
    return int(number * scale)


def format_bytes(n: float) -> str:
    """``512 B``, ``4.00 KiB``, ``12.5 MiB``, ``256 MiB``, ``1.50 GiB``."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            break
        n /= 1024
    if unit == "B":
        return f"{n:.0f} B"
    decimals = 2 if abs(n) < 10 else 1 if abs(n) < 100 else 0
    return f"{n:.{decimals}f} {unit}"


def format_rate(bytes_per_s: float) -> str:
    """A throughput: ``format_bytes`` per second."""
    return f"{format_bytes(bytes_per_s)}/s"
