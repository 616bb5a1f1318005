"""Migration settings: :class:`MigrationConfig`.

The source holds the configuration; its SETUP message carries every value
the destination needs, so a destination is started with no matching
parameters at all. When the config is made, before anything starts, a field
of the wrong type raises a TypeError naming it, and a bad value a
:class:`~fastmfd.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Unpack

from .arguments import (BOOL, BYTES, INT, POSITIVE, STR, TIMEOUT, Kind, check_types,
                        instance_of, optional)
from .errors import ConfigError
from .protocol.security import TLSConfig, check_auth_key, hidden_key
from .protocol.setup import COMPRESSION_LEVELS, COMPRESSION_METHODS, Invalid, check_session

__all__ = ["MigrationConfig", "Compression", "ConfigChanges", "COMPRESSION_METHODS",
           "COMPRESSION_LEVELS", "paced_channel_rate"]

Compression = Literal["none", "zlib", "zstd", "auto"]
"""The compression methods, for type checkers (``COMPRESSION_METHODS`` at run time)."""

# SETUP's names for the config fields that differ (in errors, the config's own name).
_CONFIG_NAMES = {"chunk_size": "device_chunk_size"}

# What a field accepts, by its annotation below: every field is checked for its type
# first (a TypeError), then for its value (a ConfigError). Every float is seconds or
# bytes per second: finite and > 0 (an infinite timeout overflowed a deadline).
_KINDS: dict[str, Kind] = {
    "int": INT, "float": POSITIVE, "bool": BOOL, "Compression": STR,
    "int | None": optional(INT), "float | None": optional(POSITIVE),
    "bytes | None": optional(BYTES),
    "TLSConfig | None": optional(instance_of(TLSConfig, "a fastmfd.TLSConfig")),
}


@dataclass(frozen=True)
class MigrationConfig:
    """Everything a source needs to run a migration (names follow QEMU's parameters).

    The fields (said here, not after each field, where ``help()`` would not show them):

    channels -- multifd RAM channels (QEMU ``multifd-channels``)
    device_state_channels -- extra channels reserved for device state; they skip RAM
        syncs. fastmfd *adds* them to ``channels`` (``total_channels``)
    compression -- ``"none"``, ``"zlib"`` or ``"zstd"`` (``multifd-compression``), or
        ``"auto"``: each channel chooses per packet between raw pages and zstd, and its
        level (negative fast levels to 3), from how fast the link drains, how fast zstd
        compresses and how much it saves (README, "Adaptive compression")
    compression_level -- zlib 0..9 or zstd 1..20 (``multifd-zlib-level`` /
        ``multifd-zstd-level``); "auto" chooses its own
    zero_page_detection -- detect zero pages in the send workers and send them as
        offsets only
    channel_header -- start every connection with a channel header; False is the
        "old way": no headers, device state on the main channel
    packet_pages -- pages per RAM packet (QEMU: 512 KiB / page size)
    page_size -- bytes per page
    downtime_limit -- seconds the final stop-and-copy may take at the measured
        bandwidth
    max_rounds -- stop iterating after this many live rounds whatever the dirty rate
    max_bandwidth -- bytes per second cap on the wire, or None. Each channel's send
        worker holds to its share (``max_bandwidth / total_channels``) packet by
        packet, RAM and device state alike (a token bucket of one packet); an idle
        channel's share is not lent to the others
    max_queued_bytes -- per device, the bytes the destination may hold out of order
    tls -- TLS for every connection (:class:`~fastmfd.TLSConfig`: the CA that signs
        the destination's certificate, and this side's certificate for mutual TLS)
    auth_key -- a shared key (bytes, >= 16 of them) every connection proves it knows
        (HMAC-SHA256 challenge-response, bound to the session and channel).
        Authenticates, does not encrypt: use TLS for that
    checksum -- a CRC-32 of every multifd packet, header and payload, RAM and device
        state, each continuing the one before it on its channel (so a packet lost,
        repeated or moved fails too), checked by the destination as the packet
        arrives: a mismatch fails the session (for bit flips TCP's checksum misses;
        TLS already authenticates)
    device_chunk_size -- bytes of the largest device-state chunk (VFIO reads up to
        1 MiB at a time)
    job_packets -- RAM packets handed to a send worker per job (fewer wake-ups per GiB)
    timeout -- seconds any setup step (connect, handshake) may take (at most a week,
        ``MAX_TIMEOUT_SECONDS``)
    stall_timeout -- seconds any channel, process or peer may make no progress while
        it has work before the session fails, on both sides (SETUP carries it):
        0.1..86400 (``MIN_STALL_SECONDS``..``MAX_STALL_SECONDS``)
    switchover_ack -- stop the workload only once the destination has loaded every
        device chunk sent live (QEMU's ``switchover-ack`` capability)
    config_after_ram -- hand each device's config chunk to its loader only after all
        RAM is in (QEMU 10.1's order for ARM64 VFIO); SETUP carries it
    device_channels_within -- the seed's channel arithmetic: ``channels`` counts every
        channel and ``device_state_channels`` of them carry device state (the RFC's
        ``x-multifd-channels-device-state``). Normalized when the config is made:
        ``channels`` becomes the RAM channels and this flag False
    """

    channels: int = 2
    device_state_channels: int = 0
    compression: Compression = "none"
    compression_level: int = 1
    zero_page_detection: bool = True
    channel_header: bool = True
    packet_pages: int = 128
    page_size: int = 4096
    downtime_limit: float = 0.3
    max_rounds: int = 30
    max_bandwidth: float | None = None
    max_queued_bytes: int = 256 << 20
    tls: TLSConfig | None = None
    auth_key: bytes | None = None       # an AuthKey once made: its repr hides it
    checksum: bool = False
    device_chunk_size: int = 1 << 20
    job_packets: int = 8
    timeout: float = 30.0
    stall_timeout: float = 30.0
    switchover_ack: bool = False
    config_after_ram: bool = False
    device_channels_within: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, problem: str, involves: tuple[str, ...] = ()) -> None:
            if not ok:
                raise ConfigError(f"{name} {problem}, not {getattr(self, name)!r}",
                                  parameter=name, problem=problem, involves=involves)

        # The key hidden before any check can fail: a traceback's locals show this config
        # (its repr has the field), and check_types' values.
        object.__setattr__(self, "auth_key", hidden_key(self.auth_key))
        # A subclass's own fields are its own to check.
        values = check_types("MigrationConfig", **{name: (getattr(self, name), kind)
                                                   for name, kind in _FIELD_KINDS.items()})
        for name, value in zip(_FIELD_KINDS, values):       # Python's int and float
            object.__setattr__(self, name, value)
        if self.device_channels_within:
            # The seed counts device-state channels within the total; fastmfd adds them.
            need(0 <= self.device_state_channels < self.channels, "channels",
                 f"must count every channel with device_channels_within: more than "
                 f"device_state_channels ({self.device_state_channels!r})",
                 ("device_state_channels", "device_channels_within"))
            object.__setattr__(self, "channels", self.channels - self.device_state_channels)
            object.__setattr__(self, "device_channels_within", False)
        try:
            check_session(self.session_values())
        except Invalid as exc:
            name = _CONFIG_NAMES.get(exc.field, exc.field)
            raise ConfigError(f"{name} must be {exc.expected}, not {exc.value!r}",
                              parameter=name, problem=f"must be {exc.expected}") from None
        need(1 <= self.job_packets <= 64, "job_packets", "must be in 1..64")
        need(self.max_rounds >= 1, "max_rounds", "must be >= 1")
        paced_channel_rate(self.max_bandwidth, self.total_channels,
                           max(self.packet_pages * self.page_size, self.device_chunk_size),
                           self.stall_timeout)
        object.__setattr__(self, "auth_key", check_auth_key(self.auth_key, "MigrationConfig"))
        if self.tls is not None:
            self.tls.check_client()

    def session_values(self) -> dict[str, Any]:
        """The parameters SETUP carries, by SETUP's names."""
        return {"page_size": self.page_size, "packet_pages": self.packet_pages,
                "compression": self.compression, "compression_level": self.compression_level,
                "zero_page_detection": self.zero_page_detection, "channels": self.channels,
                "device_state_channels": self.device_state_channels,
                "channel_header": self.channel_header, "checksum": self.checksum,
                "chunk_size": self.device_chunk_size, "max_queued_bytes": self.max_queued_bytes,
                "stall_timeout": self.stall_timeout, "config_after_ram": self.config_after_ram}

    @property
    def total_channels(self) -> int:
        """The data channels a session opens (one send worker each): ``channels`` plus
        ``device_state_channels``."""
        return self.channels + self.device_state_channels

    @property
    def channel_rate(self) -> float:
        """Bytes/s each channel may send (0.0: no cap)."""
        if self.max_bandwidth is None:
            return 0.0
        return self.max_bandwidth / self.total_channels

    def replace(self, **changes: Unpack[ConfigChanges]) -> "MigrationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class ConfigChanges(TypedDict, total=False):
    """What :meth:`MigrationConfig.replace` takes: any of its fields, as the constructor
    does, so that a type checker refuses a misspelled field or a wrong type there too
    (``**changes: Any`` passed them, to fail at run time). The same names and types as
    the fields (tests/test_typing.py holds them so)."""
    channels: int
    device_state_channels: int
    compression: Compression
    compression_level: int
    zero_page_detection: bool
    channel_header: bool
    packet_pages: int
    page_size: int
    downtime_limit: float
    max_rounds: int
    max_bandwidth: float | None
    max_queued_bytes: int
    tls: TLSConfig | None
    auth_key: bytes | None
    checksum: bool
    device_chunk_size: int
    job_packets: int
    timeout: float
    stall_timeout: float
    switchover_ack: bool
    config_after_ram: bool
    device_channels_within: bool


def paced_channel_rate(max_bandwidth: float | None, channels: int, packet: int,
                       stall_timeout: float) -> float:
    """Bytes/s each of ``channels`` may send of ``max_bandwidth`` (0.0: no cap). A
    ConfigError when that is less than a ``packet`` per ``stall_timeout``: a paced
    channel with work must still send one, or its peer counts it as stalled."""
    if max_bandwidth is None:
        return 0.0
    rate = max_bandwidth / channels
    if not rate * stall_timeout >= packet:
        problem = (f"gives each of the {channels} channels {rate:.0f} bytes/s, less than one "
                   f"packet ({packet} bytes) per stall timeout ({stall_timeout:g} s): give "
                   f"a higher rate, or a longer stall timeout")
        raise ConfigError(f"max_bandwidth {max_bandwidth!r} {problem}",
                          parameter="max_bandwidth", problem=problem,
                          involves=("channels", "stall_timeout"))
    return rate


# Each field's kind, by its annotation (text: this module postpones annotations), but
# timeout's: a week at most (stall_timeout's bounds are SETUP's, check_session's).
_FIELD_KINDS = {field.name: TIMEOUT if field.name == "timeout" else _KINDS[str(field.type)]
                for field in dataclasses.fields(MigrationConfig)}
