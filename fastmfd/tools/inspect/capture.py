"""Reading a capture: classify each file, decode the main channel, then every round.

See the package docstring for the flow; :func:`read_capture` is the entry point.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from typing import Any

from ... import _core
from ...errors import ConfigError, FastMFDError, ProtocolError
from ...protocol.bytereader import ByteReader
from ...protocol.main_channel import MAIN_MAGIC
from ...protocol.qemu import QEVM_MAGIC, QemuMainChannel, decode_qemu_main
from ..input_files import open_regular_file
from .contents import DeviceChunks, RamImage
from .fastmfd_main import decode_fastmfd_main
from .multifd import ChannelDecoder, InflateBuffers, check_rounds, open_channels
from .records import Capture, FastmfdMainChannel
from .session import Session, default_packet_pages
from .setup_rules import check_arguments

__all__ = ["read_capture", "LAYOUTS"]

LAYOUTS = (_core.LAYOUT_CURRENT, _core.LAYOUT_QEMU72)
CHANNEL_HEADER_PREFIX = (4).to_bytes(8, "big")    # BE u64 header_size = 4 (DESIGN §4.1)
MULTIFD_MAGIC = _core.MULTIFD_MAGIC.to_bytes(4, "big")
FMFD_MAGIC = MAIN_MAGIC.to_bytes(4, "big")
DEFAULT_MAX_RAM_BYTES = 1 << 32
# TLS's record content types (RFC 8446 §5.1), one of which starts every record: a
# capture of a connection in TLS starts with one (a ClientHello; a server's alert
# refusing a client; a record of a capture started mid-session).
TLS_RECORDS = {0x14: "a ChangeCipherSpec", 0x15: "an alert", 0x16: "a handshake message",
               0x17: "application data"}


def read_capture(paths: Iterable[str | os.PathLike[str]], *, packet_pages: int | None = None, page_size: int = 4096,
                 layout: str | None = None, checksum: bool = False,
                 max_ram_bytes: int = DEFAULT_MAX_RAM_BYTES) -> Capture:
    """Decode the captured channel files ``paths`` (one per connection, any order).

    ``layout`` is ``"qemu-7.2"`` or ``"current"``; by default ``"qemu-7.2"``
    when a QEMU main channel is among the files, else ``"current"`` (without a
    main channel, a failure says whether ``"qemu-7.2"`` decodes the files). ``page_size`` and
    ``packet_pages`` (default: QEMU's 512 KiB of pages, 128 of 4 KiB) are used
    unless the main channel says otherwise (fastmfd's SETUP gives both, QEMU's
    target-page-bits the page size). ``max_ram_bytes`` bounds the distinct
    pages and the inflated device state kept, since a small compressed capture can
    inflate a lot.
    ``checksum``: the packets carry fastmfd's checksum extension (SETUP says so
    when the main channel is in the capture); their CRCs are checked.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if checksum and layout == _core.LAYOUT_QEMU72:
        raise _no_qemu_checksum()
    check_arguments(page_size, default_packet_pages(page_size) if packet_pages is None
                    else packet_pages)
    paths = list(paths)
    readers = [ByteReader(str(path), _map_file(str(path))) for path in paths]
    if not readers:
        raise ConfigError("no capture files given")
    kinds = [_classify(reader) for reader in readers]
    mains = [(reader, kind) for reader, kind in zip(readers, kinds)
             if kind[0] != "multifd"]
    if layout is None and not mains:
        return _channels_alone(paths, packet_pages=packet_pages, page_size=page_size,
                               checksum=checksum, max_ram_bytes=max_ram_bytes)
    if len(mains) > 1:
        raise mains[1][0].error("a second main channel in the capture (first: "
                                f"{mains[0][0].path})", field="magic",
                                received="main channel", expected="one main channel", at=0)

    devices = DeviceChunks()
    session = Session(packet_pages=packet_pages, page_size=page_size, checksum=checksum)
    image = RamImage(max_ram_bytes)
    main = _decode_main(*mains[0], session, devices, image) if mains else None
    if session.packet_pages is None:
        session.packet_pages = default_packet_pages(session.page_size)
    if layout is None:
        layout = _core.LAYOUT_QEMU72 if isinstance(main, QemuMainChannel) else \
            _core.LAYOUT_CURRENT
    if session.checksum and isinstance(main, QemuMainChannel):
        raise _no_qemu_checksum()
    if layout == _core.LAYOUT_QEMU72 and (session.checksum or session.compression_optional):
        # A fastmfd SETUP saying so, with --layout qemu-7.2: the layout's RamPacketCodec
        # raised ValueError ('no fastmfd extensions'), a traceback out of inspect.
        said = "its checksum" if session.checksum else "compression auto (packets sent raw)"
        raise ConfigError(f"layout {layout}: this session's SETUP says {said}, which QEMU's "
                          f"layout has no room for: inspect it without --layout",
                          parameter="layout", problem=f"the session's SETUP says {said}")

    channels = open_channels([(r, k) for r, k in zip(readers, kinds) if k[0] == "multifd"],
                             session)
    buffers = InflateBuffers()
    decoders = [ChannelDecoder(reader, channel, layout, session, image, devices, buffers)
                for reader, channel in channels]
    _decode_rounds(decoders)
    check_rounds(main, decoders)
    blocks = dict(session.regions or {})
    return Capture(
        layout=layout, page_size=session.page_size, packet_pages=session.packet_pages,
        main=main, channels=[channel for _, channel in channels],
        blocks=blocks, ram=image.by_block(blocks), devices=devices.finish(),
        pages_resent=image.resent, pages_resent_changed=image.changed)


def _channels_alone(paths: list[str | os.PathLike[str]], **options: Any) -> Capture:
    """:func:`read_capture` of multifd channels without their main channel, which
    would say the layout and the checksum: "current" is assumed, without one unless
    given. A failure says what does decode them: fastmfd's checksum (a checksummed
    session's channel failed at its packets' 'unused' bytes, where the CRC sits, and
    was named a QEMU 7.2 capture, which it decodes as), else QEMU 7.2's layout (a
    QEMU 7.2 capture's lone conn1.bin was reported corrupt, "next_packet_size:
    received 31, expected 0", with no word of the layout)."""
    try:
        return read_capture(paths, layout=_core.LAYOUT_CURRENT, **options)
    except ProtocolError as exc:
        if not options["checksum"] and _decodes(paths, layout=_core.LAYOUT_CURRENT,
                                                **{**options, "checksum": True}):
            note = (": with fastmfd's checksum it decodes (a checksummed fastmfd session's "
                    "channel? `inspect --checksum`)")
        elif _decodes(paths, layout=_core.LAYOUT_QEMU72, **options):
            note = (f": as layout {_core.LAYOUT_QEMU72} it decodes (a QEMU 7.2 capture? "
                    f"`inspect --layout {_core.LAYOUT_QEMU72}`)")
        elif not options["checksum"] and exc.field == "unused":
            # (The CRC covers the header, whose size is the session's packet pages.)
            note = (": fastmfd's checksum sets those bytes (a checksummed fastmfd session's "
                    "channel? `inspect --checksum` with its --packet-pages)")
        else:
            note = f" (as layout {_core.LAYOUT_QEMU72} it fails too)"
            if options["checksum"]:
                note = ""           # (no QEMU 7.2 capture has fastmfd's checksum)
        raise ProtocolError(f"{exc.detail}; decoded as layout {_core.LAYOUT_CURRENT}, since no "
                            f"main channel says which{note}", field=exc.field,
                            received=exc.received, expected=exc.expected,
                            where=exc.where) from None


def _decodes(paths: list[str | os.PathLike[str]], **options: Any) -> bool:
    try:
        read_capture(paths, **options)
    except FastMFDError:
        return False
    return True


def _no_qemu_checksum() -> ConfigError:
    """``checksum`` with QEMU's packets: the QEMU 7.2 layout's RamPacketCodec raised
    ValueError ('no fastmfd extensions'), a traceback out of inspect --checksum."""
    return ConfigError("checksum: QEMU's packets (the qemu-7.2 layout, or a QEMU main "
                       "channel) carry no fastmfd checksum", parameter="checksum",
                       problem="QEMU's packets carry no fastmfd checksum")


def _decode_main(reader: ByteReader, kind: tuple[str, int | None], session: Session,
                 devices: DeviceChunks, image: RamImage) -> QemuMainChannel | FastmfdMainChannel:
    """Decode the main channel; what it says about the session goes into ``session``,
    the pages it carries (a QEMU one's) into ``image``."""
    name, header_type = kind
    if name == "fastmfd-main":
        ours = decode_fastmfd_main(reader, header_type is not None, session, devices)
        session.key_proof = ours.messages["AUTH"] > 0     # an auth_key proves every channel
        return ours
    session.key_proof = False
    def apply(block: str, offset: int, page: memoryview, at: int, round_: int) -> None:
        image.apply_main(block, offset, page, reader.path, at, round_)

    main = decode_qemu_main(reader.path, reader.raw, session.page_size, apply)
    session.page_size = main.page_size
    session.regions = main.blocks
    session.uuid = main.uuid
    return main


def _decode_rounds(decoders: list[ChannelDecoder]) -> None:
    """Apply the multifd channels' pages in the order the SYNC barriers impose:
    round r of every channel (up to and including its r-th SYNC) before round
    r + 1 of any, so a later round's copy of a page wins. (The main channel's
    pages are in the image already, each with its round: see RamImage.)"""
    while any(not d.done for d in decoders):
        for decoder in decoders:
            if not decoder.done:
                decoder.decode_round()


def _map_file(path: str) -> bytes | mmap.mmap:
    """The bytes of the capture file ``path``, mapped read-only, not read: a capture
    can be many GiB, and the decoders only take views of the parts they look at.
    (The mapping lives as long as a view of it: the Capture's pages are some.)"""
    fd, size = open_regular_file(path, path)
    try:
        if size == 0:
            return b""              # mmap refuses an empty file
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _classify(reader: ByteReader) -> tuple[str, int | None]:
    """``(kind, channel header type or None)``; leaves the reader after the channel header.

    kind: "qemu-main", "fastmfd-main" or "multifd".
    """
    header_type = None
    if reader.peek(8) == CHANNEL_HEADER_PREFIX:
        try:
            header_type = _core.decode_channel_header(reader.take(_core.CHANNEL_HEADER_SIZE,
                                                                  "channel header"))
        except ProtocolError as exc:
            raise reader.locate(exc, 0) from None
    magic = reader.peek(4)
    if header_type is None and magic == QEVM_MAGIC:
        return "qemu-main", None
    if header_type in (None, _core.CHANNEL_MAIN) and magic == FMFD_MAGIC:
        return "fastmfd-main", header_type
    if header_type in (None, _core.CHANNEL_MULTIFD, _core.CHANNEL_DEVICE_STATE) \
            and magic == MULTIFD_MAGIC:
        return "multifd", header_type
    if header_type is None and len(magic) > 1 and magic[0] in TLS_RECORDS and magic[1] == 3:
        # A TLS record (a content type, version 3.x): the bytes of a connection in
        # TLS, which no capture of them can decode.
        raise reader.error(f"a TLS record (first bytes {magic.hex()}: {TLS_RECORDS[magic[0]]}): "
                           "this connection was in TLS, and inspect decodes plaintext captures "
                           "only", field="magic", received=magic.hex(), expected="plaintext")
    expected = {None: "QEVM, FMFD, 0x11223344 or a channel header",
                _core.CHANNEL_MAIN: "FMFD (channel type 0 is main)",
                _core.CHANNEL_POSTCOPY: "no postcopy channel (type 1 is not supported)"}
    raise reader.error(f"unknown channel: first bytes {magic.hex() or '(none)'}, expected "
                       f"{expected.get(header_type, '0x11223344 (a multifd channel)')}",
                       field="magic", received=magic.hex(),
                       expected=expected.get(header_type, "0x11223344"))
