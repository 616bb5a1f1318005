"""Wrong types at the public entry points: a TypeError that names the parameter.

Every public constructor and method checks the types of its arguments first,
before any work, so ``Region.create("ram", "4096")`` says
``Region.create(size) must be an int, not str`` instead of failing on a
comparison deep inside, or accepting it and failing in a worker later. A value
of the right type that cannot work (a negative size) is a ConfigError, raised
after.

What a parameter accepts is a :class:`Kind`, said once here: a bool is an int
to Python but never a size or a count to a user, and a float is a number of
seconds or bytes per second but never a size (4096.0 is refused, not
truncated). Sizes, counts, seconds and rates must be Python's int and float (a
numpy number is refused, saying how to convert it): they go on the wire in JSON
and to the socket calls as they are. A flag (``huge_pages=...``) is True or
False: ``"no"`` would be true.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Callable, NamedTuple

__all__ = ["Kind", "INT", "NUMBER", "BOOL", "STR", "PATH", "BYTES", "BUFFER", "CALLABLE",
           "instance_of", "optional", "check_types", "type_error"]


class Kind(NamedTuple):
    """What a parameter accepts: the values ``accepts`` is true of, ``what`` in words."""
    what: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_buffer(value: Any) -> bool:
    try:
        memoryview(value).release()
    except TypeError:
        return False
    return True


INT = Kind("an int", _is_int)
NUMBER = Kind("a number", _is_number)
BOOL = Kind("True or False", lambda value: isinstance(value, bool))
STR = Kind("a str", lambda value: isinstance(value, str))
PATH = Kind("a str or os.PathLike", lambda value: isinstance(value, (str, os.PathLike)))
BYTES = Kind("bytes", lambda value: isinstance(value, (bytes, bytearray)))
BUFFER = Kind("a bytes-like object", _is_buffer)
CALLABLE = Kind("callable", callable)


def instance_of(cls: type, what: str) -> Kind:
    return Kind(what, lambda value: isinstance(value, cls))


def optional(kind: Kind) -> Kind:
    """``kind``, or None."""
    return Kind(f"{kind.what} or None", lambda value: value is None or kind.accepts(value))


def check_types(call: str, **arguments: tuple[object, Kind]) -> None:
    """Raise a TypeError naming ``call(parameter)`` for the first of ``arguments``
    (``parameter=(value, kind)``) whose value is not of its kind."""
    for parameter, (value, kind) in arguments.items():
        if not kind.accepts(value):
            raise type_error(f"{call}({parameter})", kind.what, value)


def type_error(parameter: str, expected: str, value: object) -> TypeError:
    kind = type(value)
    name = (kind.__qualname__ if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}")
    # A numpy number is neither int nor float: sizes and counts go on the wire (JSON)
    # as they are, and seconds to the socket calls that take Python's numbers only.
    hint = ""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if expected.startswith("an int") and isinstance(value, numbers.Integral):
            hint = " (int(value) converts it)"
        elif expected.startswith("a number"):
            hint = " (float(value) converts it)"
    return TypeError(f"{parameter} must be {expected}, not {name}{hint}")
