"""Mutations for benchmarks/fuzz.py: bytes (bit flips, byte replacement, truncation,
extension, insertion, splicing, field-aware boundary values) and JSON values
(boundary numbers, wrong types, missing and unknown keys, deep nesting).

Every function takes a ``random.Random``: a case is fully determined by the
generator's state, so ``fuzz.py --replay`` rebuilds it exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

__all__ = ["BOUNDARY", "Field", "mutate_bytes", "mutate_json", "mutate_text"]

# The boundary values every length, count and offset field is tried with.
BOUNDARY = (0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1)
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x40, 0x20, 0x0A, 0x22, 0x5C)


@dataclass(frozen=True)
class Field:
    """A big-endian unsigned field of a binary structure: where, how wide, what."""
    at: int
    width: int              # bytes: 1, 2, 4 or 8
    name: str


def _field_values(rng: random.Random, width: int, current: int) -> int:
    bits = 8 * width
    mask = (1 << bits) - 1
    choice = rng.randrange(10)
    if choice < 4:
        return rng.choice(BOUNDARY) & mask
    if choice == 4:
        return rng.choice((mask, mask >> 1, (mask >> 1) + 1))
    if choice == 5:
        return (current + rng.choice((1, -1, 2, -2, 4096, -4096))) & mask
    if choice == 6:
        return (current * rng.choice((2, 3, 16, 4096))) & mask
    if choice == 7:
        return current ^ (1 << rng.randrange(bits))
    if choice == 8:
        return rng.choice((4096, 4095, 4097, 65536, 1 << 20, 1 << 27, 1 << 30, 128, 129, 255,
                           256, 0x40, 0x02, 0x04, 0x08, 0x01)) & mask
    return rng.getrandbits(bits)


def mutate_bytes(rng: random.Random, data: bytes, fields: tuple[Field, ...] = (),
                 donors: tuple[bytes, ...] = (), max_ops: int = 3,
                 positions: tuple[int, ...] = ()) -> bytes:
    """``data`` with 1..max_ops mutations. ``fields`` get boundary values,
    ``donors`` (other valid inputs of the same kind) lend ranges to splice in,
    ``positions`` are offsets worth aiming at (record starts in a stream)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.random()
        if fields and op < 0.35:
            field = rng.choice(fields)
            at = field.at
            if positions and rng.random() < 0.5:
                at += rng.choice(positions)
            if at + field.width <= len(buf):
                current = int.from_bytes(buf[at:at + field.width], "big")
                value = _field_values(rng, field.width, current)
                buf[at:at + field.width] = value.to_bytes(field.width, "big")
                continue
        if not buf:
            buf += rng.randbytes(rng.randint(1, 16))
            continue
        if op < 0.50:                                   # bit flips
            for _ in range(rng.choice((1, 1, 2, 8))):
                pos = _position(rng, len(buf), positions)
                buf[pos] ^= 1 << rng.randrange(8)
        elif op < 0.62:                                 # byte replacement
            for _ in range(rng.choice((1, 1, 2, 4))):
                pos = _position(rng, len(buf), positions)
                buf[pos] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.6 \
                    else rng.randrange(256)
        elif op < 0.70:                                 # an aligned word: a boundary value
            width = rng.choice((4, 8))
            pos = _position(rng, len(buf), positions) & ~(width - 1)
            if pos + width <= len(buf):
                value = rng.choice(BOUNDARY) & ((1 << 8 * width) - 1)
                buf[pos:pos + width] = value.to_bytes(width, "big")
        elif op < 0.78:                                 # truncation
            keep = rng.choice((0, 1, len(buf) - 1, rng.randrange(len(buf)),
                               _position(rng, len(buf), positions)))
            del buf[max(0, keep):]
        elif op < 0.85:                                 # extension
            n = rng.choice((1, 3, 8, 12, 64, rng.randint(1, 4096)))
            tail = rng.randbytes(n) if rng.random() < 0.5 else bytes(buf[:n]) or b"\0"
            buf += tail
        elif op < 0.91:                                 # insertion or deletion inside
            pos = _position(rng, len(buf), positions)
            n = rng.choice((1, 4, 8, rng.randint(1, 64)))
            if rng.random() < 0.5:
                buf[pos:pos] = rng.randbytes(n)
            else:
                del buf[pos:pos + n]
        elif donors:                                    # splice from another valid input
            donor = rng.choice(donors)
            if donor:
                start = rng.randrange(len(donor))
                n = rng.randint(1, min(len(donor) - start, 512))
                pos = start if start < len(buf) and rng.random() < 0.7 \
                    else rng.randrange(len(buf))
                buf[pos:pos + n] = donor[start:start + n]
        else:                                           # duplicate a range
            start = rng.randrange(len(buf))
            n = rng.randint(1, min(len(buf) - start, 256))
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = buf[start:start + n]
    return bytes(buf)


def _position(rng: random.Random, size: int, positions: tuple[int, ...]) -> int:
    if positions and rng.random() < 0.6:
        return min(size - 1, rng.choice(positions) + rng.randrange(64))
    return rng.randrange(size)


# ---------------------------------------------------------------- JSON values

def _boundary_number(rng: random.Random):
    return rng.choice((*BOUNDARY, -1, -(2**63), 2**64, 2**65, 10**30, 0.5, 1.0, -0.0, 1e308,
                       float("inf"), float("-inf"), float("nan"), 4096, 4095, 65536, 65537,
                       255, 256, 2**48, 2**48 + 4096, 2**27, 2**26, 4097, 512, 2**21,
                       2**21 + 1, 2**40, 2**40 + 1))


def _odd_value(rng: random.Random, depth_hint: int = 0):
    choice = rng.randrange(12)
    if choice < 4:
        return _boundary_number(rng)
    if choice == 4:
        return rng.choice((True, False, None))
    if choice == 5:
        return rng.choice(("", "none", "zlib", "zstd", "x" * 256, "x" * 255, "a\0b", "\ud800",
                           "é" * 128, "pc.ram", "ram0", "../etc", "0" * 32, "g" * 32))
    if choice == 6:
        return rng.choice(([], {}, [1], [{}], {"a": 1}))
    if choice == 7:
        # Well under the recursion limit: copied and shown by json here, a depth near
        # it failed or not with the caller's stack (a worker's, --replay's), and the
        # case replayed differed. Text nested past the limit is mutate_text's.
        return _nested(rng, rng.choice((2, 50, 200, 400, 600)))
    if choice == 8:
        return [_boundary_number(rng)] * rng.choice((1, 255, 256, 4096, 4097))
    if choice == 9:
        return {"name": _odd_value(rng), "size": _odd_value(rng)} if rng.random() < 0.5 \
            else {"idstr": _odd_value(rng), "instance_id": _odd_value(rng)}
    if choice == 10:
        return int("9" * rng.choice((19, 20, 100, 4300)))
    return rng.getrandbits(rng.choice((8, 32, 64, 65)))


def _nested(rng: random.Random, depth: int):
    value = rng.choice((1, [], {}, "x"))
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def mutate_json(rng: random.Random, value, max_ops: int = 3):
    """A deep copy of the JSON ``value`` (dicts and lists) with 1..max_ops changes."""
    try:
        return _mutate_json(rng, json.loads(json.dumps(value)), max_ops)
    except (RecursionError, ValueError):     # nested too deep to copy or show: keep it
        return [value]


def _mutate_json(rng: random.Random, value, max_ops: int):
    for _ in range(rng.randint(1, max_ops)):
        containers = _containers(value)
        holder, key = rng.choice(containers)
        op = rng.random()
        if key is None:                                     # the holder itself
            if isinstance(holder, dict):
                if op < 0.5 or not holder:
                    holder[rng.choice(("extra", "uuid", "regions", "devices", "round",
                                       "chunk_size", ""))] = _odd_value(rng)
                else:
                    del holder[rng.choice(list(holder))]
            elif isinstance(holder, list):
                if op < 0.4 and holder:
                    holder.append(json.loads(json.dumps(rng.choice(holder))))
                elif op < 0.7 and holder:
                    del holder[rng.randrange(len(holder))]
                elif holder and op < 0.85:
                    # Copies of a scalar: thousands of references to one container,
                    # grown by a later change, made one JSON text of 10^9 elements.
                    first = holder[0] if not isinstance(holder[0], (dict, list)) else \
                        _boundary_number(rng)
                    holder.extend([first] * rng.choice((254, 255, 4095, 4096)))
                else:
                    holder.append(_odd_value(rng))
            continue
        current = holder[key]
        if op < 0.45:
            holder[key] = _odd_value(rng)
        elif op < 0.6 and isinstance(current, int) and not isinstance(current, bool):
            holder[key] = current + rng.choice((1, -1, current, -current - 1, 4096))
        elif op < 0.7 and isinstance(current, str):
            holder[key] = rng.choice((current + "x", current[:-1], current.upper(),
                                      current + "\0", current * 2, current[:31] + "z"))
        elif op < 0.8:
            holder[key] = str(current) if not isinstance(current, str) else len(current)
        elif isinstance(holder, dict):
            del holder[key]
        else:
            holder[key] = [current]
    return value


def _containers(value, out=None, depth=0):
    """(holder, key) pairs: every value inside ``value`` (key None: the holder itself)."""
    out = [] if out is None else out
    if depth > 8:
        return out
    if isinstance(value, dict):
        out.append((value, None))
        for key in list(value):
            out.append((value, key))
            _containers(value[key], out, depth + 1)
    elif isinstance(value, list):
        out.append((value, None))
        for i in range(min(len(value), 8)):
            out.append((value, i))
            _containers(value[i], out, depth + 1)
    return out


def mutate_text(rng: random.Random, value) -> bytes:
    """The JSON text of ``value``, mutated structurally and/or as bytes."""
    if rng.random() < 0.7:
        value = mutate_json(rng, value)
    try:
        text = json.dumps(value, separators=(",", ":")).encode()
    except (RecursionError, ValueError):
        text = b"[" * 5000
    r = rng.random()
    if r < 0.25:
        text = mutate_bytes(rng, text)
    elif r < 0.30:
        text = text.replace(b":", b":" + rng.choice((b"NaN,", b"1e999,", b"-", b" ")), 1)
    elif r < 0.33:
        text = rng.choice((b"\xef\xbb\xbf", b"\xff\xfe", b"\0", b" ")) + text
    elif r < 0.36:
        text = text.decode().encode(rng.choice(("utf-16", "utf-16-be", "utf-32")))
    elif r < 0.39:          # nested past the recursion limit (a decoder's RecursionError)
        depth = rng.choice((990, 1000, 5000))
        text = b'{"k":' * depth + text + b"}" * depth if rng.random() < 0.5 else \
            b"[" * depth + text + b"]" * depth
    return text
