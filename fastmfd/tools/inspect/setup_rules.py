"""fastmfd's SETUP as ``inspect`` takes it: decoded leniently by the protocol
layer (:meth:`fastmfd.protocol.setup.Setup.decode_lenient`: a capture may come
from another fastmfd version, so unknown fields are ignored and optional ones
default; a field that is there obeys the destination's bounds), then taken
into the decoders' session.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from ...protocol.setup import Invalid, Setup, check_geometry
from .session import COMPRESSION_FLAGS, Session

__all__ = ["apply_setup", "check_arguments"]


def check_arguments(page_size: int, packet_pages: int) -> None:
    """The packet geometry given on the command line (ConfigError)."""
    try:
        check_geometry(page_size, packet_pages)
    except Invalid as exc:
        raise ConfigError(f"{exc.field} {exc.value!r}: expected {exc.expected}") from None


def apply_setup(payload: dict[str, Any], session: Session) -> None:
    """Decode a SETUP payload (ProtocolError naming ``SETUP.<field>``) into ``session``."""
    setup = Setup.decode_lenient(payload)
    session.uuid = setup.uuid
    session.page_size, session.packet_pages = setup.page_size, setup.packet_pages
    # "auto" sends each payload raw or as zstd, and its flags say which.
    session.compression_optional = setup.compression == "auto"
    session.compression = COMPRESSION_FLAGS["zstd" if session.compression_optional
                                            else setup.compression]
    session.channels = setup.total_channels
    session.checksum = setup.checksum
    session.chunk_size = setup.chunk_size
    session.regions = {r.name: r.size for r in setup.regions}
    session.devices = [d.key for d in setup.devices]
