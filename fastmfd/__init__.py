"""fastmfd: QEMU's multifd migration transport, rebuilt as a general library.

Move large memory images (regions of pages) and ordered device-state streams
from a source to a destination over many parallel connections, one worker
process per channel on each side, with zero pages elided and optional
zlib/zstd compression::

    with fastmfd.Destination("tcp:127.0.0.1:4444") as dst:      # in one process
        result = dst.receive()

    with fastmfd.Region.create("pc.ram", 1 << 30) as ram:           # and in another
        with fastmfd.Source("tcp:127.0.0.1:4444", fastmfd.MigrationConfig(channels=4)) as src:
            src.add_region(ram)
            stats = src.migrate(live=False)
"""

import importlib.util
import os
import sys
from types import FrameType

# What ``python -m`` runs as the fastmfd command: the package, its __main__, the CLI.
_COMMANDS = ("fastmfd", "fastmfd.__main__", "fastmfd.tools.cli")


def _run_as_the_command() -> bool:
    """Whether ``python -m`` imports this package to run the command (runpy's
    ``_run_module_as_main``, the caller of this import, runs it)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "_run_module_as_main"
                and frame.f_globals.get("__name__") == "runpy"):
            return frame.f_locals.get("mod_name") in _COMMANDS
        frame = frame.f_back
    return False


# The command handles Ctrl-C once it runs; the imports below come first (see
# _fastmfd_cli, the console script's entry, which does this before importing fastmfd).
if _run_as_the_command():
    import _fastmfd_cli
    _fastmfd_cli.install()

# Imported from a source tree whose extension was never built (a fresh checkout,
# an unpacked sdist: ``python -m pytest`` there puts the tree first on the path),
# the first module to need the core would fail with "cannot import name '_core'
# from partially initialized module" instead.
if importlib.util.find_spec(f"{__name__}._core") is None:
    _tree = os.path.dirname(__path__[0])
    raise ImportError(f"fastmfd is imported from the source tree {_tree}, whose compiled "
                      f"core (fastmfd._core) is not built: run `pip install -e .[test]` "
                      f"(or `python setup.py build_ext --inplace`) in {_tree}",
                      name=f"{__name__}._core")

from .config import Compression, MigrationConfig
from .destination import Destination, DestinationResult, Refusal
from .devices import (BytesDevice, CollectLoader, Device, FileDevice, FileLoader, Loader,
                      SyntheticDevice, VerifyLoader)
from .errors import (ConfigError, ConnectError, FastMFDError, ListenError, MigrationError,
                     NoSourceError, OutputError, ProtocolError, SecurityError)
from .protocol.security import TLSConfig, read_key_file
from .protocol.setup import Setup
from .region_pool import RegionPool
from .regions import Region
from .source import Source
from .stats import ChannelStats, MigrationStats, ReceiveStats, RoundStats

__all__ = [
    "MigrationConfig", "Compression", "TLSConfig", "read_key_file", "Source", "Destination",
    "DestinationResult", "Setup", "Refusal", "Region", "RegionPool",
    "Device", "Loader", "BytesDevice", "FileDevice", "SyntheticDevice", "CollectLoader", "FileLoader",
    "VerifyLoader", "MigrationStats", "ReceiveStats", "ChannelStats", "RoundStats",
    "FastMFDError", "ConfigError", "ListenError", "ProtocolError", "MigrationError",
    "SecurityError", "ConnectError", "OutputError", "NoSourceError",
]

__version__ = "0.1.0"
