"""Bounded reprs of what fastmfd returns: a result, its statistics, a SETUP.

A dataclass's own repr shows every value whole: a
:class:`~fastmfd.DestinationResult` with a device's state of 64 MiB (what a
CollectLoader returns) was a repr of 256 MB, and statistics or a SETUP of 4096
devices one of 150 KB. Here, at most :data:`ITEMS` entries of a collection are
shown, then how many more there are; bytes longer than :data:`BYTES_SHOWN` are
said by their size; text is cut at :data:`TEXT_SHOWN` characters; sets, and
subclasses of dict, list and tuple (a namedtuple by its fields) are shown as those
are, and an int of over 256 bits by its size. Any other value is its own
repr (a Region's, a ChannelStats', a number's), cut at :data:`OTHER_SHOWN`
characters, or what it is if that repr raises.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

__all__ = ["ITEMS", "BYTES_SHOWN", "TEXT_SHOWN", "OTHER_SHOWN", "short_repr", "fields_repr"]

ITEMS = 8
BYTES_SHOWN = 32
TEXT_SHOWN = 80
OTHER_SHOWN = 1000  # characters of any other value's own repr (a deque's, an object's)
_INT_BITS = 256     # an int longer is said by its size (77 digits)
_DEPTH = 4          # collections within collections shown; deeper ones by their length


def short_repr(value: object, depth: int = _DEPTH) -> str:
    """``value``'s repr, bounded as the module says."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            size = memoryview(value).nbytes
        except ValueError:              # a memoryview released (its memory is not read)
            return "<released memoryview>"
        if size > BYTES_SHOWN:
            kind = "" if type(value) is bytes else f"{type(value).__name__} of "
            return f"<{kind}{size} bytes>"
        return repr(value)
    if isinstance(value, str):
        if len(value) > TEXT_SHOWN:
            return f"{value[:TEXT_SHOWN]!r}... ({len(value)} characters)"
        return repr(value)
    if type(value) is int and value.bit_length() > _INT_BITS:
        # (repr() of one over 4300 digits raises ValueError)
        return f"<int of {value.bit_length()} bits>"
    if type(value) in (set, frozenset):
        assert isinstance(value, (set, frozenset))
        if not value:
            return repr(value)
        if depth <= 0:
            return f"<{type(value).__name__} of {len(value)}>"
        shown = _listed((short_repr(v, depth - 1) for v in value), len(value), "{", "}")
        return shown if type(value) is set else f"frozenset({shown})"
    if isinstance(value, (dict, list, tuple)):
        # A subclass (an OrderedDict, a defaultdict, a namedtuple a loader returns) was its
        # own repr, whole: a MiB of bytes in one was a repr of 4 MB.
        name = type(value).__name__
        fields = getattr(value, "_fields", None)
        if isinstance(value, tuple) and isinstance(fields, tuple):      # a namedtuple
            return _listed((f"{field}={short_repr(item, depth - 1)}"
                            for field, item in zip(fields, value)), len(value), f"{name}(", ")")
        shown = _bracketed(value, depth)
        return shown if type(value) in (dict, list, tuple) else f"{name}({shown})"
    try:
        text = repr(value)
    except Exception as exc:    # noqa: BLE001 - e.g. a deque's int of 5000 digits
        return f"<{type(value).__name__} whose repr raised {type(exc).__name__}>"
    if len(text) > OTHER_SHOWN:
        return f"{text[:OTHER_SHOWN]}... ({len(text)} characters)"
    return text


def _bracketed(value: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> str:
    """A dict's, list's or tuple's (or its subclass's) entries as that base type shows
    them, bounded; only the entries shown are read (a copy of each was made)."""
    base = dict if isinstance(value, dict) else list if isinstance(value, list) else tuple
    if not value:
        return repr(base())
    if depth <= 0:
        return f"<{base.__name__} of {len(value)}>"
    if isinstance(value, dict):
        return _listed((f"{short_repr(k, depth - 1)}: {short_repr(v, depth - 1)}"
                        for k, v in value.items()), len(value), "{", "}")
    opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
    if isinstance(value, tuple) and len(value) == 1:
        closing = ",)"
    return _listed((short_repr(v, depth - 1) for v in value), len(value), opening, closing)


def _listed(parts: Iterator[str], total: int, opening: str, closing: str) -> str:
    """The first :data:`ITEMS` of ``parts`` (of ``total``), then how many more there are,
    between ``opening`` and ``closing``."""
    shown = list(itertools.islice(parts, ITEMS))
    if total > ITEMS:
        shown.append(f"... ({total - ITEMS} more)")
    return opening + ", ".join(shown) + closing


def fields_repr(obj: Any) -> str:
    """A dataclass instance's repr as the dataclass's own (``Name(field=value, ...)``,
    the fields it shows), each value bounded (:func:`short_repr`)."""
    shown = [f"{field.name}={short_repr(getattr(obj, field.name))}"
             for field in dataclasses.fields(obj) if field.repr]
    return f"{type(obj).__qualname__}({', '.join(shown)})"
