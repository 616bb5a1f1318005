"""SETUP: every session parameter, sent once by the source (DESIGN §4.5).

The destination is started with no matching parameters: SETUP tells it the
packet geometry, compression, channels, regions and devices. Everything in
it comes from the network, so every value is bounded here before anyone uses
it to size memory or index anything. The same rules check a
:class:`~fastmfd.MigrationConfig` when it is made (as ConfigError, by the
config's own field names), so a source can never send a SETUP its own
destination would refuse.

Decoding comes in two strengths:

- :meth:`Setup.decode` (a destination): every field present with the right
  type and in bounds, no unknown field; any fault is a
  :class:`~fastmfd.errors.ProtocolError` whose ``field`` is ``SETUP.<key>``
  (``SETUP.regions[2].size`` for an item).
- :meth:`Setup.decode_lenient` (``fastmfd inspect``): optional fields may be
  missing (they take their defaults) and unknown fields are ignored, so a
  capture from another fastmfd version still decodes; what is present obeys
  the same bounds.

Adding a field: a line in :class:`Setup` and one in ``_FIELDS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeGuard, TypeVar

from ..arguments import NUMBER, within
from ..errors import ProtocolError
from ..reprs import fields_repr

__all__ = [
    "Setup", "RegionSpec", "DeviceSpec", "Invalid", "check_name", "check_geometry",
    "check_session", "rule", "level_rule",
    "COMPRESSION_METHODS", "COMPRESSION_LEVELS", "MAX_CHANNELS", "MAX_NAME_BYTES",
    "is_stall_seconds", "STALL_TIMEOUT",
    "MAX_REGIONS", "MAX_DEVICES", "MAX_REGION_BYTES", "MAX_PACKET_BYTES",
]

# "auto" (fastmfd only, QEMU has no such method): each data packet goes raw or as
# zstd, as its sender decides, and says which in its flags; the destination
# decodes zstd or raw packets and refuses any other bit. A destination older than
# "auto" refuses the SETUP with "expected none, zlib or zstd".
COMPRESSION_METHODS = ("none", "zlib", "zstd", "auto")
# Accepted levels, as QEMU's multifd-zlib-level and multifd-zstd-level; "auto"
# picks its own (none's, it ignores it).
COMPRESSION_LEVELS = {"none": range(0, 1 << 31), "zlib": range(0, 10), "zstd": range(1, 21),
                      "auto": range(0, 1 << 31)}
MAX_CHANNELS = 255                  # the init packet's channel id is one byte
MAX_NAME_BYTES = 255                # region and device names: the RAM packet's ramblock field
MAX_REGIONS = 4096                  # each costs the destination a mapping and a bitmap
MAX_DEVICES = 4096                  # each costs the destination a loader thread
MAX_REGION_BYTES = 1 << 48          # 256 TiB: far beyond any RAMBlock, far below overflow
MAX_PACKET_BYTES = 1 << 27          # 128 MiB of pages per RAM packet
CHUNK_SIZES = range(4096, (64 << 20) + 1)       # device chunk: VFIO reads 1 MiB at a time
MAX_QUEUED_BYTES = 1 << 40          # per device, out-of-order chunks held
MIN_STALL_SECONDS, MAX_STALL_SECONDS = 0.1, 86400.0     # stall_timeout


class Invalid(ValueError):
    """A value breaks a rule: ``field`` (a SETUP key), what it was, what was expected.

    Callers turn it into their own error: ProtocolError for SETUP, ConfigError
    for a MigrationConfig."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        super().__init__(f"{field}: {value!r:.80}, expected {expected}")
        self.field, self.value, self.expected = field, value, expected


# ---------------------------------------------------------------- rules

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda value: _is_int(value) and lo <= value <= hi


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_stall_seconds(value: Any) -> bool:
    """A ``stall_timeout`` a peer may say: seconds in MIN..MAX_STALL_SECONDS."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and MIN_STALL_SECONDS <= value <= MAX_STALL_SECONDS)


def _is_page_size(value: Any) -> bool:
    return _in(512, 1 << 21)(value) and value & (value - 1) == 0


# Names end up in file names, logs and error messages: no NUL, no escape sequences.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _name_ok(name: Any) -> TypeGuard[str]:
    if not isinstance(name, str):
        return False
    try:
        raw = name.encode()
    except UnicodeEncodeError:          # a lone surrogate: not UTF-8 at all
        return False
    return 0 < len(raw) <= MAX_NAME_BYTES and not _CONTROL.search(name)



NAME_RULE = f"1..{MAX_NAME_BYTES} UTF-8 bytes, no control characters"


def check_name(name: Any, what: str) -> str:
    """A region or device name the wire can carry; raises Invalid(``what``)."""
    if not _name_ok(name):
        raise Invalid(what, name, NAME_RULE)
    return name


def _check(field: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise Invalid(field, value, expected)


# key: (check, expected, default for a lenient decode; _REQUIRED: none)
_REQUIRED = object()
_FIELDS: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "page_size": (_is_page_size, "a power of two in 512..2097152", _REQUIRED),
    "packet_pages": (_in(1, 65536), "1..65536", _REQUIRED),
    "compression": (COMPRESSION_METHODS.__contains__, "none, zlib, zstd or auto", _REQUIRED),
    # Its range is its method's: level_rule(), checked once the method is known.
    "compression_level": (_is_int, "an int", 1),
    "zero_page_detection": (_is_bool, "a boolean", True),
    "channels": (_in(1, MAX_CHANNELS), f"1..{MAX_CHANNELS}", _REQUIRED),
    "device_state_channels": (_in(0, MAX_CHANNELS - 1), f"0..{MAX_CHANNELS - 1}", 0),
    "channel_header": (_is_bool, "a boolean", True),
    "checksum": (_is_bool, "a boolean", False),
    "chunk_size": (_in(CHUNK_SIZES.start, CHUNK_SIZES.stop - 1), "4096..67108864", None),
    "max_queued_bytes": (_in(CHUNK_SIZES.start, MAX_QUEUED_BYTES), f"4096..{MAX_QUEUED_BYTES}",
                         256 << 20),
    "stall_timeout": (is_stall_seconds, f"seconds in {MIN_STALL_SECONDS:g}..{MAX_STALL_SECONDS:g}",
                      30.0),
    "config_after_ram": (_is_bool, "a boolean", False),
}


def rule(key: str) -> tuple[str, Callable[[Any], bool]]:
    """What SETUP's ``key`` must be, in words, and the check of it: for a
    destination's own bound on the same value (its ``max_queued_bytes``)."""
    ok, expected, _ = _FIELDS[key]
    return expected, ok


def level_rule(compression: str) -> str:
    """The levels ``compression`` takes, in words (after "must be")."""
    levels = COMPRESSION_LEVELS[compression]
    return f"in {levels.start}..{levels.stop - 1} for {compression}"


STALL_TIMEOUT = within(NUMBER, *rule("stall_timeout"))
"""A ``stall_timeout`` argument (a Destination's, fastmfd.qemu's): what SETUP carries."""


def check_geometry(page_size: Any, packet_pages: Any) -> None:
    """The RAM packet geometry the core accepts; raises Invalid."""
    for key, value in (("page_size", page_size), ("packet_pages", packet_pages)):
        ok, expected, _ = _FIELDS[key]
        _check(key, value, ok(value), expected)
    _check("packet_pages", packet_pages, packet_pages * page_size <= MAX_PACKET_BYTES,
           f"at most {MAX_PACKET_BYTES >> 20} MiB per packet (packet_pages * page_size)")


def check_session(values: Mapping[str, Any]) -> None:
    """Every rule on the session parameters, each alone and together (keys as SETUP's).

    Raises Invalid for the first value that breaks one."""
    check_geometry(values["page_size"], values["packet_pages"])
    for key, (ok, expected, _) in _FIELDS.items():
        value = values[key]
        if value is None and key == "chunk_size":
            continue                    # lenient only: a capture that does not say
        _check(key, value, ok(value), expected)
    _check("compression_level", values["compression_level"],
           values["compression_level"] in COMPRESSION_LEVELS[values["compression"]],
           level_rule(values["compression"]))
    total = values["channels"] + values["device_state_channels"]
    _check("device_state_channels", values["device_state_channels"], total <= MAX_CHANNELS,
           f"at most {MAX_CHANNELS} channels in all (the init packet's id is one byte)")
    _check("device_state_channels", values["device_state_channels"],
           values["channel_header"] or values["device_state_channels"] == 0,
           "0 without channel headers (the old way sends device state on the main channel)")
    chunk = values["chunk_size"]
    _check("max_queued_bytes", values["max_queued_bytes"],
           chunk is None or values["max_queued_bytes"] >= chunk,
           "at least one device chunk (chunk_size)")


# ---------------------------------------------------------------- the message

@dataclass(frozen=True)
class RegionSpec:
    """A region the source sends: its name and size in bytes."""
    name: str
    size: int


@dataclass(frozen=True)
class DeviceSpec:
    """A device whose state the source sends (QEMU's idstr and instance id)."""
    idstr: str
    instance_id: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.idstr, self.instance_id)


@dataclass(frozen=True)
class Setup:
    """The SETUP message: every parameter of one session.

    uuid -- the session's 16 bytes, which every channel's hello repeats
    page_size, packet_pages, compression, compression_level, zero_page_detection,
    channels, device_state_channels, channel_header, checksum, max_queued_bytes --
        the source's :class:`~fastmfd.MigrationConfig` fields of these names
    chunk_size -- bytes of the largest device chunk's data (the config's
        device_chunk_size); None only from a lenient decode that lacked it
    stall_timeout -- seconds a channel, process or peer with work may make no progress
    config_after_ram -- loaders get their config chunk only after all RAM is in
    regions -- the regions sent: a RegionSpec (name, size in bytes) each
    devices -- the devices whose state is sent: a DeviceSpec (idstr, instance_id) each
    """

    uuid: bytes
    page_size: int
    packet_pages: int
    compression: str
    compression_level: int
    zero_page_detection: bool
    channels: int
    device_state_channels: int
    channel_header: bool
    checksum: bool
    chunk_size: int | None
    max_queued_bytes: int
    stall_timeout: float
    config_after_ram: bool
    regions: tuple[RegionSpec, ...]
    devices: tuple[DeviceSpec, ...]

    def __post_init__(self) -> None:
        """A Setup that exists obeys every rule (Invalid otherwise)."""
        _check("uuid", self.uuid, isinstance(self.uuid, bytes) and len(self.uuid) == 16,
               "16 bytes")
        check_session(self.session_values())
        _check("regions", len(self.regions), len(self.regions) <= MAX_REGIONS,
               f"at most {MAX_REGIONS} regions")
        _check("devices", len(self.devices), len(self.devices) <= MAX_DEVICES,
               f"at most {MAX_DEVICES} devices")
        for i, region in enumerate(self.regions):
            check_name(region.name, f"regions[{i}].name")
            _check(f"regions[{i}].size", region.size,
                   _in(self.page_size, MAX_REGION_BYTES)(region.size)
                   and region.size % self.page_size == 0,
                   f"a multiple of page_size ({self.page_size}) up to {MAX_REGION_BYTES}")
        names = [r.name for r in self.regions]
        _check("regions", names, len(set(names)) == len(names), "unique names")
        for i, device in enumerate(self.devices):
            check_name(device.idstr, f"devices[{i}].idstr")
            _check(f"devices[{i}].instance_id", device.instance_id,
                   _in(0, 0xFFFFFFFF)(device.instance_id), "0..4294967295")
        keys = [d.key for d in self.devices]
        _check("devices", keys, len(set(keys)) == len(keys), "unique (idstr, instance_id)")

    @property
    def total_channels(self) -> int:
        """The data channels of the session: ``channels`` plus ``device_state_channels``."""
        return self.channels + self.device_state_channels

    def __repr__(self) -> str:
        return fields_repr(self)    # bounded: 8 regions or devices, then a count

    def session_values(self) -> dict[str, Any]:
        """The scalar parameters, by SETUP key."""
        return {key: getattr(self, key) for key in _FIELDS}

    # ------------------------------------------------------------ encode
    def encode(self) -> dict[str, Any]:
        """The JSON object the main channel carries."""
        return {"uuid": self.uuid.hex(), **self.session_values(),
                "regions": [{"name": r.name, "size": r.size} for r in self.regions],
                "devices": [{"idstr": d.idstr, "instance_id": d.instance_id}
                            for d in self.devices]}

    # ------------------------------------------------------------ decode
    @classmethod
    def decode(cls, payload: Mapping[str, Any]) -> "Setup":
        """A destination's reading: complete, in bounds, nothing unknown."""
        known = {"uuid", "regions", "devices", *_FIELDS}
        for key in payload:
            if key not in known:
                raise _protocol_error(Invalid(str(key), payload[key], "no such field"))
        return cls._decode(payload, lenient=False)

    @classmethod
    def decode_lenient(cls, payload: Mapping[str, Any]) -> "Setup":
        """``inspect``'s reading: optional fields may be missing, unknown ones are ignored."""
        return cls._decode(payload, lenient=True)

    @classmethod
    def _decode(cls, payload: Mapping[str, Any], lenient: bool) -> "Setup":
        def get(key: str, default: Any = _REQUIRED) -> Any:
            if key in payload:
                return payload[key]
            if not lenient or default is _REQUIRED:
                raise _protocol_error(Invalid(key, None, "the field (it is missing)"))
            return default

        try:
            values = {key: get(key, default) for key, (_, _, default) in _FIELDS.items()}
            uuid = get("uuid")
            _check("uuid", uuid, isinstance(uuid, str) and len(uuid) == 32
                   and all(c in "0123456789abcdefABCDEF" for c in uuid), "32 hex digits")
            return cls(uuid=bytes.fromhex(uuid), **values,
                       regions=_items(get("regions"), "regions", ("name", "size"), RegionSpec),
                       devices=_items(get("devices", []), "devices", ("idstr", "instance_id"),
                                      DeviceSpec))
        except Invalid as exc:
            raise _protocol_error(exc) from None

    def to_config_kwargs(self) -> dict[str, Any]:
        """The session parameters under :class:`~fastmfd.MigrationConfig`'s names."""
        values = self.session_values()
        values["device_chunk_size"] = values.pop("chunk_size")
        return values


_Item = TypeVar("_Item")


def _items(value: Any, what: str, keys: tuple[str, str],
           kind: Callable[..., _Item]) -> tuple[_Item, ...]:
    """A list of JSON objects with exactly ``keys`` as ``kind`` instances."""
    _check(what, value, isinstance(value, list), f"a list of {{{', '.join(keys)}}}")
    limit = MAX_REGIONS if what == "regions" else MAX_DEVICES
    _check(what, len(value), len(value) <= limit, f"at most {limit} items")
    out = []
    for i, item in enumerate(value):
        _check(f"{what}[{i}]", item, isinstance(item, dict) and set(item) == set(keys),
               f"an object with exactly {', '.join(keys)}")
        out.append(kind(*(item[k] for k in keys)))
    return tuple(out)


def _protocol_error(exc: Invalid) -> ProtocolError:
    return ProtocolError(f"SETUP field {exc.field!r}: received {exc.value!r:.80}, expected "
                         f"{exc.expected}", field=f"SETUP.{exc.field}", received=exc.value,
                         expected=exc.expected)

