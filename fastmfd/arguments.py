"""Wrong types at the public entry points: a TypeError that names the parameter.

Every public constructor and method checks its arguments first, so
``Region.create("ram", "4096")`` says ``Region.create(size) must be an int, not
str`` instead of failing on a comparison deep inside, or accepting it and
failing in a worker later.

What a parameter accepts is a :class:`Kind`, said once here: a bool is an int
to Python but never a size or a count to a user, and a float is a number of
seconds or bytes per second but never a size (4096.0 is refused, not
truncated). Any integer (numpy's too) is a size or count and any real number
(numpy's, a Fraction) a number of seconds or a rate: :func:`check_types`
returns each converted to Python's int or float, the one type the rest of
fastmfd sees (they go on the wire in JSON, and to the socket calls, which take
Python's numbers only). A value of the right type that cannot work (a negative
size) is a ConfigError, raised after. A flag (``huge_pages=...``) is True or
False: ``"no"`` would be true.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Any, Callable, NamedTuple

__all__ = ["Kind", "INT", "NUMBER", "BOOL", "STR", "PATH", "BYTES", "BUFFER", "CALLABLE",
           "instance_of", "optional", "check_types", "type_error"]


def _same(value: Any) -> Any:
    return value


class Kind(NamedTuple):
    """What a parameter accepts: the values ``accepts`` is true of, ``what`` in words,
    each made the one type fastmfd uses by ``convert``."""
    what: str
    accepts: Callable[[Any], bool]
    convert: Callable[[Any], Any] = _same


def _is_integral(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:           # an int or Fraction past float's range: refused as infinite
        return math.inf if value > 0 else -math.inf


def _is_buffer(value: Any) -> bool:
    try:
        memoryview(value).release()
    except TypeError:
        return False
    return True


INT = Kind("an int", _is_integral, operator.index)
NUMBER = Kind("a real number", _is_real, _to_float)
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
    return Kind(f"{kind.what} or None", lambda value: value is None or kind.accepts(value),
                lambda value: None if value is None else kind.convert(value))


def check_types(call: str, **arguments: tuple[object, Kind]) -> tuple[Any, ...]:
    """The values of ``arguments`` (``parameter=(value, kind)``), each converted by
    its kind, in their order. Raises a TypeError naming ``call(parameter)`` for the
    first whose value is not of its kind."""
    for parameter, (value, kind) in arguments.items():
        if not kind.accepts(value):
            raise type_error(f"{call}({parameter})", kind.what, value)
    return tuple(kind.convert(value) for value, kind in arguments.values())


def type_error(parameter: str, expected: str, value: object) -> TypeError:
    kind = type(value)
    name = (kind.__qualname__ if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}")
    return TypeError(f"{parameter} must be {expected}, not {name}")