"""Arguments at the public entry points: a wrong type is a TypeError that names the
parameter, a value that cannot work a ConfigError that names it too, both raised
before any work.

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
Python's numbers only). A flag (``huge_pages=...``) is True or False: ``"no"``
would be true.

A kind may also bound its values (:func:`within`): a timeout is a finite
number of seconds > 0, a seed fits in 64 bits. A value of the right type out
of those bounds is a ConfigError, raised once every type is checked, before any
work: not a failure deep inside a migration (an infinite timeout overflowed a
deadline, a negative seed a worker's uint64).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Any, Callable, NamedTuple

from .errors import ConfigError

__all__ = ["Kind", "INT", "UNSIGNED", "SEED", "NUMBER", "POSITIVE", "TIMEOUT",
           "MAX_TIMEOUT_SECONDS", "BOOL", "STR", "PATH",
           "BYTES", "BUFFER", "CALLABLE", "instance_of", "optional", "within", "up_to",
           "check_types", "type_error"]


def _same(value: Any) -> Any:
    return value


class Kind(NamedTuple):
    """What a parameter accepts: the values ``accepts`` is true of, ``what`` in words,
    each made the one type fastmfd uses by ``convert``; of those, only the ones
    ``valid`` is true of (``valid_what`` in words) can work."""
    what: str
    accepts: Callable[[Any], bool]
    convert: Callable[[Any], Any] = _same
    valid: Callable[[Any], bool] | None = None
    valid_what: str = ""
    none_too: bool = False          # optional(): None is valid too


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


def within(kind: Kind, valid_what: str, valid: Callable[[Any], bool]) -> Kind:
    """``kind``, of which only the values ``valid`` is true of can work."""
    return kind._replace(valid=valid, valid_what=valid_what)


INT = Kind("an int", _is_integral, operator.index)
UNSIGNED = within(INT, "an int >= 0", lambda value: value >= 0)
SEED = within(INT, "an int in 0..2**64-1", lambda value: 0 <= value < 1 << 64)
NUMBER = Kind("a real number", _is_real, _to_float)
POSITIVE = within(NUMBER, "a finite number > 0", lambda value: 0 < value < math.inf)
"""Seconds and rates (bytes per second)."""
MAX_TIMEOUT_SECONDS = 7 * 86400.0
"""The longest ``timeout`` (a wait for a peer, a connection or a handshake): a week.
Longer ones overflowed the waits (poll()'s milliseconds, a deadline's time_t)."""
TIMEOUT = within(NUMBER, f"seconds > 0, at most {MAX_TIMEOUT_SECONDS:g} (a week)",
                 lambda value: 0 < value <= MAX_TIMEOUT_SECONDS)
BOOL = Kind("True or False", lambda value: isinstance(value, bool))
STR = Kind("a str", lambda value: isinstance(value, str))
PATH = Kind("a str or os.PathLike", lambda value: isinstance(value, (str, os.PathLike)))
BYTES = Kind("bytes", lambda value: isinstance(value, (bytes, bytearray)))
BUFFER = Kind("a bytes-like object", _is_buffer)
CALLABLE = Kind("callable", callable)


def up_to(most: int, why: str) -> Kind:
    """An int in 0..``most``, what can be used (``why`` says what bounds it)."""
    return within(INT, f"an int in 0..{most} ({why})", lambda value: 0 <= value <= most)


def instance_of(cls: type, what: str) -> Kind:
    return Kind(what, lambda value: isinstance(value, cls))


def optional(kind: Kind) -> Kind:
    """``kind``, or None."""
    valid = kind.valid
    return Kind(f"{kind.what} or None", lambda value: value is None or kind.accepts(value),
                lambda value: None if value is None else kind.convert(value),
                None if valid is None else (lambda value: value is None or valid(value)),
                kind.valid_what, none_too=True)


def check_types(call: str, **arguments: tuple[object, Kind]) -> tuple[Any, ...]:
    """The values of ``arguments`` (``parameter=(value, kind)``), each converted by
    its kind, in their order. Raises a TypeError naming ``call(parameter)`` for the
    first whose value is not of its kind, then a ConfigError for the first whose
    converted value its kind does not take as valid (its ``parameter`` and its
    ``problem``: what the value must be, None aside, which a command cannot give)."""
    for parameter, (value, kind) in arguments.items():
        if not kind.accepts(value):
            raise type_error(f"{call}({parameter})", kind.what, value)
    converted = tuple(kind.convert(value) for value, kind in arguments.values())
    for (parameter, (value, kind)), made in zip(arguments.items(), converted):
        if kind.valid is not None and not kind.valid(made):
            must = f"must be {kind.valid_what}"
            raise ConfigError(f"{call}({parameter}) {must}{' or None' * kind.none_too}, "
                              f"not {value!r:.80}", parameter=parameter, problem=must)
    return converted


def type_error(parameter: str, expected: str, value: object) -> TypeError:
    """``parameter`` was given ``value``: its type, or the class itself (an
    instance was meant: ``CollectLoader`` for ``CollectLoader()``)."""
    kind = value if isinstance(value, type) else type(value)
    name = (kind.__qualname__ if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}")
    given = f"the class {name}" if isinstance(value, type) else name
    return TypeError(f"{parameter} must be {expected}, not {given}")