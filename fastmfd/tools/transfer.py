"""``fastmfd send`` and ``fastmfd listen``: memory images and state files
across hosts.

The sender maps each image file as a region (``Region.from_file``, nothing
is read into memory first) and each state file as a device; the listener
maps one output file per region the source announces and writes each
device's state to a file. Neither side needs the other's parameters: the
listener learns everything from SETUP.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..config import MigrationConfig
from ..destination import Destination, DestinationResult
from ..devices import FileDevice
from ..errors import ConfigError
from ..regions import Region
from ..source import Source
from ..stats import MigrationStats

__all__ = ["ImageSpec", "StateSpec", "send_images", "listen_once", "output_name"]


@dataclass(frozen=True)
class ImageSpec:
    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "ImageSpec":
        """``NAME=PATH``, or ``PATH`` (the name is the file name without its extension)."""
        name, sep, path = text.partition("=")
        if not sep:
            path = text
            name = os.path.splitext(os.path.basename(text))[0]
        if not name or not path:
            raise ConfigError(f"bad image {text!r}: expected PATH or NAME=PATH")
        return cls(name, path)


@dataclass(frozen=True)
class StateSpec:
    idstr: str
    instance_id: int
    path: str

    @classmethod
    def parse(cls, text: str) -> "StateSpec":
        """``IDSTR=PATH`` or ``IDSTR:INSTANCE=PATH``."""
        ident, sep, path = text.partition("=")
        idstr, colon, instance = ident.rpartition(":")
        if not colon:
            idstr, instance = ident, "0"
        if not sep or not idstr or not path or not instance.isdigit():
            raise ConfigError(f"bad state {text!r}: expected IDSTR=PATH or IDSTR:INSTANCE=PATH")
        return cls(idstr, int(instance), path)


def send_images(address: str, config: MigrationConfig, images: list[ImageSpec],
                states: list[StateSpec] = (), *, progress: bool = False) -> MigrationStats:
    """Send image files (and state files) to a listening destination."""
    source = Source(address, config)        # checks the address before files are opened
    regions = []
    try:
        for image in images:
            regions.append(Region.from_file(image.name, image.path, page_size=config.page_size))
        with source as src:
            for region in regions:
                src.add_region(region)
            for state in states:
                src.add_device(FileDevice(state.idstr, state.instance_id, state.path))
            return src.migrate(live=False, progress=progress)
    finally:
        for region in regions:
            region.close()


def output_name(name: str) -> str:
    """A file name for a region or device name ('/rom@etc/acpi/tables' is valid)."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", name).lstrip(".") or "_"


def listen_once(address: str, directory: str, *, timeout: float = 3600.0,
                stall_timeout: float | None = None, on_listening=None) -> tuple[DestinationResult, dict[str, str]]:
    """Receive one migration into ``directory``: ``<region>.img`` files mapped
    while they are written, ``<idstr>.<instance>.state`` for each device.
    Returns the result and the files written, by region or device name."""
    os.makedirs(directory, exist_ok=True)
    files: dict[str, str] = {}

    def region_file(name: str, size: int, page_size: int) -> Region:
        path = os.path.join(directory, output_name(name) + ".img")
        if path in files.values():
            raise ConfigError(f"regions {name!r} and another map to the same file {path}")
        files[name] = path
        return Region.from_file(name, path, size=size, page_size=page_size)

    with Destination(address, timeout=timeout, region_factory=region_file,
                     stall_timeout=stall_timeout) as dst:
        if on_listening is not None:
            on_listening(dst.address)
        result = dst.receive()
        for (idstr, instance_id), state in result.devices.items():
            path = os.path.join(directory, f"{output_name(idstr)}.{instance_id}.state")
            with open(path, "wb") as out:
                out.write(state)
            files[f"{idstr}/{instance_id}"] = path
        for name, path in files.items():
            if name in result.regions:
                os.truncate(path, result.regions[name].size)
    return result, files
