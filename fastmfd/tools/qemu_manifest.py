"""The manifest of a directory ``listen --qemu`` saved, read back for ``send
--qemu`` (:class:`fastmfd.qemu.QemuSender`): every field it uses checked, and
each file it names opened inside the directory, never through a link, and only
if it is this user's (:func:`read_manifest`, :func:`open_inside`,
:func:`check_size`). Its writing side is :mod:`fastmfd.tools.outputs`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Any, Callable

from ..errors import ConfigError
from ..protocol.qemu import (COMMAND, COMMAND_PLACES, MAX_PAGE_BITS, MIN_PAGE_BITS,
                             SYNC_PER_ROUND, SYNC_PER_SECTION)
from ..protocol.setup import MAX_REGIONS
from .earlier_save import MAX_MANIFEST_BYTES
from .outputs import MANIFEST
from ..ownership import check_only_yours

__all__ = ["read_manifest", "check_size", "open_inside", "MAX_MANIFEST_BYTES"]


_MANIFEST_KEYS = ("blocks", "page_size", "vmstate", "configuration", "uuid", "ram_section_id",
                  "section_footers")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex(value: object, size: int | None = None) -> bool:
    return (isinstance(value, str) and re.fullmatch(r"(?:[0-9a-f]{2})*", value) is not None
            and (size is None or len(value) == 2 * size))


def _is_block(value: object) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("idstr"), str)
            and isinstance(value.get("file"), str) and _is_int(value.get("size")))


_PAGE_SIZES = {1 << bits for bits in range(MIN_PAGE_BITS, MAX_PAGE_BITS + 1)}

# What each field the sender reads must be: a manifest is a file a person may
# have edited, or another program written; a wrong one is refused up front.
_MANIFEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "blocks": (lambda v: isinstance(v, list) and bool(v), "a list of blocks"),
    # As the stream's target-page-bits is bounded (protocol.qemu) when it is received.
    "page_size": (lambda v: _is_int(v) and v in _PAGE_SIZES,
                  f"a power of two, {1 << MIN_PAGE_BITS}..{1 << MAX_PAGE_BITS}"),
    "vmstate": (lambda v: isinstance(v, dict) and isinstance(v.get("file"), str)
                and _is_int(v.get("size")), "an object with the file's name and size"),
    "configuration": (_is_hex, "bytes in hex"),
    "uuid": (lambda v: v is None or _is_hex(v, 16), "null or 16 bytes in hex"),
    # A section id is a be32 on the wire. (null, a stream without RAM, has no blocks.)
    "ram_section_id": (lambda v: _is_int(v) and 0 <= v < 1 << 32, "an integer, 0..2^32-1"),
    "section_footers": (lambda v: isinstance(v, bool), "true or false"),
    "machine": (lambda v: isinstance(v, str), "a string"),
    "commands": (lambda v: isinstance(v, list), "a list"),
}


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if os.path.isdir(directory):
        check_only_yours(directory, what="saved directory")
        if not os.path.lexists(path):
            raise ConfigError(f"{path} is missing: not a complete save (listen --qemu "
                              f"writes it last, once every other file is on disk)")
    # Never through a link, as the files it names: it says what the directory's are.
    with os.fdopen(open_inside(directory, MANIFEST, os.O_RDONLY), "rb") as f:
        try:
            text = f.read(MAX_MANIFEST_BYTES + 1)
            if len(text) > MAX_MANIFEST_BYTES:
                raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes: not a manifest "
                                 "listen --qemu wrote")
            manifest: dict[str, Any] = json.loads(text)   # any JSON: refused below unless a dict
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply to be a manifest") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    missing = [key for key in _MANIFEST_KEYS
               if not isinstance(manifest, dict) or key not in manifest]
    if missing or manifest.get("format") != "qemu-migration" or not manifest["blocks"]:
        raise ConfigError(f"{path}: not the manifest of a QEMU migration received by fastmfd "
                          f"(missing: {', '.join(missing) or 'format, blocks'})")
    for key, (valid, expected) in _MANIFEST_FIELDS.items():
        if key in manifest and not valid(manifest[key]):
            raise ConfigError(f"{path}: {key} {manifest[key]!r}: expected {expected}")
    _check_blocks(path, manifest["blocks"])
    # Manifests written before QEMU 10's flavour was told apart are QEMU 7.2's.
    manifest.setdefault("multifd_sync", SYNC_PER_SECTION)
    manifest.setdefault("zero_page_detection", "legacy")
    manifest.setdefault("commands", [])     # and so are those without the COMMANDs kept
    flavours = {"multifd_sync": (SYNC_PER_SECTION, SYNC_PER_ROUND),
                "zero_page_detection": ("legacy", "multifd")}
    for key, known in flavours.items():
        if manifest[key] not in known:
            raise ConfigError(f"{path}: {key} {manifest[key]!r}, expected one of "
                              f"{', '.join(known)} (a stream flavour this fastmfd cannot replay)")
    for command in manifest["commands"]:
        try:
            place, section = command["before"], bytes.fromhex(command["section"])
        except (TypeError, KeyError, ValueError):
            place, section = None, b""
        if place not in COMMAND_PLACES or section[:1] != bytes([COMMAND]):
            raise ConfigError(f"{path}: commands: {command!r} is not a COMMAND section "
                              f"('section', hex) and its place ('before': "
                              f"{', '.join(COMMAND_PLACES)})")
    return manifest


def _check_blocks(path: str, blocks: list[Any]) -> None:
    """The manifest's blocks as ``listen --qemu`` accepts a RAM block list: objects
    with an idstr, size and file, each idstr once, at most MAX_REGIONS of them (two
    entries of one idstr went out as two blocks of that name)."""
    if len(blocks) > MAX_REGIONS:
        raise ConfigError(f"{path}: {len(blocks)} blocks, more than {MAX_REGIONS}")
    seen: set[str] = set()
    for i, block in enumerate(blocks):
        if not _is_block(block):
            raise ConfigError(f"{path}: blocks[{i}] {block!r}: expected an object with idstr, "
                              "size and file")
        if block["idstr"] in seen:
            raise ConfigError(f"{path}: blocks[{i}]: idstr {block['idstr']!r} is listed twice")
        seen.add(block["idstr"])


def check_size(directory: str, entry: dict[str, Any], fd: int) -> str:
    """The path of the manifest's file ``entry`` (open as ``fd``), which must be the
    size the manifest says: each is sent as it is, to its end, and one cut short (a
    copy interrupted) would go out whole-looking, the destination QEMU failing it."""
    path = os.path.join(directory, entry["file"])
    size = os.fstat(fd).st_size
    if size != entry["size"]:
        raise ConfigError(f"{path}: {size} bytes, the manifest says {entry['size']}")
    return path


def open_inside(directory: str, name: str, access: int) -> int:
    """The regular file ``name`` (from the manifest) directly inside ``directory``,
    opened for ``access``, never through a symbolic link."""
    if (not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..")
            or "\0" in name):
        raise ConfigError(f"manifest names the file {name!r}: expected a file name in "
                          f"{directory}")
    path = os.path.join(directory, name)
    try:
        # O_NONBLOCK: a FIFO there is refused below, not waited on for a writer
        # (for ever: no timeout runs yet); a regular file's reads ignore it.
        fd = os.open(path, access | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = ("it is a symbolic link" if exc.errno == errno.ELOOP
               else exc.strerror or str(exc))
        raise ConfigError(f"{path}: cannot open it: {why}") from None
    st = os.fstat(fd)
    # Nor one another user could have put or changed there: its bytes become a
    # guest's memory and devices (check_only_yours has the directory's part).
    refused = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"it belongs to another user (uid {st.st_uid})"
               if st.st_uid not in (os.geteuid(), 0) else
               f"others may write it (mode {stat.S_IMODE(st.st_mode):04o})"
               if st.st_mode & stat.S_IWOTH else None)
    if refused is not None:
        os.close(fd)
        raise ConfigError(f"{path}: {refused}")
    return fd
