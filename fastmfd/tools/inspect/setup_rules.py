"""fastmfd's SETUP as ``inspect`` reads it: checked leniently, then taken into the session.

A capture may come from another fastmfd version or be damaged, so unknown
fields are ignored and optional ones default; a field that is there must be
valid, or the fault is a :class:`~fastmfd.errors.ProtocolError` naming it.
(This module stands in for the lenient SETUP decoder of the protocol layer.)
"""

from __future__ import annotations

from ...errors import ProtocolError
from .session import COMPRESSION_FLAGS, Session

__all__ = ["apply_setup", "check_geometry"]


def check_geometry(packet_pages, page_size, error) -> None:
    """The packet geometry the core accepts, checked before it is used (error: class)."""
    if not isinstance(page_size, int) or isinstance(page_size, bool) \
            or not 512 <= page_size <= 1 << 21 or page_size & (page_size - 1):
        raise error(f"page_size {page_size!r}: expected a power of two in 512..2097152")
    if not isinstance(packet_pages, int) or isinstance(packet_pages, bool) \
            or not 1 <= packet_pages <= 65536 or packet_pages * page_size > 1 << 30:
        raise error(f"packet_pages {packet_pages!r}: expected 1..65536 and at most 1 GiB "
                    "per packet")


_MISSING = object()


def apply_setup(setup: dict, session: Session) -> None:
    """Validate SETUP (DESIGN §4.5) and take the session's parameters from it."""
    def get(key, check, expected, default=_MISSING):
        value = setup.get(key, default)
        if value is _MISSING:
            raise ProtocolError(f"SETUP has no field {key!r} (expected {expected})",
                                field=f"SETUP.{key}", received=None, expected=expected)
        if not check(value):
            raise ProtocolError(f"SETUP field {key!r}: received {value!r:.80}, expected "
                                f"{expected}", field=f"SETUP.{key}", received=value,
                                expected=expected)
        return value

    def integer(lo, hi):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def uuid(v):
        try:
            return isinstance(v, str) and len(bytes.fromhex(v)) == 16
        except ValueError:
            return False

    session.uuid = bytes.fromhex(get("uuid", uuid, "32 hex digits"))
    page_size = get("page_size", integer(512, 1 << 21), "a power of two in 512..2097152")
    packet_pages = get("packet_pages", integer(1, 65536), "1..65536")
    try:
        check_geometry(packet_pages, page_size, ValueError)
    except ValueError as exc:
        raise ProtocolError(f"SETUP: {exc}", field="SETUP.page_size", received=page_size,
                            expected="a valid packet geometry") from None
    session.page_size, session.packet_pages = page_size, packet_pages
    session.compression = COMPRESSION_FLAGS[get("compression", COMPRESSION_FLAGS.__contains__,
                                                "none, zlib or zstd")]
    session.channels = get("channels", integer(1, 256), "1..256")
    get("device_state_channels", integer(0, session.channels), f"0..{session.channels}", 0)
    get("channel_header", lambda v: isinstance(v, bool), "a boolean", True)
    session.checksum = get("checksum", lambda v: isinstance(v, bool), "a boolean", False)
    session.chunk_size = get("chunk_size", integer(1, 1 << 30), "1..1 GiB", None)

    def region(v):
        return (isinstance(v, dict) and _valid_name(v.get("name"))
                and integer(page_size, 1 << 62)(v.get("size")) and v["size"] % page_size == 0)

    regions = get("regions", lambda v: isinstance(v, list) and all(map(region, v)),
                  "a list of {name, size} (size a multiple of page_size)")
    session.regions = {r["name"]: r["size"] for r in regions}
    if len(session.regions) != len(regions):
        raise ProtocolError("SETUP field 'regions': a name is listed twice",
                            field="SETUP.regions", received=[r["name"] for r in regions],
                            expected="unique names")

    def device(v):
        return (isinstance(v, dict) and _valid_name(v.get("idstr"))
                and integer(0, 0xFFFFFFFF)(v.get("instance_id")))

    session.devices = [(d["idstr"], d["instance_id"]) for d in
                       get("devices", lambda v: isinstance(v, list) and all(map(device, v)),
                           "a list of {idstr, instance_id}", [])]


def _valid_name(name) -> bool:
    """A region or device name the wire can carry: 1..255 UTF-8 bytes, no NUL."""
    if not isinstance(name, str) or "\0" in name:
        return False
    try:
        return 0 < len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:      # JSON can carry lone surrogates
        return False
